"""Progress bars that stay readable in a log.

On a terminal, tqdm's bar. Anywhere else (the daemon under systemd, a child whose stderr is
its log file) a bar is a stream of carriage returns that journals and files keep as one
endless line; there the same tqdm writes its status as a log line at most every
LOG_INTERVAL seconds.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")
LOG_INTERVAL = 10.0
log = logging.getLogger("evertune.progress")


class _LogLines:
    """A file for tqdm: each status it writes becomes one INFO line."""

    def write(self, text: str) -> None:
        text = text.strip("\r\n ")
        if text:
            log.info("%s", text)

    def flush(self) -> None:
        pass


def bar(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it"):
    """`iterable` wrapped in a tqdm bar (a terminal) or in periodic log lines (a log)."""
    from tqdm import tqdm

    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit)
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=False,  # (the daemon sets TQDM_DISABLE for libraries' bars, not for this)
        file=_LogLines(),
        mininterval=LOG_INTERVAL,
        ascii=True,
        ncols=80,
    )
