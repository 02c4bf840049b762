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
from dataclasses import dataclass

import orjson
from sqlite_utils import Database

from evertune.store import document
from evertune.store.details import details, release, title_name
from evertune.store.document import COMMON, MIN_STATEMENT_WORDS
from evertune.store.formats import prompt_hash

MAX_ANSWER_CHARS = 400  # statements about one thing beyond this are a second answer
MAX_DOCUMENT_BYTES = 4 << 20  # larger text files are trained as text only (said in the log)


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
    for line, heading, raw, term in document.statements(text):
        statement = document.clean(raw)
        if len(statement.split()) < MIN_STATEMENT_WORDS or statement.lower() in seen:
            continue
        seen.add(statement.lower())
        if term:
            about = document.clean(document.subject(term, opening=False) or term)
        else:
            # a statement names what it is about (a code-like term, a name), or a sentence
            # of a paragraph is about its section: those of one section make one answer
            # (continued in another once it is long)
            about = document.clean(document.subject(raw, opening=term is None) or heading)
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
    title = document.title(text)
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
        for q, a in release(heading, about, title_name(title), statements[0]) + [
            p for st in statements for p in details(st, about, heading, title)
        ]:
            key = " ".join(q.lower().split())
            if key not in asked:
                asked.add(key)
                facts.append((q, a))
        out.append(Derived(line, answer, tuple(questions[:2]), questions[2], about, tuple(facts)))
    return out


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
    """Rows for store.supersede's INSERT_EXAMPLE: each taught question with its answer."""
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


def covers(answer: str, expected: str, share: float = 0.7) -> bool:
    """An answer to a held-out question about a document is right when it gives the
    statement: at least `share` of the statement's content words (not the heading it was
    taught under, not common words) appear in it."""
    statement = expected.split(": ", 1)[1] if ": " in expected else expected
    want = [w for w in _WORD.findall(statement.lower()) if w not in COMMON]
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
