"""Ingestion under a real crash and with a large file, each in a child Python process.

- SIGKILL in the middle of a file's transaction leaves nothing of that file in the store
  (no examples, no files row) and the file in the inbox; ingesting it again stores every
  example exactly once.
- A file of ~100 MB, JSONL or one JSON array, is ingested with flat memory (the readers
  stream; the parse queue is bounded), measured as the child's peak RSS.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evertune.store.db import open_db
from evertune.store.ingest import ingest_file
from evertune.store.layout import HomeLayout

DOMAIN = "support"

CHILD = """
import json, sys
from pathlib import Path
from evertune.store.db import open_db
from evertune.store.ingest import ingest_file
from evertune.store.layout import HomeLayout

layout = HomeLayout(Path(sys.argv[1]))
db = open_db(layout.db_path)
report = ingest_file(db, layout, Path(sys.argv[2]), sys.argv[3])
db.close()
print(json.dumps({
    "status": report.status,
    "examples_added": report.examples_added,
    "records_rejected": report.records_rejected,
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child of a
    # large pytest process would report the parent's size; VmHWM is this process's own.
    "maxrss_kb": int(next(line.split()[1] for line in open("/proc/self/status")
                          if line.startswith("VmHWM:"))),
}))
"""

LINE = (
    '{"messages": [{"role": "user", "content": "How do I reset password %d?"},'
    ' {"role": "assistant", "content": "Open settings and choose reset (%d)."}]}\n'
)


def write_chats(path: Path, n: int) -> None:
    """n distinct short chat examples, written fast with plain string formatting."""
    path.parent.mkdir(parents=True, exist_ok=True)
    step = 50_000
    with path.open("w") as f:
        for start in range(0, n, step):
            f.write("".join(LINE % (i, i) for i in range(start, min(n, start + step))))


def start_child(layout: HomeLayout, path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(layout.home), str(path), DOMAIN],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigkill_mid_transaction_leaves_nothing_and_a_retry_stores_each_example_once(layout):
    n = 300_000
    path = layout.inbox / DOMAIN / "tickets.jsonl"
    write_chats(path, n)
    content_size = path.stat().st_size
    wal = Path(str(layout.db_path) + "-wal")

    child = start_child(layout, path)
    try:
        deadline = time.monotonic() + 25
        while child.poll() is None and time.monotonic() < deadline:
            if wal.exists() and wal.stat().st_size > 4 << 20:
                break
            time.sleep(0.005)
        assert child.poll() is None, (
            "the child finished before the WAL grew past 4 MB: the file is too small to catch"
            f" it mid-transaction\n{child.communicate()}"
        )
        assert wal.stat().st_size > 4 << 20, "the WAL did not grow within 25 s"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
    assert child.returncode == -signal.SIGKILL

    # The crash left uncommitted pages in the WAL and the file where it was dropped.
    assert wal.stat().st_size > 4 << 20
    assert path.exists() and path.stat().st_size == content_size
    assert not (layout.done / DOMAIN / path.name).exists()

    db = open_db(layout.db_path)  # what a restarted daemon does
    try:
        assert db.execute("SELECT count(*) FROM examples").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM files").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM file_errors").fetchone()[0] == 0

        report = ingest_file(db, layout, path, DOMAIN)

        assert report.status == "ingested"
        assert (report.examples_added, report.examples_duplicate) == (n, 0)
        assert report.records_rejected == 0
        total, distinct, files, lines = db.execute(
            "SELECT count(*), count(DISTINCT content_hash), count(DISTINCT file_id),"
            " max(line) FROM examples WHERE domain = ?",
            [DOMAIN],
        ).fetchone()
        assert (total, distinct, files, lines) == (n, n, 1, n)
        assert db.execute("SELECT count(*) FROM files").fetchone()[0] == 1
        last = json.loads(db.execute("SELECT body FROM examples WHERE line = ?", [n]).fetchone()[0])
        assert last[0]["content"] == f"How do I reset password {n - 1}?"
    finally:
        db.close()
    assert not path.exists()
    stored = layout.done / DOMAIN / path.name
    assert stored.stat().st_size == content_size
    assert Path(str(stored) + ".report.json").exists()


BIG_LINE = (
    '{"messages": [{"role": "user", "content": "Summarise ticket %d: %s"},'
    ' {"role": "assistant", "content": "Ticket %d is about %s"}]}\n'
)
FILLER = "the customer cannot log in after the update and has tried twice " * 7


def write_big(path: Path, n: int, *, array: bool) -> None:
    """n distinct ~1 KB chat examples, as JSONL or as one JSON array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sep = "," if array else ""
    step = 20_000
    with path.open("w") as f:
        f.write("[\n" if array else "")
        for start in range(0, n, step):
            f.write(
                "".join(
                    (sep if i else "") + BIG_LINE % (i, FILLER, i, FILLER)
                    for i in range(start, min(n, start + step))
                )
            )
        f.write("]\n" if array else "")


@pytest.mark.parametrize("name", ["big.jsonl", "big.json"])
def test_ingesting_a_100_mb_file_keeps_peak_memory_under_300_mb(layout, name):
    n = 100_000
    path = layout.inbox / DOMAIN / name
    write_big(path, n, array=name.endswith(".json"))
    size = path.stat().st_size
    assert size > 95 << 20

    child = start_child(layout, path)
    out, err = child.communicate(timeout=120)

    assert child.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["status"] == "ingested"
    assert (result["examples_added"], result["records_rejected"]) == (n, 0)
    peak_mb = result["maxrss_kb"] / 1024
    assert peak_mb < 300, f"peak RSS {peak_mb:.0f} MB while ingesting {size >> 20} MB"
    assert not path.exists()
    assert (layout.done / DOMAIN / name).stat().st_size == size


def test_a_50_mb_jsonl_line_is_rejected_without_holding_it_in_memory(layout):
    """Before: the line was read, decoded and parsed whole: 4x its size at the peak."""
    path = layout.inbox / DOMAIN / "one-huge-line.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.write(LINE % (0, 0))
        f.write('{"messages": [{"role": "user", "content": "')
        for _ in range(50):
            f.write("x" * (1 << 20))
        f.write('"}, {"role": "assistant", "content": "ok"}]}\n')
        f.write(LINE % (1, 1))

    child = start_child(layout, path)
    out, err = child.communicate(timeout=120)

    assert child.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert (result["status"], result["examples_added"], result["records_rejected"]) == (
        "ingested",
        2,
        1,
    )
    peak_mb = result["maxrss_kb"] / 1024
    assert peak_mb < 120, f"peak RSS {peak_mb:.0f} MB for a file with one 50 MB line"
