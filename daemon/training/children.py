"""The child processes a training run starts (torch stays out of the daemon): preparing the
base model and its reference answers, and the training child itself (daemon side: spec in,
progress and result out, SIGTERM forwarded on stop), plus the home's training lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlite_utils import Database

from evertune.adapters.base_model import BaseModel
from evertune.adapters.contract import ChildResult, ChildSpec, EvalSpec, TrainSpec
from evertune.adapters.errors import PreparationCancelled, TrainingCancelled, TrainingError
from evertune.adapters.reference import Reference
from evertune.daemon.config import Config
from evertune.daemon.procs import background_child, die_with_parent, pausable_child
from evertune.daemon.serving.pausing import registered, resume
from evertune.store import runs
from evertune.store.layout import HomeLayout

log = logging.getLogger(__name__)

EXIT_CANCELLED = 3  # as evertune.adapters.child


def _bars_env() -> dict[str, str]:
    """The environment of a child writing to the daemon's stderr: where that is not a
    terminal (the journal, a file), no library's progress bar (the model's conversion draws
    one with tqdm directly), which would be a line of carriage returns; our own progress
    (adapters/progress.py) is logged instead."""
    if sys.stderr.isatty():
        return dict(os.environ)
    return {**os.environ, "TQDM_DISABLE": "1"}


def prepare_base(
    config: Config,
    layout: HomeLayout,
    stop: threading.Event | None = None,
    references: bool = True,
    vllm_url: str | None = None,
) -> tuple[BaseModel, list[Reference]]:
    """The base model and its reference set, prepared in a child process (torch stays out of
    the daemon). Instant once prepared; the first time converts the bundled model and
    answers the general prompts (through `vllm_url` when a server already serves this base
    model as `base`), with progress on stderr."""
    cmd = [sys.executable, "-m", "evertune.adapters.prepare", str(layout.models)]
    if vllm_url:
        cmd += ["--vllm-url", vllm_url]
    if config.model.path:
        cmd += ["--model", config.model.path]
    if config.model.reference_limit:
        cmd += ["--reference-limit", str(config.model.reference_limit)]
    if not references:  # serving starts sooner; the first training run builds them
        cmd.append("--base-only")
    with (
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, text=True, preexec_fn=_preexec(config), env=_bars_env()
        ) as child,
        registered(_pause_dir(config), child),
    ):
        watcher = threading.Thread(target=_forward_stop, args=(child, stop), daemon=True)
        watcher.start()
        stdout = child.stdout.read()
        code = child.wait()
    if stop is not None and stop.is_set():
        raise PreparationCancelled("preparing the base model was cancelled (stop requested)")
    if code != 0:
        raise TrainingError(
            f"preparing the base model failed (exit code {code}); the lines above say why."
            f" Command: {shlex.join(cmd)}"
        )
    out = json.loads(stdout.strip().splitlines()[-1])
    refs = [Reference(**r) for r in out.pop("references")]
    return BaseModel(Path(out["path"]), out["model_id"], out["sha256"]), refs


def warm_gate(
    config: Config,
    layout: HomeLayout,
    base: BaseModel,
    refs: list[Reference],
    vllm_url: str | None,
    stop: threading.Event | None = None,
) -> None:
    """The base model's side of the gate (its general loss and easy answers), measured in a
    background child once the daemon is ready to learn, and kept where training runs find
    it: the first file's cycle then measures only its candidate. Failing here costs
    nothing but that head start (the first run measures it instead)."""
    with training_lock(layout.train_lock_path, None, wait=False) as mine:
        if mine:  # else a training run is under way and measures it itself
            t0 = time.monotonic()
            if _warm(config, layout, base, refs, vllm_url, stop):
                log.info(
                    "the gate's base-model side measured in %.0f s: a first file's cycle"
                    " measures only its candidate",
                    time.monotonic() - t0,
                )


def _warm(config, layout, base, refs, vllm_url, stop) -> bool:
    run_dir = layout.runs / "warm"
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = ChildSpec(
        train=TrainSpec(
            base_path=str(base.path),
            out_dir=str(run_dir),
            new=[],
            general_max_len=config.train.general_max_len,
        ),
        eval=EvalSpec(general=[r.__dict__ for r in refs if r.held_out], vllm_url=vllm_url),
        warm=True,
    )
    spec.save(run_dir)
    cmd = [sys.executable, "-m", "evertune.adapters.child", str(run_dir)]
    with (
        (run_dir / "child.log").open("w") as err,
        subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=_preexec(config)
        ) as child,
        registered(_pause_dir(config), child),
    ):
        _forward_stop(child, stop)
        code = child.wait()
    if code != 0 and not (stop is not None and stop.is_set()):
        log.warning(
            "measuring the base model for the gate failed (exit code %s, log %s); the first"
            " training run measures it instead",
            code,
            run_dir / "child.log",
        )
    return code == 0


def _preexec(config: Config) -> Callable[[], None]:
    """Background children yield the CPU to serving (train.cpu_priority)."""
    return {"idle": background_child, "pause": pausable_child}.get(
        config.train.cpu_priority, die_with_parent
    )


def _pause_dir(config: Config) -> Path | None:
    """Where a child registers to be paused while clients' requests are in flight."""
    return HomeLayout(config.home).pausable if config.train.cpu_priority == "pause" else None


@contextlib.contextmanager
def training_lock(
    path: Path, progress: Callable[[dict], None] | None, wait: bool = True
) -> Iterator[bool]:
    """Holds the home's training lock; yields False at once, holding nothing, when another
    process has it and `wait` is False."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            if progress:
                progress({"event": "phase", "phase": "waiting for the running training"})
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)


def child_launcher(launcher: str) -> list[str]:
    """The command that starts the training child, before `-m evertune.adapters.child`:
    this Python, or the configured launcher. `torchrun ...` runs as this Python's
    `-m torch.distributed.run ...`: the same torch, and no reliance on PATH (under systemd
    the venv's bin/ is not on it)."""
    words = shlex.split(launcher) if launcher else []
    if not words:
        return [sys.executable]
    if words[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    return words


def run_child(
    db: Database,
    config: Config,
    run_dir: Path,
    spec: ChildSpec,
    run_id: int,
    progress: Callable[[dict], None] | None,
    stop: threading.Event | None,
) -> ChildResult:
    run_dir.mkdir(parents=True, exist_ok=True)
    spec.save(run_dir)
    cmd = [*child_launcher(config.train.launcher), "-m", "evertune.adapters.child", str(run_dir)]
    log_path = run_dir / "child.log"
    with log_path.open("w") as err:
        child = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=_preexec(config),
        )
        with registered(_pause_dir(config), child):
            watcher = threading.Thread(target=_forward_stop, args=(child, stop), daemon=True)
            watcher.start()
            result = None
            try:
                for line in child.stdout:
                    try:
                        event = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if event.get("event") == "progress":
                        runs.progress(
                            db,
                            run_id,
                            event["step"],
                            event["steps"],
                            {k: event[k] for k in ("loss", "tokens_per_s", "eta_s", "epoch")},
                        )
                    elif event.get("event") == "result":
                        # checked against the contract: a key missing or unknown is an error
                        result = ChildResult.from_dict(
                            {k: v for k, v in event.items() if k != "event"}
                        )
                    if progress:
                        progress(event)
            except BaseException:
                # The run fails here (a store locked past the busy timeout, a full disk): its
                # child must not go on training on its own, beside the retry's.
                _terminate(child)
                raise
            code = child.wait()
    # Stopped on request: at a step boundary (exit 3), or by the SIGTERM itself when it
    # arrived before the child had set up its handler (still importing torch).
    if code == EXIT_CANCELLED or (stop is not None and stop.is_set() and code == -signal.SIGTERM):
        raise TrainingCancelled("training was cancelled (stop requested)")
    if code != 0 or result is None:
        tail = log_path.read_text()[-2000:]
        raise TrainingError(
            f"the training child exited with code {code}; its log ({log_path}) ends with:\n{tail}"
        )
    return result


STOP_GRACE_S = 20.0  # a training step is ~2 s on 2 cores; HTTP calls to vLLM time out


def _forward_stop(
    child: subprocess.Popen, stop: threading.Event | None, grace: float = STOP_GRACE_S
) -> None:
    """SIGTERM the child when the daemon stops: it cancels at its next step boundary. One
    that has not exited `grace` seconds later is killed, so stopping never waits on it
    (systemd would SIGKILL the whole service at TimeoutStopSec)."""
    if stop is None:
        return
    while child.poll() is None:
        if stop.wait(0.2):
            _terminate(child, grace)
            return


def _terminate(child: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM (it cancels at its next step boundary), SIGKILL `grace` seconds later."""
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGTERM)
    resume(child.pid)  # a child paused for clients acts on it only once resumed
    try:
        child.wait(grace)
    except subprocess.TimeoutExpired:
        log.warning("child %d did not stop %.0f s after SIGTERM: killed", child.pid, grace)
        child.kill()
        child.wait()
