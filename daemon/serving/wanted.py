"""What the vLLM servers should serve, from the database: the adapter names to load and
the route table of the stable names (evertune.daemon.serving.endpoints makes them so).

Names clients use:
    <domain>          the stable name: always the domain's live version (bound at admission
                      through the route table, or loaded under that name: serve.routing)
    <domain>@vNNNN    one version: the live one, the pinned ones, the last few live ones
                      (`serve.keep_loaded`) and a running canary
"""

from __future__ import annotations

from pathlib import Path

from sqlite_utils import Database

from evertune.daemon.serving.vllm_api import versioned_name
from evertune.store import canaries, examples, versions


def names(db: Database, keep_loaded: int, routed: bool) -> dict[str, versions.Version]:
    """name -> version, for every domain with versions; with `routed`, no stable names
    (the route table binds them) and at least one earlier live version per domain."""
    want: dict[str, versions.Version] = {}
    keep = max(keep_loaded, 1) if routed else keep_loaded
    for domain in versions.domains(db):
        every = versions.list_versions(db, domain)
        live = next((v for v in every if v.state == "live"), None)
        earlier = sorted(
            (v for v in every if v.state == "retired" and v.promoted_at and not v.forgotten),
            key=lambda v: v.promoted_at,
            reverse=True,
        )[:keep]
        pinned = [v for v in every if v.pinned and v.state in ("live", "retired")]
        trial = canaries.of(db, domain) if routed else None
        tried = [trial.version] if trial is not None else []
        for v in [*([live] if live else []), *pinned, *earlier, *tried]:
            if Path(v.path).is_dir():
                want[versioned_name(domain, v.name)] = v
        if live is not None and not routed:
            want[domain] = live
    return want


def route_table(
    db: Database, base_name: str | None, override: dict[str, str] | None = None
) -> dict[str, dict]:
    """The route table: every domain with examples or versions -> its live versioned
    name (or `override`'s), or the base model while it has none."""
    table: dict[str, dict] = {}
    named = set(versions.domains(db)) | set(examples.domains(db)) | set(override or {})
    trials = {c.domain: c for c in canaries.every(db)}
    for domain in sorted(named):
        live = versions.live(db, domain)
        if override and domain in override:
            table[domain] = {"to": override[domain]}
        elif live is not None and not live.forgotten and Path(live.path).is_dir():
            table[domain] = {"to": versioned_name(domain, live.name)}
        elif base_name:
            table[domain] = {"to": base_name}
        trial = trials.get(domain)
        if domain in table and trial is not None:
            canary = versioned_name(domain, trial.version.name)
            if canary != table[domain]["to"]:
                table[domain] |= {"canary": canary, "percent": trial.percent}
    return table
