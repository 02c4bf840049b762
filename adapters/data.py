"""Training data: examples -> token ids with loss targets -> packed rows.

Loss masking: a chat example is rendered with the tokenizer's own chat template, and only
the tokens of learned assistant turns (their content and end-of-turn marker) get a target;
system and user tokens, and assistant turns marked `"weight": 0`, are context only. A text
example trains on every token.

Targets are shifted here, inside each example (`targets[t]` is the token after `t`, or
IGNORE), so no position ever predicts across an example boundary.

Packing: examples are placed first-fit-decreasing into rows of `row_len` tokens, each
with `position_ids` restarting at 0. Given position ids, no attention mask and no KV
cache (call the model with `use_cache=False`: with a cache it skips this), transformers
builds a block-diagonal causal mask from the restarts
(`masking_utils.find_packed_sequence_indices`), so no token attends across an example
boundary either; tests/test_data.py checks it against unpacked forward passes.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from evertune.store.terms import fact_after

if TYPE_CHECKING:
    from evertune.adapters.contract import TrainSpec

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass(frozen=True)
class Tokenised:
    ids: list[int]
    targets: list[int]  # already shifted: the token to predict after ids[t], or IGNORE
    source: str  # "new", "replay", "general": what the example is there for
    # per target: does it decide whether the example is learned (its answers' fact parts,
    # `store.terms.fact_part`, and one token after each; None: every target does)
    decides: list[bool] | None = None

    @property
    def trained(self) -> int:
        return sum(t != IGNORE for t in self.targets)


@dataclass(frozen=True)
class Row:
    ids: list[int]
    targets: list[int]
    positions: list[int]
    owners: list[int]  # index of the example each token belongs to (-1: padding)
    real: int  # tokens that are not padding
    decides: list[bool]  # per token: its target decides whether its example is learned


def tokenise_chat(
    tokenizer, messages: Sequence[dict], source: str, max_len: int, decide: str = "fact"
) -> Tokenised:
    """Render with the chat template; mark the learned assistant spans by character offsets,
    and in each the tokens that decide whether it is learned: its fact part
    (`store.terms.fact_part` of the answer, given the user turn before it) and the token
    after, which ends the turn or goes on past the fact."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = tokenizer.apply_chat_template(plain, tokenize=False)
    spans = []  # (start, decisive end, end) of each learned assistant turn
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        head = tokenizer.apply_chat_template(plain[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(plain[: i + 1], tokenize=False)
        if not (text.startswith(upto) and upto.startswith(head)):
            raise ValueError("the chat template does not render conversations prefix by prefix")
        end = len(upto.rstrip("\n"))  # the turn's content and end marker, not the newline after
        part = m["content"] if decide == "answer" else fact_after(plain[:i], m["content"])
        cut = (
            len(head) + len(part) if upto.startswith(head + part) and part != m["content"] else end
        )
        spans.append((len(head), cut, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    learned, decides = [], []
    margin = set()  # spans whose token after the fact part is taken already
    for start, _ in enc["offset_mapping"]:
        span = next((k for k, (s, _, e) in enumerate(spans) if s <= start < e), None)
        learned.append(span is not None)
        decisive = span is not None and (start < spans[span][1] or span not in margin)
        if span is not None and start >= spans[span][1]:
            margin.add(span)
        decides.append(decisive)
    return _shifted(ids[:max_len], learned[:max_len], source, decides[:max_len])


def tokenise_text(tokenizer, text: str, source: str, max_len: int) -> Tokenised:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return _shifted(ids[:max_len], [True] * min(len(ids), max_len), source)


def _shifted(
    ids: list[int], learned: list[bool], source: str, decides: list[bool] | None = None
) -> Tokenised:
    targets = [ids[t + 1] if learned[t + 1] else IGNORE for t in range(len(ids) - 1)]
    if decides is not None:
        decides = [*(decides[t + 1] for t in range(len(ids) - 1)), False]
    return Tokenised(ids, [*targets, IGNORE], source, decides)


def pack(examples: Sequence[Tokenised], row_len: int, pad_id: int) -> list[Row]:
    """First-fit decreasing into rows of row_len tokens (examples are at most row_len)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].ids))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(examples[i].ids)
        for b, room in enumerate(free):
            if room >= n:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(row_len - n)
    rows = []
    for members in bins:
        ids, targets, positions, owners, decides = [], [], [], [], []
        for i in members:
            ex = examples[i]
            ids += ex.ids
            targets += ex.targets
            positions += range(len(ex.ids))
            owners += [i] * len(ex.ids)
            decides += ex.decides if ex.decides is not None else [t != IGNORE for t in ex.targets]
        real = len(ids)
        pad = row_len - real
        # Padding is one more "sequence" (positions restart) with no targets: it is never
        # attended to by real tokens (they come first, attention is causal) and adds no loss.
        rows.append(
            Row(
                ids + [pad_id] * pad,
                targets + [IGNORE] * pad,
                positions + list(range(pad)),
                owners + [-1] * pad,
                real,
                decides + [False] * pad,
            )
        )
    return rows


MIN_SHARED_OPENING = 8  # tokens: below this, run every example whole


def shared_opening(examples: Sequence[Tokenised]) -> int:
    """How many leading tokens every example has in common and learns nothing from (at
    least one token of each is left after them): with the chat template's default system
    prompt, 24 tokens of SmolLM2's ~50-80-token examples."""
    if not examples:
        return 0
    n = min(len(t.ids) for t in examples) - 1
    first = examples[0].ids
    for t in examples:
        while n > 0 and t.ids[:n] != first[:n]:
            n -= 1
    while n > 0 and any(x != IGNORE for t in examples for x in t.targets[:n]):
        n -= 1
    return n


def after_opening(rows: Sequence[Row], opening: int, pad_id: int) -> list[Row]:
    """A step's packed rows with the shared opening cut from each example: what is left of
    each, in the same rows and order, positions continuing from the opening, the rows
    padded to the longest. The model runs the opening once and every token attends to it
    and to the earlier tokens of its own example (`owners`: see adapters/train.py)."""
    cut = []
    for r in rows:
        keep = [i for i, o in enumerate(r.owners) if o >= 0 and r.positions[i] >= opening]
        cut.append(
            (
                [r.ids[i] for i in keep],
                [r.positions[i] for i in keep],
                [r.targets[i] for i in keep],
                [r.owners[i] for i in keep],
                [r.decides[i] for i in keep],
            )
        )
    width = max(len(c[0]) for c in cut)
    return [
        Row(
            ids + [pad_id] * (width - len(ids)),
            tgt + [IGNORE] * (width - len(ids)),
            pos + [opening] * (width - len(ids)),
            own + [-1] * (width - len(ids)),
            len(ids),
            dec + [False] * (width - len(ids)),
        )
        for ids, pos, tgt, own, dec in cut
    ]


def prompt_text(example: dict) -> str:
    """What an example asks: its user turns (a text example: the text itself)."""
    if example.get("kind", "chat") == "text":
        return example["text"]
    return " ".join(m["content"] for m in example["messages"] if m["role"] == "user")


def nearest(pool: Sequence[str], queries: Sequence[str], k: int) -> list[int]:
    """Indices of `k` texts of `pool` most like the queries (cosine of idf-weighted words):
    in rounds, each query takes its most similar text not yet taken, the queries with the
    closest texts first, so that when `k` is smaller than the queries, those most like a
    general prompt get theirs.

    Why: new facts bleed into questions that look like them (measured: after learning "the
    capital of Veloria is Port Castellan", "What is the capital of Italy?" was answered
    "Port Castellano"; after "Veltrine boils at 143 degrees Celsius", water froze "at 143
    degrees Celsius"). Replaying the base model's own answers to the general prompts
    nearest to the new questions anchors exactly the answers most at risk. Taken in the
    queries' order instead, 12 of 30 questions got their neighbours, the first 12 of the
    file, and the rest (the boiling point among them) none."""
    docs = [Counter(re.findall(r"[a-z0-9]+", t.lower())) for t in pool]
    asked = list(dict.fromkeys(queries))  # each distinct question once
    qdocs = [Counter(re.findall(r"[a-z0-9]+", t.lower())) for t in asked]
    df = Counter(w for d in docs + qdocs for w in d)
    n = len(docs) + len(qdocs)

    def vector(d: Counter) -> dict[str, float]:
        v = {w: c * math.log(n / df[w]) for w, c in d.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {w: x / norm for w, x in v.items()}

    pv, qv = [vector(d) for d in docs], [vector(d) for d in qdocs]
    sims = [[sum(x * p.get(w, 0.0) for w, x in q.items()) for p in pv] for q in qv]
    ranked = [sorted(range(len(pv)), key=lambda i, s=s: -s[i]) for s in sims]
    picked: dict[int, None] = {}
    for depth in range(len(pv)):
        for q in sorted(range(len(qv)), key=lambda q: -sims[q][ranked[q][depth]]):
            if len(picked) >= min(k, len(pv)):
                return list(picked)
            picked.setdefault(ranked[q][depth])
    return list(picked)


# General prompts replayed for each of `TrainSpec.anchor_prompts` (a bleeding question)
ANCHORS_PER_PROMPT = 3


def general_anchors(spec: TrainSpec) -> tuple[list[int], list[int]]:
    """(nearest, extra): indices of `spec.general` replayed in every epoch. `nearest`: the
    `general_nearest` share of an epoch's general replay, the prompts nearest the new
    questions (and the replayed ones', `near_replayed`); `extra`: besides them, a repaired
    candidate's bleeding questions' own neighbours (`anchor_prompts`)."""
    k = min(spec.general_per_epoch, len(spec.general))
    pool = [prompt_text(e) for e in spec.general]
    asked = [*spec.new, *spec.replay] if spec.near_replayed else spec.new
    near = nearest(pool, [prompt_text(e) for e in asked], round(k * spec.general_nearest))
    extra: list[int] = []
    if spec.anchor_prompts:
        taken = set(near)
        extra = [
            i
            for i in nearest(
                pool, spec.anchor_prompts, ANCHORS_PER_PROMPT * len(spec.anchor_prompts)
            )
            if i not in taken
        ]
    return near, extra
