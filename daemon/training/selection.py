"""What a training run trains on: the new examples, a replay sample of older ones, a
held-out slice of older ones for the gate, and the older answers a new one replaces."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from sqlite_utils import Database

from evertune.adapters.errors import NothingToTrain
from evertune.store import examples
from evertune.store.terms import key_terms


@dataclass
class Picked:
    """What a run trains on and checks, as (example id, example dict) lists."""

    new: list
    replay: list
    held: list  # older examples held out of training, for the gate
    every_old: list  # every older example not held out (the repair's pool)


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


def repair_sample(replay: list, held: list, every_old: list, seed: int) -> tuple[list, list]:
    """(replay, held-out) for a repaired increment: the held-out slice joins the replay, and
    as many older examples that neither trained on are held out instead (none where the
    replay already covers every older example)."""
    used = {i for i, _ in replay} | {i for i, _ in held}
    rest = [p for p in every_old if p[0] not in used]
    random.Random(seed).shuffle(rest)
    return replay + held, rest[: len(held)]


def sample_old(
    old: list, n_new: int, replay_ratio: float, replay_min: int, old_holdout: int, seed: int
) -> tuple[list, list]:
    """(replay, held-out) of the older `(id, example)` pairs."""
    old = list(old)
    random.Random(seed).shuffle(old)
    # Hold out at most a quarter: with little old data, replay matters more. The caller
    # varies the seed per run, so no example is held out (never replayed) every time.
    held, rest = hold_out(old, min(old_holdout, len(old) // 4))
    k = min(len(rest), max(replay_min, round(n_new * replay_ratio)))
    return spread(rest, k), held


def hold_out(examples: list, n: int) -> tuple[list, list]:
    """(held-out, the rest): `n` of `examples` (already shuffled), never every phrasing of a
    fact (see `facts`) that has several.

    Why: the held-out slice stands for the older examples an increment does not replay, to
    measure what it forgets of them. In a small domain the replay covers everything else,
    and a fact whose every phrasing was held out is the one fact the increment never sees:
    measured (benchmarks/increment.py), three of seven held-out examples were the three
    phrasings of one fact, and all three were overwritten by a new fact of the same kind
    (a parrot named Pomfritz became Crumpet, a new file's badger)."""
    group = facts(examples)
    size: dict[int, int] = {}
    for g in group:
        size[g] = size.get(g, 0) + 1
    taken: dict[int, int] = {}
    held, rest = [], []
    for item, g in zip(examples, group, strict=True):
        if len(held) < n and (size[g] == 1 or taken.get(g, 0) + 1 < size[g]):
            taken[g] = taken.get(g, 0) + 1
            held.append(item)
        else:
            rest.append(item)
    return held, rest


def spread(examples: list, k: int) -> list:
    """`k` of `examples` (already shuffled), taking a phrasing of every fact once before any
    twice (see `facts`).

    Why: a file teaches each fact in several phrasings. A random replay sample of 15 of 23
    older examples left some facts with no phrasing replayed, and the measured result was a
    version that forgot 2 of 7 held-out older answers; one phrasing per fact keeps every
    fact at the same cost."""
    groups: dict[int, list] = {}
    for item, g in zip(examples, facts(examples), strict=True):
        groups.setdefault(g, []).append(item)
    ordered = [
        g[depth] for depth in range(len(examples)) for g in groups.values() if depth < len(g)
    ]
    return ordered[:k]


MAX_TERM_EXAMPLES = 8  # a term in more examples than this names no single fact


def facts(examples: list) -> list[int]:
    """A fact number per `(id, example)`: examples whose answers share a name or a number
    (a capitalised word that does not start sentences, or a word with a digit) teach the
    same fact, as a file's phrasings do ("Pomfritz.", "The ship's parrot is named
    Pomfritz.", "The parrot is named Pomfritz, and ..."); an answer without one is a fact
    of its own, shared only by the same answer. A term in more than MAX_TERM_EXAMPLES
    examples (a product name in every answer) links nothing. Two facts that share a name
    are joined (measured on the 200 facts of benchmarks/continual_facts.json: 206 groups,
    20 of them joining more than one fact; a phrasing that names nothing its siblings do
    stays apart)."""
    terms = [key_terms(_answer_of(e)) for _, e in examples]
    count: dict[str, int] = {}
    for ts in terms:
        for t in ts:
            count[t] = count.get(t, 0) + 1
    parent = list(range(len(examples)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, ts in enumerate(terms):
        keys = [t for t in ts if count[t] <= MAX_TERM_EXAMPLES] or [
            "answer:" + " ".join(_answer_of(examples[i][1]).lower().split())
        ]
        for t in keys:
            if t in first:
                parent[root(i)] = root(first[t])
            else:
                first[t] = i
    return [root(i) for i in range(len(examples))]


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
