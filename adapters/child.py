"""The training child process: train one candidate, evaluate it, report, exit.

    python -m evertune.adapters.child RUN_DIR        (or under `torchrun`/`accelerate launch`)

A crash or an out-of-memory kill here fails one run, not the daemon, and its memory is
returned when it exits. Input: RUN_DIR/spec.json (written by the parent). Output: JSON
lines on stdout (`{"event": "progress", ...}`, `{"event": "phase", ...}`) and
RUN_DIR/result.json. SIGTERM sets the stop flag: training stops at the next step boundary
and the child exits with EXIT_CANCELLED, leaving no adapter behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from evertune.adapters.contract import RESULT_NAME, ChildResult, ChildSpec, EvalSpec
from evertune.adapters.errors import TrainingCancelled
from evertune.adapters.gate import BASE, BASE_KEYS, LIVE, GateResult, decide, measure
from evertune.adapters.reference import Reference
from evertune.adapters.remote import Remote
from evertune.adapters.train import TrainSpec, train
from evertune.store.files import write_atomic

EXIT_OK, EXIT_FAILED, EXIT_CANCELLED = 0, 1, 3
ANSWER_TOKENS = 48  # as evaluate.greedy_answers_chat
log = logging.getLogger("evertune.adapters.child")


def emit(event: str, **data: Any) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        sys.stdout.write(json.dumps({"event": event, **data}) + "\n")
        sys.stdout.flush()


def evaluate(spec: TrainSpec, ev_spec: EvalSpec, cache_dir: Path | None = None) -> GateResult:
    """Candidate, live (the parent version, or the base for v1) and base, on one model.

    Losses are computed here. Greedy answers come from the vLLM server at
    `ev_spec.vllm_url` when there is one (it serves the base model as `base`; the
    candidate is loaded there under a private name): batched, several times faster than
    transformers here, and exactly what clients will get. The base model's general metrics
    depend only on the base weights, the held-out prompts and how answers are made, so they
    are measured once and kept in `cache_dir`."""
    from peft import PeftModel

    from evertune.adapters import evaluate as ev

    general = [Reference(**r) for r in ev_spec.general]
    model, tok = ev.load(spec.base_path)
    model = PeftModel.from_pretrained(model, spec.out_dir, adapter_name="candidate").eval()
    new, old = spec.new, ev_spec.old
    cut = spec.general_max_len
    remote = Remote(ev_spec.vllm_url) if ev_spec.vllm_url else None
    cache = _base_cache(cache_dir, model, spec.base_path, cut, ev_spec)
    cached = json.loads(cache.read_text()) if cache and cache.exists() else None
    # For version 1 the base model is also the live version.
    live_path = ev_spec.live_adapter
    parts = (BASE if live_path else BASE | LIVE) - (BASE if cached else frozenset())
    with ev.adapter_off(model):
        base = measure(model, tok, new, old, general, parts, _answers(remote, "base"), cut)
    if cached:
        base.update(cached)
    elif cache:
        _write_json(cache, {k: base[k] for k in BASE_KEYS})
    live = base
    with contextlib.ExitStack() as stack:

        def served(role: str, path: str) -> str | None:
            """`path` loaded into vLLM under a private name (None: no vLLM)."""
            if remote is None:
                return None
            return stack.enter_context(remote.adapter(f"evertune-gate-{os.getpid()}-{role}", path))

        if live_path:
            model.load_adapter(live_path, adapter_name="live")
            model.set_adapter("live")
            answer = _answers(remote, served("live", live_path))
            live = measure(model, tok, new, old, general, LIVE, answer, cut)
        model.set_adapter("candidate")
        doc_checks = _worded_by_base(remote, ev_spec.doc_checks)
        answer = _answers(remote, served("candidate", spec.out_dir))
        # The candidate is measured last: its adapter is merged into the weights for its
        # loss passes (unmerged, LoRA's small matmuls cost ~45% more here on the CPU:
        # 18.3 s against 12.6 s for the general loss, the loss equal to 0.03%).
        merged = model.merge_and_unload(adapter_names=["candidate"])
        candidate = measure(
            merged,
            tok,
            new,
            old,
            general,
            answer=answer,
            general_max_len=cut,
            changed=ev_spec.changed,
            doc_checks=doc_checks,
            whole_easy=remote is not None,  # what clients of the served candidate get
            replayed=spec.replay,
        )
    return decide(candidate, live, base, ev_spec.thresholds())


def _base_cache(
    cache_dir: Path | None, model, base_path: str, cut: int, ev_spec: EvalSpec
) -> Path | None:
    """Where the base model's general metrics are kept: they depend only on the base
    weights, the held-out prompts, the cut and how answers are made."""
    from evertune.adapters import evaluate as ev
    from evertune.adapters.base_model import bf16_is_fast

    if cache_dir is None:
        return None
    how = "vllm" if ev_spec.vllm_url else f"transformers bf16={bf16_is_fast(ev.device_of(model))}"
    what = [
        "first-sentence easy answers verified by a forward pass, else generated",
        ev.GREEDY_MARGIN,
        how,
        base_path,
        cut,
        ev_spec.general,
    ]
    return (
        cache_dir
        / f"base-metrics-{hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]}.json"
    )


def warm(spec: TrainSpec, ev_spec: EvalSpec, cache_dir: Path) -> None:
    """The base model's side of the gate, measured ahead of the first training run (the
    daemon asks once it is ready to learn), so a first file's cycle does not wait for it."""
    from evertune.adapters import evaluate as ev

    model, tok = ev.load(spec.base_path)
    cache = _base_cache(cache_dir, model, spec.base_path, spec.general_max_len, ev_spec)
    if cache.exists():
        return
    general = [Reference(**r) for r in ev_spec.general]
    url = ev_spec.vllm_url
    answer = _answers(Remote(url), "base") if url else None
    base = measure(model, tok, [], [], general, BASE, answer, spec.general_max_len)
    _write_json(cache, {k: base[k] for k in BASE_KEYS})


def _write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data))


def _worded_by_base(remote: Remote | None, checks) -> list[dict]:
    """The held-out questions about the documents, each as the base model asks it where it
    writes one (`store.knowledge.asking_prompt`): our templates taught two wordings of each
    statement and held out a third, which a model that learned the templates answers (a
    benchmark measured 16 of 31 held out answered, and 0 of 10 questions users wrote); a
    question worded by another writer tells whether the document can be answered about."""
    from evertune.store import knowledge

    checks = list(checks)
    if remote is None or not checks:
        return checks
    made = remote.complete("base", [knowledge.asking_prompt(c["answer"]) for c in checks], 60)
    out = []
    for c, (text, _) in zip(checks, made, strict=True):
        question = knowledge.written_question(text)
        out.append({**c, "question": question, "worded_by": "base"} if question else c)
    log.info(
        "held-out questions about the documents: %d of %d worded by the base model",
        sum(c.get("worded_by") == "base" for c in out),
        len(out),
    )
    return out


def _answers(remote: Remote | None, name: str | None):
    """The gate's greedy answers through vLLM as `name`; None (no vLLM): `measure` answers
    with the model in this process. No fallback from one to the other mid-way: the paired
    easy test must compare answers made the same way (a vLLM that fails fails the run,
    which is retried)."""
    if remote is None or name is None:
        return None
    from evertune.adapters import evaluate as ev

    def answer(prompts: list[list[dict]], short: bool) -> list[str]:
        stop = ev.SENTENCE_ENDS if short else None
        done = remote.complete(name, prompts, ANSWER_TOKENS, stop=stop)
        return [(ev.first_sentence_of(t) if short else t).strip() for t, _ in done]

    return answer


def main(run_dir: Path) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The log is a file: no line per HTTP request to vLLM (the gate's answers: ~100 a run),
    # no weight-loading bar of carriage returns.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    child = ChildSpec.load(run_dir)
    spec = child.train
    if child.warm:
        warm(spec, child.eval, run_dir.parent)
        return EXIT_OK
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
    # the base model's metrics are kept beside the runs (a retry's folder is one deeper)
    cache_dir = Path(child.eval.cache_dir or run_dir.parent)
    gate = evaluate(spec, child.eval, cache_dir=cache_dir)
    timing = {"train_s": round(t1 - t0, 2), "evaluate_s": round(time.monotonic() - t1, 2)}
    out = ChildResult(result, gate, timing).to_dict()
    _write_json(run_dir / RESULT_NAME, out)
    emit("result", **out)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
