"""`evertune forget`: examples removed, and every version that learned them no longer served.

    hashes = prompts_of_questions(["What is the capital of Velmora?"])   # or of a file
    result = forget(db, "geo", hashes, serving)            # under the training lock
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

import logging
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import orjson
from sqlite_utils import Database

from evertune.daemon.serving.endpoints import Serving, make_live
from evertune.store import events, examples, knowledge, versions
from evertune.store.db import utcnow, write_transaction
from evertune.store.errors import RecordError
from evertune.store.files import write_atomic
from evertune.store.formats import CHAT, normalise, prompt_hash, question_hash, text_hash
from evertune.store.ingest import IngestLimits
from evertune.store.layout import HomeLayout
from evertune.store.readers import SNIFF_BYTES, detect_format, read_records

T = TypeVar("T")

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
    """The questions, each as every example asking it is matched (store.formats.prompt_hash:
    under any system prompt, in any format or spelling, alone or within a conversation)."""
    return [question_hash(q) for q in questions]


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
                out.append(prompt_hash(body) if kind == CHAT else text_hash(body))
            except (RecordError, orjson.JSONEncodeError):
                continue
        if fmt == "text":  # a document: its chunks above, and the questions derived from it
            f.seek(0)
            text = f.read().decode("utf-8", errors="replace").removeprefix("\ufeff")
            for d in knowledge.derive(text):
                out += [question_hash(q) for q in [*d.taught, *(f for f, _ in d.facts)]]
    return out


def forget(db: Database, domain: str, hashes: list[bytes], serving: Serving | None) -> Forgotten:
    """Remove the examples answering `hashes` and stop serving what learned them (see the
    module doc). Call under the home's training lock: no run may train on them meanwhile."""
    ids = examples.answering(db, domain, hashes)
    before = versions.live(db, domain)
    out = Forgotten(domain, len(ids), live_before=before.name if before else None)
    if not ids:
        out.live_now = out.live_before
        return out
    saw = versions.trained_on(db, ids)
    every = versions.list_versions(db, domain)
    for v in every:  # in number order: a child comes after its parent
        if v.parent_id in saw and _trained_from_parent(v):
            saw.add(v.id)
    tainted = [v for v in every if v.id in saw]
    fallback = None
    if before is not None and before.id in saw:
        fallback = versions.latest_earlier(every, exclude=saw)
    files = examples.files_of(db, ids)
    if fallback is not None:  # served everywhere first, then recorded live
        make_live(
            db, fallback, serving, "serves instead of versions that learned forgotten examples"
        )
    reason = "trained on examples since forgotten (evertune forget)"
    with write_transaction(db):
        examples.delete(db, ids)
        for v in tainted:
            versions.mark_forgotten(db, v, reason)
        out.remaining = examples.current_count(db, domain)
        out.files = [path for _, path, _ in files]
        out.retired_any = bool(tainted)
        out.versions = [v.name for v in tainted if not v.pinned]
        out.pinned = [v.name for v in tainted if v.pinned]
        now = versions.live(db, domain)
        out.live_now = now.name if now else None
        events.record(
            db,
            "warning",
            domain,
            "examples_forgotten",
            f"{len(ids)} examples forgotten; versions no longer served:"
            f" {', '.join(out.versions) or 'none'}"
            + (f"; pinned, kept until unpinned: {', '.join(out.pinned)}" if out.pinned else ""),
            out.to_json(),
        )
    for v in tainted:
        if not v.pinned:
            shutil.rmtree(v.path, ignore_errors=True)
    for _, path, n in files:
        _mark_report(Path(path + ".report.json"), n)
    if serving is not None:
        serving.reconcile(db)  # nothing live any more: the stable name answers as the base
    log.warning(
        "%s: %d examples forgotten; retired %s; live %s -> %s",
        domain,
        len(ids),
        ", ".join(out.versions) or "nothing",
        out.live_before,
        out.live_now,
    )
    return out


def forget_then_rebuild(
    db: Database,
    layout: HomeLayout,
    domain: str,
    hashes: list[bytes],
    serving: Serving | None,
    rebuild: Callable[[], T],
) -> tuple[Forgotten, T | None]:
    """`forget` under the home's training lock, then `rebuild()` (a cycle from the base
    model, `run_cycle(..., from_base=True)`) where a retired version leaves something to
    rebuild; None where not (`Forgotten.no_rebuild_reason` says why). The daemon's queue
    and the CLI without a daemon both come here."""
    from evertune.daemon.training.children import training_lock

    with training_lock(layout.train_lock_path, None):
        gone = forget(db, domain, hashes, serving)
    return gone, (rebuild() if gone.rebuild else None)


def _trained_from_parent(v: versions.Version) -> bool:
    """An increment starts from its parent's weights; a rebuild starts from the base and
    learned only what its own examples hold. The database says which (m010, which read
    the meta.json of every older version still on disk); not recorded (its folder was
    gone by then): assume the worst."""
    return not v.from_base


def _mark_report(path: Path, n: int) -> None:
    """The dropped file's report says how many of its examples were forgotten, and when."""
    try:
        report = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return
    report["examples_forgotten"] = report.get("examples_forgotten", 0) + n
    report.setdefault("forgotten_at", []).append(utcnow())
    write_atomic(path, orjson.dumps(report, option=orjson.OPT_INDENT_2))
