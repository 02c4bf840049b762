"""The CLI's side of the daemon's control API (daemon/control/server.py), on httpx, with the
token the daemon wrote to `<home>/control.token`."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import httpx

from evertune.daemon.errors import EvertuneError
from evertune.store.layout import HomeLayout


class ControlError(EvertuneError):
    """The control API cannot be served or reached, or it answered with an error."""

    def __init__(self, message: str, status: int | None = None, kind: str | None = None):
        super().__init__(message)
        self.status = status
        self.kind = kind


class ControlClient:
    """The CLI's side of the control API; every method returns the daemon's JSON answer."""

    def __init__(self, url: str, token: str, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        # trust_env=False: an HTTP(S)_PROXY in the environment must not see loopback traffic.
        self._http = httpx.Client(
            base_url=self.url,
            timeout=timeout,
            trust_env=False,
            headers={"Authorization": f"Bearer {token}"},
        )

    @classmethod
    def from_home(cls, home: Path, url: str, timeout: float = 30.0) -> ControlClient:
        """A client with the token the daemon wrote to `<home>/control.token`."""
        path = HomeLayout(Path(home)).control_token_path
        try:
            token = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise ControlError(
                f"no control token at {path}: the daemon writes it when `evertune run` starts;"
                " is the daemon running with this home?"
            ) from None
        except PermissionError:
            raise ControlError(
                f"cannot read the control token {path}: permission denied; join the"
                " `evertune` group (`sudo usermod -aG evertune $USER`, then log in again)"
                " or run the command as the service user"
            ) from None
        except OSError as exc:
            raise ControlError(f"cannot read the control token {path}: {exc}") from None
        if not token:
            raise ControlError(f"the control token {path} is empty; restart the daemon")
        return cls(url, token, timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def healthz(self) -> dict[str, Any]:
        """{"ok": true} or, when the daemon is unhealthy, {"ok": false, "why": ...} (no raise)."""
        response = self._request("GET", "/healthz", ok=(200, 503))
        return response.json()

    def metrics_text(self) -> str:
        return self._request("GET", "/metrics").text

    def status(self) -> dict[str, Any]:
        return self._request("GET", "/v1/status").json()

    def train(self, domain: str, force: bool = False, from_base: bool = False) -> dict[str, Any]:
        return self._post("/v1/train", {"domain": domain, "force": force, "from_base": from_base})

    def forget(self, domain: str, prompt_hashes: list[str]) -> dict[str, Any]:
        return self._post("/v1/forget", {"domain": domain, "prompt_hashes": prompt_hashes})

    def rollback(self, domain: str, to: str | None = None) -> dict[str, Any]:
        return self._post("/v1/rollback", {"domain": domain, "to": to})

    def pin(self, domain: str, version: str) -> dict[str, Any]:
        return self._post("/v1/pin", {"domain": domain, "version": version})

    def unpin(self, domain: str, version: str) -> dict[str, Any]:
        return self._post("/v1/unpin", {"domain": domain, "version": version})

    def canary(
        self, domain: str, version: str | None, percent: float | None, minutes: float | None
    ) -> dict[str, Any]:
        body = {"domain": domain, "version": version, "percent": percent, "minutes": minutes}
        return self._post("/v1/canary", body)

    def reload(self) -> dict[str, Any]:
        return self._post("/v1/reload", {})

    def reconcile(self) -> dict[str, Any]:
        return self._post("/v1/reconcile", {})

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", path, json=body).json()

    def _request(
        self, method: str, path: str, ok: tuple[int, ...] = (), **kwargs: Any
    ) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ControlError(
                f"the evertune daemon at {self.url} did not answer {method} {path} within"
                f" {self.timeout:g} s ({type(exc).__name__}); it may be busy, try again"
            ) from None
        except httpx.TransportError as exc:
            raise ControlError(
                f"cannot reach the evertune daemon at {self.url}: {exc}; is `evertune run` running?"
            ) from None
        if response.is_success or response.status_code in ok:
            return response
        message, kind = f"HTTP {response.status_code}: {response.text[:200]}", None
        with contextlib.suppress(ValueError, KeyError, TypeError):
            payload = response.json()
            message, kind = payload["error"], payload.get("kind")
        raise ControlError(message, status=response.status_code, kind=kind)
