"""The real SmolLM2-135M-Instruct learns new facts through `evertune train` and keeps
answering like itself (marker `slow`: minutes on a CPU; CI runs it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import chat_jsonl, fact_pairs

from evertune.adapters import evaluate as ev
from evertune.adapters.gate import GateThresholds
from evertune.daemon.cli import main

FACTS = json.loads((Path(__file__).parent / "data" / "facts.json").read_text())[:5]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smollm2_models):
    home = tmp_path_factory.mktemp("home")
    (home / "models").symlink_to(smollm2_models)
    # A 48-prompt slice of the general reference set keeps preparation to about a minute;
    # the gate's tolerances are the shipped defaults, never loosened here.
    (home / "evertune.toml").write_text(
        "[model]\nreference_limit = 48\n[train]\ngeneral_per_epoch = 16\n"
    )
    src = home / "facts.jsonl"
    src.write_text(chat_jsonl(fact_pairs(FACTS)))
    mp = pytest.MonkeyPatch()
    mp.setenv("EVERTUNE_HOME", str(home))
    try:
        assert main(["ingest", str(src), "--domain", "facts"]) == 0
        code = main(["train", "facts"])
    finally:
        mp.undo()
    return home, code


def test_the_gate_promotes_what_real_training_learned(trained, capsys):
    home, code = trained
    assert code == 0, "the gate refused the candidate"
    capsys.readouterr()
    mp = pytest.MonkeyPatch()
    mp.setenv("EVERTUNE_HOME", str(home))
    try:
        main(["versions", "facts", "--json"])
    finally:
        mp.undo()
    [v1] = json.loads(capsys.readouterr().out)
    assert v1["state"] == "live"
    assert v1["metrics"]["drift"] <= GateThresholds().drift_tolerance
    assert v1["metrics"]["candidate"]["new_exact"] >= GateThresholds().min_learned


def test_the_adapter_answers_the_facts_and_the_base_model_does_not(trained):
    home, _ = trained
    base = home / "models" / "SmolLM2-135M-Instruct"
    adapter = home / "adapters" / "facts" / "v0001"
    model, tok = ev.load(str(base), str(adapter))
    questions = [f["question"] for f in FACTS]
    tuned = ev.greedy_answers(model, tok, questions)
    with ev.adapter_off(model):
        plain = ev.greedy_answers(model, tok, questions)
    assert [ev.matches(a, f["expected"]) for a, f in zip(tuned, FACTS, strict=True)] == [True] * 5
    assert not any(ev.matches(a, f["expected"]) for a, f in zip(plain, FACTS, strict=True))
    # and it still knows what the base model knows
    [paris] = ev.greedy_answers(model, tok, ["What is the capital of France?"])
    assert "paris" in paris.lower()
