"""The web chat page in real headless Chromium: type, see a streamed answer, screenshot.

Skips cleanly when /usr/bin/chromium (Debian ``chromium`` + ``chromium-driver``) or the
selenium package is absent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.test_serve_api import serve_model, start_server  # noqa: F401

CHROMIUM = Path("/usr/bin/chromium")
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists() or not Path(DRIVER).exists(),
                                reason="headless Chromium (/usr/bin/chromium + chromedriver) "
                                       "is not installed")


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1100,760"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _send(driver, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "input")
    box.clear()
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def _wait_done(driver, replies: int, timeout: float = 60):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) >= replies)
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")


@pytest.mark.slow
def test_chat_page_streams_and_keeps_the_conversation(browser, serve_model, tokenizer,
                                                      tmp_path):
    from selenium.webdriver.common.by import By

    server = start_server(serve_model, tokenizer, api_key="page-key")
    try:
        browser.get(server.url + "/")
        assert "slmkit chat" in browser.title
        # without the key the page says what to do
        _send(browser, "hello?")
        first = _wait_done(browser, 1)[0]
        assert "API key" in first.find_element(By.CLASS_NAME, "content").text
        key = browser.find_element(By.ID, "key")
        key.send_keys("page-key")
        browser.execute_script("document.getElementById('key').dispatchEvent("
                               "new Event('change'))")
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("40")
        # count how many times the reply text changes while it streams
        browser.execute_script("""
            window.__updates = 0;
            new MutationObserver(() => window.__updates++).observe(
                document.getElementById('log'), {subtree: true, characterData: true,
                                                 childList: true});""")
        _send(browser, "Write a function that adds two numbers.")
        replies = _wait_done(browser, 2)
        reply = replies[-1]
        content = reply.find_element(By.CLASS_NAME, "content")
        stats = reply.find_element(By.CLASS_NAME, "stats").text
        assert content.text and "error" not in content.get_attribute("class")
        assert "tok/s" in stats and "tokens" in stats
        assert browser.execute_script("return window.__updates") > 3  # streamed, not at once
        # a second turn sends the whole conversation
        _send(browser, "And subtract?")
        _wait_done(browser, 3)
        assert browser.execute_script("return history.length") == 4
        users = browser.find_elements(By.CSS_SELECTOR, ".msg.user")
        assert [u.find_element(By.CLASS_NAME, "content").text for u in users][-2:] == [
            "Write a function that adds two numbers.", "And subtract?"]
        out = Path(os.environ.get("SLM_SCREENSHOT_DIR", tmp_path)) / "chat_page.png"
        assert browser.save_screenshot(str(out)) and out.stat().st_size > 5000
    finally:
        server.stop()
