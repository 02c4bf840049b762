"""Shared fixtures: a real home folder and a real SQLite file per test; no leaked threads."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from evertune.store.db import open_db
from evertune.store.layout import HomeLayout


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
    leaked = [
        t
        for t in threading.enumerate()
        if t not in before and t.is_alive() and not t.name.startswith("ThreadPoolExecutor")
    ]
    for t in leaked:
        t.join(5)
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"threads left running: {still}"
