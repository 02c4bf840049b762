"""Why an increment forgets older answers: file 2 of benchmarks/continual_facts.json trained
from a version that learned file 1, in this process (no daemon, no vLLM), per seed.

    python benchmarks/increment.py --models DIR --seeds 0 1 2 3 4 [--cache DIR] [--train JSON]
        ['{}' ...]

The first version (file 1 from the base model, the daemon's defaults and seed) is trained once
per seed and kept in --cache. The increment is trained as the daemon trains it (file 2 new,
older examples replayed, a held-out slice of them for the gate, the daemon's defaults), once
per variant: each argument is a JSON object of TrainSpec overrides, or of selection overrides
("holdout": N, "replay_ratio": R); `--train` sets [train] keys for both versions (use its
own --cache). Printed per held-out older example, one JSON line each: which fact, which
phrasing (its record format, answer style, system prompt), the live version's and the
increment's greedy answers, whether the gate counts it lost (its trained answer's fact part
no longer given) and whether the fact itself is still stated (the benchmark's `expected` words).
A JSON summary line per seed and variant follows, with the gate's other two checks an
increment fails: the easy general questions (answered whole, judged on the first sentence
against the base model's: lost, gained, the paired test's p) and bleed (a name or number of
the domain's examples in an easy answer), and both files' never-trained paraphrases
answered (file 2's by the increment; file 1's by the increment and by its parent). Greedy
answers: transformers, in-process.
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
from evertune.adapters.gate import short_qa, states_fact
from evertune.adapters.general_answers import bleeding, easy_change
from evertune.adapters.reference import is_right
from evertune.adapters.train import train
from evertune.daemon.config_learning import GateConfig, TrainConfig
from evertune.daemon.training.selection import sample_old

STYLES = ("terse", "sentence", "friendly")  # answers(fact)[0..2]


def describe(files: list[list[dict]]) -> list[dict]:
    """Per example of file 1 in order (as continual.records writes them): fact, phrasing."""
    out = []
    for i in range(len(files[0])):
        system = C.SYSTEMS[i // 2 % 2] if i % 2 else None
        # records(): messages (answer style 2), prompt/completion (style 1), conversations (3)
        out.append({"fact": i, "format": "messages", "style": STYLES[1], "system": system})
        out.append({"fact": i, "format": "prompt", "style": STYLES[0], "system": None})
        out.append({"fact": i, "format": "conversations", "style": STYLES[2], "system": None})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, required=True, help="a prepared models/ folder")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "increment-v1")
    ap.add_argument(
        "--train",
        default="{}",
        help="JSON of [train] settings for every version of the run (the first one too)",
    )
    ap.add_argument("variants", nargs="*", default=["{}"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base, refs, general = C.in_process(args.models)
    file1, file2 = (C.chat_examples(fs) for fs in C.FILES[:2])
    about = describe(C.FILES)
    base_model, tok = ev.load(base)
    held_general = [r for r in refs if r.held_out]
    easy = [r for r in held_general if r.expected]

    def easy_answers(model) -> list[str]:  # whole, as the gate asks vLLM for a candidate's
        return ev.greedy_answers_chat(
            model, tok, [[{"role": "user", "content": r.prompt}] for r in easy]
        )

    def right(answers: list[str]) -> list[bool]:
        return [
            is_right(ev.first_sentence_of(a), r.expected)
            for a, r in zip(answers, easy, strict=True)
        ]

    base_right = right(easy_answers(base_model))
    del base_model
    for seed in args.seeds:
        cfg = TrainConfig(seed=seed, **json.loads(args.train))
        fields = cfg.spec_fields()
        v1 = args.cache / f"seed{seed}"
        if not (v1 / "adapter_config.json").exists():
            v1.mkdir(parents=True, exist_ok=True)
            train(TrainSpec(base_path=base, out_dir=str(v1), new=file1, general=general, **fields))
        live, _ = ev.load(base, str(v1))
        live_para, _ = C.paraphrased(live, tok, C.FILES[0])
        for text in args.variants:
            v = json.loads(text)
            holdout = v.pop("holdout", GateConfig().old_holdout)
            ratio = v.pop("replay_ratio", cfg.replay_ratio)
            old = list(enumerate(file1))
            # the daemon's seed for the second run of a domain: train.seed + runs so far
            replay, held = sample_old(old, len(file2), ratio, cfg.replay_min, holdout, seed + 2)
            held_qa = short_qa([e for _, e in held])
            with tempfile.TemporaryDirectory() as out:
                spec = TrainSpec(
                    base_path=base,
                    out_dir=out,
                    new=file2,
                    replay=[e for _, e in replay],
                    general=general,
                    **{"parent_adapter": str(v1), **cfg.spec_fields(increment=True), **v},
                )
                t = time.time()
                r = train(spec)
                train_s = time.time() - t
                cand, _ = ev.load(base, out)
                prompts = [list(p) for p, _ in held_qa]
                got_live = ev.greedy_answers_chat(live, tok, prompts)
                got_cand = ev.greedy_answers_chat(cand, tok, prompts)
                whole = easy_answers(cand)
                para = {k: C.paraphrased(cand, tok, C.FILES[k]) for k in (0, 1)}
            lost_easy, gained_easy, p_easy = easy_change(base_right, right(whole))
            bled = bleeding(
                [*file2, *(e for _, e in replay), *(e for _, e in held)], held_general, easy, whole
            )
            lost = gate_lost = stated = 0
            for (i, _), (prompt, expected), a_live, a_cand in zip(
                held, held_qa, got_live, got_cand, strict=True
            ):
                fact = C.FILES[0][about[i]["fact"]]
                row = {
                    "seed": seed,
                    "example": i,
                    **about[i],
                    "expected": expected,
                    "live": a_live,
                    "increment": a_cand,
                    "lost": ev.matches(a_live, expected) and not ev.matches(a_cand, expected),
                    # the gate's rule: the names and numbers of the fact part still stated
                    "gate_lost": states_fact(a_live, prompt, expected)
                    and not states_fact(a_cand, prompt, expected),
                    "fact_stated": C.knows(a_cand, fact["expected"]),
                    "sibling_replayed": sum(
                        about[j]["fact"] == about[i]["fact"] for j, _ in replay
                    ),
                }
                lost += row["lost"]
                gate_lost += row["gate_lost"]
                stated += row["fact_stated"]
                print(json.dumps(row), flush=True)
            print(
                json.dumps(
                    {
                        "seed": seed,
                        "variant": v,
                        "holdout": holdout,
                        "replay_ratio": ratio,
                        # the never-trained rewordings of each file's facts, the increment's
                        # (file 1's: the live version answered them too, live_paraphrased)
                        "paraphrased": "{}/{}".format(*para[1]),
                        "old_paraphrased": "{}/{}".format(*para[0]),
                        "live_paraphrased": live_para,
                        "held": len(held),
                        "replayed": len(replay),
                        "lost": lost,
                        "gate_lost": gate_lost,
                        "fact_stated": stated,
                        "easy_lost": lost_easy,
                        "easy_gained": gained_easy,
                        "easy_p": round(p_easy, 4),
                        "bleed": [(b["prompt"], b["terms"]) for b in bled],
                        "train_s": round(train_s, 1),
                        "epochs": r.epochs,
                        "history": r.history,
                    }
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
