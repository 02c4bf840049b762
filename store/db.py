"""Opening the store: one SQLite file in WAL mode, migrated to the current schema.

Every write is a transaction begun IMMEDIATE (`write_transaction`), so writers queue on
SQLite's lock (`busy_timeout`) instead of failing: the daemon's few connections (one per
thread that writes, daemon/service.py lists them) and a CLI acting on the store while no
daemon runs. Readers (the CLI, status) open their own and never block a writer (WAL).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from sqlite_utils import Database

from evertune.store.errors import SchemaError, StoreError, StoreLockedError
from evertune.store.schema import migrations

BUSY_TIMEOUT_MS = 30_000


def utcnow() -> str:
    """ISO-8601 UTC timestamp with milliseconds, the format of every time column."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def open_db(path: Path | str, *, readonly: bool = False) -> Database:
    """Open (creating and migrating if needed) the store at `path`."""
    path = Path(path)
    if readonly:
        if not path.exists():
            raise SchemaError(f"no store at {path}: run `evertune init` or start the daemon first")
        # Not `mode=ro`: a read-only open of a WAL database fails when its -shm file is missing.
        conn = sqlite3.connect(path, check_same_thread=False)
        conn.execute("PRAGMA query_only = 1")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    db = Database(conn, execute_plugins=False)
    if readonly:
        try:  # a damaged file fails here, named, not at the reader's first query
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise store_problem(path, exc) from exc
        return db
    try:
        db.enable_wal()
        # FULL in WAL mode: a commit is on disk before the file is moved to done/, so a power
        # cut can never leave a file in done/ whose examples were lost. One fsync per file.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        # 32 MB of page cache keeps the (domain, content_hash) index hot while a large file
        # is inserted; the default 2 MB makes every insert a cache miss past ~50k examples.
        conn.execute("PRAGMA cache_size = -32768")
        # One IMMEDIATE transaction around every pending migration (each becomes a savepoint):
        # a daemon and a CLI starting together cannot both apply the same one, and readers
        # see the schema all at once or not at all.
        conn.execute("BEGIN IMMEDIATE")
        migrations.apply(db)
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise store_problem(path, exc) from exc
    return db


def store_problem(path: Path | str, exc: sqlite3.Error) -> StoreError:
    """What an SQLite error on the store means for its user: locked by another process
    (wait: moving it aside would start from an empty store), damaged (only then move it
    aside), or not accessible (permissions, disk)."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = None if code is None else code & 0xFF  # extended codes keep it in the low byte
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "database is locked" in str(exc):
        return StoreLockedError(
            f"{path} is locked by another process, which has held a write transaction for"
            f" over {BUSY_TIMEOUT_MS / 1000:g} s ({exc}); the store is not damaged: wait and"
            f" retry, or find the process holding it (`fuser -v {path}`) and let it finish."
            " Do not move the file aside: it holds every example"
        )
    if primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return SchemaError(
            f"{path} is damaged or is not an evertune store ({exc}). Stop the daemon, move the"
            f" file aside (keep it: `sqlite3 {path} .recover` may save its rows) and start"
            " again with a new, empty store; the files in done/ can then be ingested again"
        )
    return StoreError(
        f"{path} cannot be used ({exc}); check that it and its folder are readable and"
        " writable by this user and that the disk has space, then retry"
    )


@contextlib.contextmanager
def write_transaction(db: Database) -> Iterator[Database]:
    """`db.atomic()` whose outermost transaction takes the write lock at its start.

    sqlite-utils begins a deferred transaction: one that reads first and writes later holds
    a read snapshot, and when another connection has committed since, SQLite answers the
    write with "database is locked" at once, busy timeout or not (it cannot wait its way
    to a newer snapshot). Measured: two `evertune ingest` at once on one domain crashed one
    of them in 3 of 3 runs. BEGIN IMMEDIATE waits (busy_timeout) for the other writer
    instead. Nested: a savepoint, as atomic() does."""
    if db.conn.in_transaction:
        with db.atomic():
            yield db
        return
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if db.conn.in_transaction:
            db.conn.execute("ROLLBACK")
        raise
    db.conn.execute("COMMIT")


def is_initialised(db: Database) -> bool:
    """False for a store file that exists but whose schema is not committed yet."""
    return db["files"].exists()
