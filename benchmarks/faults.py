"""Fault injection: the real daemon SIGKILLed at random moments, restarted, and checked.

    python benchmarks/faults.py [--trials 32] [--seed 0] [--keep]

One home, one real vLLM-CPU server (external mode, so it outlives the daemon as a GPU
server would) serving a tiny random Llama built from config, and the real `evertune run`
daemon training real LoRA versions of it. Each trial drops random files into the inbox
(valid records, duplicates of earlier ones, invalid lines) and SIGKILLs the daemon at a
random moment of one phase, in turn:

  ingest     0-1 s after a file of 20-40k records lands (60 new, the rest repeats and
             invalid lines: its transaction is open for about a second)
  train      0-2 s after a training run is recorded running
  publish    0-0.2 s after the new version is recorded as a candidate (folder published,
             the vLLM loads and the switch of the stable name under way)
  reconcile  0-1.5 s after the stable name was unloaded from vLLM behind the daemon's back
             and a stale version name loaded (the next reconcile, every second, repairs it)

Then the daemon is started again, and after it: within 10 s of it being up the database's
live version of every domain is what vLLM serves; once it is idle (every file moved, no
run queued or running):
  - every dropped file is in done/ or rejected/ with its row, none left in the inbox;
  - every distinct valid record of every file is stored exactly once, and nothing else;
  - no version is left 'training' or 'candidate', every version that is or was live has a
    complete folder, no folder exists without its version, vLLM serves no name of ours
    that the database does not want (no half version is visible);
  - SQLite's integrity_check passes.
Prints each trial (where the kill landed) and the violations; exits 1 if there are any.
The quick variant is tests/test_faults.py (one trial of each phase).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tests/helpers.py
from helpers import Daemon, free_port, qa, served, wait_for

PHASES = ("ingest", "train", "publish", "reconcile")
DOMAINS = ("alpha", "beta")
SERVE_WITHIN_S = 10.0  # the database's live version is what vLLM serves, from daemon start
IDLE_TIMEOUT_S = 240.0


def config_text(model: Path, *vllm_urls: str) -> str:
    # A gate that promotes whatever learned (the tiny model cannot learn facts): every
    # cycle publishes, so kills land in publishes too. Nothing is pruned: every folder a
    # version ever had must still be there to be checked.
    urls = ", ".join(f'"{u}"' for u in vllm_urls)
    return f"""
[model]
path = "{model}"
reference_limit = 9
[train]
max_epochs = 2
min_epochs = 1
[gate]
min_learned = 0.0
drift_tolerance = 100.0
easy_alpha = 0.0
old_tolerance = 100.0
old_holdout = 4
[registry]
keep_last = 100000
[watch]
settle_seconds = 0.2
retry_seconds = 1
[schedule]
quiet_seconds = 0.5
retry_seconds = 1
[serve]
mode = "external"
urls = [{urls}]
reconcile_seconds = 1
[control]
port = 0
"""


@dataclass
class Expected:
    """What the harness dropped: file names per domain, and the distinct valid records."""

    files: dict[str, list[str]] = field(default_factory=lambda: {d: [] for d in DOMAINS})
    records: dict[str, set[str]] = field(default_factory=lambda: {d: set() for d in DOMAINS})


def record(question: str) -> str:
    return json.dumps(qa(question, f"Answer to {question}."))


def drop_file(
    home: Path,
    exp: Expected,
    rng: random.Random,
    domain: str,
    name: str,
    n: int,
    new: int | None = None,
) -> None:
    """n lines: `new` new valid records (default: about 85%), the rest repeats of earlier
    records (of this file or before) and about 5% invalid lines; written beside the inbox
    and renamed in, as a user's tool would. A large file of mostly repeats takes seconds to
    ingest (a window to kill in) and little to train."""
    new = round(n * 0.85) if new is None else new
    fresh = [f"{name} question {i}" for i in range(new)]
    lines = [record(q) for q in fresh]
    known = sorted(exp.records[domain]) + fresh
    for _ in range(n - new):
        if rng.random() < 0.05 or not known:
            lines.append('{"messages": [ not json')
        else:
            lines.append(record(rng.choice(known)))
    rng.shuffle(lines)
    exp.records[domain].update(fresh)
    inbox = home / "inbox" / domain
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = home / f".{name}.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, inbox / name)
    exp.files[domain].append(name)


def query(home: Path, sql: str, args: list | tuple = ()) -> list[tuple]:
    import sqlite3

    conn = sqlite3.connect(f"file:{home / 'evertune.db'}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, list(args)).fetchall()
    finally:
        conn.close()


def ours(names: dict[str, str]) -> dict[str, str]:
    return {n: p for n, p in names.items() if n.split("@")[0] in DOMAINS}


def live_paths(home: Path) -> dict[str, str]:
    return dict(query(home, "SELECT domain, path FROM versions WHERE state = 'live'"))


def serves_live(home: Path, url: str) -> tuple[bool, str]:
    """The stable name of every domain is its live version's folder (and absent without
    one), read in a consistent moment (the database unchanged around the vLLM read)."""
    before = live_paths(home)
    names = served(url, or_none=True)
    after = live_paths(home)
    if names is None or before != after:
        return False, "changing"
    wrong = []
    for d in DOMAINS:
        if names.get(d) != before.get(d):
            wrong.append(f"{d}: vLLM {names.get(d)} != live {before.get(d)}")
    return not wrong, "; ".join(wrong)


def wait_idle(home: Path, exp: Expected, daemon: Daemon) -> float:
    """Seconds until every dropped file has left the inbox and no run is queued or running,
    three checks in a row (a quiet period may still start a run)."""
    t0, calm = time.monotonic(), 0
    while time.monotonic() - t0 < IDLE_TIMEOUT_S:
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited ({daemon.proc.returncode}):\n{daemon.tail()}")
        pending = [n for d in DOMAINS for n in exp.files[d] if (home / "inbox" / d / n).exists()]
        busy = query(home, "SELECT count(*) FROM runs WHERE state IN ('queued', 'running')")[0][0]
        calm = calm + 1 if not pending and not busy else 0
        if calm >= 3:
            return time.monotonic() - t0
        time.sleep(1.0)
    raise RuntimeError(f"not idle after {IDLE_TIMEOUT_S} s:\n{daemon.tail()}")


def check(home: Path, url: str, exp: Expected) -> list[str]:
    """The invariants of a quiet service after a crash; each violation as one line."""
    from evertune.adapters import registry

    bad = []
    for d in DOMAINS:
        for name in exp.files[d]:
            if (home / "inbox" / d / name).exists():
                bad.append(f"{d}/{name}: still in the inbox")
            rows = query(
                home,
                "SELECT status, stored_path FROM files WHERE domain = ? AND name = ?",
                [d, name],
            )
            if not rows:
                bad.append(f"{d}/{name}: no files row (lost)")
            elif not any(Path(p).exists() for _, p in rows):
                bad.append(f"{d}/{name}: recorded as {rows[0][0]} but {rows[0][1]} is missing")
        stored: dict[str, int] = {}
        for (body,) in query(home, "SELECT body FROM examples WHERE domain = ?", [d]):
            q = json.loads(body)[0]["content"]
            stored[q] = stored.get(q, 0) + 1
        missing = exp.records[d] - set(stored)
        extra = set(stored) - exp.records[d]
        twice = [q for q, c in stored.items() if c > 1]
        if missing:
            bad.append(f"{d}: {len(missing)} valid records not stored, e.g. {sorted(missing)[0]!r}")
        if extra:
            bad.append(f"{d}: {len(extra)} records stored that were never valid")
        if twice:
            bad.append(f"{d}: {len(twice)} records stored more than once")
    versions = query(home, "SELECT domain, number, state, path, promoted_at FROM versions")
    for d, number, state, path, promoted_at in versions:
        if state in ("training", "candidate"):
            bad.append(f"{d} v{number:04d}: left {state!r} by the crash")
        if state in ("live", "retired") or promoted_at:
            try:
                registry.check_files(Path(path))
            except registry.RegistryError as exc:
                bad.append(f"{d} v{number:04d} ({state}): {exc}")
    known = {Path(p).name for d, _, _, p, _ in versions}
    for d in DOMAINS:
        folder = home / "adapters" / d
        for entry in folder.iterdir() if folder.exists() else []:
            if entry.name.startswith("."):
                bad.append(f"{d}: staging folder {entry.name} left behind")
            elif entry.name not in known:
                bad.append(f"{d}: folder {entry.name} has no version")
    names = served(url)
    paths = {(d, number): (state, p) for d, number, state, p, _ in versions}
    for name, root in ours(names).items():
        if "@" not in name:
            continue  # the stable names: serves_live below
        d, _, v = name.partition("@")
        state, path = paths.get((d, int(v.lstrip("v") or 0)), (None, None))
        if state not in ("live", "retired") or root != path:
            bad.append(f"vLLM serves {name} from {root}: not a published version")
    ok, why = serves_live(home, url)
    if not ok:
        bad.append(f"vLLM does not serve the live versions: {why}")
    (integrity,) = query(home, "PRAGMA integrity_check")[0]
    if integrity != "ok":
        bad.append(f"integrity_check: {integrity}")
    return bad


def landed(home: Path, url: str, before: dict[str, int]) -> str:
    """Where a kill landed, read before the restart: the newest run and version states and
    whether vLLM had already switched a stable name the database does not record live."""
    run = query(home, "SELECT state FROM runs ORDER BY id DESC LIMIT 1")
    version = query(home, "SELECT state FROM versions ORDER BY id DESC LIMIT 1")
    names = served(url)
    live = live_paths(home)
    ahead = [d for d in DOMAINS if names.get(d) and names.get(d) != live.get(d)]
    files = query(home, "SELECT count(*) FROM files")[0][0]
    parts = [
        f"run {run[0][0] if run else '-'}",
        f"version {version[0][0] if version else '-'}",
        f"files +{files - before['files']}",
    ]
    if ahead:
        parts.append(f"vLLM switched ahead of the database ({','.join(ahead)})")
    return ", ".join(parts)


def restarted_in_line(home: Path, url: str) -> list[str]:
    """Wait up to SERVE_WITHIN_S for vLLM to serve the database's live versions (the
    daemon has just started); the violation if it does not."""
    t0 = time.monotonic()
    while not serves_live(home, url)[0] and time.monotonic() - t0 < SERVE_WITHIN_S:
        time.sleep(0.1)
    ok, why = serves_live(home, url)
    return [] if ok else [f"{SERVE_WITHIN_S:.0f} s after the restart: {why}"]


def trial(
    k: int, phase: str, home: Path, url: str, exp: Expected, rng: random.Random
) -> dict[str, Any]:
    daemon = Daemon(home, append=True)
    up_s = daemon.wait_up()
    violations = restarted_in_line(home, url)
    before = {"files": query(home, "SELECT count(*) FROM files")[0][0]}
    last_run = query(home, "SELECT coalesce(max(id), 0) FROM runs")[0][0]
    last_version = query(home, "SELECT coalesce(max(id), 0) FROM versions")[0][0]
    domain = DOMAINS[k % len(DOMAINS)]
    name = f"t{k:03d}-{phase}.jsonl"
    if phase == "ingest":
        drop_file(home, exp, rng, domain, name, rng.randint(20_000, 40_000), new=60)
        time.sleep(rng.uniform(0.0, 1.0))
    elif phase == "train":
        drop_file(home, exp, rng, domain, name, rng.randint(20, 80))
        wait_for(
            lambda: query(
                home, "SELECT count(*) FROM runs WHERE id > ? AND state = 'running'", [last_run]
            )[0][0],
            120,
            daemon=daemon,
            every=0.02,
            fail=False,
        )
        time.sleep(rng.uniform(0.0, 2.0))
    elif phase == "publish":
        drop_file(home, exp, rng, domain, name, rng.randint(20, 80))
        wait_for(
            lambda: query(
                home,
                "SELECT count(*) FROM versions WHERE id > ? AND state != 'training'",
                [last_version],
            )[0][0],
            180,
            daemon=daemon,
            every=0.02,
            fail=False,
        )
        time.sleep(rng.uniform(0.0, 0.2))
    else:  # reconcile: vLLM loses the stable name behind the daemon's back
        from evertune.adapters.remote import admin_headers

        live = live_paths(home)
        with httpx.Client(base_url=url, headers=admin_headers(), timeout=30) as c:
            for d, path in live.items():
                c.post("/v1/unload_lora_adapter", json={"lora_name": d})
                c.post("/v1/load_lora_adapter", json={"lora_name": f"{d}@v9999", "lora_path": path})
        if rng.random() < 0.5:  # and sometimes new data too
            drop_file(home, exp, rng, domain, name, rng.randint(20, 80))
        time.sleep(rng.uniform(0.0, 1.5))
    gone = daemon.proc.poll() is not None
    daemon.kill()  # first: the state it leaves is what the check below reads
    where = "daemon already gone" if gone else landed(home, url, before)
    return {
        "trial": k,
        "phase": phase,
        "up_s": round(up_s, 1),
        "landed": where,
        "violations": violations,
    }


def final_check(home: Path, url: str, exp: Expected) -> tuple[list[str], float]:
    """Start once more, let it finish everything, check, stop cleanly."""
    daemon = Daemon(home, append=True)
    daemon.wait_up()
    violations = restarted_in_line(home, url)  # the restart after the kill
    idle_s = wait_idle(home, exp, daemon)
    violations += check(home, url, exp)
    code = daemon.stop()
    if code != 0:
        violations.append(f"the daemon stopped with exit status {code}")
    return violations, idle_s


def run_trials(
    trials: int,
    seed: int,
    home: Path,
    model: Path,
    vllm_url: str,
    out=print,
    phases: tuple[str, ...] = PHASES,
) -> dict[str, Any]:
    """`trials` kills in the phases' order, each followed by a restart; after every one
    the service is checked idle (the next trial starts from a checked state). `vllm_url`:
    a vLLM-CPU server serving `model` with runtime LoRA loading, this process holding its
    admin key (evertune.daemon.vllm_process.EmbeddedVLLM sets it)."""
    rng = random.Random(seed)
    home.mkdir(parents=True, exist_ok=True)
    (home / "evertune.toml").write_text(config_text(model, vllm_url))
    exp = Expected()
    results = []
    for k in range(trials):
        phase = phases[k % len(phases)]
        t0 = time.monotonic()
        r = trial(k, phase, home, vllm_url, exp, rng)
        bad, idle_s = final_check(home, vllm_url, exp)
        r["violations"] += bad
        r["seconds"] = round(time.monotonic() - t0, 1)
        r["idle_s"] = round(idle_s, 1)
        results.append(r)
        out(
            f"trial {k + 1:>3d}/{trials} {phase:9s} {r['seconds']:6.1f} s  killed at: "
            f"{r['landed']}  -> {'ok' if not r['violations'] else 'VIOLATIONS'}"
        )
        for v in r["violations"]:
            out(f"      violation: {v}")
    return {
        "trials": results,
        "violations": sum(len(r["violations"]) for r in results),
        "versions": dict(query(home, "SELECT state, count(*) FROM versions GROUP BY state")),
        "examples": query(home, "SELECT count(*) FROM examples")[0][0],
        "files": sum(len(v) for v in exp.files.values()),
    }


def unload_ours(url: str) -> None:
    """Leave a shared server as it was: no name of the harness's domains loaded."""
    from evertune.adapters.remote import admin_headers

    with httpx.Client(base_url=url, headers=admin_headers(), timeout=30) as c:
        for name in ours(served(url)):
            c.post("/v1/unload_lora_adapter", json={"lora_name": name})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument(
        "--phases", default=",".join(PHASES), help=f"kill in these, in turn ({','.join(PHASES)})"
    )
    args = ap.parse_args()
    if set(args.phases.split(",")) - set(PHASES):
        ap.error(f"--phases takes {','.join(PHASES)}")
    from evertune.adapters.base_model import cpu_has_native_bf16, tiny_random_model
    from evertune.daemon.config_sections import ServeConfig
    from evertune.daemon.vllm_process import EmbeddedVLLM

    work = Path(tempfile.mkdtemp(prefix="evertune-faults-"))
    kind = "native bf16" if cpu_has_native_bf16() else "AVX2 only (no native bf16)"
    print(f"machine: {kind}, {os.cpu_count()} cores; work folder {work}", flush=True)
    model = tiny_random_model(work / "tiny-model")
    vllm = EmbeddedVLLM(model, ServeConfig(port=free_port(), start_timeout_seconds=600))
    vllm.start()
    t0 = time.monotonic()
    try:
        if not vllm.wait_ready(600):
            raise RuntimeError(f"vLLM did not start: {vllm.last_error}")
        summary = run_trials(
            args.trials,
            args.seed,
            work / "home",
            model,
            vllm.url,
            out=lambda s: print(s, flush=True),
            phases=tuple(args.phases.split(",")),
        )
    finally:
        vllm.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    by_phase: dict[str, int] = {}
    for r in summary["trials"]:
        by_phase[r["phase"]] = by_phase.get(r["phase"], 0) + 1
    ahead = sum("switched ahead" in r["landed"] for r in summary["trials"])
    print(
        f"\n{len(summary['trials'])} trials ({', '.join(f'{p} {n}' for p, n in by_phase.items())})"
        f" in {time.monotonic() - t0:.0f} s; {ahead} killed with vLLM switched ahead of the"
        f" database; {summary['files']} files, {summary['examples']} examples stored,"
        f" versions {summary['versions']}\nviolations: {summary['violations']}"
    )
    return 1 if summary["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
