"""The CLI without a daemon: exit codes, messages, files copied in, human and JSON status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import CHAT

from evertune.daemon.cli import main
from evertune.store.files import part_path


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("EVERTUNE_HOME", str(home))
    monkeypatch.delenv("EVERTUNE_CONFIG", raising=False)
    assert main(["init"]) == 0
    return home


def test_init_writes_config_and_inbox_and_says_where_to_drop(tmp_path, capsys):
    assert main(["init", str(tmp_path / "h")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "h" / "evertune.toml").exists()
    assert (tmp_path / "h" / "inbox").is_dir()
    assert f"drop files into {tmp_path / 'h' / 'inbox'}/<domain>/" in out
    assert main(["init", str(tmp_path / "h")]) == 0
    assert "kept existing" in capsys.readouterr().out


def test_ingest_all_good_exits_0_and_copies_the_source(home, tmp_path, capsys):
    src = tmp_path / "facts.jsonl"
    src.write_text(CHAT % (1, 1) + CHAT % (2, 2))
    assert main(["ingest", str(src), "--domain", "legal"]) == 0
    assert src.exists()
    assert (home / "done" / "legal" / "facts.jsonl").read_text() == src.read_text()
    assert "legal/facts.jsonl: ingested, 2 new examples" in capsys.readouterr().out


def test_ingest_same_content_again_is_a_duplicate_and_exits_0(home, tmp_path, capsys):
    src = tmp_path / "facts.jsonl"
    src.write_text(CHAT % (1, 1))
    assert main(["ingest", str(src), "--domain", "legal"]) == 0
    assert main(["ingest", str(src), "--domain", "legal"]) == 0
    out = capsys.readouterr().out
    assert "duplicate of facts.jsonl" in out
    assert (home / "done" / "legal" / "facts~2.jsonl").exists()


def test_ingest_with_rejected_records_exits_1_and_names_the_lines(home, tmp_path, capsys):
    src = tmp_path / "mixed.jsonl"
    src.write_text(CHAT % (1, 1) + '{"messages": []}\n' + "not json\n")
    assert main(["ingest", str(src), "--domain", "legal"]) == 1
    out = capsys.readouterr().out
    assert "1 new examples" in out and "2 records rejected" in out
    assert "line 2: empty conversation" in out
    assert "line 3: bad JSON" in out


def test_ingest_of_a_useless_file_exits_1_and_keeps_it_in_rejected(home, tmp_path, capsys):
    src = tmp_path / "blob.jsonl"
    src.write_bytes(b"\x00\x01\x02binary")
    assert main(["ingest", str(src), "--domain", "legal"]) == 1
    assert "binary file" in capsys.readouterr().out
    assert (home / "rejected" / "legal" / "blob.jsonl").exists()


def test_ingest_a_folder_takes_its_files(home, tmp_path):
    folder = tmp_path / "drop"
    folder.mkdir()
    (folder / "a.jsonl").write_text(CHAT % (1, 1))
    (folder / "b.jsonl").write_text(CHAT % (2, 2))
    (folder / ".hidden").write_text("x")
    assert main(["ingest", str(folder), "--domain", "legal"]) == 0
    assert sorted(p.name for p in (home / "done" / "legal").glob("*.jsonl")) == [
        "a.jsonl",
        "b.jsonl",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ingest", "{src}", "--domain", "Bad@Name"], "not a valid domain name"),
        (["ingest", "{src}", "--domain", "base"], "reserved"),
        (["ingest", "/no/such/file.jsonl", "--domain", "legal"], "no such file or folder"),
    ],
)
def test_ingest_usage_errors_exit_2_with_the_reason(home, tmp_path, capsys, args, message):
    src = tmp_path / "ok.jsonl"
    src.write_text(CHAT % (1, 1))
    assert main([a.format(src=src) for a in args]) == 2
    assert message in capsys.readouterr().err


def test_missing_domain_flag_is_a_usage_error(home, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["ingest", str(tmp_path)])
    assert exit_.value.code == 2


def test_bad_config_exits_2_naming_the_key(home, capsys):
    (home / "evertune.toml").write_text("[watch]\nsettle = 1\n")
    assert main(["status"]) == 2
    assert "unknown key 'watch.settle'" in capsys.readouterr().err


def test_status_shows_counts_errors_waiting_files_and_warnings(home, tmp_path, capsys):
    src = tmp_path / "a.jsonl"
    src.write_text(CHAT % (1, 1) + "oops\n")
    main(["ingest", str(src), "--domain", "legal"])
    (home / "inbox" / "legal" / "later.jsonl").write_text(CHAT % (3, 3))
    (home / "inbox" / "stray.jsonl").write_text(CHAT % (4, 4))
    capsys.readouterr()
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "daemon: not running" in out
    assert "domain legal: 1 examples (1 not yet trained on)" in out
    assert "1 ingested, 0 rejected, 0 duplicate, 1 waiting" in out
    assert "line 2: bad JSON" in out
    assert "stray.jsonl: files directly in inbox/ are not ingested" in out
    assert main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["domains"][0]["files"]["waiting"] == 1
    assert status["daemon"]["running"] is False
    assert len(status["warnings"]) == 1


def test_status_on_a_fresh_home_says_where_to_start(home, capsys):
    assert main(["status"]) == 0
    assert "no domains yet" in capsys.readouterr().out


def test_two_ingests_at_once_on_one_domain_both_finish(home, tmp_path):
    """Each waits for the other's write transaction instead of failing with "database is
    locked" (before: one of two crashed, 3 runs of 3). Three rounds, files large enough
    that the transactions overlap."""
    import os
    import subprocess
    import sys

    from evertune.store.db import open_db

    env = {**os.environ, "EVERTUNE_HOME": str(home)}
    for round_ in range(3):
        procs = []
        for who in ("a", "b"):
            src = tmp_path / f"{who}{round_}.jsonl"
            src.write_text(
                "".join(
                    json.dumps({"prompt": f"Q {who}{round_}-{i}", "completion": f"A{i}"}) + "\n"
                    for i in range(20000)
                )
            )
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "evertune.daemon.cli",
                        "ingest",
                        str(src),
                        "--domain=legal",
                    ],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, out
    db = open_db(home / "evertune.db", readonly=True)
    assert db.execute("SELECT count(*) FROM examples").fetchone()[0] == 6 * 20000


def test_an_os_error_is_one_clear_line_not_a_traceback(home, tmp_path, capsys):
    """A folder where the inbox's domain folder should be written: the copy fails."""
    src = tmp_path / "facts.jsonl"
    src.write_text(CHAT % (1, 1))
    blocker = part_path(home / "inbox" / "legal", "facts.jsonl")
    blocker.mkdir(parents=True)  # the copy's temporary name is taken by a folder
    assert main(["ingest", str(src), "--domain", "legal"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: [Errno 21] Is a directory") and "Traceback" not in err
    assert str(blocker) in err


def test_ingest_after_a_killed_copy_deletes_its_partial_copy(home, tmp_path, capsys):
    """Before: the `.part` of a command killed mid-copy stayed in the inbox for ever."""
    inbox = home / "inbox" / "legal"
    inbox.mkdir(parents=True)
    stale = inbox / ".facts.jsonl.999999999.part"  # no such process
    stale.write_text(CHAT % (1, 1)[:20])
    src = tmp_path / "facts.jsonl"
    src.write_text(CHAT % (1, 1))
    assert main(["ingest", str(src), "--domain", "legal"]) == 0
    assert not stale.exists()
    assert sorted(p.name for p in inbox.iterdir()) == []
    assert (home / "done" / "legal" / "facts.jsonl").read_text() == src.read_text()


def test_ingest_again_after_a_kill_takes_the_copy_waiting_in_the_inbox(home, tmp_path, capsys):
    """Before: the copy left by a command killed before it was ingested stayed beside a
    second copy `facts~2.jsonl`, ingested as a duplicate of it."""
    src = tmp_path / "facts.jsonl"
    src.write_text(CHAT % (1, 1) + CHAT % (2, 2))
    inbox = home / "inbox" / "legal"
    inbox.mkdir(parents=True)
    (inbox / "facts.jsonl").write_text(src.read_text())  # copied, then the command was killed
    assert main(["ingest", str(src), "--domain", "legal"]) == 0
    assert "legal/facts.jsonl: ingested, 2 new examples" in capsys.readouterr().out
    assert sorted(p.name for p in (home / "done" / "legal").glob("*.jsonl")) == ["facts.jsonl"]
    assert list(inbox.iterdir()) == []


def test_ingest_of_a_file_with_a_250_byte_name_copies_and_stores_it(home, tmp_path, capsys):
    """Before: the copy's hidden temporary name `.<name>.<pid>.part` went past NAME_MAX:
    `File name too long`, nothing ingested."""
    import os

    src = tmp_path / ("f" * 244 + ".jsonl")
    assert len(os.fsencode(src.name)) == 250
    src.write_text(CHAT % (1, 1))
    assert main(["ingest", str(src), "--domain", "legal"]) == 0
    assert "ingested, 1 new examples" in capsys.readouterr().out
    src.write_text(CHAT % (2, 2))  # the same name with new content: `~2`, fitted too
    assert main(["ingest", str(src), "--domain", "legal"]) == 0
    assert "ingested, 1 new examples" in capsys.readouterr().out
    done = sorted((home / "done" / "legal").iterdir())
    assert len([p for p in done if p.name.endswith(".jsonl")]) == 2
    assert len([p for p in done if p.name.endswith(".report.json")]) == 2
    assert list((home / "inbox" / "legal").iterdir()) == []


def test_ingest_into_a_linked_domain_folder_is_refused_and_touches_nothing_there(
    home, tmp_path, capsys
):
    """Before: the command deleted the `.part` files in the folder the link points to, wrote
    its copy there, and ingested it from there."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    stale = outside / ".facts.jsonl.999999999.part"  # its process is gone
    stale.write_text("somebody else's")
    link = home / "inbox" / "legal"
    link.symlink_to(outside, target_is_directory=True)
    src = tmp_path / "facts.jsonl"
    src.write_text(CHAT % (1, 1))
    assert main(["ingest", str(src), "--domain", "legal"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"Error: {link} is a symbolic link (to {outside})")
    assert f"rm {link} && mkdir {link}" in err  # the safe next step
    assert sorted(p.name for p in outside.iterdir()) == [stale.name]
    assert not (home / "done" / "legal").exists()


def test_status_escapes_control_characters_in_names_so_no_line_can_be_forged(
    home, tmp_path, capsys
):
    """Before: a folder named with a newline printed a line of its own choosing."""
    forged = "x\ndomain legal: 999 examples (0 not yet trained on)\x1b[2K"
    (home / "inbox" / forged).mkdir()
    (home / "inbox" / forged / "a.jsonl").write_text(CHAT % (1, 1))
    src = tmp_path / "bad\rname.jsonl"
    src.write_text("oops\n")
    main(["ingest", str(src), "--domain", "legal"])
    capsys.readouterr()
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert not [line for line in lines if line.startswith("domain legal: 999")]
    assert "\x1b" not in out and "\r" not in out
    assert any("x\\ndomain legal: 999 examples" in line and "\\x1b[2K" in line for line in lines)
    assert any("bad\\rname.jsonl" in line for line in lines)
