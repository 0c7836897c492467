"""The Dagster UI as a user drives it: headless Chromium against a real `dagster dev` (webserver,
daemon, code server) with a tmp instance, a tmp DuckDB warehouse and generated landing files.

A user checks that the code location loaded and shows every stage, opens an ingestion asset,
materializes one day's partition from the dialog, follows the run to its page, and finds the
alerting sensors. The run is a real run (queued, launched by the daemon, one process a step) and
the day's rows are read back from the DuckDB file once it is over.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec

from generator import GenerationSummary, GeneratorConfig, generate
from resources.warehouse import DuckDBWarehouse, fetch_all
from tests.ui_support import (
    DagsterDev,
    chromium,
    click_button,
    code_location_env,
    require_browser,
    running_dagster_dev,
    screenshot_on_failure,
    visible_text,
    wait,
    wait_for_texts,
    write_dagster_home,
)

pytestmark = pytest.mark.slow

START = dt.date(2011, 9, 1)
DAY = START.isoformat()  # the partition the user picks; the second generated day stays unlanded
DIALOG = "//*[@role='dialog']"
RUN_SECONDS = 150


@dataclass
class Deployment:
    ui: DagsterDev
    warehouse: DuckDBWarehouse
    landed: GenerationSummary


@pytest.fixture(scope="module", autouse=True)
def browser_installed() -> None:
    require_browser()  # before the server starts: a missing browser skips (or fails in CI) at once


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Deployment:
    root = tmp_path_factory.mktemp("ui")
    landed = generate(GeneratorConfig(out=root / "landing", customers=300, days=2, start=START, seed=5))
    warehouse_path = root / "warehouse.duckdb"
    env = code_location_env(write_dagster_home(root / "dagster_home"), warehouse_path, root / "landing")
    with running_dagster_dev(env, root / "dagster-dev.log") as server:
        yield Deployment(server, DuckDBWarehouse(path=str(warehouse_path), memory_limit="256MB"), landed)


@pytest.fixture(scope="module")
def browser() -> WebDriver:
    with chromium() as driver:
        yield driver


def test_code_location_loads_and_shows_every_stage(deployment, browser, tmp_path: Path):
    from definitions import defs

    base = deployment.ui.base_url
    with screenshot_on_failure(browser, tmp_path / "catalog.png"):
        browser.get(f"{base}/locations")
        wait_for_texts(browser, {"definitions", "Loaded"})
        assert "Failed" not in browser.find_element(By.TAG_NAME, "body").text, "the code location failed to load"

        browser.get(f"{base}/assets")
        wait_for_texts(browser, {key.to_user_string() for key in defs.resolve_asset_graph().materializable_asset_keys})

        # The AI stage's lineage: its assets, what feeds them and what consumes them.
        browser.get(f"{base}/locations/definitions/asset-groups/infer")
        wait_for_texts(browser, {"stg_purchases", "product_embeddings", "customer_segments", "recommendations",
                                 "validated_recommendations"})


def test_user_materializes_one_partition_from_the_asset_page(deployment, browser, tmp_path: Path):
    with screenshot_on_failure(browser, tmp_path / "materialize.png"):
        run_id = launch_one_partition(browser, f"{deployment.ui.base_url}/assets/raw_products", DAY)
        status = deployment.ui.wait_for_run(run_id, RUN_SECONDS)
        assert status == "SUCCESS", f"run {run_id} ended {status}; dagster dev log:\n{deployment.ui.log_tail()}"
        # The run page the user followed from the toast shows the result and the partition.
        visible_text(browser, "Success", within="//*[@aria-label='run_success']/..")
        visible_text(browser, f"partition: {DAY}")

    products = deployment.landed.days[0].records["products"]
    with deployment.warehouse.connect(read_only=True) as con:
        rows_per_day = fetch_all(con, "SELECT partition_date::VARCHAR, count(*) FROM raw.products GROUP BY 1")
        batches = fetch_all(con, """SELECT source, partition_date::VARCHAR, input_records, valid_records,
                                           quarantined_records FROM ops.batch_fingerprints""")
    # Exactly the picked partition of the picked asset landed, every generated row of it.
    assert rows_per_day == [(DAY, products)]
    assert batches == [("products", DAY, products, products, 0)]


def test_alerting_sensors_are_on_the_automation_page(deployment, browser, tmp_path: Path):
    from definitions import defs

    with screenshot_on_failure(browser, tmp_path / "sensors.png"):
        browser.get(f"{deployment.ui.base_url}/automation")
        wait_for_texts(browser, {sensor.name for sensor in defs.sensors})


def launch_one_partition(driver: WebDriver, asset_url: str, partition: str) -> str:
    """Materialize an asset for one partition, as a user does from its page; the run's id.
    The driver is left on the run's page (the toast's View link)."""
    driver.get(asset_url)
    click_button(driver, "Materialize…")
    # The dialog shows the last 90 days only; the generated days are older.
    click_button(driver, "Show all partitions", within=DIALOG)
    field = wait(driver).until(ec.element_to_be_clickable((By.XPATH, f"{DIALOG}//input[@type='text']")))
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(partition, Keys.ENTER)
    visible_text(driver, "1 partition", within=DIALOG)
    click_button(driver, "Launch 1 run", within=DIALOG)
    view = wait(driver).until(ec.element_to_be_clickable(
        (By.XPATH, "//a[normalize-space()='View'][starts-with(@href, '/runs/')]")), "no toast for the launched run")
    run_url = view.get_attribute("href")
    view.click()
    return run_url.rstrip("/").rsplit("/", 1)[-1]
