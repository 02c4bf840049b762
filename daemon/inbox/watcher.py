"""The inbox watcher: one watchdog observer over `inbox/`, plus a scan at start.

Event handlers only record what happened (ARCHITECTURE.md, "Shutdown and threads"); a
settle thread decides when a file is complete and hands `(domain, path)` to `on_ready`. A
file is complete when:

- its writer closed it (inotify close-write), or it was renamed into the folder, or it
  was found by a scan, or it was created with no write seen after, and
- it has then been quiet for `settle_seconds` with an unchanged size and mtime.

A file the kernel says is open for writing (a read lease is refused), a file written but
never closed, and an empty file are taken only after `unclosed_timeout_seconds` without
change (a writer that never lets go must not block ingestion for ever). The kernel is
asked where it can be (the daemon owns the file or has CAP_LEASE). Where the platform reports no
close events (watchdog's non-inotify observers) quiet + unchanged is enough.

Only `inbox/<domain>/<file>` is ingested. Hidden and temporary files (`.*`, `*.tmp`,
`*.part`) are ignored without a word; files directly in `inbox/`, in nested folders or in
folders that are not valid domain names are left where they are, logged once, and listed
by `evertune status`.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from evertune.store.domains import domain_problem

log = logging.getLogger(__name__)

IGNORED_SUFFIXES = (".tmp", ".part", ".swp", ".crdownload")
Ready = Callable[[str, Path], None]


def is_ignored(name: str) -> bool:
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES) or name.endswith("~")


def classify(inbox: Path, path: Path) -> tuple[str | None, str | None]:
    """(domain, None) for an ingestible file; (None, why) for a misplaced one; (None, None)
    for a file that is ignored by design (hidden, temporary)."""
    try:
        parts = path.relative_to(inbox).parts
    except ValueError:
        return None, None
    if not parts or any(is_ignored(p) for p in parts):
        return None, None
    if len(parts) == 1:
        if os.path.islink(path) and os.path.isdir(path):
            return None, linked_folder(path)
        return (
            None,
            f"{path}: files directly in inbox/ are not ingested; move it into inbox/<domain>/",
        )
    problem = domain_problem(parts[0])
    if problem:
        return None, f"{path}: folder {problem}"
    if len(parts) > 2:
        return None, f"{path}: nested folders are not ingested; move it up into inbox/{parts[0]}/"
    return parts[0], None


def linked_folder(path: Path) -> str:
    """Why a link in inbox/ to a folder is not a domain folder (it is never followed)."""
    return (
        f"{path} is a symbolic link (to {os.readlink(path)}): a domain folder must be a real"
        f" folder inside the home; it is not followed, nothing in it is ingested or deleted."
        f" Replace it with a folder (rm {path} && mkdir {path}) and move the files into it"
    )


def _say(why: str) -> None:
    (log.error if "is a symbolic link" in why else log.warning)("not ingested: %s", why)


def open_for_writing(path: Path) -> bool | None:
    """Whether some process has `path` open for writing, asked of the kernel: a read lease
    (Linux F_SETLEASE) is refused with EAGAIN while any writer has the file open. None when
    we cannot tell (not the file's owner and no CAP_LEASE, or no leases on this system).

    Events alone can miss a writer: a file created in a new folder before watchdog has
    added the folder's watch shows up in the folder scan with no event of its own."""
    if not hasattr(fcntl, "F_SETLEASE"):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except BlockingIOError:
        return True
    except OSError:
        return None
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


def tidy(inbox: Path) -> None:
    """At start: say which files under the inbox are not ingested and why, and delete the
    partial copies of `evertune ingest` commands that were stopped."""
    from evertune.store.files import remove_stale_parts

    for why in misplaced(inbox):
        _say(why)
    for folder in (d for d in inbox.iterdir() if d.is_dir() and not d.is_symlink()):
        for part in remove_stale_parts(folder):
            log.warning("removed %s: the partial copy of a command that was stopped", part)


def misplaced(inbox: Path) -> Iterator[str]:
    """Why each misplaced file under the inbox is not ingested (for status and start-up)."""
    for root, dirs, files in os.walk(inbox):
        dirs[:] = [d for d in dirs if not is_ignored(d)]
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            _, why = classify(inbox, Path(root) / name)
            if why:
                yield why


@dataclass
class _Pending:
    last_event: float
    finished: bool  # closed, renamed in, or found by the scan
    stat: tuple[int, int] | None = None
    error: str | None = None  # why it could not be looked at last time (None: it could)
    retry_at: float = 0.0  # time.time() it is looked at again, after an error


class _Handler(FileSystemEventHandler):
    """Only records events; every decision is taken by the settle thread."""

    def __init__(self, note: Callable[[Path, bool | None], None], rescan: Callable[[Path], None]):
        self._note, self._rescan = note, rescan

    def on_created(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            # Files created before the new folder's watch was added raise no event of their own.
            self._rescan(Path(os.fsdecode(event.src_path)))
        else:
            # Creation alone says nothing about writes: watchdog also reports files that
            # appeared before a new folder's watch was added, with no close to follow.
            self._note(Path(os.fsdecode(event.src_path)), None)

    def on_modified(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._note(Path(os.fsdecode(event.src_path)), False)

    def on_closed(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._note(Path(os.fsdecode(event.src_path)), True)

    def on_moved(self, event: FileSystemEvent) -> None:
        dest = Path(os.fsdecode(event.dest_path))
        if event.is_directory:
            self._rescan(dest)
        else:
            self._note(dest, True)


class InboxWatcher:
    """start() / stop() / join(): the observer thread and the settle thread."""

    def __init__(
        self,
        inbox: Path,
        on_ready: Ready,
        *,
        settle_seconds: float,
        unclosed_timeout_seconds: float,
        tick: float = 0.1,
    ):
        self.inbox = inbox
        self._on_ready = on_ready
        self._settle = settle_seconds
        self._unclosed = unclosed_timeout_seconds
        self._tick = tick
        self._pending: dict[Path, _Pending] = {}
        # folders that could not be listed: (why, time.time() of the next scan)
        self._unscanned: dict[Path, tuple[str, float]] = {}
        self._retry_s = max(settle_seconds, 1.0)
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._observer = Observer()
        # Only inotify reports close-write; elsewhere "quiet and unchanged" has to do.
        self._close_events = type(self._observer).__name__ == "InotifyObserver"
        self._thread = threading.Thread(target=self._run, name="inbox-settle", daemon=True)

    # lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.inbox.mkdir(parents=True, exist_ok=True)
        self._observer.schedule(_Handler(self._note, self.scan), str(self.inbox), recursive=True)
        self._observer.start()
        self.scan(self.inbox)  # after the observer starts, so nothing falls between the two
        self._thread.start()
        log.info("watching %s (close events: %s)", self.inbox, self._close_events)

    def stop(self) -> None:
        self._stop.set()
        self._observer.stop()

    def join(self, timeout: float | None = None) -> None:
        self._observer.join(timeout)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def problem(self) -> str | None:
        """Why the watcher is not working (None: both its threads run)."""
        if not self._observer.is_alive():
            return "the inbox watcher (watchdog observer) has stopped"
        if not self._thread.is_alive():
            return "the inbox watcher's settle thread has stopped"
        return None

    # events ------------------------------------------------------------------------------
    def scan(self, folder: Path) -> None:
        """Take every file already under `folder` as finished (start-up, new folders)."""
        for root, dirs, files in os.walk(folder, onerror=self._scan_failed):
            dirs[:] = [d for d in dirs if not is_ignored(d)]
            # a link to a folder is listed as a folder (and not followed): it is refused
            # like any file that is not a regular one, not left there unreported
            for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
                self._note(Path(root) / name, True)

    def _note(self, path: Path, finished: bool | None) -> None:
        """finished: True (closed, renamed in, scanned), False (written to), None (created)."""
        domain, why = classify(self.inbox, path)
        if domain is None:
            if why and why not in self._warned:
                self._warned.add(why)
                _say(why)
            return
        with self._lock:
            entry = self._pending.get(path)
            if entry is None:
                self._pending[path] = _Pending(time.monotonic(), finished is not False)
            else:
                entry.last_event = time.monotonic()
                if finished is not None:
                    # A write after the close reopens the question until the next close.
                    entry.finished = finished

    # settle loop -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self._tick):
            if self._unscanned:
                self._rescan()
            for path in self._due():
                domain, _ = classify(self.inbox, path)
                try:
                    self._on_ready(domain, path)
                except Exception:  # the job boundary: log, keep watching
                    log.exception("handing %s to ingestion failed", path)

    def _due(self) -> list[Path]:
        now = time.monotonic()
        ready = []
        with self._lock:
            for path, entry in list(self._pending.items()):
                quiet = now - entry.last_event
                if quiet < self._settle or (entry.error and time.time() < entry.retry_at):
                    continue
                try:
                    st = os.lstat(path)  # a dangling link too: it is refused, not dropped
                except FileNotFoundError:
                    del self._pending[path]  # moved away or deleted before it was read
                    continue
                except OSError as exc:
                    # An unreadable folder, an I/O error: this file waits, the others go on.
                    self._cannot_read(path, entry, exc)
                    continue
                if entry.error is not None:
                    log.info("%s can be read again", path)
                    entry.error = None
                writing = open_for_writing(path)  # the kernel's word beats missed events
                if writing and quiet < self._unclosed:
                    continue
                # Written but not closed, or created and still empty: a writer may hold it.
                unsure = (self._close_events and not entry.finished) or st.st_size == 0
                if unsure and quiet < self._unclosed:
                    continue
                stat = (st.st_size, st.st_mtime_ns)
                if entry.stat != stat and self._settle > 0:
                    entry.stat, entry.last_event = stat, now  # changed: wait another period
                    continue
                del self._pending[path]
                ready.append(path)
        return ready

    def _cannot_read(self, path: Path, entry: _Pending, exc: OSError) -> None:
        """Keep `path` pending, asked again in `_retry_s`; said once per reason (not at every
        tick)."""
        entry.retry_at = time.time() + self._retry_s
        if entry.error != str(exc):
            entry.error = str(exc)
            log.warning(
                "%s cannot be read (%s); it stays in the inbox and is retried every %.0f s:"
                " give the service user read access to it and its folder",
                path,
                exc,
                self._retry_s,
            )

    def _scan_failed(self, exc: OSError) -> None:
        """os.walk's onerror: a folder that cannot be listed is scanned again later (its
        files raise no event of their own); said once per reason."""
        folder = Path(exc.filename) if exc.filename else self.inbox
        with self._lock:
            known = self._unscanned.get(folder)
            self._unscanned[folder] = (str(exc), time.time() + self._retry_s)
        if known is None or known[0] != str(exc):
            log.warning(
                "%s cannot be listed (%s); its files wait and it is scanned again every %.0f s:"
                " give the service user read access to it",
                folder,
                exc,
                self._retry_s,
            )

    def _rescan(self) -> None:
        """Scan again the folders that could not be listed, once their time has come."""
        now = time.time()
        with self._lock:
            due = [f for f, (_, at) in self._unscanned.items() if at <= now]
            for folder in due:
                del self._unscanned[folder]
        for folder in due:
            if os.path.isdir(folder):  # gone meanwhile: nothing left to find
                self.scan(folder)
                if folder not in self._unscanned:
                    log.info("%s can be listed again", folder)

    def waiting(self) -> list[dict[str, str | None]]:
        """The files and folders that could not be read: domain, file (None: the folder
        itself), error, next_retry (UTC), as ingestion.Ingestion.waiting() gives them."""
        from evertune.store.files import text_of

        def entry(path: Path, error: str, at: float, file: str | None) -> dict[str, str | None]:
            parts = path.relative_to(self.inbox).parts
            when = dt.datetime.fromtimestamp(at, dt.UTC).isoformat(timespec="seconds")
            domain = text_of(parts[0]) if parts else None
            return {"domain": domain, "file": file, "error": error, "next_retry": when}

        with self._lock:
            out = [
                entry(p, e.error, e.retry_at, text_of(p.name))
                for p, e in self._pending.items()
                if e.error is not None
            ]
            out += [entry(f, why, at, None) for f, (why, at) in self._unscanned.items()]
        return out

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)
