"""The runs state machine (store/runs.py), enforced by the database itself (schema m004)."""

from __future__ import annotations

import sqlite3

import pytest
from helpers import stored_examples

from evertune.store import examples, runs, versions
from evertune.store.db import write_transaction


def test_a_run_goes_queued_running_succeeded(db):
    run_id = runs.queue(db, "legal", "drop")
    assert runs.get(db, run_id)["state"] == "queued"
    runs.start(db, run_id, None)
    runs.progress(db, run_id, 3, 10, {"loss": 1.5, "tokens_per_s": 300.0})
    got = runs.get(db, run_id)
    assert (got["state"], got["step"], got["steps"]) == ("running", 3, 10)
    assert got["progress"] == {"loss": 1.5, "tokens_per_s": 300.0}
    runs.finish(db, run_id, "succeeded")
    assert runs.get(db, run_id)["state"] == "succeeded"
    assert runs.count(db, "legal") == 1 and runs.count(db, "faq") == 0


@pytest.mark.parametrize(
    ("path", "refused"),
    [
        (["running", "succeeded", "running"], "running"),  # a finished run never restarts
        (["succeeded"], "succeeded"),  # succeeding without having run
        (["cancelled", "queued"], "queued"),
        (["running", "failed", "succeeded"], "succeeded"),
    ],
)
def test_the_database_refuses_what_is_not_a_run_transition(db, path, refused):
    run_id = runs.queue(db, "legal", "manual")
    for state in path[:-1]:
        with write_transaction(db):
            db.execute("UPDATE runs SET state = ? WHERE id = ?", [state, run_id])
    with pytest.raises(sqlite3.IntegrityError, match="not a run transition"), write_transaction(db):
        db.execute("UPDATE runs SET state = ? WHERE id = ?", [refused, run_id])
    assert runs.get(db, run_id)["state"] == (["queued", *path[:-1]])[-1]  # unchanged


def test_the_database_refuses_an_unknown_state(db):
    with pytest.raises(sqlite3.IntegrityError, match="must be one of"), write_transaction(db):
        db.execute(
            "INSERT INTO runs (domain, state, trigger, queued_at) VALUES ('x', 'done', 'm', '')"
        )


def test_closing_leaves_a_finished_run_alone(db):
    done, open_ = runs.queue(db, "legal", "drop"), runs.queue(db, "faq", "drop")
    runs.start(db, done, None)
    runs.finish(db, done, "succeeded")
    runs.close_if_open(db, done, "failed", "late")
    runs.close_if_open(db, open_, "skipped", "nothing new")
    assert runs.get(db, done)["state"] == "succeeded" and runs.get(db, done)["error"] is None
    assert (runs.get(db, open_)["state"], runs.get(db, open_)["error"]) == (
        "skipped",
        "nothing new",
    )


def test_start_up_cancels_the_queued_and_fails_the_interrupted(db):
    queued, running = runs.queue(db, "legal", "drop"), runs.queue(db, "faq", "drop")
    runs.start(db, running, None)
    runs.cancel_queued(db)
    runs.fail_interrupted(db)
    assert runs.get(db, queued)["state"] == "cancelled"
    assert (runs.get(db, running)["state"], runs.get(db, running)["error"]) == (
        "failed",
        "interrupted",
    )


def test_fresh_examples_leave_out_what_a_refused_candidate_tried(db, layout):
    """One definition of "not yet trained on", shared by the scheduler and `status`."""
    from evertune.store.queries import domain_summary

    stored_examples(db, {1: None, 2: None, 3: None})
    run_id = runs.queue(db, "legal", "drop")
    v = versions.reserve(db, "legal", run_id, None, lambda n: layout.adapters / f"v{n}")
    versions.record_examples(db, v, [1], [], [])
    assert examples.fresh_count(db, "legal") == 3  # the candidate is still being decided
    versions.reject(db, v, "refused", "drift")
    assert examples.fresh_count(db, "legal") == 2
    summary = domain_summary(db, "legal")
    assert (summary["examples_new"], summary["examples_refused"]) == (2, 1)
