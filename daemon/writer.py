"""The ingest writer: a thread that owns a connection and runs ingest jobs in order.

Files are ingested here one at a time, in the order they settled (a large file takes
minutes; its writes are batched transactions on this connection). The daemon's other
writers (the run queue's, the serving runner's, the control connection: see
daemon/service.py) write a few rows at a time in short BEGIN IMMEDIATE transactions, which
SQLite serialises with these. A job that raises fails its future, not the thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from evertune.store.db import open_db

log = logging.getLogger(__name__)

Job = Callable[[Database], Any]


class StoreWriter:
    def __init__(self, db_path: Path):
        self._db_path = db_path
        self._jobs: queue.Queue[tuple[Job, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._db: Database | None = None
        self._opened = threading.Event()
        self._open_error: BaseException | None = None
        self.busy_since: float | None = None  # time.monotonic() the running job started

    def start(self) -> None:
        self._thread.start()
        self._opened.wait()
        if self._open_error is not None:
            raise self._open_error

    def submit(self, job: Job) -> Future:
        future: Future = Future()
        self._jobs.put((job, future))
        return future

    def stop(self) -> None:
        """Finish the jobs already queued, then stop."""
        self._jobs.put(None)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def problem(self, stuck_after: float) -> str | None:
        """Why the writer is not working: its thread died, or one job has run longer than
        `stuck_after` seconds (files wait behind it)."""
        if not self._thread.is_alive():
            return "the store writer thread has stopped"
        since = self.busy_since
        if since is not None and time.monotonic() - since > stuck_after:
            return f"the store writer has been on one job for {time.monotonic() - since:.0f} s"
        return None

    def _run(self) -> None:
        try:
            self._db = open_db(self._db_path)
        except BaseException as exc:
            self._open_error = exc
            self._opened.set()
            return
        self._opened.set()
        try:
            while (item := self._jobs.get()) is not None:
                job, future = item
                if not future.set_running_or_notify_cancel():
                    continue
                self.busy_since = time.monotonic()
                try:
                    future.set_result(job(self._db))
                except BaseException as exc:
                    future.set_exception(exc)
                finally:
                    self.busy_since = None
        finally:
            self._db.close()
