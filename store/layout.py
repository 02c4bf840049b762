"""Where things live under the home directory (ARCHITECTURE.md, "Home directory")."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from evertune.store.errors import UnsafeFolderError


@dataclass(frozen=True)
class HomeLayout:
    home: Path

    @property
    def db_path(self) -> Path:
        return self.home / "evertune.db"

    @property
    def inbox(self) -> Path:
        return self.home / "inbox"

    @property
    def done(self) -> Path:
        return self.home / "done"

    @property
    def rejected(self) -> Path:
        return self.home / "rejected"

    @property
    def adapters(self) -> Path:
        return self.home / "adapters"

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def lock_path(self) -> Path:
        """Held (flock) by the running daemon; its content is the daemon's pid."""
        return self.home / "daemon.lock"

    @property
    def train_lock_path(self) -> Path:
        """Held (flock) by whoever trains: the daemon's trainer or a CLI `evertune train`."""
        return self.home / "train.lock"

    @property
    def pausable(self) -> Path:
        """One file per running background child the embedded server may pause while a
        client's request is in flight (evertune.daemon.serving.pausing)."""
        return self.home / "pausable"

    @property
    def runs(self) -> Path:
        """A folder per training run (spec.json, child.log, result.json), `warm/` for the
        gate's base-model side, and that side's cached metrics (base-metrics-*.json)."""
        return self.home / "runs"

    def run_dir(self, run_id: int) -> Path:
        return self.runs / f"{run_id:06d}"

    @property
    def control_token_path(self) -> Path:
        """The control API's bearer token (written by the daemon at start)."""
        return self.home / "control.token"

    @property
    def control_url_path(self) -> Path:
        """The running daemon's control URL (written at start, removed at stop)."""
        return self.home / "control.url"

    @property
    def vllm_log_path(self) -> Path:
        """The embedded vLLM server's own output, rotated (evertune.daemon.serving.vllm_process);
        its errors are repeated in the daemon's log."""
        return self.home / "logs" / "vllm.log"

    def check(self, folder: Path) -> Path:
        """`folder` when it lies inside the home and no part of it below the home is a
        symbolic link (parts that do not exist yet are not links); else UnsafeFolderError.
        Called for every folder the daemon or a command writes or deletes in that someone
        other than the service could have made (inbox/ is group-writable under systemd)."""
        try:
            parts = folder.relative_to(self.home).parts
        except ValueError:
            parts = ("..",)
        if ".." in parts:
            raise UnsafeFolderError(
                f"{folder} is not inside the home {self.home}: evertune writes and deletes only"
                " in its own folders; nothing was done there"
            )
        path = self.home
        for part in parts:
            path = path / part
            if path.is_symlink():
                raise UnsafeFolderError(
                    f"{path} is a symbolic link (to {os.readlink(path)}): evertune writes and"
                    f" deletes only in real folders inside its home, so it follows no link"
                    f" there and did nothing in it. Replace the link with a folder"
                    f" (rm {path} && mkdir {path}) and move the files to ingest into it"
                )
        return folder

    def create(self) -> None:
        for folder in (self.inbox, self.done, self.rejected, self.adapters, self.models):
            folder.mkdir(parents=True, exist_ok=True)


def stored_files(layout: HomeLayout) -> int:
    """How many dropped files done/ keeps (their reports not counted)."""
    if not layout.done.is_dir():
        return 0
    return sum(
        1
        for domain in layout.done.iterdir()
        if domain.is_dir() and not domain.is_symlink()
        for f in domain.iterdir()
        if not f.name.endswith(".report.json")
    )


def fsync_dir(folder: Path) -> None:
    """Make a rename or create inside `folder` durable (the directory entry itself)."""
    fsync_file(folder)


def fsync_file(path: Path) -> None:
    """Flush `path`'s data (a file, or a folder's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Every file of `folder` (not its subfolders) and the folder itself on the disk: before
    the rename that makes a folder written under a temporary name visible."""
    for f in folder.iterdir():
        if f.is_file():
            fsync_file(f)
    fsync_dir(folder)
