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
from helpers import CHAT, Daemon, evertune, wait_for

from evertune.daemon.lock import daemon_state
from evertune.store.db import is_initialised, open_db

# Ingestion only: no vLLM, no training on drop, the control API on a free port.
INGEST_ONLY = """
[watch]
settle_seconds = 0.2
[serve]
mode = "none"
[schedule]
on_drop = false
interval_minutes = 0
[control]
port = 0
"""


@pytest.fixture
def daemon(tmp_path):
    """start(home) -> a Daemon on the ingestion-only config, once it holds the home's lock."""
    started = []

    def start(home: Path | None = None) -> Daemon:
        d = Daemon(home or tmp_path / "home", INGEST_ONLY, stop_timeout=30).wait_locked()
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


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
    assert status["daemon"]["running"] is True and status["daemon"]["pid"] == d.proc.pid
    assert status["daemon"]["control_url"].startswith("http://127.0.0.1:")
    assert status["serving"] == []  # serve.mode = "none"
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


def control(home: Path):
    from evertune.daemon.control.client import ControlClient

    url = wait_for(lambda: _read(home / "control.url"), what="the control API")
    return ControlClient.from_home(home, url.strip())


def _read(path: Path) -> str | None:
    try:
        return path.read_text() or None
    except FileNotFoundError:
        return None


def test_control_api_metrics_and_state_changing_commands_through_the_daemon(daemon):
    d = daemon()
    client = control(d.home)
    assert client.healthz() == {"ok": True}
    inbox = d.home / "inbox" / "legal"
    inbox.mkdir(parents=True)
    (inbox / "a.jsonl").write_text(CHAT % (1, 1) + CHAT % (2, 2) + "{oops\n")
    wait_for((d.home / "done" / "legal" / "a.jsonl").exists, what="ingest")
    metrics = client.metrics_text()
    assert 'evertune_examples_ingested_total{domain="legal"} 2.0' in metrics
    assert 'evertune_examples_rejected_total{domain="legal"} 1.0' in metrics
    assert 'evertune_files_ingested_total{domain="legal",outcome="partial"} 1.0' in metrics
    status = client.status()
    assert status["daemon"]["control_url"] == (d.home / "control.url").read_text().strip()
    assert status["training"] == {"current": None, "queued": []}
    # The CLI goes through the daemon and reports the registry's error as it is.
    out = evertune(d.home, "rollback", "legal")
    assert out.returncode == 1
    assert "legal has no live version to roll back from" in out.stderr
    out = evertune(d.home, "pin", "legal", "v0001")
    assert out.returncode == 1 and "legal has no version v0001" in out.stderr
    # Without the token the API refuses.
    import httpx

    r = httpx.post(f"{status['daemon']['control_url']}/v1/train", json={"domain": "legal"})
    assert r.status_code == 401
    token = d.home / "control.token"
    assert oct(token.stat().st_mode & 0o777) == "0o640"


def test_sighup_reloads_the_config_and_a_bad_file_is_refused(daemon):
    d = daemon()
    control(d.home)
    cfg = d.home / "evertune.toml"
    cfg.write_text(cfg.read_text().replace("on_drop = false", "on_drop = true") + "\n")
    cfg.write_text(cfg.read_text().replace("[serve]\n", "[serve]\nport = 9999\n"))
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config reloaded" in d.logtext(), what="the reload")
    line = next(x for x in d.logtext().splitlines() if "config reloaded" in x)
    assert "schedule.on_drop: False -> True" in line
    assert "needs a restart to apply: serve.port: 8421 -> 9999" in line
    cfg.write_text("[train]\nlr = 'fast'\n")
    out = evertune(d.home, "reload")  # the CLI checks the file first and says why
    assert out.returncode == 2 and "train.lr = 'fast' has the wrong type" in out.stderr
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config not reloaded" in d.logtext(), what="the refusal")
    assert d.proc.poll() is None  # still running, on the old config
    assert d.stop() == 0


def test_systemd_notify_messages_from_the_real_daemon(tmp_path):
    """READY once it accepts files, STATUS lines, STOPPING on SIGTERM, through a real
    NOTIFY_SOCKET (systemd is not PID 1 here, the protocol is just a socket: ARCHITECTURE.md,
    "Platform facts")."""
    import socket as so

    sock_path = tmp_path / "notify.sock"
    sock = so.socket(so.AF_UNIX, so.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    home = tmp_path / "home"
    home.mkdir()
    (home / "evertune.toml").write_text(INGEST_ONLY)
    env = {
        **os.environ,
        "EVERTUNE_HOME": str(home),
        "NOTIFY_SOCKET": str(sock_path),
        "WATCHDOG_USEC": "400000",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "evertune.daemon.cli", "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    got: list[str] = []
    try:
        while not any(m.startswith("READY=1") for m in got):
            got.append(sock.recv(4096).decode())
        assert any("STATUS=running" in m for m in got), got
        t0 = time.monotonic()
        pings = 0
        while time.monotonic() - t0 < 1.5:
            pings += sock.recv(4096).decode() == "WATCHDOG=1"
        assert pings >= 3  # every WATCHDOG_USEC / 2
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in got:
            got.append(sock.recv(4096).decode())
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()


def test_the_daemon_process_never_loads_torch():
    """Idle target: under 250 MB RSS. torch alone is ~180 MB; it belongs in the children
    (training, preparation, vLLM), never in the long-lived daemon."""
    code = (
        "import sys, evertune.daemon.service, evertune.daemon.cli\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers',"
        " 'peft', 'vllm'})\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    """Stopping never waits on a child (training, preparation) that does not stop: the
    daemon said "stopping" and still ran a minute later, waiting for one."""
    import subprocess
    import sys
    import threading
    import time

    from evertune.daemon.training.children import _forward_stop

    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            " print('ready', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "ready"
    stop = threading.Event()
    forward = threading.Thread(target=_forward_stop, args=(child, stop, 1.0))
    forward.start()
    t0 = time.monotonic()
    stop.set()
    forward.join(10)
    assert child.wait(5) == -9  # SIGKILL, after the SIGTERM it ignored
    assert 1.0 <= time.monotonic() - t0 < 10


def test_a_file_whose_ingestion_failed_is_retried_without_a_restart(tmp_path):
    """Before: it stayed in the inbox until the next start. Here the failure is real: a
    file where done/legal/ should be makes the move after the commit fail; once it is
    gone, the retry finishes the move (the examples were committed once, not twice)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "done").mkdir()
    (home / "done" / "legal").write_text("in the way")
    d = Daemon(
        home, INGEST_ONLY.replace("[watch]\n", "[watch]\nretry_seconds = 0.5\n"), stop_timeout=30
    ).wait_locked()
    try:
        inbox = home / "inbox" / "legal"
        inbox.mkdir(parents=True)
        (inbox / "facts.jsonl").write_text("".join(CHAT % (i, i) for i in range(5)))
        wait_for(lambda: "retried in 0 s" in d.logtext(), what="the first failure")
        (home / "done" / "legal").unlink()
        done = home / "done" / "legal" / "facts.jsonl"
        wait_for(done.exists, what="the retry to move the file to done/")
        assert not (inbox / "facts.jsonl").exists()
        assert examples(home, "legal") == 5
    finally:
        assert d.stop() == 0


def test_health_names_a_wedged_writer_and_a_stopped_watcher(tmp_path):
    """What /healthz and the systemd watchdog ask of each component (before: /healthz said
    ok while the writer was blocked for ever on a FIFO)."""
    import threading

    from evertune.daemon.inbox.watcher import InboxWatcher
    from evertune.daemon.inbox.writer import StoreWriter

    writer = StoreWriter(tmp_path / "evertune.db")
    writer.start()
    release = threading.Event()
    assert writer.doing() is None
    writer.submit(lambda db: release.wait(10), "ingesting inbox/a/big.jsonl")
    wait_for(lambda: writer.problem(stuck_after=0.3), 5, "the writer to look stuck")
    assert "on one job for" in writer.problem(stuck_after=0.3)
    doing = writer.doing()  # what the daemon's status shows
    assert doing["job"] == "ingesting inbox/a/big.jsonl" and doing["seconds"] >= 0.3
    release.set()
    wait_for(lambda: writer.problem(stuck_after=0.3) is None, 5, "the writer to recover")
    assert writer.doing() is None
    writer.stop()
    writer.join(5)
    assert writer.problem(stuck_after=0.3) == "the store writer thread has stopped"

    watcher = InboxWatcher(
        tmp_path / "inbox", lambda d, p: None, settle_seconds=0.1, unclosed_timeout_seconds=1
    )
    watcher.start()
    assert watcher.problem() is None
    watcher.stop()
    watcher.join(5)
    assert "stopped" in watcher.problem()


def test_links_dropped_into_the_inbox_end_in_rejected_with_a_report(daemon, tmp_path):
    """Through the real daemon: a dangling link (which exists() calls absent) and a link
    to a readable file are refused and moved aside, not skipped and not read."""
    d = daemon()
    secret = tmp_path / "secret.jsonl"
    secret.write_text(CHAT % (1, 1))
    inbox = d.home / "inbox" / "legal"
    inbox.mkdir(parents=True)
    (inbox / "dangling.jsonl").symlink_to(tmp_path / "gone.jsonl")
    (inbox / "link.jsonl").symlink_to(secret)
    rejected = d.home / "rejected" / "legal"
    for name in ("dangling.jsonl", "link.jsonl"):
        wait_for(lambda n=name: (rejected / n).is_symlink(), what=f"{name} in rejected/")
        report = json.loads((rejected / f"{name}.report.json").read_text())
        assert report["status"] == "rejected" and "symbolic link" in report["reason"]
    assert examples(d.home, "legal") == 0


def test_the_partial_copy_of_a_killed_command_is_removed_at_start_and_the_rest_ingested(
    daemon, tmp_path
):
    home = tmp_path / "home"
    inbox = home / "inbox" / "legal"
    inbox.mkdir(parents=True)
    stale = inbox / ".facts.jsonl.999999999.part"  # its process is gone
    stale.write_text(CHAT % (1, 1))
    (inbox / "kept.jsonl").write_text(CHAT % (2, 2))
    d = daemon(home)
    db = home / "evertune.db"
    wait_for(lambda: db.exists() and examples(home, "legal") == 1, what="kept.jsonl ingested")
    wait_for(lambda: not stale.exists(), what="the partial copy removed")
    assert f"removed {stale}: the partial copy of a command that was stopped" in d.logtext()


def test_status_and_healthz_say_why_a_file_waits_and_when_it_is_tried_again(tmp_path):
    """Before: `status` said "1 waiting" and /healthz "ok"; the reason was in the log only."""
    import httpx

    home = tmp_path / "home"
    home.mkdir()
    (home / "done").mkdir()
    (home / "done" / "legal").write_text("in the way")  # the move after the commit fails
    d = Daemon(
        home, INGEST_ONLY.replace("[watch]\n", "[watch]\nretry_seconds = 60\n"), stop_timeout=30
    ).wait_locked()
    try:
        d.wait_up()
        inbox = home / "inbox" / "legal"
        inbox.mkdir(parents=True)
        (inbox / "facts.jsonl").write_text(CHAT % (1, 1))
        wait_for(lambda: "retried in 60 s" in d.logtext(), what="the first failure", daemon=d)
        url = (home / "control.url").read_text().strip()
        health = httpx.get(f"{url}/healthz", timeout=5).json()
        assert health["ok"] is True
        [why] = health["waiting"]
        assert why["domain"] == "legal" and why["file"] == "facts.jsonl"
        assert "Not a directory" in why["error"] or "File exists" in why["error"], why
        assert why["next_retry"]
        out = evertune(home, "status")
        assert out.returncode == 0, out.stderr
        line = f"  waiting: facts.jsonl: {why['error']} (next try {why['next_retry']})"
        assert line in out.stdout.splitlines(), out.stdout
        status = json.loads(evertune(home, "status", "--json").stdout)
        assert status["domains"][0]["files"]["waiting_why"] == [why]
    finally:
        assert d.stop() == 0
