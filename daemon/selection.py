"""What a training run trains on: the new examples, a replay sample of older ones, a
held-out slice of older ones for the gate, and the older answers a new one replaces."""

from __future__ import annotations

import json
import random

from sqlite_utils import Database

from evertune.adapters.errors import NothingToTrain
from evertune.store import examples


def select_examples(
    db: Database,
    domain: str,
    replay_ratio: float,
    replay_min: int,
    old_holdout: int,
    seed: int,
    force: bool,
    from_base: bool = False,
) -> tuple[list, list, list, list]:
    """(new, replay, held-out old, every old not held out) as (id, example dict) lists.
    `from_base`: a rebuild, every current example new (trained on and checked by the gate)."""

    def rows(which: str) -> list[tuple[int, dict]]:
        return [(i, _example(kind, body)) for i, kind, body in examples.rows(db, domain, which)]

    # superseded examples (a newer answer to the same prompt) are never trained, replayed
    # or held out again
    new, old = rows("untrained"), rows("trained")
    if from_base:
        new, old = rows("current"), []
    if not new and force:
        new, old = old, []  # --force with nothing new: train again on everything
    if not new:
        raise NothingToTrain(
            f"{domain} has no example that no version was trained on yet;"
            " drop new files or use --force"
        )
    replay, held = sample_old(old, len(new), replay_ratio, replay_min, old_holdout, seed)
    held_ids = {i for i, _ in held}
    return new, replay, held, [(i, e) for i, e in old if i not in held_ids]


def replaced_answers(db: Database, domain: str, new_ids: list[int]) -> list[dict]:
    """{"prompt", "old"} for each new example whose prompt had other answers that a version
    was trained on: the answers the candidate must no longer give."""
    olds: dict[int, list[str]] = {}
    for i, body in examples.learned_answers_replaced(db, domain, new_ids):
        olds.setdefault(i, []).append(_answer_of(_example("chat", body)))
    out = []
    for i, body in examples.bodies(db, sorted(olds)):
        msgs = json.loads(body)
        old = [a for a in olds[i] if a != msgs[-1]["content"]]
        if old and msgs[-1]["role"] == "assistant":  # as gate.short_qa asks it
            out.append({"prompt": msgs[:-1], "old": old})
    return out


def sample_old(
    old: list, n_new: int, replay_ratio: float, replay_min: int, old_holdout: int, seed: int
) -> tuple[list, list]:
    """(replay, held-out) of the older `(id, example)` pairs."""
    old = list(old)
    random.Random(seed).shuffle(old)
    # Hold out at most a quarter: with little old data, replay matters more. The caller
    # varies the seed per run, so no example is held out (never replayed) every time.
    n_held = min(old_holdout, len(old) // 4)
    held, rest = old[:n_held], old[n_held:]
    k = min(len(rest), max(replay_min, round(n_new * replay_ratio)))
    return spread(rest, k), held


def spread(examples: list, k: int) -> list:
    """`k` of `examples` (already shuffled), taking every answer once before any twice.

    Why: a file teaches each fact in several phrasings (same answer). A random replay
    sample of 15 of 23 older examples left some facts with no phrasing replayed, and the
    measured result was a version that forgot 2 of 7 held-out older answers; one phrasing
    per fact keeps every fact at the same cost."""
    groups: dict[str, list] = {}
    for item in examples:
        groups.setdefault(_answer_of(item[1]), []).append(item)
    ordered = [
        g[depth] for depth in range(len(examples)) for g in groups.values() if depth < len(g)
    ]
    return ordered[:k]


def _answer_of(example: dict) -> str:
    if example["kind"] == "text":
        return example["text"]
    return next(
        (m["content"] for m in reversed(example["messages"]) if m["role"] == "assistant"), ""
    )


def _example(kind: str, body: str) -> dict:
    if kind == "text":
        return {"kind": "text", "text": body}
    return {"kind": "chat", "messages": json.loads(body)}
