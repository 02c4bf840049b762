"""The control API: a real server on a free loopback port, the real client over real HTTP.

`RecordingHandler` stands in for the daemon (which is wired to the API and tested in
test_daemon.py): it records each call and answers with canned dicts or a planted error.
"""

from __future__ import annotations

import grp
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest

from evertune.daemon.control.client import ControlClient, ControlError
from evertune.daemon.control.metrics import Metrics
from evertune.daemon.control.server import MAX_BODY, ControlServer
from evertune.daemon.control.token import ensure_token
from evertune.daemon.errors import UsageError
from evertune.store.errors import InvalidDomainError, RegistryError, SchemaError


class RecordingHandler:
    """The daemon's side of the API, reduced to recording calls; `fail` is raised if set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.fail: Exception | None = None
        self.unhealthy: str | None = None

    def _record(self, name: str, *args: Any) -> dict[str, Any]:
        self.calls.append((name, args))
        if self.fail is not None:
            raise self.fail
        return {"called": name, "args": list(args)}

    def status(self) -> dict[str, Any]:
        return self._record("status")

    def health(self) -> str | None:
        return self.unhealthy

    def train(self, domain: str, force: bool, from_base: bool) -> dict[str, Any]:
        return self._record("train", domain, force, from_base)

    def forget(self, domain: str, prompt_hashes: list) -> dict[str, Any]:
        return self._record("forget", domain, prompt_hashes)

    def rollback(self, domain: str, to: str | None) -> dict[str, Any]:
        return self._record("rollback", domain, to)

    def pin(self, domain: str, version: str) -> dict[str, Any]:
        return self._record("pin", domain, version)

    def unpin(self, domain: str, version: str) -> dict[str, Any]:
        return self._record("unpin", domain, version)

    def canary(self, domain: str, version, percent, minutes) -> dict[str, Any]:
        return self._record("canary", domain, version, percent, minutes)

    def reload(self) -> dict[str, Any]:
        return self._record("reload")

    def reconcile(self) -> dict[str, Any]:
        return self._record("reconcile")


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def server(tmp_path: Path, handler: RecordingHandler, metrics: Metrics):
    server = ControlServer(
        handler, port=0, token_path=tmp_path / "control.token", metrics_registry=metrics.registry
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def client(server: ControlServer):
    with ControlClient.from_home(server.token_path.parent, server.url) as client:
        yield client


@pytest.fixture
def raw(server: ControlServer):
    """A plain httpx client with no token."""
    with httpx.Client(base_url=server.url, trust_env=False) as raw:
        yield raw


def auth(server: ControlServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token}"}


# ---- public routes -------------------------------------------------------------------------


def test_healthz_answers_without_a_token(raw: httpx.Client, client: ControlClient) -> None:
    response = raw.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"ok": True}
    assert client.healthz() == {"ok": True}


def test_healthz_is_503_with_the_reason_when_the_daemon_is_unhealthy(
    raw: httpx.Client, client: ControlClient, handler: RecordingHandler
) -> None:
    handler.unhealthy = "the store writer thread died"
    response = raw.get("/healthz")
    assert response.status_code == 503
    assert response.json() == {"ok": False, "why": "the store writer thread died"}
    assert client.healthz() == {"ok": False, "why": "the store writer thread died"}


def test_metrics_answer_without_a_token_with_the_recorded_values(
    raw: httpx.Client, client: ControlClient, metrics: Metrics
) -> None:
    metrics.file_ingested("legal", "partial", examples=3, rejected=2)
    metrics.run_finished("legal", "promoted", seconds=42.0, tokens_per_s=1234.5)
    metrics.set_live("legal", 7)
    metrics.endpoint_state("http://127.0.0.1:8000", up=True, loaded=2)
    metrics.switch(0.02)
    metrics.published("legal", "ok", seconds=0.3)
    metrics.training("medical", active=True)

    response = raw.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = client.metrics_text()
    for line in [
        'evertune_examples_ingested_total{domain="legal"} 3.0',
        'evertune_examples_rejected_total{domain="legal"} 2.0',
        'evertune_files_ingested_total{domain="legal",outcome="partial"} 1.0',
        'evertune_training_runs_total{domain="legal",outcome="promoted"} 1.0',
        'evertune_training_tokens_per_second{domain="legal"} 1234.5',
        'evertune_training_in_progress{domain="legal"} 0.0',
        'evertune_training_in_progress{domain="medical"} 1.0',
        'evertune_live_version{domain="legal"} 7.0',
        'evertune_vllm_up{endpoint="http://127.0.0.1:8000"} 1.0',
        'evertune_adapters_loaded{endpoint="http://127.0.0.1:8000"} 2.0',
        'evertune_adapter_switch_seconds_bucket{le="0.025"} 1.0',
        'evertune_adapter_switch_seconds_bucket{le="0.01"} 0.0',
        'evertune_publishes_total{domain="legal",outcome="ok"} 1.0',
        "evertune_publish_seconds_count 1.0",
        "evertune_training_seconds_sum 42.0",
    ]:
        assert line in text.splitlines(), line


def test_metrics_refuse_an_unknown_outcome_and_each_instance_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.file_ingested("legal", "ingested", examples=1)
    assert b'evertune_examples_ingested_total{domain="legal"} 1.0' in first.render()
    assert b'domain="legal"' not in second.render()
    with pytest.raises(ValueError, match="'promotd'"):
        first.run_finished("legal", "promotd")


# ---- the token -----------------------------------------------------------------------------


def test_requests_without_or_with_a_wrong_token_are_401(
    raw: httpx.Client, server: ControlServer, handler: RecordingHandler
) -> None:
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": server.token}]:
        response = raw.get("/v1/status", headers=headers)
        assert response.status_code == 401
        assert "control.token" in response.json()["error"]
        response = raw.post("/v1/train", json={"domain": "legal"}, headers=headers)
        assert response.status_code == 401
    assert handler.calls == []

    with ControlClient(server.url, "wrong") as wrong, pytest.raises(ControlError) as caught:
        wrong.train("legal")
    assert caught.value.status == 401
    assert "token" in str(caught.value)
    assert handler.calls == []


def test_token_file_is_created_0640_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "control.token"
    old_umask = os.umask(0o077)  # the mode must not depend on the umask
    try:
        token = ensure_token(path)
    finally:
        os.umask(old_umask)
    assert len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert ensure_token(path) == token


def test_token_file_gets_the_group_when_it_exists(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    path = tmp_path / "control.token"
    ensure_token(path, group=group)
    assert path.stat().st_gid == os.getgid()
    # A group that does not exist is not an error: the file keeps the owner's group.
    ensure_token(tmp_path / "other.token", group="no-such-group-evertune")


def test_world_readable_or_empty_token_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "control.token"
    path.write_text("secret\n")
    path.chmod(0o644)
    with pytest.raises(ControlError, match=r"readable or writable by every user.*chmod 640"):
        ensure_token(path)
    path.chmod(0o640)
    path.write_text("  \n")
    with pytest.raises(ControlError, match=r"control\.token is empty"):
        ensure_token(path)


def test_from_home_without_a_token_says_the_daemon_writes_it(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match=r"no control token at .*control\.token.*evertune run"):
        ControlClient.from_home(tmp_path, "http://127.0.0.1:8420")


def test_from_home_with_an_unreadable_token_says_to_join_the_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "control.token").write_text("secret")

    def denied(self: Path, *args: Any, **kwargs: Any) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    # Tests run as root here, where chmod 000 would not stop the read.
    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ControlError, match=r"permission denied; join the `evertune` group"):
        ControlClient.from_home(tmp_path, "http://127.0.0.1:8420")


# ---- dispatch ------------------------------------------------------------------------------


def test_each_route_calls_the_handler_with_its_arguments(
    client: ControlClient, handler: RecordingHandler
) -> None:
    assert client.status() == {"called": "status", "args": []}
    assert client.train("legal") == {"called": "train", "args": ["legal", False, False]}
    client.train("legal", force=True)
    client.train("legal", from_base=True)
    client.forget("legal", ["00ff"])
    client.rollback("legal")
    client.rollback("legal", to="v0003")
    client.pin("legal", "v0002")
    client.unpin("legal", "v0002")
    client.canary("legal", "v0003", 10, 30)
    client.canary("legal", None, 100, None)
    client.reload()
    client.reconcile()
    assert handler.calls == [
        ("status", ()),
        ("train", ("legal", False, False)),
        ("train", ("legal", True, False)),
        ("train", ("legal", False, True)),
        ("forget", ("legal", ["00ff"])),
        ("rollback", ("legal", None)),
        ("rollback", ("legal", "v0003")),
        ("pin", ("legal", "v0002")),
        ("unpin", ("legal", "v0002")),
        ("canary", ("legal", "v0003", 10, 30)),
        ("canary", ("legal", None, 100, None)),
        ("reload", ()),
        ("reconcile", ()),
    ]


def test_bad_requests_are_400_naming_the_field(
    raw: httpx.Client, server: ControlServer, handler: RecordingHandler
) -> None:
    cases = [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"force": true}', "missing field 'domain'"),
        (b'{"domain": "legal", "force": "yes"}', "field 'force' must be a bool"),
        (b'{"domain": 3}', "field 'domain' must be a str"),
        (b'{"domain": "legal", "forse": true}', "unknown field 'forse'"),
    ]
    for body, message in cases:
        response = raw.post("/v1/train", content=body, headers=auth(server))
        assert response.status_code == 400, body
        assert message in response.json()["error"], body
    response = raw.post("/v1/pin", json={"domain": "legal"}, headers=auth(server))
    assert response.status_code == 400
    assert "missing field 'version'" in response.json()["error"]
    for body, message in [
        (b'{"domain": "legal", "percent": true}', "field 'percent' must be a number"),
        (b'{"domain": "legal", "percent": NaN}', "field 'percent' must be a number"),
        (b'{"domain": "legal", "minutes": Infinity}', "'minutes' must be a finite number"),
        (b'{"domain": "legal", "percent": "10"}', "field 'percent' must be a number"),
    ]:
        response = raw.post("/v1/canary", content=body, headers=auth(server))
        assert response.status_code == 400, body
        assert message in response.json()["error"], body
    assert handler.calls == []


def test_oversized_body_is_413(raw: httpx.Client, server: ControlServer) -> None:
    body = b'{"domain": "' + b"x" * MAX_BODY + b'"}'
    response = raw.post("/v1/train", content=body, headers=auth(server))
    assert response.status_code == 413


def test_unknown_path_is_404_and_wrong_method_is_405(
    raw: httpx.Client, server: ControlServer
) -> None:
    assert raw.get("/v1/nope", headers=auth(server)).status_code == 404
    assert raw.get("/v1/train", headers=auth(server)).status_code == 405
    assert raw.post("/v1/status", headers=auth(server)).status_code == 405
    assert raw.delete("/v1/pin", headers=auth(server)).status_code == 405
    assert raw.post("/healthz").status_code == 405


def test_usage_and_registry_errors_are_400_with_the_message(
    client: ControlClient, handler: RecordingHandler
) -> None:
    for error in [
        RegistryError("legal has no retired version v0009; see `evertune versions legal`"),
        UsageError("--to needs a version like v0003"),
        InvalidDomainError("'Legal!' is not a valid domain name"),
    ]:
        handler.fail = error
        with pytest.raises(ControlError) as caught:
            client.rollback("legal", to="v0009")
        assert caught.value.status == 400
        assert str(caught.value) == str(error)
        assert caught.value.kind == type(error).__name__


def test_other_evertune_errors_are_409(client: ControlClient, handler: RecordingHandler) -> None:
    handler.fail = SchemaError("evertune.db is from a newer evertune")
    with pytest.raises(ControlError, match="newer evertune") as caught:
        client.status()
    assert caught.value.status == 409
    assert caught.value.kind == "SchemaError"


def test_unexpected_error_is_500_with_a_generic_message_and_a_logged_traceback(
    client: ControlClient, handler: RecordingHandler, caplog: pytest.LogCaptureFixture
) -> None:
    handler.fail = RuntimeError("secret internals")
    with (
        caplog.at_level(logging.ERROR, logger="evertune.daemon.control.server"),
        pytest.raises(ControlError) as caught,
    ):
        client.reload()
    assert caught.value.status == 500
    assert "secret internals" not in str(caught.value)
    assert "internal error" in str(caught.value)
    assert any(r.exc_info and "secret internals" in str(r.exc_info[1]) for r in caplog.records)


# ---- binding and reaching ------------------------------------------------------------------


def test_non_loopback_host_is_refused_unless_allowed(tmp_path: Path) -> None:
    token_path = tmp_path / "control.token"
    with pytest.raises(ControlError, match=r"only listen on loopback.*allow_remote"):
        ControlServer(RecordingHandler(), host="0.0.0.0", token_path=token_path)
    ControlServer(RecordingHandler(), host="0.0.0.0", token_path=token_path, allow_remote=True)
    ControlServer(RecordingHandler(), host="::1", token_path=token_path)
    ControlServer(RecordingHandler(), host="localhost", token_path=token_path)


def test_unreachable_daemon_gives_the_clear_message() -> None:
    # A bound socket that does not listen: connecting to it is refused, and no one can take
    # the port in between.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with (
            ControlClient(url, "token", timeout=5) as client,
            pytest.raises(ControlError, match="cannot reach the evertune daemon") as caught,
        ):
            client.status()
    assert "is `evertune run` running?" in str(caught.value)
    assert caught.value.status is None


def test_stop_releases_the_port(tmp_path: Path) -> None:
    token_path = tmp_path / "control.token"
    first = ControlServer(RecordingHandler(), port=0, token_path=token_path)
    first.start()
    port = int(first.url.rsplit(":", 1)[1])
    assert port != 0
    with ControlClient.from_home(tmp_path, first.url) as client:
        assert client.healthz() == {"ok": True}
    first.stop()
    first.stop()  # idempotent

    with ControlServer(RecordingHandler(), port=port, token_path=token_path) as second:
        assert second.url == f"http://127.0.0.1:{port}"
        with ControlClient.from_home(tmp_path, second.url) as client:
            assert client.status() == {"called": "status", "args": []}


def test_port_in_use_is_a_clear_error(tmp_path: Path, server: ControlServer) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    other = ControlServer(RecordingHandler(), port=port, token_path=tmp_path / "control.token")
    with pytest.raises(ControlError, match=f"cannot listen on 127.0.0.1:{port}"):
        other.start()


def _raw_post(server: ControlServer, head: bytes, body: bytes, half_close: bool) -> bytes:
    """A POST written by hand (httpx always sends the whole body it announces)."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("half_close", [True, False], ids=["client-closed", "client-stalled"])
def test_a_body_shorter_than_its_content_length_is_400_without_a_traceback(
    server: ControlServer,
    handler: RecordingHandler,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    half_close: bool,
) -> None:
    from evertune.daemon.control import server as control

    monkeypatch.setattr(control._RequestHandler, "timeout", 1)  # the stalled client's wait
    body = b'{"domain": "legal"}'
    head = (
        f"POST /v1/train HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body) + 100}\r\n\r\n"
    ).encode()
    with caplog.at_level(logging.DEBUG, logger="evertune.daemon.control.server"):
        answer = _raw_post(server, head, body, half_close)
    status, _, rest = answer.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.0 400") or status.startswith(b"HTTP/1.1 400"), answer
    assert b"shorter than its Content-Length" in rest
    assert b"19 of 119 bytes" in rest
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert handler.calls == []


def test_a_deeply_nested_body_is_400_without_a_traceback(
    raw: httpx.Client,
    server: ControlServer,
    handler: RecordingHandler,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for body in (b"[" * 30_000 + b"]" * 30_000, b'{"a":' * 8_000 + b"1" + b"}" * 8_000):
        assert len(body) < MAX_BODY
        with caplog.at_level(logging.DEBUG, logger="evertune.daemon.control.server"):
            response = raw.post("/v1/train", content=body, headers=auth(server))
        assert response.status_code == 400, response.text
        assert "nested too deeply" in response.json()["error"]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert handler.calls == []
