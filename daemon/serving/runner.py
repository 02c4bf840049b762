"""The daemon's serving side, started in the background: the base model prepared, the
embedded vLLM started (or the external endpoints taken as they are), the endpoints kept
equal to the database (reconcile, on a timer and whenever vLLM comes back), and, as soon
as vLLM is up, the base model's reference answers: then the daemon is ready to learn.

It has its own database connection, used only here: a reconcile talks to vLLM for as
long as vLLM takes, without holding any lock another thread needs to write.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from evertune.adapters.errors import Cancelled, TrainingError
from evertune.daemon.config import ConfigSource
from evertune.daemon.control.metrics import Metrics
from evertune.daemon.errors import EvertuneError
from evertune.daemon.serving import canary, pausing
from evertune.daemon.serving.endpoints import Serving
from evertune.daemon.serving.vllm_process import EmbeddedVLLM
from evertune.daemon.training.children import prepare_base, warm_gate
from evertune.daemon.training.schedule import Schedule
from evertune.store.db import open_db
from evertune.store.errors import StoreError
from evertune.store.layout import HomeLayout

log = logging.getLogger(__name__)


class ServingRunner:
    def __init__(
        self,
        config: ConfigSource,
        schedule: Schedule,
        metrics: Metrics,
        stop: threading.Event,
        notify: Callable[[str | None], None],
    ):
        self.config = config
        self.layout = HomeLayout(config.get().home)
        self.schedule = schedule
        self.metrics = metrics
        self.stop_event = stop
        self.notify = notify
        self.vllm: EmbeddedVLLM | None = None
        self.serving: Serving | None = None
        self.failed: str | None = None  # why serving could not start
        self._db = None
        self._db_lock = threading.Lock()  # this connection, between the timer and control
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.config.get().serve.mode != "none":
            self._thread = threading.Thread(target=self._start, name="serving")
            self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """After the start-up thread is joined: the embedded vLLM stopped, endpoints closed."""
        if self.vllm is not None:
            self.vllm.stop()
        if self.serving is not None:
            self.serving.close()
        if self._db is not None:
            self._db.close()

    def reference_url(self) -> str | None:
        """The embedded vLLM's URL while it is up: it serves the very base model as `base`."""
        return self.vllm.url if self.vllm is not None and self.vllm.ready.is_set() else None

    def reconcile(self) -> list[str]:
        if self.serving is None or self.stop_event.is_set():
            return []
        if self.vllm is not None and not self.vllm.ready.is_set():
            return []  # starting or restarting: its on_ready reconciles
        with self._db_lock:
            changes = self.serving.reconcile(self._db)
            try:  # canaries: a failed request rolls one back, its time up promotes it
                changes += canary.check(self._db, self.serving, self.serving.request_counts())
            except (EvertuneError, StoreError) as exc:
                log.error("canary check: %s", exc)
        self.notify(None)
        return changes

    def _start(self) -> None:
        """The first start prepares the base model (minutes) before vLLM can start; files
        are accepted meanwhile."""
        cfg = self.config.get().serve
        try:
            embedded_url = None
            if cfg.mode == "embedded":
                pausing.clear(self.layout.pausable)  # a killed daemon's registrations
                self.notify("preparing the base model")
                base, _ = prepare_base(
                    self.config.get(), self.layout, self.stop_event, references=False
                )
                if self.stop_event.is_set():
                    return
                self.vllm = EmbeddedVLLM(
                    base.path,
                    cfg,
                    on_ready=self._vllm_ready,
                    on_state=lambda up: self.metrics.endpoint_state(self.vllm.url, up),
                    pause_dir=self.layout.pausable,
                    output_log=self.layout.vllm_log_path,
                )
                embedded_url = self.vllm.url
            self._db = open_db(self.layout.db_path)
            self.serving = Serving.for_config(
                cfg,
                embedded_url,
                on_switch=self.metrics.switch,
                on_endpoint=self.metrics.endpoint_state,
                on_publish=self.metrics.published,
            )
            if self.vllm is not None:
                self.notify("starting vLLM")
                self.vllm.start()
            else:
                self.reconcile()
            self.schedule.every(cfg.reconcile_seconds, self.reconcile, "reconcile")
            self._build_references()
        except Cancelled:
            return  # the daemon is stopping
        except Exception:
            log.exception("serving could not start; training and ingestion go on")
            self.failed = "serving failed to start (see the log)"

    def _build_references(self) -> None:
        """Ready to learn on a first start: the base model's reference answers, built as soon
        as the embedded vLLM is up (batched there) instead of inside the first training run
        (transformers, minutes). A no-op once they exist."""
        if self.vllm is None:
            return
        while not self.vllm.ready.wait(1.0):
            if self.stop_event.is_set():
                return
        self.notify("answering the general reference prompts with the base model")
        try:
            base, refs = prepare_base(
                self.config.get(), self.layout, self.stop_event, vllm_url=self.vllm.url
            )
        except TrainingError as exc:  # the first training run builds them instead
            log.warning("reference answers through vLLM failed: %s", exc)
        else:
            log.info("ready to learn: base model and reference answers prepared")
            self.notify("measuring the base model for the gate")
            warm_gate(self.config.get(), self.layout, base, refs, self.vllm.url, self.stop_event)
        self.notify(None)

    def _vllm_ready(self) -> None:
        self.reconcile()
        log.info(
            'serving: the OpenAI-compatible endpoint is %s/v1; ask a domain with model="<domain>"'
            ' (e.g. `evertune ask <domain> "question"`); drop files into %s/<domain>/',
            self.vllm.url,
            self.layout.inbox,
        )
