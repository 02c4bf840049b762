"""The commands that change state: train, forget, rollback, pin, unpin, reload. Each calls
one `Operations` (daemon/operations.py): the running daemon through its control API, or
the store directly when no daemon runs; the output is the same either way."""

from __future__ import annotations

import argparse
import sys

import orjson

from evertune.daemon import config as config_mod
from evertune.daemon import operations
from evertune.daemon.errors import (
    EXIT_FAILED,
    EXIT_NOTHING,
    EXIT_OK,
    EXIT_REFUSED,
    UsageError,
)
from evertune.daemon.operations import TrainResult
from evertune.store.db import open_db
from evertune.store.domains import check_domain
from evertune.store.layout import HomeLayout


def cmd_train(args: argparse.Namespace) -> int:
    domain = check_domain(args.domain)
    ops = operations.for_home(config_mod.load(args.config))
    show = _TrainProgress(domain)
    try:
        result = ops.train(domain, args.force, args.from_base, show)
    finally:
        show.close()
    return _print_trained(result)


def _print_trained(r: TrainResult) -> int:
    if r.version is None:
        print(r.reason)
        return EXIT_NOTHING
    print(
        f"{r.domain} {r.version}: {'promoted, now live' if r.promoted else 'refused'} ({r.reason})"
    )
    m = r.metrics
    cand = m.get("candidate") or {}
    if cand:
        exact = cand.get("new_exact")
        train = m.get("train") or {}
        print(
            f"  learned: {'-' if exact is None else f'{exact:.0%}'} of new short answers;"
            f" general drift {m.get('drift', 0):+.0%}; easy questions"
            f" {cand.get('easy_right')}/{cand.get('easy_total')}"
            f" (base {(m.get('base') or {}).get('easy_right')}); trained"
            f" {train.get('steps')} steps in {train.get('seconds') or 0:.0f} s"
        )
    return EXIT_OK if r.promoted else EXIT_REFUSED


def cmd_forget(args: argparse.Namespace) -> int:
    from evertune.daemon.training.forget import prompts_of_file, prompts_of_questions
    from evertune.store import examples
    from evertune.store.db import open_db
    from evertune.store.layout import HomeLayout

    domain = check_domain(args.domain)
    if not args.prompt and not args.file:
        raise UsageError("say what to forget: --prompt QUESTION (repeatable) or --file FILE")
    hashes = prompts_of_questions(args.prompt)
    for f in args.file:
        if not f.is_file():
            raise UsageError(f"{f}: no such file")
        hashes += prompts_of_file(f)
    config = config_mod.load(args.config)
    db = open_db(HomeLayout(config.home).db_path)
    try:
        gone = examples.described(db, examples.answering(db, domain, hashes))
    finally:
        db.close()
    n = len(gone)
    if n == 0:
        what = "that prompt" if len(hashes) == 1 else "those prompts"
        print(f"{domain}: no stored example answers {what}; nothing forgotten")
        return EXIT_NOTHING
    _print_forgetting(domain, gone)
    show = _TrainProgress(domain)
    try:
        result = operations.for_home(config).forget(domain, hashes, show)
    finally:
        show.close()
    _print_forgotten(result.forgotten, config.serve.routing)
    if result.rebuild is None:  # forgotten; no rebuild was due
        print(result.no_rebuild)
        return EXIT_OK
    return _print_trained(result.rebuild)


FORGET_LISTED = 200  # examples listed one by one before `forget` removes them


def _print_forgetting(domain: str, gone: list[tuple[str, int | None, str, str]]) -> None:
    """What is about to be removed, one example a line: file:line, question -> answer."""
    print(f"{domain}: forgetting {len(gone)} examples:")
    for name, line, kind, body in gone[:FORGET_LISTED]:
        if kind == "chat":
            msgs = orjson.loads(body)
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            asked = next((m["content"] for m in reversed(msgs[:last]) if m["role"] == "user"), "")
            what = f"{_short(asked)} -> {_short(msgs[last]['content'])}"
        else:
            what = _short(body)
        print(f"  {name}:{line if line is not None else '?'}: {what}")
    if len(gone) > FORGET_LISTED:
        print(f"  ... and {len(gone) - FORGET_LISTED} more")


def _short(text: str, limit: int = 60) -> str:
    """One line of at most `limit` characters, as repr shows it (no control characters)."""
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[: limit - 1] + "…")


def _print_forgotten(g: dict, routing: str = "admission") -> None:
    print(
        f"{g['domain']}: {g['examples']} examples forgotten (from {len(g['files'])} files, kept"
        f" in done/ and marked in their reports); versions no longer served:"
        f" {', '.join(g['versions']) or 'none'}"
    )
    meanwhile = (
        "the stable name answers as the base model"
        if routing == "admission"
        else "stable name unloaded"
    )
    if g["pinned"]:
        print(
            f"  pinned, so kept and still served under their own names until unpinned:"
            f" {', '.join(g['pinned'])} (evertune unpin {g['domain']} VERSION)"
        )
    print(
        f"  live: {g['live_before'] or 'none'} -> {g['live_now'] or 'none (' + meanwhile + ')'}"
        + (
            f" until the rebuild from the base model on the {g['remaining']} remaining examples"
            if g.get("rebuild")
            else ""
        )
    )


def cmd_rollback(args: argparse.Namespace) -> int:
    domain = check_domain(args.domain)
    ops = operations.for_home(config_mod.load(args.config))
    live = ops.rollback(domain, args.to)
    when = "and served" if ops.served_now else "(served when the daemon starts)"
    print(f"{domain}: {live} is live {when}")
    return EXIT_OK


def cmd_pin(args: argparse.Namespace) -> int:
    domain = check_domain(args.domain)
    operations.for_home(config_mod.load(args.config)).pin(domain, args.version, args.pinned)
    if args.pinned:
        print(f"{domain} {args.version} is pinned: kept, and served as {domain}@{args.version}")
    else:
        print(f"{domain} {args.version} is no longer pinned")
    return EXIT_OK


def cmd_canary(args: argparse.Namespace) -> int:
    config = config_mod.load(args.config)
    if args.domain is None:
        from evertune.store import canaries

        db = open_db(HomeLayout(config.home).db_path, readonly=True)
        try:
            trials = canaries.every(db)
        finally:
            db.close()
        for c in trials:
            until = f"made live at {c.promote_at}" if c.promote_at else "until promoted by command"
            print(f"{c.domain}: {c.version.name} answers {c.percent:g}% of requests, {until}")
        if not trials:
            print("no canary runs (start one: evertune canary DOMAIN vNNNN PERCENT)")
        return EXIT_OK
    domain = check_domain(args.domain)
    ops = operations.for_home(config)
    when = "now" if ops.served_now else "when the daemon starts"
    if args.promote or args.rollback:
        if args.version is not None:
            raise UsageError("--promote and --rollback end the domain's canary: no version")
        out = ops.canary(domain, None, 100 if args.promote else 0, None)
        what = "made live" if out["promoted"] else "rolled back"
        print(f"{domain}: canary {out['version']} {what}; live: {out['live']} (served {when})")
        if not out["promoted"]:
            print(f"  its new examples are trained again at the next training of {domain}")
        return EXIT_OK
    if args.version is None or args.percent is None:
        raise UsageError("evertune canary DOMAIN vNNNN PERCENT (or DOMAIN --promote/--rollback)")
    out = ops.canary(domain, args.version, args.percent, args.minutes)
    until = (
        f"made live at {out['promote_at']} unless a request to it fails"
        if out["promote_at"]
        else f"until `evertune canary {domain} --promote` (or --rollback)"
    )
    print(f"{domain}: {out['version']} answers {out['percent']:g}% of requests ({when}), {until}")
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    config = config_mod.load(args.config)  # a file that does not load is refused here already
    out = operations.for_home(config).reload()
    if not out.get("reloaded"):
        print(f"not reloaded: {out.get('error')}", file=sys.stderr)
        return EXIT_FAILED
    print("applied: " + (", ".join(out["applied"]) or "nothing changed"))
    if out["needs_restart"]:
        print("needs a restart to apply: " + ", ".join(out["needs_restart"]))
    return EXIT_OK


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
