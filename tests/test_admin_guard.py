"""AdminGuard (daemon/vllm_entry.py) as the ASGI middleware it is, in front of a stand-in
app that answers 200 to everything; through a real vLLM server in test_serving_e2e.py."""

from __future__ import annotations

import asyncio

import pytest

from evertune.adapters.remote import ADMIN_HEADER, ADMIN_KEY_ENV
from evertune.daemon.vllm_entry import AdminGuard


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
