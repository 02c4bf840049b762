"""Clients first: the embedded vLLM server pauses the daemon's background children (training,
preparing the base model, measuring it for the gate) while a client's request is in flight,
so on a shared CPU an answer gets the cores it needs (`train.cpu_priority = "pause"`).

Why: training and vLLM's OpenMP threads fought over the same 2 cores (one short request
every 2 s: answers up to 11.5 s, training ~2x slower). Idle CPU priority for the child was
not enough: vLLM's worker busy-polls its queue for a second after every step, so an
idle-priority child starved under steady traffic. Pausing costs training the time
requests are in flight, and at most half of it.

How: a background child leads a process group of its own and is registered as the file
`<home>/pausable/<pgid>` holding its leader's start time (field 22 of /proc/<pid>/stat);
the server's middleware (`evertune.daemon.serving.vllm_entry.AdminGuard`) counts client generation
requests in flight and sends SIGSTOP to every registered group when the count leaves 0,
SIGCONT when it is back at 0, within a budget (`Pauser`: paused at most half of the time,
MAX_PAUSE_S at a time), so training always progresses. A group is
signalled only while its leader's start time matches its file (a reused pid is left alone).
If the server dies mid-pause, the daemon resumes a child stopped for longer than a pause can
last (`registered`); if the daemon dies, the kernel resumes the orphaned group and hangs it
up (SIGHUP, SIGCONT), and the child's parent-death signal ends it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

PAUSE_DIR_ENV = "EVERTUNE_PAUSE_DIR"  # set in the embedded server's environment only
MAX_PAUSE_S = 10.0  # the longest a child stays paused at a time
MAX_SHARE = 0.5  # of the time, at most: training at least half as fast under any load
STUCK_S = MAX_PAUSE_S + 5.0  # stopped longer than this: the server died mid-pause


def start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # after "pid (comm) ": comm may hold spaces and parentheses, so split after the last ')'
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def is_stopped(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] in ("T", "t")


@contextlib.contextmanager
def registered(
    directory: Path | None, child: subprocess.Popen, stuck_s: float = STUCK_S
) -> Iterator[None]:
    """`child` (started with `procs.pausable_child`) may be paused by the server while this holds;
    a watchdog resumes it when it stays stopped longer than a pause can last."""
    if directory is None:
        yield
        return
    started = start_time(child.pid)
    if started is None:  # already exited
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / str(child.pid)
    path.write_text(started)
    done = threading.Event()
    watchdog = threading.Thread(
        target=_unstick, args=(child, done, stuck_s), name=f"unstick-{child.pid}", daemon=True
    )
    watchdog.start()
    try:
        yield
    finally:
        done.set()
        path.unlink(missing_ok=True)
        resume(child.pid)  # never leave it stopped behind us


def resume(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGCONT)


def _unstick(child: subprocess.Popen, done: threading.Event, stuck_s: float) -> None:
    since = None
    while not done.wait(1.0) and child.poll() is None:
        if not is_stopped(child.pid):
            since = None
        elif since is None:
            since = time.monotonic()
        elif time.monotonic() - since > stuck_s:
            log.warning(
                "child %d was paused for clients for over %.0f s (the server died"
                " mid-pause?): resumed",
                child.pid,
                stuck_s,
            )
            resume(child.pid)
            since = None


def clear(directory: Path) -> None:
    """Registrations a killed daemon left behind (at start, before any child runs)."""
    if directory.is_dir():
        for path in directory.iterdir():
            path.unlink(missing_ok=True)


class Pauser:
    """The server side: `enter` when a client's request is admitted, `leave` when its answer
    is sent. Runs on the server's event loop (`call_later` schedules the limits); never
    raises: a client's answer must not fail because a child could not be paused.

    The children are paused at most `max_share` of the time: after a pause of p seconds
    they run at least p * (1 - max_share) / max_share seconds before the next one (requests
    admitted meanwhile share the CPU with them), and no pause lasts over `max_pause`. So a
    light load (short answers, far apart) is answered as if nothing trained, and a heavy
    one (answers through an adapter that take most of the interval) slows training by at
    most 1 / (1 - max_share)."""

    def __init__(
        self,
        directory: Path,
        call_later: Callable[[float, Callable[[], None]], object],
        max_pause: float = MAX_PAUSE_S,
        max_share: float = MAX_SHARE,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.directory = directory
        self.call_later = call_later
        self.max_pause = max_pause
        self.max_share = max_share
        self.clock = clock
        self.in_flight = 0
        self.paused: list[int] = []
        self.paused_s = 0.0  # in all, for the server's log
        self._paused_at = 0.0
        self._run_until = 0.0  # no pause before this: the children's share of the CPU
        self._timer = None  # the running pause's limit, or the wait for the next pause

    def enter(self) -> None:
        self.in_flight += 1
        if self.in_flight == 1 and self._timer is None:
            owed = self._run_until - self.clock()
            if owed > 0:
                self._timer = self.call_later(owed, self._after_run)
            else:
                self._pause()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self.paused:
            self._cancel()
            self._resume()

    def _pause(self) -> None:
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return
        for entry in entries:
            with contextlib.suppress(OSError, ValueError):
                pgid = int(entry.name)
                if Path(entry.path).read_text() != start_time(pgid):
                    continue  # the child is gone (its pid may be someone else's now)
                os.killpg(pgid, signal.SIGSTOP)
                self.paused.append(pgid)
        if self.paused:
            self._paused_at = self.clock()
            self._timer = self.call_later(self.max_pause, self._break)

    def _break(self) -> None:
        """Paused for max_pause with requests still in flight: the children run for their
        share before the next pause."""
        self._timer = None
        self._resume()
        owed = self._run_until - self.clock()
        self._timer = self.call_later(max(owed, 0.0), self._after_run)

    def _after_run(self) -> None:
        self._timer = None
        if self.in_flight > 0:
            self._pause()

    def _resume(self) -> None:
        if not self.paused:
            return
        for pgid in self.paused:
            resume(pgid)
        self.paused = []
        now = self.clock()
        paused = now - self._paused_at
        self.paused_s += paused
        self._run_until = now + paused * (1 - self.max_share) / self.max_share

    def _cancel(self) -> None:
        if self._timer is not None:
            with contextlib.suppress(Exception):
                self._timer.cancel()
            self._timer = None
