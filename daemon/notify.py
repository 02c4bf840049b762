"""Tell systemd how the daemon is doing: the sd_notify(3) protocol, without libsystemd.

Under `Type=notify` systemd puts the address of a unix datagram socket in `NOTIFY_SOCKET`
(a path, or an abstract-namespace name written with a leading `@`). Each notification is
one datagram of newline-separated `KEY=VALUE` lines:

    READY=1                   start-up finished: `systemctl start` returns, dependents start
    STATUS=text               one line shown by `systemctl status`
    STOPPING=1                shutdown has begun
    RELOADING=1 + MONOTONIC_USEC=<CLOCK_MONOTONIC in µs>
                              a reload (SIGHUP) has begun; send READY=1 again when it is
                              done. systemd 253+ wants the timestamp for Type=notify-reload;
                              older versions and Type=notify ignore it.
    WATCHDOG=1                "still alive"; with `WatchdogSec=` systemd passes
                              `WATCHDOG_USEC` (and `WATCHDOG_PID`, the pid meant) and kills
                              the service when no ping arrives within that time.

Without `NOTIFY_SOCKET` (run from a shell, in tests) every method does nothing. A failed
send never raises into the caller: it is logged once and the daemon carries on, because a
service that works but cannot report is better than one that dies for it.

    notifier = Notifier.from_env()
    watchdog = notifier.start_watchdog(stop_event)   # None when systemd wants no pings
    notifier.ready("watching /var/lib/evertune/inbox")
    ...
    notifier.stopping()
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages to `address` (None: a no-op notifier)."""

    def __init__(
        self,
        address: str | None,
        watchdog_usec: int | None = None,
        watchdog_pid: int | None = None,
    ):
        self.address = address or None
        self.watchdog_usec = watchdog_usec
        self.watchdog_pid = watchdog_pid
        self._warned = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Notifier:
        """The notifier systemd asked for through NOTIFY_SOCKET / WATCHDOG_USEC / WATCHDOG_PID."""
        return cls(
            env.get("NOTIFY_SOCKET"),
            _positive_int(env, "WATCHDOG_USEC"),
            _positive_int(env, "WATCHDOG_PID"),
        )

    @property
    def enabled(self) -> bool:
        return self.address is not None

    # The messages ---------------------------------------------------------------------------
    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([] if status is None else [_status_line(status)]))

    def status(self, text: str) -> bool:
        return self.notify(_status_line(text))

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def notify(self, *fields: str) -> bool:
        """Send one datagram of `KEY=VALUE` fields; True when it was sent. Never raises."""
        if self.address is None or not fields:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(fields).encode("utf-8"), _sockaddr(self.address))
            return True
        except (OSError, ValueError) as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "cannot notify systemd at NOTIFY_SOCKET=%s: %s (further failures not logged)",
                    self.address,
                    exc,
                )
            return False

    # The watchdog ---------------------------------------------------------------------------
    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises),
        or None when systemd wants none from this process."""
        if self.address is None or self.watchdog_usec is None:
            return None
        if self.watchdog_pid is not None and self.watchdog_pid != os.getpid():
            return None  # the pings are meant for another process (e.g. our parent)
        return self.watchdog_usec / 2 / 1_000_000

    def start_watchdog(
        self, stop_event: threading.Event, healthy: Callable[[], bool] | None = None
    ) -> threading.Thread | None:
        """Ping WATCHDOG=1 every `watchdog_interval` until `stop_event` is set, from a daemon
        thread; None when no watchdog is wanted. `healthy`, when given, is asked before each
        ping: returning False skips it, so a wedged component gets the service restarted."""
        interval = self.watchdog_interval
        if interval is None:
            return None

        def run() -> None:
            while not stop_event.is_set():
                if healthy is None or _asked(healthy):
                    self.watchdog()
                stop_event.wait(interval)

        thread = threading.Thread(target=run, name="sd-watchdog", daemon=True)
        thread.start()
        return thread


def _asked(healthy: Callable[[], bool]) -> bool:
    try:
        return bool(healthy())
    except Exception:
        log.exception("watchdog health check failed; skipping this ping")
        return False


def _sockaddr(address: str) -> str | bytes:
    if address.startswith("@"):  # abstract namespace: the name starts with a NUL byte
        return b"\0" + address[1:].encode("utf-8")
    if not address.startswith("/"):
        raise ValueError("not an absolute path or an @abstract name")
    return address


def _status_line(text: str) -> str:
    # One datagram line per field: a newline in the text would start a bogus field.
    return "STATUS=" + " ".join(text.splitlines())


def _positive_int(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key)
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        log.warning("ignoring %s=%r: not a positive integer", key, value)
        return None
    return number
