"""AdminGuard (daemon/serving/vllm_entry.py) as the ASGI middleware it is, in front of a stand-in
app that answers 200 to everything; through a real vLLM server in test_serving_e2e.py."""

from __future__ import annotations

import asyncio

import pytest

from evertune.adapters.remote import ADMIN_HEADER, ADMIN_KEY_ENV
from evertune.daemon.serving.vllm_entry import AdminGuard


async def _app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def status(guard: AdminGuard, method: str, path: str, headers=()) -> int:
    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": list(headers)}
    asyncio.run(guard(scope, None, send))
    return sent[0]["status"]


ADMIN = [
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"),
    ("POST", "/adapters"),
    ("DELETE", "/adapters/facts"),
    ("POST", "/sleep"),
    ("POST", "/collective_rpc"),
    ("POST", "/v1/chat/completions/../load_lora_adapter"),  # not a client route either
]
CLIENT = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/facts"),
    ("GET", "/health"),
]


@pytest.mark.parametrize("method, path", ADMIN)
def test_admin_routes_need_the_daemons_key(monkeypatch, method, path):
    monkeypatch.setenv(ADMIN_KEY_ENV, "s3cret")
    guard = AdminGuard(_app)
    header = ADMIN_HEADER.lower().encode()
    assert status(guard, method, path) == 403
    assert status(guard, method, path, [(header, b"wrong")]) == 403
    assert status(guard, method, path, [(header, b"s3cret")]) == 200


@pytest.mark.parametrize("method, path", ADMIN)
def test_without_a_key_every_admin_route_is_refused(monkeypatch, method, path):
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    guard = AdminGuard(_app)
    assert status(guard, method, path, [(ADMIN_HEADER.lower().encode(), b"")]) == 403


@pytest.mark.parametrize("method, path", CLIENT)
def test_client_routes_stay_open(monkeypatch, method, path):
    monkeypatch.setenv(ADMIN_KEY_ENV, "s3cret")
    assert status(AdminGuard(_app), method, path) == 200


# ---- the route table (evertune.daemon.serving.routing) -------------------------------------------


def _call(guard: AdminGuard, method: str, path: str, body: bytes = b"", admin: bool = True):
    """(status, JSON body) of one request through the guard to a stand-in app that echoes
    the model it was asked for, as vLLM does."""
    import json

    sent = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def echo(scope, receive, send):
        got = json.loads((await receive())["body"])
        out = json.dumps({"model": got["model"], "user": got.get("user")}).encode()
        headers = [(b"content-length", str(len(out)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})

    guard.app = echo
    headers = [(ADMIN_HEADER.lower().encode(), b"s3cret")] if admin else []
    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    asyncio.run(guard(scope, receive, send))
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    length = dict(sent[0]["headers"]).get(b"content-length")
    assert length is None or int(length) == len(payload)
    return sent[0]["status"], json.loads(payload)


def test_a_routed_name_is_rewritten_at_admission_and_answered_as_asked(monkeypatch):
    import json

    monkeypatch.setenv(ADMIN_KEY_ENV, "s3cret")
    guard = AdminGuard(_app)
    table = {"routes": {"facts": {"to": "facts@v0002"}, "news": {"to": "base"}}}
    assert _call(guard, "PUT", "/evertune/routes", json.dumps(table).encode())[0] == 200
    # the app saw the version; the client gets the name it asked for
    seen = []
    ask = json.dumps({"model": "facts", "messages": []}).encode()
    original = guard.router.generate

    async def spy(app, scope, receive, send):
        async def app_spy(scope, receive, send):
            body = json.loads((await receive())["body"])
            seen.append(body["model"])
            out = json.dumps({"model": body["model"]}).encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": out})

        return await original(app_spy, scope, receive, send)

    guard.router.generate = spy
    assert _call(guard, "POST", "/v1/chat/completions", ask, admin=False) == (
        200,
        {"model": "facts"},
    )
    assert seen == ["facts@v0002"]
    assert guard.router.counts == {"facts@v0002": {"requests": 1, "failed": 0}}


def test_a_bad_route_table_is_refused_whole_with_the_reason(monkeypatch):
    import json

    monkeypatch.setenv(ADMIN_KEY_ENV, "s3cret")
    guard = AdminGuard(_app)
    good = {"routes": {"facts": {"to": "facts@v0001"}}}
    assert _call(guard, "PUT", "/evertune/routes", json.dumps(good).encode())[0] == 200
    for table, why in [
        ({"facts": {"to": "x"}}, 'must be {"routes"'),
        ({"routes": {"facts": {}}}, "needs a target name"),
        ({"routes": {"facts": {"to": "facts"}}}, "points at itself"),
        ({"routes": {"facts": {"to": "a", "canary": "b", "percent": 101}}}, "within 0..100"),
        ({"routes": {"facts": {"to": "a", "canary": "b", "percent": True}}}, "a number"),
        ({"routes": {"facts": {"to": "a", "canary": 3}}}, "must be a model name"),
    ]:
        status_, body = _call(guard, "PUT", "/evertune/routes", json.dumps(table).encode())
        assert status_ == 400 and why in body["error"]["message"], (table, body)
    nan = b'{"routes": {"facts": {"to": "a", "canary": "b", "percent": NaN}}}'
    assert _call(guard, "PUT", "/evertune/routes", nan)[0] == 400
    assert _call(guard, "GET", "/evertune/routes")[1]["routes"] == good["routes"]  # kept
    # and only the daemon may read or change it
    assert _call(guard, "GET", "/evertune/routes", admin=False)[0] == 403


def test_a_canary_share_is_the_same_for_one_user_and_near_its_percent_overall():
    from evertune.daemon.serving.routing import Route

    route = Route("shop@v0001", "shop@v0002", 20.0)
    picks = [route.choose(f"user-{i}") for i in range(2000)]
    assert picks == [route.choose(f"user-{i}") for i in range(2000)]
    share = picks.count("shop@v0002") / len(picks)
    assert 0.17 < share < 0.23, share  # 2000 users: 20% +- 3 standard deviations (0.9%)
    assert Route("shop@v0001").choose("anyone") == "shop@v0001"
