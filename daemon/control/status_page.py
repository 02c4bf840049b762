"""The status page (GET /status on the control port) and `evertune report`: per domain the
versions timeline, training curves, drift and facts learned, drop-to-serving seconds with
their breakdown, examples over time, the queue, and what each endpoint serves.

One data builder (`page_data`, read-only queries plus each version's meta.json) and one
page (status_page.html): the daemon serves the page, its data as JSON and the plotting
library (Plotly's bundled plotly.min.js: offline, nothing from a CDN), and the page
refreshes itself; the report inlines all three into one file to send to someone.
"""

from __future__ import annotations

import importlib.resources
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson
from sqlite_utils import Database

from evertune.store import queries, versions
from evertune.store.db import is_initialised, open_db

LOSS_CURVES = 20  # the last runs whose training curve is drawn (the page stays readable)


def page_data(db: Database | None, status: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the page draws. `status`: the daemon's live status (queue, current run,
    endpoints); None in a report made without the daemon."""
    domains = []
    if db is not None and is_initialised(db):
        for name in queries.domain_names(db):
            domains.append(_domain(db, name))
    return {"domains": domains, "status": status or {}}


def page_data_of(layout, status: dict[str, Any] | None) -> dict[str, Any]:
    """page_data on the home's store, opened read-only for it."""
    db = open_db(layout.db_path, readonly=True)
    try:
        return page_data(db, status)
    finally:
        db.close()


def _domain(db: Database, domain: str) -> dict[str, Any]:
    dropped = queries.first_drop_by_version(db, domain)
    runs = queries.run_times_by_version(db, domain)
    rows = []
    for v in versions.list_versions(db, domain):
        meta = _meta(v.path)
        m = v.metrics or {}
        cand = m.get("candidate") or {}
        timing = m.get("timing") or meta.get("timing") or {}
        history = (m.get("train") or {}).get("history") or (meta.get("result") or {}).get("history")
        queued, started, finished = runs.get(v.id, (None,) * 3)
        rows.append(
            {
                "version": v.name,
                "state": v.state,
                "outcome": v.outcome,
                "promoted": v.promoted_at is not None,
                "forgotten": v.forgotten,
                "pinned": v.pinned,
                "created": v.created_at,
                "promoted_at": v.promoted_at,
                "reason": v.reason,
                "drift": m.get("drift"),
                "learned": cand.get("new_exact"),
                "easy": cand.get("easy_right"),
                "easy_base": (m.get("base") or {}).get("easy_right"),
                "easy_total": cand.get("easy_total"),
                "stale": m.get("stale"),
                "changed": m.get("changed"),
                "consolidated": bool(meta.get("consolidated")),
                "examples": v.examples,
                # seconds: the file's drop -> run start (detect, queue), train, evaluate,
                # and the rest of the run (publish, bookkeeping)
                # (a rebuild, asked for by a command, waits from its request instead)
                "wait_s": _seconds(queued if meta.get("rebuilt") else dropped.get(v.id), started),
                "train_s": timing.get("train_s"),
                "evaluate_s": timing.get("evaluate_s"),
                "publish_s": _seconds(meta.get("finished"), v.promoted_at or finished),
                "serving_s": _seconds(
                    queued if meta.get("rebuilt") else dropped.get(v.id), v.promoted_at
                ),
                "queued_at": queued,
                "loss": [
                    {"epoch": h.get("epoch"), "loss": h.get("new_loss")} for h in history or []
                ],
            }
        )
    for v in rows[:-LOSS_CURVES]:
        v["loss"] = []
    examples = []
    total = 0
    for at, added, forgotten in queries.ingested_files(db, domain):
        total += added
        examples.append({"t": at, "examples": total, "forgotten": forgotten})
    return {
        "name": domain,
        "summary": queries.domain_summary(db, domain),
        "versions": rows,
        "examples": examples,
    }


def _meta(path: str) -> dict[str, Any]:
    p = Path(path) / "meta.json"
    try:
        st = p.stat()
    except OSError:
        return {}  # folder removed by retention or forget: the row still has the metrics
    return _meta_cached(str(p), st.st_mtime_ns)


@lru_cache(maxsize=4096)
def _meta_cached(path: str, _mtime: int) -> dict[str, Any]:
    """meta.json never changes once published: read each once (hundreds of versions)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _seconds(start: str | None, end: str | None) -> float | None:
    from datetime import datetime

    if not start or not end:
        return None
    try:
        return round(
            (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 1
        )
    except ValueError:
        return None


def plotly_js() -> bytes:
    """Plotly's own bundled build (the plotly package ships it): no CDN, works offline."""
    return (importlib.resources.files("plotly") / "package_data" / "plotly.min.js").read_bytes()


def _template() -> str:
    return (importlib.resources.files("evertune.daemon.control") / "status_page.html").read_text()


def page(refresh_s: int = 5) -> bytes:
    """The page the daemon serves: it loads /status/plotly.js and polls /status/data.json."""
    html = _template().replace("<!--PLOTLY-->", '<script src="/status/plotly.js"></script>')
    return html.replace("/*REFRESH_S*/0", str(refresh_s)).encode()


def report(data: dict[str, Any]) -> bytes:
    """One self-contained file: the same page with Plotly and its data inlined (data last:
    no later replacement can touch what it contains)."""
    js = plotly_js().decode().replace("</script", "<\\/script")
    html = _template().replace("<!--PLOTLY-->", f"<script>{js}</script>")
    html = html.replace("/*REFRESH_S*/0", "0")
    payload = orjson.dumps(data).decode().replace("</", "<\\/")
    return html.replace("/*DATA*/null", payload, 1).encode()
