"""`evertune run`: the daemon. One process owning the lock, the store writer, the inbox
watcher, the scheduler, the training worker (which starts the training child), the serving
side (the embedded vLLM or external endpoints) and the control API.

Shutdown is explicit (STYLE.md): SIGTERM/SIGINT set one stop event in the main thread;
components are stopped and joined in reverse order of start. A training run in progress is
cancelled at its next step (the child gets SIGTERM), recorded as cancelled, and its examples
stay "new", so the next start trains them again: nothing is lost or half-published.
SIGHUP re-reads the config (see `reload`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from evertune.adapters import registry
from evertune.adapters.errors import NothingToTrain, TrainingCancelled, TrainingError
from evertune.daemon import config as config_mod
from evertune.daemon import serving as serving_mod
from evertune.daemon.config import Config, ScheduleConfig
from evertune.daemon.control import ControlServer
from evertune.daemon.cycle import close_interrupted, prepare_base, run_cycle, training_lock
from evertune.daemon.errors import ConfigError, UsageError
from evertune.daemon.forget import forget as forget_examples
from evertune.daemon.lock import DaemonLock
from evertune.daemon.metrics import Metrics
from evertune.daemon.notify import Notifier
from evertune.daemon.status import CONTROL_URL_FILE, status_report
from evertune.daemon.watcher import InboxWatcher, misplaced
from evertune.daemon.writer import StoreWriter
from evertune.store.db import open_db, utcnow
from evertune.store.domains import check_domain
from evertune.store.ingest import FileReport, ingest_file, remove_stale_parts
from evertune.store.layout import HomeLayout
from evertune.store.queries import FRESH

log = logging.getLogger(__name__)
# Each of stop()'s waits (training, serving start-up, ingestion): within systemd's
# TimeoutStopSec=120s together with the children's grace (cycle.STOP_GRACE_S).
STOP_WAIT_S = 30.0
# One ingest job running longer than this means the writer is wedged (measured: 1M
# examples in one file take minutes, not an hour).
WRITER_STUCK_S = 3600.0
INGEST_RETRY_MAX_S = 3600.0  # a failed ingest: watch.retry_seconds, 4x, 16x, ... an hour

# Sections a running daemon cannot change: they name processes and sockets it already runs.
RESTART_SECTIONS = ("serve", "control", "model", "watch")


def fresh_examples(db, domain: str) -> int:
    """Examples no version was trained on and no refused candidate already tried: what makes
    a new run worth it (a refused run's data would only be refused again)."""
    (n,) = db.execute(
        f"SELECT count(*) FROM examples e WHERE e.domain = ? AND {FRESH}"
        " AND NOT EXISTS (SELECT 1 FROM version_examples ve JOIN versions v"
        " ON v.id = ve.version_id WHERE ve.example_id = e.id AND ve.role = 'new'"
        " AND v.state = 'rejected')",
        [domain],
    ).fetchone()
    return n


@dataclass
class Request:
    domain: str
    trigger: str
    force: bool
    run_id: int
    from_base: bool = False  # a rebuild from the base model (train --from-base, forget)
    forget: list[bytes] | None = None  # prompts to forget first (then a rebuild)


class Trainer:
    """One training run at a time on this machine; the queue holds each domain at most once
    (a later request for a queued domain joins it) and is served in arrival order, so a busy
    domain cannot starve the others."""

    def __init__(self, service: Service):
        self.service = service
        self._queue: deque[Request] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self.cancel = threading.Event()  # forwarded to the child: cancel at the next step
        self.current: Request | None = None
        self.failures: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name="trainer")
        self._last_status = 0.0

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

    def request(
        self,
        domain: str,
        trigger: str,
        force: bool = False,
        from_base: bool = False,
        forget: list[bytes] | None = None,
    ) -> int:
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
            run_id = self.service.db_write(
                lambda db: (
                    db.execute(
                        "INSERT INTO runs (domain, state, trigger, queued_at)"
                        " VALUES (?, 'queued', ?, ?)",
                        [domain, trigger, utcnow()],
                    ).lastrowid
                )
            )
            req = Request(domain, trigger, force, run_id, from_base, forget)
            if forget is not None:  # forgotten means no longer served: next, not last
                self._queue.appendleft(req)
            else:
                self._queue.append(req)
            self._cv.notify_all()
        log.info("%s: training queued (run %d, %s)", domain, run_id, trigger)
        return run_id

    def _run(self) -> None:
        db = open_db(self.service.layout.db_path)
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
                    self._one(db, req)
                finally:
                    self.current = None
                    self.service.notify_status()
        finally:
            db.close()

    def _one(self, db, req: Request) -> None:
        svc, m = self.service, self.service.metrics
        m.training(req.domain, True)
        svc.notify_status(f"training {req.domain}")
        t0 = time.monotonic()
        try:
            if req.forget is not None:
                with training_lock(svc.layout.train_lock_path, None):
                    gone = forget_examples(db, req.domain, req.forget, svc.serving)
                if not gone.rebuild:
                    raise NothingToTrain(gone.no_rebuild_reason())
            outcome = run_cycle(
                db,
                svc.config,
                req.domain,
                trigger=req.trigger,
                force=req.force,
                progress=lambda e: self._progress(req, e),
                stop=self.cancel,
                serving=svc.serving,
                run_id=req.run_id,
                reference_url=svc.reference_url(),
                from_base=req.from_base or req.forget is not None,
            )
        except NothingToTrain as exc:
            self._close_run(db, req, "skipped", str(exc))
            m.run_finished(req.domain, "nothing")
            log.info("%s: %s", req.domain, exc)
        except TrainingCancelled:
            self._close_run(db, req, "cancelled", "the daemon stopped")
            m.run_finished(req.domain, "cancelled", time.monotonic() - t0)
            log.info("%s: training cancelled; it runs again at the next start", req.domain)
        except Exception as exc:
            self._close_run(db, req, "failed", str(exc))
            m.run_finished(req.domain, "failed", time.monotonic() - t0)
            self._retry_later(req, exc)
        else:
            self.failures.pop(req.domain, None)
            train = outcome.metrics.get("train", {})
            m.run_finished(
                req.domain,
                "promoted" if outcome.promoted else "refused",
                time.monotonic() - t0,
                train.get("tokens_per_s"),
            )
            if outcome.promoted:
                m.set_live(req.domain, registry.parse_name(outcome.version))
            log.info(
                "%s %s: %s (%s)",
                req.domain,
                outcome.version,
                "promoted, now live" if outcome.promoted else "refused",
                outcome.reason,
            )

    def _close_run(self, db, req: Request, state: str, error: str) -> None:
        """The run row, if the cycle did not close it itself (it failed before starting)."""
        db.execute(
            "UPDATE runs SET state = ?, error = ?, finished_at = ? WHERE id = ?"
            " AND state IN ('queued', 'running')",
            [state, error, utcnow(), req.run_id],
        )
        db.conn.commit()

    def _retry_later(self, req: Request, exc: Exception) -> None:
        if self.service.stop_event.is_set():
            log.error("%s: training failed while stopping (%s)", req.domain, exc)
            return
        schedule = self.service.config.schedule_for(req.domain)
        n = self.failures[req.domain] = self.failures.get(req.domain, 0) + 1
        if n > schedule.max_retries:
            log.error(
                "%s: training failed %d times in a row (%s); no more retries until new data"
                " arrives or `evertune train %s`",
                req.domain,
                n,
                exc,
                req.domain,
            )
            return
        delay = min(schedule.retry_seconds * 2 ** (n - 1), 3600)
        log.error(
            "%s: training failed (%s); retry %d/%d in %.0f s",
            req.domain,
            exc,
            n,
            schedule.max_retries,
            delay,
        )
        self.service.scheduler.add_job(
            self.request,
            "date",
            args=[req.domain, "retry", req.force],
            run_date=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay),
            id=f"retry:{req.domain}",
            replace_existing=True,
        )

    def _progress(self, req: Request, event: dict) -> None:
        if event.get("event") == "progress":
            now = time.monotonic()
            if now - self._last_status > 2:
                self._last_status = now
                self.service.notify_status(
                    f"training {req.domain}: step {event['step']}/{event['steps']}"
                )
        elif event.get("event") == "phase":
            self.service.notify_status(f"{req.domain}: {event['phase']}")


class Service:
    def __init__(self, config: Config):
        self.config = config
        self.layout = HomeLayout(config.home)
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.metrics = Metrics()
        self.notifier = Notifier.from_env()
        self.scheduler = BackgroundScheduler(
            timezone=dt.UTC,
            # After downtime, missed runs coalesce into one, whenever it is.
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        self._lock = DaemonLock(self.layout.lock_path)
        self.writer = StoreWriter(self.layout.db_path)
        self.watcher = InboxWatcher(
            self.layout.inbox,
            self._ingest_later,
            settle_seconds=config.watch.settle_seconds,
            unclosed_timeout_seconds=config.watch.unclosed_timeout_seconds,
        )
        self.trainer = Trainer(self)
        self.control = ControlServer(
            self,
            config.control.host,
            config.control.port,
            token_path=self.layout.home / "control.token",
            metrics_registry=self.metrics.registry,
        )
        self.vllm: serving_mod.EmbeddedVLLM | None = None
        self.serving: serving_mod.Serving | None = None
        self._db = None  # the daemon's connection for serving and control writes
        self._db_lock = threading.RLock()
        self._started = False
        self._ingest_failures: dict[Path, int] = {}  # files whose ingestion raised: retries
        self._serving_thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._state = "starting"

    # ---- the store -----------------------------------------------------------------------

    def db_write(self, job):
        """Run `job(db)` on the daemon's own connection and commit (small writes only)."""
        with self._db_lock:
            out = job(self._db)
            self._db.conn.commit()
            return out

    def _ingest_later(self, domain: str, path: Path) -> None:
        self.writer.submit(lambda db: self._ingest(db, domain, path))

    def _ingest(self, db, domain: str, path: Path) -> FileReport | None:
        if not os.path.lexists(path):  # reported twice (event + scan), already moved: done
            return None
        try:
            report = ingest_file(db, self.layout, path, domain, self.config.ingest.limits())
        except Exception:
            # The job boundary: the file stays in the inbox and is retried, with a growing
            # pause (a full disk, a locked store: causes that pass), and at the next start.
            n = self._ingest_failures[path] = self._ingest_failures.get(path, 0) + 1
            delay = min(self.config.watch.retry_seconds * 4 ** (n - 1), INGEST_RETRY_MAX_S)
            log.exception(
                "ingesting %s failed (%d time(s)); it stays in the inbox, retried in %.0f s",
                path,
                n,
                delay,
            )
            if not self.stop_event.is_set():
                self.scheduler.add_job(
                    self._ingest_later,
                    "date",
                    args=[domain, path],
                    run_date=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay),
                    id=f"retry-ingest:{path}",
                    replace_existing=True,
                )
            raise
        self._ingest_failures.pop(path, None)
        outcome = report.status
        if report.status == "ingested" and report.records_rejected:
            outcome = "partial"
        self.metrics.file_ingested(domain, outcome, report.examples_added, report.records_rejected)
        if report.examples_added:
            self._on_new_examples(domain)
        return report

    # ---- scheduling -------------------------------------------------------------------------

    def _on_new_examples(self, domain: str) -> None:
        """Debounce: the run starts `quiet_seconds` after the last file of a burst."""
        schedule = self.config.schedule_for(domain)
        if not schedule.on_drop:
            return
        self.scheduler.add_job(
            self._maybe_train,
            "date",
            args=[domain, "drop"],
            run_date=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=schedule.quiet_seconds),
            id=f"drop:{domain}",
            replace_existing=True,
        )

    def _maybe_train(self, domain: str, trigger: str) -> None:
        if self.stop_event.is_set():
            return
        need = self.config.schedule_for(domain).min_new_examples
        with self._db_lock:
            n = fresh_examples(self._db, domain)
        if n >= need:
            self.trainer.request(domain, trigger)
        else:
            log.debug("%s: %d new examples, fewer than %d: not training yet", domain, n, need)

    def _check_domains(self, trigger: str, only: set[str] | None, skip: set[str]) -> None:
        with self._db_lock:
            domains = [d for (d,) in self._db.execute("SELECT DISTINCT domain FROM examples")]
        for d in domains:
            if (only is None or d in only) and d not in skip:
                self._maybe_train(d, trigger)

    def _schedule_jobs(self) -> None:
        """The periodic checks: one for [schedule], one per [domains.<name>] override."""
        for job in self.scheduler.get_jobs():
            if job.id.startswith("periodic:"):
                job.remove()
        overrides = set(self.config.domains)
        groups: list[tuple[str, ScheduleConfig, set[str] | None, set[str]]] = [
            ("periodic:*", self.config.schedule, None, overrides)
        ]
        groups += [(f"periodic:{d}", s, {d}, set()) for d, s in self.config.domains.items()]
        for job_id, s, only, skip in groups:
            if s.cron:
                trigger = CronTrigger.from_crontab(s.cron, timezone=dt.UTC)
            elif s.interval_minutes:
                trigger = IntervalTrigger(minutes=s.interval_minutes, timezone=dt.UTC)
            else:
                continue
            self.scheduler.add_job(
                self._check_domains, trigger, args=["schedule", only, skip], id=job_id
            )

    # ---- serving ----------------------------------------------------------------------------

    def _start_serving(self) -> None:
        """In the background: the first start prepares the base model (minutes) before vLLM
        can start; files are accepted meanwhile."""
        cfg = self.config.serve
        try:
            embedded_url = None
            if cfg.mode == "embedded":
                self.notify_status("preparing the base model")
                base, _ = prepare_base(self.config, self.layout, self.stop_event, references=False)
                if self.stop_event.is_set():
                    return
                self.vllm = serving_mod.EmbeddedVLLM(
                    base.path,
                    cfg,
                    on_ready=self._vllm_ready,
                    on_state=lambda up: self.metrics.endpoint_state(self.vllm.url, up),
                )
                embedded_url = self.vllm.url
            serving = serving_mod.Serving.for_config(
                self.layout.db_path,
                cfg,
                embedded_url,
                on_switch=self.metrics.switch,
                on_endpoint=self.metrics.endpoint_state,
            )
            self.serving = serving
            if self.vllm is not None:
                self.notify_status("starting vLLM")
                self.vllm.start()
            else:
                self.reconcile_now()
            self.scheduler.add_job(
                self.reconcile_now,
                "interval",
                seconds=cfg.reconcile_seconds,
                id="reconcile",
                replace_existing=True,
            )
            self._build_references()
        except TrainingCancelled:
            return  # the daemon is stopping
        except Exception:
            log.exception("serving could not start; training and ingestion go on")
            self._state = "serving failed to start (see the log)"

    def reference_url(self) -> str | None:
        """The embedded vLLM's URL while it is up: it serves the very base model as `base`."""
        return self.vllm.url if self.vllm is not None and self.vllm.ready.is_set() else None

    def _build_references(self) -> None:
        """Ready to learn on a first start: the base model's reference answers, built as soon
        as the embedded vLLM is up (batched there) instead of inside the first training run
        (transformers, minutes). A no-op once they exist."""
        if self.vllm is None:
            return
        while not self.vllm.ready.wait(1.0):
            if self.stop_event.is_set():
                return
        self.notify_status("answering the general reference prompts with the base model")
        try:
            prepare_base(self.config, self.layout, self.stop_event, vllm_url=self.vllm.url)
        except TrainingError as exc:  # the first training run builds them instead
            log.warning("reference answers through vLLM failed: %s", exc)
        else:
            log.info("ready to learn: base model and reference answers prepared")
        self.notify_status()

    def _vllm_ready(self) -> None:
        self.reconcile_now()
        log.info(
            'serving: the OpenAI-compatible endpoint is %s/v1; ask a domain with model="<domain>"'
            ' (e.g. `evertune ask <domain> "question"`); drop files into %s/<domain>/',
            self.vllm.url,
            self.layout.inbox,
        )

    def reconcile_now(self) -> list[str]:
        if self.serving is None or self.stop_event.is_set():
            return []
        if self.vllm is not None and not self.vllm.ready.is_set():
            return []  # starting or restarting: its on_ready reconciles
        with self._db_lock:
            changes = self.serving.reconcile(self._db)
        self.notify_status()
        return changes

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self.layout.create()
        self._lock.acquire()
        self._watchdog = self.notifier.start_watchdog(
            self.stop_event, healthy=lambda: self.health() is None
        )
        self.writer.start()
        self._db = open_db(self.layout.db_path)
        self._close_leftovers()
        self.control.start()
        url_file = self.layout.home / CONTROL_URL_FILE
        tmp = url_file.with_name(f".{url_file.name}.tmp")
        tmp.write_text(self.control.url + "\n")
        os.replace(tmp, url_file)
        for why in misplaced(self.layout.inbox):
            log.warning("not ingested: %s", why)
        for folder in (d for d in self.layout.inbox.iterdir() if d.is_dir()):
            for part in remove_stale_parts(folder):
                log.warning("removed %s: the partial copy of a command that was stopped", part)
        self.watcher.start()
        self.trainer.start()
        self.scheduler.start()
        self._schedule_jobs()
        # Whatever was missed while the daemon was down (or interrupted) becomes one run.
        self.scheduler.add_job(self._check_domains, args=["startup", None, set()], id="startup")
        if self.config.serve.mode != "none":
            self._serving_thread = threading.Thread(target=self._start_serving, name="serving")
            self._serving_thread.start()
        self._state = "running"
        self._started = True
        log.info(
            "evertune running on %s; control API %s; drop files into %s/<domain>/",
            self.layout.home,
            self.control.url,
            self.layout.inbox,
        )
        self.notifier.ready(self._status_line())

    def _close_leftovers(self) -> None:
        """Runs a previous daemon queued but never started are closed (the startup check
        queues their domains again), and what it left half done when it was killed (a run
        'running', a version 'training' or 'candidate'), unless a CLI `evertune train`
        holds the training lock (it closes them itself when it starts)."""
        self.db_write(
            lambda db: db.execute(
                "UPDATE runs SET state = 'cancelled', error = 'the daemon stopped before it"
                " ran', finished_at = ? WHERE state = 'queued'",
                [utcnow()],
            )
        )
        with training_lock(self.layout.train_lock_path, None, wait=False) as held:
            if held:
                self.db_write(lambda db: close_interrupted(db, self.layout))

    def stop(self) -> None:
        log.info("stopping")
        self.notifier.stopping()
        self.stop_event.set()
        self.scheduler.shutdown(wait=False)
        self.watcher.stop()
        self.trainer.stop()  # cancels a run in progress at its next step
        self.control.stop()
        (self.layout.home / CONTROL_URL_FILE).unlink(missing_ok=True)
        # Every wait is bounded (systemd kills at TimeoutStopSec=120s): a child that ignores
        # SIGTERM is killed after cycle.STOP_GRACE_S, and what still runs after its bound is
        # named in the log. Nothing is lost by going on: an ingest not committed is redone
        # from the inbox at the next start, a training run is recorded as interrupted.
        self.watcher.join(10)
        self._bounded("training", self.trainer.join, self.trainer.is_alive, STOP_WAIT_S)
        if self._serving_thread is not None:
            t = self._serving_thread
            self._bounded("serving start-up", t.join, t.is_alive, STOP_WAIT_S)
        if self.vllm is not None:
            self.vllm.stop()
        if self.serving is not None:
            self.serving.close()
        self.writer.stop()  # lets the files already handed over finish: no half state
        self._bounded("ingestion", self.writer.join, self.writer.is_alive, STOP_WAIT_S)
        if self._watchdog is not None:
            self._watchdog.join(5)
        self._db.close()
        self._lock.release()
        log.info("stopped")

    @staticmethod
    def _bounded(what: str, join: Callable, alive: Callable[[], bool], timeout: float) -> None:
        join(timeout)
        if alive():
            log.warning(
                "stopping: %s still running after %.0f s; stopping without it (it is"
                " resumed or redone at the next start)",
                what,
                timeout,
            )

    def run_forever(self) -> None:
        """Start, wait for SIGTERM/SIGINT (stop) or SIGHUP (reload). Main thread only."""

        def on_signal(signum: int, _frame) -> None:
            log.info("received %s", signal.Signals(signum).name)
            if signum == signal.SIGHUP:
                self.reload_event.set()
            else:
                self.stop_event.set()

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_signal)
        self.start()
        try:
            while not self.stop_event.wait(0.5):
                if self.reload_event.is_set():
                    self.reload_event.clear()
                    self.reload()
        finally:
            self.stop()

    # ---- what it tells: systemd, the control API -------------------------------------------

    def _status_line(self) -> str:
        cur = self.trainer.current
        parts = [self._state]
        if cur is not None:
            parts.append(f"training {cur.domain}")
        if self.vllm is not None:
            parts.append("vLLM up" if self.vllm.ready.is_set() else "vLLM starting")
        return "; ".join(parts)

    def notify_status(self, text: str | None = None) -> None:
        self.notifier.status(text or self._status_line())

    def status(self) -> dict[str, Any]:
        report = status_report(self.config)
        report["daemon"]["control_url"] = self.control.url
        report["daemon"]["state"] = self._status_line()
        cur = self.trainer.current
        report["training"] = {
            "current": None if cur is None else {"domain": cur.domain, "run_id": cur.run_id},
            "queued": self.trainer.queued(),
        }
        if self.vllm is not None:
            report["daemon"]["vllm"] = {
                "pid": self.vllm.pid,
                "ready": self.vllm.ready.is_set(),
                "starts": self.vllm.starts,
                "last_error": self.vllm.last_error,
            }
        return report

    def page_data(self) -> dict[str, Any]:
        from evertune.daemon.status_page import page_data

        db = open_db(self.layout.db_path, readonly=True)
        try:
            return page_data(db, self.status())
        finally:
            db.close()

    def health(self) -> str | None:
        """None when every component works, else why not: /healthz answers 503 with it and
        the systemd watchdog is not pinged, so systemd restarts a wedged service."""
        if self.stop_event.is_set():
            return "stopping"
        if not self._started:
            return None  # starting: systemd's start timeout judges that, not the watchdog
        problems = [
            self.writer.problem(WRITER_STUCK_S),
            self.watcher.problem(),
            None if self.scheduler.running else "the scheduler is not running",
            None if self.trainer.is_alive() else "the training worker thread has stopped",
        ]
        return "; ".join(p for p in problems if p) or None

    def train(self, domain: str, force: bool, from_base: bool = False) -> dict[str, Any]:
        check_domain(domain)
        run_id = self.trainer.request(domain, "manual", force, from_base)
        return {"run_id": run_id, "domain": domain}

    def forget(self, domain: str, prompt_hashes: list) -> dict[str, Any]:
        check_domain(domain)
        try:
            hashes = [bytes.fromhex(h) for h in prompt_hashes]
        except (TypeError, ValueError) as exc:
            raise UsageError(f"prompt_hashes must be hex strings: {exc}") from exc
        return {"run_id": self.trainer.request(domain, "forget", forget=hashes), "domain": domain}

    def rollback(self, domain: str, to: str | None) -> dict[str, Any]:
        with self._db_lock:
            v = serving_mod.rollback(self._db, check_domain(domain), to, self.serving)
        self.metrics.set_live(domain, v.number)
        return {"domain": domain, "live": v.name}

    def pin(self, domain: str, version: str) -> dict[str, Any]:
        with self._db_lock:
            v = serving_mod.set_pinned(self._db, check_domain(domain), version, True, self.serving)
        return {"domain": domain, "version": v.name, "pinned": True}

    def unpin(self, domain: str, version: str) -> dict[str, Any]:
        with self._db_lock:
            v = serving_mod.set_pinned(self._db, check_domain(domain), version, False, self.serving)
        return {"domain": domain, "version": v.name, "pinned": False}

    def reconcile(self) -> dict[str, Any]:
        return {"changes": self.reconcile_now()}

    def reload(self) -> dict[str, Any]:
        """Re-read the config file. A file that does not load is refused and the running
        config kept; sections naming running processes and sockets need a restart."""
        self.notifier.reloading()
        try:
            path = self.config.path or config_mod.locate(None)
            try:
                new = config_mod.load(path)
            except ConfigError as exc:
                log.error("config not reloaded, keeping the running one: %s", exc)
                return {"reloaded": False, "error": str(exc)}
            old = self.config
            changed = _diff(old, new)
            restart = [
                c for c in changed if c.split(":")[0].split(".")[0] in (*RESTART_SECTIONS, "home")
            ]
            kept = {s: getattr(old, s) for s in RESTART_SECTIONS}
            self.config = dataclasses.replace(new, home=old.home, **kept)
            logging.getLogger().setLevel(self.config.log.level.upper())
            self._schedule_jobs()
            applied = [c for c in changed if c not in restart]
            log.info(
                "config reloaded from %s: %s%s",
                path,
                ", ".join(applied) or "nothing changed",
                f"; needs a restart to apply: {', '.join(restart)}" if restart else "",
            )
            return {"reloaded": True, "applied": applied, "needs_restart": restart}
        finally:
            self.notifier.ready(self._status_line())


def _diff(old: Config, new: Config) -> list[str]:
    """'section.key: old -> new' for every key that differs."""
    out = []
    if old.home != new.home:
        out.append(f"home: {old.home} -> {new.home}")
    for section in config_mod.SECTIONS:
        a, b = getattr(old, section), getattr(new, section)
        for f in dataclasses.fields(a):
            x, y = getattr(a, f.name), getattr(b, f.name)
            if x != y:
                out.append(f"{section}.{f.name}: {x!r} -> {y!r}")
    if old.domains != new.domains:
        out.append(f"domains: {sorted(old.domains)} -> {sorted(new.domains)}")
    return out
