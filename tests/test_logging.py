"""The daemon's log: one line per message, and no line every 30 s from its own polling."""

from __future__ import annotations

import logging

from evertune.daemon.cli import OneLineFormatter, setup_daemon_logging
from evertune.daemon.vllm_process import _own_polling


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
