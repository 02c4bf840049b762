"""Read-only queries behind `evertune status` and friends (any connection, WAL readers)."""

from __future__ import annotations

from typing import Any

import orjson
from sqlite_utils import Database

LAST_ERRORS = 5
# An example no version was trained on yet and no newer answer to its prompt superseded:
# what the next training run learns (the scheduler counts these too).
FRESH = "first_version_id IS NULL AND superseded_by IS NULL"
CURRENT = "superseded_by IS NULL"


def domain_names(db: Database) -> list[str]:
    rows = db.execute(
        "SELECT domain FROM files UNION SELECT domain FROM versions ORDER BY 1"
    ).fetchall()
    return [r[0] for r in rows]


def domain_summary(db: Database, domain: str) -> dict[str, Any]:
    """The per-domain block of `status --json` (DESIGN.md keys; add, never rename)."""
    files = dict.fromkeys(("ingested", "rejected", "duplicate"), 0)
    for status, n in db.execute(
        "SELECT status, count(*) FROM files WHERE domain = ? GROUP BY status", [domain]
    ):
        files[status] = n
    examples, new, superseded = db.execute(
        f"SELECT count(*), count(*) FILTER (WHERE {FRESH}),"
        " count(*) FILTER (WHERE superseded_by IS NOT NULL)"
        " FROM examples WHERE domain = ?",
        [domain],
    ).fetchone()
    live = db.execute(
        "SELECT number FROM versions WHERE domain = ? AND state = 'live'", [domain]
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
        "examples_superseded": superseded,
        "live_version": f"v{live[0]:04d}" if live else None,
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
