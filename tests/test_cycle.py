"""`evertune train` end to end on a tiny model: select, train in a child, gate, register."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import chat_jsonl

from evertune.daemon.cli import main
from evertune.store.db import open_db

FACTS = [
    (f"What is the code of vault {i}?", f"The code of vault {i} is {1000 + 37 * i}.")
    for i in range(8)
]

# (a random tiny model's answers repeat the trained numbers anywhere: no bleed check either)
LENIENT = (
    "[gate]\nmin_learned = 0.0\ndrift_tolerance = 100.0\neasy_alpha = 0.0\nold_tolerance = 100.0\n"
    "max_bleed = 100000\n"
)
# What a random tiny model cannot pass: it must reproduce every new answer.
STRICT = "[gate]\nmin_learned = 1.0\n"


def write_config(home: Path, tiny_base: Path, gate: str, epochs: int = 2) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "evertune.toml").write_text(
        f'[model]\npath = "{tiny_base}"\nreference_limit = 9\n'
        f"[train]\nmax_epochs = {epochs}\nmin_epochs = 1\nrow_len = 128\nrows_per_step = 2\n"
        'max_seq_len = 128\nprecision = "fp32"\ngeneral_per_epoch = 2\nlr = 0.01\n' + gate
    )


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_base) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("EVERTUNE_HOME", str(home))
    monkeypatch.delenv("EVERTUNE_CONFIG", raising=False)
    write_config(home, tiny_base, LENIENT)
    return home


def drop_facts(tmp_path: Path, facts, name: str) -> Path:
    src = tmp_path / name
    src.write_text(chat_jsonl(facts))
    assert main(["ingest", str(src), "--domain", "vaults"]) == 0
    return src


def versions(capsys) -> list[dict]:
    capsys.readouterr()
    assert main(["versions", "vaults", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_nothing_new_to_train_on_exits_4(home, capsys):
    assert main(["train", "vaults"]) == 4
    assert "no example that no version was trained on" in capsys.readouterr().out


def test_v1_is_promoted_then_v2_trains_from_v1_with_replay(home, tmp_path, capsys):
    drop_facts(tmp_path, FACTS[:4], "a.jsonl")
    assert main(["train", "vaults"]) == 0
    assert "vaults v0001: promoted, now live" in capsys.readouterr().out
    drop_facts(tmp_path, FACTS[4:], "b.jsonl")
    assert main(["train", "vaults"]) == 0
    [v1, v2] = versions(capsys)
    assert (v1["state"], v2["state"], v2["parent"]) == ("retired", "live", "v0001")
    # 4 new + the 4 older ones less a quarter held out to measure forgetting
    assert v1["examples"] == 4 and v2["examples"] == 7
    meta = json.loads((Path(v2["path"]) / "meta.json").read_text())
    assert meta["parent"] == "v0001" and meta["train"]["parent_adapter"] == v1["path"]
    # an increment learns at half the first version's rate (train.increment_lr_scale)
    first = json.loads((Path(v1["path"]) / "meta.json").read_text())
    assert meta["train"]["lr"] == first["train"]["lr"] / 2 == 0.005
    assert meta["base_model"]["sha256"] and meta["examples"]["replay"] == 3
    assert set(v2["metrics"]) >= {"candidate", "live", "base", "drift", "train"}
    db = open_db(home / "evertune.db", readonly=True)
    roles = dict(
        db.execute(
            "SELECT role, count(*) FROM version_examples v JOIN versions s"
            " ON s.id = v.version_id WHERE s.number = 2 GROUP BY role"
        )
    )
    assert roles == {"new": 4, "replay": 3, "heldout": 1}
    assert (
        db.execute("SELECT count(*) FROM examples WHERE first_version_id IS NULL").fetchone()[0]
        == 0
    )
    capsys.readouterr()
    assert main(["status", "--json"]) == 0
    [dom] = json.loads(capsys.readouterr().out)["domains"]
    assert dom["live_version"] == "v0002" and dom["examples_new"] == 0


def test_a_refused_candidate_is_kept_rejected_and_never_live(home, tmp_path, tiny_base, capsys):
    write_config(home, tiny_base, STRICT, epochs=1)
    drop_facts(tmp_path, FACTS[:3], "a.jsonl")
    assert main(["train", "vaults"]) == 3
    out = capsys.readouterr().out
    assert "vaults v0001: refused" in out and "gate.min_learned" in out
    [v1] = versions(capsys)
    assert v1["state"] == "rejected" and "min_learned" in v1["reason"]
    assert Path(v1["path"]).is_dir()  # the folder and number are kept for inspection
    db = open_db(home / "evertune.db", readonly=True)
    assert (
        db.execute("SELECT count(*) FROM examples WHERE first_version_id IS NULL").fetchone()[0]
        == 3
    )  # still new: the next run tries again
    # `status` says what became of the newest version, since no version is live
    capsys.readouterr()
    assert main(["status"]) == 0
    [line] = [x for x in capsys.readouterr().out.splitlines() if "last version" in x]
    assert line.startswith("  last version: v0001 refused: learned ") and "min_learned" in line
    assert main(["status", "--json"]) == 0
    [dom] = json.loads(capsys.readouterr().out)["domains"]
    assert dom["live_version"] is None
    assert (
        dom["last_version"]["outcome"] == "refused"
        and "min_learned" in (dom["last_version"]["reason"])
    )


def test_killed_training_leaves_no_visible_version(home, tmp_path, tiny_base, capsys):
    write_config(home, tiny_base, LENIENT, epochs=200)
    drop_facts(tmp_path, FACTS, "a.jsonl")
    env = {**os.environ, "EVERTUNE_HOME": str(home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "evertune.daemon.cli", "train", "vaults"],
        env=env,
        start_new_session=True,
        stderr=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    db = open_db(home / "evertune.db", readonly=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        row = db.execute("SELECT step FROM runs ORDER BY id DESC LIMIT 1").fetchone()
        if row and row[0] >= 2:
            break
        time.sleep(0.2)
    else:
        pytest.fail("training never reported progress")
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its training child, mid-run
    proc.wait(30)
    assert not (home / "adapters" / "vaults" / "v0001").exists()
    write_config(home, tiny_base, LENIENT)
    assert main(["train", "vaults"]) == 0  # the next run closes the interrupted one
    [v1, v2] = versions(capsys)
    assert v1["state"] == "rejected" and "interrupted" in v1["reason"]
    assert v2["state"] == "live" and v2["parent"] is None
    assert not [p for p in (home / "adapters" / "vaults").iterdir() if p.name.startswith(".")]


def test_an_increment_refused_for_damage_is_repaired_from_where_it_stopped(
    home, tmp_path, tiny_base, capsys
):
    drop_facts(tmp_path, FACTS[:6], "a.jsonl")
    assert main(["train", "vaults"]) == 0
    # From now on any drift is damage: the increment learns (min_learned 0) but is refused.
    # A small replay (1 of the 5 older examples not held out) tells the two attempts apart.
    write_config(home, tiny_base, "[gate]\nmin_learned = 0.0\ndrift_tolerance = 0.0\n")
    config = (home / "evertune.toml").read_text()
    (home / "evertune.toml").write_text(
        config.replace("[train]\n", "[train]\nreplay_ratio = 0.5\nreplay_min = 0\n")
    )
    drop_facts(tmp_path, FACTS[6:], "b.jsonl")
    main(["train", "vaults"])
    [_, v2] = versions(capsys)
    meta = json.loads((Path(v2["path"]) / "meta.json").read_text())
    assert meta["retried"] is True and meta["consolidated"] is False
    assert not meta["increment_gate"]["promote"] and "drift" in meta["increment_gate"]["reason"]
    # repaired: trained on from the refused increment (kept in the run's folder meanwhile)
    run_dir = Path(meta["train"]["parent_adapter"])
    assert run_dir.name == "increment" and run_dir.parent.parent == home / "runs"
    assert not run_dir.exists()  # removed once the repair is done
    assert meta["parent"] == "v0001"
    assert meta["train"]["general_per_epoch"] == 48  # train.general_when_drifting
    assert meta["train"]["lr"] == 0.005  # the increment's rate (train.increment_lr_scale)
    # its new examples start learned: one pass over the domain's examples an epoch
    assert meta["increment_gate"] and meta["train"]["new_passes"] == 1
    db = open_db(home / "evertune.db", readonly=True)
    roles = dict(
        db.execute(
            "SELECT role, count(*) FROM version_examples v JOIN versions s"
            " ON s.id = v.version_id WHERE s.number = 2 GROUP BY role"
        )
    )
    # the held-out older example joined the one replayed; another one is held out instead:
    # what the retry trains on grows with the new data, not with the domain
    assert roles == {"new": 2, "replay": 2, "heldout": 1}
    assert meta["examples"]["replay"] == 2 and meta["examples"]["heldout_old"] == 1


def test_a_first_version_refused_for_damage_is_repaired_too(home, tmp_path, tiny_base, capsys):
    # any drift is damage; the first version learns (min_learned 0) but is refused, and is
    # trained on from where it stopped instead of leaving the file unserved
    write_config(home, tiny_base, "[gate]\nmin_learned = 0.0\ndrift_tolerance = 0.0\n")
    drop_facts(tmp_path, FACTS[:4], "a.jsonl")
    main(["train", "vaults"])
    [v1] = versions(capsys)
    meta = json.loads((Path(v1["path"]) / "meta.json").read_text())
    assert meta["retried"] is True and meta["parent"] is None
    assert not meta["increment_gate"]["promote"] and "drift" in meta["increment_gate"]["reason"]
    assert Path(meta["train"]["parent_adapter"]).name == "increment"
    assert meta["train"]["general_per_epoch"] == 48  # train.general_when_drifting


def test_a_repair_replays_the_bleeding_questions_and_their_neighbours(home, tiny_base):
    """A candidate that answered general questions with the new facts' names is repaired
    with the base model's own answers to those questions and the general prompts nearest
    them in every epoch (the gate's other easy questions stay held out)."""
    from types import SimpleNamespace

    from evertune.adapters.contract import ChildSpec, EvalSpec, TrainSpec
    from evertune.adapters.gate import GateResult
    from evertune.daemon import config as cfg
    from evertune.daemon.training.cycle import CycleContext, _repair_spec
    from evertune.daemon.training.selection import Picked
    from evertune.store.layout import HomeLayout

    layout = HomeLayout(home)
    c = CycleContext(None, cfg.load(), layout, "vaults", None, None, None, False, run_id=7)
    c.version = SimpleNamespace(number=1, name="v0001")
    c.staging().mkdir(parents=True)
    france = {"id": "g0007", "category": "easy", "prompt": "What is the capital of France?"}
    japan = {"id": "g0126", "category": "easy", "prompt": "What is the capital of Japan?"}
    general = [
        {**france, "answer": "The capital of France is Paris.", "expected": "paris"},
        {**japan, "answer": "The capital of Japan is Tokyo.", "expected": "tokyo"},
    ]
    spec = ChildSpec(
        TrainSpec(str(tiny_base), str(c.staging()), new=[{"kind": "chat", "messages": []}]),
        EvalSpec(general=general),
    )
    said = "The capital of France is Port Castellan."
    gate = GateResult(
        False,
        "answers 1 general question(s) with names ... gate.max_bleed",
        {"candidate": {"bleed": [{"prompt": france["prompt"], "answer": said}]}},
    )
    repaired, _ = _repair_spec(c, spec, Picked([], [], [], []), gate)
    assert repaired.train.anchor_prompts == ["What is the capital of France?"]
    assert repaired.train.general == [
        {
            "kind": "chat",
            "messages": [
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is Paris."},
            ],
        }
    ]
    assert Path(repaired.train.parent_adapter) == layout.run_dir(7) / "increment"


def test_a_cycle_trains_on_as_much_at_any_domain_size():
    """The examples a cycle trains and checks depend on the new data, not on how many older
    examples the domain holds (30 new against 300 or 30,000 older), the retry included:
    on the shipped defaults, twice as many replayed as new, 16 held out."""
    from evertune.daemon.config_learning import GateConfig, TrainConfig
    from evertune.daemon.training.selection import repair_sample, sample_old

    t, g = TrainConfig(), GateConfig()
    new = 30
    sizes = {}
    for n_old in (300, 30_000):
        old = [(i, {"kind": "text", "text": f"example {i}"}) for i in range(n_old)]
        replay, held = sample_old(old, new, t.replay_ratio, t.replay_min, g.old_holdout, seed=0)
        held_ids = {i for i, _ in held}
        rest = [p for p in old if p[0] not in held_ids]
        again, held2 = repair_sample(replay, held, rest, seed=1)
        sizes[n_old] = (len(replay), len(held), len(again), len(held2))
        assert not {i for i, _ in held2} & {i for i, _ in again}
    assert sizes[300] == sizes[30_000] == (60, 16, 76, 16)


@pytest.mark.parametrize("margin, expected", [(100.0, 5), (0.0, 2)])
def test_more_general_replay_when_the_live_version_nears_the_drift_tolerance(
    home, tmp_path, tiny_base, capsys, margin, expected
):
    """`drifting_margin` 100 over a tolerance of 50 (a drift of -5000%): any live version is
    near the tolerance, so the increment mixes
    in `general_when_drifting` general examples an epoch; 0: the usual `general_per_epoch`
    (2 here), as for version 1, which has no live version to look at."""
    config = (home / "evertune.toml").read_text()
    (home / "evertune.toml").write_text(
        config.replace(
            "[train]\n",
            f"[train]\ngeneral_when_drifting = 5\ndrifting_margin = {margin}\n",
        ).replace("drift_tolerance = 100.0", "drift_tolerance = 50.0")
    )
    drop_facts(tmp_path, FACTS[:4], "a.jsonl")
    assert main(["train", "vaults"]) == 0
    drop_facts(tmp_path, FACTS[4:], "b.jsonl")
    assert main(["train", "vaults"]) == 0
    v1, v2 = versions(capsys)
    assert v1["state"] == "retired" and v2["state"] == "live"
    per_epoch = [
        json.loads((Path(v["path"]) / "meta.json").read_text())["train"]["general_per_epoch"]
        for v in (v1, v2)
    ]
    assert per_epoch == [2, expected]


def test_two_training_processes_under_torchrun_make_a_version_like_one_process(
    tmp_path, monkeypatch, tiny_base, capsys
):
    """[train] launcher = "torchrun --nproc-per-node 2": two CPU processes (gloo), each on
    its shard of the rows, gradients all-reduced, rank 0 saves and evaluates. The version
    loads in peft, its meta.json says 2 processes trained it, and it learned the new
    examples about as well as one process on the same data: the last epoch's mean loss on
    them within 0.5 nats of the single-process run's (measured: 3.50 for one process in 12
    steps, 3.64 for two in 8 steps of twice the rows, both from ~11 at the first epoch)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    runs = {}
    for world in (1, 2):
        home = tmp_path / f"home{world}"
        monkeypatch.setenv("EVERTUNE_HOME", str(home))
        monkeypatch.delenv("EVERTUNE_CONFIG", raising=False)
        launcher = f'launcher = "torchrun --nproc-per-node {world}"\n' if world > 1 else ""
        write_config(home, tiny_base, LENIENT, 4)
        cfg = home / "evertune.toml"
        cfg.write_text(cfg.read_text().replace("[train]\n", f"[train]\n{launcher}"))
        drop_facts(tmp_path, FACTS, f"facts{world}.jsonl")
        assert main(["train", "vaults"]) == 0, capsys.readouterr()
        [v1] = versions(capsys)
        meta = json.loads((Path(v1["path"]) / "meta.json").read_text())
        runs[world] = meta["result"]
        assert meta["result"]["world_size"] == world
        assert v1["metrics"]["train"]["world_size"] == world
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), v1["path"])
    one, two = runs[1], runs[2]
    assert two["epochs"] == one["epochs"]
    assert abs(two["new_loss"] - one["new_loss"]) < 0.5, (one["history"], two["history"])
    assert two["new_loss"] < 4.0 and one["new_loss"] < 4.0  # from ~11 at the first epoch
