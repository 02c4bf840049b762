"""Load: 100 domains x 10 files dropped at once into the real daemon, 1M examples in all.

    python benchmarks/load.py [--domains 100] [--files 10] [--records 1000] [--keep]

The daemon runs with serving off and training off (`schedule.on_drop = false`, no
interval): this measures the store and the service's front, not training. All the files
are written beside the inbox first and renamed in as fast as possible (a burst), then:

  ingest      seconds until every file is recorded and moved out of the inbox; examples/s
  memory      the daemon's peak RSS (VmHWM) after the burst, against its RSS when idle
              before it (bounded: it must not grow with the store)
  status      `evertune status --json` timings while the burst is ingested and after it:
              the report computed in this process as the CLI computes it (status_report),
              the control API's /v1/status, and the whole CLI command (a new Python)
  accounted   every file ingested, every record stored once (records x files)

Target (issue: hostile input and load): status in < 200 ms with 1M examples in the store.
Prints which kind of CPU it ran on; timings are medians of 9 calls.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CONFIG = """
[watch]
settle_seconds = 0.2
[schedule]
on_drop = false
interval_minutes = 0
[serve]
mode = "none"
[control]
port = 0
"""

LINE = (
    '{"messages": [{"role": "user", "content": "%s: how do I reset password %d?"},'
    ' {"role": "assistant", "content": "Open settings and choose reset (%d)."}]}\n'
)


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def timed(fn, n: int = 9) -> tuple[float, float]:
    """(median, max) milliseconds of n calls."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out), max(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--domains", type=int, default=100)
    ap.add_argument("--files", type=int, default=10, help="files per domain")
    ap.add_argument("--records", type=int, default=1000, help="records per file")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    from evertune.adapters.base_model import cpu_has_native_bf16
    from evertune.daemon import config as config_mod
    from evertune.daemon.control.client import ControlClient
    from evertune.daemon.lock import daemon_state
    from evertune.daemon.status import status_report
    from evertune.store.db import open_db

    kind = "native bf16" if cpu_has_native_bf16() else "AVX2 only (no native bf16)"
    home = Path(tempfile.mkdtemp(prefix="evertune-load-"))
    total_files = args.domains * args.files
    total = total_files * args.records
    print(
        f"machine: {kind}, {os.cpu_count()} cores; {args.domains} domains x {args.files} files"
        f" x {args.records} records = {total:,} examples; home {home}",
        flush=True,
    )
    (home / "evertune.toml").write_text(CONFIG)
    env = {**os.environ, "EVERTUNE_HOME": str(home)}
    log = (home / "daemon.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "evertune.daemon.cli", "run"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        while not (daemon_state(home / "daemon.lock")[0] and (home / "control.url").exists()):
            if proc.poll() is not None:
                print((home / "daemon.log").read_text())
                return 1
            time.sleep(0.1)
        time.sleep(1)
        idle_rss = rss_kb(proc.pid, "VmRSS")
        config = config_mod.load(home / "evertune.toml", env)

        # ---- the burst: write every file beside the inbox, then rename them all in ---------
        staging = home / "staging"
        t = time.perf_counter()
        for d in range(args.domains):
            name = f"domain{d:03d}"
            (staging / name).mkdir(parents=True)
            (home / "inbox" / name).mkdir(parents=True, exist_ok=True)
            for f in range(args.files):
                base = f * args.records
                text = "".join(LINE % (name, i, i) for i in range(base, base + args.records))
                (staging / name / f"part{f:02d}.jsonl").write_text(text)
        written_s = time.perf_counter() - t
        t0 = time.perf_counter()
        for d in range(args.domains):
            name = f"domain{d:03d}"
            for f in range(args.files):
                os.replace(
                    staging / name / f"part{f:02d}.jsonl",
                    home / "inbox" / name / f"part{f:02d}.jsonl",
                )
        dropped_s = time.perf_counter() - t0

        # ---- status while the burst is ingested ------------------------------------------
        during: list[float] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                t = time.perf_counter()
                status_report(config)
                during.append((time.perf_counter() - t) * 1000)
                time.sleep(0.5)

        sampler = threading.Thread(target=sample)
        sampler.start()
        peak = 0
        last_print = time.perf_counter()
        while True:
            if proc.poll() is not None:
                print((home / "daemon.log").read_text()[-3000:])
                return 1
            peak = max(peak, rss_kb(proc.pid, "VmRSS"))
            db = open_db(home / "evertune.db", readonly=True)
            try:
                (n_files,) = db.execute("SELECT count(*) FROM files").fetchone()
            finally:
                db.close()
            if n_files >= total_files:
                break
            if time.perf_counter() - last_print > 30:
                print(
                    f"  ... {n_files}/{total_files} files after {time.perf_counter() - t0:.0f} s",
                    flush=True,
                )
                last_print = time.perf_counter()
            time.sleep(0.5)
        ingest_s = time.perf_counter() - t0
        done.set()
        sampler.join()
        hwm = rss_kb(proc.pid, "VmHWM")

        # ---- accounting --------------------------------------------------------------------
        db = open_db(home / "evertune.db", readonly=True)
        try:
            statuses = dict(
                db.execute("SELECT status, count(*) FROM files GROUP BY status").fetchall()
            )
            (examples,) = db.execute("SELECT count(*) FROM examples").fetchone()
        finally:
            db.close()
        left = sum(1 for _ in (home / "inbox").rglob("*.jsonl"))

        # ---- status with the full store ----------------------------------------------------
        report_ms = timed(lambda: status_report(config))
        url = (home / "control.url").read_text().strip()
        with ControlClient.from_home(home, url) as client:
            api_ms = timed(client.status)
        cli = [sys.executable, "-m", "evertune.daemon.cli", "status", "--json"]
        cli_ms = timed(lambda: subprocess.run(cli, env=env, check=True, capture_output=True), 5)
        version_s = [sys.executable, "-c", "import evertune.daemon.cli"]
        import_ms = timed(lambda: subprocess.run(version_s, env=env, check=True), 5)

        print(f"files written in {written_s:.1f} s, renamed into the inbox in {dropped_s:.2f} s")
        print(
            f"ingest: {total_files} files in {ingest_s:.1f} s"
            f" ({examples / ingest_s:,.0f} examples/s); files {statuses}, {left} left in the"
            f" inbox; examples stored {examples:,} of {total:,}"
        )
        print(
            f"memory: daemon RSS idle {idle_rss / 1024:.0f} MiB, peak during the burst"
            f" {max(peak, hwm) / 1024:.0f} MiB (VmHWM {hwm / 1024:.0f} MiB)"
        )
        if during:
            print(
                "status during the burst (in-process report): median"
                f" {statistics.median(during):.0f} ms, max {max(during):.0f} ms over"
                f" {len(during)} calls"
            )
        print(
            f"status with {examples:,} examples in {args.domains} domains: report"
            f" {report_ms[0]:.0f} ms (max {report_ms[1]:.0f}); control API /v1/status"
            f" {api_ms[0]:.0f} ms (max {api_ms[1]:.0f}); whole CLI `evertune status --json`"
            f" {cli_ms[0]:.0f} ms, of which Python + imports {import_ms[0]:.0f} ms"
        )
        ok = (
            statuses.get("ingested") == total_files
            and examples == total
            and left == 0
            and report_ms[0] < 200
            and api_ms[0] < 200
        )
        print("target status < 200 ms and everything accounted:", "met" if ok else "NOT met")
        return 0 if ok else 1
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)
        log.close()
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
