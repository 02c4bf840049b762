"""Property-based tests of ingestion (hypothesis): whatever a file holds, ingest_file
finishes, and every record is accounted for once: kept (new or duplicate) or rejected.

Each test builds a file from records it knows the count of, mixing valid examples with
junk (random text, random bytes, wrong shapes), and ingests it into a real home and a
real SQLite file, as tests/test_ingest.py does.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evertune.store.db import open_db
from evertune.store.ingest import IngestLimits, ingest_file
from evertune.store.layout import HomeLayout

SETTINGS = settings(
    max_examples=60,
    derandomize=True,  # the same examples on every run: CI cannot fail by the draw
    deadline=None,  # no wall-clock assertion (busy CI machines); a hang still fails the run
    suppress_health_check=[HealthCheck.too_slow],
)

# A line of a JSONL file: a valid example, JSON of another shape, text, or bytes.
valid = st.builds(
    lambda q, a: json.dumps({"prompt": q, "completion": a}).encode(),
    st.text(min_size=1, max_size=40).filter(str.strip),
    st.text(min_size=1, max_size=40).filter(str.strip),
)
other_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
).map(lambda v: json.dumps(v).encode())
junk_text = st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass"))
junk_bytes = st.binary(max_size=60)
LINE = st.one_of(valid, other_json, junk_text, junk_bytes).map(
    lambda b: b.replace(b"\n", b" ").replace(b"\r", b" ").replace(b"\x00", b" ")
)


def ingest_bytes(name: str, content: bytes):
    root = Path(tempfile.mkdtemp(prefix="evertune-props-"))
    try:
        layout = HomeLayout(root / "home")
        layout.create()
        db = open_db(layout.db_path)
        try:
            path = layout.inbox / "legal" / name
            path.parent.mkdir(parents=True)
            path.write_bytes(content)
            report = ingest_file(db, layout, path, "legal", IngestLimits(max_example_chars=500))
            stored = db.execute("SELECT count(*) FROM examples").fetchone()[0]
            return report, stored
        finally:
            db.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def kept(report) -> int:
    return report.examples_added + report.examples_duplicate


@SETTINGS
@given(st.lists(LINE, max_size=30))
def test_jsonl_every_line_is_kept_or_rejected_once(lines):
    content = b"\n".join(lines) + b"\n"
    report, stored = ingest_bytes("f.jsonl", content)
    records = sum(1 for line in lines if line.strip())  # blank lines are layout
    if records == 0 or not content.strip():
        assert report.status == "rejected"
        return
    assert kept(report) + report.records_rejected == records
    assert stored == report.examples_added


cell = st.text(max_size=30).map(lambda t: t.replace("\x00", ""))


@SETTINGS
@given(st.lists(st.lists(cell, min_size=1, max_size=4), max_size=30))
def test_csv_every_row_is_kept_or_rejected_once(rows):
    out = io.StringIO()
    # every cell quoted: unquoted, a row of one "\r" cell is written as a blank line
    writer = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_ALL)
    writer.writerow(["prompt", "completion"])
    writer.writerows(rows)
    report, stored = ingest_bytes("f.csv", out.getvalue().encode())
    records = len(rows)
    if records == 0:
        assert report.status == "rejected"
        return
    assert kept(report) + report.records_rejected == records
    assert stored == report.examples_added


@SETTINGS
@given(st.lists(st.one_of(valid, other_json), max_size=30), st.sampled_from([b"\n", b" ", b""]))
def test_json_array_every_element_is_kept_or_rejected_once(elements, sep):
    content = b"[" + (b"," + sep).join(elements) + b"]"
    report, stored = ingest_bytes("f.json", content)
    if not elements:
        assert report.status == "rejected"
        return
    assert kept(report) + report.records_rejected == len(elements)
    assert stored == report.examples_added


@SETTINGS
@given(st.binary(max_size=400), st.sampled_from(["f.jsonl", "f.json", "f.csv", "f.txt"]))
def test_any_bytes_in_any_format_are_reported_not_a_crash(content, name):
    report, stored = ingest_bytes(name, content)
    assert report.status in ("ingested", "rejected")
    assert stored == report.examples_added
    assert report.records_rejected == 0 or report.errors
