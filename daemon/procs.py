"""Child processes never outlive the daemon: the kernel signals them when it dies."""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """For `preexec_fn`: SIGTERM this child when the thread that started it dies (the daemon
    killed, even by SIGKILL). Start children from a thread that lives as long as they do:
    Linux ties the signal to the starting thread, not to the process."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def pausable_child() -> None:
    """For `preexec_fn` of a background child the embedded server may pause while clients'
    requests are in flight (evertune.daemon.serving.pausing): `die_with_parent`, and a process group
    of its own, so it is paused with every process it starts (torchrun's workers) and
    nothing else."""
    die_with_parent()
    os.setpgrp()


def background_child() -> None:
    """For `preexec_fn` of a child that works in the background (training, preparation):
    `die_with_parent`, and the SCHED_IDLE policy, so the child runs only on CPU time that
    nothing else wants. Why: on a shared CPU the embedded vLLM's OpenMP threads and
    training's fought over the same cores (measured, one short client request every 2 s:
    answers up to 11.5 s, training ~2x slower); at idle priority every vLLM thread that
    wakes takes its core at once and training continues on what is left. Opt-in
    (`train.cpu_priority = "idle"`; the default pauses the child instead): vLLM's worker
    busy-polls its queue for a second after every decoding step, so under steady traffic
    an idle-priority child gets little CPU."""
    die_with_parent()
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
