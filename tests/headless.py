"""Headless Debian Chromium through selenium + chromedriver, as root in a closed network (no sandbox, none
of Chromium's background requests, a fresh profile). Tests skip when any piece is missing."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000")


def chromium_paths() -> tuple[str | None, str | None]:
    """Debian's chromium binary and its chromedriver, or None where missing."""
    return shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


@contextlib.contextmanager
def chromium(profile: Path):
    """A selenium Chrome driver on Debian's chromium with a fresh --user-data-dir; skips the test if it cannot
    start."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium_paths()
    if not (binary and driver_path):
        pytest.skip("chromium and chromedriver are not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    except WebDriverException as exc:
        pytest.skip(f"chromium could not start: {exc.msg}")
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()
