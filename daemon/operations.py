"""State changes (train, forget, rollback, pin, unpin, canary, reload): one interface, two
ways.

    ops = operations.for_home(config)      # the daemon runs: Daemon; else Local
    result = ops.train("legal", force=False, from_base=False, progress=show)

`Daemon` asks the running daemon through its control API (it does the work in its run
queue and serves the change at once) and follows a run through its row in the store;
`Local` acts on the store in this process when no daemon runs (the daemon serves the change
when it starts). Both return the same results, so the CLI prints the same either way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from evertune.daemon.config import Config, ConfigSource
from evertune.daemon.errors import EvertuneError
from evertune.daemon.lock import daemon_state
from evertune.store import events, runs, versions
from evertune.store.db import open_db
from evertune.store.layout import HomeLayout

Progress = Callable[[dict], None]  # {"event": "phase" | "progress", ...} as the cycle emits
FOLLOW_EVERY_S = 0.5


@dataclass
class TrainResult:
    domain: str
    version: str | None  # None: there was nothing to train (`reason` says why)
    promoted: bool = False
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class ForgetResult:
    forgotten: dict[str, Any]  # Forgotten.to_json()
    rebuild: TrainResult | None  # None: no rebuild was due
    no_rebuild: str | None = None  # why not


class Operations(Protocol):
    served_now: bool  # True: the change is served at once; False: when the daemon starts

    def train(
        self, domain: str, force: bool, from_base: bool, progress: Progress
    ) -> TrainResult: ...

    def forget(self, domain: str, hashes: list[bytes], progress: Progress) -> ForgetResult: ...

    def rollback(self, domain: str, to: str | None) -> str:
        """The version now live."""
        ...

    def pin(self, domain: str, version: str, pinned: bool) -> None: ...

    def canary(
        self, domain: str, version: str | None, percent: float | None, minutes: float | None
    ) -> dict[str, Any]:
        """Start (version and percent) a canary, or end it (version None: `percent` 100
        promotes, 0 rolls back); the domain's canary afterwards ({} when none)."""
        ...

    def reload(self) -> dict[str, Any]: ...


def for_home(config: Config) -> Operations:
    layout = HomeLayout(config.home)
    running, pid = daemon_state(layout.lock_path)
    if not running:
        return Local(ConfigSource(config))
    from evertune.daemon.control.client import ControlClient
    from evertune.daemon.status import control_url

    url = control_url(layout)
    if url is None:
        raise EvertuneError(
            f"the daemon (pid {pid}) is starting or stopping and its control API is not up;"
            " try again in a few seconds"
        )
    return Daemon(config, ControlClient.from_home(layout.home, url))


class Daemon:
    served_now = True

    def __init__(self, config: Config, client):
        self.layout = HomeLayout(config.home)
        self.client = client

    def train(self, domain: str, force: bool, from_base: bool, progress: Progress) -> TrainResult:
        run_id = self.client.train(domain, force, from_base)["run_id"]
        return self._follow(domain, run_id, progress)

    def forget(self, domain: str, hashes: list[bytes], progress: Progress) -> ForgetResult:
        run_id = self.client.forget(domain, [h.hex() for h in hashes])["run_id"]
        result = self._follow(domain, run_id, progress)
        db = open_db(self.layout.db_path, readonly=True)
        try:
            forgotten = events.last_data(db, domain, "examples_forgotten") or {}
        finally:
            db.close()
        if result.version is None:  # the run was skipped: forgotten, no rebuild due
            return ForgetResult(forgotten, None, result.reason)
        return ForgetResult(forgotten, result)

    def rollback(self, domain: str, to: str | None) -> str:
        return self.client.rollback(domain, to)["live"]

    def pin(self, domain: str, version: str, pinned: bool) -> None:
        (self.client.pin if pinned else self.client.unpin)(domain, version)

    def canary(
        self, domain: str, version: str | None, percent: float | None, minutes: float | None
    ) -> dict[str, Any]:
        return self.client.canary(domain, version, percent, minutes)

    def reload(self) -> dict[str, Any]:
        return self.client.reload()

    def _follow(self, domain: str, run_id: int, progress: Progress) -> TrainResult:
        """Follow a run queued in the daemon through its row in the store until it ends."""
        db = open_db(self.layout.db_path, readonly=True)
        shown = None
        try:
            while True:
                run = runs.get(db, run_id)
                state = run["state"]
                if state in ("queued", "running") and state != shown:
                    progress({"event": "phase", "phase": f"run {run_id} {state}"})
                    shown = state
                if state == "running" and run["steps"]:
                    event = {"event": "progress", "step": run["step"], "steps": run["steps"]}
                    progress({**event, **run["progress"]})
                if state not in ("queued", "running"):
                    break
                time.sleep(FOLLOW_EVERY_S)
            if state == "skipped":
                return TrainResult(domain, None, reason=run["error"])
            if state != "succeeded":
                raise EvertuneError(f"{domain}: run {run_id} {state}: {run['error']}")
            v = versions.get(db, run["version_id"])
        finally:
            db.close()
        return TrainResult(domain, v.name, v.state != "rejected", v.reason or "", v.metrics)


class Local:
    """On the store in this process. The daemon uses it too, for rollback and pin, with its
    serving side: then the change is served at once, as the CLI's `Daemon` says."""

    def __init__(self, config: ConfigSource, serving: Callable[[], Any] = lambda: None):
        self.config = config
        self.layout = HomeLayout(config.get().home)
        self.serving = serving

    @property
    def served_now(self) -> bool:
        return self.serving() is not None

    def train(self, domain: str, force: bool, from_base: bool, progress: Progress) -> TrainResult:
        return self._cycle(domain, force, from_base, progress, "manual")

    def forget(self, domain: str, hashes: list[bytes], progress: Progress) -> ForgetResult:
        from evertune.daemon.training.forget import forget_then_rebuild

        db = open_db(self.layout.db_path)
        try:
            gone, rebuilt = forget_then_rebuild(
                db,
                self.layout,
                domain,
                hashes,
                None,
                lambda: self._cycle(domain, False, True, progress, "forget"),
            )
        finally:
            db.close()
        if rebuilt is None:
            return ForgetResult(gone.to_json(), None, gone.no_rebuild_reason())
        return ForgetResult(gone.to_json(), rebuilt)

    def rollback(self, domain: str, to: str | None) -> str:
        from evertune.daemon.serving.endpoints import rollback

        return self._on_store(lambda db: rollback(db, domain, to, self.serving())).name

    def pin(self, domain: str, version: str, pinned: bool) -> None:
        from evertune.daemon.serving.endpoints import set_pinned

        self._on_store(lambda db: set_pinned(db, domain, version, pinned, self.serving()))

    def canary(
        self, domain: str, version: str | None, percent: float | None, minutes: float | None
    ) -> dict[str, Any]:
        from evertune.daemon.serving import canary

        def job(db) -> dict[str, Any]:
            if version is not None:
                if percent is None:
                    raise EvertuneError("a canary needs its share: PERCENT, above 0, at most 100")
                return canary.start(db, domain, version, percent, minutes, self.serving()).to_json()
            if percent not in (0, 100):
                raise EvertuneError("end a canary with --promote or --rollback")
            return canary.finish(db, domain, percent == 100, self.serving(), "by command")

        return self._on_store(job)

    def reload(self) -> dict[str, Any]:
        raise EvertuneError("no daemon runs on this home: nothing to reload")

    def _on_store(self, job: Callable[[Any], Any]) -> Any:
        """`job(db)` on a connection of its own (it may talk to vLLM meanwhile)."""
        db = open_db(self.layout.db_path)
        try:
            return job(db)
        finally:
            db.close()

    def _cycle(
        self, domain: str, force: bool, from_base: bool, progress: Progress, trigger: str
    ) -> TrainResult:
        from evertune.adapters.errors import NothingToTrain
        from evertune.daemon.training.cycle import run_cycle

        db = open_db(self.layout.db_path)
        try:
            outcome = run_cycle(
                db,
                self.config.get(),
                domain,
                trigger=trigger,
                force=force,
                progress=progress,
                from_base=from_base,
            )
        except NothingToTrain as exc:
            return TrainResult(domain, None, reason=str(exc))
        finally:
            db.close()
        return TrainResult(
            domain, outcome.version, outcome.promoted, outcome.reason, outcome.metrics
        )
