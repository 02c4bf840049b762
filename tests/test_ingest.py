"""ingest_file on real files in a real home folder and a real SQLite file.

Each test drops a file into inbox/<domain>/, ingests it, and checks the three places that
must agree: the examples/files/file_errors tables, the file moved to done/ or rejected/
(never deleted), and the .report.json written beside it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import orjson
import pytest
from helpers import jsonl, qa

from evertune.store.ingest import IngestLimits, ingest_file
from evertune.store.reports import FileReport, load_report

DOMAIN = "legal"


def as_chat(q: str, a: str) -> list[dict]:
    return qa(q, a)["messages"]


def ingest(db, layout, path: Path, domain: str = DOMAIN, **limits) -> FileReport:
    return ingest_file(db, layout, path, domain, IngestLimits(**limits))


def examples(db, domain: str = DOMAIN) -> list[tuple]:
    """(kind, body, line, file_id) of every stored example of `domain`, in file order."""
    rows = db.execute(
        "SELECT kind, body, line, file_id FROM examples WHERE domain = ? ORDER BY id", [domain]
    ).fetchall()
    return [
        (kind, orjson.loads(body) if kind == "chat" else body, line, file_id)
        for kind, body, line, file_id in rows
    ]


def bodies(db, domain: str = DOMAIN) -> list:
    return [e[1] for e in examples(db, domain)]


def count(db, table: str, where: str = "1", params=()) -> int:
    return db.execute(f"SELECT count(*) FROM {table} WHERE {where}", list(params)).fetchone()[0]


def report_on_disk(report: FileReport) -> dict:
    return orjson.loads(Path(report.stored_path + ".report.json").read_bytes())


def errors(report: FileReport) -> list[tuple[int | None, str]]:
    return [(e.line, e.reason) for e in report.errors]


def assert_kept(path: Path, report: FileReport, folder: Path, content: bytes) -> None:
    """The dropped file left the inbox and lies, unchanged, in `folder` with its report."""
    stored = Path(report.stored_path)
    assert not path.exists()
    assert stored.parent == folder
    assert stored.read_bytes() == content
    assert report_on_disk(report)["status"] == report.status


# --- each file format ---------------------------------------------------------------------


def test_jsonl_file_is_stored_line_by_line_and_moved_to_done(db, layout, drop):
    content = jsonl(
        {
            "messages": [
                {"role": "system", "content": "You are a lawyer."},
                {"role": "user", "content": "What is a tort?"},
                {"role": "assistant", "content": "A civil wrong."},
            ]
        },
        {"instruction": "Define contract.", "output": "An enforceable agreement."},
        {"text": "Section 1. Definitions."},
    )
    path = drop(DOMAIN, "batch.jsonl", content)

    report = ingest(db, layout, path)

    assert (report.status, report.format) == ("ingested", "jsonl")
    assert (report.records, report.examples_added, report.records_rejected) == (3, 3, 0)
    assert report.reason is None and report.errors == []
    assert examples(db) == [
        (
            "chat",
            [
                {"role": "system", "content": "You are a lawyer."},
                {"role": "user", "content": "What is a tort?"},
                {"role": "assistant", "content": "A civil wrong."},
            ],
            1,
            report.file_id,
        ),
        ("chat", as_chat("Define contract.", "An enforceable agreement."), 2, report.file_id),
        ("text", "Section 1. Definitions.", 3, report.file_id),
    ]
    assert Path(report.stored_path) == layout.done / DOMAIN / "batch.jsonl"
    assert_kept(path, report, layout.done / DOMAIN, content.encode())


def test_json_array_file_is_stored_with_the_line_each_record_starts_on(db, layout, drop):
    content = (
        "[\n"
        '  {"prompt": "Is a verbal contract binding?", "completion": "Often, yes."},\n'
        "  {\n"
        '    "question": "What is bail?",\n'
        '    "answer": "Security for release."\n'
        "  },\n"
        '  {"text": "Article 5."}\n'
        "]\n"
    )
    path = drop(DOMAIN, "records.json", content)

    report = ingest(db, layout, path)

    assert (report.status, report.format, report.examples_added) == ("ingested", "json-array", 3)
    assert [(kind, body, line) for kind, body, line, _ in examples(db)] == [
        ("chat", as_chat("Is a verbal contract binding?", "Often, yes."), 2),
        ("chat", as_chat("What is bail?", "Security for release."), 3),
        ("text", "Article 5.", 7),
    ]
    assert_kept(path, report, layout.done / DOMAIN, content.encode())


def test_csv_file_is_stored_with_quoted_commas_and_multiline_cells(db, layout, drop):
    content = (
        "prompt,completion\n"
        '"Name two torts, briefly.","Negligence, trespass."\n'
        '"Explain estoppel.","Line one\nline two"\n'
        "What is a lien?,A right to keep property.\n"
    )
    path = drop(DOMAIN, "sheet.csv", content)

    report = ingest(db, layout, path)

    assert (report.status, report.format, report.examples_added) == ("ingested", "csv", 3)
    assert [(body, line) for _, body, line, _ in examples(db)] == [
        (as_chat("Name two torts, briefly.", "Negligence, trespass."), 2),
        (as_chat("Explain estoppel.", "Line one\nline two"), 3),
        (as_chat("What is a lien?", "A right to keep property."), 5),
    ]
    assert_kept(path, report, layout.done / DOMAIN, content.encode())


def test_tsv_file_with_a_system_column_is_stored(db, layout, drop):
    content = (
        "Question\tAnswer\tSystem\n"
        "What is a writ?\tA court order.\tBe brief.\n"
        "What is an appeal?\tA request for review, by a higher court.\t\n"
    )
    path = drop(DOMAIN, "sheet.tsv", content)

    report = ingest(db, layout, path)

    assert (report.status, report.format, report.examples_added) == ("ingested", "tsv", 2)
    assert bodies(db) == [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is a writ?"},
            {"role": "assistant", "content": "A court order."},
        ],
        as_chat("What is an appeal?", "A request for review, by a higher court."),
    ]
    assert_kept(path, report, layout.done / DOMAIN, content.encode())


def test_csv_with_alpaca_and_text_columns_is_stored(db, layout, drop):
    path = drop(DOMAIN, "alpaca.csv", "instruction,input,output\nSummarise.,The facts.,Short.\n")
    text_path = drop(DOMAIN, "corpus.csv", "text\nA paragraph of statute.\n")

    assert ingest(db, layout, path).examples_added == 1
    assert ingest(db, layout, text_path).examples_added == 1
    assert bodies(db) == [as_chat("Summarise.\n\nThe facts.", "Short."), "A paragraph of statute."]


def test_txt_file_becomes_text_examples_split_at_paragraphs(db, layout, drop):
    paragraphs = [f"Paragraph {i} of the statute, with some words." for i in range(1, 7)]
    content = "\n\n".join(paragraphs) + "\n"
    path = drop(DOMAIN, "statute.txt", content)

    report = ingest(db, layout, path, text_chunk_chars=100)

    assert (report.status, report.format) == ("ingested", "text")
    stored = examples(db)
    assert report.examples_added == len(stored) > 1
    assert all(kind == "text" and len(body) <= 100 for kind, body, _, _ in stored)
    # Chunks break between paragraphs, and nothing is lost or reordered.
    assert "\n\n".join(body for _, body, _, _ in stored) == content.strip("\n")
    # Each example's line is the file line its first paragraph starts on.
    assert [line for _, _, line, _ in stored] == [
        content[: content.index(body)].count("\n") + 1 for _, body, _, _ in stored
    ]
    assert_kept(path, report, layout.done / DOMAIN, content.encode())


def test_one_enormous_txt_line_is_split_and_nothing_is_lost(db, layout, drop):
    """A 20 MB line: before, quadratic slicing (a 50 MB line took 4 min 23 s while holding
    the write transaction); now linear (reading a 50 MB line: 0.2 s on 2 cores)."""
    import random

    letters = bytes(b"abcdefghijklmnop"[i % 16] for i in range(256))
    line = random.Random(0).randbytes(20_000_000).translate(letters).decode()
    path = drop(DOMAIN, "big.txt", "intro\n\n" + line + "\nlast line\n")

    report = ingest(db, layout, path, text_chunk_chars=2000)

    assert report.records_rejected == 0
    stored = [body for _, body, _, _ in examples(db)]
    assert report.examples_added == len(stored)
    assert stored[0] == "intro" and stored[-1].endswith("last line")
    assert "".join(stored[1:]).removesuffix("last line").rstrip("\n") == line
    assert all(len(b) <= 2000 for b in stored)


def test_md_file_is_stored_as_one_text_example_when_small(db, layout, drop):
    content = "# Contracts\n\nA *contract* is an agreement.\n\n- offer\n- acceptance\n"
    path = drop(DOMAIN, "notes.md", content)

    report = ingest(db, layout, path)

    assert (report.status, report.format, report.examples_added) == ("ingested", "text", 1)
    assert examples(db)[0] == ("text", content.strip("\n"), 1, report.file_id)
    # and the statements it makes, as questions (store.knowledge; tests/test_documents.py)
    assert report.examples_derived == len(examples(db)) - 1 == 2
    assert_kept(path, report, layout.done / DOMAIN, content.encode())


def test_file_extension_is_matched_ignoring_case(db, layout, drop):
    path = drop(DOMAIN, "UPPER.JSONL", jsonl(qa("Q?", "A.")))
    report = ingest(db, layout, path)
    assert (report.status, report.format, report.examples_added) == ("ingested", "jsonl", 1)


def test_utf8_byte_order_mark_is_ignored_in_jsonl_and_csv(db, layout, drop):
    bom = "\ufeff"
    one = drop(DOMAIN, "bom.jsonl", bom + jsonl(qa("Q1?", "A1.")))
    two = drop(DOMAIN, "bom.csv", bom + "prompt,completion\nQ2?,A2.\n")

    assert ingest(db, layout, one).examples_added == 1
    assert ingest(db, layout, two).examples_added == 1
    assert bodies(db) == [as_chat("Q1?", "A1."), as_chat("Q2?", "A2.")]


def test_one_jsonl_file_may_mix_record_formats(db, layout, drop):
    content = jsonl(
        {"prompt": "P", "completion": "C"},
        {"conversations": [{"from": "human", "value": "H"}, {"from": "gpt", "value": "G"}]},
        {"question": "Q", "answer": "A"},
    )
    report = ingest(db, layout, drop(DOMAIN, "mixed.jsonl", content))
    assert report.examples_added == 3
    assert bodies(db) == [as_chat("P", "C"), as_chat("H", "G"), as_chat("Q", "A")]


def test_progress_is_reported_up_to_the_file_size(db, layout, drop):
    path = drop(DOMAIN, "many.jsonl", jsonl(*(qa(f"Q{i}?", f"A{i}.") for i in range(50))))
    size = path.stat().st_size
    calls: list[tuple[int, int]] = []

    ingest_file(
        db, layout, path, DOMAIN, IngestLimits(batch_size=10), progress=lambda *a: calls.append(a)
    )

    assert len(calls) > 1
    assert calls[-1] == (size, size)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


# --- bad records: reported by line, the valid rest kept -------------------------------------


def test_bad_jsonl_records_are_reported_by_line_and_the_valid_rest_is_kept(db, layout, drop):
    lines = [
        orjson.dumps(qa("Q1?", "A1.")).decode(),
        '{"messages": [',
        orjson.dumps({"instruction": "I2", "output": "O2"}).decode(),
        '{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
        "",
        "[1, 2]",
        orjson.dumps(qa("Q7?", "A7.")).decode(),
        '{"foo": 1}',
    ]
    content = "\n".join(lines) + "\n"
    path = drop(DOMAIN, "mixed.jsonl", content)

    report = ingest(db, layout, path)

    assert report.status == "ingested"
    assert (report.records, report.examples_added, report.records_rejected) == (7, 3, 4)
    assert [line for line, _ in errors(report)] == [2, 4, 6, 8]
    reasons = [reason for _, reason in errors(report)]
    assert reasons[0].startswith("bad JSON:")
    assert reasons[1].startswith("message 1: unknown role 'robot'")
    assert reasons[2] == "record is a JSON array, expected an object"
    assert reasons[3].startswith("unrecognised record (keys: foo)")
    # The byte offset points at the start of the bad line in the file.
    raw = content.encode()
    assert [e.offset for e in report.errors] == [raw.index(lines[i].encode()) for i in (1, 3, 5, 7)]
    assert [line for _, _, line, _ in examples(db)] == [1, 3, 7]
    stored_errors = db.execute(
        "SELECT line, byte_offset, reason FROM file_errors WHERE file_id = ? ORDER BY id",
        [report.file_id],
    ).fetchall()
    assert stored_errors == [(e.line, e.offset, e.reason) for e in report.errors]
    assert report.errors_by_reason == {
        "bad JSON": 1,
        "message 1": 1,
        "record is a JSON array, expected an object": 1,
        "unrecognised record": 1,
    }
    assert_kept(path, report, layout.done / DOMAIN, raw)


def test_a_file_with_rejected_records_logs_a_warning_event(db, layout, drop):
    path = drop(DOMAIN, "warn.jsonl", jsonl(qa("Q?", "A."), {"bad": 1}))
    report = ingest(db, layout, path)
    assert db.execute(
        "SELECT level, domain, kind, message FROM events ORDER BY id DESC LIMIT 1"
    ).fetchone() == (
        "warning",
        DOMAIN,
        "file_ingested",
        "warn.jsonl: 1 new, 0 duplicate, 1 rejected",
    )
    assert report.records_rejected == 1


def test_record_over_the_configured_length_limit_is_reported_at_its_line(db, layout, drop):
    path = drop(DOMAIN, "long.jsonl", jsonl(qa("short", "ok"), qa("x" * 50, "y" * 50)))

    report = ingest(db, layout, path, max_example_chars=60)

    assert report.examples_added == 1
    assert errors(report) == [
        (2, "over the length limit: 100 characters > 60 (config key ingest.max_example_chars)")
    ]


def test_record_with_a_non_string_role_is_rejected_not_failing_the_file(db, layout, drop):
    bad = {"messages": [{"role": ["user"], "content": "Q"}, {"role": "assistant", "content": "A"}]}
    path = drop(DOMAIN, "roles.jsonl", jsonl(bad, qa("Q?", "A.")))

    report = ingest(db, layout, path)

    assert report.status == "ingested"
    assert report.examples_added == 1
    assert len(report.errors) == 1
    assert report.errors[0].line == 1
    assert report.errors[0].reason.startswith("message 1: unknown role ['user']")
    assert not path.exists()


def test_error_list_is_capped_but_every_rejected_record_is_counted(db, layout, drop):
    content = jsonl(qa("Q?", "A.")) + "not json\n" * 5
    report = ingest(db, layout, drop(DOMAIN, "noisy.jsonl", content), max_errors_kept=2)

    assert report.records_rejected == 5
    assert [line for line, _ in errors(report)] == [2, 3]
    assert report.errors_by_reason == {"bad JSON": 5}
    assert count(db, "file_errors", "file_id = ?", [report.file_id]) == 2
    row = db.execute(
        "SELECT records, records_rejected FROM files WHERE id = ?", [report.file_id]
    ).fetchone()
    assert row == (6, 5)
    assert load_report(db, report.file_id).errors_by_reason == {"bad JSON": 5}


def test_bad_record_in_a_json_array_is_reported_at_its_line(db, layout, drop):
    content = (
        "[\n"
        '  {"prompt": "Q1?", "completion": "A1."},\n'
        "  42,\n"
        '  {"prompt": "Q3?", "completion": ""},\n'
        '  {"prompt": "Q4?", "completion": "A4."}\n'
        "]"
    )
    report = ingest(db, layout, drop(DOMAIN, "arr.json", content))

    assert report.examples_added == 2
    assert errors(report) == [
        (3, "record is a JSON number, expected an object"),
        (4, "empty content in 'completion'"),
    ]
    offsets = [content.index("42"), content.index('{"prompt": "Q3')]
    assert [e.offset for e in report.errors] == offsets


@pytest.mark.parametrize(
    "cut",
    [
        '{"prompt": "Q3?", "compl',  # inside a key
        '{"prompt"',  # after a key
        '{"prompt": "Q3?", "completion": [{"role": "assis',  # inside a nested list
        '{"prompt": "Q3?", "n": 12',  # inside a number
        '{"prompt": "caf\\u00',  # inside a \u escape
        '{"prompt": "Q3?", "completion": "A3."',  # before the closing brace
    ],
)
def test_truncated_json_array_keeps_every_complete_record_and_says_where_it_broke(
    db, layout, drop, cut
):
    content = (
        "[\n"
        '  {"prompt": "Q1?", "completion": "A1."},\n'
        '  {"prompt": "Q2?", "completion": "A2."},\n'
        "  " + cut
    )
    path = drop(DOMAIN, "cut.json", content)

    report = ingest(db, layout, path)

    assert report.status == "ingested"
    assert bodies(db) == [as_chat("Q1?", "A1."), as_chat("Q2?", "A2.")]
    assert len(report.errors) == 1
    problem = report.errors[0]
    assert problem.line == 4
    assert problem.offset == content.rindex(cut)
    assert problem.reason.startswith("truncated JSON array: record 3 is cut off at the end")
    assert "every complete record before it was kept" in problem.reason
    assert report.records_rejected == 1


@pytest.mark.parametrize("tail", [",", "", ",\n  "])
def test_json_array_without_its_closing_bracket_keeps_every_record(db, layout, drop, tail):
    content = (
        '[\n  {"prompt": "Q1?", "completion": "A1."},\n  {"prompt": "Q2?", "completion": "A2."}'
    )
    report = ingest(db, layout, drop(DOMAIN, "open.json", content + tail))

    assert report.examples_added == 2
    assert len(report.errors) == 1
    assert report.errors[0].reason.startswith(
        "truncated JSON array: the file ends after record 2 without the closing ']'"
    )


def test_malformed_record_inside_a_json_array_is_not_reported_as_truncation(db, layout, drop):
    content = (
        "[\n"
        '  {"prompt": "Q1?", "completion": "A1."},\n'
        "  {prompt: Q2},\n"
        '  {"prompt": "Q3?", "completion": "A3."}\n'
        "]\n"
    )
    report = ingest(db, layout, drop(DOMAIN, "broken.json", content))

    assert bodies(db) == [as_chat("Q1?", "A1.")]
    assert len(report.errors) == 1
    problem = report.errors[0]
    assert problem.line == 3
    assert problem.reason.startswith("bad JSON in record 2:")
    assert "truncated" not in problem.reason
    # Reading a JSON array cannot resume after a malformed record: the report must say so.
    assert "not read" in problem.reason


def test_deeply_nested_record_in_a_json_array_is_reported_not_failing_the_file(db, layout, drop):
    deep = "[" * 100_000 + "]" * 100_000
    content = f'[{{"prompt": "Q1?", "completion": "A1."}},\n{{"x": {deep}}}]'
    path = drop(DOMAIN, "deep.json", content)

    report = ingest(db, layout, path)

    assert report.status == "ingested"
    assert bodies(db) == [as_chat("Q1?", "A1.")]
    assert [line for line, _ in errors(report)] == [2]
    assert report.errors[0].reason.startswith("bad JSON in record 2: nested too deeply")
    assert not path.exists()


def test_lone_surrogate_escape_in_a_json_array_is_rejected_per_record(db, layout, drop):
    content = (
        "[\n"
        '  {"text": "broken \\ud800 text"},\n'
        '  {"prompt": "Q \\udc00", "completion": "A"},\n'
        '  {"text": "fine \\u00e9 text \\ud83d\\ude00"}\n'
        "]"
    )
    path = drop(DOMAIN, "surrogate.json", content)

    report = ingest(db, layout, path)

    assert report.status == "ingested"
    assert bodies(db) == ["fine é text 😀"]
    assert [line for line, _ in errors(report)] == [2, 3]
    assert all("lone surrogate" in reason for _, reason in errors(report))


# --- encodings -------------------------------------------------------------------------------


def test_not_utf8_jsonl_line_is_reported_by_line_and_column(db, layout, drop):
    good = jsonl(qa("Q1?", "A1."))
    bad = b'{"text": "caf\xe9"}\n'
    content = good.encode() + bad + jsonl(qa("Q3?", "A3.")).encode()
    report = ingest(db, layout, drop(DOMAIN, "latin1.jsonl", content))

    assert report.examples_added == 2
    column = bad.index(b"\xe9") + 1
    assert errors(report) == [(2, f"not UTF-8 (invalid byte at column {column})")]
    assert report.errors[0].offset == len(good.encode())


def test_not_utf8_csv_row_is_reported_by_line(db, layout, drop):
    content = b"prompt,completion\nQ1?,A1.\ncaf\xe9?,A2.\nQ3?,A3.\n"
    report = ingest(db, layout, drop(DOMAIN, "latin1.csv", content))

    assert bodies(db) == [as_chat("Q1?", "A1."), as_chat("Q3?", "A3.")]
    assert errors(report) == [(3, "not UTF-8 (invalid bytes in this row)")]


def test_not_utf8_text_line_is_reported_by_line_and_the_rest_kept(db, layout, drop):
    content = b"First line.\nSecond caf\xe9 line.\nThird line.\n"
    report = ingest(db, layout, drop(DOMAIN, "latin1.txt", content))

    assert bodies(db) == ["First line.\nThird line."]
    assert errors(report) == [(2, "not UTF-8 (invalid byte at column 11)")]
    assert report.errors[0].offset == len(b"First line.\n")


def test_not_utf8_byte_in_a_json_array_rejects_its_record_and_the_rest_is_kept(db, layout, drop):
    """Before: the whole array stopped at the bad byte (91,663 of 200k records kept, one
    rejection reported)."""
    records = [orjson.dumps(qa(f"Q{i}?", f"A{i}.")) for i in range(300)]
    records[100] = b'{"text": "caf\xe9"}'
    content = b"[\n" + b",\n".join(records) + b"\n]\n"
    path = drop(DOMAIN, "latin1.json", content)

    report = ingest(db, layout, path)

    assert report.status == "ingested"
    assert report.examples_added == 299 and report.records_rejected == 1
    assert report.examples_added + report.records_rejected == len(records)
    offset = content.index(b"\xe9")
    assert errors(report) == [(102, f"not UTF-8 (invalid byte at byte offset {offset})")]
    assert report.errors[0].offset == content.index(b'{"text"')


def test_jsonl_whose_first_line_is_an_array_is_still_read_line_by_line(db, layout, drop):
    """Before: read as one JSON array; the 500 lines after it were ignored."""
    content = '[{"prompt": "Q", "completion": "A"}]\n' + "".join(
        jsonl(qa(f"Q{i}?", f"A{i}.")) for i in range(500)
    )
    report = ingest(db, layout, drop(DOMAIN, "arr.jsonl", content))

    assert report.format == "jsonl"
    assert report.examples_added == 500 and report.records_rejected == 1
    assert [line for line, _ in errors(report)] == [1]


def test_jsonl_line_over_the_record_size_limit_is_rejected_unread_and_the_rest_kept(
    db, layout, drop
):
    """Before: the whole line was held and parsed (4x a 50 MB line in memory); now a line
    over max_record_bytes is read past in pieces and rejected at its line and offset."""
    big = orjson.dumps(qa("big " + "z" * 5000, "answer")).decode()
    content = jsonl(qa("Q1?", "A1.")) + big + "\n" + jsonl(qa("Q2?", "A2."))
    path = drop(DOMAIN, "big-line.jsonl", content)

    report = ingest(db, layout, path, max_record_bytes=4096)

    assert report.examples_added == 2 and report.records_rejected == 1
    assert errors(report) == [
        (2, f"record too large: {len(big) + 1:,} bytes on one line (at most 4,096)")
    ]
    assert [b[0]["content"] for b in bodies(db)] == ["Q1?", "Q2?"]
    assert [line for *_, line, _ in examples(db)] == [1, 3]


def test_csv_quote_never_closed_rejects_its_row_and_keeps_the_rows_after(db, layout, drop):
    """Before: the 1,000 rows after the quote became one 9,804-character example."""
    rows = [f"Q{i}?,A{i}." for i in range(1000)]
    content = "prompt,completion\nQa?,Aa.\n" + 'Qb?,"Ab.\n' + "\n".join(rows) + "\n"
    report = ingest(db, layout, drop(DOMAIN, "quote.csv", content))

    assert report.records_rejected == 1
    assert report.examples_added == 1001
    [(line, reason)] = errors(report)
    assert line == 3 and "never closed" in reason
    stored = db.execute("SELECT line FROM examples ORDER BY line").fetchall()
    assert [n for (n,) in stored] == [2, *range(4, 1004)]  # each row at its own line
    assert bodies(db)[1] == as_chat("Q0?", "A0.")


# --- whole files that cannot be read ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        (
            "image.jsonl",
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
            "binary file (NUL byte at offset 8)",
        ),
        ("zeros.txt", b"\x00" * 64, "binary file (NUL byte at offset 0)"),
        ("empty.jsonl", b"", "empty file: no records"),
        ("blank.csv", b"  \n\n\t\n", "empty file: no records"),
        ("table.parquet", b"PAR1 some columns", "unsupported file type '.parquet'"),
        ("README", b"some words", "unsupported file type 'README'"),
    ],
)
def test_unreadable_file_is_rejected_with_a_reason_and_kept_in_rejected(
    db, layout, drop, name, content, reason
):
    path = drop(DOMAIN, name, content)

    report = ingest(db, layout, path)

    assert report.status == "rejected"
    assert report.reason.startswith(reason)
    assert errors(report) == [(None, report.reason)]
    assert report.examples_added == 0
    assert count(db, "examples") == 0
    assert Path(report.stored_path) == layout.rejected / DOMAIN / name
    assert_kept(path, report, layout.rejected / DOMAIN, content)
    on_disk = report_on_disk(report)
    assert on_disk["reason"] == report.reason
    assert db.execute(
        "SELECT status, reason, stored_path FROM files WHERE id = ?", [report.file_id]
    ).fetchone() == ("rejected", report.reason, report.stored_path)


def test_unsupported_type_message_lists_the_supported_ones(db, layout, drop):
    report = ingest(db, layout, drop(DOMAIN, "data.xlsx", b"PK not really"))
    assert report.reason.endswith("(supported: .jsonl .ndjson .json .csv .tsv .txt .md)")


def test_file_where_every_record_is_bad_is_rejected_with_its_errors(db, layout, drop):
    content = '{"foo": 1}\nnot json\n'
    path = drop(DOMAIN, "allbad.jsonl", content)

    report = ingest(db, layout, path)

    assert report.status == "rejected"
    assert report.reason == "no usable example in the file (2 records rejected)"
    assert [line for line, _ in errors(report)] == [1, 2]
    assert_kept(path, report, layout.rejected / DOMAIN, content.encode())


def test_empty_json_array_is_rejected_as_having_no_usable_example(db, layout, drop):
    report = ingest(db, layout, drop(DOMAIN, "none.json", "[ ]\n"))
    assert (report.status, report.reason) == ("rejected", "no usable example in the file")


def test_rejected_name_clash_gets_a_numbered_name_and_both_are_kept(db, layout, drop):
    first = ingest(db, layout, drop(DOMAIN, "x.bin", b"\x00one"))
    second = ingest(db, layout, drop(DOMAIN, "x.bin", b"\x00two"))

    assert Path(first.stored_path) == layout.rejected / DOMAIN / "x.bin"
    assert Path(second.stored_path) == layout.rejected / DOMAIN / "x~2.bin"
    assert Path(first.stored_path).read_bytes() == b"\x00one"
    assert Path(second.stored_path).read_bytes() == b"\x00two"


# --- CSV specifics ---------------------------------------------------------------------------


def test_csv_row_of_empty_cells_is_reported_not_silently_skipped(db, layout, drop):
    content = "prompt,completion\nQ1?,A1.\n,\n\nQ4?,A4.\n"
    report = ingest(db, layout, drop(DOMAIN, "gaps.csv", content))

    assert bodies(db) == [as_chat("Q1?", "A1."), as_chat("Q4?", "A4.")]
    assert errors(report) == [(3, "empty content in 'prompt'")]
    assert (report.records, report.records_rejected) == (3, 1)


def test_csv_row_with_the_wrong_number_of_fields_is_reported(db, layout, drop):
    content = "prompt,completion\nQ1?,A1.\nQ2?,A2.,extra\nQ3?\n"
    report = ingest(db, layout, drop(DOMAIN, "ragged.csv", content))

    assert bodies(db) == [as_chat("Q1?", "A1.")]
    assert errors(report) == [
        (3, "row has 3 fields, the header has 2"),
        (4, "row has 1 fields, the header has 2"),
    ]


def test_csv_without_usable_header_columns_is_rejected_naming_what_it_found(db, layout, drop):
    content = "name,age\nBob,3\n"
    path = drop(DOMAIN, "people.csv", content)

    report = ingest(db, layout, path)

    assert report.status == "rejected"
    assert len(report.errors) == 1
    assert report.errors[0].line == 1
    assert report.errors[0].reason.startswith("CSV header has no usable columns (found: name, age)")
    assert_kept(path, report, layout.rejected / DOMAIN, content.encode())


def test_csv_field_over_the_csv_module_limit_is_reported_at_its_line(db, layout, drop):
    content = "prompt,completion\nQ1?,A1.\n" + "x" * 200_000 + ",A2.\nQ3?,A3.\n"
    path = drop(DOMAIN, "huge-cell.csv", content)

    report = ingest(db, layout, path)

    assert report.status == "ingested"
    assert bodies(db) == [as_chat("Q1?", "A1."), as_chat("Q3?", "A3.")]
    assert [line for line, _ in errors(report)] == [3]
    assert report.errors[0].reason.startswith("bad CSV:")
    assert "field larger than field limit" in report.errors[0].reason


def test_csv_stray_carriage_return_is_reported_at_its_line(db, layout, drop):
    content = b"prompt,completion\nQ1?,A1.\nQ2?\rmore,A2.\nQ3?,A3.\n"
    report = ingest(db, layout, drop(DOMAIN, "cr.csv", content))

    assert report.status == "ingested"
    assert bodies(db) == [as_chat("Q1?", "A1."), as_chat("Q3?", "A3.")]
    assert [line for line, _ in errors(report)] == [3]
    assert report.errors[0].reason.startswith("bad CSV: a carriage return")


def test_csv_with_old_mac_line_endings_is_rejected_with_a_reason(db, layout, drop):
    content = b"prompt,completion\rQ1?,A1.\rQ2?,A2.\r"
    path = drop(DOMAIN, "mac.csv", content)

    report = ingest(db, layout, path)

    assert report.status == "rejected"
    assert [line for line, _ in errors(report)] == [1]
    assert "carriage return" in report.errors[0].reason
    assert_kept(path, report, layout.rejected / DOMAIN, content)


# --- duplicates ------------------------------------------------------------------------------


def test_redropping_the_same_content_is_a_duplicate_kept_under_a_numbered_name(db, layout, drop):
    content = jsonl(qa("Q1?", "A1."), qa("Q2?", "A2."))
    first = ingest(db, layout, drop(DOMAIN, "a.jsonl", content))
    again = drop(DOMAIN, "a.jsonl", content)

    second = ingest(db, layout, again)

    assert first.status == "ingested"
    assert second.status == "duplicate"
    assert (second.examples_added, second.records) == (0, 0)
    assert second.duplicate_of.startswith(f"a.jsonl (file #{first.file_id}, ingested ")
    assert second.reason == "the same content was already ingested into this domain"
    assert count(db, "examples") == 2
    assert Path(first.stored_path) == layout.done / DOMAIN / "a.jsonl"
    assert Path(second.stored_path) == layout.done / DOMAIN / "a~2.jsonl"
    assert Path(first.stored_path).read_bytes() == content.encode()
    assert_kept(again, second, layout.done / DOMAIN, content.encode())
    assert db.execute("SELECT id, status, duplicate_of FROM files ORDER BY id").fetchall() == [
        (first.file_id, "ingested", None),
        (second.file_id, "duplicate", first.file_id),
    ]

    third = ingest(db, layout, drop(DOMAIN, "a.jsonl", content))
    assert (third.status, Path(third.stored_path).name) == ("duplicate", "a~3.jsonl")


def test_same_content_under_another_name_is_a_duplicate(db, layout, drop):
    content = jsonl(qa("Q?", "A."))
    first = ingest(db, layout, drop(DOMAIN, "a.jsonl", content))
    second = ingest(db, layout, drop(DOMAIN, "copy.jsonl", content))

    assert second.status == "duplicate"
    assert second.duplicate_of.startswith(f"a.jsonl (file #{first.file_id},")
    assert Path(second.stored_path) == layout.done / DOMAIN / "copy.jsonl"


def test_same_name_with_new_content_is_ingested_under_a_numbered_name(db, layout, drop):
    first = ingest(db, layout, drop(DOMAIN, "daily.jsonl", jsonl(qa("Q1?", "A1."))))
    second = ingest(db, layout, drop(DOMAIN, "daily.jsonl", jsonl(qa("Q2?", "A2."))))

    assert (first.status, second.status) == ("ingested", "ingested")
    assert Path(second.stored_path) == layout.done / DOMAIN / "daily~2.jsonl"
    assert bodies(db) == [as_chat("Q1?", "A1."), as_chat("Q2?", "A2.")]
    assert Path(first.stored_path).exists() and Path(second.stored_path).exists()


def test_duplicate_examples_across_files_are_counted_not_stored_twice(db, layout, drop):
    first = ingest(db, layout, drop(DOMAIN, "one.jsonl", jsonl(qa("A?", "a"), qa("B?", "b"))))
    second = ingest(
        db,
        layout,
        drop(DOMAIN, "two.jsonl", jsonl(qa("B?", "b"), qa("C?", "c"), qa("B?", "b"))),
    )

    assert (first.examples_added, first.examples_duplicate) == (2, 0)
    assert (second.status, second.examples_added, second.examples_duplicate) == ("ingested", 1, 2)
    assert [(body, file_id) for _, body, _, file_id in examples(db)] == [
        (as_chat("A?", "a"), first.file_id),
        (as_chat("B?", "b"), first.file_id),
        (as_chat("C?", "c"), second.file_id),
    ]


def test_same_example_in_different_record_formats_is_stored_once(db, layout, drop):
    content = jsonl(
        qa("Q?", "A."),
        {"prompt": "Q?", "completion": "A."},
        {"question": "Q?", "answer": "A."},
        {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]},
        {"instruction": "Q?", "output": "A."},
    )
    report = ingest(db, layout, drop(DOMAIN, "forms.jsonl", content))

    assert (report.examples_added, report.examples_duplicate) == (1, 4)
    assert bodies(db) == [as_chat("Q?", "A.")]


def test_file_whose_examples_are_all_known_is_ingested_with_only_duplicates(db, layout, drop):
    ingest(db, layout, drop(DOMAIN, "one.jsonl", jsonl(qa("A?", "a"))))
    report = ingest(db, layout, drop(DOMAIN, "again.jsonl", jsonl(qa("A?", "a")) + "\n"))

    # Different bytes, so not a duplicate file; every example already known.
    assert (report.status, report.examples_added, report.examples_duplicate) == ("ingested", 0, 1)
    assert Path(report.stored_path).parent == layout.done / DOMAIN
    assert count(db, "examples") == 1


def test_same_content_in_another_domain_is_ingested_again(db, layout, drop):
    content = jsonl(qa("Q1?", "A1."), qa("Q2?", "A2."))
    legal = ingest(db, layout, drop("legal", "a.jsonl", content), "legal")
    medical = ingest(db, layout, drop("medical", "a.jsonl", content), "medical")

    assert (legal.status, medical.status) == ("ingested", "ingested")
    assert (legal.examples_added, medical.examples_added) == (2, 2)
    assert bodies(db, "legal") == bodies(db, "medical")
    assert Path(medical.stored_path) == layout.done / "medical" / "a.jsonl"
    assert Path(legal.stored_path) == layout.done / "legal" / "a.jsonl"


def test_rejected_content_dropped_again_is_rejected_again_not_a_duplicate(db, layout, drop):
    first = ingest(db, layout, drop(DOMAIN, "bad.jsonl", "nope\n"))
    second = ingest(db, layout, drop(DOMAIN, "bad.jsonl", "nope\n"))

    assert (first.status, second.status) == ("rejected", "rejected")
    assert Path(second.stored_path) == layout.rejected / DOMAIN / "bad~2.jsonl"


# --- the report beside the file --------------------------------------------------------------


def _file_with_errors(drop):
    return drop(DOMAIN, "r.jsonl", jsonl(qa("Q?", "A."), {"x": 1}, qa("Q?", "A.")) + "{oops\n")


@pytest.mark.parametrize("kind", ["with errors", "rejected", "duplicate"])
def test_report_beside_the_file_matches_the_database(db, layout, drop, kind):
    if kind == "with errors":
        report = ingest(db, layout, _file_with_errors(drop))
    elif kind == "rejected":
        report = ingest(db, layout, drop(DOMAIN, "bin.jsonl", b"ab\x00cd"))
    else:
        ingest(db, layout, _file_with_errors(drop))
        report = ingest(db, layout, _file_with_errors(drop))
        assert report.status == "duplicate"

    on_disk = report_on_disk(report)

    assert on_disk == orjson.loads(report.to_json())
    assert on_disk == orjson.loads(load_report(db, report.file_id).to_json())
    row = next(db.query("SELECT * FROM files WHERE id = ?", [report.file_id]))
    for key in (
        "status",
        "sha256",
        "size",
        "stored_path",
        "format",
        "records",
        "examples_added",
        "examples_duplicate",
        "records_rejected",
        "reason",
        "ingested_at",
    ):
        assert on_disk[key] == row[key], key
    assert row["report_path"] == report.stored_path + ".report.json"
    assert on_disk["file"] == row["name"]
    assert on_disk["file_id"] == row["id"]
    assert count(db, "examples", "file_id = ?", [row["id"]]) == on_disk["examples_added"]
    stored_errors = db.execute(
        "SELECT line, byte_offset, reason FROM file_errors WHERE file_id = ? ORDER BY id",
        [row["id"]],
    ).fetchall()
    assert stored_errors == [(e["line"], e["offset"], e["reason"]) for e in on_disk["errors"]]
    assert on_disk["size"] == Path(report.stored_path).stat().st_size


def test_report_of_a_file_with_errors_has_the_expected_content(db, layout, drop):
    report = ingest(db, layout, _file_with_errors(drop))
    on_disk = report_on_disk(report)

    assert on_disk["status"] == "ingested"
    assert on_disk["format"] == "jsonl"
    assert (on_disk["records"], on_disk["examples_added"], on_disk["examples_duplicate"]) == (
        4,
        1,
        1,
    )
    assert on_disk["records_rejected"] == 2
    assert [e["line"] for e in on_disk["errors"]] == [2, 4]
    assert on_disk["errors_by_reason"] == {"unrecognised record": 1, "bad JSON": 1}
    assert on_disk["domain"] == DOMAIN


# --- crash between commit and move -----------------------------------------------------------


def _crash_after_commit(report: FileReport, inbox_path: Path, report_written: bool) -> None:
    """Put the world back as it was after the commit, before `_finish` moved the file.

    The row is committed and names the stored path; the file is still at its inbox path and
    the stored copy does not exist (the move never happened). `_finish` writes the report
    first, so a crash may have left the report written or not.
    """
    os.replace(report.stored_path, inbox_path)
    if not report_written:
        Path(report.stored_path + ".report.json").unlink()


@pytest.mark.parametrize("report_written", [False, True])
def test_ingesting_again_after_a_crash_before_the_move_finishes_the_move(
    db, layout, drop, report_written
):
    content = jsonl(qa("Q1?", "A1."), qa("Q2?", "A2."), {"bad": 1})
    path = drop(DOMAIN, "a.jsonl", content)
    report = ingest(db, layout, path)
    _crash_after_commit(report, path, report_written)
    rows_before = db.execute("SELECT * FROM files").fetchall()

    again = ingest(db, layout, path)

    assert again.status == "ingested"  # not 'duplicate' of itself
    assert again.file_id == report.file_id
    assert again.stored_path == report.stored_path
    assert db.execute("SELECT * FROM files").fetchall() == rows_before
    assert count(db, "examples") == 2
    assert count(db, "file_errors") == 1
    assert_kept(path, again, layout.done / DOMAIN, content.encode())
    assert report_on_disk(again) == orjson.loads(report.to_json())
    assert not (layout.done / DOMAIN / "a~2.jsonl").exists()


def test_crash_before_moving_a_rejected_file_is_finished_into_rejected(db, layout, drop):
    path = drop(DOMAIN, "blob.jsonl", b"\x00\x01")
    report = ingest(db, layout, path)
    _crash_after_commit(report, path, report_written=False)

    again = ingest(db, layout, path)

    assert (again.status, again.file_id) == ("rejected", report.file_id)
    assert count(db, "files") == 1
    assert_kept(path, again, layout.rejected / DOMAIN, b"\x00\x01")


def test_crash_before_moving_a_duplicate_is_finished_without_another_row(db, layout, drop):
    content = jsonl(qa("Q?", "A."))
    ingest(db, layout, drop(DOMAIN, "a.jsonl", content))
    again_path = drop(DOMAIN, "a.jsonl", content)
    dup = ingest(db, layout, again_path)
    _crash_after_commit(dup, again_path, report_written=False)

    finished = ingest(db, layout, again_path)

    assert (finished.status, finished.file_id) == ("duplicate", dup.file_id)
    assert Path(finished.stored_path) == layout.done / DOMAIN / "a~2.jsonl"
    assert count(db, "files") == 2
    assert count(db, "examples") == 1
    assert_kept(again_path, finished, layout.done / DOMAIN, content.encode())
    assert report_on_disk(finished)["duplicate_of"] == dup.duplicate_of


def test_a_completed_ingest_is_not_mistaken_for_an_unfinished_move(db, layout, drop):
    # The stored copy exists, so the same content at the same inbox path is a new drop.
    content = jsonl(qa("Q?", "A."))
    first = ingest(db, layout, drop(DOMAIN, "a.jsonl", content))
    second = ingest(db, layout, drop(DOMAIN, "a.jsonl", content))

    assert second.file_id != first.file_id
    assert second.status == "duplicate"
    assert count(db, "files") == 2


def test_stored_name_taken_by_something_else_on_disk_is_stepped_around(db, layout, drop):
    content = jsonl(qa("Q?", "A."))
    path = drop(DOMAIN, "a.jsonl", content)
    (layout.done / DOMAIN / "a.jsonl").mkdir(parents=True)  # not a file, and no row names it

    report = ingest(db, layout, path)

    assert Path(report.stored_path) == layout.done / DOMAIN / "a~2.jsonl"
    assert (layout.done / DOMAIN / "a.jsonl").is_dir()
    assert_kept(path, report, layout.done / DOMAIN, content.encode())


# --- only regular files -------------------------------------------------------------------


def _not_regular(layout: Path, kind: str, secret: Path) -> Path:
    """A link to a readable file, a dangling link, a link to a folder, or a FIFO in the
    inbox, as someone who can write to it (not the service user) could place there."""
    folder = layout.inbox / DOMAIN
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}.jsonl"
    if kind == "link":
        path.symlink_to(secret)
    elif kind == "dangling":
        path.symlink_to(secret.parent / "gone.jsonl")
    elif kind == "folder-link":
        path.symlink_to(secret.parent, target_is_directory=True)
    else:
        os.mkfifo(path)
    return path


@pytest.mark.parametrize(
    "kind, what",
    [
        ("link", "a symbolic link"),
        ("dangling", "a symbolic link"),
        ("folder-link", "a symbolic link"),
        ("fifo", "a FIFO (named pipe)"),
    ],
)
def test_only_regular_files_are_read_the_rest_is_reported_and_moved_aside(
    db, layout, tmp_path, kind, what
):
    secret = tmp_path / "private" / "secret.jsonl"
    secret.parent.mkdir()
    secret.write_text(jsonl(qa("What is the root password?", "hunter2")))
    path = _not_regular(layout, kind, secret)

    done = []
    worker = threading.Thread(target=lambda: done.append(ingest(db, layout, path)), daemon=True)
    worker.start()
    worker.join(10)  # a FIFO opened for reading would block here until someone writes
    assert done, "ingesting a FIFO blocked"
    [report] = done

    assert report.status == "rejected"
    assert report.reason.startswith(what) and "regular files only" in report.reason
    assert errors(report) == [(None, report.reason)]
    assert count(db, "examples") == 0  # the linked file was never read
    stored = Path(report.stored_path)
    assert stored.parent == layout.rejected / DOMAIN
    assert not os.path.lexists(path)
    # the link itself (or the FIFO) was moved, never what it points to
    assert os.path.lexists(stored) and stored.is_symlink() == (kind != "fifo")
    assert secret.read_text().startswith('{"messages"')
    assert report_on_disk(report)["reason"] == report.reason
    assert db.execute(
        "SELECT status, reason FROM files WHERE id = ?", [report.file_id]
    ).fetchone() == ("rejected", report.reason)


def test_a_file_name_that_is_not_utf8_is_ingested_and_stored_under_a_readable_name(db, layout):
    """Before: a traceback (the name could not be stored), and the file stayed for ever."""
    folder = layout.inbox / DOMAIN
    folder.mkdir(parents=True)
    raw = os.path.join(os.fsencode(folder), b"caf\xe9.jsonl")
    content = jsonl(qa("Q?", "A."))
    with open(raw, "wb") as f:
        f.write(content.encode())
    path = Path(os.fsdecode(raw))

    report = ingest(db, layout, path)

    assert report.status == "ingested" and report.examples_added == 1
    assert report.file == "caf\\xe9.jsonl"
    assert Path(report.stored_path) == layout.done / DOMAIN / "caf\\xe9.jsonl"
    assert_kept(path, report, layout.done / DOMAIN, content.encode())
    assert report_on_disk(report)["file"] == "caf\\xe9.jsonl"


# --- names at the file system's limit (NAME_MAX, 255 bytes) ---------------------------------


def name_bytes(path: Path | str) -> int:
    return len(os.fsencode(Path(path).name))


def test_a_file_name_of_250_bytes_is_stored_with_its_report(db, layout, drop):
    """Before: the report `<name>.report.json` (and its temporary name) went past NAME_MAX
    after the commit; the file was retried for ever with a traceback, never finished."""
    name = "q" * 244 + ".jsonl"
    assert name_bytes(name) == 250
    content = jsonl(qa("Q1?", "A1."), qa("Q2?", "A2."))
    first = drop(DOMAIN, name, content)
    report = ingest(db, layout, first)
    assert report.status == "ingested" and report.examples_added == 2
    assert report.file == name  # the report says which file it was, in full
    assert_kept(first, report, layout.done / DOMAIN, content.encode())
    stored = Path(report.stored_path)
    assert stored.suffix == ".jsonl" and stored.name.startswith("q" * 200)
    assert Path(report.stored_path + ".report.json").is_file()
    # the same name again, new content: a numbered name, shortened to fit too
    again = drop(DOMAIN, name, jsonl(qa("Q3?", "A3.")))
    second = ingest(db, layout, again)
    assert second.status == "ingested" and second.examples_added == 1
    assert second.stored_path != report.stored_path and "~2.jsonl" in second.stored_path
    assert_kept(again, second, layout.done / DOMAIN, jsonl(qa("Q3?", "A3.")).encode())
    for r in (report, second):
        assert name_bytes(r.stored_path + ".report.json") <= 255
    assert [p for p in layout.inbox.rglob("*") if p.is_file()] == []


def test_a_255_byte_name_that_is_not_utf8_is_stored_under_a_readable_name_that_fits(db, layout):
    """Each bad byte is written \\xNN in the stored name: four bytes for one."""
    folder = layout.inbox / DOMAIN
    folder.mkdir(parents=True)
    raw = os.path.join(os.fsencode(folder), b"\xe9" * 249 + b".jsonl")
    with open(raw, "wb") as f:
        f.write(jsonl(qa("Q?", "A.")).encode())
    path = Path(os.fsdecode(raw))

    report = ingest(db, layout, path)

    assert report.status == "ingested" and report.examples_added == 1
    assert report.file == "\\xe9" * 249 + ".jsonl"
    assert not path.exists()
    assert Path(report.stored_path).is_file() and report.stored_path.endswith(".jsonl")
    assert report_on_disk(report)["file"] == report.file
    assert name_bytes(report.stored_path + ".report.json") <= 255


def test_a_rejected_file_with_a_long_name_is_kept_in_rejected_with_its_report(db, layout, drop):
    path = drop(DOMAIN, "r" * 245 + ".xlsx", b"PK not a table")
    report = ingest(db, layout, path)
    assert report.status == "rejected"
    assert_kept(path, report, layout.rejected / DOMAIN, b"PK not a table")
    assert name_bytes(report.stored_path + ".report.json") <= 255


@pytest.mark.parametrize("where", ["done", "rejected", "inbox"])
def test_a_linked_folder_in_the_home_is_refused_before_anything_is_stored(
    db, layout, drop, tmp_path, where
):
    """done/<domain>, rejected/<domain> or inbox/<domain> planted as a link to a folder
    elsewhere: nothing is written or moved through it, and nothing is stored."""
    from evertune.store.errors import UnsafeFolderError

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    if where == "inbox":
        (outside / "a.jsonl").write_text(jsonl(qa("Q?", "A.")))
        (layout.inbox / DOMAIN).symlink_to(outside, target_is_directory=True)
        path = layout.inbox / DOMAIN / "a.jsonl"
    else:
        (getattr(layout, where) / DOMAIN).symlink_to(outside, target_is_directory=True)
        path = drop(DOMAIN, "a.jsonl", jsonl(qa("Q?", "A.")))
    link = getattr(layout, where) / DOMAIN
    with pytest.raises(UnsafeFolderError) as caught:
        ingest(db, layout, path)
    assert str(caught.value).startswith(f"{link} is a symbolic link (to {outside})")
    assert path.exists()
    assert [p.name for p in outside.iterdir()] == (["a.jsonl"] if where == "inbox" else [])
    assert count(db, "files") == 0 and count(db, "examples") == 0


def test_a_long_named_file_stuck_after_its_commit_is_finished_under_a_name_that_fits(
    db, layout, drop, monkeypatch
):
    """A file stored before names were fitted: its row promised done/<250-byte name>, whose
    report could not be written, and every retry failed again. Now the retry finishes it."""
    from evertune.store import ingest as ingest_mod
    from evertune.store.files import free_name

    name = "s" * 244 + ".jsonl"
    content = jsonl(qa("Q?", "A."))
    path = drop(DOMAIN, name, content)
    with monkeypatch.context() as m:  # as names were chosen before: no room for the report
        m.setattr(ingest_mod, "_stored_name", lambda db, folder, n: free_name(db, folder, n))
        with pytest.raises(OSError, match="File name too long"):
            ingest(db, layout, path)
    assert path.exists() and count(db, "examples") == 1  # committed, not moved

    report = ingest(db, layout, path)

    assert report.status == "ingested" and report.examples_added == 1
    assert_kept(path, report, layout.done / DOMAIN, content.encode())
    assert count(db, "examples") == 1 and count(db, "files") == 1
    assert db.execute("SELECT stored_path, report_path FROM files").fetchone() == (
        report.stored_path,
        report.stored_path + ".report.json",
    )


# --- a file still written while it is read (no kernel lease to tell) -------------------------


def halves(n: int = 200) -> tuple[str, str]:
    records = [qa(f"Q{i}?", f"A{i}.") for i in range(n)]
    return jsonl(*records[: n // 2]), jsonl(*records[n // 2 :])


def test_a_file_written_to_while_it_is_read_is_not_stored_and_is_read_again(db, layout, drop):
    """Before: 100 of 200 records stored and the report said 100; the file moved to done/
    where its writer then finished it: 200 records there, nothing telling anyone."""
    from evertune.store.errors import FileChangedError

    first, rest = halves()
    path = drop(DOMAIN, "growing.jsonl", first)

    def writer_goes_on(done: int, total: int) -> None:
        if done >= total and path.stat().st_size == len(first):  # read to its end so far
            with path.open("a") as f:
                f.write(rest)

    with pytest.raises(FileChangedError) as caught:
        ingest_file(db, layout, path, DOMAIN, IngestLimits(batch_size=10), writer_goes_on)
    message = str(caught.value)
    assert message.startswith(f"{path} changed ({len(first)} -> {len(first + rest)} bytes)")
    assert "Nothing of it was stored and it stays in the inbox" in message
    assert path.read_text() == first + rest
    assert count(db, "files") == 0 and count(db, "examples") == 0
    assert [p for p in layout.done.rglob("*")] == []

    report = ingest(db, layout, path)  # once it has settled

    assert report.status == "ingested" and report.examples_added == 200
    assert report.records == 200
    assert_kept(path, report, layout.done / DOMAIN, (first + rest).encode())


def test_a_file_written_to_after_the_commit_is_not_moved_and_its_rest_is_stored(
    db, layout, drop, monkeypatch
):
    """The last moment before the move: the writer appends while the report is written."""
    from evertune.store import ingest as ingest_mod
    from evertune.store.errors import FileChangedError

    first, rest = halves()
    path = drop(DOMAIN, "growing.jsonl", first)
    real_write = ingest_mod.write_atomic

    def report_then_append(target: Path, data: bytes) -> None:
        real_write(target, data)
        if path.stat().st_size == len(first):
            with path.open("a") as f:
                f.write(rest)

    monkeypatch.setattr(ingest_mod, "write_atomic", report_then_append)
    with pytest.raises(FileChangedError):
        ingest(db, layout, path)
    assert path.read_text() == first + rest  # not moved: the writer's rest is not lost

    report = ingest(db, layout, path)

    assert report.status == "ingested"
    assert (report.examples_added, report.examples_duplicate) == (100, 100)
    assert_kept(path, report, layout.done / DOMAIN, (first + rest).encode())
    assert count(db, "examples") == 200
