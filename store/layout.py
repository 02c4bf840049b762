"""Where things live under the home directory (DESIGN.md, "Home directory")."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


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
        client's request is in flight (evertune.daemon.pausing)."""
        return self.home / "pausable"

    def create(self) -> None:
        for folder in (self.inbox, self.done, self.rejected, self.adapters, self.models):
            folder.mkdir(parents=True, exist_ok=True)


def fsync_dir(folder: Path) -> None:
    """Make a rename or create inside `folder` durable (the directory entry itself)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
