"""`evertune forget`: examples removed, and every version that learned them no longer served.

    hashes = prompts_of_questions(["What is the capital of Velmora?"])   # or of a file
    result = forget(db, layout, "geo", hashes, serving)    # under the training lock
    then: run_cycle(..., from_base=True) rebuilds the domain on what remains

What happens (one transaction for the store, serving switched before it is recorded):
- every example of the domain whose prompt is one of `hashes` is deleted (all its answers,
  superseded ones too); the files they came from stay in done/, their reports count them;
- every version trained on one of them (as new or replayed), and every version trained from
  such a version (an incremental adapter keeps what its parent learned), is marked
  `forgotten`: retired, its folder deleted, never served again; a pinned one is kept and
  reported until it is unpinned;
- if the live version is one of them, the latest version that never saw the examples is
  served instead; with none, the stable name has no live version and is unloaded.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson
from sqlite_utils import Database

from evertune.adapters import registry
from evertune.daemon.serving import Serving, make_live
from evertune.store.db import utcnow, write_transaction
from evertune.store.errors import RecordError
from evertune.store.formats import CHAT, normalise, prompt_hash
from evertune.store.ingest import IngestLimits, write_atomic
from evertune.store.readers import SNIFF_BYTES, detect_format, read_records

log = logging.getLogger(__name__)


@dataclass
class Forgotten:
    domain: str
    examples: int  # rows deleted
    files: list[str] = field(default_factory=list)  # the dropped files they came from
    versions: list[str] = field(default_factory=list)  # retired, folders deleted
    pinned: list[str] = field(default_factory=list)  # trained on them but kept (pinned)
    live_before: str | None = None
    live_now: str | None = None  # the fallback served until the rebuild, if any
    remaining: int = 0  # examples left to rebuild from
    retired_any: bool = False  # some version had learned them

    @property
    def rebuild(self) -> bool:
        """A rebuild from the base model is due: a version had learned them, and examples
        remain (else the domain simply has no version that knows them any more)."""
        return self.retired_any and self.remaining > 0

    def no_rebuild_reason(self) -> str:
        if not self.retired_any:
            return (
                f"{self.domain}: {self.examples} examples forgotten; no version had learned"
                " them, so nothing is rebuilt"
            )
        return (
            f"{self.domain}: {self.examples} examples forgotten; no example is left to rebuild"
            " from, so the domain has no live version"
        )

    def to_json(self) -> dict:
        return {**asdict(self), "rebuild": self.rebuild}


def prompts_of_questions(questions: Iterable[str]) -> list[bytes]:
    """The prompt of a one-question chat (the template's default system prompt)."""
    return [
        prompt_hash([{"role": "user", "content": q}, {"role": "assistant", "content": ""}])
        for q in questions
    ]


def prompts_of_file(path: Path, limits: IngestLimits | None = None) -> list[bytes]:
    """The prompts of every chat record of a file in any format ingest reads (bad records
    are skipped: only what could have been stored can be forgotten)."""
    limits = limits or IngestLimits()
    out = []
    with path.open("rb") as f:
        fmt = detect_format(path, f.read(SNIFF_BYTES))
        f.seek(0)
        for _line, _offset, record, error in read_records(
            fmt, f, max_record_bytes=limits.max_record_bytes, chunk_chars=limits.text_chunk_chars
        ):
            if error is not None:
                continue
            try:  # a record ingest rejects was never stored
                kind, body, _ = normalise(record, limits.max_example_chars)
                if kind == CHAT:
                    out.append(prompt_hash(body))
            except (RecordError, orjson.JSONEncodeError):
                continue
    return out


def matching(db: Database, domain: str, hashes: list[bytes]) -> list[int]:
    """Ids of the domain's examples answering one of the prompts."""
    ids: list[int] = []
    for i in range(0, len(hashes), 10_000):
        chunk = hashes[i : i + 10_000]
        ids += [
            r[0]
            for r in db.execute(
                f"SELECT id FROM examples WHERE domain = ? AND prompt_hash IN"
                f" ({','.join('?' * len(chunk))})",
                [domain, *chunk],
            )
        ]
    return ids


def forget(db: Database, domain: str, hashes: list[bytes], serving: Serving | None) -> Forgotten:
    """Remove the examples answering `hashes` and stop serving what learned them (see the
    module doc). Call under the home's training lock: no run may train on them meanwhile."""
    ids = matching(db, domain, hashes)
    before = registry.live(db, domain)
    out = Forgotten(domain, len(ids), live_before=before.name if before else None)
    if not ids:
        out.live_now = out.live_before
        return out
    id_list = json.dumps(ids)
    saw = {
        v
        for (v,) in db.execute(
            "SELECT DISTINCT version_id FROM version_examples WHERE role IN ('new', 'replay')"
            " AND example_id IN (SELECT value FROM json_each(?))",
            [id_list],
        )
    }
    versions = registry.list_versions(db, domain)
    for v in versions:  # in number order: a child comes after its parent
        if v.parent_id in saw and _trained_from_parent(v):
            saw.add(v.id)
    tainted = [v for v in versions if v.id in saw]
    fallback = None
    if before is not None and before.id in saw:
        kept = [
            v
            for v in versions
            if v.id not in saw
            and v.state == "retired"
            and v.promoted_at
            and not v.forgotten
            and Path(v.path).is_dir()
        ]
        fallback = max(kept, key=lambda v: v.promoted_at) if kept else None
    files = db.execute(
        "SELECT f.id, f.stored_path, count(*) FROM examples e JOIN files f ON f.id = e.file_id"
        " WHERE e.id IN (SELECT value FROM json_each(?)) GROUP BY f.id",
        [id_list],
    ).fetchall()
    if fallback is not None:  # served everywhere first, then recorded live
        make_live(
            db, fallback, serving, "serves instead of versions that learned forgotten examples"
        )
    reason = "trained on examples since forgotten (evertune forget)"
    with write_transaction(db):
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
            "UPDATE files SET examples_forgotten = examples_forgotten + ? WHERE id = ?",
            [(n, fid) for fid, _, n in files],
        )
        for v in tainted:
            db.execute(
                "UPDATE versions SET forgotten = 1, reason = ?,"
                " state = CASE WHEN state = 'live' THEN 'retired' ELSE state END WHERE id = ?",
                [reason, v.id],
            )
        (out.remaining,) = db.execute(
            "SELECT count(*) FROM examples WHERE domain = ? AND superseded_by IS NULL", [domain]
        ).fetchone()
        out.files = [path for _, path, _ in files]
        out.retired_any = bool(tainted)
        out.versions = [v.name for v in tainted if not v.pinned]
        out.pinned = [v.name for v in tainted if v.pinned]
        now = registry.live(db, domain)
        out.live_now = now.name if now else None
        db.execute(
            "INSERT INTO events (ts, level, domain, kind, message, data) VALUES (?,?,?,?,?,?)",
            [
                utcnow(),
                "warning",
                domain,
                "examples_forgotten",
                f"{len(ids)} examples forgotten; versions no longer served:"
                f" {', '.join(out.versions) or 'none'}"
                + (f"; pinned, kept until unpinned: {', '.join(out.pinned)}" if out.pinned else ""),
                json.dumps(out.to_json()),
            ],
        )
    for v in tainted:
        if not v.pinned:
            shutil.rmtree(v.path, ignore_errors=True)
    for _, path, n in files:
        _mark_report(Path(path + ".report.json"), n)
    if serving is not None:
        serving.reconcile(db)  # the stable name unloaded when nothing is live any more
    log.warning(
        "%s: %d examples forgotten; retired %s; live %s -> %s",
        domain,
        len(ids),
        ", ".join(out.versions) or "nothing",
        out.live_before,
        out.live_now,
    )
    return out


def _trained_from_parent(v: registry.Version) -> bool:
    """An increment starts from its parent's weights; a consolidation starts from the base
    (its meta.json says so) and learned only what its own examples hold."""
    try:
        meta = json.loads((Path(v.path) / "meta.json").read_text())
    except (OSError, ValueError):
        return True  # no folder left to tell: assume the worst
    return meta.get("train", {}).get("parent_adapter") is not None


def _mark_report(path: Path, n: int) -> None:
    """The dropped file's report says how many of its examples were forgotten, and when."""
    try:
        report = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return
    report["examples_forgotten"] = report.get("examples_forgotten", 0) + n
    report.setdefault("forgotten_at", []).append(utcnow())
    write_atomic(path, orjson.dumps(report, option=orjson.OPT_INDENT_2))
