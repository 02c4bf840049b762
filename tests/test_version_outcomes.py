"""Why a version is rejected is a state of its own (versions.outcome, m009): enforced by the
database, migrated from the reasons an existing home recorded, shown by `versions`, and
only a version the gate refused (or a rolled-back canary) holds its examples back."""

from __future__ import annotations

import sqlite3

import pytest
from helpers import stored_examples
from sqlite_utils import Database

from evertune.store import examples, runs, versions
from evertune.store.db import write_transaction
from evertune.store.errors import RegistryError
from evertune.store.schema import migrations

REASONS = {
    "learned 40% of the new short answers (needs 80%, gate.min_learned)": "refused",
    "training failed: the child exited with code 1": "failed",
    "training cancelled: cancelled at step 3 of 40": "cancelled",
    "training was interrupted": "interrupted",
    "publishing was interrupted": "interrupted",
    "passed the gate but could not be served: vLLM refused the adapter": "unservable",
    "canary rolled back: 2 of 10 requests failed": "rolled_back",
}


def test_an_existing_homes_rejected_versions_are_classified_from_their_reasons(tmp_path):
    db = Database(tmp_path / "old.db")
    migrations.apply(db, stop_before="m009_version_outcomes")  # a home of the last release
    for n, reason in enumerate([*REASONS, None], start=1):
        db.execute(
            "INSERT INTO versions (domain, number, state, path, reason, created_at)"
            " VALUES ('legal', ?, ?, '/x', ?, '2026-12-01')",
            [n, "rejected" if reason else "live", reason],
        )
    migrations.apply(db)
    got = dict(db.execute("SELECT reason, outcome FROM versions").fetchall())
    assert got == {**REASONS, None: None}


@pytest.mark.parametrize(
    ("state", "outcome"),
    [("rejected", None), ("rejected", "declined"), ("live", "refused"), ("candidate", "failed")],
)
def test_the_database_refuses_an_outcome_that_does_not_fit_the_state(db, state, outcome):
    with pytest.raises(sqlite3.IntegrityError, match=r"versions\.outcome"):
        db.execute(
            "INSERT INTO versions (domain, number, state, path, created_at, outcome)"
            " VALUES ('legal', 1, ?, '/x', '2026-12-01', ?)",
            [state, outcome],
        )


def test_set_state_cannot_reject_without_an_outcome(db):
    db.execute(
        "INSERT INTO versions (domain, number, state, path, created_at)"
        " VALUES ('legal', 1, 'training', '/x', '2026-12-01')"
    )
    v = versions.list_versions(db, "legal")[0]
    with pytest.raises(RegistryError, match=r"versions\.reject"):
        versions.set_state(db, v, "rejected", reason="drift")
    assert versions.reject(db, v, "refused", "drift").outcome == "refused"


@pytest.mark.parametrize(
    ("outcome", "fresh"),
    [("refused", 0), ("rolled_back", 0), ("failed", 2), ("cancelled", 2), ("interrupted", 2)],
)
def test_only_a_refused_versions_examples_wait_for_new_data(db, layout, outcome, fresh):
    """The examples of a run the daemon's death cut short count as new again: the catch-up
    at the next start trains them (it counts fresh examples). Before, every rejected
    version's examples waited for new data, a crash's as well as a refusal's."""
    stored_examples(db, {1: None, 2: None})
    run_id = runs.queue(db, "legal", "drop")
    v = versions.reserve(db, "legal", run_id, None, lambda n: layout.adapters / f"v{n}")
    ids = [1, 2]
    versions.record_examples(db, v, ids, [], [])
    versions.reject(db, v, outcome, "why")
    assert examples.fresh_count(db, "legal") == fresh


def test_forget_reads_lineage_from_the_database_after_retention_deleted_the_folders(db, layout):
    """v1 (from the base) learned Y, v2 (an increment of v1) learned X, v3 (a rebuild from
    the base, compared with v2) learned Y again; retention deleted v2's and v3's folders.
    Forgetting X retires v2 only: v3 never held v2's weights. Before, forget read lineage
    from meta.json and, with the folder gone, assumed v3 was an increment of v2."""
    from evertune.daemon.training.forget import forget

    stored_examples(db, {1: b"x", 2: b"y"})
    made, parent = [], None
    for learned, from_base in (([2], True), ([1], False), ([2], True)):
        v = versions.reserve(
            db, "legal", None, parent, lambda n: layout.adapters / f"v{n}", from_base
        )
        versions.record_examples(db, v, learned, [], [])
        versions.set_state(db, v, "retired")
        made.append(v)
        parent = v.id
    with write_transaction(db):
        db.execute("UPDATE versions SET state = 'live' WHERE id = ?", [made[-1].id])
    assert not any((layout.adapters / f"v{n}").exists() for n in (1, 2, 3))  # no folders
    out = forget(db, "legal", [b"x"], None)
    assert out.versions == ["v0002"]
    assert out.live_before == out.live_now == "v0003"
