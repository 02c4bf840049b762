"""Examples into a domain's table, and which answer to each question is current: a file's
answer to a question the domain already holds supersedes the older one (kept, pointing at
it). Part of store.ingest's one transaction per file."""

from __future__ import annotations

from sqlite_utils import Database

from evertune.store.reports import FileReport

INSERT_EXAMPLE = (
    "INSERT OR IGNORE INTO examples"
    " (domain, kind, body, content_hash, chars, file_id, line, prompt_hash)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
# The file's examples whose prompt has another example in the domain, in the order read.
FILE_PROMPTS = """
    CREATE TEMP TABLE IF NOT EXISTS file_prompts (
        seq INTEGER PRIMARY KEY, prompt_hash BLOB NOT NULL, content_hash BLOB NOT NULL,
        line INTEGER
    )
"""
NOTE_PROMPT = "INSERT INTO file_prompts (prompt_hash, content_hash, line) VALUES (?, ?, ?)"
PROBE_CHUNK = 10_000  # prompts per IN (...) probe: under SQLite's 32766 bound variables


def insert(conn, batch: list[tuple]) -> int:
    before = conn.total_changes
    conn.executemany(INSERT_EXAMPLE, batch)
    added = conn.total_changes - before
    # Prompts with a second example in the domain (only then can either be superseded), from
    # the (domain, prompt_hash) index alone; most files answer new prompts only, so this is
    # one probe per prompt and nothing else (measured: a table of every prompt of the file,
    # joined afterwards, cost as much as the insert itself).
    prompts = list({r[7] for r in batch if r[7] is not None})
    conflicts = set()
    for i in range(0, len(prompts), PROBE_CHUNK):
        chunk = prompts[i : i + PROBE_CHUNK]
        conflicts.update(
            h
            for (h,) in conn.execute(
                "SELECT prompt_hash FROM examples WHERE domain = ? AND prompt_hash IN"
                f" ({','.join('?' * len(chunk))}) GROUP BY prompt_hash HAVING count(*) > 1",
                [batch[0][0], *chunk],
            )
        )
    if conflicts:
        conn.executemany(NOTE_PROMPT, [(r[7], r[3], r[6]) for r in batch if r[7] in conflicts])
    return added


# The system prompt of a stored chat (NULL without one).
_SYSTEM = (  # (a text chunk's body is no JSON: CASE evaluates json_extract only for chats)
    "CASE WHEN {0}.kind != 'chat' THEN NULL"
    " WHEN json_extract({0}.body, '$[0].role') = 'system'"
    " THEN json_extract({0}.body, '$[0].content') END"
)
# Superseded by the winner w: an example of another file, or of this file under the same
# system prompt (one file may teach a question under several system prompts on purpose).
_LOSES_TO_W = f"(o.file_id != :file OR ({_SYSTEM.format('o')}) IS w.system)"


def supersede(db: Database, domain: str, file_id: int, report: FileReport, max_kept: int) -> None:
    """The file's last answer to each question it shares with other examples becomes the
    domain's current one: every other current example asking it (store.formats.prompt_hash:
    any system prompt, format or spelling) is superseded by it (kept, pointing at it), but
    for the file's own answers under another system prompt; and the answer itself is current
    again if an earlier file's answer had superseded it."""
    args = {"domain": domain, "file": file_id}
    db.execute(
        "CREATE TEMP TABLE IF NOT EXISTS winners (prompt_hash BLOB, id INTEGER, line, system)"
    )
    db.execute("DELETE FROM winners")
    db.execute(
        f"INSERT INTO winners SELECT p.prompt_hash, e.id, p.line, {_SYSTEM.format('e')}"
        " FROM file_prompts p"
        " JOIN examples e ON e.domain = :domain AND e.content_hash = p.content_hash"
        " WHERE p.seq IN (SELECT max(seq) FROM file_prompts GROUP BY prompt_hash)",
        args,
    )
    same_file = db.execute(
        "SELECT o.line, w.line FROM winners w JOIN examples o"
        " ON o.domain = :domain AND o.prompt_hash = w.prompt_hash AND o.id != w.id"
        f" WHERE o.file_id = :file AND o.superseded_by IS NULL AND {_LOSES_TO_W}"
        " ORDER BY o.line",
        args,
    ).fetchall()
    report.superseded_lines = [{"line": a, "by_line": b} for a, b in same_file[:max_kept]]
    report.examples_superseded = db.execute(
        "UPDATE examples AS o SET superseded_by = w.id FROM winners w"
        " WHERE o.domain = :domain AND o.prompt_hash = w.prompt_hash"
        f" AND o.id != w.id AND o.superseded_by IS NULL AND {_LOSES_TO_W}",
        args,
    ).rowcount
    report.examples_reinstated = db.execute(
        "UPDATE examples SET superseded_by = NULL WHERE id IN (SELECT id FROM winners)"
        " AND superseded_by IS NOT NULL"
    ).rowcount
    for table in ("file_prompts", "winners"):
        db.execute(f"DELETE FROM {table}")
