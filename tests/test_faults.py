"""Fault injection (marker e2e), the quick variant of benchmarks/faults.py: the real daemon
SIGKILLed once in each phase (mid-ingest, mid-training, mid-publish, mid-reconcile; each
kill waits for its phase's marker, and the test checks where it landed) on one home,
restarted after each kill, and checked once idle: every dropped file kept, every valid
record stored exactly once, no half version visible, vLLM serving what the database says
within 10 s of the restart. Then one trial each of the two quickest hostile conditions
(store deleted, domain folder unreadable: 19-35 s a trial). The benchmark runs all of its
conditions, the full disk and the bad reload too, several times each."""

from __future__ import annotations

import fault_trials as faults
import pytest

pytestmark = pytest.mark.e2e


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
    # each kill landed while the phase it aimed at was under way (not before, not after)
    for r in summary["trials"]:
        assert r["phase"] in r["landed_in"], (
            f"trial {r['trial']} aimed at {r['phase']}, landed at {r['landed']}"
            f" (under way: {r['landed_in']})\n{report}"
        )
    # The trials did what they claim: files stored, and both domains trained and served
    # after their kills (the gate promotes whatever learned).
    assert summary["examples"] >= 100, report
    assert summary["versions"].get("live") == len(faults.DOMAINS), report


# 19-35 s a trial in the benchmark (2 cores); the full disk (which needs root) and the bad
# reload took 27-40 s
QUICK_HOSTILE = ("store-deleted", "unreadable")


def test_a_deleted_store_and_an_unreadable_folder_lose_nothing_and_are_reported(
    tmp_path, tiny_base, vllm
):
    """One trial of each hostile condition that fits the suite (benchmarks/faults.py runs
    them all, the full disk and the bad reload too): the store deleted under the running
    daemon (reported by /healthz and status, the file dropped after it waits until the
    backup is restored), and a domain folder unreadable while files are dropped (reported,
    the other domain taken meanwhile, everything taken once it is readable, no restart)."""
    lines: list[str] = []
    try:
        summary = faults.run_trials(
            len(QUICK_HOSTILE),
            0,
            tmp_path / "home",
            tiny_base,
            vllm.url,
            out=lines.append,
            phases=QUICK_HOSTILE,
        )
    finally:
        faults.unload_ours(vllm.url)
    report = "\n".join(lines)
    assert summary["violations"] == 0, report
    assert [r["phase"] for r in summary["trials"]] == list(QUICK_HOSTILE), report
    assert all(r["lost"] == 0 and not r["silent"] for r in summary["trials"]), report
    assert "evertune.db" in report and "Permission denied" in report  # what they reported
