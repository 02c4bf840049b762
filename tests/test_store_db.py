"""The store file itself: WAL, migrations applied once even when processes start together."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from evertune.store.db import is_initialised, open_db
from evertune.store.schema import migrations


def test_processes_opening_a_new_store_together_apply_each_migration_once(tmp_path):
    path = tmp_path / "evertune.db"
    code = f"from evertune.store.db import open_db; open_db({str(path)!r}).close()"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE) for _ in range(4)
    ]
    for p in procs:
        assert p.wait(60) == 0, p.stderr.read().decode()
    db = open_db(path)
    applied = [m.name for m in migrations.applied(db)]
    assert applied == [m.name for m in migrations._migrations]
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reader_of_a_store_without_schema_sees_it_as_not_initialised(tmp_path):
    path = tmp_path / "evertune.db"
    sqlite3.connect(path).close()  # the file exists, nothing committed yet
    db = open_db(path, readonly=True)
    assert not is_initialised(db)
    open_db(path).close()
    assert is_initialised(db)


def test_reader_cannot_write(tmp_path):
    path = tmp_path / "evertune.db"
    open_db(path).close()
    db = open_db(path, readonly=True)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        db.execute("DELETE FROM files")


@pytest.fixture
def held(tmp_path, monkeypatch):
    """A store another process holds a write transaction on (a second connection does the
    same to SQLite), with the busy timeout cut to 0.3 s so the wait ends soon."""
    from evertune.store import db as db_mod

    path = tmp_path / "home" / "evertune.db"
    open_db(path).close()
    holder = sqlite3.connect(path)
    holder.execute("BEGIN IMMEDIATE")
    monkeypatch.setattr(db_mod, "BUSY_TIMEOUT_MS", 300)
    yield path
    holder.rollback()
    holder.close()


def test_a_locked_store_is_said_to_be_locked_never_to_be_moved_aside(held):
    """Issue 24: "not a usable evertune store (database is locked); move it aside and
    restart" -- following that advice starts from an empty store."""
    from evertune.store.errors import StoreError

    with pytest.raises(StoreError) as err:
        open_db(held)
    msg = str(err.value)
    assert str(held) in msg and "locked by another process" in msg
    assert "wait and retry" in msg and "fuser" in msg
    assert "move it aside" not in msg and "not a usable" not in msg


def test_cli_ingest_on_a_locked_store_says_locked_and_keeps_the_file(held, tmp_path, capsys):
    from helpers import CHAT

    from evertune.daemon.cli import main

    src = tmp_path / "facts.jsonl"
    src.write_text(CHAT % (1, 1))
    code = main(["--config", str(held.parent / "evertune.toml"), "init"])
    assert code == 0
    capsys.readouterr()
    code = main(
        ["--config", str(held.parent / "evertune.toml"), "ingest", str(src), "--domain", "x"]
    )
    err = capsys.readouterr().err
    assert code != 0 and str(held) in err and "locked by another process" in err, err
    assert "move it aside" not in err
    assert src.exists()


def test_a_damaged_store_is_named_with_the_safe_next_step(tmp_path, capsys):
    from evertune.daemon.cli import main
    from evertune.store.errors import StoreError

    home = tmp_path / "home"
    assert main(["--config", str(home / "evertune.toml"), "init"]) == 0
    path = home / "evertune.db"
    path.write_bytes(b"not a database, just bytes " * 200)
    with pytest.raises(StoreError) as err:
        open_db(path)
    assert str(path) in str(err.value) and "damaged" in str(err.value)
    assert "move the file aside" in str(err.value) and "locked" not in str(err.value)
    capsys.readouterr()
    assert main(["--config", str(home / "evertune.toml"), "status"]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "damaged" in err, err  # before: "wait and retry", no file
    assert "wait and retry" not in err
