"""The dashboard, /docs and /redoc in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium; nothing is downloaded), against a real ``stepd
serve`` that a training loop is stepping.

Every page must load without console errors and without a request to any other host.
Without a browser these tests skip, unless ``STEPD_REQUIRE_BROWSER=1`` (CI) makes that a
failure.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.support.server import Server, wait_until
from tests.support.training import SHAPES, Training

pytestmark = pytest.mark.e2e

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver", "/usr/lib/chromium/chromedriver")
TOKEN = "dashboard-s3cret"


def _find(names: tuple[str, ...]) -> str | None:
    for name in names:
        found = shutil.which(name) or (name if os.access(name, os.X_OK) else None)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    binary, driver = _find(BROWSERS), _find(DRIVERS)
    missing = None
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing = "selenium is not installed (pip install -e '.[test]')"
    if missing is None and (binary is None or driver is None):
        missing = "no chromium and chromium-driver (apt-get install chromium chromium-driver)"
    if missing is not None:
        if os.environ.get("STEPD_REQUIRE_BROWSER") == "1":
            pytest.fail(f"STEPD_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI containers run as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1600",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    chrome.set_page_load_timeout(30)
    try:
        yield chrome
    finally:
        chrome.quit()


def _clean(browser: Any, server: Server) -> None:
    """What the page logged since the last check has no error, and every request it made
    went to ``server`` (or stayed in the page: data:, blob:)."""
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    origin = urlsplit(server.url).netloc
    urls = [
        event["params"]["request"]["url"]
        for entry in browser.get_log("performance")
        if (event := json.loads(entry["message"])["message"])["method"]
        == "Network.requestWillBeSent"
    ]
    assert urls, "no request seen: the performance log is not working"
    foreign = [u for u in urls if urlsplit(u).scheme not in ("data", "blob")]
    foreign = [u for u in foreign if urlsplit(u).netloc != origin]
    assert not foreign, f"requests that left the server: {foreign}"


def _rows(browser: Any) -> list[str]:
    return browser.execute_script(
        "return [...document.querySelectorAll('#params tbody tr')].map(r => r.dataset.name)"
    )


def _points(browser: Any, group: str, metric: str) -> int:
    return browser.execute_script(
        "const p = window.stepdDashboard.plots[arguments[0]][arguments[1]];"
        "return p ? p.data[0].length : 0",
        group,
        metric,
    )


@pytest.fixture(scope="module")
def training(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Training]]:
    ckpt = tmp_path_factory.mktemp("dashboard") / "ckpt"
    with Server(ckpt, run=None, STEPD_STATS_EVERY="1") as server, Training(server.url) as loop:
        yield server, loop


def test_the_dashboard_shows_a_training_run_live(browser, training, tmp_path: Path) -> None:
    server, loop = training
    browser.get(f"{server.url}/?poll=250")
    assert wait_until(lambda: sorted(_rows(browser)) == sorted(SHAPES)), _rows(browser)
    # the run's plots have points, and more as iterations arrive
    assert wait_until(lambda: _points(browser, "run", "norms") >= 2)
    before = {m: _points(browser, "run", m) for m in ("norms", "ratio", "lr", "rate")}
    steps = loop.steps
    assert wait_until(lambda: loop.steps >= steps + 5)
    assert wait_until(lambda: all(_points(browser, "run", m) > n for m, n in before.items()))
    card = "return document.querySelector('[data-card=\"step\"]').textContent"
    assert wait_until(lambda: int(browser.execute_script(card)) >= steps + 5)  # live
    # a parameter's own plots, growing too
    # clicked from inside the page: a poll may replace the row between finding and clicking
    browser.execute_script(
        "document.querySelector('#params tr[data-name=\"decoder.weight\"] td').click()"
    )
    assert browser.find_element("id", "param-name").text == "decoder.weight"
    assert wait_until(lambda: _points(browser, "param", "norms") >= 2)
    seen = _points(browser, "param", "norms")
    assert wait_until(lambda: _points(browser, "param", "norms") > seen)
    # the filter (a regex over names) and sorting by a column
    browser.find_element("id", "filter").send_keys("bias$")
    assert sorted(_rows(browser)) == ["decoder.bias", "encoder.bias", "head.bias"]
    browser.find_element("id", "filter").clear()
    browser.execute_script("document.getElementById('filter').dispatchEvent(new Event('input'))")
    assert len(_rows(browser)) == len(SHAPES)
    browser.find_element("css selector", '#params th[data-key="name"]').click()  # now z→a
    assert _rows(browser) == sorted(SHAPES, reverse=True)
    # the worker that steps it
    workers = browser.find_element("css selector", "#workers tbody").text
    assert "trainer-0" in workers
    browser.save_screenshot(str(tmp_path / "dashboard.png"))
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    _clean(browser, server)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_api_docs_render_offline(browser, training, page: str) -> None:
    server, _ = training
    browser.get(f"{server.url}{page}")
    if page == "/docs":  # Swagger UI builds one block per operation from /openapi.json
        selector = ".swagger-ui .opblock"
    else:  # ReDoc: one section per operation
        selector = "[data-section-id^='tag/runs/operation']"
    assert wait_until(lambda: len(browser.find_elements("css selector", selector)) > 5, 20)
    _clean(browser, server)


def test_with_a_token_the_dashboard_asks_for_it_once(browser, tmp_path: Path) -> None:
    with (
        Server(tmp_path / "ckpt", run=None, STEPD_TOKEN=TOKEN) as server,
        Training(server.url, token=TOKEN),
    ):
        browser.get(f"{server.url}/?poll=250")
        login = browser.find_element("id", "login")
        assert login.is_displayed()
        assert not browser.find_element("id", "main").is_displayed()
        browser.find_element("id", "token").send_keys(TOKEN + "\n")
        assert wait_until(lambda: sorted(_rows(browser)) == sorted(SHAPES))
        assert not login.is_displayed()
        browser.refresh()  # the tab keeps it: no second prompt
        assert wait_until(lambda: len(_rows(browser)) == len(SHAPES))
        assert not browser.find_element("id", "login").is_displayed()
        stored = browser.execute_script("return sessionStorage.getItem('stepd-token')")
        assert stored == TOKEN
        _clean(browser, server)
        # a wrong token is refused and asked for again (set from a page without the
        # dashboard's polling, which would meet it first and drop it)
        browser.get(f"{server.url}/healthz")
        browser.execute_script("sessionStorage.setItem('stepd-token', 'wrong')")
        browser.get(f"{server.url}/?poll=250")
        assert wait_until(lambda: browser.find_element("id", "login").is_displayed())
        assert "refused" in browser.find_element("id", "login-reason").text
        browser.get_log("browser")  # the 401 the wrong token got is logged: expected here
