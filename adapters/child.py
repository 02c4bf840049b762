"""The training child process: train one candidate, evaluate it, report, exit.

    python -m evertune.adapters.child RUN_DIR        (or under `torchrun`/`accelerate launch`)

A crash or an out-of-memory kill here fails one run, not the daemon, and its memory is
returned when it exits. Input: RUN_DIR/spec.json (written by the parent). Output: JSON
lines on stdout (`{"event": "progress", ...}`, `{"event": "phase", ...}`) and
RUN_DIR/result.json. SIGTERM sets the stop flag: training stops at the next step boundary
and the child exits with EXIT_CANCELLED, leaving no adapter behind.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from evertune.adapters.errors import TrainingCancelled
from evertune.adapters.gate import BASE, LIVE, GateConfig, decide, measure
from evertune.adapters.reference import Reference
from evertune.adapters.train import TrainSpec, train

EXIT_OK, EXIT_FAILED, EXIT_CANCELLED = 0, 1, 3
log = logging.getLogger("evertune.adapters.child")


def emit(event: str, **data: Any) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        sys.stdout.write(json.dumps({"event": event, **data}) + "\n")
        sys.stdout.flush()


def spec_from(data: dict[str, Any]) -> TrainSpec:
    known = {f.name for f in fields(TrainSpec)}
    values = {k: v for k, v in data.items() if k in known}
    if "target_modules" in values:
        values["target_modules"] = tuple(values["target_modules"])
    return TrainSpec(**values)


def evaluate(spec: TrainSpec, ev_spec: dict[str, Any]) -> dict[str, Any]:
    """Candidate, live (the parent version, or the base for v1) and base, on one model."""
    from peft import PeftModel

    from evertune.adapters import evaluate as ev

    general = [Reference(**r) for r in ev_spec["general"]]
    model, tok = ev.load(spec.base_path)
    model = PeftModel.from_pretrained(model, spec.out_dir, adapter_name="candidate").eval()
    new, old = spec.new, ev_spec.get("old", [])
    with ev.adapter_off(model):
        # For version 1 the base model is also the live version.
        base = measure(model, tok, new, old, general, BASE if spec.parent_adapter else BASE | LIVE)
    live = base
    if spec.parent_adapter:
        model.load_adapter(spec.parent_adapter, adapter_name="live")
        model.set_adapter("live")
        live = measure(model, tok, new, old, general, LIVE)
    model.set_adapter("candidate")
    candidate = measure(model, tok, new, old, general)
    known = {f.name for f in fields(GateConfig)}
    gate = GateConfig(**{k: v for k, v in ev_spec.get("gate", {}).items() if k in known})
    return decide(candidate, live, base, gate).to_dict()


def main(run_dir: Path) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    data = json.loads((run_dir / "spec.json").read_text())
    spec = spec_from(data["train"])
    emit("phase", phase="train")
    t0 = time.monotonic()
    try:
        result = train(spec, progress=lambda p: emit("progress", **p), should_stop=stop.is_set)
    except TrainingCancelled as exc:
        emit("cancelled", reason=str(exc))
        return EXIT_CANCELLED
    if int(os.environ.get("RANK", 0)) != 0:
        return EXIT_OK
    emit("phase", phase="evaluate")
    t1 = time.monotonic()
    gate = evaluate(spec, data["eval"])
    timing = {"train_s": round(t1 - t0, 2), "evaluate_s": round(time.monotonic() - t1, 2)}
    out = {"train": result.to_dict(), "gate": gate, "timing": timing}
    tmp = run_dir / ".result.json.tmp"
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, run_dir / "result.json")
    emit("result", **out)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
