"""A newer answer to the same prompt supersedes the older example (real SQLite, real files).

The older example stays in the store, pointing at its successor, and is never trained on,
replayed or held out again; the file that superseded it says so in its report.
"""

from __future__ import annotations

from pathlib import Path

import orjson
from helpers import jsonl, qa
from sqlite_utils import Database

from evertune.daemon.training.selection import select_examples
from evertune.store import schema
from evertune.store.formats import prompt_hash
from evertune.store.ingest import ingest_file
from evertune.store.queries import domain_summary
from evertune.store.reports import load_report

DOMAIN = "geo"


def ingest(db, layout, drop, name: str, *records):
    return ingest_file(db, layout, drop(DOMAIN, name, jsonl(*records)), DOMAIN)


def current(db) -> dict[str, str]:
    """question -> its current (not superseded) answer."""
    out = {}
    for (body,) in db.execute(
        "SELECT body FROM examples WHERE domain = ? AND superseded_by IS NULL", [DOMAIN]
    ):
        msgs = orjson.loads(body)
        assert msgs[-2]["content"] not in out, "two current answers to one prompt"
        out[msgs[-2]["content"]] = msgs[-1]["content"]
    return out


def answer_of(db, example_id: int) -> str:
    (body,) = db.execute("SELECT body FROM examples WHERE id = ?", [example_id]).fetchone()
    return orjson.loads(body)[-1]["content"]


def test_a_chain_of_answers_keeps_each_older_one_pointing_at_its_successor(db, layout, drop):
    q = "What is the capital of Velmora?"
    r1 = ingest(db, layout, drop, "a.jsonl", qa(q, "Tessaline."), qa("Velmora's river?", "Ondra."))
    r2 = ingest(db, layout, drop, "b.jsonl", qa(q, "Orrinport."))
    r3 = ingest(db, layout, drop, "c.jsonl", qa(q, "Brask."))
    assert (r1.examples_superseded, r2.examples_superseded, r3.examples_superseded) == (0, 1, 1)
    rows = {
        answer: (file_id, succ)
        for body, file_id, succ in db.execute(
            "SELECT body, file_id, superseded_by FROM examples WHERE domain = ?", [DOMAIN]
        )
        for answer in [orjson.loads(body)[-1]["content"]]
    }
    # A -> B -> C, each with the file it came from; only C is current
    assert (
        rows["Tessaline."][0] == r1.file_id and answer_of(db, rows["Tessaline."][1]) == "Orrinport."
    )
    assert rows["Orrinport."][0] == r2.file_id and answer_of(db, rows["Orrinport."][1]) == "Brask."
    assert rows["Brask."][1] is None
    assert current(db) == {q: "Brask.", "Velmora's river?": "Ondra."}
    # the report on disk and the files row say it
    on_disk = orjson.loads(Path(r3.stored_path + ".report.json").read_bytes())
    assert on_disk["examples_superseded"] == 1
    assert load_report(db, r3.file_id).examples_superseded == 1
    summary = domain_summary(db, DOMAIN)
    assert (summary["examples"], summary["examples_superseded"]) == (4, 2)


def test_only_the_latest_answer_is_trained_replayed_or_held_out(db, layout, drop):
    ingest(db, layout, drop, "a.jsonl", *[qa(f"q{i}?", f"old {i}.") for i in range(8)])
    db.execute("UPDATE examples SET first_version_id = 1")  # trained by a version 1
    db.conn.commit()
    ingest(db, layout, drop, "b.jsonl", *[qa(f"q{i}?", f"new {i}.") for i in range(4)])
    new, replay, held, every_old = select_examples(db, DOMAIN, 1.0, 4, 2, 0, force=False)
    answers = lambda pairs: sorted(e["messages"][-1]["content"] for _, e in pairs)  # noqa: E731
    assert answers(new) == [f"new {i}." for i in range(4)]
    old = answers(replay) + answers(held) + answers(every_old)
    assert not any(a.startswith("old ") and int(a[4]) < 4 for a in old)
    assert set(answers(held) + answers(every_old)) == {f"old {i}." for i in range(4, 8)}
    # "not yet trained" counts the latest answers only
    assert domain_summary(db, DOMAIN)["examples_new"] == 4


def test_two_answers_in_one_file_the_later_line_wins_and_is_reported(db, layout, drop):
    q = "Port of Velmora?"
    r = ingest(db, layout, drop, "a.jsonl", qa(q, "9001."), qa("other?", "x."), qa(q, "9002."))
    assert current(db) == {q: "9002.", "other?": "x."}
    assert (r.examples_added, r.examples_superseded) == (3, 1)
    assert r.superseded_lines == [{"line": 1, "by_line": 3}]
    assert load_report(db, r.file_id).superseded_lines == [{"line": 1, "by_line": 3}]


def test_an_answer_given_again_after_it_was_superseded_is_current_again(db, layout, drop):
    q = "Velmora's currency?"
    ingest(db, layout, drop, "a.jsonl", qa(q, "The mark."))
    ingest(db, layout, drop, "b.jsonl", qa(q, "The crown."))
    r = ingest(db, layout, drop, "c.jsonl", qa(q, "The mark."), qa("new?", "yes."))
    assert current(db) == {q: "The mark.", "new?": "yes."}
    assert (r.examples_duplicate, r.examples_reinstated, r.examples_superseded) == (1, 1, 1)
    # and within one file: A, B, A again -> A (the last line) wins
    r = ingest(db, layout, drop, "d.jsonl", qa("z?", "A."), qa("z?", "B."), qa("z?", "A."))
    assert current(db)["z?"] == "A."


def current_answers(db) -> set[str]:
    """The current answers (a text example: its text)."""
    return {
        body if kind == "text" else orjson.loads(body)[-1]["content"]
        for kind, body in db.execute(
            "SELECT kind, body FROM examples WHERE domain = ? AND superseded_by IS NULL", [DOMAIN]
        )
    }


def test_a_newer_answer_supersedes_the_question_under_any_system_prompt_format_or_spelling(
    db, layout, drop
):
    """The question is what is asked, not how the file framed it (issue 24: an answer taught
    under a system prompt stayed current beside its correction and was trained again)."""
    q = "Who founded the company Quillon?"
    ingest(
        db,
        layout,
        drop,
        "a.jsonl",
        qa(q, "Mara."),
        qa(q, "Mara Okonkwo.", system="You are a helpful assistant."),
        {"instruction": q, "output": "Mara O."},
        {"question": "  who founded the company   QUILLON?", "answer": "M. Okonkwo."},
        qa("Where is Quillon based?", "Orrinport."),
    )
    # one file may ask the same question under several system prompts: all are taught
    assert current_answers(db) == {"Mara Okonkwo.", "M. Okonkwo.", "Orrinport."}
    r = ingest(db, layout, drop, "b.jsonl", qa("who founded the\tcompany  quillon?", "Jon."))
    assert current_answers(db) == {"Jon.", "Orrinport."}
    assert r.examples_superseded == 2


def test_a_text_example_is_never_superseded(db, layout, drop):
    q = "Velmora's anthem?"
    ingest(db, layout, drop, "a.jsonl", qa(q, "Dawn."), {"text": "Velmora."})
    r = ingest(db, layout, drop, "b.jsonl", {"text": "Velmora, again."}, {"text": q})
    assert r.examples_superseded == 0
    assert current_answers(db) == {"Dawn.", "Velmora.", "Velmora, again.", q}


def test_the_migration_gives_stored_examples_their_prompt_and_supersedes_older_answers(tmp_path):
    """A home from before supersede: its contradicting examples are resolved at the upgrade,
    the latest (file, line) winning."""
    db = Database(tmp_path / "old.db")
    schema.m001_files_and_examples(db)  # the schema as it shipped before m003
    schema.m002_runs_versions_events(db)
    db.execute(
        "INSERT INTO files (id, domain, name, inbox_path, stored_path, report_path, size,"
        " sha256, status, received_at, ingested_at) VALUES"
        " (1, 'geo', 'a', 'a', 'a', 'a', 1, 'x', 'ingested', 't', 't'),"
        " (2, 'geo', 'b', 'b', 'b', 'b', 1, 'y', 'ingested', 't', 't')"
    )
    rows = [  # (id, record, file, line): the later file wins over the later line
        (1, qa("q?", "old."), 1, 2),
        (2, qa("q?", "new."), 2, 1),
        (3, qa("r?", "kept."), 1, 1),
    ]
    for i, rec, file_id, line in rows:
        body = orjson.dumps(rec["messages"]).decode()
        db.execute(
            "INSERT INTO examples (id, domain, kind, body, content_hash, chars, file_id, line)"
            " VALUES (?, 'geo', 'chat', ?, ?, 1, ?, ?)",
            [i, body, bytes([i]), file_id, line],
        )
    db.conn.commit()
    schema.m003_superseded_and_forgotten(db)
    got = {
        i: (ph, s) for i, ph, s in db.execute("SELECT id, prompt_hash, superseded_by FROM examples")
    }
    assert got[1] == (prompt_hash(qa("q?", "x")["messages"]), 2)
    assert got[2][1] is None and got[3][1] is None


def test_the_upgrade_resolves_answers_that_differed_only_in_system_prompt_or_spelling(tmp_path):
    """A store from before the question was normalised: its answers to one question under
    other system prompts or spellings are superseded by the latest at the upgrade, as an
    ingest now would; one file's answers under several system prompts all stay."""
    db = Database(tmp_path / "old.db")
    for m in ("m001_files_and_examples", "m002_runs_versions_events"):
        getattr(schema, m)(db)
    schema.m003_superseded_and_forgotten(db)
    schema.m004_run_states(db)
    db.execute(
        "INSERT INTO files (id, domain, name, inbox_path, stored_path, report_path, size,"
        " sha256, status, received_at, ingested_at) VALUES"
        " (1, 'geo', 'a', 'a', 'a', 'a', 1, 'x', 'ingested', 't', 't'),"
        " (2, 'geo', 'b', 'b', 'b', 'b', 1, 'y', 'ingested', 't', 't')"
    )
    rows = [  # (id, record, file, line)
        (1, qa("Q?", "old."), 1, 1),
        (2, qa("Q?", "old, framed.", system="You are a helpful assistant."), 1, 2),
        (3, qa("  q?\n", "new."), 2, 1),
        (4, qa("Q?", "new, framed.", system="Be terse."), 2, 2),
        (5, qa("r?", "kept."), 1, 3),
    ]
    for i, rec, file_id, line in rows:
        body = orjson.dumps(rec["messages"]).decode()
        db.execute(
            "INSERT INTO examples (id, domain, kind, body, content_hash, chars, file_id, line,"
            " prompt_hash) VALUES (?, 'geo', 'chat', ?, ?, 1, ?, ?, ?)",
            [i, body, bytes([i]), file_id, line, bytes([i])],  # the old hashes all differ
        )
    db.conn.commit()
    schema.m005_questions_normalised(db)
    got = dict(db.execute("SELECT id, superseded_by FROM examples").fetchall())
    assert got[1] in (3, 4) and got[2] in (3, 4)
    assert got[3] is None and got[4] is None and got[5] is None
    (n,) = db.execute("SELECT count(DISTINCT prompt_hash) FROM examples").fetchone()
    assert n == 2


def test_the_gate_is_given_the_old_answers_a_version_learned(db, layout, drop):
    from evertune.daemon.training.selection import replaced_answers

    ingest(db, layout, drop, "a.jsonl", qa("q1?", "A1."), qa("q2?", "A2."), qa("q3?", "A3."))
    db.execute("UPDATE examples SET first_version_id = 1")  # learned by a version 1
    db.conn.commit()
    ingest(db, layout, drop, "b.jsonl", qa("q1?", "B1."))  # never trained on...
    ingest(db, layout, drop, "c.jsonl", qa("q1?", "C1."), qa("q2?", "B2."), qa("q4?", "A4."))
    new, *_ = select_examples(db, DOMAIN, 1.0, 0, 0, 0, force=False)
    got = replaced_answers(db, DOMAIN, [i for i, _ in new])
    # ...so only the learned A1 must be gone for q1; q4 replaces nothing
    assert sorted((c["prompt"][-1]["content"], c["old"]) for c in got) == [
        ("q1?", ["A1."]),
        ("q2?", ["A2."]),
    ]
