"""Several vLLM replicas (marker e2e): the real daemon in external mode with two real
vLLM-CPU servers serving the tiny model. Every version reaches both and the stable name
answers the same on both; a replica killed and restarted gets the live version back from
reconcile with no command; a replica down during a publish does not hold it up, and gets
the new version when it is back."""

from __future__ import annotations

import os
import random
import signal
import time

import fault_trials as faults
import pytest
from helpers import Daemon, ask, free_port, served, wait_for

pytestmark = pytest.mark.e2e


def answer(url: str, model: str) -> str:
    return ask(url, model, "Hi", max_tokens=8)


class Replica:
    """A second vLLM-CPU server on a fixed port; `restart()` starts a new one there after a
    `stop()` (an EmbeddedVLLM is started once)."""

    def __init__(self, model):
        self.model, self.port, self.server = model, free_port(), None

    def start(self):
        from evertune.daemon.config_sections import ServeConfig
        from evertune.daemon.serving.vllm_process import EmbeddedVLLM

        cfg = ServeConfig(port=self.port, start_timeout_seconds=600)
        self.server = EmbeddedVLLM(self.model, cfg, name="replica-b")
        self.server.start()
        assert self.server.wait_ready(600), f"replica b did not start: {self.server.last_error}"
        return self.server

    def stop(self):
        if self.server is not None:
            self.server.stop()


@pytest.fixture
def replica(tiny_base, vllm):
    r = Replica(tiny_base)
    try:
        r.start()
        yield r
    finally:
        r.stop()


def test_two_replicas_get_every_version_and_one_down_holds_nothing_up(
    tmp_path, tiny_base, vllm, replica
):
    replica_b = replica.server
    a, b = vllm.url, replica_b.url
    home = tmp_path / "home"
    home.mkdir()
    (home / "evertune.toml").write_text(faults.config_text(tiny_base, a, b))
    exp = faults.Expected()
    daemon = Daemon(home)
    try:
        daemon.wait_up()

        def both_serve_live() -> bool:
            live = faults.live_paths(home).get("alpha")
            return bool(live) and all(served(u).get("alpha") == live for u in (a, b))

        # 1. a version reaches both replicas, and the stable name answers the same on both
        faults.drop_file(home, exp, random.Random(0), "alpha", "one.jsonl", 40)
        wait_for(both_serve_live, 180, "v0001 on both replicas", daemon, every=0.5)
        v1 = faults.live_paths(home)["alpha"]
        assert v1.endswith("v0001")
        assert answer(a, "alpha") == answer(b, "alpha")

        # 2. replica b killed: its supervisor restarts it, reconcile loads v0001 back
        starts, pid = replica_b.starts, replica_b.pid
        os.killpg(pid, signal.SIGKILL)
        wait_for(
            lambda: replica_b.starts > starts and replica_b.ready.is_set(),
            600,
            "b restarted",
            every=0.5,
        )
        wait_for(both_serve_live, 60, "reconcile to reload v0001 on b", daemon, every=0.5)
        assert answer(b, "alpha") == answer(a, "alpha")

        # 3. replica b down during a publish: v0002 goes live on a without waiting for b
        replica.stop()
        t0 = time.monotonic()
        faults.drop_file(home, exp, random.Random(1), "alpha", "two.jsonl", 40)
        wait_for(
            lambda: (
                (faults.live_paths(home).get("alpha") or "").endswith("v0002")
                and served(a).get("alpha", "").endswith("v0002")
            ),
            180,
            "v0002 live and on a while b is down",
            daemon,
            every=0.5,
        )
        assert served(b, or_none=True) is None  # b really was down
        assert time.monotonic() - t0 < 180

        # ... and b, back (a new server on its port, no adapters), gets v0002 from reconcile
        replica.start()
        wait_for(both_serve_live, 60, "reconcile to bring v0002 to b", daemon, every=0.5)
        assert answer(a, "alpha") == answer(b, "alpha")
    finally:
        daemon.stop()
        faults.unload_ours(a)
