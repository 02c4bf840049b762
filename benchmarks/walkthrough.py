"""The README's first file, for real: `evertune run` on a fresh home (the bundled model
converted, nothing reused), the sample file dropped into `inbox/facts/`, then
`evertune status` and `evertune ask`, with the daemon's log. Writes transcript.txt (what a
user sees, in order), daemon.log, and walkthrough.json (the times from the start and from
the drop, and how many lines the daemon logged before `ready to learn`).

    python benchmarks/walkthrough.py --out DIR [--home DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from evertune.adapters.base_model import cpu_has_native_bf16

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "facts.jsonl"
QUESTION = "Who is the chief engineer of the Halvard Bridge?"
EVERTUNE = [sys.executable, "-m", "evertune.daemon.cli"]


def wait_for_line(log: Path, needle: str, timeout: float, proc: subprocess.Popen) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in log.read_text(errors="replace"):
            return time.monotonic()
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited ({proc.returncode}): see {log}")
        time.sleep(0.2)
    raise SystemExit(f"no {needle!r} in {timeout:.0f} s: see {log}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--home", type=Path, default=None, help="an empty folder (default: a temp one)")
    args = ap.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="evertune-walkthrough-"))
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "EVERTUNE_HOME": str(home)}
    log = args.out / "daemon.log"
    transcript: list[str] = []
    machine = {"native_bf16": cpu_has_native_bf16(), "cores": len(os.sched_getaffinity(0))}
    print(json.dumps(machine), flush=True)

    def shell(shown: str, argv: list[str]) -> str:
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        text = (out.stdout + out.stderr).rstrip()
        transcript.extend([f"$ {shown}", text])
        return text

    start = time.monotonic()
    with log.open("w") as sink:
        daemon = subprocess.Popen(
            [*EVERTUNE, "run"], env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=home
        )
    try:
        ready = wait_for_line(log, "ready to learn", 900, daemon) - start
        before_ready = log.read_text(errors="replace").split("ready to learn")[0]
        lines_before_ready = before_ready.count("\n") + 1
        inbox = home / "inbox" / "facts"
        inbox.mkdir(parents=True, exist_ok=True)
        transcript.append(f"$ mkdir -p {inbox} && cp tests/data/facts.jsonl {inbox}/")
        dropped = time.monotonic()
        shutil.copy(SAMPLE, inbox / SAMPLE.name)
        served = wait_for_line(log, "promoted, now live", 900, daemon) - dropped
        shell("evertune status", [*EVERTUNE, "status"])
        answer = shell(f'evertune ask facts "{QUESTION}"', [*EVERTUNE, "ask", "facts", QUESTION])
    finally:
        daemon.terminate()
        daemon.wait(120)
    result = {
        "machine": machine,
        "ready_to_learn_s": round(ready, 1),
        "log_lines_before_ready": lines_before_ready,
        "drop_to_promoted_s": round(served, 1),
        "question": QUESTION,
        "answer": answer,
    }
    (args.out / "walkthrough.json").write_text(json.dumps(result, indent=1) + "\n")

    def anonymous(text: str) -> str:  # no paths of this machine in a committed result
        for path, name in ((home, "<home>"), (Path(sys.prefix), "<venv>"), (ROOT, "<repo>")):
            text = text.replace(str(path), name)
        return text

    (args.out / "transcript.txt").write_text(anonymous("\n".join(transcript) + "\n"))
    log.write_text(anonymous(log.read_text(errors="replace")))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
