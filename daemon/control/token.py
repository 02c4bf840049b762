"""The control API's token: `<home>/control.token`, created by the daemon (mode 0640, group
`evertune` where it exists: the service user and that group may read it, nobody else)."""

from __future__ import annotations

import grp
import logging
import os
import secrets
import stat
from pathlib import Path

from evertune.daemon.control.client import ControlError
from evertune.store.layout import fsync_dir

log = logging.getLogger(__name__)


def ensure_token(path: Path, group: str = "evertune") -> str:
    """The control token in `path`, created (mode 0640, group `group` if possible) if absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    except FileExistsError:
        return _read_token(path)
    token = secrets.token_urlsafe(32)
    try:
        os.fchmod(fd, 0o640)  # the umask may have removed the group bit
        _chgrp(fd, path, group)
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    log.info("wrote a new control token to %s", path)
    return token


def _read_token(path: Path) -> str:
    mode = path.stat().st_mode
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ControlError(
            f"the control token {path} is readable or writable by every user"
            f" (mode {stat.S_IMODE(mode):04o}); run `chmod 640 {path}`, or delete it and"
            " restart the daemon to get a new one"
        )
    token = path.read_text(encoding="utf-8").strip()
    if not token:
        raise ControlError(
            f"the control token {path} is empty; delete it and restart the daemon to get a new one"
        )
    return token


def _chgrp(fd: int, path: Path, group: str) -> None:
    # Best effort: without the group (a dev machine) only the owner and root read the token.
    try:
        os.fchown(fd, -1, grp.getgrnam(group).gr_gid)
    except KeyError:
        log.debug("no group %r: %s keeps the owner's group", group, path)
    except PermissionError:
        log.debug("may not give %s to group %r: it keeps the owner's group", path, group)
