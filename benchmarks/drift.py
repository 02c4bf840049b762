"""Does drift build up file after file? The files of benchmarks/continual_facts.json trained
one after the other, in this process (no daemon, no vLLM, no gate, no repair), each version
from the one before, as the daemon trains an increment: the file's examples new, a replay
sample of every older file's and a held-out slice left out (daemon/training/selection.py),
the base model's own answers to general prompts mixed in, and, when the version before
drifted to within `train.drifting_margin` of `gate.drift_tolerance`, more of them
(`train.general_when_drifting`), as daemon/training/cycle.py does.

    python benchmarks/drift.py --models DIR [--files 6] [--seed 0] ['{}' '{"lr": 5e-4}' ...]

Each argument is a variant: a JSON object of TrainSpec overrides for every file's training.
After each file, one JSON line: the variant, the file, the drift (the gate's figure: loss on
the base model's answers to the held-out general prompts, cut as training cuts them,
against the base model's own), the training steps, epochs and seconds, the new examples
learned, and per file so far its facts the version states when asked as written. Why: in
a 20-file run of the daemon (continual.py), drift rose -11%, -8%, -3%, then +9% at the
fourth file, whose repair reached +18% and was refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import continual as C

from evertune.adapters import evaluate as ev
from evertune.adapters.contract import TrainSpec
from evertune.adapters.train import train
from evertune.daemon.config_learning import GateConfig, TrainConfig
from evertune.daemon.training.selection import sample_old


def drift_of(base: str, adapter: str | None, chats: list, cut: int, base_loss: float | None):
    model, tok = ev.load(base, adapter) if adapter else ev.load(base)
    loss = ev.scores(model, tok, chats, cut).mean_loss
    return loss, (None if base_loss is None else loss / base_loss - 1)


def facts_known(base: str, adapter: str, files: list[list[dict]]) -> list[int]:
    """Per file, of its facts asked as written (each fact's `question`), how many the
    version's greedy answer states (the benchmark's `expected` words)."""
    model, tok = ev.load(base, adapter)
    asked = [[{"role": "user", "content": f["question"]}] for fs in files for f in fs]
    answers = iter(ev.greedy_answers_chat(model, tok, asked))
    return [sum(C.knows(next(answers), f["expected"]) for f in fs) for fs in files]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, required=True, help="a prepared models/ folder")
    ap.add_argument("--files", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("variants", nargs="*", default=["{}"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base, refs, general = C.in_process(args.models)
    t, g = TrainConfig(seed=args.seed), GateConfig()
    fields = t.spec_fields()
    held = [r.messages() for r in refs if r.held_out]
    base_loss, _ = drift_of(base, None, held, fields["general_max_len"], None)
    files = [C.chat_examples(fs) for fs in C.FILES[: args.files]]
    for text in args.variants:
        variant = json.loads(text)
        with tempfile.TemporaryDirectory() as work:
            parent, drift = None, None
            for k, new in enumerate(files, start=1):
                older = [(i, e) for fs in files[: k - 1] for i, e in enumerate(fs)]
                # the daemon's seed for run k of a domain: train.seed + the run's id
                replay, _ = sample_old(
                    older, len(new), t.replay_ratio, t.replay_min, g.old_holdout, args.seed + k
                )
                gpe = fields["general_per_epoch"]
                if drift is not None and drift > g.drift_tolerance - t.drifting_margin:
                    gpe = max(gpe, t.general_when_drifting)
                out = str(Path(work) / f"v{k}")
                spec = TrainSpec(
                    base_path=base,
                    out_dir=out,
                    parent_adapter=parent,
                    new=new,
                    replay=[e for _, e in replay],
                    general=general,
                    **{**t.spec_fields(increment=k > 1), "general_per_epoch": gpe, **variant},
                )
                t0 = time.time()
                r = train(spec)
                seconds = time.time() - t0
                _, drift = drift_of(base, out, held, fields["general_max_len"], base_loss)
                known = facts_known(base, out, C.FILES[:k])
                print(
                    json.dumps(
                        {
                            "variant": variant,
                            "seed": args.seed,
                            "file": k,
                            "drift": round(drift, 4),
                            "general_per_epoch": spec.general_per_epoch,
                            "steps": r.steps,
                            "epochs": r.epochs,
                            "seconds": round(seconds, 1),
                            "learned": r.learned,
                            "new": len(new),
                            "replayed": len(replay),
                            "facts_known": known,  # per file so far, of 10
                        }
                    ),
                    flush=True,
                )
                parent = out
    return 0


if __name__ == "__main__":
    sys.exit(main())
