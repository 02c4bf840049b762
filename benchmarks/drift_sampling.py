"""The gate's sequential drift measurement against the full pass, on trained adapters of
SmolLM2 (seconds and drift each way). Measured once to decide whether to keep it.

    python benchmarks/drift_sampling.py MODELS_DIR ADAPTER... > result.jsonl
"""

import json
import os
import sys
import time
from pathlib import Path

from evertune.adapters import evaluate as ev
from evertune.adapters.base_model import cpu_has_native_bf16
from evertune.adapters.gate import DriftCheck, measure
from evertune.adapters.reference import load_or_build

print(json.dumps({"native_bf16": cpu_has_native_bf16(), "cores": len(os.sched_getaffinity(0))}))
base = str(Path(sys.argv[1]) / "SmolLM2-135M-Instruct")
held = [r for r in load_or_build(Path(base)) if r.held_out]
m, tok = ev.load(base)
t = time.time()
b = measure(m, tok, [], [], held, frozenset({"general"}), general_max_len=80)
print(json.dumps({"base_full_s": round(time.time() - t, 2)}))
out = {}
for v in sys.argv[2:]:
    mm, _ = ev.load(base, v)
    mm = mm.merge_and_unload()
    parts = frozenset({"general"})
    t = time.time()
    full = measure(mm, tok, [], [], held, parts, general_max_len=80)
    tf = time.time() - t
    t = time.time()
    seq = measure(
        mm,
        tok,
        [],
        [],
        held,
        parts,
        general_max_len=80,
        drift_check=DriftCheck(b["general_sums"], 0.10),
    )
    ts = time.time() - t
    fd = full["general_loss"] / b["general_loss"] - 1
    sd = sum(seq["general_sums"]) / sum(b["general_sums"][i] for i in seq["general_ids"]) - 1
    r = {
        "adapter": "/".join(Path(v).parts[-2:]),
        "full_s": round(tf, 2),
        "full_drift": round(fd, 4),
        "seq_s": round(ts, 2),
        "seq_drift": round(sd, 4),
        "seq_measured": len(seq["general_ids"]),
        "pool": len(held),
    }
    print(json.dumps(r))
