"""`evertune status` run by an operator says when the running daemon is not healthy (the real
daemon process, a real SQLite file in a temp home). Before: the CLI asked the daemon's
/healthz for the waiting files only, and never showed its health: with the store deleted and
done/ still empty, /healthz answered 503 naming the store while `status` said nothing."""

from __future__ import annotations

import json

import httpx
from helpers import Daemon, wait_for
from test_daemon import INGEST_ONLY, evertune


def test_status_shows_the_daemons_health_when_its_store_is_deleted(tmp_path):
    home = tmp_path / "home"
    d = Daemon(home, INGEST_ONLY, stop_timeout=30).wait_locked()
    try:
        d.wait_up()
        url = (home / "control.url").read_text().strip()
        for suffix in ("", "-wal", "-shm"):
            (home / f"evertune.db{suffix}").unlink(missing_ok=True)
        wait_for(
            lambda: httpx.get(f"{url}/healthz", timeout=5).status_code == 503,
            what="/healthz to say the store is gone",
        )
        text = evertune(home, "status").stdout
        assert "not healthy" in text and "evertune.db" in text and "deleted" in text, text
        report = json.loads(evertune(home, "status", "--json").stdout)
        assert "deleted" in report["daemon"]["health"], report["daemon"]
    finally:
        assert d.stop() == 0


def test_status_says_ok_for_a_healthy_daemon(tmp_path):
    home = tmp_path / "home"
    d = Daemon(home, INGEST_ONLY, stop_timeout=30).wait_locked()
    try:
        d.wait_up()
        report = json.loads(evertune(home, "status", "--json").stdout)
        assert report["daemon"]["health"] == "ok" and not report["warnings"], report
    finally:
        assert d.stop() == 0
