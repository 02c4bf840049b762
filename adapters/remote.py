"""Greedy answers from a running vLLM server (the daemon's embedded one, which already holds
the base model): the reference set and the gate's answer checks are generated there.

Why: transformers `generate` on 2 CPU cores spends most of its time per decoding step, not
per token, and the gate and the reference set need a few hundred short answers; vLLM
batches every concurrent request into one step. The answers are also exactly what clients
get: the server's weights, dtype and kernels.

    remote = Remote(url)
    with remote.adapter("gate-facts-v0003", "/path/to/adapter") as name:
        answers = remote.answers(name, [[{"role": "user", "content": "..."}]], 48)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx

from evertune.adapters.errors import TrainingError
from evertune.adapters.progress import bar

# The daemon's embedded server keeps its admin routes (adapter loads and unloads, ...) for
# the holder of this key (evertune.daemon.vllm_entry.AdminGuard); the daemon generates it
# and passes it through the environment to vLLM and to the training children.
ADMIN_KEY_ENV = "EVERTUNE_VLLM_ADMIN_KEY"
ADMIN_HEADER = "X-Evertune-Admin"


def admin_headers() -> dict[str, str]:
    """The header that opens the admin routes of the daemon's server (empty without a key:
    an external server runs vLLM as shipped and ignores it)."""
    key = os.environ.get(ADMIN_KEY_ENV)
    return {ADMIN_HEADER: key} if key else {}


class Remote:
    def __init__(self, url: str, workers: int = 32, timeout: float = 600):
        self.url = url.rstrip("/")
        self.workers = workers
        self.timeout = timeout

    def complete(
        self,
        model: str,
        conversations: Sequence[Sequence[dict]],
        max_tokens: int,
        stop: Sequence[str] | None = None,
        progress: str | None = None,
    ) -> list[tuple[str, str]]:
        """(text, finish_reason) of a greedy completion of each conversation, in order."""
        with httpx.Client(
            base_url=self.url, timeout=self.timeout, headers=admin_headers()
        ) as client:

            def one(messages: Sequence[dict]) -> tuple[str, str]:
                body = {
                    "model": model,
                    "messages": list(messages),
                    "max_tokens": max_tokens,
                    "temperature": 0,
                }
                if stop:
                    body["stop"] = list(stop)
                try:
                    r = client.post("/v1/chat/completions", json=body)
                except httpx.HTTPError as exc:
                    raise TrainingError(f"vLLM at {self.url} did not answer: {exc!r}") from exc
                if r.status_code != 200:
                    raise TrainingError(
                        f"vLLM at {self.url} answered {r.status_code} for model {model!r}:"
                        f" {r.text[:300]}"
                    )
                choice = r.json()["choices"][0]
                return choice["message"]["content"] or "", choice.get("finish_reason") or ""

            with ThreadPoolExecutor(self.workers) as pool:
                results = pool.map(one, conversations)
                if progress:
                    results = bar(results, total=len(conversations), desc=progress)
                return list(results)

    @contextlib.contextmanager
    def adapter(self, name: str, path: str) -> Iterator[str]:
        """`path` loaded under `name` for the duration (a name no client asks for, which
        the daemon's reconcile leaves alone), unloaded afterwards."""
        with httpx.Client(
            base_url=self.url, timeout=self.timeout, headers=admin_headers()
        ) as client:
            try:
                r = client.post(
                    "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}
                )
            except httpx.HTTPError as exc:
                raise TrainingError(f"vLLM at {self.url} did not answer: {exc!r}") from exc
            if r.status_code != 200:
                raise TrainingError(
                    f"vLLM at {self.url} refused to load {path} as {name!r}: {r.text[:300]}"
                )
            try:
                yield name
            finally:
                with contextlib.suppress(httpx.HTTPError):
                    client.post("/v1/unload_lora_adapter", json={"lora_name": name})
