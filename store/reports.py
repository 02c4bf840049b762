"""A dropped file's report: what happened to it, kept in the store (files, file_errors) and
written beside the stored file as `<name>.report.json`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import orjson
from sqlite_utils import Database


@dataclass(frozen=True)
class Problem:
    line: int | None
    offset: int | None
    reason: str


@dataclass
class FileReport:
    """What happened to one dropped file; also the content of its .report.json."""

    file: str
    domain: str
    status: str  # ingested | rejected | duplicate
    sha256: str
    size: int
    stored_path: str
    format: str | None = None
    records: int = 0
    examples_added: int = 0
    examples_duplicate: int = 0
    records_rejected: int = 0
    # older examples (earlier files or lines) answering a prompt this file answers anew:
    # kept in the store, never trained on again
    examples_superseded: int = 0
    examples_reinstated: int = 0  # superseded examples this file gives again: current again
    superseded_lines: list[dict] = field(default_factory=list)  # {line, by_line} in this file
    # a document's statements as questions (store.knowledge): examples taught, questions
    # held out for the gate
    examples_derived: int = 0
    questions_held_out: int = 0
    reason: str | None = None
    duplicate_of: str | None = None
    errors: list[Problem] = field(default_factory=list)
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    file_id: int | None = None
    ingested_at: str = ""

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2)


def load_report(db: Database, file_id: int) -> FileReport:
    """Rebuild a file's report from the store (the report file is derived from this)."""
    cols = [
        "id",
        "name",
        "domain",
        "status",
        "sha256",
        "size",
        "stored_path",
        "format",
        "records",
        "examples_added",
        "examples_duplicate",
        "records_rejected",
        "examples_superseded",
        "examples_reinstated",
        "reason",
        "duplicate_of",
        "ingested_at",
        "errors_by_reason",
    ]
    row = dict(
        zip(
            cols,
            db.execute(f"SELECT {', '.join(cols)} FROM files WHERE id = ?", [file_id]).fetchone(),
            strict=True,
        )
    )
    errors = [
        Problem(*e)
        for e in db.execute(
            "SELECT line, byte_offset, reason FROM file_errors WHERE file_id = ? ORDER BY id",
            [file_id],
        )
    ]
    dup = row.pop("duplicate_of")
    row["file_id"] = row.pop("id")
    row["file"] = row.pop("name")
    by_reason = row.pop("errors_by_reason")
    report = FileReport(
        **row, errors=errors, errors_by_reason=orjson.loads(by_reason) if by_reason else {}
    )
    report.superseded_lines = [
        {"line": old, "by_line": new}
        for old, new in db.execute(
            "SELECT o.line, n.line FROM examples o JOIN examples n ON n.id = o.superseded_by"
            " WHERE o.file_id = ? AND n.file_id = ? ORDER BY o.line",
            [file_id, file_id],
        )
    ]
    (report.examples_derived,) = db.execute(
        "SELECT count(*) FROM examples WHERE file_id = ? AND derived = 1", [file_id]
    ).fetchone()
    (report.questions_held_out,) = db.execute(
        "SELECT count(*) FROM doc_checks WHERE file_id = ?", [file_id]
    ).fetchone()
    if dup is not None:
        name, when = db.execute(
            "SELECT name, ingested_at FROM files WHERE id = ?", [dup]
        ).fetchone()
        report.duplicate_of = f"{name} (file #{dup}, ingested {when})"
    return report


def save_report(db: Database, report: FileReport) -> None:
    """The file's row completed with its counts, its rejected records, and an event line (in
    the ingest's transaction)."""
    db.execute(
        "UPDATE files SET status = ?, stored_path = ?, report_path = ?, format = ?, records = ?,"
        " examples_added = ?, examples_duplicate = ?, records_rejected = ?, reason = ?,"
        " errors_by_reason = ?, examples_superseded = ?, examples_reinstated = ? WHERE id = ?",
        [
            report.status,
            report.stored_path,
            report.stored_path + ".report.json",
            report.format,
            report.records,
            report.examples_added,
            report.examples_duplicate,
            report.records_rejected,
            report.reason,
            orjson.dumps(report.errors_by_reason).decode(),
            report.examples_superseded,
            report.examples_reinstated,
            report.file_id,
        ],
    )
    db.conn.executemany(
        "INSERT INTO file_errors (file_id, line, byte_offset, reason) VALUES (?, ?, ?, ?)",
        [(report.file_id, e.line, e.offset, e.reason) for e in report.errors],
    )
    db.execute(
        "INSERT INTO events (ts, level, domain, kind, message) VALUES (?, ?, ?, ?, ?)",
        [
            report.ingested_at,
            "warning" if report.records_rejected else "info",
            report.domain,
            f"file_{report.status}",
            f"{report.file}: {report.examples_added} new, {report.examples_duplicate} duplicate,"
            f" {report.records_rejected} rejected"
            + (
                f", {report.examples_superseded} older examples superseded"
                if report.examples_superseded
                else ""
            ),
        ],
    )
