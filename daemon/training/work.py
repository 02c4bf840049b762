"""What one queued run does in the daemon: forget first when asked, then a training cycle;
closing its run row when the cycle did not, metrics, the log line, and a retry when it
failed. (The cycle itself, data to verdict, is daemon/training/cycle.py; `evertune train` with no
daemon runs the same cycle from the CLI.)"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable

from sqlite_utils import Database

from evertune.adapters.errors import Cancelled, NothingToTrain
from evertune.daemon.config import ConfigSource
from evertune.daemon.control.metrics import Metrics
from evertune.daemon.serving.endpoints import Serving
from evertune.daemon.training.cycle import Outcome, run_cycle
from evertune.daemon.training.forget import forget_then_rebuild
from evertune.daemon.training.runqueue import Request
from evertune.daemon.training.schedule import Schedule
from evertune.store import runs, versions
from evertune.store.layout import HomeLayout

log = logging.getLogger(__name__)
STATUS_EVERY_S = 2.0  # progress lines to systemd at most this often


def _close(db: Database, req: Request, state: str, error: str) -> None:
    """Close the run's row. A store that cannot be written now (a full disk: SQLite's
    "database or disk is full") is said, not raised: raised here it ended the trainer
    thread, and no domain trained again until a restart. The row left open is closed
    before the next run (cycle.close_interrupted), which the retry brings."""
    try:
        runs.close_if_open(db, req.run_id, state, error)
    except (sqlite3.Error, OSError) as exc:
        log.error(
            "%s: run %d ended (%s) but could not be recorded (%s); it is closed before the"
            " next run",
            req.domain,
            req.run_id,
            state,
            exc,
        )


class TrainingWork:
    def __init__(
        self,
        config: ConfigSource,
        schedule: Schedule,
        metrics: Metrics,
        serving: Callable[[], Serving | None],
        reference_url: Callable[[], str | None],
        notify: Callable[[str | None], None],
        stopping: threading.Event,
    ):
        self.config = config
        self.schedule = schedule
        self.metrics = metrics
        self.serving = serving
        self.reference_url = reference_url
        self.notify = notify
        self.stopping = stopping
        self._last_status = 0.0

    def __call__(self, db: Database, req: Request, cancel: threading.Event) -> None:
        m, config = self.metrics, self.config.get()
        m.training(req.domain, True)
        self.notify(f"training {req.domain}")
        t0 = time.monotonic()

        def cycle(from_base: bool) -> Outcome:
            return run_cycle(
                db,
                config,
                req.domain,
                trigger=req.trigger,
                force=req.force,
                progress=lambda e: self._progress(req, e),
                stop=cancel,
                serving=self.serving(),
                run_id=req.run_id,
                reference_url=self.reference_url(),
                from_base=from_base,
            )

        try:
            if req.forget is None:
                outcome = cycle(req.from_base)
            else:
                gone, outcome = forget_then_rebuild(
                    db,
                    HomeLayout(config.home),
                    req.domain,
                    req.forget,
                    self.serving(),
                    lambda: cycle(True),
                )
                if outcome is None:
                    raise NothingToTrain(gone.no_rebuild_reason())
        except NothingToTrain as exc:
            _close(db, req, "skipped", str(exc))
            m.run_finished(req.domain, "nothing")
            log.info("%s: %s", req.domain, exc)
        except Cancelled:
            _close(db, req, "cancelled", "the daemon stopped")
            m.run_finished(req.domain, "cancelled", time.monotonic() - t0)
            log.info("%s: training cancelled; it runs again at the next start", req.domain)
        except Exception as exc:
            _close(db, req, "failed", str(exc))
            m.run_finished(req.domain, "failed", time.monotonic() - t0)
            if self.stopping.is_set():
                log.error("%s: training failed while stopping (%s)", req.domain, exc)
            else:
                self.schedule.training_failed(req.domain, exc, req.force)
        else:
            self.schedule.training_succeeded(req.domain)
            train = outcome.metrics.get("train", {})
            said = (
                "promoted"
                if outcome.promoted
                else "a canary first"
                if outcome.canary
                else "refused"
            )
            m.run_finished(
                req.domain,
                "promoted" if outcome.promoted else "canary" if outcome.canary else "refused",
                time.monotonic() - t0,
                train.get("tokens_per_s"),
            )
            if outcome.promoted:
                m.set_live(req.domain, versions.parse_name(outcome.version))
            log.info(
                "%s %s: %s (%s)",
                req.domain,
                outcome.version,
                "promoted, now live" if outcome.promoted else said,
                outcome.reason,
            )

    def _progress(self, req: Request, event: dict) -> None:
        if event.get("event") == "progress":
            now = time.monotonic()
            if now - self._last_status > STATUS_EVERY_S:
                self._last_status = now
                self.notify(f"training {req.domain}: step {event['step']}/{event['steps']}")
        elif event.get("event") == "phase":
            self.notify(f"{req.domain}: {event['phase']}")
