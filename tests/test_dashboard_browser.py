"""The dashboard in a real browser: Debian's headless Chromium driven by Selenium.

* a replayed run's pages load with no console error (a blocked script or style, a failed
  request or a JavaScript error would be one);
* a round that completes in a running ``shoal launch`` appears on the page without a reload;
* the rollback button moves the real model store's production pointer with the operator
  token and the page shows it; without the token it is refused and nothing moves.

scripts/setup.sh installs ``chromium`` and ``chromium-driver``; the tests skip only where they
are not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from selenium.common.exceptions import (NoSuchElementException,  # noqa: E402
                                        StaleElementReferenceException)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from shoal.cli import main  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SMALL = ["--set", 'data.dataset="synthetic"', "--set", 'model.name="logreg"',
         "--set", "deploy.over_selection=1.0", "--set", "deploy.min_fraction=1.0",
         "--set", "deploy.checkin_interval_s=0.3"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("chromium and chromium-driver are not installed (scripts/setup.sh "
                    "installs them as root: apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=1200,1000",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _text(driver, element_id: str) -> str:
    try:
        return driver.find_element(By.ID, element_id).text
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def _click(driver, selector: str) -> None:
    """Click the element now matching ``selector`` (the page re-renders as data arrives)."""
    for _ in range(20):
        try:
            driver.find_element(By.CSS_SELECTOR, selector).click()
            return
        except (NoSuchElementException, StaleElementReferenceException):
            time.sleep(0.1)
    raise AssertionError(f"nothing to click at {selector}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_replayed_run_loads_with_no_console_errors(browser, tmp_path):
    out = tmp_path / "runs"
    assert main(["run", *SMALL[:4], "--clients", "20", "--per-round", "5", "--rounds", "3",
                 "--out", str(out), "-q", "--json"]) == 0
    (run,) = out.iterdir()
    final = json.loads((run / "summary.json").read_text())["final_accuracy"]
    proc = subprocess.Popen([sys.executable, "-m", "shoal.cli", "dashboard", str(run),
                             "--address", "127.0.0.1:0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read()
        browser.get_log("browser")  # start clean
        browser.get(url)
        WebDriverWait(browser, 15).until(
            lambda d: _text(d, "last-accuracy") == f"{final:.4f}")
        assert _text(browser, "run-status") == "finished"
        for page in ("devices", "traffic", "privacy", "versions", "overview"):
            _click(browser, f'nav a[data-page="{page}"]')
            WebDriverWait(browser, 5).until(
                lambda d: "active" in d.find_element(By.ID, f"page-{page}")
                .get_attribute("class"))
        # three rounds and the initial model in the table, the chart drawn by uPlot
        assert len(browser.find_elements(By.CSS_SELECTOR, "#rounds-table tr")) == 1 + 4
        assert browser.find_elements(By.CSS_SELECTOR, "#chart-quality .uplot canvas")
        assert _errors(browser) == []
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
    assert proc.returncode == 0


def _newest_round(driver) -> int:
    """The newest round in the page's table of rounds (-1 while it is empty)."""
    return driver.execute_script(
        "const c = document.querySelector('#rounds-table tr:nth-child(2) td');"
        "return c && /^[0-9]+$/.test(c.textContent) ? Number(c.textContent) : -1;")


def _production_on_disk(work: Path) -> int | None:
    return json.loads((work / "models" / "models" / "index.json").read_text())["production"]


@pytest.mark.slow
def test_a_running_launch_updates_live_and_rollback_needs_the_token(browser, tmp_path):
    port = _free_port()
    work = tmp_path / "work"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli", "launch", *SMALL, "--clients", "3",
         "--per-round", "3", "--rounds", "60", "--dir", str(work), "--out",
         str(tmp_path / "runs"), "--dashboard", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:  # the dashboard is up before the devices are
            try:
                state = json.loads(urllib.request.urlopen(url + "api/state", timeout=2).read())
                if state["version"] >= 2:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no round committed within 60 s"
            time.sleep(0.3)
        browser.get_log("browser")
        browser.get(url)
        WebDriverWait(browser, 10).until(lambda d: " of 60" in _text(d, "current-version"))
        browser.execute_script("window.__loaded_once = true;")
        seen = _newest_round(browser)
        # a round completes while the page is open: its row appears without a reload
        WebDriverWait(browser, 30).until(lambda d: _newest_round(d) > seen)
        assert browser.execute_script("return window.__loaded_once === true;")
        assert int(_text(browser, "current-version").split()[0]) >= _newest_round(browser)
        assert _errors(browser) == []

        _click(browser, 'nav a[data-page="versions"]')
        token = (work / "dashboard-token").read_text().strip()
        browser.find_element(By.ID, "token").send_keys(token)
        _click(browser, 'button[data-action="promote"][data-version="2"]')
        WebDriverWait(browser, 10).until(lambda d: _text(d, "production") == "v2")
        assert _production_on_disk(work) == 2
        # without the token: refused, and nothing moves
        browser.find_element(By.ID, "token").clear()
        _click(browser, 'button[data-action="rollback"][data-version="1"]')
        WebDriverWait(browser, 10).until(lambda d: "refused" in _text(d, "action-message"))
        assert "operator token is missing or wrong" in _text(browser, "action-message")
        assert _production_on_disk(work) == 2 and _text(browser, "production") == "v2"
        # with it: the production pointer moves back to v1 and the page says so
        browser.find_element(By.ID, "token").send_keys(token)
        _click(browser, 'button[data-action="rollback"][data-version="1"]')
        WebDriverWait(browser, 10).until(lambda d: _text(d, "production") == "v1")
        assert _production_on_disk(work) == 1
        index = json.loads((work / "models" / "models" / "index.json").read_text())
        assert {v["id"]: v["status"] for v in index["versions"]}[2] == "rolled_back"
        assert index["events"][-1]["action"] == "rollback"
        assert proc.poll() is None  # the deployment kept running throughout
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # launch stops its client processes
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # any client process left behind
        except ProcessLookupError:
            pass
