"""Child processes never outlive the daemon: the kernel signals them when it dies."""

from __future__ import annotations

import ctypes
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """For `preexec_fn`: SIGTERM this child when the thread that started it dies (the daemon
    killed, even by SIGKILL). Start children from a thread that lives as long as they do:
    Linux ties the signal to the starting thread, not to the process."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
