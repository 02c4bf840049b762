"""Starting and reconfiguring the daemon when something is wrong (issue 24): a start that fails
half way stops what it started; a config with a bad number is refused with the reason at
start, on SIGHUP and on `reload`, and the running daemon keeps its config whole; with all
automatic training off, a restart trains nothing and `evertune train` still does."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import CHAT, Daemon, evertune, wait_for

from evertune.daemon import config as config_mod
from evertune.daemon.control.client import ControlClient, ControlError
from evertune.daemon.lock import daemon_state
from evertune.daemon.service import Service
from evertune.store.db import open_db

# No vLLM, the control API on a free port, periodic checks every 5 minutes (none runs here).
CONFIG = """
[watch]
settle_seconds = 0.2
[serve]
mode = "none"
[schedule]
on_drop = false
interval_minutes = 5
[control]
port = 0
"""


def load(home: Path, text: str) -> config_mod.Config:
    home.mkdir(parents=True, exist_ok=True)
    (home / "evertune.toml").write_text(text)
    return config_mod.load(home / "evertune.toml", env={})


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


@pytest.mark.parametrize("fault", ["locked store", "control port", "watcher", "schedule"])
def test_a_start_that_fails_half_way_stops_what_it_started(tmp_path, monkeypatch, fault):
    """Before: a failure after the trainer thread started left the process alive, deaf to
    SIGTERM, holding the home's lock and the control port."""
    from evertune.store import db as db_mod

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    home = tmp_path / "home"
    text, holder, busy = CONFIG, None, None
    if fault == "control port":
        busy = socket.create_server(("127.0.0.1", 0))
        text = CONFIG.replace("port = 0", f"port = {busy.getsockname()[1]}")
    svc = Service(load(home, text))
    seen: dict[str, int] = {}

    def boom(*args, **kwargs):
        seen["port"] = int(svc.control.url.rsplit(":", 1)[1])  # the control API is up
        raise RuntimeError("injected fault")

    expected = "injected fault"
    if fault == "locked store":
        open_db(svc.layout.db_path).close()
        holder = sqlite3.connect(svc.layout.db_path)
        holder.execute("BEGIN IMMEDIATE")  # another process's long write transaction
        monkeypatch.setattr(db_mod, "BUSY_TIMEOUT_MS", 300)
        expected = "locked by another process"
    elif fault == "control port":
        expected = "the control API cannot listen"
    else:
        monkeypatch.setattr(getattr(svc, fault), "start", boom)
    before = set(threading.enumerate())
    try:
        with pytest.raises(Exception, match=expected):
            svc.start()
        left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        for t in left:
            t.join(5)
        assert [t.name for t in left if t.is_alive()] == []
        assert daemon_state(svc.layout.lock_path) == (False, None)  # a new start may go on
        assert not (home / "control.url").exists()
        if "port" in seen:
            assert refused(seen["port"])
    finally:  # (what the fix does, so a failing run does not hang the test session)
        for stop in (svc.runs.stop, svc.schedule.stop, svc.control.stop, svc.watcher.stop):
            stop()
        svc.writer.stop()
        if holder is not None:
            holder.rollback()
            holder.close()
        if busy is not None:
            busy.close()


def test_a_config_with_nan_at_start_exits_with_the_reason_and_frees_the_home(tmp_path):
    """Before: a traceback, then the process hung holding the lock and the control port."""
    home = tmp_path / "home"
    load(home, CONFIG)
    path = home / "evertune.toml"
    path.write_text(CONFIG.replace("interval_minutes = 5", "interval_minutes = nan"))
    try:
        out = evertune(home, "run", timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("`evertune run` with interval_minutes = nan hung instead of exiting")
    assert out.returncode == 2, out.stderr
    assert f"{path}: schedule.interval_minutes = nan is not a finite number" in out.stderr
    assert "from 0 to 1000000" in out.stderr
    assert "Traceback" not in out.stderr
    assert daemon_state(home / "daemon.lock") == (False, None)


def test_sighup_with_a_bad_number_keeps_the_running_config(tmp_path):
    """Before: SIGHUP with interval_minutes = nan killed the daemon (README: the running
    config is kept)."""
    home = tmp_path / "home"
    d = Daemon(home, CONFIG, stop_timeout=30)
    try:
        d.wait_up()
        path = home / "evertune.toml"
        path.write_text(CONFIG.replace("interval_minutes = 5", "interval_minutes = nan"))
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "config not reloaded" in d.logtext(), what="the refusal", daemon=d)
        line = next(x for x in d.logtext().splitlines() if "config not reloaded" in x)
        assert "keeping the running one" in line and "interval_minutes = nan" in line
        assert str(path) in line
        assert d.proc.poll() is None
        url = (home / "control.url").read_text().strip()
        assert httpx.get(f"{url}/healthz", timeout=5).json() == {"ok": True}
        # The next good file is compared with the running config: the bad one left nothing.
        path.write_text(CONFIG.replace("on_drop = false", "on_drop = true"))
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "config reloaded" in d.logtext(), what="the reload", daemon=d)
        line = next(x for x in d.logtext().splitlines() if "config reloaded" in x)
        assert "schedule.on_drop: False -> True" in line and "interval" not in line
    finally:
        assert d.stop() == 0


def test_reload_with_a_bad_number_is_409_with_the_reason_and_changes_nothing(tmp_path, monkeypatch):
    """Before: 500, and the daemon half reconfigured (the new config in place, its periodic
    jobs removed: periodic training silently off)."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    home = tmp_path / "home"
    svc = Service(load(home, CONFIG))
    svc.start()
    try:
        running = svc.config
        path = home / "evertune.toml"
        path.write_text(CONFIG.replace("interval_minutes = 5", "interval_minutes = nan"))
        with (
            ControlClient.from_home(home, svc.control.url) as client,
            pytest.raises(ControlError) as err,
        ):
            client.reload()
        assert err.value.status == 409
        assert f"{path}: schedule.interval_minutes = nan is not a finite number" in str(err.value)
        assert svc.config is running
        [job] = [j for j in svc.schedule.scheduler.get_jobs() if j.id.startswith("periodic:")]
        assert job.trigger.interval.total_seconds() == 300
        out = evertune(home, "reload")  # the CLI reads the file first and says why
        assert out.returncode == 2 and "interval_minutes = nan is not a finite" in out.stderr
    finally:
        svc.stop()


def runs_of(home: Path) -> list[tuple[str, str]]:
    db = open_db(home / "evertune.db", readonly=True)
    try:
        return [tuple(r) for r in db.execute("SELECT domain, trigger FROM runs ORDER BY id")]
    finally:
        db.close()


def test_with_all_automatic_training_off_a_restart_trains_nothing(tmp_path):
    """Issue 24: on_drop off, no interval, no cron, and every restart started a run."""
    home = tmp_path / "home"
    # A model path that does not exist: any run would fail at once instead of training.
    off = CONFIG.replace("interval_minutes = 5", "interval_minutes = 0")
    off += '[model]\npath = "/nonexistent/model"\n'
    d = Daemon(home, off, stop_timeout=30)
    try:
        d.wait_up()
        inbox = home / "inbox" / "legal"
        inbox.mkdir(parents=True)
        (inbox / "facts.jsonl").write_text("".join(CHAT % (i, i) for i in range(3)))
        wait_for((home / "done" / "legal" / "facts.jsonl").exists, what="ingest", daemon=d)
    finally:
        assert d.stop() == 0
    d = Daemon(home, append=True, stop_timeout=30)
    try:
        d.wait_up()
        wait_for(lambda: "evertune running" in d.logtext(), what="the start", daemon=d)
        time.sleep(3)  # the start-up check runs at once when there is one
        assert runs_of(home) == []
        assert "training queued" not in d.logtext()
        out = evertune(home, "train", "legal")  # by hand it still trains (and fails here)
        assert out.returncode == 1, out.stdout + out.stderr
        assert runs_of(home) == [("legal", "manual")]
    finally:
        assert d.stop() == 0


FAKE_CHILD = """
import json, os, sys, time
open(sys.argv[1], "w").write(str(os.getpid()))
for step in range(1, 100_000):
    print(json.dumps({"event": "progress", "step": step, "steps": 100_000, "loss": 1.0,
                      "tokens_per_s": 1.0, "eta_s": 1.0, "epoch": 0}), flush=True)
    time.sleep(0.05)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_run_that_fails_in_the_parent_leaves_no_training_child_behind(tmp_path, monkeypatch):
    """The same class as a failed start: the store locked past the busy timeout while a run
    records a step made the run fail, and its training child went on training on its own
    (a retry then started a second one)."""
    from evertune.adapters.contract import ChildSpec, EvalSpec, TrainSpec
    from evertune.daemon.training.children import run_child
    from evertune.store import db as db_mod
    from evertune.store import runs

    home = tmp_path / "home"
    fake = tmp_path / "fake_child.py"
    fake.write_text(FAKE_CHILD)
    pid_file = tmp_path / "child.pid"
    # The launcher runs `<launcher> -m evertune.adapters.child RUN_DIR`: here, the fake.
    cfg = load(home, CONFIG + f'[train]\nlauncher = "{sys.executable} {fake} {pid_file}"\n')
    monkeypatch.setattr(db_mod, "BUSY_TIMEOUT_MS", 300)
    db = open_db(home / "evertune.db")
    run_id = runs.queue(db, "legal", "manual")
    holder = None

    def lock_the_store(event: dict) -> None:
        nonlocal holder
        if holder is None and event.get("step") == 3:
            holder = sqlite3.connect(home / "evertune.db")
            holder.execute("BEGIN IMMEDIATE")  # another process's long write transaction

    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            spec = ChildSpec(TrainSpec(base_path="", out_dir="", new=[]), EvalSpec(general=[]))
            run_child(db, cfg, home / "run", spec, run_id, lock_the_store, None)
        pid = int(pid_file.read_text())
        assert wait_for(lambda: not alive(pid), 30, "the child to be stopped", fail=False), (
            "the training child still runs"
        )
    finally:
        if pid_file.exists() and alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        if holder is not None:
            holder.rollback()
            holder.close()
        db.close()


# One key of each section, changed by a reload; the section's parts see it at their next use,
# or (config.RESTART_SECTIONS) it stays as the daemon started and is reported.
CHANGES = {
    "ingest": ("max_errors_kept", 7),
    "watch": ("retry_seconds", 9.0),
    "model": ("reference_limit", 11),
    "train": ("lr", 0.0005),
    "gate": ("max_bleed", 2),
    "registry": ("keep_last", 3),
    "schedule": ("interval_minutes", 7.0),
    "serve": ("reconcile_seconds", 13.0),
    "control": ("port", 8499),
    "log": ("level", "debug"),
}


def toml(sections: dict[str, dict]) -> str:
    return "".join(
        f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
        for name, keys in sections.items()
    )


def test_a_reload_reaches_every_part_or_says_it_needs_a_restart(tmp_path, monkeypatch):
    """Every part reads the running config from one source (config.ConfigSource), so a
    reload reaches the training runs, the ingestion, the serving runner (its gate warm-up),
    rollback and pin, and the scheduler (its triggers planned again) alike; the sections
    naming running processes and sockets stay as the daemon started, and the reload says
    so, key by key."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    home = tmp_path / "home"
    first = {  # CONFIG's settings
        "watch": {"settle_seconds": 0.2},
        "serve": {"mode": "none"},
        "schedule": {"on_drop": False, "interval_minutes": 5},
        "control": {"port": 0},
    }
    svc = Service(load(home, toml(first)))  # built as `evertune run` builds it, not started
    parts = [svc.schedule, svc.ingestion, svc.runs.work, svc.serving, svc.ops]
    assert all(p.config is svc.source for p in parts)
    assert set(config_mod.LIVE_SECTIONS) | set(config_mod.RESTART_SECTIONS) == set(
        config_mod.SECTIONS
    )
    second = {name: dict(first.get(name, {})) for name in CHANGES}
    for name, (key, value) in CHANGES.items():
        second[name][key] = value
    (home / "evertune.toml").write_text(toml(second))
    started, level = svc.config, logging.getLogger().level
    try:
        said = svc.reload()
        for name, (key, value) in CHANGES.items():
            [line] = [
                c for c in said["applied"] + said["needs_restart"] if c.startswith(f"{name}.{key}:")
            ]
            now = getattr(getattr(svc.config, name), key)
            if name in config_mod.RESTART_SECTIONS:
                assert line in said["needs_restart"]
                assert now == getattr(getattr(started, name), key) != value
            else:
                assert line in said["applied"] and now == value
        for p in parts:
            assert p.config.get().train.lr == 0.0005 and p.config.get().gate.max_bleed == 2
        [job] = [j for j in svc.schedule.scheduler.get_jobs() if j.id.startswith("periodic:")]
        assert job.trigger.interval.total_seconds() == 7 * 60
    finally:
        logging.getLogger().setLevel(level)
