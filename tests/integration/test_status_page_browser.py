"""The status page in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium) against `appliance run`.

No browser is downloaded: the Debian binaries are named explicitly (selenium's own
driver manager is never asked). Screenshots go to the test's tmp folder; with
APPLIANCE_STATUS_SCREENSHOT=<path> the dashboard screenshot is also written
there (that is how docs/status-page.png is made).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.supervised import Appliance, http_json, wait_until

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ADMIN, ADMIN_PW = "root", "Root-pass-123"
USER, USER_PW = "alice", "Alice-pass-123"


def _browser(tmp: Path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail("chromium and chromium-driver (Debian packages) are needed; .ci/services.sh installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1200,1500",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        f"--user-data-dir={tmp / 'profile'}",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER, log_output=str(tmp / "chromedriver.log")), options=opts)


@pytest.fixture
def appliance(tmp_path: Path) -> Iterator[Appliance]:
    app = Appliance(tmp_path, api_workers=2, task_workers=1, monitor=True)
    app.start()
    for name, pw, admin in ((ADMIN, ADMIN_PW, True), (USER, USER_PW, False)):
        r = app.cli("user", "create", name, *(["--admin"] if admin else []), "--password-stdin", stdin=pw + "\n")
        assert r.returncode == 0, r.stderr
    yield app
    app.stop()


def _wait(driver, predicate, timeout: float = 30.0, what: str = ""):
    value = wait_until(lambda: predicate(driver), timeout=timeout, step=0.25)
    assert value, f"timed out waiting for {what}"
    return value


def _loaded_urls(driver, origin: str) -> list[str]:
    """Every URL a document of `origin` asked for, and every http(s)/ws URL the browser asked for at all.

    Chromium's own pages (chrome://new-tab-page and its resources) show up in the log too; they are not ours.
    """
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") != "Network.requestWillBeSent":
            continue
        params = msg["params"]
        url = params["request"]["url"]
        if params.get("documentURL", "").startswith(origin + "/") or url.startswith(("http:", "https:", "ws:", "wss:")):
            urls.append(url)
    return urls


def test_status_page_in_a_real_browser(appliance: Appliance, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    origin = f"http://127.0.0.1:{appliance.port}"
    shots = tmp_path / "screenshots"
    shots.mkdir()
    driver = _browser(tmp_path)
    urls: list[str] = []
    try:
        # A wrong password: the form again, with the error.
        driver.get(origin + "/status")
        driver.find_element(By.ID, "username").send_keys(ADMIN)
        driver.find_element(By.ID, "password").send_keys("not-the-password")
        driver.find_element(By.ID, "login-submit").click()
        error = _wait(driver, lambda d: d.find_elements(By.ID, "login-error"), what="the login error")
        assert "invalid username or password" in error[0].text
        driver.save_screenshot(str(shots / "1-wrong-password.png"))

        # The admin logs in: the process table, a chart and the task section.
        driver.find_element(By.ID, "username").clear()
        driver.find_element(By.ID, "username").send_keys(ADMIN)
        driver.find_element(By.ID, "password").send_keys(ADMIN_PW)
        driver.find_element(By.ID, "login-submit").click()
        _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#processes tbody tr")) >= 6, what="the process table")
        roles = {r.find_elements(By.TAG_NAME, "td")[0].text for r in driver.find_elements(By.CSS_SELECTOR, "#processes tbody tr")}
        assert {"supervisor", "balancer", "api", "worker", "monitor + scheduler"} <= roles and "scheduler" not in roles
        hosts = [[td.text for td in r.find_elements(By.TAG_NAME, "td")] for r in driver.find_elements(By.CSS_SELECTOR, "#hosts tbody tr")]
        assert len(hosts) == 1 and hosts[0][0].endswith("(this host)") and hosts[0][1] == "up", hosts
        _wait(driver, lambda d: int(d.find_element(By.ID, "chart-rps").get_attribute("data-points") or 0) >= 2, what="a chart with points")
        assert driver.find_element(By.ID, "tasks").is_displayed()
        assert "database sqlite: round trip" in driver.find_element(By.ID, "stores-now").text
        assert "database" in driver.find_element(By.ID, "overview-lines").text
        driver.execute_script("window.__sameDocument = 'yes';")  # gone if the page ever reloads

        # API traffic and a failing task change the page without a reload.
        total_before = float(driver.find_element(By.ID, "api-now").get_attribute("data-total") or 0)
        status, body = http_json(appliance.port, "POST", "/auth/login", {"username": USER, "password": USER_PW})
        assert status == 200, body
        token = body["data"]["access_token"]
        for _ in range(60):
            assert http_json(appliance.port, "GET", "/api/protected", token=token)[0] == 200
        status, body = http_json(appliance.port, "POST", "/tasks/submit", {"task_type": "sample", "data": {"fail_times": 1}}, token=token)
        assert status == 200, body
        task_id = body["data"]["task_id"]
        _wait(
            driver,
            lambda d: float(d.find_element(By.ID, "api-now").get_attribute("data-total") or 0) >= total_before + 60,
            what="the request count to move",
        )
        _wait(
            driver,
            lambda d: d.find_elements(By.CSS_SELECTOR, f"#task-failures a[href='/status/api/tasks/{task_id}/logs']"),
            what="the failed task in the failure list",
        )
        assert "sample failure" in driver.find_element(By.ID, "task-failures").text
        driver.save_screenshot(str(shots / "2-dashboard.png"))
        readme_shot = os.environ.get("APPLIANCE_STATUS_SCREENSHOT")
        if readme_shot:
            driver.save_screenshot(readme_shot)

        # SIGKILL a task worker: its row is marked, then back up with a new pid.
        worker = next(r for r in appliance.status()["processes"] if r["role"] == "worker" and r["state"] == "up")
        os.kill(worker["pid"], signal.SIGKILL)

        def worker_row(d) -> tuple[str, list[str]]:
            """(class, cell texts) of the worker's row."""
            for row in d.find_elements(By.CSS_SELECTOR, "#processes tbody tr"):
                cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
                if cells and cells[0] == "worker":
                    return row.get_attribute("class") or "", cells
            return "", []

        def marked(d) -> bool:
            cls, _ = worker_row(d)
            return "bad" in cls or "restarted" in cls

        def back(d) -> bool:
            _, cells = worker_row(d)
            return bool(cells) and cells[3] == "up" and cells[2] != str(worker["pid"]) and cells[4] == "1"

        _wait(driver, marked, what="the killed worker marked")
        driver.save_screenshot(str(shots / "3-worker-killed.png"))
        _wait(driver, back, timeout=60, what="the worker back up with a new pid and one restart")
        overview = driver.find_element(By.ID, "overview-lines").text
        assert "worker[0] restarted" in overview, overview
        assert driver.execute_script("return window.__sameDocument;") == "yes"
        assert driver.execute_script("return performance.getEntriesByType('navigation').length;") == 1

        # On a phone-sized window nothing runs off the side (wide tables scroll inside their section).
        driver.set_window_size(390, 844)
        _wait(
            driver,
            lambda d: d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth;"),
            what="the page to fit a phone's width",
        )
        driver.save_screenshot(str(shots / "5-phone.png"))
        urls += _loaded_urls(driver, origin)
        # Logging out lands on the login form.
        driver.find_element(By.ID, "logout").click()
        _wait(driver, lambda d: d.find_elements(By.ID, "login-form"), what="the login form after logout")
        driver.save_screenshot(str(shots / "4-logged-out.png"))
        driver.get(origin + "/status/api/snapshot")
        assert "login_required" in driver.page_source
        urls += _loaded_urls(driver, origin)
    finally:
        driver.quit()
    assert urls and any(u.endswith("/status/static/status.js") for u in urls)
    foreign = [u for u in urls if urllib.parse.urlsplit(u)[:2] != urllib.parse.urlsplit(origin)[:2]]
    assert foreign == [], foreign
    assert sorted(p.name for p in shots.iterdir()) == [
        "1-wrong-password.png",
        "2-dashboard.png",
        "3-worker-killed.png",
        "4-logged-out.png",
        "5-phone.png",
    ]
