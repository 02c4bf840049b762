"""One client's answer time on an idle embedded vLLM-CPU server: the base model against
adapters, the client's 24 tokens (benchmarks/continual.py's --traffic client), one request
at a time. The floor under the answer times a client sees while the service learns: no
pausing of training can make an answer faster than this. An adapter's cost depends on its
rank and the projections it adapts, not on its weights.

    python benchmarks/latency.py --models MODELS_DIR --adapter [NAME=]ADAPTER_DIR ... [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from evertune.adapters.base_model import cpu_has_native_bf16
from evertune.daemon.config_sections import ServeConfig
from evertune.daemon.serving.vllm_process import EmbeddedVLLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from continual import BASE_DIR, CLIENT_QUESTIONS, CLIENT_TOKENS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, required=True, help="a prepared models/ folder")
    ap.add_argument(
        "--adapter", action="append", required=True, help="[NAME=]an adapter folder (repeatable)"
    )
    ap.add_argument("--requests", type=int, default=10, help="per model and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--port", type=int, default=8499)
    ap.add_argument("--out", type=Path, default=None, help="write latency.json here")
    args = ap.parse_args()
    machine = {"native_bf16": cpu_has_native_bf16(), "cores": len(os.sched_getaffinity(0))}
    print(json.dumps(machine), flush=True)
    adapters = {}
    for i, given in enumerate(args.adapter):
        name, _, path = given.rpartition("=")
        adapters[name or ("adapter" if i == 0 else f"adapter{i + 1}")] = Path(path).resolve()
    extra = "--lora-modules " + " ".join(f"{n}={p}" for n, p in adapters.items())
    cfg = ServeConfig(port=args.port, extra_args=extra)
    log = Path(tempfile.mkdtemp()) / "vllm.log"
    server = EmbeddedVLLM(args.models / BASE_DIR, cfg, output_log=log)
    started = time.monotonic()
    server.start()
    try:
        if not server.wait_ready(600):
            print(f"vLLM did not start: see {log}", file=sys.stderr)
            return 1
        ready_s = round(time.monotonic() - started, 1)
        rounds: dict[str, list[list[float]]] = {"base": [], **{n: [] for n in adapters}}
        with httpx.Client(timeout=120) as http:
            for _ in range(args.rounds):
                for model in rounds:
                    times = []
                    for i in range(args.requests):
                        q = CLIENT_QUESTIONS[i % len(CLIENT_QUESTIONS)]
                        t = time.perf_counter()
                        r = http.post(
                            f"{server.url}/v1/chat/completions",
                            json={
                                "model": model,
                                "messages": [{"role": "user", "content": q}],
                                "max_tokens": CLIENT_TOKENS,
                                "temperature": 0,
                                "ignore_eos": True,  # every answer CLIENT_TOKENS long
                            },
                        )
                        r.raise_for_status()
                        times.append(round(time.perf_counter() - t, 4))
                    rounds[model].append(times)
    finally:
        server.stop()
    result = {
        "machine": machine,
        "tokens": CLIENT_TOKENS,
        "adapters": {n: _shape(p) for n, p in adapters.items()},
        "vllm_ready_s": ready_s,
        "seconds": rounds,
        "p50_s": {
            m: round(statistics.median(t for r in rs for t in r), 3) for m, rs in rounds.items()
        },
    }
    print(json.dumps(result), flush=True)
    p = result["p50_s"]
    print(f"idle, one request at a time, {CLIENT_TOKENS} tokens: base p50 {p['base']:.2f} s")
    for n in adapters:
        shape = result["adapters"][n]
        print(
            f"  {n} (rank {shape['r']}, {', '.join(shape['target_modules'])}):"
            f" p50 {p[n]:.2f} s ({p[n] / p['base']:.2f}x)"
        )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "latency.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _shape(folder: Path) -> dict:
    config = json.loads((folder / "adapter_config.json").read_text())
    return {"r": config["r"], "target_modules": sorted(config["target_modules"])}


if __name__ == "__main__":
    sys.exit(main())
