"""The commands that read or add data: ingest, versions, report, export, ask."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
from pathlib import Path

import orjson

from evertune.daemon import config as config_mod
from evertune.daemon.errors import EXIT_FAILED, EXIT_NOTHING, EXIT_OK, EvertuneError, UsageError
from evertune.daemon.lock import daemon_state
from evertune.store.db import is_initialised, open_db, utcnow
from evertune.store.domains import check_domain
from evertune.store.files import free_name, part_path, remove_stale_parts, text_of, waiting_copy
from evertune.store.ingest import ingest_file
from evertune.store.layout import HomeLayout, fsync_dir, fsync_file
from evertune.store.queries import file_row
from evertune.store.reports import FileReport, load_report


def cmd_ingest(args: argparse.Namespace) -> int:
    domain = check_domain(args.domain)
    config = config_mod.load(args.config)
    layout = HomeLayout(config.home)
    files = _expand(args.paths)
    running, _pid = daemon_state(layout.lock_path)
    inbox = layout.check(layout.inbox / domain)
    if not inbox.exists():
        inbox.mkdir(parents=True, exist_ok=True)
        # Same mode as inbox/ itself (under systemd: group-writable, setgid), whatever the
        # umask of the admin running this: the daemon must be able to move files out.
        os.chmod(inbox, layout.inbox.stat().st_mode & 0o7777)
    db = open_db(layout.db_path, readonly=running)
    reports = []
    for src in files:
        target = src if src.parent == inbox.resolve() else _copy_into(db, src, inbox)
        if running:
            report = _wait_for_daemon(db, target, args.timeout)
        else:
            report = ingest_file(
                db, layout, target, domain, config.ingest.limits(), progress=_progress_bar(src)
            )
        _print_report(report, layout)
        reports.append(report)
    ok = all(r.status != "rejected" and r.records_rejected == 0 for r in reports)
    return EXIT_OK if ok else EXIT_FAILED


def _expand(paths: list[str]) -> list[Path]:
    out = []
    for raw in paths:
        p = Path(raw).expanduser().resolve()
        if p.is_dir():
            out += sorted(c for c in p.iterdir() if c.is_file() and not c.name.startswith("."))
        elif p.is_file():
            out.append(p)
        else:
            raise UsageError(f"{raw}: no such file or folder")
    if not out:
        raise UsageError(f"no files to ingest in {', '.join(paths)}")
    return out


def _copy_into(db, src: Path, inbox: Path) -> Path:
    """Copy (never move) a file into the inbox; the rename makes it appear complete. The
    leftovers of an earlier command that was killed are dealt with first: its partial
    copies are deleted, and its complete copy still waiting in the inbox is used."""
    remove_stale_parts(inbox)
    waiting = waiting_copy(inbox, src)
    if waiting is not None:
        return waiting
    target = free_name(db, inbox, src.name)
    tmp = part_path(inbox, target.name)
    try:
        shutil.copyfile(src, tmp)
        fsync_file(tmp)  # whole on the disk before its name says it is complete
        os.replace(tmp, target)
        fsync_dir(inbox)
    except BaseException:  # a full disk, Ctrl-C: no half copy left behind
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return target


def _wait_for_daemon(db, target: Path, timeout: float) -> FileReport:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = file_row(db, text_of(target))
        if row is not None and not target.exists():
            return load_report(db, row["id"])
        time.sleep(0.2)
    raise EvertuneError(
        f"the daemon did not ingest {target} within {timeout:.0f} s; it stays in the inbox and"
        " will be ingested when the daemon gets to it (see `evertune status`)"
    )


def _progress_bar(src: Path):
    if not sys.stderr.isatty() or src.stat().st_size < 20 << 20:
        return None
    from tqdm import tqdm

    bar = tqdm(
        total=src.stat().st_size,
        unit="B",
        unit_scale=True,
        desc=src.name,
        file=sys.stderr,
        leave=False,
    )

    def update(done: int, total: int) -> None:
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def _print_report(r: FileReport, layout: HomeLayout) -> None:
    where = _short(Path(r.stored_path), layout)
    if r.status == "duplicate":
        print(f"{r.domain}/{r.file}: duplicate of {r.duplicate_of}, nothing new -> {where}")
        return
    print(
        f"{r.domain}/{r.file}: {r.status}, {r.examples_added} new examples,"
        f" {r.examples_duplicate} duplicate, {r.records_rejected} records rejected -> {where}"
    )
    if r.examples_derived:
        print(
            f"  a document: {r.examples_derived} question-and-answer examples derived from its"
            f" statements, {r.questions_held_out} questions held out for the gate"
            f" (evertune examples {r.domain} --file {r.file})"
        )
    if r.examples_superseded or r.examples_reinstated:
        print(
            f"  {r.examples_superseded} older answers superseded by this file's"
            + (
                f", {r.examples_reinstated} earlier answers current again"
                if r.examples_reinstated
                else ""
            )
        )
    for s in r.superseded_lines[:10]:
        print(f"  line {s['line']}: superseded by line {s['by_line']} (same prompt, later answer)")
    if r.status == "rejected" and r.reason:
        print(f"  reason: {r.reason}")
    for e in r.errors[:10]:
        at = f"line {e.line}" if e.line else "file"
        print(f"  {at}: {e.reason}")
    if r.records_rejected > 10 or len(r.errors) > 10:
        print(f"  ... all of them in {_short(Path(r.stored_path + '.report.json'), layout)}")


def _short(path: Path, layout: HomeLayout) -> str:
    try:
        return str(path.relative_to(layout.home))
    except ValueError:
        return str(path)


def cmd_report(args: argparse.Namespace) -> int:
    from evertune.daemon.control import status_page
    from evertune.daemon.status import status_report
    from evertune.store.files import write_atomic

    domain = check_domain(args.domain)
    config = config_mod.load(args.config)
    layout = HomeLayout(config.home)
    db = open_db(layout.db_path, readonly=True) if layout.db_path.exists() else None
    data = status_page.page_data(db, status_report(config))
    data["domains"] = [d for d in data["domains"] if d["name"] == domain]
    if not data["domains"]:
        raise UsageError(f"{domain}: no such domain in {layout.home} (see `evertune status`)")
    data["made"] = utcnow()
    out = args.out or Path(f"{domain}-report.html")
    write_atomic(out, status_page.report(data))
    v = data["domains"][0]["versions"]
    print(f"{out}: {domain}, {len(v)} versions; open it in any browser (works offline)")
    return EXIT_OK


def cmd_versions(args: argparse.Namespace) -> int:
    from evertune.store import versions

    domain = check_domain(args.domain)
    layout = HomeLayout(config_mod.load(args.config).home)
    db = open_db(layout.db_path, readonly=True) if layout.db_path.exists() else None
    every = versions.list_versions(db, domain) if db and is_initialised(db) else []
    # of the examples each version was trained on, how many newer answers have replaced
    superseded = versions.superseded_counts(db, domain) if every else {}
    if args.json:
        sys.stdout.write(
            orjson.dumps(
                [{**v.to_json(), "superseded": superseded.get(v.id, 0)} for v in every],
                option=orjson.OPT_INDENT_2,
            ).decode()
            + "\n"
        )
        return EXIT_OK
    if not every:
        print(f"{domain}: no versions yet")
    for v in every:
        m = v.metrics
        extra = ""
        if "drift" in m:
            exact = m["candidate"].get("new_exact")
            extra = f" learned {'-' if exact is None else f'{exact:.0%}'}, drift {m['drift']:+.0%}"
        if "changed" in m:
            extra += f", old answer kept {m['stale']}/{m['changed']}"
        if superseded.get(v.id):
            extra += f", {superseded[v.id]} since superseded"
        pin = " pinned" if v.pinned else ""
        pin += " forgotten" if v.forgotten else ""
        state = f"{v.state} ({v.outcome})" if v.outcome else v.state
        print(
            f"{v.name}  {state:9s}{pin} parent {v.parent or '-':5s}  {v.created_at}"
            f"  {v.examples} examples{extra}" + (f"  ({v.reason})" if v.reason else "")
        )
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from evertune.adapters.export import export_version
    from evertune.store import versions

    domain = check_domain(args.domain)
    layout = HomeLayout(config_mod.load(args.config).home)
    db = open_db(layout.db_path, readonly=True)
    try:
        if args.version:
            version = versions.find(db, domain, args.version)
        else:
            version = versions.live(db, domain)
            if version is None:
                raise UsageError(f"{domain} has no live version; name one with --version vNNNN")
    finally:
        db.close()
    out = Path(args.out).expanduser().resolve()
    what = "merged into its base model" if args.merged else "adapter"
    print(f"exporting {domain} {version.name} ({what}) to {out} ...", flush=True)
    info = export_version(Path(version.path), out, merged=args.merged)
    if args.merged:
        print(f"{out}: {domain} {version.name} merged into {info['base_model']} (safetensors)")
    else:
        print(f"{out}: the adapter of {domain} {version.name} (load it with peft or vLLM)")
    return EXIT_OK


def cmd_ask(args: argparse.Namespace) -> int:
    from openai import APIConnectionError, APIStatusError, OpenAI

    from evertune.daemon.status import _api_key, endpoint_urls, serving_report

    domain = check_domain(args.domain)
    config = config_mod.load(args.config)
    running, _ = daemon_state(HomeLayout(config.home).lock_path)
    model = f"{domain}@{args.at_version}" if args.at_version else domain
    healthy = [s for s in serving_report(config, running) if s["healthy"]]
    if not healthy:
        urls = endpoint_urls(config, running)
        raise EvertuneError(
            "no vLLM endpoint answers"
            + (f" ({', '.join(urls)})" if urls else "")
            + (": start the service with `evertune run`" if not running else "")
        )
    served = healthy[0]
    if model not in served["served"]:
        raise EvertuneError(
            f"{served['url']} does not serve {model!r} yet (it serves:"
            f" {', '.join(sorted(served['served'])) or 'no adapter'}); see `evertune status`"
        )
    client = OpenAI(base_url=served["url"] + "/v1", api_key=_api_key(config) or "none")
    try:
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": args.question}],
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            stream=True,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                sys.stdout.write(chunk.choices[0].delta.content)
                sys.stdout.flush()
    except (APIConnectionError, APIStatusError) as exc:
        raise EvertuneError(f"asking {model!r} at {served['url']} failed: {exc}") from exc
    sys.stdout.write("\n")
    return EXIT_OK


def cmd_examples(args: argparse.Namespace) -> int:
    """What a domain teaches: its current examples, file:line, derived ones marked, and the
    questions held out of a document for the gate."""
    from evertune.store import knowledge

    domain = check_domain(args.domain)
    config = config_mod.load(args.config)
    db = open_db(HomeLayout(config.home).db_path, readonly=True)
    try:
        shown = knowledge.listing(db, domain, args.file, args.derived, args.limit)
        checks = knowledge.held_out(db, domain, args.file, args.limit)
    finally:
        db.close()
    if not shown:
        print(f"{domain}: no current examples" + (f" from {args.file}" if args.file else ""))
        return EXIT_NOTHING
    for name, line, kind, derived, body in shown:
        tag = " (derived)" if derived else ""
        if kind == "chat":
            msgs = orjson.loads(body)
            asked = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "")
            print(f"{name}:{line}{tag}: {asked!r} -> {msgs[-1]['content']!r}")
        else:
            print(f"{name}:{line} (text): {' '.join(body.split())[:100]!r}")
    if checks:
        print(f"held out for the gate (never trained on): {len(checks)} questions")
        for name, line, question in checks:
            print(f"  {name}:{line}: {question!r}")
    return EXIT_OK
