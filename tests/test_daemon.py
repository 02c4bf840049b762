"""The daemon as a real process: `evertune run` on a temp home, files dropped into its inbox."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evertune.daemon.lock import daemon_state
from evertune.store.db import is_initialised, open_db

CHAT = (
    '{"messages": [{"role": "user", "content": "Q%d"}, {"role": "assistant", "content": "A%d"}]}\n'
)


def evertune(home: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "EVERTUNE_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "evertune.daemon.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )


class Daemon:
    def __init__(self, home: Path):
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        (home / "evertune.toml").write_text("[watch]\nsettle_seconds = 0.2\n")
        self.log = (home / "daemon.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "evertune.daemon.cli", "run"],
            env={**os.environ, "EVERTUNE_HOME": str(home)},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while not daemon_state(home / "daemon.lock")[0]:
            assert self.proc.poll() is None, self.logtext()
            assert time.monotonic() < deadline, "daemon did not start"
            time.sleep(0.05)

    def logtext(self) -> str:
        return (self.home / "daemon.log").read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self.log.close()
        return code


@pytest.fixture
def daemon(tmp_path):
    started = []

    def start(home: Path | None = None) -> Daemon:
        d = Daemon(home or tmp_path / "home")
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def examples(home: Path, domain: str) -> int:
    db = open_db(home / "evertune.db", readonly=True)
    try:
        if not is_initialised(db):  # the daemon is still creating the store
            return 0
        return db.execute("SELECT count(*) FROM examples WHERE domain = ?", [domain]).fetchone()[0]
    finally:
        db.close()


def test_dropped_file_is_ingested_and_kept_in_done(daemon):
    d = daemon()
    inbox = d.home / "inbox" / "legal"
    inbox.mkdir(parents=True)
    (inbox / "facts.jsonl").write_text("".join(CHAT % (i, i) for i in range(20)))
    done = d.home / "done" / "legal" / "facts.jsonl"
    wait_for(done.exists, what="the file to reach done/")
    assert examples(d.home, "legal") == 20
    report = json.loads((d.home / "done" / "legal" / "facts.jsonl.report.json").read_text())
    assert report["status"] == "ingested" and report["examples_added"] == 20
    assert d.stop() == 0
    assert "stopped" in d.logtext()


def test_files_dropped_while_down_are_ingested_at_start(daemon, tmp_path):
    home = tmp_path / "home"
    inbox = home / "inbox" / "medical"
    inbox.mkdir(parents=True)
    (inbox / "a.jsonl").write_text(CHAT % (1, 1))
    (inbox / "b.jsonl").write_text(CHAT % (2, 2))
    d = daemon(home)
    wait_for(lambda: examples(home, "medical") == 2, what="both waiting files")
    assert sorted(p.name for p in (home / "done" / "medical").glob("*.jsonl")) == [
        "a.jsonl",
        "b.jsonl",
    ]
    assert d.stop() == 0


def test_status_json_reports_a_running_daemon_and_its_domains(daemon):
    d = daemon()
    inbox = d.home / "inbox" / "legal"
    inbox.mkdir(parents=True)
    (inbox / "bad.jsonl").write_text(CHAT % (1, 1) + "{oops\n")
    wait_for((d.home / "done" / "legal" / "bad.jsonl").exists, what="ingest")
    out = evertune(d.home, "status", "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["home"] == str(d.home)
    assert status["daemon"] == {"running": True, "pid": d.proc.pid, "control_url": None}
    assert status["serving"] == []
    [legal] = status["domains"]
    assert legal["name"] == "legal"
    assert legal["files"]["ingested"] == 1 and legal["files"]["rejected"] == 0
    assert legal["examples"] == 1 and legal["examples_new"] == 1
    assert legal["live_version"] is None and legal["run"] is None
    assert legal["last_errors"][0]["line"] == 2
    assert legal["last_errors"][0]["file"].endswith("done/legal/bad.jsonl")
    assert "bad JSON" in legal["last_errors"][0]["reason"]


def test_cli_ingest_goes_through_the_running_daemon_and_copies(daemon, tmp_path):
    d = daemon()
    src = tmp_path / "outside.jsonl"
    src.write_text(CHAT % (7, 7))
    out = evertune(d.home, "ingest", str(src), "--domain", "legal")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 new examples" in out.stdout
    assert src.exists(), "files outside the home are copied, never moved"
    assert examples(d.home, "legal") == 1
    assert "file legal/outside.jsonl: ingested" in d.logtext()  # the daemon did the work


def test_second_daemon_on_the_same_home_is_refused(daemon):
    d = daemon()
    out = evertune(d.home, "run")
    assert out.returncode == 1
    assert f"a daemon already runs on {d.home} (pid {d.proc.pid})" in out.stderr


def test_sigint_stops_cleanly_too(daemon):
    d = daemon()
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(30) == 0
    assert not daemon_state(d.home / "daemon.lock")[0]
