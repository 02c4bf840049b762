"""Training variants on one file of benchmarks/continual_facts.json, in this process, from the
base model (no daemon, no vLLM): how long training takes and what the result knows.

    python benchmarks/variants.py --models DIR --file K '{"lr": 0.002}' '{}' ...

Each argument is a JSON object of TrainSpec overrides. Printed per variant: training seconds,
epochs, steps, tokens/s and the per-epoch history; the gate's measurements of the candidate
(new answers reproduced, drift against the base model, easy answers lost/gained, how many
greedy answers the loss pass verified); the file's facts asked as trained and in its
never-trained paraphrases (greedy, transformers). The base model's side is measured once and
kept in --cache. A quick look for choosing defaults; benchmarks/continual.py is the measure.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import continual as C

from evertune.adapters import evaluate as ev
from evertune.adapters.gate import BASE, measure
from evertune.adapters.train import TrainSpec, train


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, required=True, help="a prepared models/ folder")
    ap.add_argument("--file", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "variants-base.pkl")
    ap.add_argument("variants", nargs="*", default=["{}"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base, refs, general = C.in_process(args.models)
    held = [r for r in refs if r.held_out]
    facts = C.FILES[args.file - 1]
    new = C.chat_examples(facts)
    if args.cache.exists():
        b = pickle.loads(args.cache.read_bytes())
    else:
        model, tok = ev.load(base)
        b = measure(model, tok, [], [], held, BASE)
        args.cache.write_bytes(pickle.dumps(b))
    _, tok = ev.load(base)
    for text in args.variants:
        v = json.loads(text)
        with tempfile.TemporaryDirectory() as out:
            spec = TrainSpec(base_path=base, out_dir=out, new=new, general=general, **v)
            t = time.time()
            r = train(spec)
            train_s = time.time() - t
            m, _ = ev.load(base, out)
            c = measure(m, tok, new, [], held)
            para, asked = C.paraphrased(m, tok, facts)
            got = ev.greedy_answers(m, tok, [f["question"] for f in facts])
            exact = sum(C.knows(a, f["expected"]) for a, f in zip(got, facts, strict=True))
        lost = sum(x and not y for x, y in zip(b["easy"], c["easy"], strict=True))
        gained = sum(y and not x for x, y in zip(b["easy"], c["easy"], strict=True))
        print(
            json.dumps(
                {
                    "variant": v,
                    "train_s": round(train_s, 1),
                    "epochs": r.epochs,
                    "steps": r.steps,
                    "tokens_per_s": round(r.tokens_per_s),
                    "history": r.history,
                    "new_exact": c["new_exact"],
                    "asked_exact": f"{exact}/{len(facts)}",
                    "paraphrased": f"{para}/{asked}",
                    "drift": round(c["general_loss"] / b["general_loss"] - 1, 4),
                    "easy_lost": lost,
                    "easy_gained": gained,
                    "greedy": c["greedy"],
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
