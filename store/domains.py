"""Domain names: a domain is an inbox sub-folder and the served model name of its adapter."""

from __future__ import annotations

import re

from evertune.store.errors import InvalidDomainError

# vLLM accepts almost any adapter name, but the served names must stay unambiguous:
# `<domain>@v0007` is the pinned form, so `@`, `:` and `/` are kept out (ARCHITECTURE.md,
# "Names served").
DOMAIN_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
RESERVED = frozenset({"base"})


def domain_problem(name: str) -> str | None:
    """Why `name` cannot be a domain, or None when it can."""
    if name in RESERVED:
        return f"'{name}' is reserved (the base model is served under that name)"
    if not DOMAIN_PATTERN.fullmatch(name):
        return (
            f"'{name}' is not a valid domain name: use 1-64 characters of lower-case a-z, 0-9,"
            " '_' or '-', starting with a letter or digit"
        )
    return None


def check_domain(name: str) -> str:
    """Return `name` if it is a valid domain, else raise InvalidDomainError saying why."""
    problem = domain_problem(name)
    if problem:
        raise InvalidDomainError(problem)
    return name
