"""`python -m evertune.daemon.vllm_entry ARGS...`: the embedded vLLM server (the same as
`python -m vllm.entrypoints.openai.api_server ARGS...`) with one fix for in-place loads.

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

import functools


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


def main() -> None:
    patch_inplace_flag()
    from vllm.entrypoints.launchers.api_server.entry import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
