"""Adapter versions in the database: their rows, their states, and the rules between them.

    training -> candidate -> live -> retired        (rejected: refused, failed, interrupted)

Exactly one version per domain is live (a partial unique index enforces it); a version is
`forgotten` once examples it was trained on are forgotten and is never served again. The
folders themselves (staging, fsync, rename, safetensors checks) are
`evertune.adapters.registry`'s; this module is every statement about versions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from evertune.store.db import utcnow, write_transaction
from evertune.store.errors import RegistryError


def version_name(number: int) -> str:
    return f"v{number:04d}"


def parse_name(name: str) -> int:
    if len(name) != 5 or name[0] != "v" or not name[1:].isdigit():
        raise RegistryError(f"{name!r} is not a version name: use vNNNN, e.g. v0003")
    return int(name[1:])


@dataclass(frozen=True)
class Version:
    id: int
    domain: str
    number: int
    state: str
    parent_id: int | None
    path: str
    pinned: bool
    examples: int
    metrics: dict[str, Any]
    reason: str | None
    created_at: str
    promoted_at: str | None
    parent: str | None = None
    forgotten: bool = False  # trained on examples since forgotten: never served again
    outcome: str | None = None  # rejected: why (store.schema.REJECTED_OUTCOMES)
    # trained from the base model's weights (None: not recorded, a version before m010
    # whose folder is gone)
    from_base: bool | None = None

    @property
    def name(self) -> str:
        return version_name(self.number)

    def to_json(self) -> dict[str, Any]:
        """The `versions --json` shape (ARCHITECTURE.md, "JSON contracts")."""
        return {
            "version": self.name,
            "state": self.state,
            "parent": self.parent,
            "created": self.created_at,
            "examples": self.examples,
            "metrics": self.metrics,
            "path": self.path,
            "pinned": self.pinned,
            "reason": self.reason,
            "outcome": self.outcome,
            "promoted": self.promoted_at,
            "forgotten": self.forgotten,
        }


_COLUMNS = (
    "v.id, v.domain, v.number, v.state, v.parent_id, v.path, v.pinned, v.examples, v.metrics,"
    " v.reason, v.created_at, v.promoted_at, v.forgotten, p.number, v.outcome, v.from_base"
)
_FROM = "versions v LEFT JOIN versions p ON p.id = v.parent_id"


def _version(row: tuple) -> Version:
    return Version(
        *row[:6],
        bool(row[6]),
        row[7],
        json.loads(row[8] or "{}"),
        *row[9:12],
        None if row[13] is None else version_name(row[13]),
        bool(row[12]),
        row[14],
        None if row[15] is None else bool(row[15]),
    )


def _select(db: Database, where: str, params: list) -> list[Version]:
    rows = db.execute(f"SELECT {_COLUMNS} FROM {_FROM} WHERE {where}", params).fetchall()
    return [_version(r) for r in rows]


def get(db: Database, version_id: int) -> Version:
    found = _select(db, "v.id = ?", [version_id])
    if not found:
        raise RegistryError(f"no adapter version with id {version_id}")
    return found[0]


def find(db: Database, domain: str, name: str) -> Version:
    found = _select(db, "v.domain = ? AND v.number = ?", [domain, parse_name(name)])
    if not found:
        known = ", ".join(v.name for v in list_versions(db, domain)) or "none yet"
        raise RegistryError(f"{domain} has no version {name} (versions: {known})")
    return found[0]


def list_versions(db: Database, domain: str) -> list[Version]:
    return _select(db, "v.domain = ? ORDER BY v.number", [domain])


def live(db: Database, domain: str) -> Version | None:
    found = _select(db, "v.domain = ? AND v.state = 'live'", [domain])
    return found[0] if found else None


def unfinished(db: Database) -> list[Version]:
    """Versions left 'training' or 'candidate' (a crash, or a run in progress); a candidate
    that is a running canary is not unfinished."""
    return _select(
        db,
        "(v.state = 'training' OR (v.state = 'candidate'"
        " AND v.id NOT IN (SELECT version_id FROM canaries)))",
        [],
    )


def domains(db: Database) -> list[str]:
    return [d for (d,) in db.execute("SELECT DISTINCT domain FROM versions ORDER BY domain")]


def by_path(db: Database) -> dict[str, int]:
    return {p: i for i, p in db.execute("SELECT id, path FROM versions")}


def reserve(
    db: Database,
    domain: str,
    run_id: int | None,
    parent_id: int | None,
    path_of,
    from_base: bool | None = None,
) -> Version:
    """The domain's next number, state 'training'; `path_of(number)` is its folder;
    `from_base`: trained from the base model's weights, not from its parent's."""
    with write_transaction(db):
        (last,) = db.execute(
            "SELECT coalesce(max(number), 0) FROM versions WHERE domain = ?", [domain]
        ).fetchone()
        cur = db.execute(
            "INSERT INTO versions (domain, number, state, parent_id, run_id, path, created_at,"
            " from_base) VALUES (?, ?, 'training', ?, ?, ?, ?, ?)",
            [
                domain,
                last + 1,
                parent_id,
                run_id,
                str(path_of(last + 1)),
                utcnow(),
                None if from_base is None else int(from_base),
            ],
        )
        version_id = cur.lastrowid
    return get(db, version_id)


def set_state(
    db: Database,
    version: Version,
    state: str,
    *,
    reason: str | None = None,
    metrics: dict[str, Any] | None = None,
    examples: int | None = None,
) -> Version:
    if state == "rejected":
        raise RegistryError("a version is rejected with versions.reject (it needs an outcome)")
    return _set(db, version, state, None, reason, metrics, examples)


def reject(db: Database, version: Version, outcome: str, reason: str) -> Version:
    """`version` is never served: `outcome` says why (store.schema.REJECTED_OUTCOMES), `reason`
    in words."""
    return _set(db, version, "rejected", outcome, reason, None, None)


def _set(db, version, state, outcome, reason, metrics, examples) -> Version:
    with write_transaction(db):  # a savepoint when the caller already holds a transaction
        db.execute(
            "UPDATE versions SET state = ?, outcome = ?, reason = coalesce(?, reason),"
            " metrics = coalesce(?, metrics), examples = coalesce(?, examples) WHERE id = ?",
            [
                state,
                outcome,
                reason,
                json.dumps(metrics) if metrics is not None else None,
                examples,
                version.id,
            ],
        )
    return get(db, version.id)


def promote(db: Database, version: Version, reason: str = "promoted") -> Version:
    """Make `version` the domain's one live version; the previous live one is retired."""
    if version.state not in ("candidate", "retired"):
        raise RegistryError(
            f"{version.domain} {version.name} is {version.state}: only a"
            " candidate or a retired version can become live"
        )
    with write_transaction(db):
        db.execute(
            "UPDATE versions SET state = 'retired', reason = ? WHERE domain = ? AND state = 'live'",
            [f"replaced by {version.name}", version.domain],
        )
        db.execute(
            "UPDATE versions SET state = 'live', promoted_at = ?, reason = ? WHERE id = ?",
            [utcnow(), reason, version.id],
        )
    return get(db, version.id)


def set_pinned(db: Database, version: Version, pinned: bool) -> Version:
    with write_transaction(db):
        db.execute("UPDATE versions SET pinned = ? WHERE id = ?", [int(pinned), version.id])
    return get(db, version.id)


def note_folder_removed(db: Database, version: Version) -> None:
    """Retention deleted its folder: the row stays (history), with the reason."""
    with write_transaction(db):
        db.execute(
            "UPDATE versions SET reason = ? WHERE id = ?",
            [f"{version.reason or version.state}; folder removed by retention", version.id],
        )


def rollback_target(db: Database, domain: str, to: str | None) -> tuple[Version, Version]:
    """(the live version, the one a rollback makes live): `to`, or the latest version live
    before the live one whose folder is still kept; RegistryError says why there is none."""
    current = live(db, domain)
    if current is None:
        raise RegistryError(f"{domain} has no live version to roll back from")
    if to:
        target = find(db, domain, to)
        if target.id == current.id:
            raise RegistryError(f"{domain} {to} is already live")
    else:
        target = latest_earlier(list_versions(db, domain), before=current.promoted_at or "")
        if target is None:
            raise RegistryError(
                f"{domain} has no earlier live version with its folder still kept to roll back"
                f" to (see `evertune versions {domain}`)"
            )
    if target.forgotten:
        raise RegistryError(
            f"{domain} {target.name} was trained on examples since forgotten"
            " (evertune forget): it is never served again"
        )
    if target.state != "retired":
        raise RegistryError(
            f"{domain} {target.name} is {target.state}: only a version that was live before"
            " (retired) can be rolled back to"
        )
    return current, target


def latest_earlier(
    every: list[Version], *, before: str | None = None, exclude: set[int] | None = None
) -> Version | None:
    """The version most recently live (retired now), not forgotten, its folder kept:
    promoted before `before` when given, not one of `exclude`. What a rollback goes back to,
    and what serves while versions that learned forgotten examples are rebuilt."""
    kept = [
        v
        for v in every
        if v.state == "retired"
        and v.promoted_at
        and (before is None or v.promoted_at < before)
        and not v.forgotten
        and v.id not in (exclude or set())
        and Path(v.path).is_dir()
    ]
    return max(kept, key=lambda v: v.promoted_at) if kept else None


def check_pinnable(version: Version, pinned: bool) -> None:
    if pinned and version.forgotten:
        raise RegistryError(
            f"{version.domain} {version.name} was trained on examples since forgotten:"
            " it cannot be pinned"
        )
    if pinned and version.state not in ("live", "retired"):
        raise RegistryError(
            f"{version.domain} {version.name} is {version.state}: only a version that is or"
            " was live can be pinned"
        )


def record_examples(
    db: Database, version: Version, new: list[int], replay: list[int], held: list[int]
) -> None:
    """Which examples the version was trained on (new, replay) and checked on (heldout)."""
    with write_transaction(db):
        db.conn.executemany(
            "INSERT INTO version_examples (version_id, example_id, role) VALUES (?, ?, ?)",
            [(version.id, i, "new") for i in new]
            + [(version.id, i, "replay") for i in replay]
            + [(version.id, i, "heldout") for i in held],
        )


def new_examples_of(db: Database, version: Version) -> list[int]:
    """The examples `version` was trained on as new (record_examples)."""
    rows = db.execute(
        "SELECT example_id FROM version_examples WHERE version_id = ? AND role = 'new'"
        " ORDER BY example_id",
        [version.id],
    )
    return [i for (i,) in rows]


def mark_trained(db: Database, version: Version, new: list[int]) -> None:
    """The promoted version is the first to have learned these examples."""
    with write_transaction(db):
        db.conn.executemany(
            "UPDATE examples SET first_version_id = ? WHERE id = ? AND first_version_id IS NULL",
            [(version.id, i) for i in new],
        )


def superseded_counts(db: Database, domain: str) -> dict[int, int]:
    """version id -> how many of the examples it was trained on were since superseded."""
    return dict(
        db.execute(
            "SELECT ve.version_id, count(*) FROM version_examples ve JOIN examples e"
            " ON e.id = ve.example_id WHERE e.domain = ? AND e.superseded_by IS NOT NULL"
            " AND ve.role IN ('new', 'replay') GROUP BY ve.version_id",
            [domain],
        ).fetchall()
    )


def record_served(db: Database, url: str, served: dict[str, str] | None) -> None:
    """endpoint_models := what `url` serves, name -> folder (None: unknown, it is down:
    rows cleared); names whose folder is not one of our versions are left out."""
    ids = by_path(db)
    before = {
        m: (v, t)
        for m, v, t in db.execute(
            "SELECT model, version_id, loaded_at FROM endpoint_models WHERE endpoint = ?", [url]
        )
    }
    rows = []
    for name, path in (served or {}).items():
        vid = ids.get(path)
        if vid is None:
            continue  # not one of ours
        same = before.get(name)
        rows.append((url, name, vid, same[1] if same and same[0] == vid else utcnow()))
    with write_transaction(db):
        db.execute("DELETE FROM endpoint_models WHERE endpoint = ?", [url])
        db.conn.executemany(
            "INSERT INTO endpoint_models (endpoint, model, version_id, loaded_at)"
            " VALUES (?, ?, ?, ?)",
            rows,
        )


def trained_on(db: Database, example_ids: list[int]) -> set[int]:
    """Ids of the versions trained on one of the examples (as new or replayed)."""
    return {
        v
        for (v,) in db.execute(
            "SELECT DISTINCT version_id FROM version_examples WHERE role IN ('new', 'replay')"
            " AND example_id IN (SELECT value FROM json_each(?))",
            [json.dumps(example_ids)],
        )
    }


def mark_forgotten(db: Database, version: Version, reason: str) -> None:
    """Never served again: forgotten, and retired if it was live."""
    with write_transaction(db):
        db.execute(
            "UPDATE versions SET forgotten = 1, reason = ?,"
            " state = CASE WHEN state = 'live' THEN 'retired' ELSE state END WHERE id = ?",
            [reason, version.id],
        )
