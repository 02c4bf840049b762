"""The `evertune` command line. The only place an exception becomes `Error: ...` and an exit code.

    evertune init [HOME]                 write evertune.toml and inbox/ (never overwrites)
    evertune run                         the daemon, in the foreground
    evertune ingest PATH... --domain D   ingest files now (through the daemon when it runs)
    evertune status [--json]             what the service knows and does

    evertune train DOMAIN [--force]      one training cycle now, waits (0 promoted, 3 refused
                                         by the gate, 4 nothing new to train on)
    evertune forget DOMAIN --prompt Q | --file F   remove examples; stop serving what learned
                                         them; rebuild from the base model
    evertune versions DOMAIN [--json]    versions with state and metrics
    evertune report DOMAIN [--out FILE]  the status page's views as one HTML file
    evertune rollback DOMAIN [--to V]    the previous (or given) version becomes live
    evertune pin DOMAIN vNNNN            keep a version loaded (as DOMAIN@vNNNN) and kept
    evertune unpin DOMAIN vNNNN
    evertune ask DOMAIN "question"       a chat completion from the served stable name
    evertune reload                      the daemon re-reads its config (as SIGHUP does)

Commands that change state go through the daemon's control API when it runs and act on
the store directly when it does not (the daemon serves the change when it starts).

Exit codes: 0 success; 1 some records or files rejected (ingest) or a failure; 2 usage or
configuration error; 3 the gate refused the candidate; 4 nothing new to train on.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sqlite3
import sys
import time
from pathlib import Path

import orjson

from evertune.adapters.errors import AdapterError
from evertune.daemon import config as config_mod
from evertune.daemon.errors import ConfigError, EvertuneError, UsageError
from evertune.daemon.lock import daemon_state
from evertune.store.db import is_initialised, open_db, utcnow
from evertune.store.domains import check_domain
from evertune.store.errors import InvalidDomainError, StoreError
from evertune.store.ingest import (
    FileReport,
    free_name,
    ingest_file,
    load_report,
    part_path,
    remove_stale_parts,
    text_of,
    waiting_copy,
)
from evertune.store.layout import HomeLayout
from evertune.store.queries import file_row

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED, EXIT_NOTHING = 0, 1, 2, 3, 4


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ConfigError, InvalidDomainError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (EvertuneError, StoreError, AdapterError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except OSError as exc:  # a full disk, a permission, a missing folder: said, not a traceback
        where = f" ({exc.filename})" if exc.filename and exc.filename not in str(exc) else ""
        print(f"Error: {exc}{where}", file=sys.stderr)
        return EXIT_FAILED
    except sqlite3.Error as exc:
        print(
            f"Error: the store could not be used: {exc}. If another evertune command is"
            " writing to it, wait and retry; `evertune status` shows what runs.",
            file=sys.stderr,
        )
        return EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evertune", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"evertune {_version()}")
    parser.add_argument(
        "--config",
        help="config file (default: $EVERTUNE_CONFIG, else"
        " $EVERTUNE_HOME/evertune.toml, else ./evertune-home/evertune.toml)",
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="write evertune.toml and inbox/ (idempotent)")
    p.add_argument("home", nargs="?", help="the home folder (default: ./evertune-home)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("run", help="run the daemon in the foreground")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("ingest", help="ingest files now")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files (or folders of files)")
    p.add_argument("--domain", required=True, help="the domain (adapter) they teach")
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds to wait for a running daemon to ingest them (default 600)",
    )
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("train", help="run one training cycle of a domain now and wait")
    p.add_argument("domain")
    p.add_argument(
        "--force",
        action="store_true",
        help="train even with no new examples (on everything the domain has)",
    )
    p.add_argument(
        "--from-base",
        action="store_true",
        help="rebuild: train from the base model on every current example (not from the live"
        " version), through the gate as usual",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "forget",
        help="remove examples (by question, or every example of a file); versions that learned"
        " them stop being served and the domain is rebuilt from the base model",
    )
    p.add_argument("domain")
    p.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="QUESTION",
        help="a question as asked with no system prompt (repeatable)",
    )
    p.add_argument(
        "--file",
        type=Path,
        action="append",
        default=[],
        help="every example of this file, matched by prompt (any format ingest reads)",
    )
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser(
        "report",
        help="the status page's views of a domain as one self-contained HTML file (offline)",
    )
    p.add_argument("domain")
    p.add_argument("--out", type=Path, help="the file to write (default: DOMAIN-report.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("versions", help="the adapter versions of a domain")
    p.add_argument("domain")
    p.add_argument("--json", action="store_true", help="machine-readable (keys are stable)")
    p.set_defaults(func=cmd_versions)

    p = sub.add_parser(
        "export", help="copy a version's adapter out, or merge it into the base model"
    )
    p.add_argument("domain")
    p.add_argument("--version", metavar="vNNNN", help="the version (default: the live one)")
    p.add_argument("--out", required=True, help="a new (or empty) folder to write")
    p.add_argument(
        "--merged",
        action="store_true",
        help="the base model with the adapter merged in: a plain Hugging Face model folder",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("rollback", help="make the previous (or given) version live again")
    p.add_argument("domain")
    p.add_argument("--to", metavar="vNNNN", help="the version (default: the previous live one)")
    p.set_defaults(func=cmd_rollback)

    for name, help_ in (("pin", "keep a version loaded and never deleted"), ("unpin", "undo pin")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("domain")
        p.add_argument("version", metavar="vNNNN")
        p.set_defaults(func=cmd_pin, pinned=name == "pin")

    p = sub.add_parser("ask", help="ask the served stable name a question (streamed)")
    p.add_argument("domain")
    p.add_argument("question")
    p.add_argument("--temperature", type=float, default=0.0, help="default 0: greedy")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--version", dest="at_version", metavar="vNNNN", help="ask one version")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("reload", help="make the running daemon re-read its config")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("status", help="what the service knows and does")
    p.add_argument("--json", action="store_true", help="machine-readable (keys are stable)")
    p.set_defaults(func=cmd_status)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("evertune")
    except PackageNotFoundError:
        return "(not installed)"


# init / run --------------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    path = (
        Path(args.home).absolute() / config_mod.CONFIG_NAME
        if args.home
        else config_mod.locate(args.config)
    )
    created = init_home(path)
    config = config_mod.load(path)
    print(f"{'wrote' if created else 'kept existing'} {path}")
    print(f"drop files into {HomeLayout(config.home).inbox}/<domain>/")
    return EXIT_OK


def init_home(config_path: Path) -> bool:
    """Write the starter config (never over an existing one) and the home's folders."""
    created = False
    if not config_path.exists():
        config_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = config_path.with_name(f".{config_path.name}.tmp")
        tmp.write_text(config_mod.starter_toml(), encoding="utf-8")
        os.replace(tmp, config_path)
        created = True
    HomeLayout(config_mod.load(config_path).home).create()
    return created


class OneLineFormatter(logging.Formatter):
    """Control characters in a message are escaped: a dropped file named "x\\n... ERROR
    ..." must not forge a log line of its own. (A traceback still follows its message.)"""

    _CONTROL = {c: f"\\x{c:02x}" for c in range(32) if c != 9} | {10: "\\n", 13: "\\r"}

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(self._CONTROL)
        return super().formatMessage(record)


def setup_daemon_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # Every scheduler job run (reconcile: every 30 s) and every HTTP request of the daemon
    # to vLLM would be an INFO line each: the idle daemon wrote 3 lines every 30 s. What
    # they do is logged by the daemon itself when something changes.
    for noisy in ("apscheduler.executors", "apscheduler.scheduler", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_run(args: argparse.Namespace) -> int:
    from evertune.daemon.service import Service  # the daemon's imports, only when it runs

    path = config_mod.locate(args.config)
    if not path.exists() and not (args.config or os.environ.get("EVERTUNE_CONFIG")):
        init_home(path)
    config = config_mod.load(path)
    setup_daemon_logging(config.log.level)
    Service(config).run_forever()
    return EXIT_OK


# ingest -------------------------------------------------------------------------------------
def cmd_ingest(args: argparse.Namespace) -> int:
    domain = check_domain(args.domain)
    config = config_mod.load(args.config)
    layout = HomeLayout(config.home)
    files = _expand(args.paths)
    running, _pid = daemon_state(layout.lock_path)
    inbox = layout.inbox / domain
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
        os.replace(tmp, target)
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


# train / versions ---------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:

    domain = check_domain(args.domain)
    config = config_mod.load(args.config)
    client = _daemon(config)
    if client is not None:
        run_id = client.train(domain, args.force, args.from_base)["run_id"]
        return _follow_run(config, domain, run_id)
    db = open_db(HomeLayout(config.home).db_path)
    return _train_here(db, config, domain, args.force, args.from_base, "manual")


def _train_here(db, config, domain: str, force: bool, from_base: bool, trigger: str) -> int:
    from evertune.adapters.errors import NothingToTrain
    from evertune.daemon.cycle import run_cycle

    show = _TrainProgress(domain)
    try:
        outcome = run_cycle(
            db, config, domain, trigger=trigger, force=force, progress=show, from_base=from_base
        )
    except NothingToTrain as exc:
        show.close()
        print(str(exc))
        return EXIT_NOTHING
    finally:
        show.close()
    m = outcome.metrics
    print(
        f"{domain} {outcome.version}: {'promoted, now live' if outcome.promoted else 'refused'}"
        f" ({outcome.reason})"
    )
    cand = m.get("candidate", {})
    if cand:
        exact = cand.get("new_exact")
        print(
            f"  learned: {'-' if exact is None else f'{exact:.0%}'} of new short answers;"
            f" general drift {m.get('drift', 0):+.0%}; easy questions"
            f" {cand.get('easy_right')}/{cand.get('easy_total')}"
            f" (base {m['base'].get('easy_right')}); trained"
            f" {m['train']['steps']} steps in {m['train']['seconds']:.0f} s"
        )
    return EXIT_OK if outcome.promoted else EXIT_REFUSED


def _daemon(config: config_mod.Config):
    """A control API client when the daemon runs, else None."""
    from evertune.daemon.control import ControlClient
    from evertune.daemon.status import control_url

    layout = HomeLayout(config.home)
    running, _pid = daemon_state(layout.lock_path)
    if not running:
        return None
    url = control_url(layout)
    if url is None:
        raise EvertuneError(
            f"the daemon (pid {_pid}) is starting or stopping and its control API is not up;"
            " try again in a few seconds"
        )
    return ControlClient.from_home(layout.home, url)


def cmd_forget(args: argparse.Namespace) -> int:
    from evertune.daemon.cycle import training_lock
    from evertune.daemon.forget import forget, matching, prompts_of_file, prompts_of_questions

    domain = check_domain(args.domain)
    if not args.prompt and not args.file:
        raise UsageError("say what to forget: --prompt QUESTION (repeatable) or --file FILE")
    hashes = prompts_of_questions(args.prompt)
    for f in args.file:
        if not f.is_file():
            raise UsageError(f"{f}: no such file")
        hashes += prompts_of_file(f)
    config = config_mod.load(args.config)
    layout = HomeLayout(config.home)
    db = open_db(layout.db_path)
    n = len(matching(db, domain, hashes))
    if n == 0:
        what = "that prompt" if len(hashes) == 1 else "those prompts"
        print(f"{domain}: no stored example answers {what}; nothing forgotten")
        return EXIT_NOTHING
    client = _daemon(config)
    if client is not None:
        run_id = client.forget(domain, [h.hex() for h in hashes])["run_id"]
        code = _follow_run(config, domain, run_id)
        if code == EXIT_NOTHING:  # forgotten, and no rebuild was due (it says why)
            code = EXIT_OK
        (data,) = db.execute(
            "SELECT data FROM events WHERE domain = ? AND kind = 'examples_forgotten'"
            " ORDER BY id DESC LIMIT 1",
            [domain],
        ).fetchone() or (None,)
        if data:
            _print_forgotten(orjson.loads(data))
        return code
    with training_lock(layout.train_lock_path, None):
        gone = forget(db, domain, hashes, None)
    _print_forgotten(gone.to_json())
    if not gone.rebuild:
        print(gone.no_rebuild_reason())
        return EXIT_OK
    return _train_here(db, config, domain, False, True, "forget")


def _print_forgotten(g: dict) -> None:
    print(
        f"{g['domain']}: {g['examples']} examples forgotten (from {len(g['files'])} files, kept"
        f" in done/ and marked in their reports); versions no longer served:"
        f" {', '.join(g['versions']) or 'none'}"
    )
    if g["pinned"]:
        print(
            f"  pinned, so kept and still served under their own names until unpinned:"
            f" {', '.join(g['pinned'])} (evertune unpin {g['domain']} VERSION)"
        )
    print(
        f"  live: {g['live_before'] or 'none'} -> {g['live_now'] or 'none (stable name unloaded)'}"
        + (
            f" until the rebuild from the base model on the {g['remaining']} remaining examples"
            if g.get("rebuild")
            else ""
        )
    )


def _follow_run(config: config_mod.Config, domain: str, run_id: int) -> int:
    """Follow a run queued in the daemon through its row in the store until it ends."""
    db = open_db(HomeLayout(config.home).db_path, readonly=True)
    show = _TrainProgress(domain)
    shown = None
    try:
        while True:
            state, step, steps, progress, error, version_id = db.execute(
                "SELECT state, step, steps, progress, error, version_id FROM runs WHERE id = ?",
                [run_id],
            ).fetchone()
            if state in ("queued", "running") and state != shown:
                show({"event": "phase", "phase": f"run {run_id} {state}"})
                shown = state
            if state == "running" and steps:
                show({"event": "progress", "step": step, "steps": steps, **orjson.loads(progress)})
            if state not in ("queued", "running"):
                break
            time.sleep(0.5)
    finally:
        show.close()
    if state == "skipped":
        print(error)
        return EXIT_NOTHING
    if state != "succeeded":
        print(f"{domain}: run {run_id} {state}: {error}", file=sys.stderr)
        return EXIT_FAILED
    from evertune.adapters import registry

    v = registry.get(db, version_id)
    promoted = v.state != "rejected"
    print(f"{domain} {v.name}: {'promoted, now live' if promoted else 'refused'} ({v.reason})")
    return EXIT_OK if promoted else EXIT_REFUSED


class _TrainProgress:
    """A progress bar over training steps in a terminal; plain lines otherwise."""

    def __init__(self, domain: str):
        self.domain, self.bar = domain, None

    def __call__(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "phase":
            self.close()
            print(f"{self.domain}: {event['phase']}...", file=sys.stderr, flush=True)
        elif kind == "progress":
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=event["steps"],
                    unit="step",
                    file=sys.stderr,
                    disable=not sys.stderr.isatty(),
                    desc=self.domain,
                )
            self.bar.total = event["steps"]
            self.bar.set_postfix(loss=event["loss"], tok_s=event["tokens_per_s"])
            self.bar.update(event["step"] - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_report(args: argparse.Namespace) -> int:
    from evertune.daemon import status_page
    from evertune.daemon.status import status_report
    from evertune.store.ingest import write_atomic

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
    from evertune.adapters import registry

    domain = check_domain(args.domain)
    layout = HomeLayout(config_mod.load(args.config).home)
    db = open_db(layout.db_path, readonly=True) if layout.db_path.exists() else None
    versions = registry.list_versions(db, domain) if db and is_initialised(db) else []
    # of the examples each version was trained on, how many newer answers have replaced
    superseded = dict(
        db.execute(
            "SELECT ve.version_id, count(*) FROM version_examples ve JOIN examples e"
            " ON e.id = ve.example_id WHERE e.domain = ? AND e.superseded_by IS NOT NULL"
            " AND ve.role IN ('new', 'replay') GROUP BY ve.version_id",
            [domain],
        ).fetchall()
        if versions
        else []
    )
    if args.json:
        sys.stdout.write(
            orjson.dumps(
                [{**v.to_json(), "superseded": superseded.get(v.id, 0)} for v in versions],
                option=orjson.OPT_INDENT_2,
            ).decode()
            + "\n"
        )
        return EXIT_OK
    if not versions:
        print(f"{domain}: no versions yet")
    for v in versions:
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
        print(
            f"{v.name}  {v.state:9s}{pin} parent {v.parent or '-':5s}  {v.created_at}"
            f"  {v.examples} examples{extra}" + (f"  ({v.reason})" if v.reason else "")
        )
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from evertune.adapters import registry
    from evertune.adapters.export import export_version

    domain = check_domain(args.domain)
    layout = HomeLayout(config_mod.load(args.config).home)
    db = open_db(layout.db_path, readonly=True)
    try:
        if args.version:
            version = registry.find(db, domain, args.version)
        else:
            version = registry.live(db, domain)
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


# rollback / pin / ask / reload ------------------------------------------------------------
def cmd_rollback(args: argparse.Namespace) -> int:
    from evertune.daemon.serving import rollback

    domain = check_domain(args.domain)
    config = config_mod.load(args.config)
    client = _daemon(config)
    if client is not None:
        live = client.rollback(domain, args.to)["live"]
        print(f"{domain}: {live} is live and served")
        return EXIT_OK
    db = open_db(HomeLayout(config.home).db_path)
    v = rollback(db, domain, args.to, None)
    print(f"{domain}: {v.name} is live (served when the daemon starts)")
    return EXIT_OK


def cmd_pin(args: argparse.Namespace) -> int:
    from evertune.daemon.serving import set_pinned

    domain = check_domain(args.domain)
    config = config_mod.load(args.config)
    client = _daemon(config)
    if client is not None:
        (client.pin if args.pinned else client.unpin)(domain, args.version)
    else:
        db = open_db(HomeLayout(config.home).db_path)
        set_pinned(db, domain, args.version, args.pinned, None)
    if args.pinned:
        print(f"{domain} {args.version} is pinned: kept, and served as {domain}@{args.version}")
    else:
        print(f"{domain} {args.version} is no longer pinned")
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


def cmd_reload(args: argparse.Namespace) -> int:
    config = config_mod.load(args.config)  # a file that does not load is refused here already
    client = _daemon(config)
    if client is None:
        raise EvertuneError("no daemon runs on this home: nothing to reload")
    out = client.reload()
    if not out.get("reloaded"):
        print(f"not reloaded: {out.get('error')}", file=sys.stderr)
        return EXIT_FAILED
    print("applied: " + (", ".join(out["applied"]) or "nothing changed"))
    if out["needs_restart"]:
        print("needs a restart to apply: " + ", ".join(out["needs_restart"]))
    return EXIT_OK


# status -------------------------------------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    from evertune.daemon.status import status_report

    report = status_report(config_mod.load(args.config))
    if args.json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
        return EXIT_OK
    d = report["daemon"]
    print(f"home: {report['home']}")
    print(f"daemon: {'running, pid ' + str(d['pid']) if d['running'] else 'not running'}")
    for ep in report["serving"]:
        names = ", ".join(
            f"{name} ({Path(path).name})" for name, path in sorted(ep["served"].items())
        )
        state = "up" if ep["healthy"] else "DOWN"
        print(f"serving: {ep['url']}/v1 {state}; adapters: {names or 'none yet'}")
    if not report["domains"]:
        print("no domains yet: drop files into inbox/<domain>/")
    for dom in report["domains"]:
        f = dom["files"]
        print(
            f"domain {dom['name']}: {dom['examples']} examples ({dom['examples_new']} not yet"
            f" trained on"
            + (
                f", {dom['examples_superseded']} superseded by newer answers"
                if dom.get("examples_superseded")
                else ""
            )
            + f"); files: {f['ingested']} ingested, {f['rejected']} rejected,"
            f" {f['duplicate']} duplicate, {f['waiting']} waiting; live version:"
            f" {dom['live_version'] or 'none'}"
        )
        run = dom["run"]
        if run:
            step = f" step {run['step']}/{run['steps']}" if run.get("steps") else ""
            print(f"  training: {run['state']}{step}")
        for e in dom["last_errors"]:
            at = f" line {e['line']}" if e["line"] else ""
            print(f"  error: {e['file']}{at}: {e['reason']}")
    for w in report["warnings"]:
        print(f"warning: {w}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
