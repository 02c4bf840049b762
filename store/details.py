"""Questions about the details one sentence of a document states (a number with its unit,
a date, a version, an option or setting, a name) and, in release notes, which version an
item came in. Used by store.knowledge."""

from __future__ import annotations

import re

from evertune.store.document import COMMON, MIN_STATEMENT_WORDS, NAME, SENTENCE_END

MAX_DETAILS = 3  # questions about the details of one sentence, at most
_DETAIL = re.compile(
    r"(?P<date>\b\d{4}-\d{2}-\d{2}\b)"
    r"|(?P<time>\b\d{1,2}:\d{2}\b)"
    r"|(?P<version>\bv?\d+\.\d+\.\d+\b)"
    r"|(?P<option>(?<![\w-])--?[a-zA-Z][\w-]*)"
    r"|(?P<key>(?<![/\w])[A-Za-z]+(?:[_.][A-Za-z0-9]+)+\b)"
    r"|(?P<money>\b(?:EUR|USD|GBP|CHF)\s?\d[\d,.]*\d|[$€£]\s?\d[\d,.]*\d|\d[\d,.]*\s?(?:EUR|USD|GBP|CHF)\b)"
    r"|(?P<amount>(?<![\w.,-])\d[\d,]*(?:\.\d+)?(?!\.\w|\w)(?:\s?(?:%|[A-Za-z]{2,}))?)"
)
_ASK = {
    "date": "on what date",
    "time": "at what time",
    "version": "in which version",
    "option": "which option",
    "key": "which setting",
    "money": "what amount",
}
_VERBS = {
    "added": "added",
    "new": "added",
    "features": "added",
    "changed": "changed",
    "fixed": "fixed",
    "removed": "removed",
    "deprecated": "deprecated",
    "security": "fixed",
}
_VERSION = re.compile(r"\bv?\d+\.\d+(?:\.\d+)*\b")


def details(statement: str, about: str, heading: str, title: str) -> list[tuple[str, str]]:
    """Questions about the details a sentence states (a number with its unit, an amount, a
    date or time, a version, an option or setting, a name), each answered by the sentence
    with what it is about: the sentence with that detail asked for in its place
    ("kestrip prune: The window is set with --keep-days and defaults to how many days?").

    Why: users ask for one detail ("How many days does kestrip prune keep snapshots by
    default?"), and a 135M model trained only to recite a whole statement when asked about
    its subject answered 0 of 30 such questions (benchmarks/results/documents-2026-12-06/).
    A question that carries the sentence's other words and asks for its detail, answered
    by one short sentence, is the nearest a template gets to a user's question."""
    out = []
    for sentence in SENTENCE_END.split(statement):
        sentence = sentence.strip()
        if len(sentence.split()) < MIN_STATEMENT_WORDS:
            continue
        low = sentence.lower()
        missing = [c for c in _context(about, heading, title) if c.lower() not in low]
        prefix = " ".join(missing) + ": " if missing else ""
        answer = f"{prefix}{sentence}" + ("" if sentence[-1:] in ".!?" else ".")
        spans = [m for m in _DETAIL.finditer(sentence) if _worth_asking(m)]
        spans += [m for m in NAME.finditer(sentence) if m.start() > 0 and not _overlaps(m, spans)]
        for m in spans[:MAX_DETAILS]:
            ask = _ask(m)
            body = (sentence[: m.start()] + ask + sentence[m.end() :]).rstrip(" .!?")
            out.append((f"{prefix}{body}?", answer))
    return out


def _worth_asking(m: re.Match) -> bool:
    if m.lastgroup != "amount":
        return True
    number = re.match(r"[\d,.]+", m.group()).group()
    return not re.fullmatch(r"[01]", number)  # "0" and "1" are rarely what is asked for


def _overlaps(m: re.Match, spans: list[re.Match]) -> bool:
    return any(m.start() < o.end() and o.start() < m.end() for o in spans)


def _ask(m: re.Match) -> str:
    kind = m.lastgroup
    if kind in _ASK:
        return _ASK[kind]
    if kind == "amount":
        unit = re.sub(r"^[\d,.]+\s?", "", m.group())
        return (
            f"how many {unit}"
            if unit and unit != "%"
            else "what number" + (" of percent" if unit == "%" else "")
        )
    return "who or what"  # a name


def _context(about: str, heading: str, title: str) -> list[str]:
    """What a sentence is about that it may not say itself, in a few words: the first name
    in the document's title ("Kestrip"), the version of the heading it sits under ("4.3.0"),
    else its heading, and the subject of its statement ("kestrip prune")."""
    name = title_name(title)
    version = _VERSION.search(heading)
    where = version.group() if version else heading
    about = re.sub(r" \(part \d+\)$", "", about)
    seen: list[str] = []
    for c in (name, where, about):
        if c and not any(c.lower() in s.lower() or s.lower() in c.lower() for s in seen):
            seen.append(c)
    return seen


_DATE = re.compile(
    r"\b\d{4}-\d{2}-\d{2}\b|\b\d{1,2} [A-Z][a-z]+ \d{4}\b|\b[A-Z][a-z]+ \d{1,2}, \d{4}\b"
)


def release(heading: str, about: str, name: str, first: str) -> list[tuple[str, str]]:
    """Which version an item of a release note came in: "Which version added kestrip
    prune?" for an item under "4.3.0 (2025-03-18) - Added" (and the release's date)."""
    version = _VERSION.search(heading)
    if not version or not about or version.group().lower() in about.lower():
        return []
    section = heading.rsplit(" - ", 1)[-1].strip().lower()
    # the section's word ("Added"), else the item's own first word ("Fixed a crash ...")
    verb = _VERBS.get(section.split()[0] if section else "") or _VERBS.get(
        first.split()[0].lower() if first.split() else "", "mentioned"
    )
    out = [(f"Which version {verb} {about}?", f"{heading}: {about}.")]
    date = _DATE.search(heading)
    if date:
        out.append(
            (
                f"When was {name} {version.group()} released?".replace("  ", " "),
                f"{name} {version.group()} was released on {date.group()}.".lstrip(),
            )
        )
    return out


def title_name(title: str) -> str:
    """The first name in a title ("Kestrip" of "Kestrip CLI release notes"; "Corvane" of
    "CORVANE INSTRUMENTS - TRAVEL POLICY")."""
    name = next((w for w in re.findall(r"[A-Z][\w-]+", title) if w.lower() not in COMMON), "")
    return name.title() if title.isupper() else name
