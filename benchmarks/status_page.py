"""The status page with hundreds of versions: what the daemon computes for each refresh.

    python benchmarks/status_page.py [--versions 500] [--domains 4]

Builds a real store (SQLite file) with `--domains` domains of `--versions` versions each,
as the daemon records them (metrics with the gate's figures, timing and the per-epoch
training curve; a run and a trained example per version), then times, median of 9:
  page     evertune.daemon.control.status_page.page_data: what GET /status/data.json answers
  status   the `evertune status --json` report of the same store (the baseline: what the
           CLI already computes for every call)
and prints the JSON size the browser downloads every refresh (5 s). Target: the page's
data in well under a second with hundreds of versions (the page redraws every 5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def build(home: Path, domains: int, versions: int) -> None:
    from evertune.store.db import open_db, utcnow

    db = open_db(home / "evertune.db")
    now = utcnow()
    ex = 0
    for d in range(domains):
        dom = f"d{d}"
        db.execute(
            "INSERT INTO files (domain, name, inbox_path, stored_path, report_path, size,"
            " sha256, status, received_at, ingested_at, examples_added)"
            " VALUES (?, 'a', ?, ?, ?, 1, 'x', 'ingested', ?, ?, ?)",
            [dom, f"i{d}", f"s{d}", f"r{d}", now, now, versions],
        )
        (fid,) = db.execute("SELECT max(id) FROM files").fetchone()
        for n in range(1, versions + 1):
            ex += 1
            run = db.execute(
                "INSERT INTO runs (domain, state, trigger, queued_at, started_at, finished_at)"
                " VALUES (?, 'succeeded', 'schedule', ?, ?, ?)",
                [dom, now, now, now],
            ).lastrowid
            metrics = {
                "drift": -0.1,
                "candidate": {"new_exact": 1.0, "easy_right": 40, "easy_total": 60},
                "base": {"easy_right": 38},
                "train": {
                    "seconds": 70,
                    "history": [{"epoch": e, "new_loss": 1 / e, "learned": 3} for e in range(1, 7)],
                },
                "timing": {"train_s": 70, "evaluate_s": 50},
            }
            vid = db.execute(
                "INSERT INTO versions (domain, number, state, run_id, path, metrics, created_at,"
                " promoted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    dom,
                    n,
                    "live" if n == versions else "retired",
                    run,
                    str(home / "adapters" / dom / f"v{n:04d}"),
                    json.dumps(metrics),
                    now,
                    now,
                ],
            ).lastrowid
            db.execute(
                "INSERT INTO examples (id, domain, kind, body, content_hash, chars, file_id,"
                " line) VALUES (?, ?, 'chat', '[]', ?, 2, ?, ?)",
                [ex, dom, ex.to_bytes(8, "big"), fid, n],
            )
            db.execute("INSERT INTO version_examples VALUES (?, ?, 'new')", [vid, ex])
    db.conn.commit()
    db.close()


def median_ms(fn, n: int = 9) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", type=int, default=500)
    ap.add_argument("--domains", type=int, default=4)
    args = ap.parse_args()

    from evertune.adapters.base_model import cpu_has_native_bf16
    from evertune.daemon import config as config_mod
    from evertune.daemon.control.status_page import page_data
    from evertune.daemon.status import status_report
    from evertune.store.db import open_db

    kind = "native bf16" if cpu_has_native_bf16() else "AVX2 only (no native bf16)"
    print(f"machine: {kind}, {os.cpu_count()} cores")
    home = Path(tempfile.mkdtemp(prefix="evertune-page-"))
    (home / "evertune.toml").write_text('[serve]\nmode = "none"\n')
    build(home, args.domains, args.versions)
    config = config_mod.load(home / "evertune.toml")
    db = open_db(home / "evertune.db", readonly=True)
    page = median_ms(lambda: page_data(db))
    status = median_ms(lambda: status_report(config))
    size = len(json.dumps(page_data(db))) / 1024
    print(f"{args.domains} domains x {args.versions} versions")
    print(f"  page     {page:8.1f} ms  ({size:.0f} KiB of JSON a refresh)")
    print(f"  status   {status:8.1f} ms  (baseline: evertune status --json)")
    print(f"  ratio: {page / status:.2f}x")


if __name__ == "__main__":
    main()
