"""One training cycle of a domain: select data, train + evaluate in a child, gate, register.

Used by `evertune train` (no daemon: the CLI process runs it) and by the daemon's
scheduler. The child gets everything through RUN_DIR/spec.json and reports on stdout;
this side owns the database writes (runs, versions, which examples a version used).

    select: new examples (no version trained on them yet) + a replay sample of older ones
            + a held-out slice of older ones for the gate + the general reference set
    train:  child process (crash or OOM fails this run only); progress -> runs row
    gate:   promote -> folder published, version live, examples marked used;
            refuse  -> folder published, version rejected with the metrics and reason
"""

from __future__ import annotations

import dataclasses
import logging
import random
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from evertune.adapters import registry
from evertune.adapters.contract import ChildSpec, EvalSpec, TrainSpec
from evertune.adapters.errors import NothingToTrain, TrainingCancelled
from evertune.daemon import canary
from evertune.daemon.children import prepare_base, run_child, training_lock
from evertune.daemon.config import Config
from evertune.daemon.errors import AdapterRefused
from evertune.daemon.selection import replaced_answers, select_examples
from evertune.daemon.serving import Serving, make_live
from evertune.store import canaries, events, knowledge, runs, versions
from evertune.store.db import utcnow, write_transaction
from evertune.store.errors import RegistryError
from evertune.store.layout import HomeLayout

log = logging.getLogger(__name__)


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
        return _cycle(
            db,
            config,
            layout,
            domain,
            trigger,
            force,
            progress,
            stop,
            serving,
            run_id,
            reference_url,
            from_base,
        )


def close_interrupted(db: Database, layout: HomeLayout) -> None:
    """Close what a crash or a kill left half done. Only under the training lock: then
    nobody trains, so a run left 'running', a version left 'training' (its staging folder
    removed) or 'candidate' (the gate passed, the publish was cut short: vLLM is put back
    by reconcile, and its examples, never marked trained, are trained again) was
    interrupted."""
    registry.abandon_unfinished(db, layout.adapters)
    runs.fail_interrupted(db)


def _cycle(
    db: Database,
    config: Config,
    layout: HomeLayout,
    domain: str,
    trigger: str,
    force: bool,
    progress: Callable[[dict], None] | None,
    stop: threading.Event | None,
    serving: Serving | None,
    run_id: int | None,
    reference_url: str | None,
    from_base: bool = False,
) -> Outcome:
    t, g = config.train, config.gate
    trial = canaries.of(db, domain)
    if trial is not None:
        raise NothingToTrain(
            f"{domain}: a canary of {trial.version.name} is running; it trains again once"
            f" the canary is promoted or rolled back (`evertune canary {domain} --promote`)"
        )
    # The seed moves on with each run of the domain, so the held-out slice changes.
    new, replay, held, every_old = select_examples(
        db,
        domain,
        t.replay_ratio,
        t.replay_min,
        g.old_holdout,
        t.seed + runs.count(db, domain),
        force,
        from_base,
    )
    base, refs = prepare_base(config, layout, stop, vllm_url=reference_url)
    live = versions.live(db, domain)
    if run_id is None:  # not queued by the daemon: `evertune train` with no daemon
        run_id = runs.queue(db, domain, trigger)
    runs.start(db, run_id, live.id if live else None)
    version = registry.begin(
        db,
        layout.adapters,
        domain,
        run_id,
        live.id if live else None,  # what it must beat, also for a rebuild
        from_base=live is None or from_base,  # the weights it starts from
    )
    runs.set_version(db, run_id, version.id)
    log.info(
        "%s %s: training on %d new + %d replayed examples (run %d)",
        domain,
        version.name,
        len(new),
        len(replay),
        run_id,
    )
    staging = registry.staging_dir(layout.adapters, domain, version.number)
    run_dir = layout.run_dir(run_id)
    spec = ChildSpec(
        train=TrainSpec(
            base_path=str(base.path),
            out_dir=str(staging),
            parent_adapter=live.path if live and not from_base else None,
            new=[e for _, e in new],
            replay=[e for _, e in replay],
            general=[{"kind": "chat", "messages": r.messages()} for r in refs if not r.held_out],
            **t.spec_fields(),
        ),
        eval=EvalSpec(
            old=[e for _, e in held],
            gate=g.gate_fields(),
            general=[r.__dict__ for r in refs if r.held_out],
            vllm_url=reference_url,  # the gate's answers through the running server
            # the live version, also when a rebuild trains from the base model
            live_adapter=live.path if live else None,
            changed=replaced_answers(db, domain, [i for i, _ in new]),
            doc_checks=knowledge.checks_of_examples(db, domain, [i for i, _ in new], g.doc_checks),
            cache_dir=str(layout.runs),  # the base model's side (children.warm_gate too)
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
            domain,
            version.name,
            live.name,
            100 * drift,
            100 * g.drift_tolerance,
            spec.train.general_per_epoch,
        )
    retried, increment = False, None
    try:
        result = run_child(db, config, run_dir, spec, run_id, progress, stop)
        if (
            live
            and not from_base
            and t.consolidate
            and _damaged_but_learned(result["gate"], g.min_learned)
        ):
            # An increment that learned the new data but damaged the model (drift, older
            # answers, easy answers) is repaired: trained on from where it stopped, with
            # the older examples it was checked on replayed too, a fresh held-out slice and
            # more of the base model's own answers. Its new examples are learned already
            # (they leave after an epoch), so the repair is two or three short epochs, not
            # the increment's six: measured, retrying from the live version made such a
            # cycle 287-336 s against 118-153 s. Its cost is bounded by the new data, like
            # the increment's: never every example of the domain (a rebuild from the base
            # model on everything is `train --from-base`).
            increment = result["gate"]
            replay, held = _retry_sample(replay, held, every_old, t.seed + run_id)
            refused = run_dir / "increment"  # the refused increment's adapter: the start
            shutil.rmtree(refused, ignore_errors=True)
            shutil.move(staging, refused)
            log.info(
                "%s %s: the increment was refused (%s); repairing it with %d replayed"
                " (the %d held-out older examples among them) and %d general examples an"
                " epoch",
                domain,
                version.name,
                increment["reason"],
                len(replay),
                len(spec.eval.old),
                max(spec.train.general_per_epoch, t.general_when_drifting),
            )
            if progress:
                progress({"event": "phase", "phase": "repairing the increment"})
            retried = True
            spec = _with_train(
                spec,
                parent_adapter=str(refused),
                replay=[e for _, e in replay],
                general_per_epoch=max(spec.train.general_per_epoch, t.general_when_drifting),
            )
            spec = dataclasses.replace(
                spec, eval=dataclasses.replace(spec.eval, old=[e for _, e in held])
            )
            try:
                result = run_child(db, config, run_dir / "retry", spec, run_id, progress, stop)
            finally:
                shutil.rmtree(refused, ignore_errors=True)
    except TrainingCancelled as exc:
        _finish_failed(db, version, run_id, "cancelled", str(exc))
        raise
    except Exception as exc:
        _finish_failed(db, version, run_id, "failed", str(exc))
        raise
    gate = result["gate"]
    meta = {
        "domain": domain,
        "version": version.name,
        "parent": live.name if live else None,
        "base_model": {"id": base.model_id, "sha256": base.sha256, "path": str(base.path)},
        "examples": {
            "new": len(new),
            "replay": len(replay),
            "heldout_old": len(held),
            "new_ids": [new[0][0], new[-1][0]],
        },
        "train": {
            k: v
            for k, v in dataclasses.asdict(spec.train).items()
            if k not in ("new", "replay", "general")
        },
        "result": result["train"],
        "gate": gate,
        "consolidated": from_base,  # from the base model on every example
        "rebuilt": from_base,  # asked for: `train --from-base` or `forget`
        "retried": retried,  # the increment was refused for damage and repaired
        "increment_gate": increment,  # the refused increment's verdict, when retried
        "timing": result.get("timing"),
        "created": version.created_at,
        "finished": utcnow(),
    }
    registry.publish(version, staging, meta)
    # the row keeps what the status page draws, also once retention deletes the folder
    metrics = {
        **gate["metrics"],
        "train": _train_summary(result["train"]),
        "timing": result.get("timing"),
    }
    with write_transaction(db):
        version = versions.set_state(
            db, version, "candidate", metrics=metrics, examples=len(new) + len(replay)
        )
        versions.record_examples(
            db, version, [i for i, _ in new], [i for i, _ in replay], [i for i, _ in held]
        )
    promoted, reason = gate["promote"], gate["reason"]
    trial, outcome = None, "refused"
    if promoted:
        if progress:
            progress({"event": "phase", "phase": "publishing"})
        try:
            if _canary_first(db, config, serving, domain):
                trial = canary.start(
                    db,
                    domain,
                    version.name,
                    config.serve.canary_percent,
                    config.serve.canary_minutes or None,
                    serving,
                )
                reason = f"{reason}; a canary on {trial.percent:g}% of requests first"
            else:
                version = make_live(db, version, serving, reason)
        except (AdapterRefused, RegistryError) as exc:
            promoted, reason = False, f"passed the gate but could not be served: {exc}"
            outcome = "unservable"
            log.error("%s %s: %s", domain, version.name, reason)
    with write_transaction(db):
        if trial is not None:
            pass  # a candidate until the canary ends (its examples marked trained then)
        elif promoted:
            versions.mark_trained(db, version, [i for i, _ in new])
        else:
            version = versions.reject(db, version, outcome, reason)
        runs.finish(db, run_id, "succeeded")
        events.record(
            db,
            "info" if promoted else "warning",
            domain,
            ("version_canary" if trial else "version_promoted") if promoted else "version_rejected",
            f"{version.name}: {reason}",
            metrics,
        )
    registry.prune(db, domain, config.registry.keep_last)
    return Outcome(
        domain, version.name, promoted and trial is None, reason, metrics, run_id, trial is not None
    )


def _canary_first(db: Database, config: Config, serving: Serving | None, domain: str) -> bool:
    """serve.canary_percent asks for a canary, and one can run: requests are bound at
    admission and the domain has a live version to share them with."""
    return (
        config.serve.canary_percent > 0
        and serving is not None
        and serving.cfg.routing == "admission"
        and versions.live(db, domain) is not None
    )


def _with_train(spec: ChildSpec, **changes: Any) -> ChildSpec:
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, **changes))


def _retry_sample(replay: list, held: list, every_old: list, seed: int) -> tuple[list, list]:
    """(replay, held-out) for a repaired increment: the held-out slice joins the replay, and
    as many older examples that neither trained on are held out instead (none where the
    replay already covers every older example)."""
    used = {i for i, _ in replay} | {i for i, _ in held}
    rest = [p for p in every_old if p[0] not in used]
    random.Random(seed).shuffle(rest)
    return replay + held, rest[: len(held)]


def _damaged_but_learned(gate: dict, min_learned: float) -> bool:
    """Refused for damage (drift, easy answers, older answers), not for failing to learn."""
    learned = gate["metrics"]["candidate"].get("new_exact")
    return not gate["promote"] and (learned is None or learned >= min_learned)


def _train_summary(r: dict) -> dict:
    keys = (
        "steps",
        "epochs",
        "tokens",
        "seconds",
        "tokens_per_s",
        "new_loss",
        "learned",
        "precision",
        "device",
        "world_size",
    )
    out = {k: r.get(k) for k in keys}
    out["history"] = [  # per epoch: the training curve
        {k: h.get(k) for k in ("epoch", "new_loss", "learned")} for h in r.get("history") or []
    ]
    return out


def _finish_failed(db: Database, version, run_id: int, state: str, error: str) -> None:
    staging = registry.staging_dir(Path(version.path).parent.parent, version.domain, version.number)
    shutil.rmtree(staging, ignore_errors=True)
    with write_transaction(db):
        versions.reject(db, version, state, f"training {state}: {error}")
        runs.finish(db, run_id, state, error)
