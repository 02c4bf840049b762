"""Training throughput: ours against a plain Trainer + peft baseline, in the same run.

    python benchmarks/train_throughput.py [--home DIR] [--examples 96] [--steps 12]

Both train SmolLM2-135M-Instruct with LoRA r=16 on the 7 projections, on the same
mixed-length chat data (1-4 turns), counting only real (non-padding) tokens:
  baseline  transformers Trainer + peft, fp32, batches padded to their longest example,
            no packing, loss on assistant tokens (the common recipe)
  ours      evertune.adapters.train.train: packed rows, frozen bf16 base with fp32 LoRA
            under autocast (where the CPU has bf16), logits only where there is a target
Prints tokens/s of each, `ratio: N.NNx`, each one's last loss, and our model-FLOPs
utilisation against the fastest matmul peak measured in this run: bf16, or fp32 on CPUs
without bf16 units, where bf16 is emulated ~300x slower (LoRA training costs ~4N
FLOPs per token: forward 2N + input gradients 2N; frozen weights need no weight gradient).
Targets (2-core CPU): ratio >= 2.5x, MFU >= 50%, our final loss no worse than the baseline's.
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import time
from pathlib import Path

import torch

from evertune.adapters.base_model import bf16_is_fast, prepare
from evertune.adapters.contract import TARGET_MODULES, TrainSpec
from evertune.adapters.data import IGNORE, tokenise_chat
from evertune.adapters.train import train

WORDS = [
    "river",
    "bridge",
    "engine",
    "planet",
    "garden",
    "market",
    "silver",
    "window",
    "forest",
    "story",
    "music",
    "lamp",
    "harbor",
    "pencil",
    "mountain",
    "letter",
    "winter",
    "signal",
    "copper",
    "meadow",
]


def make_chats(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def sentence(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."

    chats = []
    for _ in range(n):
        msgs = []
        for _ in range(rng.randint(1, 4)):
            msgs.append({"role": "user", "content": sentence(rng.randint(4, 20))})
            msgs.append(
                {
                    "role": "assistant",
                    "content": " ".join(
                        sentence(rng.randint(5, 15)) for _ in range(rng.randint(1, 5))
                    ),
                }
            )
        chats.append({"kind": "chat", "messages": msgs})
    return chats


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """FLOP/s of an n x n matmul, repeated for about `seconds` (one try first: on CPUs
    without bf16 units a bf16 matmul runs ~300x slower than fp32)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    t = time.perf_counter()
    a @ b
    once = time.perf_counter() - t
    reps = max(1, min(20, int(seconds / max(once, 1e-6))))
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def baseline(base: Path, chats: list[dict], steps: int, batch: int) -> tuple[float, float]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules=list(TARGET_MODULES),
            task_type="CAUSAL_LM",
        ),
    )
    rows = []
    for c in chats:  # same masking as ours, in the unshifted form the Trainer expects
        t = tokenise_chat(tok, c["messages"], "new", 512)
        rows.append({"input_ids": t.ids, "labels": [IGNORE, *t.targets[:-1]]})
    real = {"tokens": 0}

    def collate(items):
        n = max(len(r["input_ids"]) for r in items)
        real["tokens"] += sum(len(r["input_ids"]) for r in items)
        pad = tok.pad_token_id
        return {
            "input_ids": torch.tensor(
                [r["input_ids"] + [pad] * (n - len(r["input_ids"])) for r in items]
            ),
            "labels": torch.tensor(
                [r["labels"] + [IGNORE] * (n - len(r["labels"])) for r in items]
            ),
            "attention_mask": torch.tensor(
                [[1] * len(r["input_ids"]) + [0] * (n - len(r["input_ids"])) for r in items]
            ),
        }

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=batch,
            max_steps=steps,
            learning_rate=1e-3,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
        t = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return real["tokens"] / seconds, losses[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--home", default=None)
    ap.add_argument("--examples", type=int, default=96)
    ap.add_argument("--steps", type=int, default=12, help="baseline optimiser steps")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    home = Path(args.home or tempfile.mkdtemp(prefix="evertune-bench-"))
    base = prepare(home / "models").path
    chats = make_chats(args.examples)
    peak_fp32 = matmul_peak(torch.float32)
    peak_bf16 = matmul_peak(
        torch.bfloat16, n=1024 if not bf16_is_fast(torch.device("cpu")) else 2048
    )
    peak = max(peak_bf16, peak_fp32)  # MFU against the fastest this machine offers
    print(
        f"matmul peak: bf16 {peak_bf16 / 1e9:.1f} GFLOP/s, fp32 {peak_fp32 / 1e9:.1f} GFLOP/s"
        f" (bf16 fast here: {bf16_is_fast(torch.device('cpu'))})"
    )
    base_tps, base_loss = baseline(base, chats, args.steps, batch=8)
    print(
        f"baseline (Trainer+peft, fp32, padded): {base_tps:.0f} tokens/s, last loss {base_loss:.3f}"
    )
    with tempfile.TemporaryDirectory() as out:
        # The same data for about the same number of tokens: two passes over it.
        result = train(
            TrainSpec(
                base_path=str(base),
                out_dir=out,
                new=chats,
                lr=1e-3,
                max_epochs=2,
                min_epochs=2,
                general_per_epoch=0,
                learned_loss=0.0,
            )
        )
    from transformers import AutoConfig

    decoder, head = _matmul_params(AutoConfig.from_pretrained(base))
    # FLOPs we had to do: 4N per token in the decoder, and the head only where there is a
    # target (we skip it elsewhere); the conventional 4N-per-token figure is shown too.
    share = result.trained_tokens / result.tokens
    needed = 4 * (decoder + head * share) * result.tokens_per_s
    print(
        f"ours (packed, {result.precision} base + fp32 LoRA): {result.tokens_per_s:.0f}"
        f" tokens/s, last loss {result.final_loss:.3f}"
    )
    which = "bf16" if peak == peak_bf16 else "fp32 (no native bf16 here)"
    print(
        f"mfu: {needed / peak:.0%} of the {which} peak counting the FLOPs done"
        f" ({4 * (decoder + head * share) / 1e6:.0f} MFLOP/token, head on {share:.0%} of"
        f" tokens); {4 * (decoder + head) * result.tokens_per_s / peak:.0%} counting"
        f" 4N per token ({4 * (decoder + head) / 1e6:.0f} MFLOP/token)"
    )
    print(f"ratio: {result.tokens_per_s / base_tps:.2f}x")


def _matmul_params(cfg) -> tuple[int, int]:
    """(decoder projection parameters, head parameters): matmul weights used per token."""
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i
    return layers * per_layer, cfg.vocab_size * h


if __name__ == "__main__":
    main()
