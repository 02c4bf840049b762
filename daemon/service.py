"""`evertune run`: the daemon. Owns the lock, the store writer and the inbox watcher.

Shutdown is explicit (STYLE.md): SIGTERM/SIGINT set one stop event in the main thread;
each component is stopped and joined in reverse order of start. Later issues add the
scheduler, the training child and the serving side here, as further components.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from evertune.daemon.config import Config
from evertune.daemon.lock import DaemonLock
from evertune.daemon.watcher import InboxWatcher, misplaced
from evertune.daemon.writer import StoreWriter
from evertune.store.ingest import FileReport, ingest_file
from evertune.store.layout import HomeLayout

log = logging.getLogger(__name__)


class Service:
    def __init__(self, config: Config):
        self.config = config
        self.layout = HomeLayout(config.home)
        self.stop_event = threading.Event()
        self._lock = DaemonLock(self.layout.lock_path)
        self.writer = StoreWriter(self.layout.db_path)
        self.watcher = InboxWatcher(
            self.layout.inbox,
            self._ingest_later,
            settle_seconds=config.watch.settle_seconds,
            unclosed_timeout_seconds=config.watch.unclosed_timeout_seconds,
        )

    def _ingest_later(self, domain: str, path: Path) -> None:
        self.writer.submit(lambda db: self._ingest(db, domain, path))

    def _ingest(self, db, domain: str, path: Path) -> FileReport | None:
        if not path.exists():  # reported twice (event + scan) and already moved: nothing to do
            return None
        try:
            return ingest_file(db, self.layout, path, domain, self.config.ingest.limits())
        except Exception:
            # The job boundary: the file stays in the inbox and is retried at the next start.
            log.exception("ingesting %s failed; it stays in the inbox", path)
            raise

    def start(self) -> None:
        self.layout.create()
        self._lock.acquire()
        self.writer.start()
        for why in misplaced(self.layout.inbox):
            log.warning("not ingested: %s", why)
        self.watcher.start()
        log.info("evertune running on %s", self.layout.home)

    def stop(self) -> None:
        log.info("stopping")
        self.watcher.stop()
        self.watcher.join(10)
        self.writer.stop()  # lets the files already handed over finish: no half state
        self.writer.join()
        self._lock.release()
        log.info("stopped")

    def run_forever(self) -> None:
        """Start, wait for SIGTERM/SIGINT, stop. Must be called from the main thread."""

        def on_signal(signum: int, _frame) -> None:
            log.info("received %s", signal.Signals(signum).name)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        try:
            while not self.stop_event.wait(1.0):
                pass
        finally:
            self.stop()
