"""`python -m evertune.daemon.serving.vllm_entry ARGS...`: the embedded vLLM server (the same as
`python -m vllm.entrypoints.openai.api_server ARGS...`) with two fixes, in-place loads
(below) and LoRA on CPU (`patch_cpu_lora`), and `AdminGuard`, the middleware that keeps
the admin routes for the daemon.

vLLM 0.32 keeps the `load_inplace=True` of the request that switched a name and sends it
with every later request to that name, and its worker reloads an adapter from disk at
every step while that flag is set (vllm/lora/worker_manager.py, add_adapter). Measured by
benchmarks/swap.py: 59 opens of the weights file in 5 requests to a switched name against
0 for the same folder loaded once, and single requests 1.2-1.35x slower. The in-place load
itself has already put the new weights in place, so once it succeeded the stored request
is kept with the flag cleared. Applies to the embedded server only; an external server
runs vLLM as shipped (correct, only slower on switched names).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import os
from pathlib import Path

from evertune.adapters.remote import ADMIN_HEADER, ADMIN_KEY_ENV
from evertune.daemon.serving.pausing import PAUSE_DIR_ENV, Pauser
from evertune.daemon.serving.routing import ROUTES_PATH, Router

# What clients need, open to anyone who can reach the server (loopback by default): the
# OpenAI-compatible generation routes, the model list, health and metrics.
CLIENT_ROUTES = frozenset(
    {
        ("GET", "/health"),
        ("GET", "/ping"),
        ("POST", "/ping"),
        ("GET", "/version"),
        ("GET", "/metrics"),
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/tokenize"),
        ("POST", "/detokenize"),
    }
)
# Client routes that generate: while one is in flight the daemon's children pause
# (evertune.daemon.serving.pausing); the daemon's own requests carry the admin key and do not count.
GENERATION_ROUTES = frozenset({("POST", "/v1/chat/completions"), ("POST", "/v1/completions")})


class AdminGuard:
    """ASGI middleware (`--middleware evertune.daemon.serving.vllm_entry.AdminGuard`): every route
    that is not a client route needs the `X-Evertune-Admin` header with the key the daemon
    generated for this server (`EVERTUNE_VLLM_ADMIN_KEY`, in its environment only).

    Why: with runtime LoRA updating on, anyone who can reach vLLM can load any path (or a
    hub id) under a served name, or unload it, by /v1/load_lora_adapter, /adapters and
    DELETE /adapters/{name} (vLLM's --api-key does not cover the last two), and vLLM has
    more admin routes (sleep, pause, collective_rpc, weight updates). An allowlist closes
    every one of them, present and future. Without a key every admin route is refused.

    It also binds each generation request to one version when it is admitted (its route
    table, `evertune.daemon.serving.routing`, at the admin route /evertune/routes)."""

    def __init__(self, app):
        self.app = app
        key = os.environ.get(ADMIN_KEY_ENV, "")
        self.key = key.encode() if key else None
        self.header = ADMIN_HEADER.lower().encode()
        pause_dir = os.environ.get(PAUSE_DIR_ENV)
        self.pause_dir = Path(pause_dir) if pause_dir else None
        self.pauser: Pauser | None = None
        self.router = Router()  # the stable names, bound to a version at admission

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        admin = self._is_admin(scope)
        method, path = scope["method"], scope["path"]
        if admin and path == ROUTES_PATH:
            return await self.router.admin(scope, receive, send)
        if (method, path) in GENERATION_ROUTES:
            if admin or not self.pause_dir:
                return await self.router.generate(self.app, scope, receive, send)
            # a client's request: the daemon's background children pause until it is answered
            pauser = self._pauser()
            pauser.enter()
            try:
                return await self.router.generate(self.app, scope, receive, send)
            finally:
                pauser.leave()
        if (method, path) == ("GET", "/v1/models"):  # routed names listed (routed_to)
            return await self.router.models(self.app, scope, receive, send)
        if admin:
            return await self.app(scope, receive, send)
        if self._is_client_route(scope):
            return await self.app(scope, receive, send)
        body = json.dumps(
            {
                "error": {
                    "message": f"{method} {path} is reserved for the evertune daemon",
                    "type": "Forbidden",
                    "code": 403,
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _pauser(self) -> Pauser:
        if self.pauser is None:
            self.pauser = Pauser(self.pause_dir, asyncio.get_running_loop().call_later)
        return self.pauser

    @staticmethod
    def _is_client_route(scope) -> bool:
        method, path = scope["method"], scope["path"]
        return (method, path) in CLIENT_ROUTES or (
            method == "GET" and path.startswith("/v1/models/")
        )

    def _is_admin(self, scope) -> bool:
        given = dict(scope.get("headers") or []).get(self.header)
        return self.key is not None and given is not None and hmac.compare_digest(given, self.key)


def patch_inplace_flag() -> bool:
    """Clear the stored load_inplace flag after a successful load; False when this vLLM
    does not have the code path (then it runs unpatched)."""
    try:
        import msgspec
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    except ImportError:
        return False
    original = OpenAIServingModels.load_lora_adapter
    if getattr(original, "evertune_patched", False):
        return True

    @functools.wraps(original)
    async def load_lora_adapter(self, request, base_model_name=None):
        out = await original(self, request, base_model_name)
        stored = self.lora_requests.get(request.lora_name)
        if isinstance(out, str) and stored is not None and stored.load_inplace:
            self.lora_requests[request.lora_name] = msgspec.structs.replace(
                stored, load_inplace=False
            )
        return out

    load_lora_adapter.evertune_patched = True
    OpenAIServingModels.load_lora_adapter = load_lora_adapter
    return True


def _rows_times_lora(inputs, weights, indices, dtype):
    """inputs[t] @ weights[indices[t]].T for every token t, one matmul per adapter.

    vLLM's CPU ops (vllm/lora/ops/torch_ops/lora_ops.py) do this with
    `weights[indices]`: a copy of an adapter's whole matrix for every token, then a
    batched matrix-vector product. Same result, but the copy is (tokens x rank x hidden) per
    layer and module: measured on 2 cores with native bf16, 60 short greedy answers through
    an adapter took 20 s against 5.7 s for the base model. Grouping the tokens by adapter
    (a batch has a few) makes it one (tokens x hidden) @ (hidden x rank) product each.
    Index -1 (no adapter) selects the last slot exactly as the original does."""
    import torch

    if weights.dim() == 4:
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype)
    if indices.numel() == 1 or inputs.shape[0] == 1:
        if indices.numel() > 1:  # one input row for many tokens: broadcast as einsum does
            return torch.einsum("bi, boi -> bo", inputs, weights[indices].to(dtype))
        return inputs @ weights[indices[0]].to(dtype).T
    out = inputs.new_empty((inputs.shape[0], weights.shape[1]))
    for u in torch.unique(indices).tolist():
        rows = indices == u
        out[rows] = inputs[rows] @ weights[u].to(dtype).T
    return out


def patch_cpu_lora() -> bool:
    """vLLM's CPU LoRA ops replaced by `_rows_times_lora` versions (same signatures and
    results); False when this vLLM has no such ops. Runs in every vLLM process: the API
    server calls it, and the engine process (started with spawn on CPU) imports this module
    as its main module, which calls it at import."""
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return False
    if getattr(lora_ops, "evertune_patched", False):
        return True

    def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=1.0):
        out = _rows_times_lora(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
        output_tensor[:, : out.shape[1]] = scaling * out

    def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
        out = _rows_times_lora(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
        limit = output_tensor.shape[0]
        if out.shape[0] == 1 and output_tensor.shape[0] != 1:
            limit = 1
        common = min(out.shape[1], output_tensor.shape[1])
        if add_inputs:
            output_tensor[:, :common] += out[:limit, :common]
        else:
            output_tensor[:, :common] = out[:limit, :common]

    def bgmv_expand_slice(
        inputs,
        lora_b_weights,
        output_tensor,
        lora_indices_tensor,
        slice_offset,
        slice_size,
        add_inputs=True,
    ):
        out = _rows_times_lora(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
        if add_inputs:
            output_tensor[:, slice_offset : slice_offset + slice_size] += out
        else:
            output_tensor[:, slice_offset : slice_offset + slice_size] = out

    for module in (lora_ops, punica_cpu):
        for fn in (bgmv_shrink, bgmv_expand, bgmv_expand_slice):
            if hasattr(module, fn.__name__):
                setattr(module, fn.__name__, fn)
    lora_ops.evertune_patched = True
    return True


def main() -> None:
    patch_inplace_flag()
    patch_cpu_lora()
    from vllm.entrypoints.launchers.api_server.entry import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
elif __name__ == "__mp_main__":  # vLLM's engine process, spawned from main()
    patch_cpu_lora()
