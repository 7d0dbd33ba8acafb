"""The page of `mlm-lightning serve` in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`)
driven by Selenium. Types a sentence with [MASK], sees the predictions, clicks an example, checks a phone-sized
window; screenshots go to $MLM_SERVE_SCREENSHOTS (a directory) or pytest's tmp dir."""

import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from tests.support.models import tiny_model
from tests.support.server import Server, post

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="the browser test needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tiny_model(tmp_path_factory.mktemp("page-model")), tmp_path_factory.mktemp("page-cwd"),
               "--examples", json.dumps(["the dog [MASK] a tree .", "a [MASK] helps the [MASK] ."]))
    yield s
    assert s.stop(signal.SIGTERM)[0] == 143


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="mlm-serve-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)  # a given driver: Selenium downloads none
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def shots(tmp_path) -> Path:
    path = Path(os.environ.get("MLM_SERVE_SCREENSHOTS") or tmp_path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def wait_for(driver, condition, timeout: float = 20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def candidates(driver) -> list[list[str]]:
    """The tokens shown for each mask, read in one script call (the page re-renders as results come)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#result:not([hidden]) .mask')]"
        ".map(m => [...m.querySelectorAll('.tok')].map(t => t.textContent))"
    )


@pytest.mark.slow  # (over 5 s: the default suite stays quick; CI runs it)
def test_type_a_sentence_and_see_predictions(server, browser, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(server.url + "/")
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#examples button")) == 2)
    box = browser.find_element(By.ID, "text")
    assert browser.switch_to.active_element == box  # focused on load: type at once
    box.send_keys("the cat [MASK] the river .")
    wait_for(browser, lambda d: len(candidates(d)) == 1 and len(candidates(d)[0]) == 5)
    _, expected = post(server.url, {"inputs": "the cat [MASK] the river ."})
    assert candidates(browser)[0] == [c["token_str"] for c in expected]
    filled = browser.find_element(By.ID, "filled").text
    assert filled == expected[0]["sequence"] and "[MASK]" not in filled
    widths = [b.size["width"] for b in browser.find_elements(By.CSS_SELECTOR, ".bar i")]
    assert widths == sorted(widths, reverse=True) and widths[0] > 50  # bars follow the scores, the best one full
    browser.save_screenshot(str(shots / "serve-page.png"))

    # keyboard: Ctrl+M inserts a second mask at the cursor; the page asks again and shows two lists
    box.send_keys(Keys.END, " ", Keys.CONTROL, "m", Keys.NULL)
    wait_for(browser, lambda d: len(candidates(d)) == 2)
    assert box.get_attribute("value").endswith("[MASK]")

    # no mask: a hint, not an error from the server
    box.clear()
    box.send_keys("no mask here")
    wait_for(browser, lambda d: "[MASK]" in d.find_element(By.ID, "status").text)


def test_examples_and_a_phone_sized_window(server, browser, shots):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#examples button")) == 2)
    browser.find_elements(By.CSS_SELECTOR, "#examples button")[1].click()
    wait_for(browser, lambda d: len(candidates(d)) == 2)  # the example has two masks
    assert browser.find_element(By.ID, "text").get_attribute("value") == "a [MASK] helps the [MASK] ."
    browser.set_window_size(390, 844)
    try:
        overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0  # nothing wider than a phone's screen: no sideways scrolling
        browser.save_screenshot(str(shots / "serve-page-phone.png"))
    finally:
        browser.set_window_size(1100, 900)
