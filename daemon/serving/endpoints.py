"""Serving: make every vLLM endpoint serve what the database says, and keep it so.

Names clients use, and what should be loaded: evertune.daemon.serving.wanted.

Switching the stable name (`serve.routing = "admission"`, the default, on a server with the
evertune middleware: the embedded one, or an external one started with it) is one
replacement of the server's route table after the version is loaded and probed under its
versioned name: every request is bound to one version when it is admitted
(evertune.daemon.serving.routing), so no weights change under a running answer. A domain with
nothing live (before its first version, while `forget` rebuilds it) is routed to the base
model. The previous live version stays loaded (at least one, whatever `keep_loaded` says)
so answers already running on it finish on it.

Otherwise (`serve.routing = "inplace"`, or a server without the middleware: `status` says
which) it is one in-place load (`load_inplace`) of `<domain>` from the new
version's folder: vLLM loads and checks the new weights first and only then replaces the
old ones under the same name, so there is no moment without `<domain>`, but an answer
running across the switch is finished by the new weights. Prefix-cache blocks
are keyed by (name, path) in vLLM 0.32 (v1/core/kv_cache_utils.py), and a version's folder
never changes once published, so a switch can never reuse KV blocks computed with other
weights: that is why the stable name is always pointed at a version folder, never at a
folder rewritten in place.

The database is the truth; endpoints are reconciled to it (after a vLLM restart, which
forgets every runtime adapter, on daemon start, and every `serve.reconcile_seconds`).
Adapter paths sent to vLLM always come from the registry's `versions.path`, never from input.
`endpoint_models` records what each endpoint actually serves.

Failure rules: an endpoint that does not answer keeps what it served and is repaired at the
next reconcile; an endpoint that answers but refuses an adapter (HTTP error) means the folder
is bad: the version is not made live and the old one keeps serving.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlite_utils import Database

from evertune.adapters import registry
from evertune.daemon.config_sections import ServeConfig
from evertune.daemon.errors import AdapterRefused, EndpointDown, ServingError
from evertune.daemon.serving import wanted
from evertune.daemon.serving.vllm_api import Endpoint, read_api_key, use_admin_key, versioned_name
from evertune.store import versions
from evertune.store.errors import RegistryError

log = logging.getLogger(__name__)


@dataclass
class Switch:
    """What one activation did on one endpoint."""

    url: str
    ok: bool
    switch_ms: float | None = None
    error: str | None = None


@dataclass
class Activation:
    domain: str
    version: str
    seconds: float
    switches: list[Switch] = field(default_factory=list)


class Serving:
    """The endpoints and the rules that keep them equal to the database. Every method that
    talks to vLLM holds one lock: a reconcile never interleaves with a publish."""

    def __init__(
        self,
        cfg: ServeConfig,
        endpoints: list[Endpoint],
        *,
        on_switch: Callable[[float], None] | None = None,
        on_endpoint: Callable[[str, bool, int], None] | None = None,
        on_publish: Callable[[str, str, float | None], None] | None = None,
    ):
        self.cfg = cfg
        self.endpoints = endpoints
        self.on_switch = on_switch
        self.on_endpoint = on_endpoint
        self.on_publish = on_publish  # (domain, "ok" | "partial" | "failed", seconds)
        self._lock = threading.RLock()
        self._broken: set[str] = set()  # folders already reported unloadable
        self.unrouted: set[str] = set()  # endpoints already reported without the middleware
        self._counts: dict[str, dict] = {}  # url -> requests per target name (its routes)

    @classmethod
    def for_config(cls, cfg: ServeConfig, embedded_url: str | None, **kw):
        """The endpoints the config names: the embedded server's URL or `serve.urls`."""
        if cfg.mode == "none":
            return None
        api_key = read_api_key(cfg)
        if cfg.mode == "external":
            use_admin_key(cfg)  # the embedded server's key is the daemon's own
        urls = [embedded_url] if cfg.mode == "embedded" else list(cfg.urls)
        timeout = cfg.request_timeout_seconds
        return cls(cfg, [Endpoint(u, api_key, timeout) for u in urls if u], **kw)

    def close(self) -> None:
        for ep in self.endpoints:
            ep.close()

    def exclusive(self) -> threading.RLock:
        """Held across serve-then-record (make_live): a reconcile from another thread must
        not run between the switch and the database saying so, or it would undo the switch
        (the stable name would vanish for a moment)."""
        return self._lock

    # ---- what should be served --------------------------------------------------------------

    def _table(
        self, db: Database, ep: Endpoint, served: dict[str, str], override=None
    ) -> dict[str, dict]:
        """The route table for `ep` (wanted.route_table), never routing a name or a canary
        share to a version it does not serve (`served`)."""
        table = {}
        for stable, route in wanted.route_table(db, ep.base_name, override).items():
            if "@" in route["to"] and route["to"] not in served:
                continue
            if route.get("canary") not in (None, *served):
                route = {"to": route["to"]}
            table[stable] = route
        return table

    def _routed(self, ep: Endpoint) -> dict | None:
        """The endpoint's route table when requests are bound at admission there."""
        if self.cfg.routing != "admission":
            return None
        table = ep.routes()
        if table is None and ep.url not in self.unrouted:
            self.unrouted.add(ep.url)
            log.warning(
                "vLLM at %s has no evertune middleware: its stable names are switched in"
                " place (an answer running across a publish is finished by the new version)."
                " Start it with --middleware evertune.daemon.serving.vllm_entry.AdminGuard and the"
                " daemon's EVERTUNE_VLLM_ADMIN_KEY (README, external servers).",
                ep.url,
            )
        elif table is not None:
            self.unrouted.discard(ep.url)
        return table

    # ---- making a version live ------------------------------------------------------------

    def activate(self, db: Database, version: versions.Version) -> Activation:
        """Make every endpoint serve `version` under `<domain>@vNNNN` and `<domain>`.

        An endpoint that refuses the folder raises AdapterRefused: nothing was switched
        there, the old version keeps serving, and the caller does not record the version live.
        An endpoint that is down is skipped (logged); the next reconcile repairs it.
        """
        registry.check_files(Path(version.path))
        stable, named = version.domain, versioned_name(version.domain, version.name)
        t0 = time.perf_counter()
        out = Activation(version.domain, version.name, 0.0)
        switched: list[tuple[Endpoint, dict[str, str], dict | None]] = []
        with self._lock:
            for ep in self.endpoints:
                served: dict[str, str] = {}
                before: dict | None = None
                try:
                    served = ep.served()
                    before = self._routed(ep)
                    if served.get(named) != version.path:
                        ep.load(named, version.path, inplace=named in served)
                    ep.probe(named)  # refuses a folder vLLM loads but cannot run
                    if before is not None:
                        # the flip: requests admitted from now on get the new version
                        loaded = {**served, named: version.path}
                        table = self._table(db, ep, loaded, {stable: named})
                        t1 = time.perf_counter()
                        ep.set_routes(table)
                        took = time.perf_counter() - t1
                    else:
                        took = ep.load(stable, version.path, inplace=stable in served)
                        # No second probe: the same folder has just answered under the
                        # versioned name and vLLM answered the in-place load only once it had
                        # loaded it. Under load a probe waits for the running batch: it was a
                        # quarter of the publish (benchmarks/swap.py: 234 of 960 ms p50).
                        if stable not in ep.served():
                            raise AdapterRefused(f"vLLM at {ep.url} does not list {stable!r}")
                    switched.append((ep, served, before))
                except EndpointDown as exc:
                    log.warning("%s %s: %s; it is repaired when it answers", stable, named, exc)
                    out.switches.append(Switch(ep.url, False, error=str(exc)))
                    continue
                except AdapterRefused:
                    # Every endpoint goes back to what it served: the version is not live.
                    for done, was, routes in switched:
                        self._restore(done, stable, was, routes)
                    self._restore(ep, named, served, None)
                    if self.on_publish:
                        self.on_publish(version.domain, "failed", None)
                    raise
                out.switches.append(Switch(ep.url, True, switch_ms=took * 1000))
                switch = before is not None and stable in before["routes"]
                if self.on_switch and (switch or stable in served):  # not a first load
                    self.on_switch(took)
        out.seconds = time.perf_counter() - t0
        if self.on_publish:
            ok = all(sw.ok for sw in out.switches)
            self.on_publish(version.domain, "ok" if ok else "partial", out.seconds)
        return out

    def _restore(
        self, ep: Endpoint, name: str, before: dict[str, str], routes: dict | None
    ) -> None:
        """Put `name` (or with `routes`, the route table) back as it was on `ep` (best
        effort: reconcile repairs the rest)."""
        try:
            if routes is not None:
                ep.set_routes(routes["routes"])
            elif name in before:
                ep.load(name, before[name], inplace=True)
            else:
                ep.unload(name)
        except ServingError as exc:
            log.warning("could not restore %r on %s (reconcile will): %s", name, ep.url, exc)

    # ---- reconcile ---------------------------------------------------------------------------

    def reconcile(self, db: Database) -> list[str]:
        """Load what is missing, switch what is stale, unload what is no longer wanted, on
        every endpoint; record what each serves. Returns a line per change, for the log."""
        changes: list[str] = []
        with self._lock:
            domains = set(versions.domains(db))
            for ep in self.endpoints:
                try:
                    changes += self._reconcile_one(db, ep, domains)
                except EndpointDown as exc:
                    log.warning("reconcile: %s", exc)
                    self._record(db, ep.url, None)
                    if self.on_endpoint:
                        self.on_endpoint(ep.url, False, 0)
        for line in changes:
            log.info("reconcile: %s", line)
        return changes

    def _reconcile_one(self, db: Database, ep: Endpoint, domains: set[str]) -> list[str]:
        changes = []
        served = ep.served()
        routed = self._routed(ep)
        want = wanted.names(db, self.cfg.keep_loaded, routed is not None)
        # Versioned names first: the stable name is switched once its version is known good.
        for name in sorted(want, key=lambda n: ("@" not in n, n)):
            v = want[name]
            if served.get(name) == v.path:
                continue
            try:
                registry.check_files(Path(v.path))
                took = ep.load(name, v.path, inplace=name in served)
            except (AdapterRefused, RegistryError) as exc:
                if v.path not in self._broken:
                    log.error("cannot serve %s as %r: %s", v.name, name, exc)
                    self._broken.add(v.path)
                continue
            if "@" not in name and name in served and self.on_switch:
                self.on_switch(took)
            changes.append(f"{ep.url}: {name} -> {v.path}")
            served[name] = v.path
        if routed is not None:
            self._counts[ep.url] = routed.get("counts") or {}
            table = self._table(db, ep, served)
            if table != routed["routes"]:
                ep.set_routes(table)
                changes += [
                    f"{ep.url}: {stable} routed to {route['to']}"
                    for stable, route in table.items()
                    if routed["routes"].get(stable) != route
                ]
        elif self.cfg.routing != "admission" and (ep.routes() or {}).get("routes"):
            ep.set_routes({})  # routing turned off: the stable names are loaded again
            changes.append(f"{ep.url}: route table cleared")
        ours = re.compile(
            "^(?:" + "|".join(re.escape(d) for d in sorted(domains)) + r")(?:@v\d{4})?$"
        )
        for name in sorted(served):
            if name not in want and domains and ours.match(name):
                ep.unload(name)
                changes.append(f"{ep.url}: unloaded {name}")
                del served[name]
        self._record(db, ep.url, served)
        if self.on_endpoint:
            self.on_endpoint(ep.url, True, len(served))
        return changes

    def request_counts(self) -> dict[str, dict[str, int]]:
        """Requests each routed target name got, and how many failed (HTTP errors), summed
        over the endpoints as of their last reconcile (since each server started)."""
        out: dict[str, dict[str, int]] = {}
        for counts in self._counts.values():
            for name, got in counts.items():
                mine = out.setdefault(name, {"requests": 0, "failed": 0})
                for k in mine:
                    mine[k] += int(got.get(k, 0))
        return out

    def _record(self, db: Database, url: str, served: dict[str, str] | None) -> None:
        versions.record_served(db, url, served)


# --------------------------------------------------------------------------------------------
# State changes shared by the daemon and the CLI (when no daemon runs, `serving` is None and
# only the database changes: the daemon reconciles the endpoints when it starts)


def make_live(
    db: Database, version: versions.Version, serving: Serving | None, reason: str
) -> versions.Version:
    """Serve it everywhere first, then record it live: a refused folder changes nothing."""
    registry.check_files(Path(version.path))
    if serving is None:
        return registry.promote(db, version, reason)
    with serving.exclusive():
        act = serving.activate(db, version)
        log.info(
            "%s %s is served (%s) in %.0f ms",
            version.domain,
            version.name,
            ", ".join(f"{s.url}: {'ok' if s.ok else 'pending'}" for s in act.switches)
            or "no endpoint",
            act.seconds * 1000,
        )
        version = registry.promote(db, version, reason)
        serving.reconcile(db)  # unloads what fell out of keep_loaded; records endpoint_models
    return version


def rollback(
    db: Database, domain: str, to: str | None, serving: Serving | None
) -> versions.Version:
    live, target = versions.rollback_target(db, domain, to)
    return make_live(db, target, serving, f"rollback from {live.name}")


def set_pinned(
    db: Database, domain: str, name: str, pinned: bool, serving: Serving | None
) -> versions.Version:
    v = versions.find(db, domain, name)
    versions.check_pinnable(v, pinned)
    if pinned:
        registry.check_files(Path(v.path))
    v = versions.set_pinned(db, v, pinned)
    if serving is not None:
        serving.reconcile(db)  # unpinned and forgotten: unloaded here...
    if not pinned and v.forgotten:
        shutil.rmtree(v.path, ignore_errors=True)  # ...and its folder gone
    return v
