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
