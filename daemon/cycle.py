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

import contextlib
import fcntl
import json
import logging
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from evertune.adapters import registry
from evertune.adapters.base_model import BaseModel
from evertune.adapters.errors import (
    NothingToTrain,
    RegistryError,
    TrainingCancelled,
    TrainingError,
)
from evertune.adapters.reference import Reference
from evertune.daemon.config import Config
from evertune.daemon.errors import AdapterRefused
from evertune.daemon.procs import die_with_parent
from evertune.daemon.serving import Serving, make_live
from evertune.store.db import utcnow, write_transaction
from evertune.store.layout import HomeLayout
from evertune.store.queries import CURRENT, FRESH

log = logging.getLogger(__name__)

EXIT_CANCELLED = 3


@dataclass
class Outcome:
    domain: str
    version: str
    promoted: bool
    reason: str
    metrics: dict[str, Any]
    run_id: int


def select_examples(
    db: Database,
    domain: str,
    replay_ratio: float,
    replay_min: int,
    old_holdout: int,
    seed: int,
    force: bool,
    from_base: bool = False,
) -> tuple[list, list, list, list]:
    """(new, replay, held-out old, every old not held out) as (id, example dict) lists.
    `from_base`: a rebuild, every current example new (trained on and checked by the gate)."""

    def rows(where: str) -> list[tuple[int, dict]]:
        return [
            (i, _example(kind, body))
            for i, kind, body in db.execute(
                f"SELECT id, kind, body FROM examples WHERE domain = ? AND {where} ORDER BY id",
                [domain],
            )
        ]

    # superseded examples (a newer answer to the same prompt) are never trained, replayed
    # or held out again
    new, old = rows(FRESH), rows(f"first_version_id IS NOT NULL AND {CURRENT}")
    if from_base:
        new, old = rows(CURRENT), []
    if not new and force:
        new, old = old, []  # --force with nothing new: train again on everything
    if not new:
        raise NothingToTrain(
            f"{domain} has no example that no version was trained on yet;"
            " drop new files or use --force"
        )
    replay, held = sample_old(old, len(new), replay_ratio, replay_min, old_holdout, seed)
    held_ids = {i for i, _ in held}
    return new, replay, held, [(i, e) for i, e in old if i not in held_ids]


def replaced_answers(db: Database, domain: str, new_ids: list[int]) -> list[dict]:
    """{"prompt", "old"} for each new example whose prompt had other answers that a version
    was trained on: the answers the candidate must no longer give."""
    olds: dict[int, list[str]] = {}
    for i, body in db.execute(
        "SELECT n.id, o.body FROM examples n JOIN examples o ON o.domain = n.domain"
        " AND o.prompt_hash = n.prompt_hash AND o.id != n.id"
        " AND o.first_version_id IS NOT NULL"
        " WHERE n.domain = ? AND n.id IN (SELECT value FROM json_each(?)) ORDER BY o.id",
        [domain, json.dumps(new_ids)],
    ):
        olds.setdefault(i, []).append(_answer_of(_example("chat", body)))
    out = []
    for i, body in db.execute(
        "SELECT id, body FROM examples WHERE id IN (SELECT value FROM json_each(?))",
        [json.dumps(sorted(olds))],
    ):
        msgs = json.loads(body)
        old = [a for a in olds[i] if a != msgs[-1]["content"]]
        if old and msgs[-1]["role"] == "assistant":  # as gate.short_qa asks it
            out.append({"prompt": msgs[:-1], "old": old})
    return out


def sample_old(
    old: list, n_new: int, replay_ratio: float, replay_min: int, old_holdout: int, seed: int
) -> tuple[list, list]:
    """(replay, held-out) of the older `(id, example)` pairs."""
    old = list(old)
    random.Random(seed).shuffle(old)
    # Hold out at most a quarter: with little old data, replay matters more. The caller
    # varies the seed per run, so no example is held out (never replayed) every time.
    n_held = min(old_holdout, len(old) // 4)
    held, rest = old[:n_held], old[n_held:]
    k = min(len(rest), max(replay_min, round(n_new * replay_ratio)))
    return spread(rest, k), held


def spread(examples: list, k: int) -> list:
    """`k` of `examples` (already shuffled), taking every answer once before any twice.

    Why: a file teaches each fact in several phrasings (same answer). A random replay
    sample of 15 of 23 older examples left some facts with no phrasing replayed, and the
    measured result was a version that forgot 2 of 7 held-out older answers; one phrasing
    per fact keeps every fact at the same cost."""
    groups: dict[str, list] = {}
    for item in examples:
        groups.setdefault(_answer_of(item[1]), []).append(item)
    ordered = [
        g[depth] for depth in range(len(examples)) for g in groups.values() if depth < len(g)
    ]
    return ordered[:k]


def _answer_of(example: dict) -> str:
    if example["kind"] == "text":
        return example["text"]
    return next(
        (m["content"] for m in reversed(example["messages"]) if m["role"] == "assistant"), ""
    )


def _example(kind: str, body: str) -> dict:
    if kind == "text":
        return {"kind": "text", "text": body}
    return {"kind": "chat", "messages": json.loads(body)}


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


def prepare_base(
    config: Config,
    layout: HomeLayout,
    stop: threading.Event | None = None,
    references: bool = True,
    vllm_url: str | None = None,
) -> tuple[BaseModel, list[Reference]]:
    """The base model and its reference set, prepared in a child process (torch stays out of
    the daemon). Instant once prepared; the first time converts the bundled model and
    answers the general prompts (through `vllm_url` when a server already serves this base
    model as `base`), with progress on stderr."""
    cmd = [sys.executable, "-m", "evertune.adapters.prepare", str(layout.models)]
    if vllm_url:
        cmd += ["--vllm-url", vllm_url]
    if config.model.path:
        cmd += ["--model", config.model.path]
    if config.model.reference_limit:
        cmd += ["--reference-limit", str(config.model.reference_limit)]
    if not references:  # serving starts sooner; the first training run builds them
        cmd.append("--base-only")
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, text=True, preexec_fn=die_with_parent
    ) as child:
        watcher = threading.Thread(target=_forward_stop, args=(child, stop), daemon=True)
        watcher.start()
        stdout = child.stdout.read()
        code = child.wait()
    if stop is not None and stop.is_set():
        raise TrainingCancelled("preparing the base model was cancelled (stop requested)")
    if code != 0:
        raise TrainingError(
            f"preparing the base model failed (exit code {code}); the lines above say why."
            f" Command: {shlex.join(cmd)}"
        )
    out = json.loads(stdout.strip().splitlines()[-1])
    refs = [Reference(**r) for r in out.pop("references")]
    return BaseModel(Path(out["path"]), out["model_id"], out["sha256"]), refs


def close_interrupted(db: Database, layout: HomeLayout) -> None:
    """Close what a crash or a kill left half done. Only under the training lock: then
    nobody trains, so a run left 'running', a version left 'training' (its staging folder
    removed) or 'candidate' (the gate passed, the publish was cut short: vLLM is put back
    by reconcile, and its examples, never marked trained, are trained again) was
    interrupted."""
    registry.abandon_unfinished(db, layout.adapters)
    db.execute(
        "UPDATE runs SET state = 'failed', error = 'interrupted', finished_at = ?"
        " WHERE state = 'running'",
        [utcnow()],
    )
    db.conn.commit()


@contextlib.contextmanager
def training_lock(
    path: Path, progress: Callable[[dict], None] | None, wait: bool = True
) -> Iterator[bool]:
    """Holds the home's training lock; yields False at once, holding nothing, when another
    process has it and `wait` is False."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            if progress:
                progress({"event": "phase", "phase": "waiting for the running training"})
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)


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
    # The seed moves on with each run of the domain, so the held-out slice changes.
    (runs,) = db.execute("SELECT count(*) FROM runs WHERE domain = ?", [domain]).fetchone()
    new, replay, held, every_old = select_examples(
        db, domain, t.replay_ratio, t.replay_min, g.old_holdout, t.seed + runs, force, from_base
    )
    base, refs = prepare_base(config, layout, stop, vllm_url=reference_url)
    live = registry.live(db, domain)
    if run_id is None:  # not queued by the daemon: `evertune train` with no daemon
        run_id = db.execute(
            "INSERT INTO runs (domain, state, trigger, queued_at) VALUES (?, 'queued', ?, ?)",
            [domain, trigger, utcnow()],
        ).lastrowid
    db.execute(
        "UPDATE runs SET state = 'running', parent_version_id = ?, started_at = ? WHERE id = ?",
        [live.id if live else None, utcnow(), run_id],
    )
    db.conn.commit()
    version = registry.begin(db, layout.adapters, domain, run_id, live.id if live else None)
    db.execute("UPDATE runs SET version_id = ? WHERE id = ?", [version.id, run_id])
    db.conn.commit()
    log.info(
        "%s %s: training on %d new + %d replayed examples (run %d)",
        domain,
        version.name,
        len(new),
        len(replay),
        run_id,
    )
    staging = registry.staging_dir(layout.adapters, domain, version.number)
    run_dir = layout.home / "runs" / f"{run_id:06d}"
    spec = {
        "train": {
            "base_path": str(base.path),
            "out_dir": str(staging),
            "parent_adapter": live.path if live and not from_base else None,
            "new": [e for _, e in new],
            "replay": [e for _, e in replay],
            "general": [{"kind": "chat", "messages": r.messages()} for r in refs if not r.held_out],
            **t.spec_fields(),
        },
        "eval": {
            "old": [e for _, e in held],
            "gate": g.gate_fields(),
            "general": [r.__dict__ for r in refs if r.held_out],
            # the gate's greedy answers through the running server (see adapters/remote.py)
            "vllm_url": reference_url,
            # what the candidate must beat: the live version, also when a consolidation
            # trains from the base model (the training's parent is then None)
            "live_adapter": live.path if live else None,
            # new answers that replace answers a version learned: the old must be gone
            "changed": replaced_answers(db, domain, [i for i, _ in new]),
        },
    }
    drift = (live.metrics or {}).get("drift") if live else None
    if drift is not None and drift > g.drift_tolerance - t.drifting_margin:
        # near the tolerance: more of the base model's own answers, so this increment
        # pulls the model back toward the base instead of adding to its drift
        spec["train"]["general_per_epoch"] = max(t.general_per_epoch, t.general_when_drifting)
        log.info(
            "%s %s: the live %s drifted %+.0f%% (tolerance %+.0f%%): %d general examples an epoch",
            domain,
            version.name,
            live.name,
            100 * drift,
            100 * g.drift_tolerance,
            spec["train"]["general_per_epoch"],
        )
    consolidated, increment = False, None
    try:
        result = _run_child(db, config, run_dir, spec, run_id, progress, stop)
        if (
            live
            and not from_base
            and t.consolidate
            and _damaged_but_learned(result["gate"], g.min_learned)
        ):
            # Drift is measured against the base model and compounds version after version
            # (measured: -16%, -5%, +11% over three files). An increment that learned the
            # new data but damaged the model is redone from the base model on every example.
            increment = result["gate"]
            log.info(
                "%s %s: the increment was refused (%s); consolidating: training from the"
                " base model on %d new + %d older examples",
                domain,
                version.name,
                increment["reason"],
                len(new),
                len(every_old) + len(held),
            )
            if progress:
                progress({"event": "phase", "phase": "consolidating from the base model"})
            # Every older example, the held-out slice too: a consolidation must keep every
            # answer clients get today (measured: trained without the held-out slice, it
            # lost 5 of 15 of those phrasings), so the gate's older-answer check then asks
            # for answers it trained on.
            replay, held, consolidated = every_old + held, [], True
            spec["train"]["parent_adapter"] = None
            spec["train"]["replay"] = [e for _, e in replay]
            result = _run_child(db, config, run_dir / "from-base", spec, run_id, progress, stop)
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
        "train": {k: v for k, v in spec["train"].items() if k not in ("new", "replay", "general")},
        "result": result["train"],
        "gate": gate,
        "consolidated": consolidated or from_base,  # from the base model on every example
        "rebuilt": from_base,  # asked for: `train --from-base` or `forget`
        "increment_gate": increment,  # the refused increment's verdict, when consolidated
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
        version = registry.set_state(
            db, version, "candidate", metrics=metrics, examples=len(new) + len(replay)
        )
        db.conn.executemany(
            "INSERT INTO version_examples (version_id, example_id, role) VALUES (?, ?, ?)",
            [(version.id, i, "new") for i, _ in new]
            + [(version.id, i, "replay") for i, _ in replay]
            + [(version.id, i, "heldout") for i, _ in held],
        )
    promoted, reason = gate["promote"], gate["reason"]
    if promoted:
        if progress:
            progress({"event": "phase", "phase": "publishing"})
        try:
            version = make_live(db, version, serving, reason)
        except (AdapterRefused, RegistryError) as exc:
            promoted, reason = False, f"passed the gate but could not be served: {exc}"
            log.error("%s %s: %s", domain, version.name, reason)
    with write_transaction(db):
        if promoted:
            db.conn.executemany(
                "UPDATE examples SET first_version_id = ? WHERE id = ?"
                " AND first_version_id IS NULL",
                [(version.id, i) for i, _ in new],
            )
        else:
            version = registry.set_state(db, version, "rejected", reason=reason)
        db.execute(
            "UPDATE runs SET state = 'succeeded', finished_at = ? WHERE id = ?", [utcnow(), run_id]
        )
        db.execute(
            "INSERT INTO events (ts, level, domain, kind, message, data) VALUES (?,?,?,?,?,?)",
            [
                utcnow(),
                "info" if promoted else "warning",
                domain,
                "version_promoted" if promoted else "version_rejected",
                f"{version.name}: {reason}",
                json.dumps(metrics),
            ],
        )
    registry.prune(db, domain, config.registry.keep_last)
    return Outcome(domain, version.name, promoted, reason, metrics, run_id)


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
    registry.set_state(db, version, "rejected", reason=f"training {state}: {error}")
    db.execute(
        "UPDATE runs SET state = ?, error = ?, finished_at = ? WHERE id = ?",
        [state, error, utcnow(), run_id],
    )
    db.conn.commit()


def child_launcher(launcher: str) -> list[str]:
    """The command that starts the training child, before `-m evertune.adapters.child`:
    this Python, or the configured launcher. `torchrun ...` runs as this Python's
    `-m torch.distributed.run ...`: the same torch, and no reliance on PATH (under systemd
    the venv's bin/ is not on it)."""
    words = shlex.split(launcher) if launcher else []
    if not words:
        return [sys.executable]
    if words[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    return words


def _run_child(
    db: Database,
    config: Config,
    run_dir: Path,
    spec: dict,
    run_id: int,
    progress: Callable[[dict], None] | None,
    stop: threading.Event | None,
) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.json").write_text(json.dumps(spec))
    cmd = [*child_launcher(config.train.launcher), "-m", "evertune.adapters.child", str(run_dir)]
    log_path = run_dir / "child.log"
    with log_path.open("w") as err:
        child = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=die_with_parent,
        )
        watcher = threading.Thread(target=_forward_stop, args=(child, stop), daemon=True)
        watcher.start()
        result = None
        for line in child.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "progress":
                db.execute(
                    "UPDATE runs SET step = ?, steps = ?, progress = ? WHERE id = ?",
                    [
                        event["step"],
                        event["steps"],
                        json.dumps(
                            {k: event[k] for k in ("loss", "tokens_per_s", "eta_s", "epoch")}
                        ),
                        run_id,
                    ],
                )
                db.conn.commit()
            elif event.get("event") == "result":
                result = {k: event.get(k) for k in ("train", "gate", "timing")}
            if progress:
                progress(event)
        code = child.wait()
    # Stopped on request: at a step boundary (exit 3), or by the SIGTERM itself when it
    # arrived before the child had set up its handler (still importing torch).
    if code == EXIT_CANCELLED or (stop is not None and stop.is_set() and code == -signal.SIGTERM):
        raise TrainingCancelled("training was cancelled (stop requested)")
    if code != 0 or result is None:
        tail = log_path.read_text()[-2000:]
        raise TrainingError(
            f"the training child exited with code {code}; its log ({log_path}) ends with:\n{tail}"
        )
    return result


STOP_GRACE_S = 20.0  # a training step is ~2 s on 2 cores; HTTP calls to vLLM time out


def _forward_stop(
    child: subprocess.Popen, stop: threading.Event | None, grace: float = STOP_GRACE_S
) -> None:
    """SIGTERM the child when the daemon stops: it cancels at its next step boundary. One
    that has not exited `grace` seconds later is killed, so stopping never waits on it
    (systemd would SIGKILL the whole service at TimeoutStopSec)."""
    if stop is None:
        return
    while child.poll() is None:
        if stop.wait(0.2):
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("child %d did not stop %.0f s after SIGTERM: killed", child.pid, grace)
                child.kill()
            return
