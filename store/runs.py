"""Training runs in the database: the `runs` state machine, owned here alone.

    queued -> running -> succeeded | failed | cancelled | skipped
    queued -> cancelled | skipped | failed        (never started)

A run is queued by whoever asks for training (the daemon's run queue, or `evertune train`
with no daemon), started by the cycle once it has its data, and finished by the cycle or,
when it ended before starting, by the run queue. Triggers (schema m004) refuse any other
transition. Progress (step, steps, loss, tokens/s) is written as the training child
reports it.
"""

from __future__ import annotations

import json
from typing import Any

from sqlite_utils import Database

from evertune.store.db import utcnow, write_transaction


def queue(db: Database, domain: str, trigger: str) -> int:
    with write_transaction(db):
        return db.execute(
            "INSERT INTO runs (domain, state, trigger, queued_at) VALUES (?, 'queued', ?, ?)",
            [domain, trigger, utcnow()],
        ).lastrowid


def count(db: Database, domain: str) -> int:
    """Runs of the domain so far (the training seed moves on with each)."""
    (n,) = db.execute("SELECT count(*) FROM runs WHERE domain = ?", [domain]).fetchone()
    return n


def start(db: Database, run_id: int, parent_version_id: int | None) -> None:
    with write_transaction(db):
        db.execute(
            "UPDATE runs SET state = 'running', parent_version_id = ?, started_at = ? WHERE id = ?",
            [parent_version_id, utcnow(), run_id],
        )


def set_version(db: Database, run_id: int, version_id: int) -> None:
    with write_transaction(db):
        db.execute("UPDATE runs SET version_id = ? WHERE id = ?", [version_id, run_id])


def progress(db: Database, run_id: int, step: int, steps: int, detail: dict[str, Any]) -> None:
    with write_transaction(db):
        db.execute(
            "UPDATE runs SET step = ?, steps = ?, progress = ? WHERE id = ?",
            [step, steps, json.dumps(detail), run_id],
        )


def finish(db: Database, run_id: int, state: str, error: str | None = None) -> None:
    """succeeded, failed, cancelled or skipped (in the caller's transaction, if any)."""
    with write_transaction(db):
        db.execute(
            "UPDATE runs SET state = ?, error = ?, finished_at = ? WHERE id = ?",
            [state, error, utcnow(), run_id],
        )


def close_if_open(db: Database, run_id: int, state: str, error: str) -> None:
    """The run, if nothing closed it yet (it ended before the cycle started it)."""
    with write_transaction(db):
        db.execute(
            "UPDATE runs SET state = ?, error = ?, finished_at = ? WHERE id = ?"
            " AND state IN ('queued', 'running')",
            [state, error, utcnow(), run_id],
        )


def cancel_queued(db: Database) -> None:
    """At the daemon's start: runs a previous daemon queued and never started (the startup
    check queues their domains again)."""
    with write_transaction(db):
        db.execute(
            "UPDATE runs SET state = 'cancelled', error = 'the daemon stopped before it ran',"
            " finished_at = ? WHERE state = 'queued'",
            [utcnow()],
        )


def fail_interrupted(db: Database) -> None:
    """Under the training lock, so nobody trains: a run left 'running' was interrupted."""
    with write_transaction(db):
        db.execute(
            "UPDATE runs SET state = 'failed', error = 'interrupted', finished_at = ?"
            " WHERE state = 'running'",
            [utcnow()],
        )


def get(db: Database, run_id: int) -> dict[str, Any]:
    """state, step, steps, progress (dict), error, version_id of one run."""
    row = db.execute(
        "SELECT state, step, steps, progress, error, version_id FROM runs WHERE id = ?", [run_id]
    ).fetchone()
    keys = ("state", "step", "steps", "progress", "error", "version_id")
    out = dict(zip(keys, row, strict=True))
    out["progress"] = json.loads(out["progress"]) if out["progress"] else {}
    return out
