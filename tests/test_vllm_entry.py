"""The embedded server's CPU LoRA ops (daemon/serving/vllm_entry.py) against vLLM's own.

The replacements must give what vLLM's ops give, for every shape the CPU punica wrapper
passes: one adapter for the whole batch, several adapters mixed, tokens with no adapter
(index -1), one input row broadcast, and the decode path's single token. The served
answers through a real server are checked in tests/test_serving_e2e.py.
"""

from __future__ import annotations

import importlib

import pytest
import torch

lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")


@pytest.fixture(scope="module")
def ops():
    """(vLLM's original ops, the patched ones): the original module re-read from source."""
    from evertune.daemon.serving import vllm_entry

    original = importlib.util.module_from_spec(lora_ops.__spec__)
    lora_ops.__spec__.loader.exec_module(original)
    assert vllm_entry.patch_cpu_lora()
    from vllm.lora.punica_wrapper import punica_cpu

    assert punica_cpu.bgmv_shrink is lora_ops.bgmv_shrink is not original.bgmv_shrink
    return original, lora_ops


CASES = {
    "one adapter": [2] * 37,
    "mixed adapters": [0, 1, 1, 3, 0, 2, 2, 2, 1, 0, 3],
    "no adapter": [-1, -1, 1, 1, -1, 0],
    "one token": [1],
}


@pytest.mark.parametrize("indices", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_ops_give_what_vllms_give(ops, indices, dtype):
    original, patched = ops
    g = torch.Generator().manual_seed(0)
    idx = torch.tensor(indices)
    n, hidden, rank, out_dim = len(indices), 64, 16, 96
    x = torch.randn(n, hidden, generator=g, dtype=torch.float32).to(dtype)
    a = torch.randn(4, 1, rank, hidden, generator=g).to(dtype)  # (loras, 1, rank, in)
    b = torch.randn(4, 1, out_dim, rank, generator=g).to(dtype)
    h = torch.randn(n, rank, generator=g).to(dtype)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.1, "rtol": 2e-2}

    def both(name, make_out, *args):
        outs = []
        for mod in (original, patched):
            out = make_out()
            getattr(mod, name)(*args[:2], out, idx, *args[2:])
            outs.append(out)
        torch.testing.assert_close(outs[1], outs[0], **tol)

    both("bgmv_shrink", lambda: torch.zeros(n, rank, dtype=dtype), x, a, 0.5)
    for add in (False, True):
        both("bgmv_expand", lambda: torch.ones(n, out_dim + 8, dtype=dtype), h, b, add)
        both(
            "bgmv_expand_slice",
            lambda: torch.ones(n, out_dim * 2, dtype=dtype),
            h,
            b,
            out_dim // 2,
            out_dim,
            add,
        )
    # the prefill path goes through the module's own sgmv_* to the patched bgmv_*
    lens = torch.tensor([n])
    first_of_seq = torch.tensor([indices[0]])
    if len(set(indices)) == 1:
        outs = []
        for mod in (original, patched):
            out = torch.zeros(n, rank, dtype=dtype)
            mod.sgmv_shrink(x, a, out, torch.tensor([0]), lens, first_of_seq, 1, n, n, 0.5)
            outs.append(out)
        torch.testing.assert_close(outs[1], outs[0], **tol)
