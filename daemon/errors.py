"""The daemon's exception catalogue. Only the CLI and the daemon's job boundary turn these
into output; each message carries the offending value and how to fix it."""

from __future__ import annotations

# The CLI's exit codes: success; some records or files rejected, or a failure; a usage or
# configuration error; the gate refused the candidate; nothing new to train on.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED, EXIT_NOTHING = 0, 1, 2, 3, 4


class EvertuneError(Exception):
    """Base class of every error raised by evertune.daemon."""


class ConfigError(EvertuneError, ValueError):
    """The config file is missing, unreadable, or has an unknown key or a bad value."""


class UsageError(EvertuneError, ValueError):
    """A command was called with arguments that cannot work (exit code 2)."""


class DaemonRunningError(EvertuneError, RuntimeError):
    """A second daemon was started on a home that already has one."""


class ServingError(EvertuneError, RuntimeError):
    """A vLLM endpoint could not be reached, started or made to serve a version."""


class EndpointDown(ServingError):
    """A vLLM endpoint did not answer (connection refused, timeout): retried later."""


class AdapterRefused(ServingError):
    """A vLLM endpoint answered but refused to load an adapter folder."""


class StoreGone(EvertuneError, RuntimeError):
    """The store the daemon opened was deleted or replaced under it: it writes nothing."""
