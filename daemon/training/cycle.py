"""One training cycle of a domain: select data, train + evaluate in a child, gate, register.

Used by `evertune train` (no daemon: the CLI process runs it) and by the daemon's
scheduler. The child gets everything through RUN_DIR/spec.json (adapters/contract.py) and
reports on stdout; this side owns the database writes (runs, versions, which examples a
version used). `run_cycle` reads as its steps:

    _select           new examples (no version trained on them yet) + a replay sample of
                      older ones + a held-out slice of older ones for the gate
    _begin            the run started, its version reserved ('training')
    _child_spec       what the child trains and checks (+ the general reference set)
    _train_and_gate   the child trains and the gate measures (a crash or OOM fails this run
                      only); a version refused for damage (not a rebuild) is repaired once
                      (_repair_spec)
    register          folder published with meta.json, the version a 'candidate'
    publish           promoted: served (or a canary), live; refused: rejected with why
                      (both in daemon/training/publishing.py)"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from evertune.adapters import registry
from evertune.adapters.contract import ChildResult, ChildSpec, EvalSpec, TrainSpec
from evertune.adapters.errors import NothingToTrain, TrainingCancelled
from evertune.adapters.gate import GateResult
from evertune.adapters.reference import Reference
from evertune.daemon.config import Config
from evertune.daemon.serving.endpoints import Serving
from evertune.daemon.training.children import prepare_base, run_child, training_lock
from evertune.daemon.training.publishing import publish, register
from evertune.daemon.training.selection import (
    Picked,
    repair_sample,
    replaced_answers,
    select_examples,
)
from evertune.store import canaries, knowledge, runs, versions
from evertune.store.db import write_transaction
from evertune.store.layout import HomeLayout

log = logging.getLogger(__name__)

REPAIRED_FROM = "increment"  # runs/NNNNNN/increment/: a refused increment while it is repaired


@dataclass
class Outcome:
    domain: str
    version: str
    promoted: bool
    reason: str
    metrics: dict[str, Any]
    run_id: int
    canary: bool = False  # passed the gate, answering a share of requests before it is live


def run_cycle(
    db: Database,
    config: Config,
    domain: str,
    *,
    trigger: str = "manual",
    force: bool = False,
    progress: Callable[[dict], None] | None = None,
    stop: threading.Event | None = None,
    serving: Serving | None = None,
    run_id: int | None = None,
    reference_url: str | None = None,
    from_base: bool = False,
) -> Outcome:
    """One cycle, holding the home's training lock: one training run at a time.

    `from_base`: a rebuild (`train --from-base`, `forget`): trained from the base model on
    every current example of the domain, gated against the live version as usual.

    With `serving` a promoted version is loaded and switched on every endpoint before it is
    recorded live; without (the CLI with no daemon) only the database changes and the
    daemon serves it when it starts. `reference_url`: a vLLM server serving the base model
    as `base`, to build the reference set with if it is still missing."""
    layout = HomeLayout(config.home)
    with training_lock(layout.train_lock_path, progress):
        close_interrupted(db, layout)
        c = CycleContext(db, config, layout, domain, progress, stop, serving, from_base)
        _refuse_during_canary(c)
        picked = _select(c, force)
        base, refs = prepare_base(config, layout, stop, vllm_url=reference_url)
        _begin(c, run_id, trigger, len(picked.new), len(picked.replay))
        spec = _child_spec(c, picked, base, refs, reference_url)
        result, spec, picked, increment = _train_and_gate(c, spec, picked)
        metrics = register(c, base, spec, picked, result, increment)
        return publish(c, picked, result.gate, metrics)


def close_interrupted(db: Database, layout: HomeLayout) -> None:
    """Close what a crash or a kill left half done. Only under the training lock: then
    nobody trains, so a run left 'running', a version left 'training' (its staging folder
    removed) or 'candidate' (the gate passed, the publish was cut short: vLLM is put back
    by reconcile, and its examples, never marked trained, are trained again) was
    interrupted."""
    registry.abandon_unfinished(db, layout.adapters)
    runs.fail_interrupted(db)
    for refused in layout.runs.glob(f"*/{REPAIRED_FROM}"):  # a repair cut short
        shutil.rmtree(refused, ignore_errors=True)


@dataclass
class CycleContext:
    """One cycle's context, which its steps share; the steps, top to bottom, are
    `run_cycle`'s body (the publishing ones in daemon/training/publishing.py)."""

    db: Database
    config: Config
    layout: HomeLayout
    domain: str
    progress: Callable[[dict], None] | None
    stop: threading.Event | None
    serving: Serving | None
    from_base: bool
    live: versions.Version | None = None
    version: versions.Version | None = None
    run_id: int = 0

    def phase(self, name: str) -> None:
        if self.progress:
            self.progress({"event": "phase", "phase": name})

    def staging(self) -> Path:
        """Where the child writes the version's adapter (renamed into place by publish)."""
        return registry.staging_dir(self.layout.adapters, self.domain, self.version.number)


def _refuse_during_canary(c: CycleContext) -> None:
    trial = canaries.of(c.db, c.domain)
    if trial is not None:
        raise NothingToTrain(
            f"{c.domain}: a canary of {trial.version.name} is running; it trains again once"
            f" the canary is promoted or rolled back (`evertune canary {c.domain} --promote`)"
        )


def _select(c: CycleContext, force: bool) -> Picked:
    """The new examples, a replay sample and a held-out slice of the older ones. The seed
    moves on with each run of the domain, so the held-out slice changes."""
    t, g = c.config.train, c.config.gate
    seed = t.seed + runs.count(c.db, c.domain)
    return Picked(
        *select_examples(
            c.db, c.domain, t.replay_ratio, t.replay_min, g.old_holdout, seed, force, c.from_base
        )
    )


def _begin(c: CycleContext, run_id: int | None, trigger: str, n_new: int, n_replay: int) -> None:
    """The run started and its version reserved (state 'training')."""
    c.live = versions.live(c.db, c.domain)
    live_id = c.live.id if c.live else None
    if run_id is None:  # not queued by the daemon: `evertune train` with no daemon
        run_id = runs.queue(c.db, c.domain, trigger)
    c.run_id = run_id
    runs.start(c.db, run_id, live_id)
    c.version = registry.begin(
        c.db,
        c.layout.adapters,
        c.domain,
        run_id,
        live_id,  # what it must beat, also for a rebuild
        from_base=c.live is None or c.from_base,  # the weights it starts from
    )
    runs.set_version(c.db, run_id, c.version.id)
    log.info(
        "%s %s: training on %d new + %d replayed examples (run %d)",
        c.domain,
        c.version.name,
        n_new,
        n_replay,
        run_id,
    )


def _child_spec(
    c: CycleContext, picked: Picked, base, refs, reference_url: str | None
) -> ChildSpec:
    """What the training child trains and the gate checks (adapters/contract.py)."""
    t, g, live = c.config.train, c.config.gate, c.live
    new_ids = [i for i, _ in picked.new]
    parent = live.path if live and not c.from_base else None
    spec = ChildSpec(
        train=TrainSpec(
            base_path=str(base.path),
            out_dir=str(c.staging()),
            parent_adapter=parent,
            new=[e for _, e in picked.new],
            replay=[e for _, e in picked.replay],
            general=[{"kind": "chat", "messages": r.messages()} for r in refs if not r.held_out],
            # an increment learns gently (train.increment_lr_scale)
            **t.spec_fields(increment=parent is not None),
        ),
        eval=EvalSpec(
            old=[e for _, e in picked.held],
            gate=g.gate_fields(),
            general=[r.__dict__ for r in refs if r.held_out],
            vllm_url=reference_url,  # the gate's answers through the running server
            # the live version, also when a rebuild trains from the base model
            live_adapter=live.path if live else None,
            changed=replaced_answers(c.db, c.domain, new_ids),
            doc_checks=knowledge.checks_of_examples(c.db, c.domain, new_ids, g.doc_checks),
            cache_dir=str(c.layout.runs),  # the base model's side (children.warm_gate too)
        ),
    )
    drift = (live.metrics or {}).get("drift") if live else None
    if drift is not None and drift > g.drift_tolerance - t.drifting_margin:
        # near the tolerance: more of the base model's own answers, so this increment
        # pulls the model back toward the base instead of adding to its drift
        spec = _with_train(
            spec, general_per_epoch=max(t.general_per_epoch, t.general_when_drifting)
        )
        log.info(
            "%s %s: the live %s drifted %+.0f%% (tolerance %+.0f%%): %d general examples an epoch",
            c.domain,
            c.version.name,
            live.name,
            100 * drift,
            100 * g.drift_tolerance,
            spec.train.general_per_epoch,
        )
    return spec


def _train_and_gate(
    c: CycleContext, spec: ChildSpec, picked: Picked
) -> tuple[ChildResult, ChildSpec, Picked, GateResult | None]:
    """(result, the spec that made it, what it trained on, the refused increment's verdict
    when it was repaired). A failure or a cancel rejects the version and raises."""
    run_dir = c.layout.run_dir(c.run_id)
    increment = None
    try:
        result = run_child(c.db, c.config, run_dir, spec, c.run_id, c.progress, c.stop)
        if _needs_repair(c, result.gate):
            increment = result.gate
            spec, picked = _repair_spec(c, spec, picked, increment)
            refused = Path(spec.train.parent_adapter)
            try:
                result = run_child(
                    c.db, c.config, run_dir / "retry", spec, c.run_id, c.progress, c.stop
                )
            finally:
                shutil.rmtree(refused, ignore_errors=True)
    except TrainingCancelled as exc:
        _finish_failed(c.db, c.version, c.run_id, "cancelled", str(exc))
        raise
    except Exception as exc:
        _finish_failed(c.db, c.version, c.run_id, "failed", str(exc))
        raise
    return result, spec, picked, increment


def _needs_repair(c: CycleContext, gate: GateResult) -> bool:
    """An increment (from the live version) or a first version refused for damage, not for
    failing to learn. (A rebuild from the base model, `train --from-base`, is not: it is
    what an operator asks for when the increments went wrong.)"""
    return bool(
        (c.live is None or not c.from_base)
        and c.config.train.consolidate
        and _damaged_but_learned(gate, c.config.gate.min_learned)
    )


def _repair_spec(
    c: CycleContext, spec: ChildSpec, picked: Picked, increment: GateResult
) -> tuple[ChildSpec, Picked]:
    """An increment that learned the new data but damaged the model (drift, older answers,
    easy answers) is repaired: trained on from where it stopped, with the older examples it
    was checked on replayed too, a fresh held-out slice and more of the base model's own
    answers. Its new examples start learned, so it stops sooner than a retrain from the
    live version: measured (benchmarks/results/continual-2026-12-07-seeds0-4-repair), 4
    epochs and 83-113 s of training, those cycles 250-310 s, against 287-336 s retrained
    from the live version; with the new examples kept in every epoch, seed 0's repair 6
    epochs, 146.6 s (continual-2026-12-07-repair-kept-seed0). Its cost is bounded by the
    new data, like the increment's:
    never every example of the domain (a rebuild from the base model on everything is
    `train --from-base`)."""
    t = c.config.train
    replay, held = repair_sample(picked.replay, picked.held, picked.every_old, t.seed + c.run_id)
    refused = c.layout.run_dir(c.run_id) / REPAIRED_FROM  # the refused adapter: the start
    shutil.rmtree(refused, ignore_errors=True)
    shutil.move(c.staging(), refused)
    general = max(spec.train.general_per_epoch, t.general_when_drifting)
    # general questions it answered with the new facts' names: their neighbours in the
    # general pool are replayed in every epoch of the repair
    bleeding = [b["prompt"] for b in increment.metrics["candidate"].get("bleed") or []]
    log.info(
        "%s %s: the %s was refused (%s); repairing it with %d replayed"
        " (the %d held-out older examples among them) and %d general examples an epoch%s",
        c.domain,
        c.version.name,
        "increment" if c.live else "first version",
        increment.reason,
        len(replay),
        len(picked.held),
        general,
        f", anchored near {len(bleeding)} bleeding question(s)" if bleeding else "",
    )
    c.phase("repairing the " + ("increment" if c.live else "first version"))
    # Its new examples stay in every epoch (no graduation): they start learned and would
    # leave after the first, and the repair's replay then un-learned them (measured in
    # benchmarks/results/continual-2026-12-07-fact-part/, seed 0: 70% of the new answers
    # left after the repair).
    # and the base model's own answers to those questions join the general pool (the
    # gate still asks them, no longer held out; the other easy questions are)
    own = [
        {"kind": "chat", "messages": Reference(**r).messages()}
        for r in spec.eval.general
        if r["prompt"] in set(bleeding)
    ]
    spec = _with_train(
        spec,
        parent_adapter=str(refused),
        replay=[e for _, e in replay],
        general=spec.train.general + own,
        general_per_epoch=general,
        graduate=False,
        # one pass over the domain's examples an epoch: they start learned (the passes were
        # for learning them); the repair is for the general and older answers. Three passes
        # made a repair dearer than the increment it repaired (120-155 steps against 99-122:
        # benchmarks/results/continual-2026-12-07-bleed-check/)
        new_passes=1,
        anchor_prompts=bleeding,
        # an increment's repair learns at the increment's rate: at the full rate, file 3 of
        # six forgot 3 of 14 held-out older answers against 2 of 14 at half
        # (benchmarks/results/continual-2026-12-08-six-files-repair-full/)
    )
    spec = dataclasses.replace(spec, eval=dataclasses.replace(spec.eval, old=[e for _, e in held]))
    return spec, dataclasses.replace(picked, replay=replay, held=held)


def _with_train(spec: ChildSpec, **changes: Any) -> ChildSpec:
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, **changes))


def _damaged_but_learned(gate: GateResult, min_learned: float) -> bool:
    """Refused for damage (drift, easy answers, older answers), not for failing to learn."""
    learned = gate.metrics["candidate"].get("new_exact")
    return not gate.promote and (learned is None or learned >= min_learned)


def _finish_failed(db: Database, version, run_id: int, state: str, error: str) -> None:
    staging = registry.staging_dir(Path(version.path).parent.parent, version.domain, version.number)
    shutil.rmtree(staging, ignore_errors=True)
    with write_transaction(db):
        versions.reject(db, version, state, f"training {state}: {error}")
        runs.finish(db, run_id, state, error)
