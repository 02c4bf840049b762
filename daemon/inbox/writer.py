"""The ingest writer: a thread that owns a connection and runs ingest jobs in order.

Files are ingested here one at a time, in the order they settled (a large file takes
minutes; its writes are batched transactions on this connection). The daemon's other
writers (the run queue's, the serving runner's, the control connection: see
daemon/service.py) write a few rows at a time in short BEGIN IMMEDIATE transactions, which
SQLite serialises with these. A job that raises fails its future, not the thread.

The store file is the one this writer opened, as long as the path still names it (same
device and inode): a store deleted or replaced while the daemon runs would otherwise take
every file into a database nobody can see again. Then no job runs (each is refused and
logged, its file stays in the inbox) and `problem()` says why, for /healthz and `status`.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from evertune.daemon.errors import StoreGone
from evertune.store.db import open_db

log = logging.getLogger(__name__)

Job = Callable[[Database], Any]


class StoreWriter:
    def __init__(self, db_path: Path):
        self._db_path = db_path
        self._jobs: queue.Queue[tuple[Job, Future, str] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._db: Database | None = None
        self._opened = threading.Event()
        self._open_error: BaseException | None = None
        self.busy_since: float | None = None  # time.monotonic() the running job started
        self.busy_with: str | None = None  # the running job's name ("ingesting <path>")
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the store opened

    def start(self) -> None:
        self._thread.start()
        self._opened.wait()
        if self._open_error is not None:
            raise self._open_error

    def submit(self, job: Job, what: str = "a store job") -> Future:
        """Run `job(db)` in turn; `what` names it in the log if it is refused."""
        future: Future = Future()
        self._jobs.put((job, future, what))
        return future

    def stop(self) -> None:
        """Finish the jobs already queued, then stop."""
        self._jobs.put(None)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def doing(self) -> dict[str, Any] | None:
        """The job running now, for `status`: {"job": its name, "seconds": so far}."""
        what, since = self.busy_with, self.busy_since
        if what is None or since is None:
            return None
        return {"job": what, "seconds": round(time.monotonic() - since, 1)}

    def problem(self, stuck_after: float) -> str | None:
        """Why the writer is not working: its thread died, or one job has run longer than
        `stuck_after` seconds (files wait behind it)."""
        if not self._thread.is_alive():
            return "the store writer thread has stopped"
        gone = self.store_problem()
        if gone is not None:
            return gone
        since = self.busy_since
        if since is not None and time.monotonic() - since > stuck_after:
            return f"the store writer has been on one job for {time.monotonic() - since:.0f} s"
        return None

    def store_problem(self) -> str | None:
        """Why the store this writer opened is no longer the file at its path: deleted, or
        another file put in its place (a copy, a restore) while the daemon runs."""
        if self._identity is None:
            return None
        path = self._db_path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return (
                f"the store {path} was deleted while the daemon runs: no file is ingested"
                " (they wait in the inbox); restore it from a backup and restart the daemon"
                " (a restart without it starts a new, empty store)"
            )
        except OSError as exc:
            return f"the store {path} cannot be checked ({exc}); fix its folder's permissions"
        if (st.st_dev, st.st_ino) != self._identity:
            return (
                f"the store {path} was replaced by another file while the daemon runs: no file"
                " is ingested (they wait in the inbox) until the daemon is restarted on it"
            )
        return None

    def _run(self) -> None:
        try:
            self._db = open_db(self._db_path)
            st = os.stat(self._db_path)
            self._identity = (st.st_dev, st.st_ino)
        except BaseException as exc:
            self._open_error = exc
            self._opened.set()
            return
        self._opened.set()
        try:
            while (item := self._jobs.get()) is not None:
                job, future, what = item
                if not future.set_running_or_notify_cancel():
                    continue
                gone = self.store_problem()
                if gone is not None:
                    log.error("%s: refused: %s", what, gone)
                    future.set_exception(StoreGone(gone))
                    continue
                self.busy_with, self.busy_since = what, time.monotonic()
                try:
                    future.set_result(job(self._db))
                except BaseException as exc:
                    future.set_exception(exc)
                finally:
                    self.busy_since = self.busy_with = None
        finally:
            self._db.close()
