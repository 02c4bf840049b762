"""Does the adapter learn new facts without forgetting how to answer everything else?

    python benchmarks/learning.py [--home DIR] [--methods naive,ours] [--facts FILE]

Trains the bundled SmolLM2-135M-Instruct on ten fictional facts (three phrasings each, 30
examples) with each method, in this process, one after the other, then measures:
  facts        greedy answers to the trained questions that contain the fact
  paraphrased  the same for a question phrased differently from every training example
  drift        rise of the per-token loss on the base model's own answers to the held-out
               general reference prompts (0% = answers exactly as likely as the base's)
  easy         easy general questions (capital of France, ...) answered right (base: n/24)
  train s      wall-clock seconds of training
Methods: `naive` (the baseline of ARCHITECTURE.md, "Platform facts": 8 epochs at lr 1e-3,
no general replay, no early stop) and `ours` (the defaults of
evertune.adapters.train.TrainSpec). Extra methods: `--set key=value` overrides a TrainSpec
field for `ours`.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from evertune.adapters import evaluate as ev
from evertune.adapters.base_model import prepare
from evertune.adapters.reference import is_right, load_or_build
from evertune.adapters.train import TrainSpec, train

HERE = Path(__file__).resolve().parent


def fact_examples(facts: list[dict]) -> list[dict]:
    return [
        {
            "kind": "chat",
            "messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": f["answer"]},
            ],
        }
        for f in facts
        for q in [f["question"], *f["rephrasings"]]
    ]


def measure(base: str, adapter: str | None, facts: list[dict], refs) -> dict:
    model, tok = ev.load(base, adapter)
    held = [r for r in refs if r.held_out]
    easy = [r for r in held if r.expected]
    qs = [f["question"] for f in facts] + [f["paraphrase"] for f in facts]
    answers = ev.greedy_answers(model, tok, qs + [r.prompt for r in easy])
    n = len(facts)
    got = [ev.matches(a, f["expected"]) for a, f in zip(answers[:n], facts, strict=True)]
    para = [ev.matches(a, f["expected"]) for a, f in zip(answers[n : 2 * n], facts, strict=True)]
    right = [is_right(a, r.expected) for a, r in zip(answers[2 * n :], easy, strict=True)]
    loss = ev.mean_loss(model, tok, [r.messages() for r in held])
    return {
        "facts": sum(got),
        "paraphrased": sum(para),
        "easy": sum(right),
        "loss": loss,
        "answers": dict(
            zip(
                qs[:n] + [r.prompt for r in easy][:6],
                answers[:n] + answers[2 * n : 2 * n + 6],
                strict=True,
            )
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--home", default=None, help="evertune home holding models/ (default: temp)")
    ap.add_argument("--methods", default="naive,ours")
    ap.add_argument("--facts", default=str(HERE.parent / "tests" / "data" / "facts.json"))
    ap.add_argument("--set", action="append", default=[], help="TrainSpec override for ours")
    ap.add_argument("--show", action="store_true", help="print the answers too")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    home = Path(args.home or tempfile.mkdtemp(prefix="evertune-learning-"))
    base = prepare(home / "models")
    refs = load_or_build(base.path)
    facts = json.loads(Path(args.facts).read_text())
    general = [{"kind": "chat", "messages": r.messages()} for r in refs if not r.held_out]
    before = measure(str(base.path), None, facts, refs)
    print(
        f"base model: facts {before['facts']}/10, paraphrased {before['paraphrased']}/10,"
        f" easy {before['easy']}/{sum(1 for r in refs if r.held_out and r.expected)},"
        f" held-out general loss {before['loss']:.4f}"
    )
    print(
        f"{'method':40s} {'facts':>6s} {'para':>6s} {'drift':>8s} {'easy':>5s} {'train s':>8s}"
        f" {'epochs':>6s} {'tok/s':>6s}"
    )
    overrides = dict(kv.split("=", 1) for kv in args.set)
    fields = TrainSpec.__dataclass_fields__
    typed = {k: type(fields[k].default)(v) for k, v in overrides.items()}
    for method in args.methods.split(","):
        with tempfile.TemporaryDirectory() as out:
            if method == "naive":
                spec = TrainSpec(
                    base_path=str(base.path),
                    out_dir=out,
                    new=fact_examples(facts),
                    general=[],
                    max_epochs=8,
                    min_epochs=8,
                    lr=1e-3,
                    # the same batch geometry as `ours` when --set gives one
                    **{k: v for k, v in typed.items() if k in ("row_len", "rows_per_step")},
                )
            else:
                spec = TrainSpec(
                    base_path=str(base.path),
                    out_dir=out,
                    new=fact_examples(facts),
                    general=general,
                    **typed,
                )
            t = time.perf_counter()
            result = train(spec)
            seconds = time.perf_counter() - t
            after = measure(str(base.path), out, facts, refs)
        drift = after["loss"] / before["loss"] - 1
        name = method if method == "naive" else f"{method} {' '.join(args.set)}".strip()
        n_easy = len([r for r in refs if r.held_out and r.expected])
        print(
            f"{name[:40]:40s} {after['facts']:>4d}/10 {after['paraphrased']:>4d}/10"
            f" {drift:>+7.0%} {after['easy']:>3d}/{n_easy}"
            f" {seconds:>8.1f} {result.epochs:>6d} {result.tokens_per_s:>6.0f}",
            flush=True,
        )
        if args.show:
            for q, a in after["answers"].items():
                print(f"    {q[:50]!r} -> {a[:80]!r}")


if __name__ == "__main__":
    main()
