"""The one client of a vLLM server's HTTP API (the daemon's embedded server or an external
one): greedy completions for the gate and the reference set, and the runtime LoRA admin
calls (load, switch in place, unload) that the gate and the daemon's serving
(daemon/serving/vllm_api.py) both make.

Why vLLM for answers: transformers `generate` on 2 CPU cores spends most of its time per
decoding step, not per token, and the gate and the reference set need a few hundred short
answers; vLLM batches every concurrent request into one step. The answers are also exactly
what clients get: the server's weights, dtype and kernels.

    remote = Remote(url)
    with remote.adapter("gate-facts-v0003", "/path/to/adapter") as name:
        answers = remote.complete(name, [[{"role": "user", "content": "..."}]], 48)

Errors: `VllmDown` when the server did not answer, `VllmRefused` when it answered with an
error (adapters/errors.py); both name the server, the request and the reason.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx

from evertune.adapters.errors import VllmDown, VllmRefused
from evertune.adapters.progress import bar

# The daemon's embedded server keeps its admin routes (adapter loads and unloads, ...) for
# the holder of this key (evertune.daemon.serving.vllm_entry.AdminGuard); the daemon generates it
# and passes it through the environment to vLLM and to the training children.
ADMIN_KEY_ENV = "EVERTUNE_VLLM_ADMIN_KEY"
ADMIN_HEADER = "X-Evertune-Admin"


def admin_headers() -> dict[str, str]:
    """The header that opens the admin routes of the daemon's server (empty without a key:
    an external server runs vLLM as shipped and ignores it)."""
    key = os.environ.get(ADMIN_KEY_ENV)
    return {ADMIN_HEADER: key} if key else {}


class Remote:
    def __init__(
        self, url: str, workers: int = 32, timeout: float = 600, api_key: str | None = None
    ):
        self.url = url.rstrip("/")
        self.workers = workers
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        headers |= admin_headers()
        # one connection pool, shared by the completion threads (httpx.Client is thread-safe)
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=timeout,
            limits=httpx.Limits(max_connections=max(workers, 10)),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, method: str, path: str, **kw) -> httpx.Response:
        """The server's response, whatever its status; `VllmDown` when it did not answer."""
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
            raise VllmDown(f"vLLM at {self.url} did not answer {path}: {exc!r}") from exc

    def complete(
        self,
        model: str,
        conversations: Sequence[Sequence[dict]],
        max_tokens: int,
        stop: Sequence[str] | None = None,
        progress: str | None = None,
    ) -> list[tuple[str, str]]:
        """(text, finish_reason) of a greedy completion of each conversation, in order."""

        def one(messages: Sequence[dict]) -> tuple[str, str]:
            body = {
                "model": model,
                "messages": list(messages),
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            if stop:
                body["stop"] = list(stop)
            r = self.request("POST", "/v1/chat/completions", json=body)
            if r.status_code != 200:
                raise VllmRefused(
                    f"vLLM at {self.url} answered {r.status_code} for model {model!r}:"
                    f" {error_message(r)}"
                )
            choice = r.json()["choices"][0]
            return choice["message"]["content"] or "", choice.get("finish_reason") or ""

        with ThreadPoolExecutor(self.workers) as pool:
            results = pool.map(one, conversations)
            if progress:
                results = bar(results, total=len(conversations), desc=progress)
            return list(results)

    def load(self, name: str, path: str, *, inplace: bool = False) -> float:
        """Load (or with `inplace`, switch) `name` to the adapter in `path`; seconds taken.
        vLLM refuses to load a name it serves unless `inplace` is set."""
        body = {"lora_name": name, "lora_path": path}
        if inplace:
            body["load_inplace"] = True
        t0 = time.perf_counter()
        r = self.request("POST", "/v1/load_lora_adapter", json=body)
        took = time.perf_counter() - t0
        if r.status_code != 200:
            raise VllmRefused(
                f"vLLM at {self.url} refused to load {name!r} from {path}:"
                f" {r.status_code} {error_message(r)}"
            )
        return took

    def unload(self, name: str) -> None:
        """Unload `name`; one it does not serve (404) is taken as done."""
        r = self.request("POST", "/v1/unload_lora_adapter", json={"lora_name": name})
        if r.status_code not in (200, 404):
            raise VllmRefused(
                f"vLLM at {self.url} refused to unload {name!r}: {r.status_code} {error_message(r)}"
            )

    @contextlib.contextmanager
    def adapter(self, name: str, path: str) -> Iterator[str]:
        """`path` loaded under `name` for the duration (a name no client asks for, which
        the daemon's reconcile leaves alone), unloaded afterwards."""
        self.load(name, path)
        try:
            yield name
        finally:
            with contextlib.suppress(VllmDown, VllmRefused):
                self.unload(name)


def error_message(r: httpx.Response) -> str:
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
