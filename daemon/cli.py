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
    evertune canary DOMAIN vNNNN PCT     a share of the requests to a version, then live
    evertune examples DOMAIN [--file F]  what a domain teaches (documents: derived questions)
    evertune ask DOMAIN "question"       a chat completion from the served stable name
    evertune reload                      the daemon re-reads its config (as SIGHUP does)

Commands that change state (daemon/cli_state.py) go through the daemon's control API when
it runs and act on the store directly when it does not (the daemon serves the change when
it starts): one interface, daemon/operations.py. Reading and adding data: daemon/cli_data.py.

Exit codes: 0 success; 1 some records or files rejected (ingest) or a failure; 2 usage or
configuration error; 3 the gate refused the candidate; 4 nothing new to train on.
"""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import sys
from pathlib import Path

import orjson

from evertune.adapters.errors import AdapterError
from evertune.daemon import config as config_mod
from evertune.daemon.cli_data import (
    cmd_ask,
    cmd_examples,
    cmd_export,
    cmd_ingest,
    cmd_report,
    cmd_versions,
)
from evertune.daemon.cli_state import (
    cmd_canary,
    cmd_forget,
    cmd_pin,
    cmd_reload,
    cmd_rollback,
    cmd_train,
)
from evertune.daemon.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    ConfigError,
    EvertuneError,
    UsageError,
)
from evertune.store.db import store_problem
from evertune.store.errors import InvalidDomainError, StoreError
from evertune.store.files import write_atomic
from evertune.store.layout import HomeLayout


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
    except sqlite3.Error as exc:  # locked, damaged or unwritable: said apart, the file named
        print(f"Error: {store_problem(_store_path(args), exc)}", file=sys.stderr)
        return EXIT_FAILED


def _store_path(args: argparse.Namespace) -> Path | str:
    try:
        return HomeLayout(config_mod.load(args.config).home).db_path
    except (EvertuneError, OSError):
        return "the store"


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
        help="a question (repeatable): every example asking it goes, under any system prompt,"
        " in any format, spacing or case, also asked within a conversation",
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

    p = sub.add_parser(
        "examples",
        help="what a domain teaches: its examples (file:line), derived ones, held-out questions",
    )
    p.add_argument("domain")
    p.add_argument("--file", help="only those of this dropped file (its name)")
    p.add_argument("--derived", action="store_true", help="only those derived from documents")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.set_defaults(func=cmd_examples)

    p = sub.add_parser(
        "canary",
        help="send a share of a domain's requests to a version before it is made live",
        description="With DOMAIN vNNNN PERCENT: that version answers PERCENT of the stable"
        " name's requests (the same conversation the same version, by the request's `user`)"
        " and is made live after --minutes unless a request to it fails. With DOMAIN and"
        " --promote or --rollback: end it now. Alone: list the canaries.",
    )
    p.add_argument("domain", nargs="?")
    p.add_argument("version", nargs="?", metavar="vNNNN")
    p.add_argument("percent", nargs="?", type=float, metavar="PERCENT")
    p.add_argument(
        "--minutes",
        type=float,
        help="made live after this long without a failed request (default: by command only)",
    )
    end = p.add_mutually_exclusive_group()
    end.add_argument("--promote", action="store_true", help="make the canary live now")
    end.add_argument("--rollback", action="store_true", help="end the canary; live stays")
    p.set_defaults(func=cmd_canary)

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
        write_atomic(config_path, config_mod.starter_toml())
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


# status -------------------------------------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    from evertune.daemon.status import status_report

    report = status_report(config_mod.load(args.config))
    if args.json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
        return EXIT_OK
    # every line through _say: names are the user's, of any character but / and NUL
    d = report["daemon"]
    _say(f"home: {report['home']}")
    _say(f"daemon: {'running, pid ' + str(d['pid']) if d['running'] else 'not running'}")
    for ep in report["serving"]:
        names = ", ".join(
            f"{name} ({Path(path).name})" for name, path in sorted(ep["served"].items())
        )
        state = "up" if ep["healthy"] else "DOWN"
        how = {
            "admission": "; stable names bound to a version when a request is admitted",
            "inplace": "; stable names switched in place (no evertune middleware)",
        }.get(ep.get("routing"), "")
        _say(f"serving: {ep['url']}/v1 {state}; adapters: {names or 'none yet'}{how}")
    if not report["domains"]:
        _say("no domains yet: drop files into inbox/<domain>/")
    for dom in report["domains"]:
        f = dom["files"]
        _say(
            f"domain {dom['name']}: {dom['examples']} examples ({dom['examples_new']} not yet"
            f" trained on"
            + (
                f", {dom['examples_refused']} tried by a refused version, waiting for new data"
                if dom.get("examples_refused")
                else ""
            )
            + (
                f", {dom['examples_superseded']} superseded by newer answers"
                if dom.get("examples_superseded")
                else ""
            )
            + f"); files: {f['ingested']} ingested, {f['rejected']} rejected,"
            f" {f['duplicate']} duplicate, {f['waiting']} waiting; live version:"
            f" {dom['live_version'] or 'none'}"
        )
        for w in f.get("waiting_why", []):
            _say(
                f"  waiting: {w['file'] or 'the folder'}: {w['error']} (next try {w['next_retry']})"
            )
        last = dom.get("last_version")
        if last and last["version"] != dom["live_version"] and last["state"] != "training":
            # the newest version is not what clients get: say what became of it
            what = last["outcome"] or last["state"]
            _say(f"  last version: {last['version']} {what}: {last['reason'] or '-'}")
        if c := dom.get("canary"):
            until = f"made live at {c['promote_at']}" if c["promote_at"] else "until promoted"
            _say(f"  canary: {c['version']} answers {c['percent']:g}% of requests, {until}")
        run = dom["run"]
        if run:
            step = f" step {run['step']}/{run['steps']}" if run.get("steps") else ""
            _say(f"  training: {run['state']}{step}")
        for e in dom["last_errors"]:
            at = f" line {e['line']}" if e["line"] else ""
            _say(f"  error: {e['file']}{at}: {e['reason']}")
    for w in report["warnings"]:
        _say(f"warning: {w}")
    return EXIT_OK


def printable(text: str) -> str:
    """`text` with each character that is not printable written as its escape (`\\n`,
    `\\x1b`, `\\udce9`): a name cannot start a line of its own or move the cursor."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _say(line: str) -> None:
    print(printable(line))


if __name__ == "__main__":
    sys.exit(main())
