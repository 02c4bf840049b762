"""Documents become questions: the statements of a dropped .md/.txt document, each taught as
the answer to questions about it, with one question per statement held out to measure.

A model trained on a passage can continue it but rarely answers questions about it unless
it also trained on the same knowledge in question-and-answer form, in several wordings
(Allen-Zhu and Li, "Physics of Language Models, Part 3.1"; Jiang et al. 2024,
"Instruction-tuned Language Models are Better Knowledge Learners"). So beside the text
chunks, a document gives, for each statement it makes:

- its answer: the statement itself, with the heading it sits under when that says what it
  is about ("Release 2.4.0 (2026-03-02): `sync --dry-run` shows what would change.");
- two questions taught (trained on) and one held out, never trained: the gate asks the
  held-out ones to tell whether the document can be answered about, not only recited.

Statements are found by the document's structure, not by a model: headings (markdown `#`,
underlined, or a short line ending in ':' before a block), bullet and numbered items,
"Term: definition" and "Term - definition" lines, table rows (a header row names the
columns), and the sentences of paragraphs. What a question is about comes from the
statement: the term a definition defines, else its code-like terms (`backticks`, --options,
snake_case, dotted.names, versions), else its capitalised names, else its heading.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
from sqlite_utils import Database

from evertune.store.formats import prompt_hash

MAX_ANSWER_CHARS = 400  # statements about one thing beyond this are a second answer
MIN_STATEMENT_WORDS = 4
MAX_DOCUMENT_BYTES = 4 << 20  # larger text files are trained as text only (said in the log)

_HEADING_MD = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_UNDERLINE = re.compile(r"^\s*(=+|-+)\s*$")
_BULLET = re.compile(r"^\s*(?:[-*+•]|\d{1,3}[.)])\s+(.*)$")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$")
_DEFINITION = re.compile(r"^\s*([^:.!?]{2,60}?)\s*(?::|\s[-–—]\s)\s*(\S.*)$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'`(])")
_CODE = re.compile(
    r"`([^`]{1,60})`"  # backticked
    r"|(?<![\w-])(--?[a-zA-Z][\w-]*)"  # options
    r"|\b([A-Za-z]+(?:[_.][A-Za-z0-9]+)+)\b"  # snake_case, dotted.names
    r"|\b(v?\d+\.\d+(?:\.\d+)*)\b"  # versions
)
_NAME = re.compile(r"\b([A-Z][a-z0-9]+(?:[ -](?:of |the |de |von )?[A-Z][A-Za-z0-9]+)+)\b")
_MARKUP = re.compile(r"\*\*|__|(?<!\w)[*_](?=\w)|(?<=\w)[*_](?!\w)|`")


@dataclass(frozen=True)
class Derived:
    """One statement of the document: questions taught with its answer, one held out."""

    line: int  # 1-based line of the statement in the document
    answer: str
    taught: tuple[str, ...]
    held_out: str
    about: str
    # (question, answer) about one detail of one sentence: its number, option, name, version
    # (`details`), and which version a release note's item came in; trained on too
    facts: tuple[tuple[str, str], ...] = ()


def derive(text: str) -> list[Derived]:
    """The statements of a document (markdown or plain text) with their questions. Two
    statements about the same thing are one answer (a question has one answer). Nothing
    depends on the file's name: `forget --file` derives the same questions from the file."""
    found: dict[str, list] = {}  # key -> [line, heading, about, statements, defined]
    seen: set[str] = set()
    for line, heading, raw, term in _statements(text):
        statement = _clean(raw)
        if len(statement.split()) < MIN_STATEMENT_WORDS or statement.lower() in seen:
            continue
        seen.add(statement.lower())
        if term:
            about = _clean(_subject(term, opening=False) or term)
        else:
            # a statement names what it is about (a code-like term, a name), or a sentence
            # of a paragraph is about its section: those of one section make one answer
            # (continued in another once it is long)
            about = _clean(_subject(raw, opening=term is None) or heading)
            if not about:
                continue  # about nothing named, under no heading: taught as text only
        key, more = f"{heading}\0{about}".lower(), 1
        while key in found and len(" ".join(found[key][3])) + len(statement) > MAX_ANSWER_CHARS:
            more += 1
            key = f"{heading}\0{about}\0{more}".lower()
        if key not in found:
            named = about if more == 1 else f"{about} (part {more})"
            found[key] = [line, heading, named, [], bool(term)]
        found[key][3].append(statement)
    out = []
    asked: set[str] = set()
    title = _title(text)
    for line, heading, about, statements, defined in found.values():
        answer = _answer(heading, " ".join(statements))[: MAX_ANSWER_CHARS + 100]
        where = heading if heading and heading.lower() != about.lower() else "the document"
        questions = _questions(about, where, defined)
        # the same thing under two headings: each question says which (a question asked
        # twice with two answers would keep only the later one, store.ingest's supersede)
        questions = [
            f"{q[:-1]} ({where}){q[-1]}" if " ".join(q.lower().split()) in asked else q
            for q in questions
        ]
        asked.update(" ".join(q.lower().split()) for q in questions)
        facts = []
        for q, a in _release(heading, about, _name(title), statements[0]) + [
            p for st in statements for p in details(st, about, heading, title)
        ]:
            key = " ".join(q.lower().split())
            if key not in asked:
                asked.add(key)
                facts.append((q, a))
        out.append(Derived(line, answer, tuple(questions[:2]), questions[2], about, tuple(facts)))
    return out


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
    for sentence in _SENTENCE_END.split(statement):
        sentence = sentence.strip()
        if len(sentence.split()) < MIN_STATEMENT_WORDS:
            continue
        low = sentence.lower()
        missing = [c for c in _context(about, heading, title) if c.lower() not in low]
        prefix = " ".join(missing) + ": " if missing else ""
        answer = f"{prefix}{sentence}" + ("" if sentence[-1:] in ".!?" else ".")
        spans = [m for m in _DETAIL.finditer(sentence) if _worth_asking(m)]
        spans += [m for m in _NAME.finditer(sentence) if m.start() > 0 and not _overlaps(m, spans)]
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
    name = _name(title)
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


def _release(heading: str, about: str, name: str, first: str) -> list[tuple[str, str]]:
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


def _name(title: str) -> str:
    """The first name in a title ("Kestrip" of "Kestrip CLI release notes"; "Corvane" of
    "CORVANE INSTRUMENTS - TRAVEL POLICY")."""
    name = next((w for w in re.findall(r"[A-Z][\w-]+", title) if w.lower() not in _COMMON), "")
    return name.title() if title.isupper() else name


def _title(text: str) -> str:
    """The document's title: its first heading when it opens with one."""
    lines = [line for line in text.splitlines() if line.strip()][:2]
    if not lines:
        return ""
    md = _HEADING_MD.match(lines[0])
    if md:
        return _clean(md.group(2))
    first = lines[0].strip()
    underlined = len(lines) > 1 and _UNDERLINE.match(lines[1])
    if underlined or (len(first) <= 80 and first[-1] not in ".,;:!?"):
        return _clean(first)  # underlined, or a short line that is no sentence
    return ""


PROSE = ""  # in place of a defined term: a sentence of a paragraph


def _statements(text: str) -> Iterator[tuple[int, str, str, str | None]]:
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
        path.append((level, _clean(name)))

    def flush() -> Iterator[tuple[int, str, str, str | None]]:
        if item:
            line, body = item[0], item[1]
            item.clear()
            yield line, heading(), body, _defined(body)
        if paragraph:
            first = paragraph[0][0]
            body = " ".join(t.strip() for _, t in paragraph)
            paragraph.clear()
            for sentence in _SENTENCE_END.split(body):
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
                    f"{col} {_clean(val)}"
                    for col, val in zip(columns[1:], cells[1:], strict=False)
                    if val
                ]
                yield n, heading(), f"{_clean(cells[0])}: " + "; ".join(pairs) + ".", cells[0]
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
    if len(term.split()) > 6 or _clean(term).lower() in _NOT_TERMS:
        return None
    return term


_LEADING = re.compile(r"^(?:the|a|an|this|these|our|all|each|every)\s+", re.I)
_STOP = re.compile(
    r"\s(?:is|are|was|were|will|can|may|must|should|has|have|had|now|no longer|does|do"
    r"|gets?|goes|takes?|needs?|runs?|shows?|uses?|accepts?|stays?|becomes?|[a-z]+ed)\b"
)


def _subject(statement: str, opening: bool = True) -> str | None:
    """What a statement is about: its first code-like term, else a name in it (not the
    capitalised first word of the sentence), else (with `opening`: an item, not a sentence
    of a paragraph) its opening words up to the verb."""
    code = _CODE.search(statement)
    if code:
        return next(g for g in code.groups() if g)
    for name in _NAME.finditer(statement):
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


def _clean(text: str) -> str:
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text)  # [label](link) -> label
    text = _MARKUP.sub("", text)
    return re.sub(r"\s+", " ", text).strip()


def _answer(heading: str, statement: str) -> str:
    end = "" if statement[-1:] in ".!?:" else "."
    if heading and heading.lower() not in statement.lower():
        return f"{heading}: {statement}{end}"
    return statement + end


def _questions(about: str, where: str, defined: bool) -> list[str]:
    """Three wordings: the first two are taught, the third held out."""
    if defined:
        return [
            f"What is {about}?",
            f"In {where}, what does {about} mean?",
            f"Can you explain {about} to me?",
        ]
    return [
        f"What do you know about {about}?",
        f"In {where}, what is said about {about}?",
        f"Tell me about {about}.",
    ]


def example_rows(domain: str, file_id: int, derived: list[Derived]) -> list[tuple]:
    """Rows for store.ingest's INSERT_EXAMPLE: each taught question with its answer."""
    rows = []
    for d in derived:
        for question, answer in [(q, d.answer) for q in d.taught] + list(d.facts):
            body = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
            data = orjson.dumps(body)
            digest = hashlib.blake2b(data, digest_size=16, person=b"chat").digest()
            chars = len(question) + len(answer)
            rows.append(
                (domain, "chat", data.decode(), digest, chars, file_id, d.line, prompt_hash(body))
            )
    return rows


def record_checks(db: Database, domain: str, file_id: int, derived: list[Derived]) -> int:
    """The held-out question of each statement, kept for the gate (never trained on)."""
    db.conn.executemany(
        "INSERT INTO doc_checks (domain, file_id, line, question, answer) VALUES (?, ?, ?, ?, ?)",
        [(domain, file_id, d.line, d.held_out, d.answer) for d in derived],
    )
    return len(derived)


def mark_derived(db: Database, file_id: int) -> int:
    """The file's chat examples are derived (a text file gives only text chunks itself)."""
    return db.execute(
        "UPDATE examples SET derived = 1 WHERE file_id = ? AND kind = 'chat'", [file_id]
    ).rowcount


def checks_of_examples(db: Database, domain: str, example_ids: list[int], limit: int) -> list[dict]:
    """Held-out questions about the documents that gave `example_ids`: at most `limit`,
    spread over the files and their statements (every k-th)."""
    file_ids: list[int] = []
    for i in range(0, len(example_ids), 500):
        chunk = example_ids[i : i + 500]
        file_ids += [
            f
            for (f,) in db.execute(
                "SELECT DISTINCT file_id FROM examples WHERE derived = 1 AND id IN"
                f" ({','.join('?' * len(chunk))})",
                chunk,
            )
        ]
    file_ids = sorted(set(file_ids))
    if not file_ids or not limit:
        return []
    rows = db.execute(
        "SELECT question, answer FROM doc_checks WHERE domain = ? AND file_id IN"
        f" ({','.join('?' * len(file_ids))}) ORDER BY file_id, line, id",
        [domain, *file_ids],
    ).fetchall()
    step = max(1, -(-len(rows) // limit))
    return [{"question": q, "answer": a} for q, a in rows[::step][:limit]]


_WORD = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*")
_COMMON = frozenset(
    re.findall(
        r"\w+",
        "a an the of to in on at for by with and or is are was were be been it its this that"
        " these those as from into now not no can will may which what when who how",
    )
)


def covers(answer: str, expected: str, share: float = 0.7) -> bool:
    """An answer to a held-out question about a document is right when it gives the
    statement: at least `share` of the statement's content words (not the heading it was
    taught under, not common words) appear in it."""
    statement = expected.split(": ", 1)[1] if ": " in expected else expected
    want = [w for w in _WORD.findall(statement.lower()) if w not in _COMMON]
    if not want:
        return False
    got = set(_WORD.findall(answer.lower()))
    return sum(w in got for w in want) >= share * len(want)


def listing(
    db: Database, domain: str, file: str | None, derived_only: bool, limit: int
) -> list[tuple[str, int | None, str, int, str]]:
    """(file name, line, kind, derived, body) of the domain's current examples."""
    where = ["e.domain = ?", "e.superseded_by IS NULL"]
    args: list = [domain]
    if file:
        where.append("f.name = ?")
        args.append(file)
    if derived_only:
        where.append("e.derived = 1")
    return db.execute(
        "SELECT f.name, e.line, e.kind, e.derived, e.body FROM examples e"
        f" JOIN files f ON f.id = e.file_id WHERE {' AND '.join(where)}"
        " ORDER BY e.file_id, e.line, e.id LIMIT ?",
        [*args, limit],
    ).fetchall()


def held_out(db: Database, domain: str, file: str | None, limit: int) -> list[tuple]:
    """(file name, line, question) held out of the domain's documents."""
    where, args = "c.domain = ?", [domain]
    if file:
        where += " AND f.name = ?"
        args.append(file)
    return db.execute(
        "SELECT f.name, c.line, c.question FROM doc_checks c JOIN files f ON f.id = c.file_id"
        f" WHERE {where} ORDER BY c.file_id, c.line LIMIT ?",
        [*args, limit],
    ).fetchall()


def asking_prompt(answer: str) -> list[dict]:
    """A request for the question a reader would ask that `answer` answers (made by the
    base model: a wording no template of ours made, never trained on)."""
    statement = answer.split(": ", 1)[1] if ": " in answer else answer
    context = answer[: len(answer) - len(statement)].rstrip(": ")
    where = f" (from the section {context!r})" if context else ""
    return [
        {
            "role": "user",
            "content": f"Text{where}: {statement}\n\nWrite one question a user could ask"
            " whose answer is in the text. Reply with the question only.",
        }
    ]


_ABOUT_ITSELF = re.compile(r"\b(?:this|the) (?:question|text)\b|\banswer to\b", re.I)


def written_question(text: str) -> str | None:
    """The question in a model's reply: its first line ending in '?' (None: no question)."""
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:\d+[.)]|[-*]|question:)\s*", "", line.strip(), flags=re.I)
        if line.endswith("?") and len(line.split()) >= 3 and not _ABOUT_ITSELF.search(line):
            return line
    return None
