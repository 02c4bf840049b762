"""The scheduling rules, each tested directly: a real APScheduler started paused (its jobs are
planned with their next run time but never fire), fed with recording callables instead of
a store and a run queue."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from evertune.daemon.config import Config, ConfigSource
from evertune.daemon.config_sections import ScheduleConfig, WatchConfig
from evertune.daemon.training.schedule import RETRY_MAX_S, Schedule


class Recorder:
    def __init__(self, fresh: dict[str, int]):
        self.fresh = fresh
        self.requests: list[tuple] = []

    def request(self, domain: str, trigger: str, force: bool = False) -> int:
        self.requests.append((domain, trigger, force))
        return len(self.requests)


def make(
    tmp_path: Path, fresh: dict[str, int] | None = None, **config
) -> tuple[Schedule, Recorder]:
    rec = Recorder(fresh if fresh is not None else {"legal": 3, "faq": 1})
    cfg = Config(home=tmp_path, path=None, **config)
    sched = Schedule(
        ConfigSource(cfg),
        request=rec.request,
        count_fresh=lambda d: rec.fresh.get(d, 0),
        domains=lambda: sorted(rec.fresh),
        scheduler=BackgroundScheduler(timezone=dt.UTC),
    )
    sched.scheduler.start(paused=True)
    return sched, rec


@pytest.fixture
def cleanup():
    made: list[Schedule] = []
    yield made
    for s in made:
        s.stop()


def seconds_until(job) -> float:
    return (job.next_run_time - dt.datetime.now(dt.UTC)).total_seconds()


def test_debounce_one_check_quiet_seconds_after_the_last_file(tmp_path, cleanup):
    sched, rec = make(tmp_path, schedule=ScheduleConfig(quiet_seconds=30))
    cleanup.append(sched)
    sched.new_examples("legal")
    first = sched.scheduler.get_job("drop:legal").next_run_time
    sched.new_examples("legal")  # a second file of the burst moves the check, not adds one
    jobs = [j for j in sched.scheduler.get_jobs() if j.id.startswith("drop:")]
    assert [j.id for j in jobs] == ["drop:legal"]
    assert jobs[0].next_run_time >= first and 28 < seconds_until(jobs[0]) <= 30
    assert jobs[0].args == ("legal", "drop")
    assert rec.requests == []  # nothing until the quiet period ends


def test_no_check_on_drop_when_on_drop_is_off(tmp_path, cleanup):
    sched, _ = make(
        tmp_path,
        schedule=ScheduleConfig(on_drop=False),
        domains={"faq": ScheduleConfig(quiet_seconds=1)},
    )
    cleanup.append(sched)
    sched.new_examples("legal")
    sched.new_examples("faq")  # a domain override with on_drop on (the default)
    assert sched.scheduler.get_job("drop:legal") is None
    assert sched.scheduler.get_job("drop:faq") is not None


def test_threshold_requests_a_run_only_with_enough_fresh_examples(tmp_path, cleanup):
    sched, rec = make(tmp_path, schedule=ScheduleConfig(min_new_examples=3))
    cleanup.append(sched)
    assert not sched.maybe_train("faq", "drop")  # 1 fresh example
    assert sched.maybe_train("legal", "drop")  # 3
    assert rec.requests == [("legal", "drop", False)]


def test_periodic_groups_one_per_override_and_the_rest(tmp_path, cleanup):
    sched, rec = make(
        tmp_path,
        fresh={"legal": 2, "faq": 2, "hr": 2},
        schedule=ScheduleConfig(interval_minutes=15),
        domains={
            "legal": ScheduleConfig(cron="0 3 * * *"),
            "hr": ScheduleConfig(interval_minutes=0),
        },
    )
    cleanup.append(sched)
    sched.plan(sched.config.get())
    jobs = {j.id: j for j in sched.scheduler.get_jobs()}
    assert set(jobs) == {"periodic:*", "periodic:legal"}  # hr: no periodic check at all
    assert isinstance(jobs["periodic:*"].trigger, IntervalTrigger)
    assert jobs["periodic:*"].trigger.interval == dt.timedelta(minutes=15)
    assert isinstance(jobs["periodic:legal"].trigger, CronTrigger)
    assert jobs["periodic:legal"].next_run_time.hour == 3
    # the [schedule] group skips every domain with an override of its own
    jobs["periodic:*"].func(*jobs["periodic:*"].args)
    assert rec.requests == [("faq", "schedule", False)]
    jobs["periodic:legal"].func(*jobs["periodic:legal"].args)
    assert rec.requests[-1] == ("legal", "schedule", False)


def test_reload_replaces_the_periodic_jobs(tmp_path, cleanup):
    sched, _ = make(tmp_path, schedule=ScheduleConfig(interval_minutes=15))
    cleanup.append(sched)
    sched.plan(sched.config.get())
    sched.config.replace(
        Config(home=tmp_path, path=None, schedule=ScheduleConfig(cron="*/5 * * * *"))
    )
    [job] = [j for j in sched.scheduler.get_jobs() if j.id.startswith("periodic:")]
    assert isinstance(job.trigger, CronTrigger)


def test_retry_doubles_up_to_max_retries_then_waits(tmp_path, cleanup):
    sched, rec = make(tmp_path, schedule=ScheduleConfig(retry_seconds=60, max_retries=3))
    cleanup.append(sched)
    delays = [sched.training_failed("legal", RuntimeError("boom"), force=True) for _ in range(4)]
    assert delays == [60, 120, 240, None]  # the 4th failure in a row: no more retries
    job = sched.scheduler.get_job("retry:legal")
    assert 230 < seconds_until(job) <= 240  # the last planned retry stays
    job.func(*job.args)
    assert rec.requests == [("legal", "retry", True)]  # a retry keeps --force
    sched.training_succeeded("legal")  # a success starts the count again
    assert sched.training_failed("legal", RuntimeError("boom")) == 60


def test_new_data_gives_a_domain_whose_retries_ran_out_its_retries_again(tmp_path, cleanup):
    sched, _ = make(tmp_path, schedule=ScheduleConfig(retry_seconds=60, max_retries=2))
    cleanup.append(sched)
    delays = [sched.training_failed("legal", RuntimeError("boom")) for _ in range(3)]
    assert delays == [60, 120, None]
    sched.new_examples("medical")  # another domain's data changes nothing here
    assert sched.training_failed("legal", RuntimeError("boom")) is None
    sched.new_examples("legal")
    assert sched.training_failed("legal", RuntimeError("boom")) == 60


def test_retry_delay_is_capped_at_an_hour(tmp_path, cleanup):
    sched, _ = make(tmp_path, schedule=ScheduleConfig(retry_seconds=1000, max_retries=10))
    cleanup.append(sched)
    delays = [sched.training_failed("legal", RuntimeError("x")) for _ in range(4)]
    assert delays == [1000, 2000, RETRY_MAX_S, RETRY_MAX_S]


def test_failed_ingest_is_retried_4x_later_each_time(tmp_path, cleanup):
    sched, _ = make(tmp_path, watch=WatchConfig(retry_seconds=10))
    cleanup.append(sched)
    path = tmp_path / "inbox" / "legal" / "a.jsonl"
    calls = []
    delays = [
        sched.ingest_failed("legal", path, lambda d, p: calls.append((d, p))) for _ in range(7)
    ]
    assert delays == [10, 40, 160, 640, 2560, RETRY_MAX_S, RETRY_MAX_S]
    job = sched.scheduler.get_job(f"retry-ingest:{path}")
    job.func(*job.args)
    assert calls == [("legal", path)]
    sched.ingest_succeeded(path)
    assert sched.ingest_failed("legal", path, lambda d, p: None) == 10


def test_start_catches_up_on_every_domain(tmp_path):
    rec = Recorder({"legal": 5, "faq": 0})
    sched = Schedule(
        ConfigSource(Config(home=tmp_path, path=None)),
        request=rec.request,
        count_fresh=lambda d: rec.fresh[d],
        domains=lambda: sorted(rec.fresh),
        scheduler=BackgroundScheduler(timezone=dt.UTC),
    )
    sched.scheduler.start(paused=True)
    sched.scheduler.start = lambda: None  # already started, paused
    try:
        sched.start()
        job = sched.scheduler.get_job("startup")
        job.func(*job.args)
        assert rec.requests == [("legal", "startup", False)]  # faq has nothing fresh
        assert {j.id for j in sched.scheduler.get_jobs()} == {"startup", "periodic:*"}
    finally:
        sched.stop()


def test_nothing_is_planned_or_requested_once_stopped(tmp_path):
    sched, rec = make(tmp_path)
    sched.stop()
    sched.new_examples("legal")
    assert not sched.maybe_train("legal", "drop")
    assert sched.training_failed("legal", RuntimeError("x")) == 60  # said, not planned
    assert rec.requests == []


def test_retries_past_a_thousand_failures_stay_an_hour_apart(tmp_path, cleanup):
    """max_retries may be 10,000: 2 ** 1024 seconds no longer fits a float (OverflowError in
    the trainer thread); a file failing for weeks reaches 4 ** 512 the same way."""
    sched, _ = make(tmp_path, schedule=ScheduleConfig(retry_seconds=60.0, max_retries=10_000))
    cleanup.append(sched)
    delays = [sched.training_failed("legal", RuntimeError("x")) for _ in range(1100)]
    assert delays[-1] == RETRY_MAX_S and sched.failures["legal"] == 1100
    path = tmp_path / "inbox" / "legal" / "a.jsonl"
    delays = [sched.ingest_failed("legal", path, lambda d, p: None) for _ in range(600)]
    assert delays[-1] == RETRY_MAX_S


def started(tmp_path: Path, cfg: Config, fresh: dict[str, int]) -> tuple[Schedule, Recorder]:
    """A Schedule started as the daemon starts it (paused), its start-up job run once."""
    rec = Recorder(fresh)
    sched = Schedule(
        ConfigSource(cfg),
        request=rec.request,
        count_fresh=lambda d: rec.fresh[d],
        domains=lambda: sorted(rec.fresh),
        scheduler=BackgroundScheduler(timezone=dt.UTC),
    )
    sched.scheduler.start(paused=True)
    sched.scheduler.start = lambda: None  # already started, paused
    sched.start()
    job = sched.scheduler.get_job("startup")
    if job is not None:
        job.func(*job.args)
    return sched, rec


OFF = "[schedule]\non_drop = false\ninterval_minutes = 0\n"


@pytest.mark.parametrize(
    ("text", "trained"),
    [
        (OFF, []),  # all automatic training off: `evertune train` only
        (OFF + 'cron = "0 3 * * *"\n', []),  # nightly only: at 03:00, not at every restart
        ("[schedule]\non_drop = true\ninterval_minutes = 0\n", ["faq", "legal"]),
        ("[schedule]\non_drop = false\ninterval_minutes = 30\n", ["faq", "legal"]),
        (OFF + "[domains.legal]\non_drop = true\n", ["legal"]),
        ("[domains.legal]\non_drop = false\ninterval_minutes = 0\n", ["faq"]),
    ],
)
def test_start_trains_only_domains_that_train_by_themselves(tmp_path, cleanup, text, trained):
    """Issue 24: with on_drop off, no interval and no cron, every restart started a run."""
    from evertune.daemon import config as config_mod

    path = tmp_path / "evertune.toml"
    path.write_text(text)
    sched, rec = started(tmp_path, config_mod.load(path, env={}), {"legal": 5, "faq": 2})
    cleanup.append(sched)
    assert sorted(d for d, trigger, _ in rec.requests if trigger == "startup") == trained
    assert all(trigger == "startup" for _, trigger, _ in rec.requests)


def test_a_schedule_that_cannot_be_planned_changes_nothing(tmp_path, cleanup):
    """A reload's new config is planned whole first: a bad one (NaN minutes, a bad crontab) leaves
    the running config and periodic jobs as they were (before: the jobs were removed first,
    then it raised, and periodic training was silently off)."""
    from evertune.daemon.errors import ConfigError

    good = Config(home=tmp_path, path=None, schedule=ScheduleConfig(interval_minutes=5))
    sched, _ = make(tmp_path, schedule=good.schedule)
    cleanup.append(sched)
    sched.config.replace(good)
    for bad in (
        ScheduleConfig(interval_minutes=float("nan")),
        ScheduleConfig(interval_minutes=float("inf")),
        ScheduleConfig(cron="every night"),
    ):
        cfg = Config(home=tmp_path, path=tmp_path / "evertune.toml", schedule=bad)
        with pytest.raises(ConfigError, match=r"evertune\.toml: schedule\.cron = .* cannot be"):
            sched.config.replace(cfg)
        assert sched.config.get() is good
        [job] = [j for j in sched.scheduler.get_jobs() if j.id.startswith("periodic:")]
        assert job.trigger.interval.total_seconds() == 300
