"""What the gate reads in a candidate's answers to easy general questions: whether it is
worse at them than the base model (`easy_change`, a paired exact test) and whether they
state the domain's own names and numbers (`bleeding`, with `distinctive` deciding which
names and numbers only the domain has)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from evertune.adapters.reference import Reference
from evertune.store.terms import key_terms, words


def distinctive(term: str, tokenizer: Any = None) -> bool:
    """Whether a domain's name or number (a lower-cased `key_terms` term), found in a general
    answer, can only have come from the domain: a code with letters and digits ("qx-3318"),
    a number of three digits or more, or a word the tokenizer does not know whole (a
    common word is one token, capitalised or not: " Tower", " Festival"; an invented name
    is several: " Pom" "f" "ritz"). Without a tokenizer every word counts.

    Why: measured, a six-file run's fourth file was refused twice for its own common-word
    names, "Tower" in "... and the Eiffel Tower", "23" in a garbled sum and "Festival",
    while its real bleed would still be caught by the words beside them ("Windlass")."""
    digits = sum(c.isdigit() for c in term)
    if digits:
        return digits >= 3 or any(c.isalpha() for c in term)
    if tokenizer is None:
        return True
    return all(len(tokenizer.tokenize(" " + w)) > 1 for w in (term, term.capitalize()))


def bleeding(
    examples: Sequence[dict],
    general: Sequence[Reference],
    easy: Sequence[Reference],
    answers: list[str],
    tokenizer: Any = None,
) -> list[dict]:
    """The easy answers that state a name or number of `examples` (the domain's:
    store.terms `key_terms` of their answers and texts) which the base model's answers to
    the held-out general prompts and those prompts never use, and which is `distinctive`:
    {"prompt", "answer", "terms"} each. Words the base model uses anyway ("Paris",
    "Python", "2") and common words are never counted, so an answer that merely changed is
    not bleed; a trained fictional capital in a general answer is."""
    taught: set[str] = set()
    for e in examples:
        if e.get("kind", "chat") == "text":
            taught |= key_terms(e["text"])
        else:
            for m in e["messages"]:
                if m["role"] == "assistant" and m.get("weight", 1) != 0:
                    taught |= key_terms(m["content"])
    if not taught:
        return []
    known: set[str] = set()
    for r in general:
        known |= words(r.prompt) | words(r.answer)
    novel = {t for t in taught - known if distinctive(t, tokenizer)}
    out = []
    for r, a in zip(easy, answers, strict=True):
        terms = sorted(key_terms(a) & novel)
        if terms:
            out.append({"prompt": r.prompt, "answer": a, "terms": terms})
    return out


def easy_change(base: list[bool], candidate: list[bool]) -> tuple[int, int, float]:
    """(lost, gained, p): answers right only for the base, right only for the candidate, and
    the one-sided exact McNemar p-value of losing at least `lost` of the changed answers if
    losing and gaining were equally likely (1.0 when nothing changed)."""
    lost = sum(b and not c for b, c in zip(base, candidate, strict=True))
    gained = sum(c and not b for b, c in zip(base, candidate, strict=True))
    n = lost + gained
    p = sum(math.comb(n, k) for k in range(lost, n + 1)) / 2**n
    return lost, gained, p
