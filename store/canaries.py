"""Canaries in the database: a share of a domain's stable-name requests sent to a version
that is not live, until it is promoted or rolled back (evertune.daemon.serving.canary)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlite_utils import Database

from evertune.store.db import utcnow, write_transaction
from evertune.store.errors import RegistryError
from evertune.store.versions import Version, get


@dataclass(frozen=True)
class Canary:
    domain: str
    version: Version
    percent: float
    started_at: str
    promote_at: str | None  # None: promoted or rolled back by command only

    def due(self, now: dt.datetime | None = None) -> bool:
        if self.promote_at is None:
            return False
        now = now or dt.datetime.now(dt.UTC)
        return dt.datetime.fromisoformat(self.promote_at) <= now

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "version": self.version.name,
            "percent": self.percent,
            "started_at": self.started_at,
            "promote_at": self.promote_at,
        }


def start(db: Database, version: Version, percent: float, minutes: float | None) -> Canary:
    """`version` gets `percent` of its domain's requests (replacing the domain's canary, if
    any); promoted when `minutes` have passed (None: by command only)."""
    if not 0 < percent <= 100:  # NaN fails this too
        raise RegistryError(f"a canary share is a percentage above 0 and at most 100: {percent}")
    if minutes is not None and not 0 <= minutes <= 525_600:
        raise RegistryError(f"a canary runs 0 to 525600 minutes (a year), not {minutes}")
    if version.state not in ("candidate", "retired") or version.forgotten:
        raise RegistryError(
            f"{version.domain} {version.name} is {version.state}"
            + (", trained on forgotten examples" if version.forgotten else "")
            + ": only a candidate or a retired version can be a canary"
        )
    started = dt.datetime.now(dt.UTC)
    promote_at = (
        (started + dt.timedelta(minutes=minutes)).isoformat(timespec="milliseconds")
        if minutes is not None
        else None
    )
    with write_transaction(db):
        db.execute(
            "INSERT INTO canaries (domain, version_id, percent, started_at, promote_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (domain) DO UPDATE SET"
            " version_id = excluded.version_id, percent = excluded.percent,"
            " started_at = excluded.started_at, promote_at = excluded.promote_at",
            [version.domain, version.id, percent, utcnow(), promote_at],
        )
    found = of(db, version.domain)
    assert found is not None
    return found


def of(db: Database, domain: str) -> Canary | None:
    row = db.execute(
        "SELECT domain, version_id, percent, started_at, promote_at FROM canaries WHERE domain = ?",
        [domain],
    ).fetchone()
    return _canary(db, row) if row else None


def every(db: Database) -> list[Canary]:
    rows = db.execute(
        "SELECT domain, version_id, percent, started_at, promote_at FROM canaries ORDER BY domain"
    ).fetchall()
    return [_canary(db, row) for row in rows]


def end(db: Database, domain: str) -> None:
    with write_transaction(db):
        db.execute("DELETE FROM canaries WHERE domain = ?", [domain])


def _canary(db: Database, row: tuple) -> Canary:
    domain, version_id, percent, started_at, promote_at = row
    return Canary(domain, get(db, version_id), percent, started_at, promote_at)
