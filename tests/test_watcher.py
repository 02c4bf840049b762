"""The inbox watcher on real temp folders with the real watchdog observer (inotify here)."""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from evertune.daemon.inbox.watcher import InboxWatcher, classify, misplaced, tidy

SETTLE = 0.2


class Collector:
    def __init__(self) -> None:
        self.ready: list[tuple[str, Path]] = []
        self.changed = threading.Condition()

    def __call__(self, domain: str, path: Path) -> None:
        with self.changed:
            self.ready.append((domain, path))
            self.changed.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[tuple[str, Path]]:
        with self.changed:
            self.changed.wait_for(lambda: len(self.ready) >= n, timeout)
            return list(self.ready)

    def settled(self, folder: Path, timeout: float = 10.0) -> list[tuple[str, Path]]:
        """What was handed over once a file written now in `folder` (a domain folder) is:
        files written before it settle before it, so what is not in the list then was
        not handed over (no sleeping for a while and hoping that was long enough)."""
        folder.mkdir(exist_ok=True)
        path = folder / "sentinel.jsonl"
        path.write_text("{}\n")
        with self.changed:
            assert self.changed.wait_for(lambda: (folder.name, path) in self.ready, timeout)
            return list(self.ready)


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return path


@pytest.fixture
def watch(inbox: Path):
    collectors = []

    def start(unclosed: float = 30.0) -> Collector:
        got = Collector()
        w = InboxWatcher(
            inbox, got, settle_seconds=SETTLE, unclosed_timeout_seconds=unclosed, tick=0.05
        )
        w.start()
        collectors.append(w)
        got.watcher = w
        return got

    yield start
    for w in collectors:
        w.stop()
        w.join(5)


def test_closed_file_is_handed_over_once(inbox, watch):
    got = watch()
    (inbox / "legal").mkdir()
    (inbox / "legal" / "a.jsonl").write_text('{"text": "x"}\n')
    assert got.wait_for(1) == [("legal", inbox / "legal" / "a.jsonl")]
    assert [p.name for _, p in got.settled(inbox / "legal")] == ["a.jsonl", "sentinel.jsonl"]


def test_file_still_being_written_is_not_read_half_way(inbox, watch):
    got = watch()
    (inbox / "legal").mkdir()
    path = inbox / "legal" / "big.jsonl"
    with path.open("w") as f:
        f.write('{"text": "first half"}\n')
        f.flush()
        os.fsync(f.fileno())
        time.sleep(10 * SETTLE)  # quiet far longer than the settle period, but still open
        assert got.ready == []
        f.write('{"text": "second half"}\n')
    assert got.wait_for(1) == [("legal", path)]
    assert path.read_text().count("\n") == 2


def test_unclosed_file_is_taken_after_the_unclosed_timeout(inbox, watch):
    got = watch(unclosed=1.0)
    (inbox / "legal").mkdir()
    path = inbox / "legal" / "held.jsonl"
    with path.open("w") as f:
        f.write('{"text": "x"}\n')
        f.flush()
        assert got.wait_for(1, timeout=5) == [("legal", path)]


def test_rename_into_the_folder_is_complete_at_once(inbox, watch, tmp_path):
    got = watch()
    (inbox / "legal").mkdir()
    staging = inbox / "legal" / ".incoming.jsonl.part"
    staging.write_text('{"text": "x"}\n')
    assert [p.name for _, p in got.settled(inbox / "legal")] == ["sentinel.jsonl"]  # not .part
    os.rename(staging, inbox / "legal" / "final.jsonl")
    assert got.wait_for(2)[1] == ("legal", inbox / "legal" / "final.jsonl")


def test_hidden_and_temporary_files_are_ignored(inbox, watch):
    got = watch()
    (inbox / "legal").mkdir()
    for name in (".hidden.jsonl", "x.tmp", "y.part", "z.jsonl~"):
        (inbox / "legal" / name).write_text("{}\n")
    (inbox / "legal" / "real.jsonl").write_text("{}\n")
    assert got.wait_for(1) == [("legal", inbox / "legal" / "real.jsonl")]
    assert [p.name for _, p in got.settled(inbox / "legal")] == ["real.jsonl", "sentinel.jsonl"]


def test_files_waiting_at_start_are_found_by_the_scan(inbox, watch):
    (inbox / "legal").mkdir()
    (inbox / "medical").mkdir()
    (inbox / "legal" / "a.jsonl").write_text("{}\n")
    (inbox / "medical" / "b.csv").write_text("prompt,completion\n")
    got = watch()
    assert sorted(got.wait_for(2)) == [
        ("legal", inbox / "legal" / "a.jsonl"),
        ("medical", inbox / "medical" / "b.csv"),
    ]


def test_new_domain_folder_is_picked_up_without_restart(inbox, watch):
    got = watch()
    got.settled(inbox / "legal")  # running: its first scan is over
    (inbox / "brand-new").mkdir()
    (inbox / "brand-new" / "a.jsonl").write_text("{}\n")
    assert got.wait_for(2)[1] == ("brand-new", inbox / "brand-new" / "a.jsonl")


def test_folder_moved_in_with_files_is_scanned(inbox, watch, tmp_path):
    got = watch()
    outside = tmp_path / "prepared"
    outside.mkdir()
    (outside / "a.jsonl").write_text("{}\n")
    os.rename(outside, inbox / "prepared")
    assert got.wait_for(1) == [("prepared", inbox / "prepared" / "a.jsonl")]


def test_misplaced_files_are_never_handed_over_and_are_listed(inbox, watch):
    got = watch()
    (inbox / "loose.jsonl").write_text("{}\n")
    (inbox / "Bad Name").mkdir()
    (inbox / "Bad Name" / "a.jsonl").write_text("{}\n")
    (inbox / "base").mkdir()
    (inbox / "base" / "a.jsonl").write_text("{}\n")
    (inbox / "legal" / "nested").mkdir(parents=True)
    (inbox / "legal" / "nested" / "a.jsonl").write_text("{}\n")
    assert got.settled(inbox / "legal") == [("legal", inbox / "legal" / "sentinel.jsonl")]
    reasons = sorted(misplaced(inbox))
    assert len(reasons) == 4
    assert any("directly in inbox/" in r for r in reasons)
    assert any("'Bad Name' is not a valid domain name" in r for r in reasons)
    assert any("'base' is reserved" in r for r in reasons)
    assert any("nested folders" in r for r in reasons)


def test_classify_rejects_names_vllm_would_confuse(tmp_path):
    inbox = tmp_path / "inbox"
    for bad in ("a@v1", "a:b", "Upper", "-lead", "x" * 65):
        domain, why = classify(inbox, inbox / bad / "f.jsonl")
        assert domain is None and why, bad
    assert classify(inbox, inbox / "ok_name-2" / "f.jsonl") == ("ok_name-2", None)


def test_links_and_fifos_are_handed_over_to_be_refused_not_left_unreported(inbox, watch, tmp_path):
    """Ingestion refuses them (tests/test_ingest.py); the watcher must not drop them on the
    way: a link to a folder is listed by os.walk as a folder, a dangling link has no
    target to stat, a FIFO stays empty."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    legal = inbox / "legal"
    legal.mkdir()
    (legal / "at-start.jsonl").symlink_to(elsewhere, target_is_directory=True)
    got = watch(unclosed=0.5)
    assert got.wait_for(1) == [("legal", legal / "at-start.jsonl")]
    (legal / "dangling.jsonl").symlink_to(elsewhere / "gone.jsonl")
    os.mkfifo(legal / "pipe.jsonl")
    assert sorted(p.name for _, p in got.wait_for(3)) == [
        "at-start.jsonl",
        "dangling.jsonl",
        "pipe.jsonl",
    ]


def unreadable(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """chmod 000 `folder`. The tests run as root here, where the mode stops nothing: there
    the calls the watcher makes are refused as the kernel refuses them to the service user
    (os.lstat of an entry and os.scandir of the folder raise PermissionError while its mode
    is 000). `folder.chmod(0o755)` makes it readable again."""
    folder.chmod(0)
    if os.geteuid() != 0:
        return
    real_lstat, real_scandir = os.lstat, os.scandir

    def denied(path) -> bool:
        return stat.S_IMODE(real_lstat(folder).st_mode) == 0

    def lstat(path, *args, **kwargs):
        if os.path.dirname(os.fsdecode(path)) == str(folder) and denied(path):
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_lstat(path, *args, **kwargs)

    def scandir(path=".", *args, **kwargs):
        if os.fsdecode(path) == str(folder) and denied(path):
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_scandir(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", lstat)
    monkeypatch.setattr(os, "scandir", scandir)


def test_a_domain_folder_unreadable_for_a_while_does_not_stop_the_inbox(
    inbox, watch, monkeypatch, caplog
):
    """Before: `chmod 000 inbox/legal` for 2 s made os.lstat raise PermissionError in the
    settle thread, which died: no file of any domain was handed over again."""
    legal, medical = inbox / "legal", inbox / "medical"
    legal.mkdir()
    medical.mkdir()
    got = watch()  # both folders watched before anything is written
    (legal / "a.jsonl").write_text("{}\n")
    unreadable(legal, monkeypatch)
    assert got.settled(medical) == [("medical", medical / "sentinel.jsonl")]
    assert got.watcher.problem() is None
    legal.chmod(0o755)
    assert got.wait_for(2)[1] == ("legal", legal / "a.jsonl")
    said = [r.getMessage() for r in caplog.records if "a.jsonl" in r.getMessage()]
    assert len(said) == 1, said  # logged once, not at every tick
    assert "Permission denied" in said[0] and "retried" in said[0]


def test_a_folder_unreadable_at_the_scan_is_scanned_again_once_readable(inbox, watch, monkeypatch):
    """Before: os.walk skipped the folder without a word and its files, which raise no
    event of their own, waited for the next restart."""
    legal = inbox / "legal"
    legal.mkdir()
    (legal / "waiting.jsonl").write_text("{}\n")
    unreadable(legal, monkeypatch)
    got = watch()
    assert got.settled(inbox / "medical") == [("medical", inbox / "medical" / "sentinel.jsonl")]
    assert got.watcher.problem() is None
    legal.chmod(0o755)
    assert got.wait_for(2)[1] == ("legal", legal / "waiting.jsonl")


def test_a_linked_domain_folder_is_named_as_an_error_and_never_followed(
    inbox, watch, tmp_path, caplog
):
    """Before: at start the daemon deleted the `.part` files in the folder the link points
    to, and called the link a file "directly in inbox/"."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    stale = outside / ".a.jsonl.999999999.part"  # its process is gone
    stale.write_text("somebody else's")
    (outside / "a.jsonl").write_text("{}\n")
    link = inbox / "legal"
    link.symlink_to(outside, target_is_directory=True)
    tidy(inbox)
    got = watch()
    assert got.settled(inbox / "medical") == [("medical", inbox / "medical" / "sentinel.jsonl")]
    assert stale.exists()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(f"{link} is a symbolic link (to {outside})" in e for e in errors), errors
    assert any(f"rm {link} && mkdir {link}" in e for e in errors), errors
    assert [w for w in misplaced(inbox) if "symbolic link" in w] != []  # status lists it
