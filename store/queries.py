"""Read-only queries behind `evertune status` and friends (any connection, WAL readers)."""

from __future__ import annotations

from typing import Any

import orjson
from sqlite_utils import Database

from evertune.store.examples import FRESH, REFUSED

LAST_ERRORS = 5


def domain_names(db: Database) -> list[str]:
    rows = db.execute(
        "SELECT domain FROM files UNION SELECT domain FROM versions ORDER BY 1"
    ).fetchall()
    return [r[0] for r in rows]


def domain_summary(db: Database, domain: str) -> dict[str, Any]:
    """The per-domain block of `status --json` (add keys, never rename: ARCHITECTURE.md, "JSON
    contracts")."""
    files = dict.fromkeys(("ingested", "rejected", "duplicate"), 0)
    for status, n in db.execute(
        "SELECT status, count(*) FROM files WHERE domain = ? GROUP BY status", [domain]
    ):
        files[status] = n
    examples, new, refused, superseded = db.execute(
        f"SELECT count(*), count(*) FILTER (WHERE {FRESH}), count(*) FILTER (WHERE {REFUSED}),"
        " count(*) FILTER (WHERE superseded_by IS NOT NULL)"
        " FROM examples WHERE domain = ?",
        [domain],
    ).fetchone()
    live = db.execute(
        "SELECT number FROM versions WHERE domain = ? AND state = 'live'", [domain]
    ).fetchone()
    last = db.execute(
        "SELECT number, state, outcome, reason FROM versions WHERE domain = ?"
        " ORDER BY number DESC LIMIT 1",
        [domain],
    ).fetchone()
    run = db.execute(
        "SELECT state, step, steps, progress FROM runs WHERE domain = ?"
        " AND state IN ('queued', 'running') ORDER BY id DESC LIMIT 1",
        [domain],
    ).fetchone()
    errors = db.execute(
        "SELECT f.stored_path, e.line, e.reason FROM file_errors e JOIN files f"
        " ON f.id = e.file_id WHERE f.domain = ? ORDER BY e.id DESC LIMIT ?",
        [domain, LAST_ERRORS],
    ).fetchall()
    return {
        "name": domain,
        "files": files,
        "examples": examples,
        "examples_new": new,
        "examples_refused": refused,
        "examples_superseded": superseded,
        "live_version": f"v{live[0]:04d}" if live else None,
        # the newest version, whatever became of it (outcome: why a rejected one was)
        "last_version": None
        if last is None
        else {
            "version": f"v{last[0]:04d}",
            "state": last[1],
            "outcome": last[2],
            "reason": last[3],
        },
        "run": None
        if run is None
        else {
            "state": run[0],
            "step": run[1],
            "steps": run[2],
            **(orjson.loads(run[3]) if run[3] else {}),
        },
        "last_errors": [{"file": f, "line": line, "reason": r} for f, line, r in errors],
    }


def file_row(db: Database, inbox_path: str) -> dict[str, Any] | None:
    """The latest files row for a path dropped into the inbox, if it was handled."""
    rows = list(
        db.query("SELECT * FROM files WHERE inbox_path = ? ORDER BY id DESC LIMIT 1", [inbox_path])
    )
    return rows[0] if rows else None


def first_drop_by_version(db: Database, domain: str) -> dict[int, str]:
    """version id -> when the first file of the examples it learned as new was dropped."""
    return dict(
        db.execute(
            "SELECT ve.version_id, min(f.received_at) FROM version_examples ve"
            " JOIN versions v ON v.id = ve.version_id JOIN examples e ON e.id = ve.example_id"
            " JOIN files f ON f.id = e.file_id WHERE v.domain = ? AND ve.role = 'new'"
            " GROUP BY ve.version_id",
            [domain],
        ).fetchall()
    )


def run_times_by_version(db: Database, domain: str) -> dict[int, tuple]:
    """version id -> (queued, started, finished) of the run that made it."""
    return {
        r[0]: r[1:]
        for r in db.execute(
            "SELECT v.id, r.queued_at, r.started_at, r.finished_at FROM versions v"
            " JOIN runs r ON r.id = v.run_id WHERE v.domain = ?",
            [domain],
        )
    }


def ingested_files(db: Database, domain: str) -> list[tuple[str, int, int]]:
    """(ingested at, examples added, examples since forgotten) per ingested file, in order."""
    return db.execute(
        "SELECT ingested_at, examples_added, examples_forgotten FROM files WHERE domain = ?"
        " AND status = 'ingested' ORDER BY id",
        [domain],
    ).fetchall()
