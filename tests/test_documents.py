"""Documents become questions (store.knowledge): what a dropped document teaches, what the
gate asks of it, and that a document nobody can answer about is not called learned."""

from __future__ import annotations

import json

from helpers import evertune
from test_cycle import LENIENT, versions, write_config

from evertune.adapters.gate import GateThresholds, decide
from evertune.daemon.cli import main
from evertune.store import knowledge
from evertune.store.db import open_db

NOTES = """\
# Quillon release notes

## 2.4.0 (2026-03-02)

- Added `sync --dry-run`, which shows what would change without writing anything.
- The `cache.max_size` key now defaults to 512 MB.
- Fixed a crash when `QUILLON_HOME` pointed at a missing folder.

## 2.3.1

The importer now accepts CSV files with a byte-order mark. Large archives are streamed
instead of loaded whole, so memory stays under 200 MB.

Glossary
========

Workspace: a folder that Quillon tracks, with its own config.
Remote - a server that holds the shared copy.

| Plan | Price | Seats |
|------|-------|-------|
| Basic | 9 EUR | 3 |
| Team | 29 EUR | 10 |

Refunds:
Refunds are paid within 14 days of the request. Contact Mara Okonkwo in Finance for exceptions.

## 2.2.0

- `sync --dry-run` no longer needs a network connection.
"""


def test_a_document_gives_each_statement_with_its_heading_and_three_wordings():
    got: dict = {}
    for d in knowledge.derive(NOTES):
        got.setdefault(d.about, d)  # the first statement about each
    dry = got["sync --dry-run"]
    assert dry.line == 5
    assert dry.answer == (
        "2.4.0 (2026-03-02): Added sync --dry-run, which shows what would change without"
        " writing anything."
    )  # markup gone, the heading says which release
    assert dry.taught == (
        "What do you know about sync --dry-run?",
        "In 2.4.0 (2026-03-02), what is said about sync --dry-run?",
    )
    assert dry.held_out == "Tell me about sync --dry-run."
    assert got["Workspace"].taught[0] == "What is Workspace?"  # a definition line
    assert got["Remote"].answer.endswith("Remote - a server that holds the shared copy.")
    assert got["Team"].answer.endswith("Team: Price 29 EUR; Seats 10.")  # a table row
    # a paragraph's sentences that name nothing are about their section: one answer
    assert got["2.3.1"].answer == (
        "2.3.1: The importer now accepts CSV files with a byte-order mark. Large archives are"
        " streamed instead of loaded whole, so memory stays under 200 MB."
    )
    assert got["Refunds"].answer == "Refunds are paid within 14 days of the request."
    assert got["Mara Okonkwo"].answer == "Refunds: Contact Mara Okonkwo in Finance for exceptions."
    # one answer per question: no statement supersedes another of the same document, also
    # where two sections speak of the same thing
    every = knowledge.derive(NOTES)
    taught = [q for d in every for q in d.taught]
    assert len(taught) == len(set(taught))
    later = [d for d in every if d.about == "sync --dry-run"][1]
    assert later.taught[0] == "What do you know about sync --dry-run (2.2.0)?"
    assert later.answer == "2.2.0: sync --dry-run no longer needs a network connection."


def test_each_detail_of_a_sentence_is_asked_for_and_answered_by_the_sentence():
    facts = dict(q for d in knowledge.derive(NOTES) for q in d.facts)
    # a number with its unit, a setting: the sentence with the detail asked for, and what
    # the sentence does not say itself (the title's name, the release) in front of both
    answer = "Quillon 2.4.0: The cache.max_size key now defaults to 512 MB."
    assert facts["Quillon 2.4.0: The cache.max_size key now defaults to how many MB?"] == answer
    assert facts["Quillon 2.4.0: The which setting key now defaults to 512 MB?"] == answer
    assert facts["Quillon: Refunds are paid within how many days of the request?"] == (
        "Quillon: Refunds are paid within 14 days of the request."
    )
    assert facts["Quillon Glossary: Team: Price what amount; Seats 10?"] == (
        "Quillon Glossary: Team: Price 29 EUR; Seats 10."
    )
    # an item of a release: which version brought it (the section's or the item's own
    # verb), and when the release came out
    assert facts["Which version added sync --dry-run?"] == "2.4.0 (2026-03-02): sync --dry-run."
    assert facts["Which version fixed QUILLON_HOME?"] == "2.4.0 (2026-03-02): QUILLON_HOME."
    assert facts["When was Quillon 2.4.0 released?"] == "Quillon 2.4.0 was released on 2026-03-02."
    # "2.x"-like text and the digits 0 and 1 are not asked for; no question twice
    every = [q for d in knowledge.derive(NOTES) for q in [*d.taught, *(f for f, _ in d.facts)]]
    assert len(every) == len(set(every))


def test_a_held_out_answer_is_right_when_it_gives_the_statement():
    expected = "Refunds: Refunds are paid within 14 days of the request."
    assert knowledge.covers("Refunds are paid within 14 days of the request.", expected)
    assert knowledge.covers("They say refunds are paid within 14 days of a request", expected)
    assert not knowledge.covers("Refunds are paid within 30 days.", expected)
    assert not knowledge.covers("I don't know.", expected)


def test_a_dropped_document_is_stored_with_its_derived_questions_and_listed(tmp_path):
    home = tmp_path / "home"
    src = tmp_path / "notes.md"
    src.write_text(NOTES)
    out = evertune(home, "ingest", str(src), "--domain", "quillon")
    assert out.returncode == 0, out.stderr
    statements = knowledge.derive(NOTES)
    derived = len(statements)
    taught = 2 * derived + sum(len(d.facts) for d in statements)
    assert (
        f"a document: {taught} question-and-answer examples derived from its statements,"
        f" {derived} questions held out for the gate" in out.stdout
    )
    listed = evertune(home, "examples", "quillon", "--derived", "--limit", "500")
    assert listed.returncode == 0, listed.stderr
    assert (
        "notes.md:5 (derived): 'What do you know about sync --dry-run?' -> '2.4.0 (2026-03-02):"
        " Added sync --dry-run" in listed.stdout
    )
    assert "held out for the gate (never trained on)" in listed.stdout
    assert "notes.md:5: 'Tell me about sync --dry-run.'" in listed.stdout
    assert "superseded" not in out.stdout  # no derived answer replaced another
    report = json.loads((home / "done/quillon/notes.md.report.json").read_text())
    assert report["examples_derived"] == taught
    assert report["questions_held_out"] == derived
    # forgetting the whole document takes its held-out questions too
    # forgetting the document (the file given again, under any name) takes everything it
    # taught: its text, its derived questions, and its held-out questions
    src.rename(tmp_path / "renamed.md")
    gone = evertune(home, "forget", "quillon", "--file", str(tmp_path / "renamed.md"))
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert f"quillon: {taught + 1} examples forgotten" in gone.stdout
    db = open_db(home / "evertune.db", readonly=True)
    try:
        assert db.execute("SELECT count(*) FROM examples").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM doc_checks").fetchone() == (0,)
    finally:
        db.close()


def _metrics(doc_right: list[bool] | None) -> dict:
    out = {
        "new_loss": None,
        "new_exact": None,
        "old_loss": None,
        "general_loss": 1.0,
        "easy": [True] * 5,
        "easy_right": 5,
        "easy_total": 5,
    }
    if doc_right is not None:
        out["doc_right"] = doc_right
    return out


def test_the_gate_calls_a_document_learned_only_when_its_held_out_questions_are_answered():
    base = _metrics(None)
    low = decide(_metrics([True] * 3 + [False] * 7), base, base, GateThresholds())
    assert not low.promote
    assert "answers only 3 of 10 held-out questions about the documents" in low.reason
    assert "gate.min_doc_answered" in low.reason and low.metrics["doc_answered"] == 0.3
    ok = decide(_metrics([True] * 8 + [False] * 2), base, base, GateThresholds())
    assert ok.promote
    assert ok.reason == "learned, drift +0%, answers 8 of 10 held-out questions about the documents"


def test_a_trained_document_its_model_cannot_answer_about_is_refused(
    tmp_path, monkeypatch, tiny_base, capsys
):
    """The tiny random model learns no document in one epoch: the gate asks it the held-out
    questions (through a real training child) and refuses it, naming the figure, instead of
    calling the document learned."""
    home = tmp_path / "home"
    monkeypatch.setenv("EVERTUNE_HOME", str(home))
    monkeypatch.delenv("EVERTUNE_CONFIG", raising=False)
    write_config(home, tiny_base, LENIENT + "min_doc_answered = 0.5\n", epochs=1)
    src = tmp_path / "notes.md"
    src.write_text(NOTES)
    assert main(["ingest", str(src), "--domain", "vaults"]) == 0
    assert main(["train", "vaults"]) == 3
    [v1] = versions(capsys)
    assert v1["state"] == "rejected"
    assert "held-out questions about the documents it learned" in v1["reason"]
    assert v1["metrics"]["doc_total"] == len(knowledge.derive(NOTES))


def test_a_question_the_base_model_wrote_is_taken_from_its_reply_and_junk_is_not():
    assert knowledge.written_question("What is the new kestrip prune command?") == (
        "What is the new kestrip prune command?"
    )
    assert knowledge.written_question("1. What's new in 4.3?\n2. How?") == "What's new in 4.3?"
    assert knowledge.written_question("What is the answer to this question?") is None
    assert knowledge.written_question("Sure! Here you go.") is None
    [ask] = knowledge.asking_prompt("2.4.0 (2026-03-02): Added sync --dry-run.")
    assert ask["content"].startswith("Text (from the section '2.4.0 (2026-03-02)'): Added sync")
