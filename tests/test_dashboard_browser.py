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


def _served_state(url: str, proc: subprocess.Popen, ready, within_s: float) -> dict:
    """The process's ``/api/state`` once ``ready(state)`` holds (the dashboard is up before
    the devices are), failing if the process exits or ``within_s`` passes."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            state = json.loads(urllib.request.urlopen(url + "api/state", timeout=2).read())
            if ready(state):
                return state
        except OSError:
            pass
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"the dashboard was not ready within {within_s} s"
        time.sleep(0.2)


def _end(proc: subprocess.Popen) -> None:
    """Stop a ``shoal launch`` (SIGINT: it stops its device processes) and anything of its
    process group left behind."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # any client process left behind
    except ProcessLookupError:
        pass


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
        _served_state(url, proc, lambda state: state["version"] >= 2, 60)
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
        _end(proc)


# -- the canary and edges panels ------------------------------------------------------------


def _page(driver, name: str) -> None:
    _click(driver, f'nav a[data-page="{name}"]')
    WebDriverWait(driver, 5).until(
        lambda d: "active" in d.find_element(By.ID, f"page-{name}").get_attribute("class"))


def _rows(driver, table: str) -> list[list[str]]:
    """The table's cells below its header row, read in one script: the page re-renders as
    data arrives, so elements found one call earlier may be gone (stale) the next."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).slice(1).map("
        "tr => Array.from(tr.querySelectorAll('td')).map(td => td.innerText.trim()));",
        f"#{table} tr")


def test_the_canary_and_edges_panels_of_recorded_runs(browser, tmp_path):
    from test_dashboard_panels import run_canary

    from shoal.config import load_config, to_toml
    from shoal.dashboard.replay import RunDirFollower
    from shoal.dashboard.server import Dashboard

    # a canary's state directory: the store and its audit log (a worse candidate, rolled
    # back in the second evaluation round)
    work = tmp_path / "work"
    canary, verdicts, losses = run_canary(work)
    (work / "config.toml").write_text(to_toml(load_config(None, {})))
    # whatever an audit entry holds reaches the page as text, never as HTML
    hostile = '<img src="x" id="injected" onerror="window.__owned = 1">'
    with open(work / "audit.jsonl", "a") as f:
        f.write(json.dumps({"at": 300.0, "action": "drift_alarm", "detail": hostile}) + "\n")
    # a run with three edges, edge-1 failing in round 2
    out = tmp_path / "runs"
    assert main(["run", *SMALL[:4], "--clients", "30", "--per-round", "12", "--rounds", "3",
                 "--set", "hierarchy.edges=3", "--set", 'hierarchy.failures="edge-1@2"',
                 "--out", str(out), "-q", "--json"]) == 0
    (run,) = out.iterdir()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    served = []
    try:
        for where in (work, run):
            dash = Dashboard(RunDirFollower(where).state, "t" * 43, push_interval_s=0.1)
            served.append((dash, dash.start("127.0.0.1", 0)))
        browser.get_log("browser")
        # a directory with a canary and no rounds opens on the canary page
        browser.get(served[0][1])
        WebDriverWait(browser, 10).until(lambda d: _text(d, "canary-decision") == "rolled back")
        assert "active" in browser.find_element(By.ID, "page-canary").get_attribute("class")
        assert _text(browser, "canary-candidate") == "v2"
        assert _text(browser, "canary-production") == "v1"
        assert _text(browser, "canary-fraction") == "0.20"
        assert _text(browser, "canary-reason") == verdicts[-1].reason
        table = _rows(browser, "canary-table")
        assert [r[0] for r in table] == ["1", "2"] and [r[-1] for r in table] == ["wait",
                                                                                 "rollback"]
        for r, (cand, prod) in zip(table, losses):
            assert (r[1], r[2], r[4], r[5]) == ("5", f"{cand:.4f}", "5", f"{prod:.4f}")
        assert table[0][8] == "n/a" and table[1][8] == f"{verdicts[1].z:.2f}"
        assert table[1][7] == "10 / 10"
        audit = _rows(browser, "audit-table")
        assert [r[1] for r in audit] == ["drift_alarm", *(e["action"] for e in
                                                          reversed(canary.audit.entries))]
        assert audit[0][2] == f"detail={hostile}"
        assert not browser.find_elements(By.ID, "injected")
        assert browser.execute_script("return window.__owned === undefined;")
        assert browser.find_elements(By.CSS_SELECTOR, "#chart-canary .uplot canvas")
        _page(browser, "edges")
        assert "No edge aggregators" in _text(browser, "edges-note")
        assert _errors(browser) == []

        browser.get(served[1][1] + "#edges")
        WebDriverWait(browser, 10).until(lambda d: _text(d, "edge-count") == "3")
        assert _text(browser, "edge-failed") == "1"
        up = sum(r["bytes_up"] for r in rows)
        reports = [json.loads(x) for x in (run / "edges.jsonl").read_text().splitlines()]
        down = sum(r["device_bytes"] for r in reports)  # the failed edge's group too
        assert down > sum(r.get("privacy_edge_ingress_bytes", 0) for r in rows)
        assert _text(browser, "edge-global-bytes") == f"{up / 1e6:.3f} MB"
        assert _text(browser, "edge-device-bytes") == f"{down / 1e6:.3f} MB"
        edges = _rows(browser, "edges-table")
        assert [r[0] for r in edges] == ["edge-0", "edge-1", "edge-2"]
        assert [r[3] for r in edges] == ["3", "1", "3"]  # uploads: edge-1 died in round 2
        assert [r[8] for r in edges] == ["-", "2", "-"]
        failed_row = browser.find_elements(By.CSS_SELECTOR, "#edges-table tr")[2]
        assert failed_row.get_attribute("class") == "failed"
        (failure,) = _rows(browser, "edge-failures-table")
        assert failure[:2] == ["2", "edge-1"] and "edge-" in failure[3]
        assert browser.find_elements(By.CSS_SELECTOR, "#chart-edge-bytes .uplot canvas")
        assert browser.find_elements(By.CSS_SELECTOR, "#chart-edge-uploads .uplot canvas")
        _page(browser, "canary")
        assert "No canary rollout" in _text(browser, "canary-note")
        assert _errors(browser) == []
    finally:
        for dash, _ in served:
            dash.stop()
    # the static report has the edges page and leaves out the canary page it has no data for
    assert main(["report", str(run)]) == 0
    browser.get((run / "report.html").as_uri())
    WebDriverWait(browser, 10).until(lambda d: _text(d, "edge-count") == "3")
    assert browser.find_element(By.ID, "page-edges").is_displayed()
    assert not browser.find_element(By.ID, "page-canary").is_displayed()
    assert [r[3] for r in _rows(browser, "edges-table")] == ["3", "1", "3"]
    assert _errors(browser) == []


def test_a_running_shoal_run_with_edges_is_shown_live(browser, tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli", "run", *SMALL[:4], "--clients", "30",
         "--per-round", "12", "--rounds", "600", "--set", "hierarchy.edges=3",
         "--out", str(tmp_path / "runs"), "-q", "--dashboard", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        state = _served_state(url, proc, lambda state: state["version"] >= 1, 30)
        assert state["info"]["mode"] == "simulation" and state["status"] == "running"
        browser.get_log("browser")
        browser.get(url + "#edges")
        WebDriverWait(browser, 10).until(lambda d: _text(d, "edge-count") == "3")
        browser.execute_script("window.__loaded_once = true;")
        tasks = lambda d: sum(int(r[2]) for r in _rows(d, "edges-table"))  # noqa: E731
        seen = tasks(browser)
        WebDriverWait(browser, 15).until(lambda d: tasks(d) > seen)  # pushed, no reload
        assert browser.execute_script("return window.__loaded_once === true;")
        assert _errors(browser) == []
        assert proc.wait(timeout=60) == 0
    finally:
        _end(proc)


@pytest.mark.slow
def test_a_running_canary_launch_is_shown_live_until_its_decision(browser, tmp_path):
    pytest.importorskip("grpc")
    from test_launch_canary import OVERRIDES

    from shoal.build import load_data
    from shoal.config import load_config
    from shoal.lifecycle.audit import read_audit
    from shoal.scenarios.canary import train_pair
    from shoal.store.models import ModelStore

    cfg = load_config(None, OVERRIDES)
    work = tmp_path / "work"
    with ModelStore(work / "models") as store:  # a candidate trained on corrupted labels
        prod, bad, _, _ = train_pair(cfg, load_data(cfg), store, corrupt=True,
                                     candidate_rounds=20)
    port = _free_port()
    sets = [a for k, v in OVERRIDES.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli", "launch", *sets, "--dir", str(work),
         "--canary", str(bad), "--canary-fraction", "0.6", "--canary-cohort", "3",
         "--min-clients", "3", "--max-evaluations", "3", "--evaluation-timeout", "40",
         "--json", "-q", "--dashboard", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        _served_state(url, proc, lambda state: True, 60)
        browser.get_log("browser")
        browser.get(url + "#canary")
        WebDriverWait(browser, 10).until(lambda d: _text(d, "canary-candidate") == f"v{bad}")
        assert _text(browser, "canary-production") == f"v{prod}"
        assert _text(browser, "canary-decision") == "pending"
        browser.execute_script("window.__loaded_once = true;")
        # the evaluations and the verdict arrive while the page is open
        WebDriverWait(browser, 120).until(lambda d: _text(d, "canary-decision") != "pending")
        assert browser.execute_script("return window.__loaded_once === true;")
        # once the verdict is in, the launch ends and its dashboard with it: the page's next
        # poll for events may be refused then (on a busy machine before this line runs),
        # which is the run ending, not an error of the page
        errors = _errors(browser)
        gone = [e for e in errors if "/api/events" in e["message"]
                and "ERR_CONNECTION_REFUSED" in e["message"]]
        assert [e for e in errors if e not in gone] == []
        assert not gone or proc.wait(timeout=60) == 0
        shown = _text(browser, "canary-decision")
        table = _rows(browser, "canary-table")
        assert proc.wait(timeout=60) == 0
        summary = json.loads(proc.stdout.read())
        assert shown == {"rollback": "rolled back", "promote": "promoted"}[summary["decision"]]
        assert len(table) == summary["evaluations"] and table[-1][-1] == summary["decision"]
        assert _text(browser, "canary-reason") == summary["reason"]
        audit = read_audit(work / "audit.jsonl")
        assert len(_rows(browser, "audit-table")) == len(audit)
    finally:
        _end(proc)
