"""The store deleted or replaced under the running daemon (the real daemon process, a real
SQLite file in a temp home). Before: a dropped file was "ingested" into the unlinked
database and moved to done/, /healthz said ok, and the next start made a fresh empty store
without a word while done/ held the files whose examples were gone."""

from __future__ import annotations

import os
import shutil

import httpx
from helpers import CHAT, Daemon, wait_for
from test_daemon import INGEST_ONLY, evertune


def _health(home) -> tuple[int, dict]:
    url = (home / "control.url").read_text().strip()
    r = httpx.get(f"{url}/healthz", timeout=5)
    return r.status_code, r.json()


def _drop(home, name: str, n: int):
    inbox = home / "inbox" / "legal"
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / name).write_text("".join(CHAT % (i, i) for i in range(n)))
    return inbox / name


def _remove_store(home) -> None:
    for suffix in ("", "-wal", "-shm"):  # as `rm evertune.db*` does
        (home / f"evertune.db{suffix}").unlink(missing_ok=True)


def test_a_store_deleted_under_the_daemon_stops_ingestion_loudly_and_the_restart_warns(
    tmp_path,
):
    home = tmp_path / "home"
    d = Daemon(home, INGEST_ONLY, stop_timeout=30).wait_locked()
    try:
        d.wait_up()
        _drop(home, "a.jsonl", 10)
        wait_for((home / "done" / "legal" / "a.jsonl").exists, what="the first file in done/")
        assert _health(home)[0] == 200

        _remove_store(home)
        late = _drop(home, "b.jsonl", 5)
        wait_for(lambda: "b.jsonl" in d.logtext(), what="the daemon to say what it did with b")
        # nothing taken: the file waits in the inbox, nothing went to done/
        assert late.is_file() and not (home / "done" / "legal" / "b.jsonl").exists()
        assert not (home / "evertune.db").exists()  # and no new store was made meanwhile
        log = d.logtext()
        assert "ERROR" in log and "deleted" in log and str(home / "evertune.db") in log
        code, body = _health(home)
        assert code == 503 and "evertune.db" in body["why"] and "deleted" in body["why"]
        status = evertune(home, "status")
        assert "the daemon is not healthy" in status.stdout, status.stdout
        assert "evertune.db" in status.stdout and "deleted" in status.stdout, status.stdout
    finally:
        assert d.stop() == 0

    # the next start makes a new store (the daemon cannot work without one) and says that
    # done/ holds files this store has never seen, and what to do about it
    d = Daemon(home, log="restart.log", stop_timeout=30).wait_locked()
    try:
        d.wait_up()
        wait_for((home / "done" / "legal" / "b.jsonl").exists, what="b ingested after restart")
        log = d.logtext()
        assert "WARNING" in log and "done/" in log and "1 file" in log, log
        assert "restore" in log and "move" in log  # the two safe ways back
    finally:
        assert d.stop() == 0


def test_a_store_replaced_under_the_daemon_is_noticed_too(tmp_path):
    home = tmp_path / "home"
    d = Daemon(home, INGEST_ONLY, stop_timeout=30).wait_locked()
    try:
        d.wait_up()
        _drop(home, "a.jsonl", 3)
        wait_for((home / "done" / "legal" / "a.jsonl").exists, what="the first file in done/")
        # an older copy put in its place (a restore done while the daemon runs)
        shutil.copy(home / "evertune.db", home / "copy.db")
        os.replace(home / "copy.db", home / "evertune.db")
        late = _drop(home, "b.jsonl", 5)
        wait_for(lambda: "b.jsonl" in d.logtext(), what="the daemon to say what it did with b")
        assert late.is_file() and not (home / "done" / "legal" / "b.jsonl").exists()
        code, body = _health(home)
        assert code == 503 and "replaced" in body["why"] and "restart" in body["why"]
    finally:
        assert d.stop() == 0


def test_no_training_run_starts_on_a_store_that_is_gone(tmp_path, caplog):
    """The trainer writes runs and versions on its own connection: with the store deleted
    it would train, publish and record a version in a database nobody sees again."""
    import threading

    from evertune.daemon.inbox.writer import StoreWriter
    from evertune.daemon.training.runqueue import RunQueue

    db_path = tmp_path / "evertune.db"
    writer = StoreWriter(db_path)
    writer.start()
    ran, idle = [], threading.Event()
    queue = RunQueue(
        db_path,
        queue_run=lambda domain, trigger: 1,
        work=lambda db, req, cancel: ran.append(req.domain),
        on_idle=idle.set,
        blocked=writer.store_problem,
    )
    queue.start()
    try:
        queue.request("before", "manual")  # runs: the store is there
        wait_for(idle.is_set, 10, "the first run")
        idle.clear()
        _remove_store(tmp_path)
        queue.request("legal", "manual")
        wait_for(idle.is_set, 10, "the run to be taken off the queue")
        assert ran == ["before"]
        assert "legal: training not started" in caplog.text and "deleted" in caplog.text
    finally:
        queue.stop()
        queue.join(5)
        writer.stop()
        writer.join(5)
