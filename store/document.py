"""The structure of a dropped document (markdown or plain text), read without a model: its
title, its headings, and the statements under them (bullet and numbered items, "Term:
definition" lines, table rows, the sentences of paragraphs), each with what it is about.
store.knowledge turns them into questions and answers."""

from __future__ import annotations

import re
from collections.abc import Iterator

MIN_STATEMENT_WORDS = 4

_HEADING_MD = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_UNDERLINE = re.compile(r"^\s*(=+|-+)\s*$")
_BULLET = re.compile(r"^\s*(?:[-*+•]|\d{1,3}[.)])\s+(.*)$")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$")
_DEFINITION = re.compile(r"^\s*([^:.!?]{2,60}?)\s*(?::|\s[-–—]\s)\s*(\S.*)$")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'`(])")
_CODE = re.compile(
    r"`([^`]{1,60})`"  # backticked
    r"|(?<![\w-])(--?[a-zA-Z][\w-]*)"  # options
    r"|\b([A-Za-z]+(?:[_.][A-Za-z0-9]+)+)\b"  # snake_case, dotted.names
    r"|\b(v?\d+\.\d+(?:\.\d+)*)\b"  # versions
)
NAME = re.compile(r"\b([A-Z][a-z0-9]+(?:[ -](?:of |the |de |von )?[A-Z][A-Za-z0-9]+)+)\b")
_MARKUP = re.compile(r"\*\*|__|(?<!\w)[*_](?=\w)|(?<=\w)[*_](?!\w)|`")
COMMON = frozenset(
    re.findall(
        r"\w+",
        "a an the of to in on at for by with and or is are was were be been it its this that"
        " these those as from into now not no can will may which what when who how",
    )
)


def title(text: str) -> str:
    """The document's title: its first heading when it opens with one."""
    lines = [line for line in text.splitlines() if line.strip()][:2]
    if not lines:
        return ""
    md = _HEADING_MD.match(lines[0])
    if md:
        return clean(md.group(2))
    first = lines[0].strip()
    underlined = len(lines) > 1 and _UNDERLINE.match(lines[1])
    if underlined or (len(first) <= 80 and first[-1] not in ".,;:!?"):
        return clean(first)  # underlined, or a short line that is no sentence
    return ""


PROSE = ""  # in place of a defined term: a sentence of a paragraph


def statements(text: str) -> Iterator[tuple[int, str, str, str | None]]:
    """(line, heading, statement, defined term | PROSE | None) in document order. The
    heading is the path below the document's title ("4.3.0 (2025-03-18) - Added")."""
    lines = text.splitlines()
    path: list[tuple[int, str]] = []  # (level, heading) from the top
    columns: list[str] | None = None
    paragraph: list[tuple[int, str]] = []
    item: list = []  # [line, text, is a list item]

    def heading() -> str:
        names = [h for _, h in path]
        return " - ".join(names[1:] if len(names) > 1 else names)

    def set_heading(level: int, name: str) -> None:
        while path and path[-1][0] >= level:
            path.pop()
        path.append((level, clean(name)))

    def flush() -> Iterator[tuple[int, str, str, str | None]]:
        if item:
            line, body = item[0], item[1]
            item.clear()
            yield line, heading(), body, _defined(body)
        if paragraph:
            first = paragraph[0][0]
            body = " ".join(t.strip() for _, t in paragraph)
            paragraph.clear()
            for sentence in SENTENCE_END.split(body):
                yield first, heading(), sentence, PROSE

    for i, raw in enumerate(lines):
        n = i + 1
        prev = lines[i - 1].strip() if i else ""
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        stripped = raw.strip()
        if not stripped:
            yield from flush()
            columns = None
            continue
        md = _HEADING_MD.match(raw)
        if md:
            yield from flush()
            set_heading(len(md.group(1)), md.group(2))
            continue
        if _UNDERLINE.match(nxt) and len(stripped) <= 80 and not _BULLET.match(raw):
            yield from flush()
            set_heading(1 if nxt.strip().startswith("=") else 2, stripped)
            continue
        if _UNDERLINE.match(raw) and not paragraph and not item:
            continue  # the underline of a heading already taken
        if stripped.startswith("|") or (columns is not None and "|" in stripped):
            yield from flush()
            cells = [c.strip() for c in stripped.strip("|").split("|")]
            if _TABLE_RULE.match(stripped):
                continue
            if columns is None:
                columns = cells
                continue
            if cells and cells[0]:
                pairs = [
                    f"{col} {clean(val)}"
                    for col, val in zip(columns[1:], cells[1:], strict=False)
                    if val
                ]
                yield n, heading(), f"{clean(cells[0])}: " + "; ".join(pairs) + ".", cells[0]
            continue
        alone = not prev and not nxt.strip() and not paragraph and not item
        if alone and len(stripped) <= 60 and stripped[-1] not in ".,;!?":
            # a line on its own, not a sentence: a plain-text heading ("2. Booking travel",
            # "TRAVEL POLICY", "Refunds:"); numbered ones are sections below the title
            numbered = re.match(r"^(\d{1,3})[.)]\s+(.*)$", stripped)
            name = numbered.group(2) if numbered else stripped.rstrip(":")
            yield from flush()
            set_heading(2 if numbered or path else 1, name)
            continue
        if stripped.endswith(":") and len(stripped) <= 80 and not paragraph and not item:
            yield from flush()
            set_heading(len(path) + 1 if path else 1, stripped[:-1])  # "Refunds:" over a block
            continue
        bullet = _BULLET.match(raw)
        if bullet:
            yield from flush()
            item.extend([n, bullet.group(1).strip()])
            continue
        if item and (raw[:1].isspace() or not paragraph):
            item[1] += " " + stripped  # the item goes on on this line
            continue
        term = _defined(stripped)
        if term is not None and not paragraph:
            yield n, heading(), stripped, term
            continue
        paragraph.append((n, stripped))
    yield from flush()


_NOT_TERMS = ("note", "warning", "tip", "example", "see", "important")


def _defined(text: str) -> str | None:
    """The term a "Term: definition" or "Term - definition" line defines (None: not one)."""
    m = _DEFINITION.match(text)
    if not m:
        return None
    term = m.group(1).strip()
    if len(term.split()) > 6 or clean(term).lower() in _NOT_TERMS:
        return None
    return term


_LEADING = re.compile(r"^(?:the|a|an|this|these|our|all|each|every)\s+", re.I)
_STOP = re.compile(
    r"\s(?:is|are|was|were|will|can|may|must|should|has|have|had|now|no longer|does|do"
    r"|gets?|goes|takes?|needs?|runs?|shows?|uses?|accepts?|stays?|becomes?|[a-z]+ed)\b"
)


def subject(statement: str, opening: bool = True) -> str | None:
    """What a statement is about: its first code-like term, else a name in it (not the
    capitalised first word of the sentence), else (with `opening`: an item, not a sentence
    of a paragraph) its opening words up to the verb."""
    code = _CODE.search(statement)
    if code:
        return next(g for g in code.groups() if g)
    for name in NAME.finditer(statement):
        words = name.group(1).split()
        if name.start() == 0:  # "Contact Mara Okonkwo": the first word starts the sentence
            words = words[1:]
        if len(words) >= 2:
            return " ".join(words)
    if not opening:
        return None
    text = _LEADING.sub("", statement.rstrip(".!?"))
    stop = _STOP.search(" " + text)
    words = (text[: stop.start()] if stop and stop.start() > 0 else text).split()[:5]
    return " ".join(words) or statement[:40]


def clean(text: str) -> str:
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text)  # [label](link) -> label
    text = _MARKUP.sub("", text)
    return re.sub(r"\s+", " ", text).strip()
