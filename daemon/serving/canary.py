"""Canaries: a share of a domain's stable-name requests answered by a candidate version.

    evertune canary DOMAIN vNNNN PERCENT [--minutes M]   start (or change) one
    evertune canary DOMAIN --promote | --rollback        end it by command
    evertune canary                                      list them

While one runs, the vLLM middleware (evertune.daemon.serving.routing) sends PERCENT of the stable
name's requests to `<domain>@vNNNN`: the same conversation to the same version when the
client sends OpenAI's `user` field, a random share otherwise. Every reconcile looks at the
requests each server counted for it: a canary that got an HTTP error is rolled back at once;
one whose time is up without an error is promoted (made live). `serve.canary_percent`
(0: off) makes every version that passes the gate a canary first, for
`serve.canary_minutes`. The domain trains again once its canary has ended (a new version
would be compared with a live version about to be replaced).

Canaries need requests bound at admission (`serve.routing = "admission"` and the evertune
middleware on every server): elsewhere a canary is refused.
"""

from __future__ import annotations

import logging

from sqlite_utils import Database

from evertune.daemon.errors import EvertuneError
from evertune.daemon.serving.endpoints import Serving, make_live
from evertune.daemon.serving.vllm_api import versioned_name
from evertune.store import canaries, events, versions

log = logging.getLogger(__name__)


def start(
    db: Database,
    domain: str,
    name: str,
    percent: float,
    minutes: float | None,
    serving: Serving | None,
) -> canaries.Canary:
    """`domain`'s version `name` gets `percent` of its requests (served at once when
    `serving` is given, else when the daemon starts)."""
    if serving is not None and serving.cfg.routing != "admission":
        raise EvertuneError(
            'a canary needs serve.routing = "admission" (requests bound to a version when'
            " they are admitted): set it and `evertune reload`"
        )
    version = versions.find(db, domain, name)
    if versions.live(db, domain) is None:
        raise EvertuneError(f"{domain} has no live version: make {name} live instead")
    trial = canaries.start(db, version, percent, minutes)
    events.record(
        db,
        "info",
        domain,
        "canary_started",
        f"{name} answers {percent:g}% of {domain}'s requests"
        + (f" until {trial.promote_at}, then is made live" if trial.promote_at else ""),
        trial.to_json(),
    )
    if serving is not None:
        serving.reconcile(db)  # loads it, then routes the share (refused: no share)
        unrouted = [ep.url for ep in serving.endpoints if ep.url in serving.unrouted]
        if unrouted:
            log.warning("%s: canary not applied on %s (no evertune middleware)", domain, unrouted)
    return trial


def finish(db: Database, domain: str, promote: bool, serving: Serving | None, why: str) -> dict:
    """End `domain`'s canary: made live (`promote`) or rolled back."""
    trial = canaries.of(db, domain)
    if trial is None:
        raise EvertuneError(f"{domain} has no canary (start one with `evertune canary`)")
    if promote:
        version = make_live(db, trial.version, serving, f"canary promoted: {why}")
        versions.mark_trained(db, version, versions.new_examples_of(db, version))
    elif trial.version.state == "candidate":  # a candidate rolled back is refused for good;
        # its new examples were never marked trained: the next training takes them again
        versions.reject(db, trial.version, "rolled_back", f"canary rolled back: {why}")
    canaries.end(db, domain)
    kind = "canary_promoted" if promote else "canary_rolled_back"
    level = "info" if promote else "warning"
    what = "made live" if promote else "rolled back"
    events.record(db, level, domain, kind, f"{trial.version.name} {what}: {why}", trial.to_json())
    if serving is not None and not promote:
        serving.reconcile(db)  # the share goes back to the live version
    live = versions.live(db, domain)
    return {
        "domain": domain,
        "version": trial.version.name,
        "promoted": promote,
        "live": live.name if live else None,
    }


def check(db: Database, serving: Serving, counts: dict[str, dict[str, int]]) -> list[str]:
    """Roll back a canary that failed requests, promote one whose time is up; `counts` are
    the requests each target name got, summed over the servers. A line per change."""
    out = []
    for trial in canaries.every(db):
        got = counts.get(versioned_name(trial.domain, trial.version.name), {})
        failed, asked = got.get("failed", 0), got.get("requests", 0)
        if failed:
            why = f"{failed} of its {asked} requests failed"
            finish(db, trial.domain, False, serving, why)
        elif trial.due():
            finish(db, trial.domain, True, serving, f"{asked} requests, none failed")
        else:
            continue
        out.append(f"{trial.domain} {trial.version.name}: {why if failed else 'promoted'}")
    return out
