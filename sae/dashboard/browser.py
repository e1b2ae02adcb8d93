"""The system's headless Chromium (Debian's `chromium` + `chromium-driver`), driven by Selenium with
the driver given explicitly, so nothing is downloaded: for the browser tests and the benchmark.
`make browser` installs the two packages (as root, like the SLURM ones)."""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) paths on PATH (or /usr/lib/chromium), or None."""
    browser = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    driver = next((shutil.which(name) for name in DRIVERS if shutil.which(name)), None)
    if driver is None and Path("/usr/lib/chromium/chromedriver").is_file():
        driver = "/usr/lib/chromium/chromedriver"
    return (browser, driver) if browser and driver else None


@contextlib.contextmanager
def headless_chromium(width: int = 1500, height: int = 1100):
    """A Selenium WebDriver on headless Chromium that records the page's console (get_log("browser"))."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_chromium()
    if found is None:
        raise RuntimeError("no chromium + chromedriver on PATH: run `make browser` (as root: apt-get install "
                           "chromium chromium-driver)")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager try to download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(found[1]))
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver) -> list[str]:
    """The page's console messages at level SEVERE (errors, failed loads) since the last call."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def open_seconds(driver, url: str) -> float:
    """Seconds from navigation to the page's load event (its scripts, the index data and the first
    table page included: they run before load)."""
    started = time.perf_counter()
    driver.get(url)
    return time.perf_counter() - started


PANEL_SCRIPT = """
const [id, done] = [arguments[0], arguments[arguments.length - 1]];
const started = performance.now();
location.hash = "latent=" + id;
(function wait() {
  const title = document.querySelector("#panel h2");
  if (title && title.textContent.startsWith("Latent " + id) && document.querySelector("#panel h3")) {
    done(performance.now() - started);
  } else if (performance.now() - started > 20000) {
    done(-1);
  } else {
    setTimeout(wait, 5);
  }
})();
"""


def panel_seconds(driver, latent: int) -> float:
    """Seconds from setting #latent=N until its panel is drawn (its data shard loaded if needed)."""
    driver.set_script_timeout(30)
    milliseconds = driver.execute_async_script(PANEL_SCRIPT, latent)
    if milliseconds < 0:
        raise RuntimeError(f"the panel of latent {latent} did not appear within 20 s")
    return milliseconds / 1000
