"""Helpers shared by the tests and the benchmarks: a plain module, no fixtures (those are in
conftest.py). Tests import it as `from helpers import ...` (pytest puts tests/ on sys.path);
a benchmark puts tests/ on sys.path first. Nothing from evertune is imported at the top, so a
benchmark that needs only a free port does not load the package."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import orjson

# ---- records and files ----------------------------------------------------------------------

# One chat as a JSONL line, `CHAT % (i, i)`: "Qi" answered "Ai" (what chat_jsonl writes).
CHAT = (
    '{"messages": [{"role": "user", "content": "Q%d"}, {"role": "assistant", "content": "A%d"}]}\n'
)


def qa(q: str, a: str, system: str | None = None) -> dict:
    """A one-turn chat record in the OpenAI messages format, after a system turn if given."""
    msgs = [{"role": "system", "content": system}] if system else []
    return {
        "messages": [*msgs, {"role": "user", "content": q}, {"role": "assistant", "content": a}]
    }


def jsonl(*records, compact: bool = True) -> str:
    """The records as JSON Lines: compact (orjson, UTF-8 as it is), or with compact=False as
    json.dumps writes them (", " and ": ", non-ASCII escaped)."""
    if compact:
        return "".join(orjson.dumps(r).decode() + "\n" for r in records)
    return "".join(json.dumps(r) + "\n" for r in records)


def chat_jsonl(pairs: Iterable[tuple[str, str]]) -> str:
    """(question, answer) pairs as the JSONL of one-turn chats a user drops."""
    return jsonl(*(qa(q, a) for q, a in pairs), compact=False)


def fact_pairs(facts: Iterable[dict]) -> list[tuple[str, str]]:
    """(phrasing, answer) for every phrasing of each fact of tests/data/facts.json: its
    question, then its rephrasings."""
    return [(q, f["answer"]) for f in facts for q in [f["question"], *f["rephrasings"]]]


def ts(text: str | None) -> float | None:
    """A stored ISO timestamp as seconds since the epoch (None stays None)."""
    return dt.datetime.fromisoformat(text).timestamp() if text else None


# ---- a vLLM OpenAI endpoint -----------------------------------------------------------------


def evertune(
    home: Path, *args: str, timeout: float = 120, **kw: Any
) -> subprocess.CompletedProcess:
    """The `evertune` CLI on `home`, as an operator runs it (output captured)."""
    return subprocess.run(
        [sys.executable, "-m", "evertune.daemon.cli", *args],
        env={**os.environ, "EVERTUNE_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(url: str, *, or_none: bool = False) -> dict[str, str] | None:
    """The names the vLLM server at `url` lists, each with its root (an adapter's folder, or
    the base model's); {} when it does not answer, or None with or_none=True (down and
    serving nothing told apart)."""
    try:
        return {m["id"]: m["root"] for m in httpx.get(f"{url}/v1/models", timeout=5).json()["data"]}
    except (httpx.HTTPError, ValueError, KeyError):
        return None if or_none else {}


def ask(
    url: str,
    model: str,
    question: str | list[dict],
    *,
    max_tokens: int = 32,
    timeout: float = 60,
    client: httpx.Client | None = None,
    or_none: bool = False,
) -> str | None:
    """`model`'s greedy answer to `question` (one user message, or the whole list of
    messages) from the vLLM server at `url`, sent with `client` when given. A status other
    than 200 raises httpx.HTTPStatusError naming the model, the status and vLLM's reason;
    with or_none=True any failure (status, connection, timeout, odd reply) gives None."""
    messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
    try:
        r = (client if client is not None else httpx).post(
            f"{url}/v1/chat/completions",
            json={
                "model": model,
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": 0,
            },
            timeout=timeout,
        )
        if r.status_code != 200:
            raise httpx.HTTPStatusError(
                f"{model}: {r.status_code} {r.text[:300]}", request=r.request, response=r
            )
        return r.json()["choices"][0]["message"]["content"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError):
        if or_none:
            return None
        raise


# ---- the daemon as a process ----------------------------------------------------------------


class Daemon:
    """`evertune run` on `home` as a subprocess (EVERTUNE_HOME set), its output written to
    `home/<log>` (appended to with append=True). With `config`, the home is created and its
    evertune.toml written first. `stop()` waits `stop_timeout` seconds for it to exit.
    `prefix`: a command it is run under (e.g. setpriv, to run it without some capability)."""

    def __init__(
        self,
        home: Path,
        config: str | None = None,
        *,
        log: str = "daemon.log",
        append: bool = False,
        stop_timeout: float = 120,
        prefix: Iterable[str] = (),
    ):
        self.home = home
        if config is not None:
            home.mkdir(parents=True, exist_ok=True)
            (home / "evertune.toml").write_text(config)
        self.stop_timeout = stop_timeout
        self.log_path = home / log
        self.log = self.log_path.open("a" if append else "w")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "evertune.daemon.cli", "run"],
            env={**os.environ, "EVERTUNE_HOME": str(home)},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_locked(self, timeout: float = 30) -> Daemon:
        """Until it holds the home's lock (it has started); itself, to chain."""
        from evertune.daemon.lock import daemon_state

        deadline = time.monotonic() + timeout
        while not daemon_state(self.home / "daemon.lock")[0]:
            if self.proc.poll() is not None:
                raise AssertionError(self.logtext())
            if time.monotonic() >= deadline:
                raise AssertionError("daemon did not start")
            time.sleep(0.05)
        return self

    def wait_up(self, timeout: float = 120) -> float:
        """Seconds until its control API answers /healthz (it holds the lock by then)."""
        from evertune.daemon.lock import daemon_state

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited ({self.proc.returncode}):\n{self.tail()}")
            running, pid = daemon_state(self.home / "daemon.lock")
            url_file = self.home / "control.url"
            if running and pid == self.proc.pid and url_file.exists():
                try:
                    url = url_file.read_text().strip()
                    if httpx.get(f"{url}/healthz", timeout=2).status_code in (200, 503):
                        return time.monotonic() - t0
                except (httpx.HTTPError, OSError):
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"the daemon did not come up in {timeout} s:\n{self.tail()}")

    def logtext(self) -> str:
        return self.log_path.read_text()

    def tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.log.close()

    def stop(self) -> int:
        """SIGTERM (unless it has exited already); its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(self.stop_timeout)
        self.log.close()
        return code


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 20.0,
    what: str = "condition",
    daemon: Daemon | None = None,
    *,
    every: float = 0.1,
    fail: bool = True,
) -> Any:
    """Call `predicate` every `every` seconds until it returns something true, and return
    that. After `timeout` seconds, or as soon as `daemon` has exited, raise AssertionError
    naming `what` (with the end of the daemon's log); with fail=False, return False."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if daemon is not None and daemon.proc.poll() is not None:
            if not fail:
                return False
            raise AssertionError(
                f"the daemon exited ({daemon.proc.returncode}) while waiting for {what}:\n"
                + daemon.tail()
            )
        time.sleep(every)
    if not fail:
        return False
    tail = f"\n{daemon.tail()}" if daemon is not None else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{tail}")


def stored_examples(db, questions: dict[int, bytes | None], domain: str = "legal") -> None:
    """Examples `id -> prompt_hash` of one ingested file, stored directly (the tests of the
    store's queries need rows, not a real ingest)."""
    from evertune.store.db import write_transaction

    with write_transaction(db):
        db.execute(
            "INSERT INTO files (id, domain, name, inbox_path, stored_path, report_path, size,"
            " sha256, status, received_at, ingested_at) VALUES (1, ?, 'a', 'i', 's', 'r', 1,"
            " 'x', 'ingested', '', '')",
            [domain],
        )
        for i, question in questions.items():
            db.execute(
                "INSERT INTO examples (id, domain, kind, body, content_hash, chars, file_id,"
                " line, prompt_hash) VALUES (?, ?, 'chat', '[]', ?, 1, 1, ?, ?)",
                [i, domain, bytes([i]), i, question],
            )
