"""Debian's chromium driven by Selenium through Debian's chromedriver: headless, no downloads
(the driver's path is given, so Selenium Manager never runs)."""

from __future__ import annotations

import os
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_SECONDS = 15.0


def chromium(width: int = 1280, height: int = 1000, *, dark: bool = False) -> webdriver.Chrome:
    """A headless chromium; `quit()` it. `dark`: prefers-color-scheme: dark."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} missing: run scripts/install-system-deps.sh")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager, if ever asked: no downloads
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # as root (CI containers)
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        f"--window-size={width},{height}",
        *(["--force-dark-mode", "--blink-settings=preferredColorScheme=0"] if dark else []),
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=DriverService(str(CHROMEDRIVER)))
    if dark:
        driver.execute_cdp_cmd(
            "Emulation.setEmulatedMedia",
            {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
        )
    return driver


def wait(driver: WebDriver, timeout: float = WAIT_SECONDS) -> WebDriverWait[WebDriver]:
    return WebDriverWait(driver, timeout, poll_frequency=0.05)


def texts(driver: WebDriver, selector: str) -> list[str]:
    """The rendered text of every element matching `selector` (one round trip)."""
    script = "return [...document.querySelectorAll(arguments[0])].map((e) => e.innerText.trim())"
    found: list[str] = driver.execute_script(script, selector)
    return found


def user_rows(driver: WebDriver) -> list[str]:
    """The user names shown in every host's table."""
    return texts(driver, "#hosts tbody th.user")


def full_page_screenshot(driver: WebDriver, path: Path) -> Path:
    """The whole page (not only the viewport) as PNG."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    width = driver.execute_script("return document.documentElement.clientWidth")
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": min(int(height), 1400), "deviceScaleFactor": 1, "mobile": False},
    )
    driver.save_screenshot(str(path))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return path


def console_errors(driver: webdriver.Chrome) -> list[str]:
    """SEVERE entries of the browser's console (script errors, failed loads) so far."""
    entries: list[dict[str, str]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [entry["message"] for entry in entries if entry["level"] == "SEVERE"]
