"""`evertune run`: the daemon, as the composition root: one process owning the lock and
these parts, built and wired here, started in this order and stopped in reverse.

    StoreWriter (inbox/writer.py)        the thread that ingests files, one at a time
    Ingestion (inbox/ingestion.py)       a settled file -> an ingest job; retries
    InboxWatcher (inbox/watcher.py)      inbox/<domain>/ events and scans -> Ingestion
    Schedule (training/schedule.py)      debounce, threshold, periodic, retry, catch-up
    RunQueue (training/runqueue.py)      one training run at a time; TrainingWork
                                         (training/work.py) runs it
    ServingRunner (serving/runner.py)    base model, embedded vLLM, reconcile
    ControlServer (control/server.py)    the control API, answered by this class

Every part reads the configuration from one `ConfigSource` (config.py), so `reload` reaches
each at its next use.

Connections that write (all in BEGIN IMMEDIATE transactions, `store.db.write_transaction`,
queued by SQLite's busy timeout; none open across an HTTP call or a training step): the
writer's (one transaction per file: ~2 s per 100k examples), the run queue's (a run's rows,
its version), the serving runner's (endpoint_models), this class's (queued runs) and one per
rollback or pin.

Shutdown (ARCHITECTURE.md, "Shutdown and threads"): SIGTERM/SIGINT set one stop event; a
training run in progress is cancelled at its next step and its examples stay new, so the
next start trains them again. SIGHUP re-reads the config (`reload`).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from evertune.daemon.config import Config, ConfigSource
from evertune.daemon.control.metrics import Metrics
from evertune.daemon.control.server import ControlServer
from evertune.daemon.errors import ConfigError, UsageError
from evertune.daemon.inbox.ingestion import Ingestion
from evertune.daemon.inbox.watcher import InboxWatcher, tidy
from evertune.daemon.inbox.writer import StoreWriter
from evertune.daemon.lock import DaemonLock
from evertune.daemon.notify import Notifier
from evertune.daemon.operations import Local
from evertune.daemon.serving.runner import ServingRunner
from evertune.daemon.status import note_health, publish_control_url, status_report
from evertune.daemon.training.children import training_lock
from evertune.daemon.training.cycle import close_interrupted
from evertune.daemon.training.runqueue import RunQueue
from evertune.daemon.training.schedule import Schedule
from evertune.daemon.training.work import TrainingWork
from evertune.store import examples, runs, versions
from evertune.store.db import open_db
from evertune.store.domains import check_domain
from evertune.store.layout import HomeLayout, stored_files

log = logging.getLogger(__name__)
# Each of stop()'s waits (training, serving start-up, ingestion): within systemd's
# TimeoutStopSec=120s together with the children's grace (children.STOP_GRACE_S).
STOP_WAIT_S = 30.0
# One ingest job running longer than this means the writer is wedged (measured: 1M
# examples in one file take minutes, not an hour).
WRITER_STUCK_S = 3600.0


def _warn_of_done_without_store(layout: HomeLayout) -> None:
    """A new store, while done/ holds files ingested before: their examples are in a store
    that is gone (deleted, or the home moved without it), not in this one."""
    n = stored_files(layout)
    if n:
        log.warning(
            "a new, empty store was created at %s, but %s/ holds %d file(s) ingested into a"
            " store that is not there any more: their examples are not in this one. To get"
            " them back, stop the daemon and restore %s from a backup, or move the files from"
            " done/<domain>/ back into inbox/<domain>/ to ingest them again",
            layout.db_path,
            layout.done,
            n,
            layout.db_path.name,
        )


class Service:
    def __init__(self, config: Config):
        # every part reads the running config from this one source (config.ConfigSource)
        self.source = ConfigSource(config)
        self.layout = HomeLayout(config.home)
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.metrics = Metrics()
        self.notifier = Notifier.from_env()
        self._lock = DaemonLock(self.layout.lock_path)
        self._db = None  # this class's connection: queued run rows, the scheduler's counts
        self._db_lock = threading.Lock()
        self.schedule = Schedule(
            self.source,
            request=lambda domain, trigger, force=False: self.runs.request(domain, trigger, force),
            count_fresh=lambda domain: self._on_db(lambda db: examples.fresh_count(db, domain)),
            domains=lambda: self._on_db(examples.domains),
        )
        self.writer = StoreWriter(self.layout.db_path)
        self.ingestion = Ingestion(self.source, self.writer, self.schedule, self.metrics)
        self.watcher = InboxWatcher(
            self.layout.inbox,
            self.ingestion.submit,
            settle_seconds=config.watch.settle_seconds,
            unclosed_timeout_seconds=config.watch.unclosed_timeout_seconds,
        )
        self.serving = ServingRunner(
            self.source, self.schedule, self.metrics, self.stop_event, self.notify_status
        )
        self.runs = RunQueue(
            self.layout.db_path,
            queue_run=lambda d, trigger: self._on_db(lambda db: runs.queue(db, d, trigger)),
            work=TrainingWork(
                self.source,
                self.schedule,
                self.metrics,
                serving=lambda: self.serving.serving,
                reference_url=self.serving.reference_url,
                notify=self.notify_status,
                stopping=self.stop_event,
            ),
            on_idle=self.notify_status,
            blocked=self.writer.store_problem,  # a store deleted under it: no run, no version
        )
        self.ops = Local(self.source, lambda: self.serving.serving)  # rollback and pin
        self.control = ControlServer(
            self,
            config.control.host,
            config.control.port,
            token_path=self.layout.control_token_path,
            metrics_registry=self.metrics.registry,
        )
        self._started = False
        self._watchdog: threading.Thread | None = None
        self._state = "starting"

    @property
    def config(self) -> Config:
        return self.source.get()

    def _on_db(self, job: Callable[[Any], Any]) -> Any:
        """`job(db)` on this class's connection (short statements only: no HTTP, no waits)."""
        with self._db_lock:
            return job(self._db)

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self.layout.create()
        self._lock.acquire()
        self._new_store = not self.layout.db_path.exists()  # checked under the lock
        try:
            self._start_parts()
        except BaseException:
            # Whatever started is stopped: left running, the trainer thread kept the process
            # alive, deaf to SIGTERM (nobody waits on the stop event), holding the lock and
            # the control port.
            log.error("start failed; stopping what had started")
            try:
                self.stop()
            except Exception:
                log.exception("stopping after a failed start failed too")
            raise

    def _start_parts(self) -> None:
        self._watchdog = self.notifier.start_watchdog(
            self.stop_event, healthy=lambda: self.health() is None
        )
        self.writer.start()
        if self._new_store:
            _warn_of_done_without_store(self.layout)
        self._db = open_db(self.layout.db_path)
        self._close_leftovers()
        self.control.start()
        publish_control_url(self.layout, self.control.url)
        tidy(self.layout.inbox)
        self.watcher.start()
        self.runs.start()
        self.schedule.start()  # with a catch-up of the domains that train by themselves
        self.serving.start()
        self._state = "running"
        self._started = True
        where = (self.layout.home, self.control.url, self.layout.inbox)
        log.info("evertune running on %s; control API %s; drop files into %s/<domain>/", *where)
        self.notifier.ready(self._status_line())

    def _close_leftovers(self) -> None:
        """What a previous daemon queued (the catch-up queues it again) or left half done,
        closed; not while a CLI `evertune train` holds the training lock (it closes them)."""
        self._on_db(runs.cancel_queued)
        with training_lock(self.layout.train_lock_path, None, wait=False) as held:
            if held:
                self._on_db(lambda db: close_interrupted(db, self.layout))

    def stop(self) -> None:
        """Stop every part, in reverse order; also after a start that failed half way (a part
        never started is skipped)."""
        log.info("stopping")
        self.notifier.stopping()
        self.stop_event.set()
        self.schedule.stop()
        self.watcher.stop()
        self.runs.stop()  # cancels a run in progress at its next step
        self.control.stop()
        publish_control_url(self.layout, None)
        # Every wait is bounded (systemd kills at TimeoutStopSec=120s): a child that ignores
        # SIGTERM is killed after children.STOP_GRACE_S, and what still runs after its bound is
        # named in the log. Nothing is lost by going on: an ingest not committed is redone
        # from the inbox at the next start, a training run is recorded as interrupted.
        with contextlib.suppress(RuntimeError):  # its observer never started
            self.watcher.join(10)
        self._bounded("training", self.runs.join, self.runs.is_alive, STOP_WAIT_S)
        s = self.serving
        self._bounded("serving start-up", s.join, s.is_alive, STOP_WAIT_S)
        s.stop()
        self.writer.stop()  # lets the files already handed over finish: no half state
        self._bounded("ingestion", self.writer.join, self.writer.is_alive, STOP_WAIT_S)
        if self._watchdog is not None:
            self._watchdog.join(5)
        if self._db is not None:
            self._db.close()
        self._lock.release()
        log.info("stopped")

    @staticmethod
    def _bounded(what: str, join: Callable, alive: Callable[[], bool], timeout: float) -> None:
        if not alive():  # done, or never started
            return
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
                    with contextlib.suppress(ConfigError):  # logged; the running config stays
                        self.reload()
        finally:
            self.stop()

    # ---- what it tells: systemd, the control API -------------------------------------------

    def _status_line(self) -> str:
        cur = self.runs.current
        parts = [self.serving.failed or self._state]
        if cur is not None:
            parts.append(f"training {cur.domain}")
        if (job := self.writer.doing()) is not None:
            parts.append(f"{job['job']} ({job['seconds']:.0f} s)")
        if self.serving.vllm is not None:
            parts.append("vLLM up" if self.serving.vllm.ready.is_set() else "vLLM starting")
        return "; ".join(parts)

    def notify_status(self, text: str | None = None) -> None:
        self.notifier.status(text or self._status_line())

    # ---- the control API (daemon/control/server.py's ControlHandler) -----------------------------

    def status(self) -> dict[str, Any]:
        report = status_report(self.config, waiting=self.waiting())
        report["daemon"] |= {"control_url": self.control.url, "state": self._status_line()}
        note_health(report, self.health())
        report["training"] = self.runs.report()
        report["ingesting"] = self.writer.doing()  # None, or {"job", "seconds"}
        if self.serving.vllm is not None:
            report["daemon"]["vllm"] = self.serving.vllm.report()
        return report

    def page_data(self) -> dict[str, Any]:
        from evertune.daemon.control.status_page import page_data_of

        return page_data_of(self.layout, self.status())

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
            None if self.schedule.running else "the scheduler is not running",
            None if self.runs.is_alive() else "the training worker thread has stopped",
        ]
        return "; ".join(p for p in problems if p) or None

    def waiting(self) -> list[dict[str, str | None]]:
        """Why each file that could not be taken yet waits, and when it is tried again."""
        return self.watcher.waiting() + self.ingestion.waiting()

    def train(self, domain: str, force: bool, from_base: bool = False) -> dict[str, Any]:
        check_domain(domain)
        run_id = self.runs.request(domain, "manual", force, from_base)
        return {"run_id": run_id, "domain": domain}

    def forget(self, domain: str, prompt_hashes: list) -> dict[str, Any]:
        check_domain(domain)
        try:
            hashes = [bytes.fromhex(h) for h in prompt_hashes]
        except (TypeError, ValueError) as exc:
            raise UsageError(f"prompt_hashes must be hex strings: {exc}") from exc
        return {"run_id": self.runs.request(domain, "forget", forget=hashes), "domain": domain}

    def rollback(self, domain: str, to: str | None) -> dict[str, Any]:
        live = self.ops.rollback(check_domain(domain), to)
        self.metrics.set_live(domain, versions.parse_name(live))
        return {"domain": domain, "live": live}

    def pin(self, domain: str, version: str, pinned: bool = True) -> dict[str, Any]:
        self.ops.pin(check_domain(domain), version, pinned)
        return {"domain": domain, "version": version, "pinned": pinned}

    def unpin(self, domain: str, version: str) -> dict[str, Any]:
        return self.pin(domain, version, False)

    def canary(
        self, domain: str, version: str | None, percent: float | None, minutes: float | None
    ) -> dict[str, Any]:
        return self.ops.canary(check_domain(domain), version, percent, minutes)

    def reconcile(self) -> dict[str, Any]:
        return {"changes": self.serving.reconcile()}

    def reload(self) -> dict[str, Any]:
        """Re-read the config file. A file that does not load, or whose schedule cannot be
        planned, is refused whole (ConfigError: the control API answers 409 with the reason)
        and the running config kept; the sections naming running processes and sockets
        (config.RESTART_SECTIONS) need a restart, the others apply at their next use."""
        self.notifier.reloading()
        try:
            try:
                applied, restart = self.source.reload()  # the scheduler plans or refuses
            except ConfigError as exc:
                log.error("config not reloaded, keeping the running one: %s", exc)
                raise
            logging.getLogger().setLevel(self.config.log.level.upper())
            return {"reloaded": True, "applied": applied, "needs_restart": restart}
        finally:
            self.notifier.ready(self._status_line())
