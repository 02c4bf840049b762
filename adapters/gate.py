"""The evaluation gate: is the candidate better than the live version, and still itself?

Runs in the training child (the daemon stays light). Four questions, each a metric:

1. learned: greedy answers to the new examples' questions contain the trained answer
   (short answers only; new examples are all trained on, never withheld: a withheld fact
   would never be served), and the candidate's loss on them is below the live version's;
2. old knowledge: loss on a held-out slice of older examples does not rise by more than
   `old_tolerance` against the live version;
3. drift: loss on the base model's own answers to held-out general prompts does not rise
   by more than `drift_tolerance` against the base model;
4. easy questions: of the easy general questions the base model answers right, the
   candidate loses at most `easy_tolerance`.

Version 1 is compared with the base model as its "live" version.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from evertune.adapters.reference import Reference, is_right

SHORT_ANSWER_CHARS = 200


@dataclass(frozen=True)
class GateConfig:
    """Defaults from benchmarks/learning.py on SmolLM2-135M (10 facts, 30 examples): naive
    training drifted +104% and lost 5 of 15 easy answers; ours drifted -27% and lost 1."""

    min_learned: float = 0.8
    old_tolerance: float = 0.10
    drift_tolerance: float = 0.10
    easy_tolerance: int = 1


@dataclass
class GateResult:
    promote: bool
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def short_qa(examples: list[dict]) -> list[tuple[list[dict], str]]:
    """(prompt messages, expected answer) for chat examples ending in a short answer."""
    out = []
    for ex in examples:
        msgs = ex.get("messages")
        if ex.get("kind", "chat") != "chat" or not msgs or msgs[-1]["role"] != "assistant":
            continue
        answer = msgs[-1]["content"]
        if len(answer) <= SHORT_ANSWER_CHARS and msgs[-1].get("weight", 1) != 0:
            out.append((msgs[:-1], answer))
    return out


ALL = frozenset({"new", "exact", "old", "general", "easy"})
# What `decide` reads of each model: the candidate everything; the live version its loss on
# new and old examples; the base model its general loss and easy answers. Measuring no
# more than that keeps evaluation short (it is part of the time to serve a dropped file).
LIVE, BASE = frozenset({"new", "old"}), frozenset({"general", "easy"})


def measure(
    model,
    tokenizer,
    new: list[dict],
    old: list[dict],
    general: list[Reference],
    parts: frozenset[str] = ALL,
) -> dict[str, Any]:
    """Metrics of one model (the adapter as loaded; `ev.adapter_off` gives the base);
    metrics not in `parts` are None."""
    from evertune.adapters import evaluate as ev  # torch: only in the training child

    out: dict[str, Any] = dict.fromkeys(
        ("new_loss", "new_exact", "old_loss", "general_loss", "easy_right", "easy_total")
    )
    chats = [e["messages"] for e in new if e.get("kind", "chat") == "chat"]
    if "new" in parts and chats:
        out["new_loss"] = ev.mean_loss(model, tokenizer, chats)
    qa = short_qa(new)
    if "exact" in parts and qa:
        answers = ev.greedy_answers_chat(model, tokenizer, [p for p, _ in qa])
        out["new_exact"] = sum(
            ev.matches(a, e) for a, (_, e) in zip(answers, qa, strict=True)
        ) / len(qa)
    if "old" in parts and old:
        out["old_loss"] = ev.mean_loss(model, tokenizer, [e["messages"] for e in old])
    if "general" in parts:
        out["general_loss"] = ev.mean_loss(model, tokenizer, [r.messages() for r in general])
    easy = [r for r in general if r.expected]
    if "easy" in parts:
        answers = ev.greedy_answers(model, tokenizer, [r.prompt for r in easy]) if easy else []
        out["easy_right"] = sum(is_right(a, r.expected) for a, r in zip(answers, easy, strict=True))
        out["easy_total"] = len(easy)
    return out


def decide(
    candidate: dict[str, Any], live: dict[str, Any], base: dict[str, Any], config: GateConfig
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
    if candidate["new_loss"] is not None and candidate["new_loss"] >= live["new_loss"]:
        problems.append(
            f"loss on the new examples {candidate['new_loss']:.3f} is not below"
            f" the live version's {live['new_loss']:.3f}"
        )
    if candidate["old_loss"] is not None and live["old_loss"] is not None:
        rise = candidate["old_loss"] / live["old_loss"] - 1
        m["old_rise"] = round(rise, 4)
        if rise > config.old_tolerance:
            problems.append(
                f"loss on held-out older examples rose {rise:+.0%} (tolerance"
                f" {config.old_tolerance:.0%}, gate.old_tolerance)"
            )
    if drift > config.drift_tolerance:
        problems.append(
            f"general drift {drift:+.0%} against the base model (tolerance"
            f" {config.drift_tolerance:.0%}, gate.drift_tolerance)"
        )
    lost = base["easy_right"] - candidate["easy_right"]
    if lost > config.easy_tolerance:
        problems.append(
            f"answers {candidate['easy_right']}/{candidate['easy_total']} easy"
            f" general questions right, the base model {base['easy_right']}"
            f" (tolerance {config.easy_tolerance}, gate.easy_tolerance)"
        )
    if problems:
        return GateResult(False, "; ".join(problems), m)
    return GateResult(True, f"learned, drift {drift:+.0%}", m)
