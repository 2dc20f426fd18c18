"""What the monitor costs with the status page open: its process cpu over a minute, and the sampler's share.

Starts a real `appliance run` (default sample_interval), logs an admin into /status
in headless Chromium (Debian chromium + chromedriver, as the browser test) and keeps
the page open (it polls every 2 s) while the monitor process's cpu time is read
from /proc (psutil) at the start and end of the window. Prints one line:
the monitor's cpu % of one core, and how much of it the sampler thread spent.

    .venv/bin/python bench/status_page_cost.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.supervised import Appliance
from tests.integration.test_status_page_browser import ADMIN, ADMIN_PW, _browser


def _traffic(app: Appliance, stop: threading.Event) -> None:
    """About 5 requests a second (a few 404s and 401s among them) and a task every 10 s, every fourth failing."""
    from tests.integration.supervised import http_json

    app.cli("user", "create", "alice", "--password-stdin", stdin="Alice-pass-123\n")
    token = http_json(app.port, "POST", "/auth/login", {"username": "alice", "password": "Alice-pass-123"})[1]["data"]["access_token"]
    i = 0
    while not stop.wait(0.2):
        i += 1
        path = "/api/protected" if i % 7 else "/api/nowhere"
        http_json(app.port, "GET", path, token=token if i % 11 else None)
        if i % 50 == 0:
            data = {"fail_times": 1} if i % 200 == 0 else {"duration": 1}
            http_json(app.port, "POST", "/tasks/submit", {"task_type": "sample", "data": data}, token=token)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--traffic", action="store_true", help="send a few API requests a second and some tasks (one failing) meanwhile")
    ap.add_argument("--screenshot", help="save the page here at the end (docs/status-page.png is made this way)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="status-cost-"))
    app = Appliance(tmp, api_workers=2, task_workers=1, monitor=True).start()
    driver = None
    try:
        assert app.cli("user", "create", ADMIN, "--admin", "--password-stdin", stdin=ADMIN_PW + "\n").returncode == 0
        monitor = psutil.Process(next(r["pid"] for r in app.status()["processes"] if r["role"] == "monitor"))
        from selenium.webdriver.common.by import By

        driver = _browser(tmp)
        driver.get(f"http://127.0.0.1:{app.port}/status")
        driver.find_element(By.ID, "username").send_keys(ADMIN)
        driver.find_element(By.ID, "password").send_keys(ADMIN_PW)
        driver.find_element(By.ID, "login-submit").click()
        time.sleep(10)  # let the page settle into its polling

        def sampler_seconds() -> float:
            driver.get(f"http://127.0.0.1:{app.port}/status/api/snapshot")
            data = json.loads(driver.find_element(By.TAG_NAME, "body").text)["data"]
            driver.back()
            return float(data["sampler"]["cpu_seconds"])

        stop = threading.Event()
        if args.traffic:
            threading.Thread(target=_traffic, args=(app, stop), daemon=True).start()
        s0, c0, t0 = sampler_seconds(), sum(monitor.cpu_times()[:2]), time.monotonic()
        time.sleep(args.seconds)
        c1, t1 = sum(monitor.cpu_times()[:2]), time.monotonic()
        stop.set()
        if args.screenshot:
            driver.save_screenshot(args.screenshot)
        s1 = sampler_seconds()
        wall = t1 - t0
        print(
            f"monitor process: {100 * (c1 - c0) / wall:.2f} % of one core over {wall:.0f} s with the page open "
            f"(sampler thread {100 * (s1 - s0) / wall:.2f} %, the rest serving the page's polls and the browser)"
        )
    finally:
        if driver is not None:
            driver.quit()
        app.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
