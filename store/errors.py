"""The store's exception catalogue: each message names the offending value and the fix."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error raised by evertune.store."""


class SchemaError(StoreError, RuntimeError):
    """The database file is not one this version can use."""


class StoreLockedError(StoreError, RuntimeError):
    """Another process holds the store's write lock longer than the busy timeout: wait."""


class IngestError(StoreError, ValueError):
    """A file cannot be ingested at all (not a per-record problem)."""


class RecordError(StoreError, ValueError):
    """One record of a data file is unusable; the message is the reason shown to the user."""


class InvalidDomainError(StoreError, ValueError):
    """A domain name that cannot be served as a model name."""


class RegistryError(StoreError, ValueError):
    """An adapter version folder is missing, corrupt, or not in the state asked for."""


class UnsafeFolderError(StoreError, RuntimeError):
    """A folder evertune would write or delete in is a symbolic link, or leads out of the
    home: anyone who can write to the inbox could otherwise point the service elsewhere."""


class FileChangedError(StoreError, RuntimeError):
    """A dropped file changed while it was read (its writer still had it open): nothing of
    it was stored, it stays in the inbox and is read again once it settles."""
