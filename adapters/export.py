"""A version out of the service: its adapter folder as it is, or merged into the base model.

    export_version(version_dir, out, merged=False) -> dict (what was written)

Merged: the base model the version was trained on (its meta.json says which) with the LoRA
weights added into it, saved as a plain Hugging Face model folder (safetensors, config,
tokenizer with its chat template), for runtimes without LoRA. Merged in fp32, as the base
model is stored; the merged model answers as the base model with the adapter.

The output folder appears complete or not at all: written beside it, then renamed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from evertune.adapters import registry
from evertune.store.errors import RegistryError
from evertune.store.layout import fsync_dir, fsync_tree

MARKER = "evertune-export.json"


def base_of(version_dir: Path) -> Path:
    """The base model folder a version was trained on, from its meta.json."""
    try:
        meta = json.loads((version_dir / registry.META).read_text())
        return Path(meta["train"]["base_path"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RegistryError(
            f"{version_dir / registry.META} does not name the base model it was trained on"
            f" ({exc}); export it without --merged"
        ) from None


def export_version(version_dir: Path, out: Path, merged: bool = False) -> dict[str, Any]:
    registry.check_files(version_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty folder")
    base = base_of(version_dir) if merged else None
    if base is not None and not (base / "config.json").exists():
        raise RegistryError(f"the base model {base} of {version_dir} is not there any more")
    tmp = out.with_name(f".{out.name}.part-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if merged:
            _merge(version_dir, base, tmp)
        else:
            shutil.copytree(version_dir, tmp)
        info = {
            "version": str(version_dir),
            "merged": merged,
            "base_model": str(base) if base else None,
        }
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        fsync_tree(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _merge(version_dir: Path, base: Path, into: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(version_dir)).merge_and_unload()
    model.save_pretrained(into, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(into)
