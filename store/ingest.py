"""Ingestion: one dropped file -> validated, normalised, deduplicated examples in SQLite.

The one code path used by the watcher and by `evertune ingest`. Per file:

1. hash the content (sha256); a content already ingested in this domain is a duplicate;
2. stream the records (store.readers), normalise each (store.formats), and insert them in
   batches inside ONE transaction together with the file's row and its error list, so a
   crash leaves either the whole file ingested or none of it;
3. after the commit, write the report and move the file to done/ or rejected/ (never
   deleted, never overwritten). A crash between commit and move is finished at the next
   start: the row knows where the file was going.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
from sqlite_utils import Database

from evertune.store import knowledge, supersede
from evertune.store.db import utcnow, write_transaction
from evertune.store.errors import FileChangedError, IngestError, RecordError
from evertune.store.files import (
    NAME_MAX,
    NotRegularFile,
    file_sha256,
    free_name,
    not_regular,
    open_regular,
    text_of,
    write_atomic,
)
from evertune.store.formats import TEXT, normalise, prompt_hash, text_hash
from evertune.store.layout import HomeLayout, fsync_dir
from evertune.store.readers import SNIFF_BYTES, detect_format, read_records
from evertune.store.reports import FileReport, Problem, load_report, save_report

log = logging.getLogger(__name__)

REPORT = ".report.json"  # the report's name: the stored file's, with this added


@dataclass(frozen=True)
class IngestLimits:
    max_example_chars: int = 32_000
    text_chunk_chars: int = 2_000
    max_record_bytes: int = 16 << 20
    batch_size: int = 5_000
    max_errors_kept: int = 1_000


Progress = Callable[[int, int], None]  # (bytes read, file size)


def ingest_file(
    db: Database,
    layout: HomeLayout,
    path: Path,
    domain: str,
    limits: IngestLimits = IngestLimits(),
    progress: Progress | None = None,
) -> FileReport:
    """Ingest one file of `domain` that lies in the inbox; return its report."""
    path = Path(path)
    # the folders it leaves and may go to: never through a link, never out of the home
    for folder in (path.parent, layout.done / domain, layout.rejected / domain):
        layout.check(folder)
    try:
        why = not_regular(path)
        if why is None:
            seen = _identity(path)
            size = seen[2]
            sha = file_sha256(path)
    except NotRegularFile as exc:  # swapped for a link or a FIFO since the check
        why = str(exc)
    if why is not None:
        return _refuse_not_regular(db, layout, path, domain, why)
    unfinished = _unfinished_move(db, domain, sha, path)
    if unfinished is not None:
        log.warning("finishing the move of %s (the previous run stopped after its commit)", path)
        return _finish(path, unfinished, seen)
    first = db.execute(
        "SELECT id, name, ingested_at FROM files"
        " WHERE domain = ? AND sha256 = ? AND status = 'ingested' ORDER BY id LIMIT 1",
        [domain, sha],
    ).fetchone()
    report = FileReport(
        file=text_of(path.name),
        domain=domain,
        status="ingested",
        sha256=sha,
        size=size,
        stored_path="",
        ingested_at=utcnow(),
    )
    if first is not None:
        report.status = "duplicate"
        report.duplicate_of = f"{first[1]} (file #{first[0]}, ingested {first[2]})"
        report.reason = "the same content was already ingested into this domain"
    with write_transaction(db):
        file_id = _record(db, layout, path, report, duplicate_of=first and first[0])
        if report.status == "ingested":
            _parse_into(db, path, domain, file_id, report, limits, progress)
        _update_counts(db, layout, path, report)
        _unchanged(path, seen)  # else nothing is committed: read again once it settles
    log.info(
        "file %s/%s: %s, %d new, %d duplicate examples, %d records rejected",
        domain,
        report.file,
        report.status,
        report.examples_added,
        report.examples_duplicate,
        report.records_rejected,
    )
    return _finish(path, report, seen)


def _identity(path: Path) -> tuple[int, int, int, int]:
    """What tells that a file changed: (device, inode, size, mtime). Without a lease (not
    the file's owner, no CAP_LEASE) nothing else tells that a writer still has it open."""
    st = os.lstat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _unchanged(path: Path, seen: tuple[int, int, int, int]) -> None:
    """FileChangedError unless `path` is still the file `seen` before it was read."""
    try:
        now = _identity(path)
    except FileNotFoundError:
        now = None
    if now != seen:
        what = "was removed" if now is None else f"changed ({seen[2]} -> {now[2]} bytes)"
        raise FileChangedError(
            f"{path} {what} while it was read: a program is still writing it. Nothing of it"
            " was stored and it stays in the inbox; it is read again once it has settled (the"
            " daemon does that by itself; run `evertune ingest` again once the writer is done)"
        )


def _refuse_not_regular(
    db: Database, layout: HomeLayout, path: Path, domain: str, why: str
) -> FileReport:
    """Reported and moved (the link or the node itself, never what it points to) to
    rejected/, like any refused file: nothing dropped is lost or silently skipped."""
    report = FileReport(
        file=text_of(path.name),
        domain=domain,
        status="rejected",
        sha256="",
        size=0,
        stored_path="",
        reason=why,
        ingested_at=utcnow(),
    )
    report.errors.append(Problem(None, None, why))
    with write_transaction(db):
        _record(db, layout, path, report, duplicate_of=None)
        report.stored_path = str(_stored_name(db, layout.rejected / domain, report.file))
        _update_counts(db, layout, path, report)
    log.warning("file %s/%s: rejected: %s", domain, report.file, why)
    return _finish(path, report)


def _unfinished_move(db: Database, domain: str, sha: str, path: Path) -> FileReport | None:
    row = db.execute(
        "SELECT id, stored_path, report_path FROM files"
        " WHERE domain = ? AND sha256 = ? AND inbox_path = ? ORDER BY id DESC LIMIT 1",
        [domain, sha, text_of(path)],
    ).fetchone()
    if row is None or Path(row[1]).exists():
        return None
    report = load_report(db, row[0])
    stored = Path(report.stored_path)
    if len(os.fsencode(stored.name + REPORT)) > NAME_MAX:
        # named before names were fitted: its report could never be written, so the move
        # was retried for ever; it goes under a name that fits
        report.stored_path = str(_stored_name(db, stored.parent, stored.name))
        with write_transaction(db):
            db.execute(
                "UPDATE files SET stored_path = ?, report_path = ? WHERE id = ?",
                [report.stored_path, report.stored_path + REPORT, report.file_id],
            )
    return report


def _stored_name(db: Database, folder: Path, name: str) -> Path:
    """A free path in done/ or rejected/ whose report's name fits NAME_MAX too."""
    return free_name(db, folder, name, room=len(REPORT))


def _record(
    db: Database, layout: HomeLayout, path: Path, report: FileReport, duplicate_of: int | None
) -> int:
    """Insert the file's row; _update_counts completes it in the same transaction."""
    report.stored_path = str(_stored_name(db, layout.done / report.domain, report.file))
    cur = db.execute(
        "INSERT INTO files (domain, name, inbox_path, stored_path, report_path, size, sha256,"
        " status, reason, duplicate_of, received_at, ingested_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            report.domain,
            report.file,
            text_of(path),
            report.stored_path,
            report.stored_path + REPORT,
            report.size,
            report.sha256,
            report.status,
            report.reason,
            duplicate_of,
            report.ingested_at,
            report.ingested_at,
        ],
    )
    report.file_id = cur.lastrowid
    return report.file_id


def _parse_into(
    db: Database,
    path: Path,
    domain: str,
    file_id: int,
    report: FileReport,
    limits: IngestLimits,
    progress: Progress | None,
) -> None:
    """Parse and insert batch by batch, in this thread. (A parser thread beside the
    inserting one was measured slower: sqlite3 drops the GIL for every row's step and
    then waits for the parser to give it back, benchmarks/ingest.py.) The cyclic GC is
    paused meanwhile: parsed records form no cycles, and its scans of the young objects
    cost ~14% of the parse time."""
    added = 0
    gc_was_enabled = gc.isenabled()
    gc.disable()
    db.execute(supersede.FILE_PROMPTS)
    db.execute("DELETE FROM file_prompts")
    try:
        for batch in _parsed_batches(path, domain, file_id, report, limits, progress):
            added += supersede.insert(db.conn, batch)
    finally:
        if gc_was_enabled:
            gc.enable()
    report.examples_added = added
    report.examples_duplicate = report.records - report.records_rejected - added
    if report.format == "text" and added:
        _derive(db, path, domain, file_id, report)
    supersede.supersede(db, domain, file_id, report, limits.max_errors_kept)
    if added + report.examples_duplicate == 0 and report.reason is None:
        report.reason = "no usable example in the file" + (
            f" ({report.records_rejected} records rejected)" if report.records_rejected else ""
        )


def _parsed_batches(
    path: Path,
    domain: str,
    file_id: int,
    report: FileReport,
    limits: IngestLimits,
    progress: Progress | None,
) -> Iterator[list[tuple]]:
    """Rows for the examples table, in batches; fills the report's record counts."""
    errors = report.errors
    reasons: Counter[str] = Counter()

    def reject(line: int | None, offset: int | None, reason: str) -> None:
        report.records_rejected += 1
        reasons[_reason_key(reason)] += 1
        if len(errors) < limits.max_errors_kept:
            errors.append(Problem(line, offset, reason))

    with open_regular(path) as f:
        try:
            report.format = detect_format(path, f.read(SNIFF_BYTES))
        except IngestError as exc:
            report.reason = str(exc)
            errors.append(Problem(None, None, str(exc)))
            report.errors_by_reason = {_reason_key(str(exc)): 1}
            return
        f.seek(0)
        items = read_records(
            report.format,
            f,
            max_record_bytes=limits.max_record_bytes,
            chunk_chars=limits.text_chunk_chars,
        )
        blake2b, dumps = hashlib.blake2b, orjson.dumps
        batch: list[tuple] = []
        valid = 0
        for line, offset, record, error in items:
            if error is not None:
                # A problem with the file's structure (not one record) counts as one record.
                reject(line, offset, error)
                continue
            try:
                kind, body, chars = normalise(record, limits.max_example_chars)
            except RecordError as exc:
                reject(line, offset, str(exc))
                continue
            try:
                data = body.encode() if kind == TEXT else dumps(body)
            except (UnicodeEncodeError, orjson.JSONEncodeError):
                # Only a JSON array can get here: json decodes a "\ud800" escape to a lone
                # surrogate, which is not text (orjson, for JSONL, refuses it while parsing).
                reject(line, offset, "not valid Unicode: a \\uXXXX escape is a lone surrogate")
                continue
            valid += 1
            digest = blake2b(data, digest_size=16, person=kind.encode()).digest()
            text = body if kind == TEXT else data.decode()
            prompt = text_hash(body) if kind == TEXT else prompt_hash(body)
            batch.append((domain, kind, text, digest, chars, file_id, line, prompt))
            if len(batch) >= limits.batch_size:
                yield batch
                batch = []
                if progress:
                    progress(f.tell(), report.size)
        if batch:
            yield batch
        if progress:
            progress(report.size, report.size)
    report.records = valid + report.records_rejected
    report.errors_by_reason = dict(reasons)


def _derive(db: Database, path: Path, domain: str, file_id: int, report: FileReport) -> None:
    """A document's statements as questions and answers (store.knowledge), beside its text."""
    if report.size > knowledge.MAX_DOCUMENT_BYTES:
        log.warning(
            "file %s/%s: %d bytes, over %d: trained as text only, no questions derived",
            domain,
            report.file,
            report.size,
            knowledge.MAX_DOCUMENT_BYTES,
        )
        return
    with open_regular(path) as f:
        text = f.read().decode("utf-8", errors="replace").removeprefix("\ufeff")
    derived = knowledge.derive(text)
    supersede.insert(db.conn, knowledge.example_rows(domain, file_id, derived))
    report.examples_derived = knowledge.mark_derived(db, file_id)
    report.questions_held_out = knowledge.record_checks(db, domain, file_id, derived)


def _update_counts(db: Database, layout: HomeLayout, path: Path, report: FileReport) -> None:
    if report.status == "ingested" and report.examples_added + report.examples_duplicate == 0:
        report.status = "rejected"
        report.stored_path = str(_stored_name(db, layout.rejected / report.domain, report.file))
    save_report(db, report)


def _reason_key(reason: str) -> str:
    """Group reasons for counting: the text before the first ':' or '(' ."""
    return reason.split(":", 1)[0].split("(", 1)[0].strip()


def _finish(
    path: Path, report: FileReport, seen: tuple[int, int, int, int] | None = None
) -> FileReport:
    """Write the report beside the stored file, then move the file there (after the commit),
    unless it changed since it was read (`seen`): then it stays, and is read again."""
    stored = Path(report.stored_path)
    stored.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(report.stored_path + REPORT), report.to_json())
    if seen is not None:
        _unchanged(path, seen)
    os.replace(path, stored)
    fsync_dir(stored.parent)
    fsync_dir(path.parent)
    return report
