"""Dropped files into the store: the watcher hands each settled file over, it is ingested
as one job on the store writer's thread, and a file whose ingestion raised stays in the
inbox and is retried (daemon/training/schedule.py) and at the next start. Why each such file waits,
and when it is tried again, is kept for `status` and /healthz (`waiting()`)."""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path

from sqlite_utils import Database

from evertune.daemon.config import ConfigSource
from evertune.daemon.control.metrics import Metrics
from evertune.daemon.inbox.writer import StoreWriter
from evertune.daemon.training.schedule import Schedule
from evertune.store.files import text_of
from evertune.store.ingest import ingest_file
from evertune.store.layout import HomeLayout
from evertune.store.reports import FileReport

log = logging.getLogger(__name__)


class Ingestion:
    def __init__(
        self,
        config: ConfigSource,
        writer: StoreWriter,
        schedule: Schedule,
        metrics: Metrics,
    ):
        self.config = config
        self.writer = writer
        self.schedule = schedule
        self.metrics = metrics
        self._waiting: dict[Path, dict[str, str | None]] = {}

    def waiting(self) -> list[dict[str, str | None]]:
        """The files whose ingestion failed: domain, file, error, next_retry (UTC)."""
        return list(self._waiting.values())

    def submit(self, domain: str, path: Path) -> None:
        """The watcher's callback: ingest `path` on the writer's thread."""
        self.writer.submit(lambda db: self.ingest(db, domain, path), f"ingesting {path}")

    def ingest(self, db: Database, domain: str, path: Path) -> FileReport | None:
        if not os.path.lexists(path):  # reported twice (event + scan), already moved: done
            self._waiting.pop(path, None)
            return None
        config = self.config.get()
        try:
            report = ingest_file(db, HomeLayout(config.home), path, domain, config.ingest.limits())
        except Exception as exc:
            # The job boundary: the file stays in the inbox and is retried, with a growing
            # pause (a full disk, a locked store: causes that pass), and at the next start.
            delay = self.schedule.ingest_failed(domain, path, self.submit)
            at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay)
            self._waiting[path] = {
                "domain": domain,
                "file": text_of(path.name),
                "error": str(exc) or type(exc).__name__,
                "next_retry": at.isoformat(timespec="seconds"),
            }
            raise
        self._waiting.pop(path, None)
        self.schedule.ingest_succeeded(path)
        outcome = report.status
        if report.status == "ingested" and report.records_rejected:
            outcome = "partial"
        self.metrics.file_ingested(domain, outcome, report.examples_added, report.records_rejected)
        if report.examples_added:
            self.schedule.new_examples(domain)
        return report
