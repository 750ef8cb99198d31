"""The dashboard of a finished survival run, in headless Chromium: C-index, not accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmed.cli.main import main
from fedmed.serving.dashboard import start_dashboard_thread, stop_dashboard_thread

from .test_dashboard_browser import CHROMEDRIVER, TIMEOUT, _browser_or_skip

pytestmark = pytest.mark.integration


def test_survival_run_shows_c_index_charts_and_columns(tmp_path: Path) -> None:
    binary = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    out = f"output_dir={tmp_path / 'runs'}"
    assert main(["simulate", "lung", "--quiet", "--set", "rounds=2", "--set", out]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu"):
        options.add_argument(arg)
    server, thread = start_dashboard_thread(run_dir, "127.0.0.1", 0)
    driver = None
    try:
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        driver.get(f"http://127.0.0.1:{server.config.port}/")
        WebDriverWait(driver, TIMEOUT).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-status") == "finished"
        )

        charts = [
            c.get_attribute("data-metric")
            for c in driver.find_elements(By.CSS_SELECTOR, "svg.chart")
        ]
        header = driver.find_element(By.CSS_SELECTOR, "#final thead").text
        cells = driver.find_element(By.CSS_SELECTOR, '#final tr[data-site="inst-1"]').text
    finally:
        if driver:
            driver.quit()
        stop_dashboard_thread(server, thread)

    assert charts == ["c_index", "loss", "epsilon"]
    assert "C-index" in header and "accuracy" not in header
    assert "0." in cells  # a C-index value, not "n/a"
