"""Config: defaults, validation messages, how the file and the home are found, `init`."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from evertune.daemon import config
from evertune.daemon.cli import init_home
from evertune.daemon.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "evertune.toml"
    path.write_text(text)
    return path


def test_empty_file_gives_every_default(tmp_path):
    cfg = config.load(write(tmp_path, ""), env={})
    assert cfg.home == tmp_path
    assert cfg.ingest == config.IngestConfig()
    assert cfg.watch.settle_seconds == 0.5


def test_unknown_section_key_names_the_key_and_the_allowed_ones(tmp_path):
    path = write(tmp_path, "[ingest]\nmax_chars = 5\n")
    with pytest.raises(ConfigError) as err:
        config.load(path, env={})
    assert "ingest.max_chars" in str(err.value)
    assert "max_example_chars" in str(err.value)
    assert str(path) in str(err.value)


def test_unknown_top_level_key_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'trainer'"):
        config.load(write(tmp_path, "[trainer]\nx = 1\n"), env={})


def test_out_of_range_value_names_key_value_and_range(tmp_path):
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, "[watch]\nsettle_seconds = -1\n"), env={})
    msg = str(err.value)
    assert "watch.settle_seconds = -1" in msg and "from 0.0 to 3600" in msg


def test_wrong_type_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"ingest\.max_example_chars = 'big' has the wrong type"):
        config.load(write(tmp_path, '[ingest]\nmax_example_chars = "big"\n'), env={})


def test_choice_value_lists_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="'debug', 'info', 'warning', 'error'"):
        config.load(write(tmp_path, '[log]\nlevel = "loud"\n'), env={})


def test_bad_toml_says_where(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "[ingest\n"), env={})


def test_missing_explicit_config_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        config.load(tmp_path / "nope.toml", env={})


def test_relative_home_key_is_relative_to_the_config_file(tmp_path):
    cfg = config.load(write(tmp_path, 'home = "state"\n'), env={})
    assert cfg.home == tmp_path / "state"


def test_config_is_found_through_evertune_home(tmp_path):
    env = {"EVERTUNE_HOME": str(tmp_path / "h")}
    assert config.locate(None, env) == tmp_path / "h" / "evertune.toml"
    cfg = config.load(None, env)
    assert cfg.home == tmp_path / "h" and cfg.path is None


def test_evertune_config_wins_over_evertune_home_and_home_env_is_the_default_home(tmp_path):
    path = write(tmp_path, "")
    env = {"EVERTUNE_CONFIG": str(path), "EVERTUNE_HOME": str(tmp_path / "state")}
    cfg = config.load(None, env)
    assert cfg.path == path and cfg.home == tmp_path / "state"


def test_starter_file_parses_to_the_defaults_and_documents_every_key(tmp_path):
    text = config.starter_toml()
    # every key is commented out: only the (empty) section headers remain
    assert all(v == {} for v in tomllib.loads(text).values())
    for section, cls in config.SECTIONS.items():
        assert f"[{section}]" in text
        for name in cls.__dataclass_fields__:
            assert f"# {name} = " in text
    uncommented = "\n".join(
        line[2:] if line.startswith("# ") and " = " in line else line
        for line in text.splitlines()
        if not line.startswith("# home")
    )
    cfg = config.parse(tomllib.loads(uncommented), None, default_home=tmp_path, env={})
    for section, cls in config.SECTIONS.items():
        assert getattr(cfg, section) == cls(), section


def test_init_is_idempotent_and_never_overwrites(tmp_path):
    path = tmp_path / "home" / "evertune.toml"
    assert init_home(path) is True
    assert (tmp_path / "home" / "inbox").is_dir()
    path.write_text("[watch]\nsettle_seconds = 2\n")
    assert init_home(path) is False
    assert path.read_text() == "[watch]\nsettle_seconds = 2\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[serve]\nmode = "external"\n', "serve.mode = 'external' needs serve.urls"),
        ('[serve]\nmode = "external"\nurls = ["gpu1:8000"]\n', "give base URLs like"),
        ("[serve]\nurls = 'http://a'\n", "serve.urls = 'http://a' must be a list of strings"),
        ("[train]\nrank = 32\n", "train.rank = 32 is above serve.max_lora_rank = 16"),
        ('[schedule]\ncron = "every night"\n', "schedule.cron = 'every night' is not a crontab"),
        ("[domains.Legal]\nquiet_seconds = 1\n", "'Legal' is not a valid domain name"),
        ('[domains.legal]\ncron = "61 * * * *"\n', "domains.legal.cron = '61 * * * *'"),
        ("[domains.legal]\nspeed = 1\n", "unknown key 'domains.legal.speed'"),
        ('[control]\nhost = "0.0.0.0"\n', "loopback only"),
    ],
)
def test_rules_across_keys_are_checked_at_load(tmp_path, text, message):
    path = tmp_path / "evertune.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.load(path, env={})


def test_a_domain_table_overrides_schedule_keys_for_that_domain_only(tmp_path):
    path = tmp_path / "evertune.toml"
    path.write_text(
        "[schedule]\nquiet_seconds = 10\nmin_new_examples = 5\n"
        '[domains.legal]\ncron = "0 3 * * *"\non_drop = false\n'
    )
    cfg = config.load(path, env={})
    legal, other = cfg.schedule_for("legal"), cfg.schedule_for("faq")
    assert (legal.cron, legal.on_drop, legal.quiet_seconds, legal.min_new_examples) == (
        "0 3 * * *",
        False,
        10,
        5,
    )
    assert (other.cron, other.on_drop, other.min_new_examples) == ("", True, 5)
    path.write_text('[serve]\nmode = "external"\nurls = ["http://10.0.0.5:8000"]\n')
    assert config.load(path, env={}).serve.urls == ("http://10.0.0.5:8000",)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::", "example.org"])
def test_the_embedded_server_stays_on_loopback(tmp_path, host):
    path = tmp_path / "evertune.toml"
    path.write_text(f'[serve]\nhost = "{host}"\n')
    with pytest.raises(ConfigError, match="would open the embedded vLLM server"):
        config.load(path)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_hosts_are_fine(tmp_path, host):
    path = tmp_path / "evertune.toml"
    path.write_text(f'[serve]\nhost = "{host}"\n')
    assert config.load(path).serve.host == host


def _numeric_keys() -> list[tuple[str, str, type]]:
    import dataclasses
    import typing

    out = []
    for section, cls in config.SECTIONS.items():
        hints = typing.get_type_hints(cls)
        out += [
            (section, f.name, hints[f.name])
            for f in dataclasses.fields(cls)
            if hints[f.name] in (int, float)
        ]
    return out


NUMERIC_KEYS = _numeric_keys()
FLOAT_KEYS = [(s, k) for s, k, t in NUMERIC_KEYS if t is float]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-nan", "+inf"])
@pytest.mark.parametrize(("section", "name"), FLOAT_KEYS)
def test_a_number_that_is_not_finite_is_refused_naming_file_key_value_and_range(
    tmp_path, section, name, value
):
    """NaN compares false with every bound, so it passed every range check (issue 24)."""
    path = write(tmp_path, f"[{section}]\n{name} = {value}\n")
    with pytest.raises(ConfigError) as err:
        config.load(path, env={})
    msg = str(err.value)
    shown = {"-nan": "nan", "+inf": "inf"}.get(value, value)
    assert str(path) in msg and f"{section}.{name} = {shown} is" in msg
    assert "not a finite number" in msg and " from " in msg and " to " in msg


def test_a_domain_override_that_is_not_finite_is_refused(tmp_path):
    path = write(tmp_path, "[domains.legal]\ninterval_minutes = nan\n")
    with pytest.raises(ConfigError) as err:
        config.load(path, env={})
    msg = str(err.value)
    assert str(path) in msg and "domains.legal.interval_minutes = nan" in msg
    assert "not a finite number" in msg and "from 0 to 1000000" in msg


@pytest.mark.parametrize(("section", "name", "typ"), NUMERIC_KEYS)
def test_every_number_has_a_range_and_a_value_above_it_is_refused(tmp_path, section, name, typ):
    field = config.SECTIONS[section].__dataclass_fields__[name]
    lo, hi = field.metadata["min"], field.metadata["max"]
    assert lo is not None and hi is not None, f"{section}.{name} has no range"
    too_big = int(hi) + 1 if typ is int else float(hi) * 2 + 1
    path = write(tmp_path, f"[{section}]\n{name} = {too_big}\n")
    with pytest.raises(ConfigError, match=rf"{section}\.{name} = .* is out of range; allowed: "):
        config.load(path, env={})
