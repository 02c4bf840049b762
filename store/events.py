"""The append-only events log: what the service did, for `status` and debugging."""

from __future__ import annotations

import json
from typing import Any

from sqlite_utils import Database

from evertune.store.db import utcnow, write_transaction


def record(
    db: Database, level: str, domain: str, kind: str, message: str, data: Any = None
) -> None:
    """One line of the append-only events log (in the caller's transaction, if any)."""
    with write_transaction(db):
        db.execute(
            "INSERT INTO events (ts, level, domain, kind, message, data) VALUES (?,?,?,?,?,?)",
            [utcnow(), level, domain, kind, message, None if data is None else json.dumps(data)],
        )


def last_data(db: Database, domain: str, kind: str) -> Any:
    """The data of the domain's latest event of this kind (None: there is none)."""
    row = db.execute(
        "SELECT data FROM events WHERE domain = ? AND kind = ? ORDER BY id DESC LIMIT 1",
        [domain, kind],
    ).fetchone()
    return json.loads(row[0]) if row and row[0] else None
