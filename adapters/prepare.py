"""`python -m evertune.adapters.prepare MODELS_DIR [--model P] [--reference-limit N] [--base-only]
[--vllm-url URL]`

Prepares the base model (the bundled SmolLM2 converted once, or a configured local folder)
and its general reference set (the base model's own greedy answers, cached beside it), in a
child process: torch and transformers are loaded here, never in the daemon, which stays
small while idle. Progress goes to stderr; the result is one JSON line on stdout:
{"path", "model_id", "sha256", "references": [Reference fields...]}.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import sys
from pathlib import Path

from evertune.adapters.base_model import prepare
from evertune.adapters.reference import load_or_build, vllm_generator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evertune.adapters.prepare")
    parser.add_argument("models_dir", type=Path)
    parser.add_argument("--model", type=Path, default=None, help="a local HF model folder")
    parser.add_argument("--reference-limit", type=int, default=0)
    parser.add_argument(
        "--base-only", action="store_true", help="only the model (serving needs no references)"
    )
    parser.add_argument(
        "--vllm-url", default=None, help="a vLLM server serving this base model as `base`"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    if not sys.stderr.isatty():  # the daemon's log: bars would be lines of carriage returns
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    args.models_dir.mkdir(parents=True, exist_ok=True)
    # The daemon's serving side and its first training run may both prepare at start:
    # one does the work, the other waits and finds it done.
    with (args.models_dir / ".prepare.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        base = prepare(args.models_dir, args.model)
        limit = args.reference_limit or None
        generate = vllm_generator(args.vllm_url) if args.vllm_url else None
        refs = [] if args.base_only else load_or_build(base.path, generate, limit=limit)
    out = {
        "path": str(base.path),
        "model_id": base.model_id,
        "sha256": base.sha256,
        "references": [r.__dict__ for r in refs],
    }
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
