"""The evaluation gate: is the candidate better than the live version, and still itself?

Runs in the training child (the daemon stays light). Four questions, each a metric:

1. learned: greedy answers to the new examples' questions contain the trained answer's
   fact part (`store.terms.fact_part`: up to the end of the clause stating what the
   question did not; short answers only; new examples are all trained on, never
   withheld: a withheld fact would never be served), and the candidate's loss on them
   is below the live version's;
2. old knowledge: of the held-out older short answers the live version gives, the
   candidate loses at most `old_tolerance` (and one): an answer is kept when it still
   states the fact (`states_fact`: the names and numbers its question did not, in any
   wording); for older examples without short
   answers, their loss does not rise by more than `old_tolerance` and OLD_SLACK nats;
3. drift: loss on the base model's own answers to held-out general prompts does not rise
   by more than `drift_tolerance` against the base model;
4. easy questions: the candidate is not significantly worse than the base model at easy
   general questions with a known answer. Greedy strings of a 135M model flip both ways
   under any small change (measured: a harmless candidate lost 3 and gained 4 of 24), so
   a count of lost answers refuses useful versions by chance. The check is a paired exact
   test on the questions whose verdict changed (McNemar): refuse when losing `lost` of the
   `lost + gained` changed answers is unlikely (< `easy_alpha`) for a model that is no
   worse than the base. A model that forgot how to answer loses many and gains none.

Version 1 is compared with the base model as its "live" version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from evertune.adapters.general_answers import bleeding, easy_change
from evertune.adapters.reference import Reference, is_right
from evertune.store.knowledge import covers
from evertune.store.terms import fact_after, key_terms, words

log = logging.getLogger("evertune.adapters.gate")
SHORT_ANSWER_CHARS = 200
OLD_SLACK = 0.25  # nats per token: a forgotten answer costs ~1, a kept one under 0.1


@dataclass(frozen=True)
class GateThresholds:
    """Defaults from benchmarks/learning.py on SmolLM2-135M (10 facts, 30 examples): naive
    training drifted +104% and lost 5 of 15 easy answers; ours drifted -27% and lost 1."""

    min_learned: float = 0.8
    # of the new answers that replace an answer a version learned, at most this share may
    # still be the old answer (a candidate that gives it has not learned the change)
    max_stale: float = 0.10
    old_tolerance: float = 0.10
    drift_tolerance: float = 0.10
    easy_alpha: float = 0.05
    # of the held-out questions about the documents this version learned (store.knowledge),
    # the share its answers must cover: below it the document is not "learned"
    min_doc_answered: float = 0.5
    # easy general answers that may state a name or number only the domain's examples have
    max_bleed: int = 0


@dataclass
class GateResult:
    promote: bool
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_short_qa(example: dict) -> bool:
    """A chat example ending in a short, trained answer: its greedy answer can be checked."""
    msgs = example.get("messages")
    if example.get("kind", "chat") != "chat" or not msgs or msgs[-1]["role"] != "assistant":
        return False
    return len(msgs[-1]["content"]) <= SHORT_ANSWER_CHARS and msgs[-1].get("weight", 1) != 0


def short_qa(examples: list[dict]) -> list[tuple[list[dict], str]]:
    """(prompt messages, expected answer) for chat examples ending in a short answer: the
    answer's fact part (`store.terms.fact_part`), which a greedy answer must contain."""
    return [
        (ex["messages"][:-1], fact_after(ex["messages"][:-1], ex["messages"][-1]["content"]))
        for ex in examples
        if is_short_qa(ex)
    ]


def states_fact(answer: str, prompt: Sequence[dict], fact: str) -> bool:
    """The answer states the fact of an older example: the names and numbers of its fact
    part that its question did not (every one), or, where it has none, the whole fact part.

    Why: an older fact is known when a client asking gets it, in whichever of the domain's
    answer styles ("386 rooms." or "The Gallowmere Hotel has 386 rooms."); judged by the
    whole fact part, a change of style counted as a forgotten answer."""
    asked = {w for m in prompt if m["role"] == "user" for w in words(m["content"])}
    keys = key_terms(fact) - asked
    if not keys:
        from evertune.adapters.evaluate import matches

        return matches(answer, fact)
    return keys <= words(answer)


def fact_targets(tokenizer, example: dict) -> int | None:
    """Target tokens that decide a one-answer chat example's fact part (its tokens and two
    more, as `first_sentence_targets`); None: every target decides (several answers, or an
    answer that is all fact)."""
    msgs = example["messages"]
    if sum(m["role"] == "assistant" and m.get("weight", 1) != 0 for m in msgs) != 1:
        return None
    part = fact_after(msgs[:-1], msgs[-1]["content"])
    if part == msgs[-1]["content"]:
        return None
    return len(tokenizer(part, add_special_tokens=False)["input_ids"]) + 2


def first_sentence_targets(tokenizer, answer: str) -> int:
    """Target tokens that decide an answer's first sentence: its tokens and two more (the
    one after it, which may end the turn or start the next sentence, and one for a token
    boundary that falls differently inside the chat template). Erring long only means one
    more generation."""
    from evertune.adapters.evaluate import first_sentence_of

    return len(tokenizer(first_sentence_of(answer), add_special_tokens=False)["input_ids"]) + 2


ALL = frozenset({"new", "exact", "old", "general", "easy"})
# What `decide` reads of each model: the candidate everything; the live version its loss on
# new and old examples; the base model its general loss and easy answers. Measuring no
# more than that keeps evaluation short (it is part of the time to serve a dropped file).
LIVE, BASE = frozenset({"new", "old"}), frozenset({"general", "easy"})
BASE_KEYS = ("general_loss", "easy", "easy_right", "easy_total")  # what BASE measures


# answer(conversations, first_sentence) -> greedy answers: the model in this process, or
# the same weights on a vLLM server (evertune.adapters.remote).
Answer = Callable[[list[list[dict]], bool], list[str]]


def measure(
    model,
    tokenizer,
    new: list[dict],
    old: list[dict],
    general: list[Reference],
    parts: frozenset[str] = ALL,
    answer: Answer | None = None,
    general_max_len: int = 1024,
    changed: Sequence[dict] = (),
    doc_checks: Sequence[dict] = (),
    whole_easy: bool = False,
    replayed: Sequence[dict] = (),
) -> dict[str, Any]:
    """Metrics of one model (the adapter as loaded; `ev.adapter_off` gives the base);
    metrics not in `parts` are None. Losses are computed on `model`; greedy answers by
    `answer` when given (the same weights served by vLLM), else by `model`. `changed`:
    {"prompt": messages, "old": [answers]} for new examples that replace older answers.
    `doc_checks`: {"question", "answer"} held out of a document's derived examples: the
    share of them answered (store.knowledge.covers) is `doc_answered`. `whole_easy`: every
    easy answer made whole by `answer` (none taken from the loss pass), judged on its first
    sentence, searched whole for bleed: what clients get from a served candidate.
    `replayed`: the domain's older examples the candidate trained on; their names, with the
    new and the held-out older ones', are what counts as bleed."""
    from evertune.adapters import evaluate as ev  # torch: only in the training child

    if answer is None:

        def answer(prompts: list[list[dict]], first_sentence: bool) -> list[str]:
            return ev.greedy_answers_chat(model, tokenizer, prompts, first_sentence=first_sentence)

    out: dict[str, Any] = dict.fromkeys(
        ("new_loss", "new_exact", "old_loss", "general_loss", "easy_right", "easy_total")
    )
    out["easy"] = None  # per easy question: answered right (the paired test needs which)
    out["stale"] = out["changed"] = None  # changed prompts still answered the old way, of
    out["old_right"] = None  # per held-out older short answer: its fact still stated
    out["bleed"] = None  # easy answers stating a name only the domain's examples have
    spent: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(part: str) -> Iterator[None]:
        t0 = time.monotonic()
        yield
        spent[part] = round(time.monotonic() - t0, 2)

    # Greedy answers are verified by the losses' forward pass where it can tell (the answer's
    # tokens are each the argmax by a margin: greedy decoding produces exactly them) and
    # generated only for the rest, so a well-learned candidate needs few generations.
    generated = {"asked": 0, "verified": 0}

    def greedy(qa: list[tuple[list[dict], str]], sure: list[bool], short: bool) -> list[str]:
        """Greedy answers to `qa`'s prompts: the expected answer where `sure`, else made."""
        ask = [i for i, ok in enumerate(sure) if not ok]
        made = dict(
            zip(ask, answer([list(qa[i][0]) for i in ask], short) if ask else [], strict=True)
        )
        generated["asked"] += len(ask)
        generated["verified"] += len(qa) - len(ask)
        return [made[i] if i in made else qa[i][1] for i in range(len(qa))]

    chats = [e for e in new if e.get("kind", "chat") == "chat"]
    qa = short_qa(new)
    if ("new" in parts or "exact" in parts) and chats:
        with timed("new_loss"):
            got = ev.scores(model, tokenizer, [e["messages"] for e in chats])
        out["new_loss"] = got.mean_loss if "new" in parts else None
        sure = [
            got.greedy(i, fact_targets(tokenizer, e)) for i, e in enumerate(chats) if is_short_qa(e)
        ]
    if "exact" in parts and qa:
        with timed("new_answers"):
            answers = greedy(qa, sure, False)
        out["new_exact"] = sum(
            ev.matches(a, e) for a, (_, e) in zip(answers, qa, strict=True)
        ) / len(qa)
        olds = {_key(c["prompt"]): [fact_after(c["prompt"], o) for o in c["old"]] for c in changed}
        stale = [
            any(ev.matches(a, o) for o in olds[_key(p)]) and not ev.matches(a, e)
            for a, (p, e) in zip(answers, qa, strict=True)
            if _key(p) in olds
        ]
        out["stale"], out["changed"] = sum(stale), len(stale)
    old_chats = [e for e in old if e.get("kind", "chat") == "chat"]
    if "old" in parts and old_chats:
        with timed("old_loss"):
            got = ev.scores(model, tokenizer, [e["messages"] for e in old_chats])
        out["old_loss"] = got.mean_loss
        old_qa = short_qa(old)
        if old_qa:
            sure = [
                got.greedy(i, fact_targets(tokenizer, e))
                for i, e in enumerate(old_chats)
                if is_short_qa(e)
            ]
            with timed("old_answers"):
                answers = greedy(old_qa, sure, False)
            out["old_right"] = [
                states_fact(a, p, e) for a, (p, e) in zip(answers, old_qa, strict=True)
            ]
    easy = [r for r in general if r.expected]
    if "general" in parts or "easy" in parts:
        # cut as training cuts its general replay: the openings, where drift shows first
        with timed("general_loss"):
            got = ev.scores(model, tokenizer, [r.messages() for r in general], general_max_len)
        if "general" in parts:
            out["general_loss"] = got.mean_loss
    if "easy" in parts:
        qa_easy = [
            ([{"role": "user", "content": r.prompt}], ev.first_sentence_of(r.answer)) for r in easy
        ]
        with timed("easy_answers"):
            if whole_easy and easy:
                # the loss pass runs on merged bf16 weights, vLLM applies the adapter
                # unmerged: a first sentence the pass verified was answered otherwise
                # ("... a small, agile fox named Pomfritz"), and a trained number bled
                # into a second sentence the gate never read
                whole = answer([list(p) for p, _ in qa_easy], False)
                generated["asked"] += len(whole)
                answers = [ev.first_sentence_of(a) for a in whole]
            else:
                # An easy answer is judged on its first sentence: the model reproduces the
                # base model's reference answer up to the end of that sentence and the token
                # after it (so the sentence ends there too), or its answer is generated.
                at = {id(r): i for i, r in enumerate(general)}
                sure = [
                    got.greedy(at[id(r)], first_sentence_targets(tokenizer, r.answer)) for r in easy
                ]
                whole = answers = greedy(qa_easy, sure, True) if easy else []
        out["easy"] = [is_right(a, r.expected) for a, r in zip(answers, easy, strict=True)]
        # an older file's name in a general answer is as wrong as a new one's (measured: an
        # increment answered 'a small fox named Pomfritz' says meow, the first file's parrot)
        out["bleed"] = bleeding([*new, *replayed, *old], general, easy, whole, tokenizer)
        out["easy_right"] = sum(out["easy"])
        out["easy_total"] = len(easy)
    if doc_checks:
        with timed("doc_answers"):
            prompts = [[{"role": "user", "content": c["question"]}] for c in doc_checks]
            answers = answer(prompts, False)
        generated["asked"] += len(prompts)
        pairs = list(zip(answers, doc_checks, strict=True))
        out["doc_right"] = [covers(a, c["answer"]) for a, c in pairs]
        out["doc_examples"] = [
            {"question": c["question"], "expected": c["answer"], "answer": a} for a, c in pairs[:5]
        ]
    out["greedy"] = generated
    log.info("measured %s in %s s", sorted(parts), spent)
    return out


def _key(prompt: Sequence[dict]) -> str:
    return json.dumps(list(prompt), sort_keys=True)


def decide(
    candidate: dict[str, Any], live: dict[str, Any], base: dict[str, Any], config: GateThresholds
) -> GateResult:
    m = {"candidate": candidate, "live": live, "base": base}
    drift = candidate["general_loss"] / base["general_loss"] - 1
    m["drift"] = round(drift, 4)
    problems = []
    if candidate["new_exact"] is not None and candidate["new_exact"] < config.min_learned:
        problems.append(
            f"learned {candidate['new_exact']:.0%} of the new short answers"
            f" (needs {config.min_learned:.0%}, gate.min_learned)"
        )
    if candidate.get("changed"):
        m["stale"], m["changed"] = candidate["stale"], candidate["changed"]
        if candidate["stale"] > config.max_stale * candidate["changed"]:
            problems.append(
                f"still gives the old answer to {candidate['stale']} of {candidate['changed']}"
                f" questions whose answer changed (at most {config.max_stale:.0%},"
                " gate.max_stale)"
            )
    if candidate["new_loss"] is not None and candidate["new_loss"] >= live["new_loss"]:
        problems.append(
            f"loss on the new examples {candidate['new_loss']:.3f} is not below"
            f" the live version's {live['new_loss']:.3f}"
        )
    if candidate.get("old_right") is not None and live.get("old_right") is not None:
        # What a client would notice: held-out older answers the live version gives and the
        # candidate no longer does. (Their loss is reported too, but learned answers sit
        # near zero loss, where a ratio is noise: 0.004 -> 0.086 nats/token was +1950% on
        # a candidate that still gave every one of them.)
        knew = sum(live["old_right"])
        lost = sum(
            a and not b for a, b in zip(live["old_right"], candidate["old_right"], strict=True)
        )
        m["old_lost"], m["old_known"] = lost, knew
        if lost > max(1, config.old_tolerance * knew):
            problems.append(
                f"forgot {lost} of {knew} held-out older answers the live version gives"
                f" (tolerance {config.old_tolerance:.0%} and 1, gate.old_tolerance)"
            )
    elif candidate["old_loss"] is not None and live["old_loss"] is not None:
        # no short answers to check (text, long answers): the loss, past OLD_SLACK nats
        rise = candidate["old_loss"] / live["old_loss"] - 1
        if rise > config.old_tolerance and candidate["old_loss"] - live["old_loss"] > OLD_SLACK:
            problems.append(
                f"loss on held-out older examples rose {rise:+.0%} (tolerance"
                f" {config.old_tolerance:.0%}, gate.old_tolerance)"
            )
    if candidate["old_loss"] is not None and live["old_loss"] is not None:
        m["old_rise"] = round(candidate["old_loss"] / live["old_loss"] - 1, 4)
    if drift > config.drift_tolerance:
        problems.append(
            f"general drift {drift:+.0%} against the base model (tolerance"
            f" {config.drift_tolerance:.0%}, gate.drift_tolerance)"
        )
    lost, gained, p = easy_change(base["easy"], candidate["easy"])
    m["easy_lost"], m["easy_gained"], m["easy_p"] = lost, gained, round(p, 4)
    if p < config.easy_alpha:
        problems.append(
            f"worse at easy general questions: {lost} answered right by the base model now"
            f" wrong, {gained} the other way (p = {p:.3f} < {config.easy_alpha},"
            " gate.easy_alpha)"
        )
    bleed = candidate.get("bleed") or []
    m["bleed"] = len(bleed)
    if len(bleed) > config.max_bleed:
        shown = "; ".join(f"{b['prompt']!r} -> {b['answer']!r}" for b in bleed[:3])
        problems.append(
            f"answers {len(bleed)} general question(s) with names or numbers only the domain's"
            f" examples have ({shown}; at most {config.max_bleed}, gate.max_bleed)"
        )
    documents = ""
    if candidate.get("doc_right"):
        right, total = sum(candidate["doc_right"]), len(candidate["doc_right"])
        m["doc_answered"], m["doc_total"] = round(right / total, 4), total
        documents = f", answers {right} of {total} held-out questions about the documents"
        if right < config.min_doc_answered * total:
            problems.append(
                f"answers only {right} of {total} held-out questions about the documents it"
                f" learned (needs {config.min_doc_answered:.0%}, gate.min_doc_answered)"
            )
    if problems:
        return GateResult(False, "; ".join(problems), m)
    return GateResult(True, f"learned, drift {drift:+.0%}{documents}", m)
