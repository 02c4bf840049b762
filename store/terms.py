"""What an answer states: its names and numbers, which make two phrasings one fact
(daemon/training/selection.py `facts`), and the part of it that must be reproduced for the answer
to count as learned (`fact_part`: adapters/train.py's early stop, adapters/gate.py)."""

from __future__ import annotations

import re
from collections.abc import Sequence

# Capitalised words that start sentences, not names
STARTERS = frozenset(
    re.findall(
        r"\S+",
        "a an the it its it's this that that's these those there there's here here's they"
        " they're he she his her we we're our you you're your i i'm i've my me yes no sure"
        " well also however each every one some many most all any in on at of for to by"
        " from with and or but so as if when then is was are were be been has have had do"
        " does did can could will would should may might",
    )
)
# Words that say nothing of a fact, besides STARTERS
_FUNCTION = STARTERS | frozenset(
    re.findall(
        r"\S+",
        "not very just only about than into over after before because which who whom whose"
        " what where how why called named",
    )
)
_TERM = re.compile(r"[A-Za-z0-9][\w'-]*")
# Where a clause ends: what follows is how the writer goes on, not the fact itself
_CLAUSE_END = re.compile(r"[,;:.!?](?:\s|$)|\s[-\u2013\u2014]\s|\n")


def _is_key(word: str) -> bool:
    return any(c.isdigit() for c in word) or (word[0].isupper() and word.lower() not in STARTERS)


def words(text: str) -> set[str]:
    """The text's words, lower-cased."""
    return {w.lower() for w in _TERM.findall(text)}


def key_terms(answer: str) -> set[str]:
    """The answer's names and numbers, lower-cased: capitalised words that do not start
    sentences, and words with a digit."""
    return {w.lower() for w in _TERM.findall(answer) if _is_key(w)}


def fact_part(answer: str, question: str = "") -> str:
    """The answer up to the end of the clause that states what the question did not: the
    clause holding its last name or number the question does not name, else its first
    word the question does not have (the whole answer when neither ends a clause before
    its end).

    Why: a long answer is judged learned when a client asking gets its fact, not when every
    word of its writer's tail comes back verbatim ("It was founded by Ysolde Partridge-Vane,
    a surveyor who started it with a few friends in her own study."). Measured: the last
    epochs of a run trained the tails of the longest answers, long after the facts were
    reproduced."""
    asked = {w.lower() for w in _TERM.findall(question)}
    words = list(_TERM.finditer(answer))
    keys = [m for m in words if _is_key(m.group()) and m.group().lower() not in asked]
    new = [m for m in words if m.group().lower() not in asked | _FUNCTION]
    anchor = keys[-1] if keys else (new[0] if new else None)
    if anchor is None:
        return answer
    end = _CLAUSE_END.search(answer, anchor.end())
    return answer[: end.start()] if end else answer


def fact_after(prompt: Sequence[dict], answer: str) -> str:
    """`fact_part` of an assistant turn given the conversation before it, whose last user
    turn is the question (what training's early stop and the gate's checks both judge)."""
    asked = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
    return fact_part(answer, asked)
