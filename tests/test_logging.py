"""The daemon's log: one line per message, and no line every 30 s from its own polling."""

from __future__ import annotations

import logging
import time

from helpers import free_port

from evertune.daemon.cli import OneLineFormatter, setup_daemon_logging
from evertune.daemon.config_sections import ServeConfig
from evertune.daemon.serving.vllm_process import EmbeddedVLLM, _own_polling


def test_a_file_name_with_a_newline_cannot_forge_a_log_line():
    name = "x.jsonl\n2026-11-29 10:00:00,000 ERROR evertune: all adapters deleted\r"
    record = logging.LogRecord(
        "evertune.store.ingest", logging.INFO, __file__, 1, "file %s: ingested", (name,), None
    )
    line = OneLineFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert "\n" not in line and "\r" not in line
    assert line == (
        "INFO evertune.store.ingest: file x.jsonl\\n2026-11-29 10:00:00,000 ERROR evertune:"
        " all adapters deleted\\r: ingested"
    )


def test_the_daemons_own_polling_is_not_logged_but_client_requests_are():
    polling = [
        'INFO:     127.0.0.1:49946 - "GET /v1/models HTTP/1.1" 200 OK',
        '(APIServer pid=1) INFO:     127.0.0.1:5 - "GET /health HTTP/1.1" 200 OK',
    ]
    kept = [
        'INFO:     127.0.0.1:49946 - "POST /v1/chat/completions HTTP/1.1" 200 OK',
        'INFO:     127.0.0.1:49946 - "GET /v1/models HTTP/1.1" 401 Unauthorized',
        'INFO:     127.0.0.1:49946 - "POST /v1/load_lora_adapter HTTP/1.1" 200 OK',
    ]
    assert all(_own_polling(line) for line in polling)
    assert not any(_own_polling(line) for line in kept)


def test_scheduler_and_http_client_info_lines_are_off(monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    names = ("", "apscheduler.executors", "apscheduler.scheduler", "httpx", "httpcore")
    for name in names:  # restored after the test
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "level", logger.level)
    setup_daemon_logging("info")
    for name in ("apscheduler.executors.default", "httpx"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO)
        assert logging.getLogger(name).isEnabledFor(logging.WARNING)
    assert logging.getLogger("evertune.daemon.service").isEnabledFor(logging.INFO)
    assert isinstance(root.handlers[0].formatter, OneLineFormatter)


def test_vllms_chatter_is_debug_its_errors_warn_and_an_exit_logs_its_last_lines(tmp_path, caplog):
    """A process printing what vLLM prints (banner, routes, access lines, then a crash):
    at INFO the daemon's log has only the error and, when it exits, its last lines."""
    script = tmp_path / "fake-vllm.sh"  # stands in for vLLM's output only
    script.write_text(
        "echo '(APIServer pid=1) INFO 12-06 13:53:36 [launcher.py:195] Route: /v1/models'\n"
        "echo 'INFO:     127.0.0.1:5 - \"POST /v1/chat/completions HTTP/1.1\" 200 OK'\n"
        "echo '(EngineCore pid=2) WARNING 12-06 13:53:37 [cpu.py:9] Pin memory is not supported'\n"
        "echo '(EngineCore pid=2) ERROR 12-06 13:53:38 [core.py:1] EngineCore failed to start.'\n"
        "echo 'RuntimeError: out of memory'\n"
        "exit 3\n"
    )
    cfg = ServeConfig(port=free_port(), start_timeout_seconds=30)
    own = tmp_path / "logs" / "vllm.log"
    proc = EmbeddedVLLM(tmp_path / "model", cfg, stop_timeout=5, output_log=own)
    proc.command = ["sh", str(script)]
    caplog.set_level(logging.DEBUG)
    proc.start()
    try:
        deadline = time.monotonic() + 20
        while proc.last_error is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.stop()
    assert proc.last_error.startswith("vLLM exited with code 3 after ")
    assert proc.last_error.endswith("; its last error: RuntimeError: out of memory")
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "evertune.vllm"]
    error = "vllm: (EngineCore pid=2) ERROR 12-06 13:53:38 [core.py:1] EngineCore failed to start."
    assert lines[0] == (logging.WARNING, error)  # at once, not only at the exit
    tail = [m for level, m in lines[1:] if level == logging.ERROR]
    assert len(tail) == 5 and tail[-1] == "vllm (last lines): RuntimeError: out of memory"
    assert all(level >= logging.WARNING for level, _ in lines)  # no banner, no access line
    written = own.read_text().splitlines()
    assert len(written) == 5 and written[1].endswith('"POST /v1/chat/completions HTTP/1.1" 200 OK')
