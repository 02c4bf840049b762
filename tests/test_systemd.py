"""The systemd integration: the shipped units, sysusers and tmpfiles files, and sd_notify.

The units are checked with the real `systemd-analyze` (verify, security --offline) and
against the real CLI parser; the notifier talks to real unix datagram sockets that the
tests read, as systemd's NOTIFY_SOCKET would be. Skips only what needs a missing tool.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from evertune.daemon.cli import build_parser, cmd_run
from evertune.daemon.notify import Notifier
from evertune.store.layout import HomeLayout

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
UNIT = "evertune.service"
VLLM_UNIT = "evertune-vllm.service"
EXEC_START = "/opt/evertune/venv/bin/evertune --config /etc/evertune/evertune.toml run"
MAX_EXPOSURE = 2.5


# ---- reading the shipped files -------------------------------------------------------------
def parse_unit(name: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value given (a key may repeat), continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (SYSTEMD / name).read_text())
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service(name: str = UNIT) -> dict[str, list[str]]:
    return parse_unit(name)["Service"]


def one(name: str, key: str) -> str:
    (value,) = service(name)[key]
    return value


def config_lines(name: str) -> list[list[str]]:
    """The non-comment lines of a sysusers.d / tmpfiles.d file, split like the tools do."""
    lines = (SYSTEMD / name).read_text().splitlines()
    return [shlex.split(line) for line in lines if line.strip() and not line.startswith("#")]


def analyze(*args: str) -> subprocess.CompletedProcess:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (package systemd): cannot check the units")
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""}
    return subprocess.run(
        [tool, *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def runnable_copy(name: str, binary: Path, folder: Path) -> Path:
    """The unit with ExecStart's binary swapped for one that exists here (verify checks it)."""
    text = (SYSTEMD / name).read_text()
    text, count = re.subn(r"^ExecStart=\S+", f"ExecStart={binary}", text, flags=re.M)
    assert count == 1
    copy = folder / name  # same file name: verify takes the unit name from it
    copy.write_text(text)
    return copy


# ---- the units -----------------------------------------------------------------------------
def test_shipped_unit_runs_the_documented_venv_and_config():
    assert one(UNIT, "ExecStart") == EXEC_START
    install = (SYSTEMD / "INSTALL.md").read_text()
    assert "python3.11 -m venv /opt/evertune/venv" in install
    assert "/etc/evertune/evertune.toml" in install


def test_exec_start_is_evertune_run_with_the_etc_config():
    binary, *rest = shlex.split(one(UNIT, "ExecStart"))
    assert Path(binary).name == "evertune"  # the console script pyproject.toml installs
    args = build_parser().parse_args(rest)
    assert args.func is cmd_run
    assert args.config == "/etc/evertune/evertune.toml"


@pytest.mark.parametrize(
    ("name", "binary"),
    [(UNIT, Path(sys.executable).parent / "evertune"), (VLLM_UNIT, Path(sys.executable))],
)
def test_units_pass_systemd_analyze_verify(tmp_path, name, binary):
    if not binary.exists():
        pytest.skip(f"{binary} is not installed: nothing real to point ExecStart at")
    result = analyze("verify", str(runnable_copy(name, binary, tmp_path)))
    # verify returns 0 even for unknown keys and bad values, which it only prints: a clean
    # unit prints nothing at all. (systemd 252 does not resolve User=/Group=/
    # SupplementaryGroups= here, so the missing evertune user and group are no message.)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("name", [UNIT, VLLM_UNIT])
def test_exposure_is_at_most_2_5(name):
    result = analyze("security", "--offline=yes", str(SYSTEMD / name))
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_daemon_may_take_leases_and_nothing_else():
    unit = service()
    assert unit["AmbientCapabilities"] == ["CAP_LEASE"]
    assert unit["CapabilityBoundingSet"] == ["CAP_LEASE"]
    # A user namespace would make the kernel ignore CAP_LEASE (checked in the host namespace).
    assert "PrivateUsers" not in unit
    # torch's oneDNN and vLLM's CPU kernels need writable+executable memory.
    assert "MemoryDenyWriteExecute" not in unit
    assert one(UNIT, "Type") == "notify"
    assert one(UNIT, "NotifyAccess") == "main"
    assert "WatchdogSec" in unit


# ---- sysusers.d and tmpfiles.d agree with the units ----------------------------------------
def test_sysusers_and_tmpfiles_agree_with_the_unit():
    user, group = one(UNIT, "User"), one(UNIT, "Group")
    state = Path("/var/lib") / one(UNIT, "StateDirectory")
    config_dir = Path("/etc") / one(UNIT, "ConfigurationDirectory")

    sysusers = {(line[0], line[1]): line for line in config_lines("evertune.sysusers")}
    assert ("g", group) in sysusers
    assert sysusers[("u", user)][4] == str(state)  # the user's home is the state directory

    tmpfiles = {Path(line[1]): line for line in config_lines("evertune.tmpfiles")}
    assert tmpfiles[state][0] == "d"
    assert tmpfiles[state][2:5] == [one(UNIT, "StateDirectoryMode"), user, group]
    # setgid: what group members drop stays in the daemon's group
    assert tmpfiles[state / "inbox"][2:5] == ["2770", user, group]
    assert tmpfiles[config_dir][2:5] == [one(UNIT, "ConfigurationDirectoryMode"), "root", group]

    assert str(state) in service()["ReadWritePaths"]
    assert f"HOME={state}" in service()["Environment"]
    assert one(UNIT, "WorkingDirectory") == str(state)
    assert HomeLayout(state).inbox == state / "inbox"  # the daemon's own idea of the layout


def test_vllm_unit_reads_the_adapters_the_daemon_writes():
    group = one(UNIT, "Group")
    state = Path("/var/lib") / one(UNIT, "StateDirectory")
    vllm = service(VLLM_UNIT)
    assert vllm["SupplementaryGroups"] == [group]
    assert "PrivateDevices" not in vllm  # it needs the GPU's device nodes
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in vllm["Environment"]
    tmpfiles = {Path(line[1]) for line in config_lines("evertune.tmpfiles")}
    for folder in (HomeLayout(state).adapters, HomeLayout(state).models):
        assert folder in tmpfiles  # exists before either unit starts: binds need it
        assert str(folder) in one(VLLM_UNIT, "BindReadOnlyPaths").split()
        assert str(folder) in one(VLLM_UNIT, "ReadOnlyPaths").split()
    argv = shlex.split(one(VLLM_UNIT, "ExecStart"))
    for flag in ("--enable-lora", "--max-lora-rank", "--max-loras"):
        assert flag in argv
    # evertune's middleware: requests bound to a version at admission, admin routes keyed
    middleware = argv[argv.index("--middleware") + 1]
    module, name = middleware.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name).__name__ == "AdminGuard"


@pytest.mark.skipif(os.geteuid() != 0, reason="tmpfiles can only chown to the new user as root")
def test_sysusers_and_tmpfiles_create_the_user_and_folders(tmp_path):
    tools = [shutil.which("systemd-sysusers"), shutil.which("systemd-tmpfiles")]
    if None in tools:
        pytest.skip("systemd-sysusers/systemd-tmpfiles are not installed")
    (tmp_path / "etc").mkdir()
    for tool, name in zip(tools, ("evertune.sysusers", "evertune.tmpfiles"), strict=True):
        extra = ["--create"] if name.endswith("tmpfiles") else []
        result = subprocess.run(
            [tool, f"--root={tmp_path}", *extra, str(SYSTEMD / name)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
    passwd = (tmp_path / "etc/passwd").read_text().split(":")
    assert passwd[0] == "evertune"
    assert passwd[5:7] == ["/var/lib/evertune", "/usr/sbin/nologin\n"]
    uid, gid = int(passwd[2]), int(passwd[3])
    for path, mode, owner in [
        ("var/lib/evertune", 0o750, uid),
        ("var/lib/evertune/inbox", 0o2770, uid),
        ("etc/evertune", 0o750, 0),
    ]:
        st = (tmp_path / path).stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (mode, owner, gid), path


# ---- sd_notify through a real socket -------------------------------------------------------
@pytest.fixture
def listener(tmp_path):
    """(socket, NOTIFY_SOCKET value): a bound unix datagram socket, as systemd's would be."""
    # sun_path holds 107 bytes; long test names make tmp_path longer than that.
    folder = tmp_path if len(str(tmp_path)) < 90 else Path(tempfile.mkdtemp(prefix="sdn-"))
    path = folder / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    yield sock, str(path)
    sock.close()
    if folder != tmp_path:
        shutil.rmtree(folder)


def received(sock: socket.socket) -> str:
    return sock.recv(4096).decode("utf-8")


def test_ready_status_and_stopping_arrive_as_sent(listener):
    sock, address = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    assert notifier.ready()
    assert received(sock) == "READY=1"
    assert notifier.ready("watching /var/lib/evertune/inbox")
    assert received(sock) == "READY=1\nSTATUS=watching /var/lib/evertune/inbox"
    assert notifier.status("training legal: step 3/10")
    assert received(sock) == "STATUS=training legal: step 3/10"
    assert notifier.status("two\nlines")  # a newline would start a bogus field
    assert received(sock) == "STATUS=two lines"
    assert notifier.stopping()
    assert received(sock) == "STOPPING=1"
    assert notifier.watchdog()
    assert received(sock) == "WATCHDOG=1"


def test_reloading_carries_the_monotonic_clock_in_microseconds(listener):
    sock, address = listener
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert Notifier.from_env({"NOTIFY_SOCKET": address}).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = received(sock).split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_abstract_namespace_socket_is_reached_through_the_at_sign():
    name = f"evertune-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2)
        assert Notifier.from_env({"NOTIFY_SOCKET": f"@{name}"}).ready("up")
        assert received(sock) == "READY=1\nSTATUS=up"


def test_from_env_reads_the_process_environment_by_default(listener, monkeypatch):
    sock, address = listener
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert Notifier.from_env().stopping()
    assert received(sock) == "STOPPING=1"


def test_watchdog_pings_every_half_watchdog_usec_until_stopped(listener):
    sock, address = listener
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid())}
    notifier = Notifier.from_env(env)
    assert notifier.watchdog_interval == 0.2
    stop = threading.Event()
    thread = notifier.start_watchdog(stop)
    assert thread is not None and thread.daemon
    sock.settimeout(2)
    times = []
    try:
        for _ in range(6):
            assert received(sock) == "WATCHDOG=1"
            times.append(time.monotonic())
    finally:
        stop.set()
        thread.join(2)
    assert not thread.is_alive()
    gaps = sorted(b - a for a, b in itertools.pairwise(times))
    # every 0.2 s: not a busy loop (no gap much shorter), not at WATCHDOG_USEC itself (the
    # median well under 0.4 s; one late ping on a busy machine does not move it)
    assert gaps[0] > 0.15 and gaps[len(gaps) // 2] < 0.3, gaps
    while True:  # a ping sent as it stopped may still be queued
        sock.settimeout(0.05)
        try:
            received(sock)
        except TimeoutError:
            break
    sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        received(sock)  # stopped means stopped


def test_watchdog_skips_pings_while_unhealthy(listener):
    sock, address = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "100000"})
    healthy = threading.Event()
    stop = threading.Event()
    thread = notifier.start_watchdog(stop, healthy=healthy.is_set)
    assert thread is not None  # WATCHDOG_PID unset: the pings are for us
    try:
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            received(sock)
        healthy.set()
        sock.settimeout(2)
        assert received(sock) == "WATCHDOG=1"
    finally:
        stop.set()
        thread.join(2)


@pytest.mark.parametrize(
    "env",
    [
        {"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getppid())},  # meant for another pid
        {"WATCHDOG_USEC": "not a number"},
        {"WATCHDOG_USEC": "0"},
        {},
    ],
)
def test_no_watchdog_thread_unless_the_pings_are_wanted_from_us(listener, env):
    notifier = Notifier.from_env({"NOTIFY_SOCKET": listener[1], **env})
    assert notifier.watchdog_interval is None
    assert notifier.start_watchdog(threading.Event()) is None


def test_without_notify_socket_everything_is_a_no_op():
    notifier = Notifier.from_env({"WATCHDOG_USEC": "200000"})
    assert not notifier.enabled
    sent = [
        notifier.ready("up"),
        notifier.status("x"),
        notifier.stopping(),
        notifier.reloading(),
        notifier.watchdog(),
    ]
    assert sent == [False] * 5
    assert notifier.start_watchdog(threading.Event()) is None


@pytest.mark.parametrize(
    "address", ["{tmp}/no-such-socket", "relative/notify", "@evertune-nobody-listens-{uuid}"]
)
def test_unreachable_socket_never_raises_and_warns_once(tmp_path, caplog, address):
    address = address.format(tmp=tmp_path, uuid=uuid.uuid4().hex)
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})
    with caplog.at_level(logging.WARNING, logger="evertune.daemon.notify"):
        sent = [
            notifier.ready(),
            notifier.status("x"),
            notifier.reloading(),
            notifier.watchdog(),
            notifier.stopping(),
        ]
    assert sent == [False] * 5
    warnings = [r for r in caplog.records if r.name == "evertune.daemon.notify"]
    assert len(warnings) == 1
    assert address in warnings[0].getMessage()
