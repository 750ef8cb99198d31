"""The dashboard in a real (headless) Chromium, watching a real federated run LIVE.

One site's privacy cap is below the cost of a single round, so it refuses training every round:
the page must show that, draw every chart, and follow the run from "waiting" (no file yet)
through "running" (live.json after each round) to "finished" (metrics.json).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fedmed.config import load_run_config, resolve_config_path
from fedmed.serving.dashboard import start_dashboard_thread, stop_dashboard_thread

pytestmark = pytest.mark.integration

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
CHROMEDRIVER = "/usr/bin/chromedriver"
ROUNDS = 3
SITES = ("st-marys", "riverside", "northgate", "lakeview")
CAPPED = "lakeview"
TIMEOUT = 20.0  # seconds for the page to catch up; it polls every 2 s


def _browser_or_skip() -> str:
    """Path of the Chromium binary; skip (or fail, in CI) when the browser is not installed."""
    binary = next((shutil.which(name) for name in CHROMIUM if shutil.which(name)), None)
    missing = [] if binary else ["chromium"]
    if not Path(CHROMEDRIVER).is_file():
        missing.append(f"chromedriver ({CHROMEDRIVER})")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        reason = (
            f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver; "
            "pip install selenium)"
        )
        if os.environ.get("FEDMED_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason}; FEDMED_REQUIRE_BROWSER=1 makes the browser test required")
        pytest.skip(reason)
    return str(binary)


def test_dashboard_follows_a_run_with_a_refusing_site(tmp_path: Path) -> None:
    binary = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from fedmed.coordinator.app import build_server_app
    from fedmed.runtime.inprocess import run_inprocess
    from fedmed.runtime.run import preflight
    from fedmed.site.app import app as client_app
    from fedmed.study.plan import RunPlan, new_run_dir

    sites = ",".join(
        f'{{name="{s}",epsilon_cap=0.5}}' if s == CAPPED else f'{{name="{s}"}}' for s in SITES
    )
    overrides = [
        f"rounds={ROUNDS}",
        f"sites=[{sites}]",
        "strategy.min_sites=3",
        f'output_dir="{tmp_path / "runs"}"',
    ]
    cfg, _ = preflight(load_run_config(resolve_config_path("demo"), overrides))
    plan = RunPlan(cfg, new_run_dir(cfg))

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1000")
    server, thread = start_dashboard_thread(plan.run_dir, "127.0.0.1", 0)
    driver = None
    try:
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        wait = WebDriverWait(driver, TIMEOUT)

        def body(attr: str) -> str | None:
            return driver.find_element(By.TAG_NAME, "body").get_attribute(attr)

        driver.get(f"http://127.0.0.1:{server.config.port}/")
        wait.until(lambda _: body("data-state") == "waiting")
        assert str(plan.run_dir) in driver.find_element(By.ID, "notice").text

        seen: list[tuple[int, str | None]] = []

        def page_caught_up(rnd: int, _history: object) -> None:
            """Called by the coordinator right after it rewrote live.json for round ``rnd``."""
            wait.until(lambda _: body("data-round") == str(rnd))
            seen.append((rnd, body("data-status")))

        run_inprocess(
            build_server_app(plan, page_caught_up), client_app, len(SITES), plan.to_run_config()
        )
        assert seen == [(r, "running") for r in range(1, ROUNDS + 1)]
        wait.until(lambda _: body("data-status") == "finished")

        charts = driver.find_elements(By.CSS_SELECTOR, "svg.chart")
        assert [c.get_attribute("data-metric") for c in charts] == [
            "accuracy",
            "roc_auc",
            "loss",
            "epsilon",
        ]
        for chart in charts:
            assert chart.get_attribute("data-rounds") == str(ROUNDS)
            metric = chart.get_attribute("data-metric")
            paths = chart.find_elements(By.CSS_SELECTOR, "path[data-site]")
            names = [p.get_attribute("data-site") for p in paths]
            if metric == "epsilon":  # no "average" of ε; one line per site (no central DP here)
                assert chart.get_attribute("data-series") == str(len(SITES))
                assert names == list(SITES)
                points = {
                    n: p.get_attribute("data-points") for n, p in zip(names, paths, strict=True)
                }
                assert points.pop(CAPPED) == "0"  # it never trained, so it spent nothing
                assert set(points.values()) == {str(ROUNDS)}
            else:
                assert chart.get_attribute("data-series") == str(len(SITES) + 1)
                assert names == [*SITES, "average"]
                # The capped site still evaluates the global model: it has a line too.
                assert {p.get_attribute("data-points") for p in paths} == {str(ROUNDS)}
                assert paths[-1].get_attribute("d").startswith("M")

        rows = driver.find_elements(By.CSS_SELECTOR, "table#replies tbody tr[data-round]")
        assert [r.get_attribute("data-round") for r in rows] == [
            str(r) for r in range(1, ROUNDS + 1)
        ]
        for row in rows:
            cells = {
                c.get_attribute("data-site"): c
                for c in row.find_elements(By.CSS_SELECTOR, "td[data-site]")
            }
            assert set(cells) == set(SITES)
            assert cells[CAPPED].get_attribute("data-status") == "failed"
            assert "privacy budget exhausted" in cells[CAPPED].get_attribute("title")
            assert all(cells[s].get_attribute("data-status") == "ok" for s in SITES if s != CAPPED)

        header = driver.find_element(By.TAG_NAME, "header").text
        assert "demo" in header and "finished" in header and f"round {ROUNDS} of {ROUNDS}" in header
        final = driver.find_elements(By.CSS_SELECTOR, "table#final tbody tr[data-site]")
        assert [r.get_attribute("data-site") for r in final][: len(SITES)] == list(SITES)

        # The whole page in one picture: a viewport as tall as the document (a window that
        # tall may be clamped to the virtual screen).
        height = driver.execute_script("return document.documentElement.scrollHeight")
        metrics = {"width": 1400, "height": int(height), "deviceScaleFactor": 1, "mobile": False}
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        shot = tmp_path / "dashboard.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        if target := os.environ.get("FEDMED_SCREENSHOT"):
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, target)
    finally:
        try:
            if driver is not None:
                driver.quit()
        finally:
            stop_dashboard_thread(server, thread)
    assert not thread.is_alive()
