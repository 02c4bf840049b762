"""The control API's routes (daemon/control/server.py serves them): what the daemon offers
(`ControlHandler`), each route's method and the fields of its JSON body, checked before the
handler is called (a missing, unknown or mistyped field is a 400 naming it)."""

from __future__ import annotations

from typing import Any, Protocol


class ControlHandler(Protocol):
    """What the daemon offers the control API. Methods return JSON-serialisable dicts and
    may raise evertune errors, which become 400/409 answers carrying the message."""

    def status(self) -> dict[str, Any]: ...

    def page_data(self) -> dict[str, Any]:
        """What the status page draws (evertune.daemon.control.status_page.page_data)."""
        ...

    def health(self) -> str | None:
        """None when the daemon is healthy, else why it is not (served as 503)."""
        ...

    def waiting(self) -> list[dict[str, Any]]:
        """Why each file that could not be taken yet waits (in /healthz's answer)."""
        ...

    def train(self, domain: str, force: bool, from_base: bool) -> dict[str, Any]: ...

    def forget(self, domain: str, prompt_hashes: list) -> dict[str, Any]: ...

    def rollback(self, domain: str, to: str | None) -> dict[str, Any]: ...

    def pin(self, domain: str, version: str) -> dict[str, Any]: ...

    def unpin(self, domain: str, version: str) -> dict[str, Any]: ...

    def canary(
        self, domain: str, version: str | None, percent: float | None, minutes: float | None
    ) -> dict[str, Any]: ...

    def reload(self) -> dict[str, Any]: ...

    def reconcile(self) -> dict[str, Any]: ...


class Answer(Exception):
    """A request answered with a 4xx status before the handler sees it."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


_REQUIRED = object()
_NUMBER = float  # a field that takes an int or a float (never a bool, NaN or infinity)


def _field(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    if name not in body:
        if default is _REQUIRED:
            raise Answer(400, f"missing field {name!r}")
        return default
    value = body[name]
    if value is None and default is None:  # an optional field may be null
        return None
    if kind is _NUMBER:
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise Answer(400, f"field {name!r} must be a number, not {value!r}")
        if abs(value) == float("inf"):
            raise Answer(400, f"field {name!r} must be a finite number, not {value!r}")
    elif not isinstance(value, kind):
        raise Answer(400, f"field {name!r} must be a {kind.__name__}, not {value!r}")
    return value


def _call(method: str, *fields: tuple[str, type, Any]):
    """A route calling handler.<method>(*fields), each field checked: (name, type, default)."""
    names = [name for name, _, _ in fields]

    def route(handler: ControlHandler, body: dict[str, Any]) -> Any:
        unknown = sorted(set(body) - set(names))
        if unknown:
            raise Answer(400, f"unknown field {unknown[0]!r}; expected {names}")
        return getattr(handler, method)(*(_field(body, *spec) for spec in fields))

    return route


_DOMAIN = ("domain", str, _REQUIRED)
_VERSION = ("version", str, _REQUIRED)
ROUTES = {
    "/v1/status": ("GET", _call("status")),
    "/v1/train": (
        "POST",
        _call("train", _DOMAIN, ("force", bool, False), ("from_base", bool, False)),
    ),
    "/v1/forget": ("POST", _call("forget", _DOMAIN, ("prompt_hashes", list, _REQUIRED))),
    "/v1/rollback": ("POST", _call("rollback", _DOMAIN, ("to", str, None))),
    "/v1/pin": ("POST", _call("pin", _DOMAIN, _VERSION)),
    "/v1/unpin": ("POST", _call("unpin", _DOMAIN, _VERSION)),
    "/v1/canary": (
        "POST",
        _call(
            "canary",
            _DOMAIN,
            ("version", str, None),
            ("percent", _NUMBER, None),
            ("minutes", _NUMBER, None),
        ),
    ),
    "/v1/reload": ("POST", _call("reload")),
    "/v1/reconcile": ("POST", _call("reconcile")),
}
# Read-only and loopback like /metrics: no token. /status is the page (status_page.html).
PUBLIC = {
    "/healthz": "GET",
    "/metrics": "GET",
    "/status": "GET",
    "/status/data.json": "GET",
    "/status/plotly.js": "GET",
}
