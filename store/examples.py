"""Which stored examples a training run uses: the queries behind data selection.

Fresh (what the next run learns, what `status` counts as "not yet trained on" and what the
scheduler waits for): current examples no version was trained on and no refused candidate
already tried (its data would only be refused again; new data or `train --force` retries
it; `status` shows those apart, as "refused").
"""

from __future__ import annotations

import json

import orjson
from sqlite_utils import Database

from evertune.store.db import write_transaction
from evertune.store.formats import asked_hashes

CURRENT = "superseded_by IS NULL"  # no newer answer to its prompt superseded it
UNTRAINED = f"first_version_id IS NULL AND {CURRENT}"
_TRIED_BY_REFUSED = (
    "EXISTS (SELECT 1 FROM version_examples ve JOIN versions v ON v.id = ve.version_id"
    " WHERE ve.example_id = examples.id AND ve.role = 'new' AND v.state = 'rejected'"
    # refused by the gate, or rolled back: not a run that failed, was cancelled or cut short
    # (its examples are still to be trained: a restart's catch-up must count them)
    " AND v.outcome IN ('refused', 'rolled_back'))"
)
FRESH = f"{UNTRAINED} AND NOT {_TRIED_BY_REFUSED}"
REFUSED = f"{UNTRAINED} AND {_TRIED_BY_REFUSED}"


def fresh_count(db: Database, domain: str) -> int:
    (n,) = db.execute(
        f"SELECT count(*) FROM examples WHERE domain = ? AND {FRESH}", [domain]
    ).fetchone()
    return n


def domains(db: Database) -> list[str]:
    """Domains with stored examples."""
    return [d for (d,) in db.execute("SELECT DISTINCT domain FROM examples ORDER BY domain")]


def rows(db: Database, domain: str, which: str) -> list[tuple[int, str, str]]:
    """(id, kind, body) in id order: "untrained" (current, no version learned them yet,
    tried by a refused candidate or not), "trained" (current, learned by a version) or
    "current" (every example no newer answer superseded)."""
    where = {
        "untrained": UNTRAINED,
        "trained": f"first_version_id IS NOT NULL AND {CURRENT}",
        "current": CURRENT,
    }[which]
    return db.execute(
        f"SELECT id, kind, body FROM examples WHERE domain = ? AND {where} ORDER BY id", [domain]
    ).fetchall()


def learned_answers_replaced(db: Database, domain: str, ids: list[int]) -> list[tuple[int, str]]:
    """(id, body of an older answer to its prompt that a version was trained on) for the
    examples `ids`, oldest answer first."""
    return db.execute(
        "SELECT n.id, o.body FROM examples n JOIN examples o ON o.domain = n.domain"
        " AND o.prompt_hash = n.prompt_hash AND o.id != n.id"
        " AND o.first_version_id IS NOT NULL"
        " WHERE n.domain = ? AND n.id IN (SELECT value FROM json_each(?)) ORDER BY o.id",
        [domain, json.dumps(ids)],
    ).fetchall()


def bodies(db: Database, ids: list[int]) -> list[tuple[int, str]]:
    return db.execute(
        "SELECT id, body FROM examples WHERE id IN (SELECT value FROM json_each(?))",
        [json.dumps(ids)],
    ).fetchall()


def answering(db: Database, domain: str, hashes: list[bytes]) -> list[int]:
    """Ids of the domain's examples asking one of the questions (store.formats.prompt_hash:
    under any system prompt, in any format or spelling), superseded ones too, and of every
    conversation that asks one of them in one of its turns, in id order."""
    ids: set[int] = set()
    for i in range(0, len(hashes), 10_000):
        chunk = hashes[i : i + 10_000]
        ids.update(
            r[0]
            for r in db.execute(
                f"SELECT id FROM examples WHERE domain = ? AND prompt_hash IN"
                f" ({','.join('?' * len(chunk))})",
                [domain, *chunk],
            )
        )
    wanted = set(hashes)
    # a question asked in the middle of a conversation: each user turn, asked alone
    for i, body in db.execute(
        "SELECT id, body FROM examples WHERE domain = ? AND kind = 'chat'"
        " AND json_array_length(body) > 3",
        [domain],
    ):
        if i not in ids and asked_hashes(orjson.loads(body)) & wanted:
            ids.add(i)
    return sorted(ids)


def described(db: Database, ids: list[int]) -> list[tuple[str, int | None, str, str]]:
    """(the dropped file's name, line, kind, body) of each example, in file and line order."""
    return db.execute(
        "SELECT f.name, e.line, e.kind, e.body FROM examples e JOIN files f ON f.id = e.file_id"
        " WHERE e.id IN (SELECT value FROM json_each(?)) ORDER BY f.id, e.line",
        [json.dumps(ids)],
    ).fetchall()


def files_of(db: Database, ids: list[int]) -> list[tuple[int, str, int]]:
    """(file id, stored path, how many of `ids` came from it) per file."""
    return db.execute(
        "SELECT f.id, f.stored_path, count(*) FROM examples e JOIN files f ON f.id = e.file_id"
        " WHERE e.id IN (SELECT value FROM json_each(?)) GROUP BY f.id",
        [json.dumps(ids)],
    ).fetchall()


def delete(db: Database, ids: list[int]) -> None:
    """Forget: the examples gone (what they superseded current again, unless it is gone too),
    which versions used them gone with them, and each file's row counting what it lost."""
    id_list = json.dumps(ids)
    with write_transaction(db):
        per_file = [(n, fid) for fid, _, n in files_of(db, ids)]
        db.execute(
            "UPDATE examples SET superseded_by = NULL WHERE superseded_by IN"
            " (SELECT value FROM json_each(?))",
            [id_list],
        )
        db.execute(
            "DELETE FROM version_examples WHERE example_id IN (SELECT value FROM json_each(?))",
            [id_list],
        )
        db.execute("DELETE FROM examples WHERE id IN (SELECT value FROM json_each(?))", [id_list])
        db.conn.executemany(
            "UPDATE files SET examples_forgotten = examples_forgotten + ? WHERE id = ?", per_file
        )
        # a document with none of its derived examples left: its held-out questions go too
        db.conn.executemany(
            "DELETE FROM doc_checks WHERE file_id = ? AND NOT EXISTS"
            " (SELECT 1 FROM examples WHERE file_id = ? AND derived = 1)",
            [(fid, fid) for _, fid in per_file],
        )


def current_count(db: Database, domain: str) -> int:
    (n,) = db.execute(
        f"SELECT count(*) FROM examples WHERE domain = ? AND {CURRENT}", [domain]
    ).fetchone()
    return n
