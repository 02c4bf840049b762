"""The versioned adapter registry: `adapters/<domain>/vNNNN/` folders plus their state in SQLite.

The folder is the artifact (adapter_model.safetensors, adapter_config.json, meta.json);
the database says which version is what (`evertune.store.versions`: training -> candidate
-> live -> retired, or rejected; every statement about versions is there). A version is
trained into a hidden staging folder beside its final place and renamed into place after
an fsync, so a crash never leaves a half version visible.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from evertune.store import versions
from evertune.store.errors import RegistryError
from evertune.store.layout import fsync_dir, fsync_tree
from evertune.store.versions import Version, version_name

log = logging.getLogger(__name__)

FILES = ("adapter_model.safetensors", "adapter_config.json")
META = "meta.json"


def staging_dir(adapters_root: Path, domain: str, number: int) -> Path:
    return adapters_root / domain / f".{version_name(number)}.staging"


def begin(
    db: Database,
    adapters_root: Path,
    domain: str,
    run_id: int | None,
    parent_id: int | None,
    from_base: bool | None = None,
) -> Version:
    """Reserve the next number for a training run (state 'training'); `from_base`: it
    trains from the base model's weights (a first version, a rebuild), not its parent's."""
    return versions.reserve(
        db,
        domain,
        run_id,
        parent_id,
        lambda n: adapters_root / domain / version_name(n),
        from_base,
    )


def publish(version: Version, staging: Path, meta: dict[str, Any]) -> Path:
    """Write meta.json, fsync, rename the staging folder to the version's folder."""
    check_files(staging)
    (staging / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    fsync_tree(staging)
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


def promote(db: Database, version: Version, reason: str = "promoted") -> Version:
    """Make `version` (its folder checked) the domain's one live version."""
    if version.state in ("candidate", "retired"):
        check_files(Path(version.path))
    return versions.promote(db, version, reason)


def abandon_unfinished(db: Database, adapters_root: Path) -> list[Version]:
    """At start (under the training lock): versions a crash left 'training' (their staging
    folders removed) or 'candidate' (published on disk, never recorded live) are rejected."""
    out = []
    for v in versions.unfinished(db):
        shutil.rmtree(staging_dir(adapters_root, v.domain, v.number), ignore_errors=True)
        what = "training" if v.state == "training" else "publishing"
        out.append(versions.reject(db, v, "interrupted", f"{what} was interrupted"))
        log.warning("%s %s: %s was interrupted; marked rejected", v.domain, v.name, what)
    return out


def prune(db: Database, domain: str, keep_last: int) -> list[Path]:
    """Delete the folders of versions that are not live, not pinned and not among the last
    `keep_last`; their rows stay (history), with the reason."""
    every = versions.list_versions(db, domain)
    keep = {v.id for v in every[-keep_last:]} if keep_last else set()
    removed = []
    for v in every:
        if v.state in ("live", "training") or v.pinned or (v.id in keep and not v.forgotten):
            continue
        path = Path(v.path)
        if path.exists():
            shutil.rmtree(path)
            removed.append(path)
            versions.note_folder_removed(db, v)
    return removed
