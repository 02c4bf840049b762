"""The files a user drops: regular files only (opened without following a link or blocking
on a FIFO), their content hash, names that can be stored, free names in done/ and
rejected/, the hidden partial copies `evertune ingest` writes into the inbox, and writing a
file whole or not at all. Every name made from a user's file name fits NAME_MAX."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

from sqlite_utils import Database

from evertune.store.layout import fsync_dir


class NotRegularFile(Exception):
    """The inbox takes regular files only: not a link, a FIFO, a socket, a device or a
    folder. A link would let anyone who can write to the inbox have the service read (and
    train on, and serve) a file only it can read; a FIFO blocks whoever opens it."""


KINDS = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a folder",
}


def text_of(path: Path | str) -> str:
    """A path as text that can be stored (SQLite, JSON reports): itself when its bytes are
    UTF-8, else with each bad byte written as \\xNN. A dropped file whose name is not
    UTF-8 is stored under that name in done/ (before: a traceback, and the file stayed)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def not_regular(path: Path) -> str | None:
    """Why `path` is not taken (None: a regular file). Does not follow links."""
    kind = stat.S_IFMT(os.lstat(path).st_mode)
    if kind == stat.S_IFREG:
        return None
    what = KINDS.get(kind, "not a regular file")
    return f"{what}: the inbox takes regular files only; copy the file itself into it"


def open_regular(path: Path):
    """`path` open for binary reading, refusing (NotRegularFile) anything but a regular
    file without following a link or blocking on a FIFO, even if it was swapped after a
    check."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFile(not_regular(path) or "a symbolic link") from exc
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(not_regular(path) or "not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


NAME_MAX = 255  # bytes in one file name (Linux; most file systems)


def fit_name(name: str, room: int = 0, tag: str = "") -> str:
    """`name` with `tag` (`~2`) before its extension, the rest shortened at a character
    until it, and `room` more bytes for what is added to it (`.report.json`, `.<pid>.part`),
    fit NAME_MAX. The extension is kept: it tells the file's format."""
    stem, suffix = os.path.splitext(name)
    if len(os.fsencode(suffix)) > 32:  # no format's extension: cut like the rest
        stem, suffix = name, ""
    limit = NAME_MAX - room - len(os.fsencode(tag + suffix))
    while len(os.fsencode(stem)) > limit:
        stem = stem[:-1]
    return stem + tag + suffix


def free_name(db: Database, folder: Path, name: str, room: int = 0) -> Path:
    """A path in `folder` that neither exists nor is promised to another file's row, its
    name fitting NAME_MAX with `room` bytes to spare."""
    candidate, n = folder / fit_name(name, room), 1
    while (
        candidate.exists()
        or db.execute("SELECT 1 FROM files WHERE stored_path = ?", [str(candidate)]).fetchone()
    ):
        n += 1
        candidate = folder / fit_name(name, room, f"~{n}")
    return candidate


PART = ".part"


def part_path(folder: Path, name: str) -> Path:
    """Where a copy into the inbox is written before it is renamed in: hidden (the watcher
    ignores dot files) and named by the writing process, so that a copy cut short by a
    kill is known as stale once that process is gone."""
    tail = f".{os.getpid()}{PART}"
    return folder / f".{fit_name(name, 1 + len(tail))}{tail}"


def remove_stale_parts(folder: Path) -> list[Path]:
    """Delete the partial copies in `folder` whose writing process is gone (a CLI killed
    mid-copy, a full disk): they hold nothing that is not still in the source file."""
    removed = []
    if folder.is_symlink():  # never delete through a link (HomeLayout.check)
        return removed
    for p in folder.glob(f".*{PART}"):
        pid = p.name[: -len(PART)].rsplit(".", 1)[-1]
        if pid.isdigit() and _alive(int(pid)):
            continue
        try:
            if p.is_file() and not p.is_symlink():
                p.unlink()
                removed.append(p)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def waiting_copy(folder: Path, src: Path) -> Path | None:
    """A file already in `folder` (not yet ingested) with exactly `src`'s content: the copy
    of an earlier command that was interrupted before the file was ingested. Running the
    command again ingests that one instead of leaving a second copy (`name~2`) behind."""
    size, sha = src.stat().st_size, None
    for p in sorted(folder.iterdir()):
        try:
            if p.name.startswith(".") or not_regular(p) or p.stat().st_size != size:
                continue
            sha = sha or file_sha256(src)
            if file_sha256(p) == sha:
                return p
        except OSError:  # ingested (moved) meanwhile, or unreadable: not this one
            continue
    return None


def write_atomic(target: Path, data: bytes | str) -> None:
    """`data` (text as UTF-8) in `target` whole or not at all, after a crash too: written
    beside it under a name of this process's own, fsynced, renamed, the rename fsynced.
    The one way the service writes a file it may read back."""
    if isinstance(data, str):
        data = data.encode()
    pid = str(os.getpid())
    tmp = target.with_name(f".{fit_name(target.name, len(pid) + 6)}.{pid}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
