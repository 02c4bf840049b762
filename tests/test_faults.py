"""Fault injection (marker e2e), the quick variant of benchmarks/faults.py: the real daemon
SIGKILLed once in each phase (mid-ingest, mid-training, mid-publish, mid-reconcile) on one
home, restarted after each kill, and checked once idle: every dropped file kept, every
valid record stored exactly once, no half version visible, vLLM serving what the database
says within 10 s of the restart. The benchmark runs the same trials 32 times."""

from __future__ import annotations

import pytest
from conftest import benchmark_module

pytestmark = pytest.mark.e2e

faults = benchmark_module("faults")


def test_a_daemon_killed_in_every_phase_loses_and_duplicates_nothing(tmp_path, tiny_base, vllm):
    lines: list[str] = []
    try:
        summary = faults.run_trials(
            len(faults.PHASES), 0, tmp_path / "home", tiny_base, vllm.url, out=lines.append
        )
    finally:
        faults.unload_ours(vllm.url)
    report = "\n".join(lines)
    assert summary["violations"] == 0, report
    assert [r["phase"] for r in summary["trials"]] == list(faults.PHASES)
    # The trials did what they claim: files stored, and both domains trained and served
    # after their kills (the gate promotes whatever learned).
    assert summary["examples"] >= 100, report
    assert summary["versions"].get("live") == len(faults.DOMAINS), report
