"""The daemon's Prometheus metrics, served by the control API at `GET /metrics`.

`Metrics` owns its own `CollectorRegistry` (never prometheus_client's global one, so a test
or a second service in one process gets a fresh set) and exposes plain-argument methods, so
callers never touch prometheus objects. Every name starts with `evertune_`.

Counters (`_total` is added in the exposition):
    evertune_examples_ingested_total{domain}       examples stored from inbox files
    evertune_examples_rejected_total{domain}       records refused (the file's report says why)
    evertune_files_ingested_total{domain,outcome}  files taken from the inbox, by outcome:
                                                   ingested | rejected | duplicate | partial
    evertune_training_runs_total{domain,outcome}   finished training cycles, by outcome:
                                                   promoted | refused | failed | cancelled |
                                                   nothing
    evertune_publishes_total{domain,outcome}       versions pushed to the serving side, by
                                                   outcome: ok | partial (some endpoints
                                                   failed) | failed

Gauges:
    evertune_training_tokens_per_second{domain}    throughput of the domain's last finished run
    evertune_training_in_progress{domain}          1 while a run of the domain trains, else 0
    evertune_live_version{domain}                  number of the live version (7 for v0007),
                                                   0 when the domain has none
    evertune_vllm_up{endpoint}                     1 if the vLLM endpoint answered its last
                                                   health check, else 0
    evertune_adapters_loaded{endpoint}             LoRA adapters the endpoint reports loaded

Histograms:
    evertune_adapter_switch_seconds                one load/unload of an adapter on one endpoint
                                                   (buckets 5 ms .. 10 s)
    evertune_publish_seconds                       one publish of a version to every endpoint
    evertune_training_seconds                      wall time of one training run
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

FILE_OUTCOMES = frozenset({"ingested", "rejected", "duplicate", "partial"})
RUN_OUTCOMES = frozenset({"promoted", "canary", "refused", "failed", "cancelled", "nothing"})
PUBLISH_OUTCOMES = frozenset({"ok", "partial", "failed"})

# A LoRA load/unload on a warm vLLM takes milliseconds; a cold one on a busy GPU host seconds.
SWITCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PUBLISH_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Training runs last from seconds (a few examples on the tiny model) to hours (a GPU host).
TRAINING_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


def _check(kind: str, value: str, allowed: frozenset[str]) -> None:
    # An unknown outcome would silently create a new time series no dashboard looks at.
    if value not in allowed:
        raise ValueError(f"unknown {kind} outcome {value!r}; expected one of {sorted(allowed)}")


class Metrics:
    """The daemon's metrics; thread-safe (prometheus_client locks each value)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._examples = Counter(
            "evertune_examples_ingested",
            "Examples stored from inbox files.",
            ["domain"],
            registry=r,
        )
        self._rejected = Counter(
            "evertune_examples_rejected",
            "Records refused at ingestion.",
            ["domain"],
            registry=r,
        )
        self._files = Counter(
            "evertune_files_ingested",
            "Inbox files taken, by outcome.",
            ["domain", "outcome"],
            registry=r,
        )
        self._runs = Counter(
            "evertune_training_runs",
            "Finished training cycles, by outcome.",
            ["domain", "outcome"],
            registry=r,
        )
        self._publishes = Counter(
            "evertune_publishes",
            "Publishes of a version to the serving side, by outcome.",
            ["domain", "outcome"],
            registry=r,
        )
        self._tokens_per_s = Gauge(
            "evertune_training_tokens_per_second",
            "Throughput of the domain's last run.",
            ["domain"],
            registry=r,
        )
        self._in_progress = Gauge(
            "evertune_training_in_progress",
            "1 while a run of the domain trains.",
            ["domain"],
            registry=r,
        )
        self._live = Gauge(
            "evertune_live_version",
            "Number of the live version (0: none).",
            ["domain"],
            registry=r,
        )
        self._up = Gauge(
            "evertune_vllm_up", "1 if the vLLM endpoint is healthy.", ["endpoint"], registry=r
        )
        self._loaded = Gauge(
            "evertune_adapters_loaded",
            "LoRA adapters loaded on the endpoint.",
            ["endpoint"],
            registry=r,
        )
        self._switch = Histogram(
            "evertune_adapter_switch_seconds",
            "One adapter load/unload on one endpoint.",
            buckets=SWITCH_BUCKETS,
            registry=r,
        )
        self._publish = Histogram(
            "evertune_publish_seconds",
            "One publish of a version to every endpoint.",
            buckets=PUBLISH_BUCKETS,
            registry=r,
        )
        self._training = Histogram(
            "evertune_training_seconds",
            "Wall time of one training run.",
            buckets=TRAINING_BUCKETS,
            registry=r,
        )

    def file_ingested(
        self, domain: str, outcome: str, examples: int = 0, rejected: int = 0
    ) -> None:
        """One inbox file was handled: `examples` stored, `rejected` records refused."""
        _check("file", outcome, FILE_OUTCOMES)
        self._files.labels(domain=domain, outcome=outcome).inc()
        self._examples.labels(domain=domain).inc(examples)
        self._rejected.labels(domain=domain).inc(rejected)

    def training(self, domain: str, active: bool) -> None:
        """A run of `domain` started (True) or ended (False)."""
        self._in_progress.labels(domain=domain).set(1 if active else 0)

    def run_finished(
        self,
        domain: str,
        outcome: str,
        seconds: float | None = None,
        tokens_per_s: float | None = None,
    ) -> None:
        """A training cycle ended; also clears `training_in_progress` for the domain."""
        _check("training run", outcome, RUN_OUTCOMES)
        self._runs.labels(domain=domain, outcome=outcome).inc()
        self._in_progress.labels(domain=domain).set(0)
        if seconds is not None:
            self._training.observe(seconds)
        if tokens_per_s is not None:
            self._tokens_per_s.labels(domain=domain).set(tokens_per_s)

    def set_live(self, domain: str, number: int | None) -> None:
        """The live version of `domain` is now v{number:04d} (None: no live version)."""
        self._live.labels(domain=domain).set(number or 0)

    def endpoint_state(self, url: str, up: bool, loaded: int | None = None) -> None:
        """Result of one health check of a vLLM endpoint (`loaded`: adapters it serves)."""
        self._up.labels(endpoint=url).set(1 if up else 0)
        if loaded is not None:
            self._loaded.labels(endpoint=url).set(loaded)

    def switch(self, seconds: float) -> None:
        """One adapter load or unload on one endpoint took `seconds`."""
        self._switch.observe(seconds)

    def published(self, domain: str, outcome: str, seconds: float | None = None) -> None:
        """A version of `domain` was published to the serving side (outcome ok/partial/failed)."""
        _check("publish", outcome, PUBLISH_OUTCOMES)
        self._publishes.labels(domain=domain, outcome=outcome).inc()
        if seconds is not None:
            self._publish.observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (content type: `CONTENT_TYPE`)."""
        return generate_latest(self.registry)
