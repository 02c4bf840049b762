"""The schema, as sqlite-utils migrations applied in order at every start.

Append new migrations at the end; never edit one that has shipped. Tables:

- files: every file dropped, one row per drop (a re-drop of the same content is a row
  with status 'duplicate' pointing at the first); where it went (done/ or rejected/).
- file_errors: the rejected records of a file (file, line, byte offset, reason), capped.
- examples: normalised examples, unique per (domain, content_hash), with their source; an
  example answering the same prompt as a newer one is superseded by it (m003).
- runs / versions / version_examples: training runs, adapter versions and which examples
  each version was trained on (filled by evertune.adapters).
- endpoint_models: what each serving endpoint actually serves (filled by the serving side).
- events: an append-only log of what the service did, for `status` and debugging.
- canaries: a share of a domain's requests sent to a version that is not live (m006).
- doc_checks: questions about a dropped document held out of training, for the gate (m007).
"""

from __future__ import annotations

import orjson
from sqlite_utils import Database, Migrations

MIGRATION_SET = "evertune"
migrations = Migrations(MIGRATION_SET)


@migrations()
def m001_files_and_examples(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE files (
            id INTEGER PRIMARY KEY,
            domain TEXT NOT NULL,
            name TEXT NOT NULL,              -- the name it was dropped with
            inbox_path TEXT NOT NULL,        -- where it was found
            stored_path TEXT NOT NULL,       -- where it is kept (done/ or rejected/)
            report_path TEXT NOT NULL,
            size INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('ingested', 'rejected', 'duplicate')),
            format TEXT,                     -- jsonl, json-array, csv, tsv, text
            records INTEGER NOT NULL DEFAULT 0,
            examples_added INTEGER NOT NULL DEFAULT 0,
            examples_duplicate INTEGER NOT NULL DEFAULT 0,
            records_rejected INTEGER NOT NULL DEFAULT 0,
            reason TEXT,                     -- why the whole file was rejected, if it was
            errors_by_reason TEXT,           -- JSON {reason: count}: every rejection counted
            duplicate_of INTEGER REFERENCES files(id),
            received_at TEXT NOT NULL,
            ingested_at TEXT NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX files_domain_sha ON files (domain, sha256)")
    db.execute("CREATE UNIQUE INDEX files_stored_path ON files (stored_path)")
    db.execute(
        """
        CREATE TABLE file_errors (
            id INTEGER PRIMARY KEY,
            file_id INTEGER NOT NULL REFERENCES files(id),
            line INTEGER,                    -- 1-based; NULL when the error is not on a line
            byte_offset INTEGER,
            reason TEXT NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX file_errors_file ON file_errors (file_id)")
    db.execute(
        """
        CREATE TABLE examples (
            id INTEGER PRIMARY KEY,
            domain TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('chat', 'text')),
            body TEXT NOT NULL,              -- chat: JSON list of messages; text: the text
            content_hash BLOB NOT NULL,      -- blake2b-128 of kind + body
            chars INTEGER NOT NULL,
            file_id INTEGER NOT NULL REFERENCES files(id),
            line INTEGER,                    -- (when: the file's ingested_at)
            first_version_id INTEGER         -- the first adapter version trained on it
        )
        """
    )
    db.execute("CREATE UNIQUE INDEX examples_domain_hash ON examples (domain, content_hash)")
    db.execute("CREATE INDEX examples_domain_new ON examples (domain, first_version_id)")


@migrations()
def m002_runs_versions_events(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            domain TEXT NOT NULL,
            state TEXT NOT NULL,             -- queued, running, succeeded, failed, cancelled
            trigger TEXT NOT NULL,           -- schedule, manual, retry
            parent_version_id INTEGER REFERENCES versions(id),
            version_id INTEGER REFERENCES versions(id),
            step INTEGER NOT NULL DEFAULT 0,
            steps INTEGER NOT NULL DEFAULT 0,
            progress TEXT,                   -- JSON: loss, tokens/s, eta
            error TEXT,
            pid INTEGER,
            queued_at TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT
        )
        """
    )
    db.execute("CREATE INDEX runs_domain_state ON runs (domain, state)")
    db.execute(
        """
        CREATE TABLE versions (
            id INTEGER PRIMARY KEY,
            domain TEXT NOT NULL,
            number INTEGER NOT NULL,
            state TEXT NOT NULL CHECK (state IN
                ('training', 'candidate', 'live', 'rejected', 'retired')),
            parent_id INTEGER REFERENCES versions(id),
            run_id INTEGER REFERENCES runs(id),
            path TEXT NOT NULL,
            pinned INTEGER NOT NULL DEFAULT 0,
            examples INTEGER NOT NULL DEFAULT 0,
            metrics TEXT,                    -- JSON
            reason TEXT,                     -- why it was rejected or retired
            created_at TEXT NOT NULL,
            promoted_at TEXT,
            UNIQUE (domain, number)
        )
        """
    )
    # Exactly one live version per domain, enforced by the database itself.
    db.execute("CREATE UNIQUE INDEX versions_one_live ON versions (domain) WHERE state = 'live'")
    db.execute(
        """
        CREATE TABLE version_examples (
            version_id INTEGER NOT NULL REFERENCES versions(id),
            example_id INTEGER NOT NULL REFERENCES examples(id),
            role TEXT NOT NULL CHECK (role IN ('new', 'replay', 'heldout')),
            PRIMARY KEY (version_id, example_id)
        ) WITHOUT ROWID
        """
    )
    db.execute(
        """
        CREATE TABLE endpoint_models (
            endpoint TEXT NOT NULL,
            model TEXT NOT NULL,             -- served name: '<domain>' or '<domain>@v0007'
            version_id INTEGER NOT NULL REFERENCES versions(id),
            loaded_at TEXT NOT NULL,
            PRIMARY KEY (endpoint, model)
        )
        """
    )
    db.execute(
        """
        CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            ts TEXT NOT NULL,
            level TEXT NOT NULL,
            domain TEXT,
            kind TEXT NOT NULL,
            message TEXT NOT NULL,
            data TEXT                        -- JSON
        )
        """
    )
    db.execute("CREATE INDEX events_domain_ts ON events (domain, ts)")


@migrations()
def m003_superseded_and_forgotten(db: Database) -> None:
    """A newer answer to the same prompt supersedes the older example (kept, never trained
    on again). prompt_hash: blake2b-128 of the conversation before the last assistant turn
    (store.formats.prompt_hash); NULL for text examples. Rows already stored get theirs
    here, and the latest (file, line) of each prompt supersedes the others."""
    from evertune.store.formats import prompt_hash

    db.execute("ALTER TABLE examples ADD COLUMN prompt_hash BLOB")
    db.execute("ALTER TABLE examples ADD COLUMN superseded_by INTEGER REFERENCES examples(id)")
    # per file: older examples its answers superseded, superseded ones it brought back
    db.execute("ALTER TABLE files ADD COLUMN examples_superseded INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE files ADD COLUMN examples_reinstated INTEGER NOT NULL DEFAULT 0")
    # `evertune forget`: examples of the file removed; versions trained on removed examples
    db.execute("ALTER TABLE files ADD COLUMN examples_forgotten INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE versions ADD COLUMN forgotten INTEGER NOT NULL DEFAULT 0")
    rows = db.execute("SELECT id, body FROM examples WHERE kind = 'chat'").fetchall()
    db.conn.executemany(
        "UPDATE examples SET prompt_hash = ? WHERE id = ?",
        [(prompt_hash(orjson.loads(body)), i) for i, body in rows],
    )
    db.execute("CREATE INDEX examples_domain_prompt ON examples (domain, prompt_hash)")
    db.execute(
        """
        UPDATE examples SET superseded_by = w.id
        FROM (
            SELECT domain, prompt_hash, id FROM (
                SELECT domain, prompt_hash, id, row_number() OVER (
                    PARTITION BY domain, prompt_hash ORDER BY file_id DESC, line DESC, id DESC
                ) AS rn
                FROM examples WHERE prompt_hash IS NOT NULL
            ) WHERE rn = 1
        ) AS w
        WHERE examples.domain = w.domain AND examples.prompt_hash = w.prompt_hash
            AND examples.id != w.id
        """
    )


RUN_STATES = ("queued", "running", "succeeded", "failed", "cancelled", "skipped")
# run state -> the states it may become (store.runs makes every transition)
RUN_TRANSITIONS = {
    "queued": ("running", "cancelled", "skipped", "failed"),
    "running": ("succeeded", "failed", "cancelled", "skipped"),
}


@migrations()
def m004_run_states(db: Database) -> None:
    """The runs state machine in the database itself: a state outside RUN_STATES, or a
    change RUN_TRANSITIONS does not allow (a finished run started again, a queued one
    succeeding without having run), is refused by the statement that tries it. (Triggers:
    SQLite adds no CHECK constraint to an existing table without rebuilding it.)"""
    states = ", ".join(f"'{s}'" for s in RUN_STATES)
    db.execute(
        f"""
        CREATE TRIGGER runs_state_known BEFORE INSERT ON runs WHEN NEW.state NOT IN ({states})
        BEGIN SELECT RAISE(ABORT, 'runs.state must be one of {", ".join(RUN_STATES)}'); END
        """
    )
    allowed = " OR ".join(
        f"(OLD.state = '{a}' AND NEW.state IN ({', '.join(repr(b) for b in bs)}))"
        for a, bs in RUN_TRANSITIONS.items()
    )
    db.execute(
        f"""
        CREATE TRIGGER runs_state_transition BEFORE UPDATE OF state ON runs
        WHEN NEW.state != OLD.state AND NOT ({allowed})
        BEGIN SELECT RAISE(ABORT, 'runs.state: not a run transition'); END
        """
    )


@migrations()
def m005_questions_normalised(db: Database) -> None:
    """prompt_hash becomes the hash of the question (store.formats.prompt_hash: no system
    prompt, whitespace collapsed, case folded; it was the exact prompt), so that supersede
    and `evertune forget` match a question however a file framed it (issue 24). Stored rows
    get theirs here, and each question's latest answer (file, line) supersedes the current
    answers of other files, as an ingest now would."""
    from evertune.store.formats import prompt_hash

    rows = db.execute("SELECT id, body FROM examples WHERE kind = 'chat'").fetchall()
    db.conn.executemany(
        "UPDATE examples SET prompt_hash = ? WHERE id = ?",
        [(prompt_hash(orjson.loads(body)), i) for i, body in rows],
    )
    db.execute(
        """
        UPDATE examples SET superseded_by = w.id
        FROM (
            SELECT domain, prompt_hash, id, file_id FROM (
                SELECT domain, prompt_hash, id, file_id, row_number() OVER (
                    PARTITION BY domain, prompt_hash ORDER BY file_id DESC, line DESC, id DESC
                ) AS rn
                FROM examples WHERE prompt_hash IS NOT NULL AND superseded_by IS NULL
            ) WHERE rn = 1
        ) AS w
        WHERE examples.domain = w.domain AND examples.prompt_hash = w.prompt_hash
            AND examples.file_id != w.file_id AND examples.superseded_by IS NULL
        """
    )


@migrations()
def m006_canaries(db: Database) -> None:
    """A canary: a share of a domain's stable-name requests routed to a version that is not
    live (evertune.daemon.serving.routing), until it is promoted or rolled back, by command or when
    `promote_at` passes (NULL: by command only). One per domain."""
    db.execute(
        """
        CREATE TABLE canaries (
            domain TEXT PRIMARY KEY,
            version_id INTEGER NOT NULL REFERENCES versions(id),
            percent REAL NOT NULL CHECK (percent > 0 AND percent <= 100),
            started_at TEXT NOT NULL,
            promote_at TEXT
        )
        """
    )


@migrations()
def m007_documents_derived(db: Database) -> None:
    """Documents become questions (store.knowledge): the question-and-answer examples derived
    from a dropped document are stored as chat examples of that file (its line: the
    statement's), marked `derived`; one question per statement is held out, never trained
    on, in doc_checks: the gate asks them to tell whether the document can be answered
    about."""
    db.execute("ALTER TABLE examples ADD COLUMN derived INTEGER NOT NULL DEFAULT 0")
    db.execute(
        """
        CREATE TABLE doc_checks (
            id INTEGER PRIMARY KEY,
            domain TEXT NOT NULL,
            file_id INTEGER NOT NULL REFERENCES files(id),
            line INTEGER,
            question TEXT NOT NULL,
            answer TEXT NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX doc_checks_domain ON doc_checks (domain, file_id)")


@migrations()
def m008_text_chunks_findable(db: Database) -> None:
    """A text chunk's prompt_hash is the hash of its words (store.formats.text_hash), so that
    `evertune forget --file DOCUMENT` finds the document's chunks (it found none: a forgotten
    document stayed in the training set)."""
    from evertune.store.formats import text_hash

    rows = db.execute("SELECT id, body FROM examples WHERE kind = 'text'").fetchall()
    db.conn.executemany(
        "UPDATE examples SET prompt_hash = ? WHERE id = ?", [(text_hash(b), i) for i, b in rows]
    )


# Why a version is `rejected` (never served): refused by the gate, its training failed or was
# cancelled, the daemon was killed while it trained or was published (interrupted), it
# passed the gate but could not be served (unservable), or its canary was rolled back.
REJECTED_OUTCOMES = ("refused", "failed", "cancelled", "interrupted", "unservable", "rolled_back")


@migrations()
def m009_version_outcomes(db: Database) -> None:
    """versions.outcome: which of REJECTED_OUTCOMES a rejected version is (before: only in
    the wording of its reason), set for every rejected version and for no other, enforced by
    triggers as the run states are. Existing rows are classified from their reasons, as the
    code of the time wrote them."""
    db.execute("ALTER TABLE versions ADD COLUMN outcome TEXT")
    db.execute(
        """
        UPDATE versions SET outcome = CASE
            WHEN reason LIKE 'training failed:%' THEN 'failed'
            WHEN reason LIKE 'training cancelled:%' THEN 'cancelled'
            WHEN reason LIKE '% was interrupted' THEN 'interrupted'
            WHEN reason LIKE 'passed the gate but could not be served%' THEN 'unservable'
            WHEN reason LIKE 'canary rolled back%' THEN 'rolled_back'
            ELSE 'refused' END
        WHERE state = 'rejected'
        """
    )
    outcomes = ", ".join(f"'{o}'" for o in REJECTED_OUTCOMES)
    check = (
        f"(NEW.state = 'rejected' AND (NEW.outcome IS NULL OR NEW.outcome NOT IN ({outcomes})))"
        " OR (NEW.state != 'rejected' AND NEW.outcome IS NOT NULL)"
    )
    message = f"versions.outcome: one of {', '.join(REJECTED_OUTCOMES)} when rejected, else null"
    for event in ("INSERT", "UPDATE"):
        db.execute(
            f"""
            CREATE TRIGGER versions_outcome_{event.lower()} BEFORE {event} ON versions
            WHEN {check}
            BEGIN SELECT RAISE(ABORT, '{message}'); END
            """
        )


@migrations()
def m010_version_lineage(db: Database) -> None:
    """versions.from_base: 1 when the version was trained from the base model's weights (a
    first version, a rebuild), 0 when from its parent's (an increment). `forget` decides
    from it which versions learned what an earlier one did; it read each version's
    meta.json, which retention deletes. Existing rows: from their meta.json where it is
    still there, else NULL (unknown: forget assumes an increment)."""
    import json
    from pathlib import Path

    db.execute("ALTER TABLE versions ADD COLUMN from_base INTEGER")
    for vid, path in db.execute("SELECT id, path FROM versions").fetchall():
        try:
            meta = json.loads((Path(path) / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        parent = meta.get("train", {}).get("parent_adapter")
        db.execute("UPDATE versions SET from_base = ? WHERE id = ?", [int(parent is None), vid])
