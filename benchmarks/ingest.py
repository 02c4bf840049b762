"""Ingestion throughput and memory: examples/s into a fresh store, and peak RSS.

    python benchmarks/ingest.py [--examples 200000] [--sizes 200000,1000000]

Generates two chat JSONL files, `mixed` (1-3 turns, some system prompts, ~830 bytes an
example) and `short` (one short Q/A, like a file of facts, ~190 bytes), ~5% of lines
repeated, then ingests each in a child process (so peak RSS is the ingest's own) with:
  - ours: evertune.store.ingest.ingest_file (streaming, batched executemany, one transaction)
  - baseline: the obvious version: json.loads each line, sqlite-utils insert_all of dicts
    with a unique (domain, hash) index and ignore=True.
Prints examples/s for both, `ratio: N.NNx`, and each run's peak RSS. Targets (2-core CPU):
>= 50,000 examples/s and peak RSS < 300 MB regardless of file size.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
]


def generate(path: Path, n: int, seed: int = 0, short: bool = False) -> None:
    """Chat JSONL; `short`: one question and a one-sentence answer, like a file of facts."""
    rng = random.Random(seed)

    def sentence(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."

    with path.open("w") as f:
        previous = None
        for i in range(n):
            if previous and rng.random() < 0.05:
                f.write(previous)
                continue
            messages = []
            if short:
                messages.append({"role": "user", "content": f"Q{i}: " + sentence(8)})
                messages.append({"role": "assistant", "content": sentence(rng.randint(3, 12))})
            elif rng.random() < 0.3:
                messages.append({"role": "system", "content": sentence(8)})
            for _ in range(0 if short else rng.randint(1, 3)):
                messages.append(
                    {"role": "user", "content": f"Q{i}: " + sentence(rng.randint(5, 30))}
                )
                messages.append({"role": "assistant", "content": sentence(rng.randint(5, 60))})
            previous = json.dumps({"messages": messages}) + "\n"
            f.write(previous)


def child(mode: str, path: Path, home: Path) -> None:
    from evertune.store.db import open_db
    from evertune.store.layout import HomeLayout

    layout = HomeLayout(home)
    layout.create()
    db = open_db(layout.db_path)
    inbox = layout.inbox / "bench"
    inbox.mkdir(parents=True)
    target = inbox / path.name
    shutil.copyfile(path, target)
    start = time.perf_counter()
    if mode == "ours":
        from evertune.store.ingest import ingest_file

        report = ingest_file(db, layout, target, "bench")
        stored = report.examples_added
    else:
        import hashlib

        table = db["baseline_examples"]
        table.create({"domain": str, "body": str, "hash": str}, pk=None)
        table.create_index(["domain", "hash"], unique=True)

        def rows():
            with target.open() as f:
                for line in f:
                    body = json.dumps(json.loads(line)["messages"])
                    yield {
                        "domain": "bench",
                        "body": body,
                        "hash": hashlib.sha256(body.encode()).hexdigest(),
                    }

        table.insert_all(rows(), ignore=True, batch_size=1000)
        stored = table.count
    elapsed = time.perf_counter() - start
    # VmHWM (this process's own peak): ru_maxrss is carried over fork and exec on Linux.
    with open("/proc/self/status") as status:
        hwm = next(line for line in status if line.startswith("VmHWM:"))
    rss_mb = int(hwm.split()[1]) / 1024
    print(json.dumps({"seconds": elapsed, "stored": stored, "rss_mb": rss_mb}))


def run(mode: str, path: Path, n: int) -> dict:
    with tempfile.TemporaryDirectory() as home:
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, str(path), home],
            check=True,
            capture_output=True,
            text=True,
        )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["examples_per_s"] = n / result["seconds"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--examples", type=int, default=200_000)
    ap.add_argument("--sizes", default="", help="extra file sizes (examples) to show RSS is flat")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for profile, short in (("mixed", False), ("short", True)):
            path = Path(tmp) / f"chat-{profile}.jsonl"
            generate(path, args.examples, short=short)
            size_mb = path.stat().st_size / 1e6
            shape = "one short Q/A each" if short else "1-3 turns, 30% with a system prompt"
            print(f"[{profile}] {args.examples} chat examples ({shape}), {size_mb:.1f} MB")
            base = run("baseline", path, args.examples)
            ours = run("ours", path, args.examples)
            for name, r in (("baseline", base), ("ours", ours)):
                print(
                    f"  {name:9s} {r['examples_per_s']:>10,.0f} examples/s"
                    f" {size_mb / r['seconds']:6.1f} MB/s {r['seconds']:6.2f} s"
                    f"  peak RSS {r['rss_mb']:6.1f} MB  stored {r['stored']}"
                )
            print(f"  examples_per_s: {ours['examples_per_s']:.0f}")
            print(f"  peak_rss_mb: {ours['rss_mb']:.1f}")
            print(f"  ratio: {ours['examples_per_s'] / base['examples_per_s']:.2f}x")
        for extra in filter(None, args.sizes.split(",")):
            big = Path(tmp) / f"chat-{extra}.jsonl"
            generate(big, int(extra), seed=1)
            r = run("ours", big, int(extra))
            print(
                f"ours @ {int(extra):,} mixed examples ({big.stat().st_size / 1e6:.0f} MB):"
                f" {r['examples_per_s']:,.0f} examples/s, peak RSS {r['rss_mb']:.1f} MB"
            )


if __name__ == "__main__":
    main()
