"""Headless Chromium (Debian's ``chromium`` + ``chromium-driver``) against a real ``bentoml serve``.

Install the browser with ``apt-get install -y --no-install-recommends chromium chromium-driver``;
without it these tests skip. The flags keep Chromium off the network: it only talks to the
service on 127.0.0.1.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from harness.serving import Server, serve
from harness.versions import DIGITS_DIR, shifted_digits

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--hide-scrollbars",
    "--window-size=1200,900",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The digits model, and beside it ``digits-next`` (its head rolled by one: it answers each
    digit as the next), for the page's model picker."""
    folder = tmp_path_factory.mktemp("serve")
    second = shifted_digits(folder / "digits-next")
    env = {
        "VIT_ACCESS_LOG": "false",
        "VIT_MODELS": f"vit-digits=local-dir:{DIGITS_DIR},digits-next={second}",
    }
    with serve(env, folder) as running:
        yield running


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    chromium = shutil.which("chromium") or CHROMIUM
    chromedriver = shutil.which("chromedriver") or CHROMEDRIVER
    if not (Path(chromium).exists() and Path(chromedriver).exists()):
        pytest.skip(
            "needs Debian's chromium and chromium-driver "
            "(apt-get install -y --no-install-recommends chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: webdriver.Chrome, server: Server) -> Iterator[webdriver.Chrome]:
    """The page freshly loaded at /ui with its model panel filled in; console drained first."""
    browser.get_log("browser")
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    browser.get(f"{server.url}/ui")
    WebDriverWait(browser, 20).until(
        lambda d: d.find_element(By.ID, "model").get_attribute("data-state") == "ready"
    )
    yield browser


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where a test saves its screenshots."""
    folder = tmp_path / "screenshots"
    folder.mkdir()
    return folder
