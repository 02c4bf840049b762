"""When training runs: the scheduling rules, on an APScheduler 3 `BackgroundScheduler`.

- debounce: new examples of a domain start a check `quiet_seconds` after the last file of
  a burst (a burst of files becomes one run); nothing with `on_drop` off;
- threshold: a check requests a run when the domain has at least `min_new_examples` fresh
  examples (`store.examples.FRESH`);
- periodic: every `interval_minutes` or at the `cron` times, one job for `[schedule]` over
  every domain without an override, one per `[domains.<name>]` override;
- retry: a failed run is retried after `retry_seconds`, doubling up to an hour, at most
  `max_retries` times in a row (a success or new data starts the count again); a failed
  ingest after `watch.retry_seconds`, 4x each time, up to an hour;
- catch-up: at start, one check of every domain that trains by itself on new data or
  every `interval_minutes` (examples ingested but never trained, a run the stop cut short,
  missed periodic runs: all become one run). None for a domain with on_drop off and a
  `cron` line (it trains at those times only) or with no automatic training at all (it
  trains on `evertune train` only).

No storage, training or HTTP here: the rules act through the callables they are given, so
each is tested directly (tests/test_schedule.py).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from evertune.daemon.config import Config, ConfigSource
from evertune.daemon.config_sections import ScheduleConfig
from evertune.daemon.errors import ConfigError

log = logging.getLogger(__name__)
RETRY_MAX_S = 3600.0  # the longest pause before a retry, of training or of an ingest


class Schedule:
    def __init__(
        self,
        config: ConfigSource,
        *,
        request: Callable[[str, str], Any],
        count_fresh: Callable[[str], int],
        domains: Callable[[], list[str]],
        scheduler: BackgroundScheduler | None = None,
    ):
        """`request(domain, trigger)` queues a run; `count_fresh(domain)` counts the fresh
        examples; `domains()` lists the domains with examples."""
        self.config = config
        config.watch(self.plan)  # a reload plans the triggers again, or is refused
        self.request = request
        self.count_fresh = count_fresh
        self.domains = domains
        self.scheduler = scheduler or BackgroundScheduler(
            timezone=dt.UTC,
            # After downtime, missed runs coalesce into one, whenever it is.
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        self.failures: dict[str, int] = {}  # failed runs in a row, per domain
        self._ingest_failures: dict[Path, int] = {}
        self._stopped = False

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the timers, the periodic jobs and the start-up catch-up."""
        self.scheduler.start()
        self.plan(self.config.get())
        self.scheduler.add_job(self.catch_up, id="startup")

    def stop(self) -> None:
        self._stopped = True
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    @property
    def running(self) -> bool:
        return self.scheduler.running

    def every(self, seconds: float, job: Callable[[], Any], job_id: str) -> None:
        """A plain repeating job (reconciling the endpoints)."""
        self.scheduler.add_job(job, "interval", seconds=seconds, id=job_id, replace_existing=True)

    def _at(self, delay: float, job: Callable, args: list, job_id: str) -> None:
        """`job(*args)` once, `delay` seconds from now (replacing a job of the same id)."""
        self.scheduler.add_job(
            job,
            "date",
            args=args,
            run_date=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay),
            id=job_id,
            replace_existing=True,
        )

    # ---- the rules ------------------------------------------------------------------------

    def new_examples(self, domain: str) -> None:
        """Debounce: a check `quiet_seconds` after the last file of a burst. New data also
        gives a domain whose retries were used up its `max_retries` again."""
        self.failures.pop(domain, None)
        schedule = self.config.get().schedule_for(domain)
        if schedule.on_drop and not self._stopped:
            self._at(schedule.quiet_seconds, self.maybe_train, [domain, "drop"], f"drop:{domain}")

    def maybe_train(self, domain: str, trigger: str) -> bool:
        """Threshold: request a run when there are enough fresh examples."""
        if self._stopped:
            return False
        need = self.config.get().schedule_for(domain).min_new_examples
        n = self.count_fresh(domain)
        if n < need:
            log.debug("%s: %d new examples, fewer than %d: not training yet", domain, n, need)
            return False
        self.request(domain, trigger)
        return True

    def check_domains(self, trigger: str, only: set[str] | None, skip: set[str]) -> None:
        for d in self.domains():
            if (only is None or d in only) and d not in skip:
                self.maybe_train(d, trigger)

    def catch_up(self) -> None:
        """At start: a check of each domain that trains by itself at any time (on_drop, or
        an interval); not of one that trains at its cron times only or never by itself."""
        for d in self.domains():
            s = self.config.get().schedule_for(d)
            if s.on_drop or (s.interval_minutes and not s.cron):
                self.maybe_train(d, "startup")

    def plan(self, config: Config) -> None:
        """The periodic checks of `config`: one for [schedule], one per [domains.<name>]
        override. Every trigger is built before anything changes: one that cannot be is a
        ConfigError and the jobs stay as they were (and a reload is refused whole)."""
        overrides = set(config.domains)
        groups: list[tuple[str, ScheduleConfig, set[str] | None, set[str]]] = [
            ("periodic:*", config.schedule, None, overrides)
        ]
        groups += [(f"periodic:{d}", s, {d}, set()) for d, s in config.domains.items()]
        jobs = []
        for job_id, s, only, skip in groups:
            try:
                if s.cron:
                    trigger = CronTrigger.from_crontab(s.cron, timezone=dt.UTC)
                elif s.interval_minutes:
                    trigger = IntervalTrigger(minutes=s.interval_minutes, timezone=dt.UTC)
                else:
                    continue
            except (ValueError, OverflowError) as exc:
                section = "schedule" if only is None else f"domains.{job_id[9:]}"
                raise ConfigError(
                    f"{config.path}: {section}.cron = {s.cron!r} / {section}.interval_minutes ="
                    f" {s.interval_minutes!r} cannot be scheduled ({exc})"
                ) from exc
            jobs.append((job_id, trigger, ["schedule", only, skip]))
        for job in self.scheduler.get_jobs():
            if job.id.startswith("periodic:"):
                job.remove()
        for job_id, trigger, args in jobs:
            self.scheduler.add_job(self.check_domains, trigger, args=args, id=job_id)

    def training_succeeded(self, domain: str) -> None:
        self.failures.pop(domain, None)

    def training_failed(self, domain: str, error: Exception, force: bool = False) -> float | None:
        """Retry: the delay before the retry, or None when retries are used up (then the
        domain waits for new data or a manual `train`)."""
        schedule = self.config.get().schedule_for(domain)
        n = self.failures[domain] = self.failures.get(domain, 0) + 1
        if n > schedule.max_retries:
            log.error(
                "%s: training failed %d times in a row (%s); no more retries until new data"
                " arrives or `evertune train %s`",
                domain,
                n,
                error,
                domain,
            )
            return None
        delay = min(schedule.retry_seconds * 2 ** min(n - 1, 32), RETRY_MAX_S)
        log.error(
            "%s: training failed (%s); retry %d/%d in %.0f s",
            domain,
            error,
            n,
            schedule.max_retries,
            delay,
        )
        if not self._stopped:
            self._at(delay, self._retry, [domain, force], f"retry:{domain}")
        return delay

    def _retry(self, domain: str, force: bool) -> None:
        try:
            self.request(domain, "retry", force)
        except Exception as exc:  # the run cannot be queued now (a full disk): not lost
            self.training_failed(domain, exc, force)

    def ingest_failed(self, domain: str, path: Path, ingest: Callable[[str, Path], Any]) -> float:
        """Retry an ingest that raised (a full disk, a locked store: causes that pass):
        `ingest(domain, path)` after a pause growing 4x each time, up to an hour."""
        n = self._ingest_failures[path] = self._ingest_failures.get(path, 0) + 1
        delay = min(self.config.get().watch.retry_seconds * 4 ** min(n - 1, 16), RETRY_MAX_S)
        log.exception(
            "ingesting %s failed (%d time(s)); it stays in the inbox, retried in %.0f s",
            path,
            n,
            delay,
        )
        if not self._stopped:
            self._at(delay, ingest, [domain, path], f"retry-ingest:{path}")
        return delay

    def ingest_succeeded(self, path: Path) -> None:
        self._ingest_failures.pop(path, None)
