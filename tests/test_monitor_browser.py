"""The monitoring panel of the web page in real headless Chromium: live tiles and chart
from /metrics, and each reply's confidence. Skips without Chromium (see test_serve_browser)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.test_serve_api import serve_model, start_server  # noqa: F401
from tests.test_serve_browser import _send, _wait_done, browser, pytestmark  # noqa: F401


@pytest.mark.slow
def test_monitor_panel_shows_live_figures(browser, serve_model, tokenizer, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = start_server(serve_model, tokenizer)
    try:
        browser.get(server.url + "/")
        browser.find_element(By.ID, "monitor-toggle").click()
        assert browser.find_element(By.ID, "monitor").is_displayed()
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("16")
        _send(browser, "Say something.")
        reply = _wait_done(browser, 1)[-1]
        stats = reply.find_element(By.CLASS_NAME, "stats").text
        assert "mean logprob" in stats
        # the tiles fill in from /metrics: confidence at once, the rate after two polls
        WebDriverWait(browser, 20).until(
            lambda d: d.find_element(By.ID, "m-logprob").text not in ("", "–")
            and d.find_element(By.ID, "m-rate").text not in ("", "–"))
        assert float(browser.find_element(By.ID, "m-logprob").text) <= 0
        assert browser.find_element(By.ID, "m-flags").text.endswith("%")
        assert browser.execute_script("return series.length") >= 2
        out = Path(os.environ.get("SLM_SCREENSHOT_DIR", tmp_path)) / "monitor_panel.png"
        assert browser.save_screenshot(str(out)) and out.stat().st_size > 5000
    finally:
        server.stop()
