"""The status page and `evertune report`, from a real home (two versions trained on the tiny
model, one changed fact, one forget), drawn by a real headless browser: Debian's chromium
(installed by .ci/install), driven by Playwright."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import pytest
from helpers import Daemon, chat_jsonl, wait_for
from test_cycle import FACTS, LENIENT, write_config
from test_daemon import INGEST_ONLY, _read, evertune

from evertune.daemon.control.status_page import page_data
from evertune.store.db import open_db


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_base) -> Path:
    """v1 on four facts; v2 on two more and a changed answer; a forget (v3 rebuilt)."""
    tmp = tmp_path_factory.mktemp("page")
    home = tmp / "home"
    write_config(home, tiny_base, LENIENT)
    a, b = tmp / "a.jsonl", tmp / "b.jsonl"
    a.write_text(chat_jsonl(FACTS[:4]))
    b.write_text(chat_jsonl([*FACTS[4:6], (FACTS[0][0], "Changed.")]))
    for step in (
        ["ingest", str(a), "--domain", "vaults"],
        ["train", "vaults"],
        ["ingest", str(b), "--domain", "vaults"],
        ["train", "vaults"],
        ["forget", "vaults", "--prompt", FACTS[5][0]],
    ):
        out = evertune(home, *step)
        assert out.returncode == 0, (step, out.stdout, out.stderr)
    return home


def test_the_page_data_has_every_version_with_its_curves_and_seconds(home):
    db = open_db(home / "evertune.db", readonly=True)
    [dom] = page_data(db)["domains"]
    v1, v2, v3 = dom["versions"]
    assert [v["version"] for v in (v1, v2, v3)] == ["v0001", "v0002", "v0003"]
    assert (v2["forgotten"], v3["state"], v3["consolidated"]) == (True, "live", True)
    for v in (v1, v2, v3):
        assert v["loss"] and all(h["loss"] > 0 for h in v["loss"])
        assert v["train_s"] > 0 and v["evaluate_s"] > 0 and v["wait_s"] >= 0
    assert dom["summary"]["examples_superseded"] == 1
    assert [e["examples"] for e in dom["examples"]] == [4, 7]


def browser():
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("no chromium: .ci/install installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    return pw, pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])


def open_page(url: str):
    """(page, console errors, failed requests) once the plots are drawn."""
    pw, b = browser()
    page = b.new_page(viewport={"width": 1300, "height": 1000})
    errors: list[str] = []
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
    page.goto(url)
    page.wait_for_selector("#dom-vaults .versions .main-svg", timeout=30_000)
    return pw, b, page, errors


def drawn(page) -> dict[str, int]:
    """How many traces each plot of the domain drew."""
    return page.evaluate(
        """() => Object.fromEntries(["versions", "seconds", "loss", "examples"].map((k) =>
            [k, document.querySelectorAll(`#dom-vaults .${k} g.trace`).length]))"""
    )


def test_the_report_is_one_file_that_draws_offline(home, tmp_path):
    out = tmp_path / "r.html"
    r = evertune(home, "report", "vaults", "--out", str(out))
    assert r.returncode == 0, r.stderr
    html = out.read_text()
    assert "cdn" not in html.lower().split("<script>")[0]  # nothing fetched from outside
    pw, b, page, errors = open_page(out.as_uri())
    try:
        assert errors == []
        assert page.inner_text("#dom-vaults h2") == "vaults: live v0003"
        assert drawn(page) == {"versions": 2, "seconds": 4, "loss": 3, "examples": 1}
        assert "forgotten" in page.text_content("#dom-vaults table")  # in <details>
        # every title whole inside its plot (long centred ones were cut at both ends)
        cut = page.evaluate(
            """() => ["versions", "seconds", "loss", "examples"].filter((k) => {
                const plot = document.querySelector(`#dom-vaults .${k}`);
                const box = plot.getBoundingClientRect();
                const t = plot.querySelector(".gtitle").getBoundingClientRect();
                return t.width === 0 || t.left < box.left || t.right > box.right;
            })"""
        )
        assert cut == []
        ticks = page.evaluate(
            """() => [...document.querySelectorAll("#dom-vaults .examples .xtick text")]
                .map((t) => t.textContent)"""
        )
        assert ticks and all(re.fullmatch(r"[A-Z][a-z]{2} \d{1,2} \d\d:\d\d", t) for t in ticks), (
            ticks
        )
    finally:
        b.close()
        pw.stop()
    assert evertune(home, "report", "nope").returncode == 2


def test_the_daemon_serves_the_page_and_it_refreshes(home, tiny_base):
    training = (home / "evertune.toml").read_text()
    d = Daemon(home, INGEST_ONLY + training, stop_timeout=30).wait_locked()
    try:
        url = wait_for(lambda: _read(home / "control.url"), what="the control API").strip()
        assert httpx.get(f"{url}/status/data.json").json()["domains"][0]["name"] == "vaults"
        pw, b, page, errors = open_page(f"{url}/status")
        try:
            assert drawn(page)["loss"] == 3
            assert "no training running" in page.inner_text("#service")
            # a new file, ingested by the daemon: the page shows it without a reload
            (home / "inbox" / "vaults").mkdir(parents=True, exist_ok=True)
            (home / "inbox" / "vaults" / "c.jsonl").write_text(chat_jsonl([("New?", "Yes.")]))
            page.wait_for_function(
                "() => document.querySelector('#dom-vaults .info')"
                ".textContent.includes('1 not yet')",
                timeout=30_000,
            )
            assert errors == []
        finally:
            b.close()
            pw.stop()
    finally:
        assert d.stop() == 0
