"""The daemon's control API: JSON over HTTP on loopback, for the CLI, plus Prometheus `/metrics`.

    GET  /healthz        {"ok": true} | 503 {"ok": false, "why": ...}     no token
                         (+ "waiting": [{domain, file, error, next_retry}] when any)
    GET  /metrics        Prometheus text exposition                       no token
    GET  /v1/status      handler.status()
    POST /v1/train       {"domain": str, "force": bool = false, "from_base": bool = false}
    POST /v1/forget      {"domain": str, "prompt_hashes": [hex str]}  -> {"run_id"}
    POST /v1/rollback    {"domain": str, "to": str | null = null}
    POST /v1/pin         {"domain": str, "version": str}
    POST /v1/unpin       {"domain": str, "version": str}
    POST /v1/canary      {"domain": str, "version": str | null, "percent": float | null,
                          "minutes": float | null}  start one; version null: end it
                          (percent 100 promotes, 0 rolls back)
    POST /v1/reload      {}
    POST /v1/reconcile   {}

Every other route needs `Authorization: Bearer <token>`, the token being the content of
`<home>/control.token` (mode 0640: the service user and the `evertune` group may read it).
Errors are `{"error": message, "kind": exception class}`: 400 for a bad request (bad JSON, a
missing or mistyped field, UsageError, InvalidDomainError, RegistryError), 401 for a missing
or wrong token, 409 for any other evertune error (the request was understood, the state
refuses it), 500 for a bug (generic message; the traceback goes to the daemon's log).

The server is the standard library's ThreadingHTTPServer: a handful of requests a minute from
one CLI do not justify a web framework. The CLI's side, on httpx: daemon/control/client.py.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from evertune.adapters.errors import AdapterError
from evertune.daemon.control.client import ControlError
from evertune.daemon.control.routes import PUBLIC, ROUTES, Answer, ControlHandler
from evertune.daemon.control.token import ensure_token
from evertune.daemon.errors import EvertuneError, UsageError
from evertune.store.errors import InvalidDomainError, RegistryError, StoreError

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
_BAD_REQUEST = (UsageError, InvalidDomainError, RegistryError)
_REFUSED = (EvertuneError, StoreError, AdapterError)


# ---- the server --------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    control: ControlServer

    def handle_error(self, request, client_address) -> None:
        # socketserver's default prints the traceback to stderr.
        log.exception("control API: error while serving %s", client_address)


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class ControlServer:
    """The control API, served by a thread; `start()` binds, `stop()` shuts down and joins."""

    def __init__(
        self,
        handler: ControlHandler,
        host: str = "127.0.0.1",
        port: int = 8420,
        *,
        token_path: Path,
        metrics_registry: CollectorRegistry | None = None,
        allow_remote: bool = False,
        token_group: str = "evertune",
    ):
        if not allow_remote and not is_loopback(host):
            raise ControlError(
                f"the control API may only listen on loopback (127.0.0.1, ::1, localhost),"
                f" not {host!r}: it can retrain and roll back every domain; put a proxy with"
                " TLS in front of it, or pass allow_remote=True if you really mean it"
            )
        self.handler = handler
        self.host = host
        self.port = port
        self.token_path = token_path
        self.token_group = token_group
        self.registry = metrics_registry if metrics_registry is not None else CollectorRegistry()
        self.token = ""
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """`http://host:port` with the port actually bound (after `start()`)."""
        port = self._httpd.server_address[1] if self._httpd else self.port
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{port}"

    def start(self) -> None:
        self.token = ensure_token(self.token_path, self.token_group)
        cls = _HTTPServer6 if ":" in self.host else _HTTPServer
        try:
            httpd = cls((self.host, self.port), _RequestHandler)
        except OSError as exc:
            raise ControlError(
                f"the control API cannot listen on {self.host}:{self.port}: {exc};"
                " is another daemon using that port? choose another control port"
            ) from exc
        httpd.control = self
        self._httpd = httpd
        # poll_interval: how long stop() may wait for the loop to notice the shutdown.
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="evertune-control",
            daemon=True,
        )
        self._thread.start()
        log.info("control API listening on %s", self.url)

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()  # waits for serve_forever to return
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        log.info("control API on %s stopped", self.url)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _RequestHandler(BaseHTTPRequestHandler):
    server: _HTTPServer
    timeout = 10  # a client that stalls mid-request does not hold a thread for ever
    server_version = "evertune-control"

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("control API %s: %s", self.address_string(), format % args)

    def _dispatch(self, method: str) -> None:
        control = self.server.control
        path = urlsplit(self.path).path
        try:
            allowed = PUBLIC.get(path) or ROUTES.get(path, (None,))[0]
            if allowed is None:
                raise Answer(404, f"no such route {path!r}")
            if method != allowed:
                raise Answer(405, f"{path} takes {allowed}, not {method}")
            if path == "/healthz":
                return self._healthz(control)
            if path == "/metrics":
                return self._send(200, generate_latest(control.registry), CONTENT_TYPE_LATEST)
            if path.startswith("/status"):
                return self._status_page(control, path)
            self._authorize(control)
            body = self._body() if method == "POST" else {}
            result = ROUTES[path][1](control.handler, body)
        except Answer as exc:
            return self._json(exc.status, {"error": str(exc)})
        except _BAD_REQUEST as exc:
            return self._json(400, {"error": str(exc), "kind": type(exc).__name__})
        except _REFUSED as exc:
            return self._json(409, {"error": str(exc), "kind": type(exc).__name__})
        except Exception:
            log.exception("control API: %s %s failed", method, path)
            message = "internal error in the evertune daemon; its log has the traceback"
            return self._json(500, {"error": message, "kind": "InternalError"})
        self._json(200, result)

    def _healthz(self, control: ControlServer) -> None:
        try:
            why = control.handler.health()
        except Exception:
            log.exception("control API: the health check failed")
            why = "the health check itself failed; the daemon's log has the traceback"
        body: dict[str, Any] = {"ok": why is None} | ({"why": why} if why else {})
        try:  # why files wait (an unreadable folder, a failed ingest): no reason for a 503
            if waiting := getattr(control.handler, "waiting", list)():
                body["waiting"] = waiting
        except Exception:
            log.exception("control API: listing the waiting files failed")
        self._json(200 if why is None else 503, body)

    def _status_page(self, control: ControlServer, path: str) -> None:
        from evertune.daemon.control import status_page

        if path == "/status":
            return self._send(200, status_page.page(), "text/html; charset=utf-8")
        if path == "/status/plotly.js":
            return self._send(200, status_page.plotly_js(), "application/javascript")
        data = json.dumps(control.handler.page_data()).encode()
        return self._send(200, data, "application/json")

    def _authorize(self, control: ControlServer) -> None:
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), control.token.encode()
        ):
            raise Answer(
                401,
                f"missing or wrong control token: send 'Authorization: Bearer <token>' with"
                f" the token in {control.token_path}",
            )

    def _body(self) -> dict[str, Any]:
        if "Transfer-Encoding" in self.headers:
            raise Answer(411, "send the body with a Content-Length, not chunked")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise Answer(400, "the Content-Length header is not a number") from None
        if length > MAX_BODY or length < 0:
            raise Answer(413, f"request body of {length} bytes; the limit is {MAX_BODY}")
        raw = b""
        try:
            while len(raw) < length and (chunk := self.rfile.read1(length - len(raw))):
                raw += chunk
        except TimeoutError:  # the client stalled: `timeout` seconds with nothing more
            pass
        if len(raw) < length:
            raise Answer(
                400,
                f"the request body is shorter than its Content-Length ({len(raw)} of {length}"
                f" bytes within {self.timeout} s); send the whole body",
            )
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Answer(400, f"the request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise Answer(400, "the request body is nested too deeply to be read") from None
        if not isinstance(body, dict):
            raise Answer(400, "the request body must be a JSON object")
        return body

    def _json(self, status: int, payload: Any) -> None:
        # default=str: status dicts may carry paths and datetimes.
        data = json.dumps(payload, default=str).encode()
        self._send(status, data, "application/json")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("control API: client %s went away", self.address_string())
