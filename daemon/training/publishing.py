"""The last steps of a training cycle (daemon/training/cycle.py): register the trained version
(folder published with its meta.json, the version a 'candidate' with its metrics and the
examples it used), then publish it (served and live, or a canary first) or reject it."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from evertune.adapters import registry
from evertune.adapters.contract import ChildResult, ChildSpec, TrainResult
from evertune.adapters.gate import GateResult
from evertune.daemon.config import Config
from evertune.daemon.errors import AdapterRefused
from evertune.daemon.serving import canary
from evertune.daemon.serving.endpoints import Serving, make_live
from evertune.daemon.training.selection import Picked
from evertune.store import events, runs, versions
from evertune.store.db import utcnow, write_transaction
from evertune.store.errors import RegistryError

if TYPE_CHECKING:
    from sqlite_utils import Database

    from evertune.daemon.training.cycle import CycleContext, Outcome

log = logging.getLogger(__name__)


def register(
    c: CycleContext,
    base,
    spec: ChildSpec,
    picked: Picked,
    result: ChildResult,
    increment: GateResult | None,
) -> dict:
    """The trained folder published with its meta.json, the version a candidate with its
    metrics and examples. Returns the metrics (what the status page draws)."""
    version, live, gate = c.version, c.live, result.gate
    meta = {
        "domain": c.domain,
        "version": version.name,
        "parent": live.name if live else None,
        "base_model": {"id": base.model_id, "sha256": base.sha256, "path": str(base.path)},
        "examples": {
            "new": len(picked.new),
            "replay": len(picked.replay),
            "heldout_old": len(picked.held),
            "new_ids": [picked.new[0][0], picked.new[-1][0]],
        },
        "train": {
            k: v
            for k, v in dataclasses.asdict(spec.train).items()
            if k not in ("new", "replay", "general")
        },
        "result": result.train.to_dict(),
        "gate": gate.to_dict(),
        "consolidated": c.from_base,  # from the base model on every example
        "rebuilt": c.from_base,  # asked for: `train --from-base` or `forget`
        "retried": increment is not None,  # the increment was refused for damage and repaired
        # the refused increment's verdict, when repaired
        "increment_gate": increment.to_dict() if increment else None,
        "timing": result.timing,
        "created": version.created_at,
        "finished": utcnow(),
    }
    registry.publish(version, c.staging(), meta)
    # the row keeps what the status page draws, also once retention deletes the folder
    metrics = {
        **gate.metrics,
        "train": train_summary(result.train),
        "timing": result.timing,
    }
    with write_transaction(c.db):
        c.version = versions.set_state(
            c.db,
            version,
            "candidate",
            metrics=metrics,
            examples=len(picked.new) + len(picked.replay),
        )
        versions.record_examples(
            c.db,
            c.version,
            [i for i, _ in picked.new],
            [i for i, _ in picked.replay],
            [i for i, _ in picked.held],
        )
    return metrics


def publish(c: CycleContext, picked: Picked, gate: GateResult, metrics: dict) -> Outcome:
    """Promoted: served (a canary first where asked), its new examples marked trained.
    Refused, or not servable: the version rejected with its outcome and reason."""
    db, version = c.db, c.version
    promoted, reason = gate.promote, gate.reason
    trial, outcome = None, "refused"
    if promoted:
        c.phase("publishing")
        try:
            if _canary_first(db, c.config, c.serving, c.domain):
                trial = canary.start(
                    db,
                    c.domain,
                    version.name,
                    c.config.serve.canary_percent,
                    c.config.serve.canary_minutes or None,
                    c.serving,
                )
                reason = f"{reason}; a canary on {trial.percent:g}% of requests first"
            else:
                version = make_live(db, version, c.serving, reason)
        except (AdapterRefused, RegistryError) as exc:
            promoted, reason = False, f"passed the gate but could not be served: {exc}"
            outcome = "unservable"
            log.error("%s %s: %s", c.domain, version.name, reason)
    with write_transaction(db):
        if trial is not None:
            pass  # a candidate until the canary ends (its examples marked trained then)
        elif promoted:
            versions.mark_trained(db, version, [i for i, _ in picked.new])
        else:
            version = versions.reject(db, version, outcome, reason)
        runs.finish(db, c.run_id, "succeeded")
        events.record(
            db,
            "info" if promoted else "warning",
            c.domain,
            ("version_canary" if trial else "version_promoted") if promoted else "version_rejected",
            f"{version.name}: {reason}",
            metrics,
        )
    registry.prune(db, c.domain, c.config.registry.keep_last)
    canaried = trial is not None
    from evertune.daemon.training.cycle import Outcome

    return Outcome(
        c.domain, version.name, promoted and not canaried, reason, metrics, c.run_id, canaried
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


def train_summary(result: TrainResult) -> dict:
    """What the version's row keeps of its training run: the figures and, per epoch, the
    curve (the status page draws it)."""
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
    out = {k: getattr(result, k) for k in keys}
    out["history"] = [
        {k: h.get(k) for k in ("epoch", "new_loss", "learned")} for h in result.history
    ]
    return out
