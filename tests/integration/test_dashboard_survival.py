"""The dashboard of a finished run, in headless Chromium, shows the metrics its task reports:
the C-index for survival (not accuracy), macro-F1 next to accuracy and ROC-AUC for text."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmed.cli.main import main
from fedmed.serving.dashboard import start_dashboard_thread, stop_dashboard_thread

from .test_dashboard_browser import CHROMEDRIVER, TIMEOUT, _browser_or_skip

pytestmark = pytest.mark.integration


def _rendered(run_dir: Path, site: str) -> tuple[list[str], str, str]:
    """(the charts' metrics, the results table's header, ``site``'s row) once finished."""
    binary = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

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
        cells = driver.find_element(By.CSS_SELECTOR, f'#final tr[data-site="{site}"]').text
    finally:
        if driver:
            driver.quit()
        stop_dashboard_thread(server, thread)
    return charts, header, cells


def test_survival_run_shows_c_index_charts_and_columns(tmp_path: Path) -> None:
    out = f"output_dir={tmp_path / 'runs'}"
    assert main(["simulate", "lung", "--quiet", "--set", "rounds=2", "--set", out]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()

    charts, header, cells = _rendered(run_dir, "inst-1")

    assert charts == ["c_index", "loss", "epsilon"]
    assert "C-index" in header and "accuracy" not in header
    assert "0." in cells  # a C-index value, not "n/a"


def test_text_run_shows_macro_f1_charts_and_columns(tmp_path: Path) -> None:
    from tests.data.test_text import site_texts, text_study
    from tests.tasks.test_imaging import _to_toml

    raw = text_study(tmp_path, [site_texts(0, n=60), site_texts(1, n=45)], min_count=5)
    toml = tmp_path / "notes.toml"
    toml.write_text(_to_toml(raw))
    assert main(["simulate", str(toml), "--quiet"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()

    charts, header, cells = _rendered(run_dir, "site0")

    assert charts == ["accuracy", "macro_f1", "roc_auc", "loss", "epsilon"]
    assert "macro-F1" in header and "C-index" not in header
    assert "n/a" not in cells.split()[1:4]  # accuracy, macro-F1, ROC-AUC are numbers
