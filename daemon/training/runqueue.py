"""The run queue: one training run at a time on this machine, in a thread of its own.

The queue holds each domain at most once (a later request for a queued domain joins it)
and is served in arrival order, so a busy domain cannot starve the others; a forget goes
to the front (forgotten means no longer served: next, not last). What a run does is the
`work` callable's (daemon/training/work.py); the queue only orders, starts and cancels.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlite_utils import Database

from evertune.store.db import open_db

log = logging.getLogger(__name__)


@dataclass
class Request:
    domain: str
    trigger: str
    force: bool
    run_id: int
    from_base: bool = False  # a rebuild from the base model (train --from-base, forget)
    forget: list[bytes] | None = None  # prompts to forget first (then a rebuild)


class RunQueue:
    def __init__(
        self,
        db_path: Path,
        queue_run: Callable[[str, str], int],
        work: Callable[[Database, Request, threading.Event], None],
        on_idle: Callable[[], None] = lambda: None,
        blocked: Callable[[], str | None] = lambda: None,
    ):
        """`queue_run(domain, trigger)` records a queued run and returns its id;
        `work(db, request, cancel)` runs it on the queue's own connection (`cancel` is set
        when the daemon stops: the run cancels at its next step); `on_idle()` after each;
        `blocked()`: why no run may start now (the store is gone), checked before each."""
        self.db_path = db_path
        self.queue_run = queue_run
        self.work = work
        self.on_idle = on_idle
        self.blocked = blocked
        self._queue: deque[Request] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self.cancel = threading.Event()
        self.current: Request | None = None
        self._thread = threading.Thread(target=self._run, name="trainer")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self.cancel.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def queued(self) -> list[dict]:
        with self._cv:
            return [{"domain": r.domain, "run_id": r.run_id} for r in self._queue]

    def report(self) -> dict:
        """The run in progress and the queue, as `status --json` shows them."""
        cur = self.current
        return {
            "current": None if cur is None else {"domain": cur.domain, "run_id": cur.run_id},
            "queued": self.queued(),
        }

    def request(
        self,
        domain: str,
        trigger: str,
        force: bool = False,
        from_base: bool = False,
        forget: list[bytes] | None = None,
    ) -> int:
        """Queue a run of `domain` (or join the one queued); its run id."""
        with self._cv:
            for r in self._queue:
                if r.domain == domain:
                    r.force = r.force or force
                    r.from_base = r.from_base or from_base
                    if forget is not None:
                        r.forget = [*(r.forget or []), *forget]
                        self._queue.remove(r)
                        self._queue.appendleft(r)
                    return r.run_id
            run_id = self.queue_run(domain, trigger)
            req = Request(domain, trigger, force, run_id, from_base, forget)
            if forget is not None:
                self._queue.appendleft(req)
            else:
                self._queue.append(req)
            self._cv.notify_all()
        log.info("%s: training queued (run %d, %s)", domain, req.run_id, trigger)
        return req.run_id

    def _run(self) -> None:
        db = open_db(self.db_path)
        try:
            while True:
                with self._cv:
                    while not self._queue and not self._stopping:
                        self._cv.wait()
                    if self._stopping:
                        break
                    req = self._queue.popleft()
                    self.current = req
                try:
                    if (why := self.blocked()) is not None:
                        log.error("%s: training not started: %s", req.domain, why)
                    else:
                        self.work(db, req, self.cancel)
                finally:
                    self.current = None
                    self.on_idle()
        finally:
            db.close()
