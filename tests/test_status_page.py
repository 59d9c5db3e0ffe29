"""The status page at /, driven in a real headless Chromium (Debian's chromium + chromedriver).

Set TABSERVE_SCREENSHOT=1 to refresh docs/images/status-page.png on purpose; every run saves
a screenshot in its pytest tmp dir.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from helpers import Server, ServerFactory
from tabserve.server.handlers.pages import status_page
from tabserve.store.passwords import add_user

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.browser


DOCS_SCREENSHOT = Path(__file__).parent.parent / "docs" / "images" / "status-page.png"
STATIC = Path(__file__).parent.parent / "tabserve" / "server" / "static"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def add(x: list[float], y: list[float]) -> list[float]:
    """Add two columns row by row."""
    return [a + b for a, b in zip(x, y, strict=True)]


# What TabPy's client sends as `schema`: the str() of a Python dict, not JSON.
ADD_SCHEMA = str(
    {
        "input": {
            "type": "object",
            "properties": {
                "x": {"type": "number", "description": "first column"},
                "y": {"type": "number", "description": "second column"},
            },
            "required": ["x", "y"],
        },
        "output": {"type": "number", "description": "the sum"},
    }
)


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="tabserve-chromium-")
    for flag in (
        "--headless=new",
        "--no-sandbox",  # root in CI
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1100,1400",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_server(server_factory: ServerFactory) -> Server:
    return server_factory(TABPY_EVALUATE_TIMEOUT="20")


def wait_for(condition: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {condition}")
        time.sleep(0.1)


def refreshes(driver: webdriver.Chrome) -> int:
    return int(driver.find_element(By.TAG_NAME, "body").get_attribute("data-refreshes") or 0)


def text(driver: webdriver.Chrome, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def texts(driver: webdriver.Chrome, selector: str) -> list[str]:
    """The text of every element ``selector`` matches, read in one script: the page
    re-renders on every refresh, and elements found one call earlier may be gone."""
    script = "return [...document.querySelectorAll(arguments[0])].map((e) => e.innerText)"
    return list(driver.execute_script(script, selector))


def severe_logs(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def open_page(driver: webdriver.Chrome, server: Server) -> None:
    driver.get(server.url + "/?refresh=0.5")
    start = refreshes(driver)
    wait_for(lambda: refreshes(driver) > start)


def deploy(server: Server, name: str, func: object, **extra: object) -> None:
    body = {
        "name": name,
        "type": "model",
        "archive": base64.b64encode(cloudpickle.dumps(func)).decode(),
        "description": "Adds two columns",
        "docstring": func.__doc__,  # type: ignore[attr-defined]
        **extra,
    }
    answer = server.post("/endpoints", json=body)
    assert answer.status_code == 201, answer.text


def test_page_loads_without_console_errors(browser: webdriver.Chrome, page_server: Server) -> None:
    browser.get_log("browser")  # start from a clean log
    open_page(browser, page_server)
    wait_for(lambda: refreshes(browser) >= 3)  # a few refresh cycles, not just the first
    assert text(browser, "server-name") == "tabserve"
    assert text(browser, "server-version") == page_server.get("/info").json()["server_version"]
    features = set(texts(browser, "#features li"))
    assert {"auth: off", "TLS: off", "evaluate: on", "sandbox: none: self-check passed"} <= features
    assert browser.find_element(By.ID, "login").is_displayed() is False
    assert severe_logs(browser) == []


def csp_sources(policy: str) -> dict[str, list[str]]:
    directives = (part.split() for part in policy.split(";") if part.strip())
    return {name: sources for name, *sources in directives}


def test_inline_blocks_are_allowed_by_their_hashes_and_nothing_else(page_server: Server) -> None:
    # TabPy's landing page has its CSS and script inline (TabPy's test_url.py checks for
    # <style> and <script>); the policy allows exactly these two blocks, nothing else inline.
    answer = page_server.get("/")
    page = answer.text
    styles = re.findall(r"<style>(.*?)</style>", page, re.S)
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert styles == [(STATIC / "status.css").read_text()]
    assert scripts == [(STATIC / "status.js").read_text()]
    assert "/assets/" not in page and "<script " not in page and '<link rel="stylesheet' not in page

    def source(block: str) -> str:
        digest = base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()
        return f"'sha256-{digest}'"

    policy = csp_sources(answer.headers["Content-Security-Policy"])
    assert policy["style-src"] == [source(styles[0])]
    assert policy["script-src"] == [source(scripts[0])]
    assert policy["default-src"] == ["'self'"] and policy["connect-src"] == ["'self'"]
    assert "unsafe" not in answer.headers["Content-Security-Policy"]
    # The separate files keep the no-inline policy.
    asset = page_server.get("/assets/status.js")
    assert csp_sources(asset.headers["Content-Security-Policy"])["script-src"] == ["'self'"]


def test_a_file_that_cannot_be_inlined_stops_the_start(tmp_path: Path) -> None:
    for name in ("index.html", "status.css", "status.js"):
        (tmp_path / name).write_text((STATIC / name).read_text())
    assert status_page(tmp_path).body.count(b"<script>") == 1
    (tmp_path / "status.js").write_text("const closing = '</script>';")
    with pytest.raises(RuntimeError, match="cannot inline status.js"):
        status_page(tmp_path)


def test_chromium_runs_the_inline_blocks_and_refuses_other_inline_code(
    browser: webdriver.Chrome, page_server: Server
) -> None:
    open_page(browser, page_server)
    browser.get_log("browser")  # start from a clean log
    wait_for(lambda: refreshes(browser) >= 2)  # the inline script runs (and keeps running)
    # The inline style sheet applies: status.css gives the body a maximum width.
    assert browser.execute_script("return getComputedStyle(document.body).maxWidth") == "1000px"
    assert severe_logs(browser) == []  # no Content-Security-Policy refusals of our blocks
    # An injected inline script has no allowed hash, so Chromium refuses to run it.
    browser.execute_script(
        "const s = document.createElement('script');"
        "s.textContent = 'window.injected = true;';"
        "document.body.append(s);"
    )
    assert browser.execute_script("return window.injected === true") is False
    refused = severe_logs(browser)
    assert any("Content Security Policy" in entry["message"] for entry in refused), refused


def test_deployed_endpoint_appears_with_snippets(
    browser: webdriver.Chrome, page_server: Server
) -> None:
    open_page(browser, page_server)
    assert browser.find_elements(By.CSS_SELECTOR, "[data-endpoint='add']") == []
    deploy(page_server, "add", add, schema=ADD_SCHEMA)

    card = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "[data-endpoint='add']"))[0]
    assert "Add two columns row by row." in card.text
    assert "Adds two columns" in card.text
    model = card.find_element(By.CSS_SELECTOR, "[data-snippet='model']").text
    script = card.find_element(By.CSS_SELECTOR, "[data-snippet='script']").text
    assert model == 'MODEL_EXTENSION_REAL("add", "x,y", SUM([X]), SUM([Y]))'
    assert script == (
        "SCRIPT_REAL(\"return tabpy.query('add', _arg1, _arg2)['response']\", SUM([X]), SUM([Y]))"
    )
    # The Python-repr schema is shown as readable JSON.
    card.find_element(By.TAG_NAME, "summary").click()
    schema = card.find_element(By.CSS_SELECTOR, "pre.schema").text
    assert '"description": "first column"' in schema

    # The snippets are what Tableau would send, and they work against this server.
    query = page_server.post("/query/add", json={"data": {"x": [1, 2], "y": [10, 20]}})
    assert query.json()["response"] == [11, 22]
    evaluate = page_server.evaluate(
        "return tabpy.query('add', _arg1, _arg2)['response']", _arg1=[1, 2], _arg2=[10, 20]
    )
    assert evaluate.json() == [11, 22]

    assert severe_logs(browser) == []


def test_counters_move_after_requests(
    browser: webdriver.Chrome, page_server: Server, tmp_path: Path
) -> None:
    open_page(browser, page_server)
    assert browser.find_element(By.ID, "metrics").is_displayed()
    assert text(browser, "uptime").endswith("s")
    before = int(text(browser, "m-requests"))
    # A few bursts across refreshes, so that the chart has several points.
    for burst in range(5):
        for _ in range(5):
            script = "import time; time.sleep(_arg1); return _arg1"
            assert page_server.evaluate(script, _arg1=0.01 * burst).status_code == 200
        time.sleep(0.6)
    wait_for(lambda: int(text(browser, "m-requests")) >= before + 25)
    # The latency chart got a point for the interval that saw the requests.
    wait_for(lambda: "ms over" in text(browser, "m-latency"))
    routes = browser.find_element(By.ID, "routes").text
    assert "/evaluate" in routes
    save_screenshot(browser, tmp_path)
    assert severe_logs(browser) == []


def test_recent_jobs_and_the_cache_hit_rate_are_shown(
    browser: webdriver.Chrome, page_server: Server
) -> None:
    open_page(browser, page_server)
    body = {"script": "return 1 / 0", "data": {}}
    failed = page_server.post("/evaluate", json=body, headers={"Prefer": "respond-async"})
    job_id = failed.json()["job"]["id"]
    row = wait_for(lambda: [r for r in texts(browser, "#jobs tbody tr")
                            if job_id[:12] in r and "failure" in r])[0]  # fmt: skip
    assert "/evaluate" in row
    cached = {"script": "return 5", "data": {}, "max_age": 60}
    for _ in range(4):
        assert page_server.post("/evaluate", json=cached).status_code == 200
    wait_for(lambda: "%" in text(browser, "m-cache"))
    assert severe_logs(browser) == []


def save_screenshot(driver: webdriver.Chrome, tmp_path: Path) -> None:
    shot = tmp_path / "status-page.png"
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1100, max(900, int(height) + 40))
    assert driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("TABSERVE_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        DOCS_SCREENSHOT.write_bytes(shot.read_bytes())


def test_with_auth_the_page_asks_for_credentials(
    browser: webdriver.Chrome, server_factory: ServerFactory, tmp_path: Path
) -> None:
    passwords = tmp_path / "passwords.txt"
    add_user(passwords, "analyst", "page-pass")
    server = server_factory(TABPY_PWD_FILE=str(passwords))
    browser.get(server.url + "/?refresh=0.5")
    # The shell is public; the API is not, so the page shows its own form (no browser prompt).
    login = wait_for(lambda: browser.find_element(By.ID, "login").is_displayed())
    assert login
    assert not browser.find_element(By.ID, "content").is_displayed()

    browser.find_element(By.ID, "login-user").send_keys("analyst")
    browser.find_element(By.ID, "login-password").send_keys("wrong")
    browser.find_element(By.ID, "login-submit").click()
    wait_for(lambda: "Wrong username or password" in text(browser, "login-error"))

    browser.find_element(By.ID, "login-user").clear()
    browser.find_element(By.ID, "login-user").send_keys("analyst")
    browser.find_element(By.ID, "login-password").clear()
    browser.find_element(By.ID, "login-password").send_keys("page-pass")
    start = refreshes(browser)
    browser.find_element(By.ID, "login-submit").click()
    wait_for(lambda: refreshes(browser) > start)
    assert browser.find_element(By.ID, "content").is_displayed()
    assert not browser.find_element(By.ID, "login").is_displayed()
    assert "auth: on" in texts(browser, "#features li")
    # Later refreshes keep working with the credentials the page holds.
    wait_for(lambda: refreshes(browser) > start + 2)
    assert browser.find_element(By.ID, "content").is_displayed()
