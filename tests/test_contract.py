"""The training child's contract (adapters/contract.py): what the daemon writes is what the
child reads, and a key either side does not know is an error, not a silent default."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from evertune.adapters.contract import (
    ChildResult,
    ChildSpec,
    EvalSpec,
    SpecError,
    TrainResult,
    TrainSpec,
)
from evertune.adapters.gate import GateResult


def spec() -> ChildSpec:
    chat = {"kind": "chat", "messages": [{"role": "user", "content": "q"}]}
    return ChildSpec(
        train=TrainSpec(base_path="/m", out_dir="/o", new=[chat], lr=2e-3),
        eval=EvalSpec(
            general=[],
            changed=[{"prompt": [{"role": "user", "content": "q"}], "old": ["a"]}],
            gate={"drift_tolerance": 0.2},
            live_adapter="/v1",
        ),
    )


def test_what_the_daemon_writes_the_child_reads_back_unchanged():
    written = spec()
    assert ChildSpec.from_dict(json.loads(json.dumps(written.to_dict()))) == written
    assert written.eval.thresholds().drift_tolerance == 0.2


@pytest.mark.parametrize(
    ("part", "key", "message"),
    [
        ("eval", "chnaged", "spec eval: unknown key(s) chnaged"),
        ("train", "learning_rate", "spec train: unknown key(s) learning_rate"),
        (None, "evaluate", "spec: unknown key(s) evaluate"),
    ],
)
def test_a_misspelt_key_is_an_error_naming_it(part, key, message):
    data = spec().to_dict()
    (data[part] if part else data)[key] = 1
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ChildSpec.from_dict(data)


def test_a_missing_required_key_or_an_unknown_gate_setting_is_an_error():
    data = spec().to_dict()
    del data["train"]["out_dir"]
    with pytest.raises(SpecError, match=r"spec train: missing key\(s\) out_dir"):
        ChildSpec.from_dict(data)
    data = spec().to_dict()
    data["eval"]["gate"]["drift_tolerence"] = 0.3
    with pytest.raises(SpecError, match=r"spec eval.gate: unknown key\(s\) drift_tolerence"):
        ChildSpec.from_dict(data)


def test_a_key_left_out_is_an_error_even_where_the_field_has_a_default():
    # the daemon writes every field: `changed` left out would turn off the stale-answer check
    data = spec().to_dict()
    del data["eval"]["changed"]
    with pytest.raises(SpecError, match=r"spec eval: missing key\(s\) changed"):
        ChildSpec.from_dict(data)


def result() -> ChildResult:
    return ChildResult(
        TrainResult("/o", 3, 1, 90, 30, 1.5, 60.0, 0.2, 0.2, 1, "bf16", "cpu", [{"epoch": 1}]),
        GateResult(False, "forgot 2 of 7", {"candidate": {"new_exact": 1.0}}),
        {"train_s": 1.5, "evaluate_s": 2.0},
    )


def test_the_childs_result_reads_back_unchanged_and_a_wrong_key_is_an_error():
    sent = result().to_dict()
    got = ChildResult.from_dict(json.loads(json.dumps(sent)))
    assert got == result() and got.gate.reason == "forgot 2 of 7" and got.train.steps == 3
    sent["gate"]["promoted"] = sent["gate"].pop("promote")
    with pytest.raises(SpecError, match=r"result gate: unknown key\(s\) promoted; missing"):
        ChildResult.from_dict(sent)
    sent = result().to_dict()
    del sent["train"]["history"]
    with pytest.raises(SpecError, match=r"result train: missing key\(s\) history"):
        ChildResult.from_dict(sent)
    sent = result().to_dict()
    sent["timing"] = {"train_s": 1.5}
    with pytest.raises(SpecError, match="result timing: expected train_s and evaluate_s"):
        ChildResult.from_dict(sent)


def test_the_child_refuses_a_spec_it_does_not_understand(tmp_path):
    data = spec().to_dict()
    data["eval"]["doc_check"] = []
    (tmp_path / "spec.json").write_text(json.dumps(data))
    done = subprocess.run(
        [sys.executable, "-m", "evertune.adapters.child", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "spec eval: unknown key(s) doc_check" in done.stderr
    assert not (tmp_path / "result.json").exists()
