"""The training child's contract (adapters/contract.py): what the daemon writes is what the
child reads, and a key either side does not know is an error, not a silent default."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from evertune.adapters.contract import ChildSpec, EvalSpec, SpecError, TrainSpec


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
