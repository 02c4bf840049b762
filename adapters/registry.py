"""The versioned adapter registry: `adapters/<domain>/vNNNN/` folders plus their state in SQLite.

The folder is the artifact (adapter_model.safetensors, adapter_config.json, meta.json);
the database says which version is what (training -> candidate -> live -> retired, or
rejected). A version is trained into a hidden staging folder beside its final place and
renamed into place after an fsync, so a crash never leaves a half version visible.
Exactly one version per domain is live (a partial unique index enforces it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from evertune.adapters.errors import RegistryError
from evertune.store.db import utcnow, write_transaction
from evertune.store.layout import fsync_dir

log = logging.getLogger(__name__)

FILES = ("adapter_model.safetensors", "adapter_config.json")
META = "meta.json"


def version_name(number: int) -> str:
    return f"v{number:04d}"


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

    @property
    def name(self) -> str:
        return version_name(self.number)

    def to_json(self) -> dict[str, Any]:
        """The `versions --json` shape (DESIGN.md)."""
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
            "promoted": self.promoted_at,
            "forgotten": self.forgotten,
        }


_COLUMNS = (
    "id, domain, number, state, parent_id, path, pinned, examples, metrics, reason,"
    " created_at, promoted_at, forgotten"
)


def _version(db: Database, row: tuple) -> Version:
    v = Version(
        *row[:6], bool(row[6]), row[7], json.loads(row[8] or "{}"), *row[9:12], None, bool(row[12])
    )
    if v.parent_id is not None:
        (number,) = db.execute("SELECT number FROM versions WHERE id = ?", [v.parent_id]).fetchone()
        v = Version(**{**v.__dict__, "parent": version_name(number)})
    return v


def get(db: Database, version_id: int) -> Version:
    row = db.execute(f"SELECT {_COLUMNS} FROM versions WHERE id = ?", [version_id]).fetchone()
    if row is None:
        raise RegistryError(f"no adapter version with id {version_id}")
    return _version(db, row)


def find(db: Database, domain: str, name: str) -> Version:
    number = parse_name(name)
    row = db.execute(
        f"SELECT {_COLUMNS} FROM versions WHERE domain = ? AND number = ?", [domain, number]
    ).fetchone()
    if row is None:
        known = ", ".join(v.name for v in list_versions(db, domain)) or "none yet"
        raise RegistryError(f"{domain} has no version {name} (versions: {known})")
    return _version(db, row)


def parse_name(name: str) -> int:
    if len(name) != 5 or name[0] != "v" or not name[1:].isdigit():
        raise RegistryError(f"{name!r} is not a version name: use vNNNN, e.g. v0003")
    return int(name[1:])


def list_versions(db: Database, domain: str) -> list[Version]:
    rows = db.execute(
        f"SELECT {_COLUMNS} FROM versions WHERE domain = ? ORDER BY number", [domain]
    ).fetchall()
    return [_version(db, r) for r in rows]


def live(db: Database, domain: str) -> Version | None:
    row = db.execute(
        f"SELECT {_COLUMNS} FROM versions WHERE domain = ? AND state = 'live'", [domain]
    ).fetchone()
    return _version(db, row) if row else None


def staging_dir(adapters_root: Path, domain: str, number: int) -> Path:
    return adapters_root / domain / f".{version_name(number)}.staging"


def begin(
    db: Database, adapters_root: Path, domain: str, run_id: int | None, parent_id: int | None
) -> Version:
    """Reserve the next number for a training run (state 'training')."""
    with write_transaction(db):
        (last,) = db.execute(
            "SELECT coalesce(max(number), 0) FROM versions WHERE domain = ?", [domain]
        ).fetchone()
        number = last + 1
        path = adapters_root / domain / version_name(number)
        cur = db.execute(
            "INSERT INTO versions (domain, number, state, parent_id, run_id, path, created_at)"
            " VALUES (?, ?, 'training', ?, ?, ?, ?)",
            [domain, number, parent_id, run_id, str(path), utcnow()],
        )
        version_id = cur.lastrowid
    return get(db, version_id)


def publish(version: Version, staging: Path, meta: dict[str, Any]) -> Path:
    """Write meta.json, fsync, rename the staging folder to the version's folder."""
    check_files(staging)
    (staging / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    for f in staging.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    final = Path(version.path)
    if final.exists():
        raise RegistryError(f"{final} already exists: refusing to overwrite a version")
    os.replace(staging, final)
    fsync_dir(final.parent)
    return final


def check_files(folder: Path) -> None:
    """A folder vLLM and peft can load: both files present, config JSON, safetensors header."""
    for name in FILES:
        if not (folder / name).is_file():
            raise RegistryError(f"{folder} is not a complete adapter: {name} is missing")
    weights = folder / "adapter_model.safetensors"
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        with weights.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n < 100_000_000:
                raise ValueError("bad safetensors header length")
            header = json.loads(fh.read(n))
        _check_tensors(header, weights.stat().st_size - 8 - n, int(config.get("r", 0)))
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise RegistryError(f"{folder} is not a valid adapter ({exc})") from exc
    if config.get("bias", "none") != "none" or config.get("use_dora"):
        raise RegistryError(f"{folder}: vLLM serves LoRA only with bias 'none' and no DoRA")


def _check_tensors(header: dict, data_bytes: int, rank: int) -> None:
    """From the safetensors header alone: the data is all there (a truncated copy is caught
    here, not by vLLM) and every LoRA matrix has the rank the config says."""
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        end = max(end, t["data_offsets"][1])
        shape = t["shape"]
        if ("lora_A" in name and shape[0] != rank) or ("lora_B" in name and shape[-1] != rank):
            raise ValueError(f"{name} has shape {shape}, not rank {rank} as adapter_config says")
    if end != data_bytes:
        raise ValueError(
            f"adapter_model.safetensors holds {data_bytes} bytes of tensor data, its header"
            f" describes {end}: the file is truncated or corrupt"
        )


def set_state(
    db: Database,
    version: Version,
    state: str,
    *,
    reason: str | None = None,
    metrics: dict[str, Any] | None = None,
    examples: int | None = None,
) -> Version:
    with write_transaction(db):  # a savepoint when the caller already holds a transaction
        db.execute(
            "UPDATE versions SET state = ?, reason = coalesce(?, reason),"
            " metrics = coalesce(?, metrics), examples = coalesce(?, examples) WHERE id = ?",
            [
                state,
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
    check_files(Path(version.path))
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


def abandon_unfinished(db: Database, adapters_root: Path) -> list[Version]:
    """At start (under the training lock): versions a crash left 'training' (their staging
    folders removed) or 'candidate' (published on disk, never recorded live) are rejected."""
    rows = db.execute(
        f"SELECT {_COLUMNS} FROM versions WHERE state IN ('training', 'candidate')"
    ).fetchall()
    out = []
    for row in rows:
        v = _version(db, row)
        shutil.rmtree(staging_dir(adapters_root, v.domain, v.number), ignore_errors=True)
        what = "training" if v.state == "training" else "publishing"
        out.append(set_state(db, v, "rejected", reason=f"{what} was interrupted"))
        log.warning("%s %s: %s was interrupted; marked rejected", v.domain, v.name, what)
    return out


def prune(db: Database, domain: str, keep_last: int) -> list[Path]:
    """Delete the folders of versions that are not live, not pinned and not among the last
    `keep_last`; their rows stay (history), with the reason."""
    versions = list_versions(db, domain)
    keep = {v.id for v in versions[-keep_last:]} if keep_last else set()
    removed = []
    for v in versions:
        if v.state in ("live", "training") or v.pinned or (v.id in keep and not v.forgotten):
            continue
        path = Path(v.path)
        if path.exists():
            shutil.rmtree(path)
            removed.append(path)
            db.execute(
                "UPDATE versions SET reason = ? WHERE id = ?",
                [f"{v.reason or v.state}; folder removed by retention", v.id],
            )
    db.conn.commit()
    return removed
