"""The reference apps' page in a real browser: headless Chromium driven by selenium.

Deselected unless asked for: ``pytest tests -m browser --pairing flask-gunicorn,...``.
They need Debian's ``chromium`` and ``chromium-driver`` (``apt-get install chromium
chromium-driver``; ``$CHROMIUM`` and ``$CHROMEDRIVER`` name others) and selenium;
without them they fail, saying so. Every wait is bounded. The browser resolves no
host name, so nothing that a page loads can come from another machine.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import Deployment, post

try:
    from selenium import webdriver
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
        WebDriverException,
    )
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    UNSTABLE = (NoSuchElementException, StaleElementReferenceException)  # while a page changes
    SELENIUM_MISSING: str | None = None
except ImportError as exc:  # said by the tests, should they be selected
    SELENIUM_MISSING = f"{exc}: pip install selenium"

pytestmark = pytest.mark.browser

WAIT = 15.0  # seconds, the bound of every wait for the browser
MAX_RELOADS = 100  # page loads on new connections until two workers have served it
CHROMIUM_ARGS = [
    "--headless=new",
    "--window-size=1024,800",
    "--disable-dev-shm-usage",  # containers' /dev/shm is small
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # the deployment only
]
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"

Browser = Callable[..., "webdriver.Chrome"]


def executable(variable: str, name: str, package: str) -> str:
    path = shutil.which(os.environ.get(variable) or name)
    if not path:
        pytest.fail(
            f"the browser tests need {name} (${variable} names another): on Debian "
            f"`apt-get install {package}`",
            pytrace=False,
        )
    return path


@pytest.fixture
def open_browser(tmp_path: Path) -> Iterator[Browser]:
    """``open_browser(javascript=True)``: a headless Chromium, quit at teardown.

    Without selenium, chromium or its driver, the test calling it fails (not skips).
    """
    drivers: list[webdriver.Chrome] = []

    def open_browser(javascript: bool = True) -> webdriver.Chrome:
        if SELENIUM_MISSING:
            pytest.fail(f"the browser tests need selenium: {SELENIUM_MISSING}", pytrace=False)
        options = webdriver.ChromeOptions()
        options.binary_location = executable("CHROMIUM", "chromium", "chromium")
        chromedriver = executable("CHROMEDRIVER", "chromedriver", "chromium-driver")
        for arg in CHROMIUM_ARGS:
            options.add_argument(arg)
        if os.geteuid() == 0:
            options.add_argument("--no-sandbox")  # Chromium's sandbox does not run as root
        if not javascript:
            prefs = {"profile.managed_default_content_settings.javascript": 2}
            options.add_experimental_option("prefs", prefs)
        # A driver path given: selenium does not look for (or download) one itself.
        log = tmp_path / f"chromedriver-{len(drivers)}.log"
        driver = webdriver.Chrome(options, Service(chromedriver, log_output=str(log)))
        drivers.append(driver)
        driver.set_page_load_timeout(WAIT)
        driver.set_script_timeout(WAIT)
        return driver

    yield open_browser
    for driver in drivers:
        driver.quit()


def text(browser: webdriver.Chrome, selector: str) -> str:
    try:
        return browser.find_element(By.CSS_SELECTOR, selector).text
    except WebDriverException as exc:
        # Found in the page a click was leaving: chromedriver may say so in other words.
        if "does not belong to the document" in (exc.msg or ""):
            raise StaleElementReferenceException(exc.msg) from exc
        raise


def wait_for_count(browser: webdriver.Chrome, expected: int, after: str) -> None:
    WebDriverWait(browser, WAIT, ignored_exceptions=UNSTABLE).until(
        lambda b: text(b, "#count") == str(expected),
        f"the page to show the count {expected} after {after}",
    )


def javascript_ran(browser: webdriver.Chrome) -> bool:
    """The page's script marks the page: <html class="js">."""
    return bool(browser.find_elements(By.CSS_SELECTOR, "html.js"))


def test_the_page_counts_with_every_worker(deployment: Deployment, open_browser: Browser) -> None:
    browser = open_browser()
    browser.get(f"{deployment.url}/")
    assert javascript_ran(browser)
    before = int(text(browser, "#count"))

    browser.execute_script("window.stayed = true")  # gone if the page is loaded again
    browser.find_element(By.ID, "increment").click()
    wait_for_count(browser, before + 1, "a click on Increment")
    assert f"raised the count to {before + 1}." in text(browser, ".flash")
    assert browser.execute_script("return window.stayed === true"), "not updated in place"

    raised = post(f"{deployment.url}/increment", timeout=30).json()["count"]  # as curl
    assert raised == before + 2, "the page and /increment count apart"
    browser.refresh()
    wait_for_count(browser, raised, "curl -X POST /increment and a reload")
    assert "raised the count" not in browser.page_source, "a flash shows once"

    browser.find_element(By.ID, "reset").click()
    wait_for_count(browser, 0, "a click on Reset")
    assert "reset the count to 0." in text(browser, ".flash")

    # A browser keeps its connection, and with it the worker: ask for new ones.
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Connection": "close"}})
    workers: set[str] = set()
    for _ in range(MAX_RELOADS):
        browser.refresh()
        workers = {li.text for li in browser.find_elements(By.CSS_SELECTOR, "#workers li")}
        assert text(browser, "#pid") in workers, "the worker that served the page is not listed"
        if len(workers) >= 2:
            break
    assert len(workers) >= 2, f"{MAX_RELOADS} loads of the page listed only workers {workers}"


def test_the_buttons_work_without_javascript(deployment: Deployment, open_browser: Browser) -> None:
    browser = open_browser(javascript=False)
    browser.get(f"{deployment.url}/")
    assert not javascript_ran(browser), "JavaScript is on"
    before = int(text(browser, "#count"))

    browser.find_element(By.ID, "increment").click()  # the form posts; the browser follows
    wait_for_count(browser, before + 1, "a click on Increment (post, redirect, get)")
    assert f"raised the count to {before + 1}." in text(browser, ".flash")
    assert browser.current_url == f"{deployment.url}/"

    browser.find_element(By.ID, "reset").click()
    wait_for_count(browser, 0, "a click on Reset (post, redirect, get)")
    assert "reset the count to 0." in text(browser, ".flash")


@pytest.mark.only(framework="fastapi")  # the one with API docs
@pytest.mark.parametrize(
    ("path", "operation"),
    [("/docs", ".opblock-summary-path"), ("/redoc", "[data-section-id^='operation/']")],
)
def test_the_api_docs_render_without_other_sites(
    deployment: Deployment, open_browser: Browser, path: str, operation: str
) -> None:
    browser = open_browser()
    browser.get(deployment.url + path)
    WebDriverWait(browser, WAIT, ignored_exceptions=UNSTABLE).until(
        lambda b: len(b.find_elements(By.CSS_SELECTOR, operation)) >= 10,
        f"{path} to show the API's operations",
    )
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert any(url.endswith(".js") for url in loaded), loaded
    # Redoc's script shows its maker's logo from their site: an image the page does
    # without (no host name resolves here), and the one thing it asks of another site.
    ours = set(loaded) - {REDOC_LOGO} if path == "/redoc" else set(loaded)
    assert all(url.startswith(f"{deployment.url}/") for url in ours), loaded
