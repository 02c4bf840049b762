"""`evertune status`: what the service knows and does, read from SQLite, the home and the
serving endpoints (read-only: works with or without a running daemon)."""

from __future__ import annotations

from typing import Any

from evertune.daemon.config import Config
from evertune.daemon.inbox.watcher import misplaced
from evertune.daemon.lock import daemon_state
from evertune.store import canaries
from evertune.store.db import is_initialised, open_db
from evertune.store.domains import domain_problem
from evertune.store.files import write_atomic
from evertune.store.layout import HomeLayout, stored_files
from evertune.store.queries import domain_names, domain_summary


def control_url(layout: HomeLayout) -> str | None:
    """The running daemon's control API URL (it writes the file at start, removes it at stop)."""
    try:
        return layout.control_url_path.read_text().strip() or None
    except OSError:
        return None


def publish_control_url(layout: HomeLayout, url: str | None) -> None:
    """Tell the CLI where the control API listens (None: the daemon stopped)."""
    path = layout.control_url_path
    if url is None:
        path.unlink(missing_ok=True)
        return
    write_atomic(path, url + "\n")


def endpoint_urls(config: Config, daemon_running: bool) -> list[str]:
    """The vLLM servers the config names (the embedded one only while the daemon runs it)."""
    s = config.serve
    if s.mode == "external":
        return list(s.urls)
    if s.mode == "embedded" and daemon_running:
        return [f"http://{s.host}:{s.port}"]
    return []


def serving_report(config: Config, daemon_running: bool) -> list[dict[str, Any]]:
    from evertune.daemon.serving.vllm_api import Endpoint

    out = []
    for url in endpoint_urls(config, daemon_running):
        ep = Endpoint(url, _api_key(config), timeout=2.0)
        try:
            stable = [n for n in ep.served() if "@" not in n]
            routing = "admission" if ep.routed else "inplace" if stable else None
            out.append({"url": url, "healthy": True, "served": ep.listed, "routing": routing})
        except Exception as exc:  # down, refused, not vLLM: all mean "not healthy" here
            out.append({"url": url, "healthy": False, "served": {}, "error": str(exc)})
        finally:
            ep.close()
    return out


def _api_key(config: Config) -> str | None:
    """The key for read-only queries: an unreadable key file reads as none (status still
    reports; the endpoint then says it refuses)."""
    from evertune.daemon.errors import ServingError
    from evertune.daemon.serving.vllm_api import read_api_key

    try:
        return read_api_key(config.serve)
    except ServingError:
        return None


def waiting_report(url: str | None) -> list[dict[str, Any]]:
    """Why the running daemon's waiting files wait, from its /healthz (no token needed);
    [] when it does not answer (status still reports the rest)."""
    import httpx

    if url is None:
        return []
    try:
        return httpx.get(f"{url}/healthz", timeout=2.0).json().get("waiting", [])
    except (httpx.HTTPError, ValueError, AttributeError):
        return []


def status_report(config: Config, waiting: list[dict] | None = None) -> dict[str, Any]:
    """`status --json` (ARCHITECTURE.md, "JSON contracts": add keys, rename none).
    `waiting`: why files wait (the daemon's own list; asked of the running daemon when None)."""
    layout = HomeLayout(config.home)
    running, pid = daemon_state(layout.lock_path)
    outside = waiting is None  # asked from outside the daemon (the CLI), not by the daemon
    if outside:
        waiting = waiting_report(control_url(layout)) if running else []
    report: dict[str, Any] = {
        "home": str(layout.home),
        "daemon": {
            "running": running,
            "pid": pid,
            "control_url": control_url(layout) if running else None,
        },
        "serving": serving_report(config, running),
        "domains": [],
        "warnings": list(misplaced(layout.inbox)) if layout.inbox.exists() else [],
    }
    if running and outside:  # the daemon's /healthz says how it is
        note_health(report, daemon_health(report["daemon"]["control_url"]))
    if not layout.db_path.exists() and (kept := stored_files(layout)):
        report["warnings"].append(
            f"no store at {layout.db_path}, but {layout.done}/ holds {kept} ingested file(s):"
            f" restore {layout.db_path.name} from a backup, or move the files from"
            " done/<domain>/ back into inbox/<domain>/ to ingest them again"
        )
    names = set()
    if layout.inbox.exists():
        names |= {
            d.name for d in layout.inbox.iterdir() if d.is_dir() and domain_problem(d.name) is None
        }
    db = open_db(layout.db_path, readonly=True) if layout.db_path.exists() else None
    if db is not None and not is_initialised(db):  # a daemon is creating it right now
        db.close()
        db = None
    try:
        if db is not None:
            names |= set(domain_names(db))
        for name in sorted(names):
            summary = domain_summary(db, name) if db is not None else _empty_summary(name)
            folder = layout.inbox / name
            try:
                summary["files"]["waiting"] = (
                    sum(1 for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
                    if folder.is_dir() and not folder.is_symlink()
                    else 0
                )
            except OSError as exc:  # unreadable: said, not a traceback
                summary["files"]["waiting"] = 0
                report["warnings"].append(f"{folder} cannot be listed ({exc})")
            summary["files"]["waiting_why"] = [w for w in waiting if w.get("domain") == name]
            trial = canaries.of(db, name) if db is not None else None
            summary["canary"] = trial.to_json() if trial is not None else None
            report["domains"].append(summary)
    finally:
        if db is not None:
            db.close()
    return report


def _empty_summary(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "files": {"ingested": 0, "rejected": 0, "duplicate": 0},
        "examples": 0,
        "examples_new": 0,
        "examples_refused": 0,
        "examples_superseded": 0,
        "live_version": None,
        "last_version": None,
        "run": None,
        "last_errors": [],
    }


def daemon_health(url: str | None) -> str | None:
    """Why the running daemon at `url` says it is not healthy (its /healthz), or None."""
    import httpx

    if not url:
        return None
    try:
        r = httpx.get(f"{url}/healthz", timeout=2.0)
        return None if r.status_code == 200 else str(r.json().get("why", r.text))
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        return f"its control API at {url} does not answer ({exc})"


def note_health(report: dict[str, Any], why: str | None) -> None:
    """The daemon's health in `status`: "ok", or why not, also as a warning."""
    report["daemon"]["health"] = why or "ok"
    if why:
        report["warnings"].append(f"the daemon is not healthy: {why}")
