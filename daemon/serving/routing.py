"""One answer, one version: the stable name is resolved to a version when a request is admitted.

The daemon's middleware in vLLM's API server (`vllm_entry.AdminGuard`) holds a route table
the daemon pushes through an admin route:

    PUT /evertune/routes   {"routes": {"facts": {"to": "facts@v0007"},
                                       "faq": {"to": "SmolLM2-135M-Instruct"},
                                       "news": {"to": "news@v0003", "canary": "news@v0004",
                                                "percent": 10}}}
    GET /evertune/routes   the table, and per target name the requests admitted and the
                           ones answered with an HTTP error since the server started

A generation request (POST /v1/chat/completions, /v1/completions) whose `model` is a routed
name has its body rewritten to the target before vLLM sees it, so the whole answer comes
from that one version's weights, already loaded under its versioned name. A publish loads
the versioned name and then replaces the table: no weights change under a running request
(vLLM's in-place load of a name that requests are using swaps the weights between two
decoding steps of those requests: `benchmarks/swap.py` counted 152 of 368 answers mixed).
The response still names the model the client asked for, and clients listing /v1/models
see the routed names (with `routed_to`, the version a request admitted now gets). A domain
with nothing live is routed to the base model, which never saw its examples (while
`forget` rebuilds it, for instance).

Canary: a route with `canary` sends `percent` of its requests to that version: the same
conversation always to the same version when the client sends OpenAI's `user` field
(a hash of it), a random share otherwise.

The table lives in the API server's memory: a restarted vLLM starts without one (and
without its runtime adapters); the daemon's reconcile loads the adapters and pushes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ROUTES_PATH = "/evertune/routes"
MAX_TABLE_BYTES = 4 << 20


class RouteError(ValueError):
    """A route table that is not one (the PUT answers 400 with this message)."""


@dataclass(frozen=True)
class Route:
    to: str
    canary: str | None = None
    percent: float = 0.0

    def choose(self, user: Any) -> str:
        if not self.canary or self.percent <= 0:
            return self.to
        if isinstance(user, str) and user:
            digest = hashlib.blake2b(user.encode(), digest_size=8).digest()
            draw = int.from_bytes(digest, "big") % 10_000 / 100
        else:
            draw = random.random() * 100
        return self.canary if draw < self.percent else self.to

    def to_json(self) -> dict:
        out: dict[str, Any] = {"to": self.to}
        if self.canary:
            out |= {"canary": self.canary, "percent": self.percent}
        return out


def parse_table(raw: Any) -> dict[str, Route]:
    """{"routes": {name: {"to", "canary"?, "percent"?}}} -> {name: Route}; RouteError says
    which entry is wrong and why."""
    if not isinstance(raw, dict) or not isinstance(raw.get("routes"), dict):
        raise RouteError('the body must be {"routes": {NAME: {"to": TARGET}, ...}}')
    table: dict[str, Route] = {}
    for name, spec in raw["routes"].items():
        if not isinstance(spec, dict) or not isinstance(spec.get("to"), str) or not spec["to"]:
            raise RouteError(f"route {name!r}: needs a target name in 'to'")
        canary = spec.get("canary")
        percent = spec.get("percent", 0.0)
        if canary is not None and (not isinstance(canary, str) or not canary):
            raise RouteError(f"route {name!r}: 'canary' must be a model name")
        if isinstance(percent, bool) or not isinstance(percent, int | float):
            raise RouteError(f"route {name!r}: 'percent' must be a number")
        if not 0 <= percent <= 100:  # NaN fails this too
            raise RouteError(f"route {name!r}: 'percent' must be within 0..100, not {percent}")
        if spec["to"] == name or canary == name:
            raise RouteError(f"route {name!r} points at itself")
        table[name] = Route(spec["to"], canary, float(percent))
    return table


class Router:
    """The route table and the ASGI steps that apply it (used by AdminGuard)."""

    def __init__(self) -> None:
        self.table: dict[str, Route] = {}
        self.counts: dict[str, dict[str, int]] = {}

    def snapshot(self) -> dict:
        return {
            "routes": {name: r.to_json() for name, r in sorted(self.table.items())},
            "counts": self.counts,
        }

    # ---- the admin route -------------------------------------------------------------------

    async def admin(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["method"] == "GET":
            return await _json(send, 200, self.snapshot())
        if scope["method"] != "PUT":
            return await _json(send, 405, _error(f"{scope['method']} {ROUTES_PATH}: GET or PUT"))
        body, _ = await _read_body(receive, MAX_TABLE_BYTES)
        if body is None:
            return await _json(send, 413, _error(f"a route table is at most {MAX_TABLE_BYTES} B"))
        try:
            table = parse_table(json.loads(body or b"null"))
        except (ValueError, RecursionError) as exc:  # RouteError and bad JSON alike
            return await _json(send, 400, _error(f"{ROUTES_PATH}: {exc}"))
        self.table = table  # one assignment: a request sees the old table or the new one
        return await _json(send, 200, self.snapshot())

    # ---- client requests -------------------------------------------------------------------

    async def generate(self, app, scope: dict, receive: Receive, send: Send) -> None:
        """Rewrite a routed model name to its target, then answer with the asked name."""
        if not self.table:
            return await app(scope, receive, send)
        body, first = await _read_body(receive, None)
        asked, target, request = None, None, None
        with contextlib.suppress(ValueError, RecursionError):  # vLLM says what is wrong
            request = json.loads(body)
        if isinstance(request, dict) and isinstance(request.get("model"), str):
            route = self.table.get(request["model"])
            if route is not None:
                asked, target = request["model"], route.choose(request.get("user"))
                request["model"] = target
                body = json.dumps(request).encode()
        if target is None:
            return await app(scope, _replay(first, body, receive), send)
        scope = dict(scope)
        scope["headers"] = _with_length(scope.get("headers"), len(body))
        counts = self.counts.setdefault(target, {"requests": 0, "failed": 0})
        counts["requests"] += 1
        renamed = _Renamer(send, target, asked, counts)
        await app(scope, _replay(first, body, receive), renamed.send)

    async def models(self, app, scope: dict, receive: Receive, send: Send) -> None:
        """GET /v1/models for clients: the routed names listed beside the served ones."""
        if not self.table:
            return await app(scope, receive, send)
        collected = _Collect()
        await app(scope, receive, collected.send)
        body = collected.body
        try:
            listing = json.loads(body)
            cards = {m["id"]: m for m in listing["data"]}
            for name, route in sorted(self.table.items()):
                if name not in cards and route.to in cards:
                    target = cards[route.to]
                    # a routed name is a model of its own to clients: an adapter of the base
                    parent = target.get("parent") or target["id"]
                    card = dict(target, id=name, parent=parent, routed_to=route.to)
                    listing["data"].append(card)
            body = json.dumps(listing).encode()
        except (ValueError, KeyError, TypeError):
            pass  # not a listing (an error): passed on as it was
        await collected.replay(send, body)


class _Renamer:
    """Sends the response with `"model":"<target>"` written as the name the client asked
    for (vLLM writes the served name into every response and every streamed chunk), and
    counts an HTTP error against the target."""

    def __init__(self, send: Send, target: str, asked: str, counts: dict[str, int]):
        self._send = send
        old, new = json.dumps(target).encode(), json.dumps(asked).encode()
        # compact JSON (vLLM's) and json.dumps' default spacing alike
        self._pairs = [
            (b'"model":' + old, b'"model":' + new),
            (b'"model": ' + old, b'"model": ' + new),
        ]
        self._counts = counts
        self._start: dict | None = None  # held while the body's length is being fixed
        self._held: list[bytes] = []

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            if message.get("status", 200) >= 500:
                self._counts["failed"] += 1
            headers = message.get("headers") or []
            if any(k.lower() == b"content-length" for k, _ in headers):
                self._start = message  # sent with the first complete body, length fixed
                return
            return await self._send(message)
        if message["type"] != "http.response.body":
            return await self._send(message)
        body = message.get("body", b"")
        for old, new in self._pairs:
            body = body.replace(old, new)
        if self._start is None:
            return await self._send(dict(message, body=body))
        self._held.append(body)
        if message.get("more_body", False):
            return None
        whole = b"".join(self._held)
        start, self._start = self._start, None
        start = dict(start)
        start["headers"] = _with_length(start.get("headers"), len(whole))
        await self._send(start)
        await self._send({"type": "http.response.body", "body": whole})


class _Collect:
    def __init__(self) -> None:
        self.start: dict | None = None
        self.parts: list[bytes] = []
        self.others: list[dict] = []

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.start = message
        elif message["type"] == "http.response.body":
            self.parts.append(message.get("body", b""))

    @property
    def body(self) -> bytes:
        return b"".join(self.parts)

    async def replay(self, send: Send, body: bytes) -> None:
        start = dict(self.start or {"type": "http.response.start", "status": 500})
        start["headers"] = _with_length(start.get("headers"), len(body))
        await send(start)
        await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive, limit: int | None) -> tuple[bytes | None, list[dict]]:
    """The whole request body (None when over `limit`) and the messages read for it."""
    parts: list[bytes] = []
    messages: list[dict] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break  # a disconnect: whoever reads next sees it
        parts.append(message.get("body", b""))
        size += len(parts[-1])
        if limit is not None and size > limit:
            return None, messages
        if not message.get("more_body", False):
            break
    return b"".join(parts), messages


def _replay(read: list[dict], body: bytes, receive: Receive) -> Receive:
    """A receive that gives the (rewritten) body as one message, then what `receive` gives
    (vLLM waits on it for the client's disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    pending += [m for m in read if m["type"] != "http.request"]

    async def again() -> dict:
        if pending:
            return pending.pop(0)
        return await receive()

    return again


def _with_length(headers, length: int) -> list[tuple[bytes, bytes]]:
    """ASGI headers with their content-length (if any) set to `length`."""
    return [
        (k, str(length).encode() if k.lower() == b"content-length" else v) for k, v in headers or []
    ]


def _error(message: str) -> dict:
    return {"error": {"message": message, "type": "BadRequest"}}


async def _json(send: Send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
