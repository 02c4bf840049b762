"""Configuration: one TOML file -> small frozen dataclasses, one per concern, validated at load.

Every key has a default, so an empty file works. An unknown key or a bad value fails at load
with a message naming the key, the value and what is allowed. `starter_toml()` renders the
commented file that `evertune init` writes, from the same field definitions, so the file and
the code cannot disagree.

Finding the config and the home (ARCHITECTURE.md, "Config"): `--config FILE`, else
`$EVERTUNE_CONFIG`, else `<home>/evertune.toml` with home `$EVERTUNE_HOME` or
`./evertune-home`. The config's `home` key, when set, says where the state lives; otherwise
`$EVERTUNE_HOME`, else the config's folder.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evertune.daemon.config_learning import GateConfig, TrainConfig
from evertune.daemon.config_sections import (
    ControlConfig,
    IngestConfig,
    LogConfig,
    ModelConfig,
    RegistryConfig,
    ScheduleConfig,
    ServeConfig,
    WatchConfig,
)
from evertune.daemon.control.server import is_loopback
from evertune.daemon.errors import ConfigError

log = logging.getLogger(__name__)

CONFIG_NAME = "evertune.toml"
DEFAULT_HOME = "evertune-home"


@dataclass(frozen=True)
class Config:
    home: Path
    path: Path | None  # the file it was loaded from; None when no file exists yet
    ingest: IngestConfig = field(default_factory=IngestConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    log: LogConfig = field(default_factory=LogConfig)
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
    """The config file path (the file may not exist yet): ARCHITECTURE.md, "Config"."""
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
    if typ is float and not math.isfinite(value):  # NaN passes every comparison below
        raise ConfigError(
            f"{where}: {dotted} = {value!r} is not a finite number; allowed: {allowed}"
        )
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


def diff(old: Config, new: Config) -> list[str]:
    """'section.key: old -> new' for every key that differs."""
    out = []
    if old.home != new.home:
        out.append(f"home: {old.home} -> {new.home}")
    for section in SECTIONS:
        a, b = getattr(old, section), getattr(new, section)
        for f in dataclasses.fields(a):
            x, y = getattr(a, f.name), getattr(b, f.name)
            if x != y:
                out.append(f"{section}.{f.name}: {x!r} -> {y!r}")
    if old.domains != new.domains:
        out.append(f"domains: {sorted(old.domains)} -> {sorted(new.domains)}")
    return out


# Sections a running daemon cannot change: they name processes and sockets it already runs
# (the embedded vLLM and its endpoints, the control API's socket, the base model vLLM
# serves, the inbox watcher's timers), and so does `home`. Every other section applies at
# its next use: [train] and [gate] at the next training run, [registry] at the next publish,
# [ingest] at the next file, [schedule] and [domains] at once (the triggers planned again),
# [log] at once.
RESTART_SECTIONS = ("serve", "control", "model", "watch")
LIVE_SECTIONS = tuple(s for s in SECTIONS if s not in RESTART_SECTIONS)


def reload(current: Config) -> tuple[Config, list[str], list[str]]:
    """(the config to run with, the changes applied, the changes that need a restart), the
    file re-read; ConfigError when it does not load (the caller keeps `current`)."""
    path = current.path or locate(None)
    new = load(path)
    changed = diff(current, new)
    restart = [c for c in changed if c.split(":")[0].split(".")[0] in (*RESTART_SECTIONS, "home")]
    kept = {s: getattr(current, s) for s in RESTART_SECTIONS}
    applied = [c for c in changed if c not in restart]
    log.info(
        "config reloaded from %s: %s%s",
        path,
        ", ".join(applied) or "nothing changed",
        f"; needs a restart to apply: {', '.join(restart)}" if restart else "",
    )
    return dataclasses.replace(new, home=current.home, **kept), applied, restart


class ConfigSource:
    """The daemon's running configuration, and the one way its parts get it: each holds
    this object and reads `get()` when it acts, so a reload reaches every part at its next
    use, none keeps a copy of its own. A part that must act on a change (the scheduler
    plans its triggers again) `watch`es: it is called with the new configuration before
    that replaces the old, and may refuse it (ConfigError), which changes nothing. What a
    reload applies and what needs a restart: LIVE_SECTIONS, RESTART_SECTIONS."""

    def __init__(self, config: Config):
        self._config = config
        self._watchers: list[Callable[[Config], None]] = []
        self._lock = threading.Lock()

    def get(self) -> Config:
        return self._config

    def watch(self, on_change: Callable[[Config], None]) -> None:
        """`on_change(new)` before each replacement, in the order added; one that raises
        ConfigError refuses it and must have changed nothing (so it comes before any
        watcher that cannot refuse; today there is one, the scheduler)."""
        self._watchers.append(on_change)

    def replace(self, new: Config) -> None:
        with self._lock:
            for on_change in self._watchers:
                on_change(new)
            self._config = new

    def reload(self) -> tuple[list[str], list[str]]:
        """The file read again and applied: (the changes applied, those that need a restart,
        kept as they were). ConfigError when it does not load or a watcher refuses it: the
        running configuration stays whole."""
        new, applied, restart = reload(self._config)
        self.replace(new)
        return applied, restart
