"""The daily loop as a user meets it in the UI (headless Chromium against a real `dagster dev`).

Two weeks of history have landed before the deployment starts. The landing sensor takes stock of
it on its first tick (history is for a backfill, not for 14 queued runs); the user backfills the
history from the job page and the daemon runs it as one run. Then a new day lands with a bad
customers file: the landing sensor runs it by itself, the failed error_rate check becomes one
incident on the `incidents` asset, and the check's page plots the measured rate over the days.

The model is a real OpenAI-compatible HTTP server on 127.0.0.1; the data is generated.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import dagster as dg
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ec

from generator import FaultRates, GeneratorConfig, generate
from tests.fake_openai_server import FakeOpenAIServer
from tests.ui_support import (
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

# Through yesterday: the partitions end there; the last day lands during the test. Two weeks of
# history: a month's backfill took about 2 of the test's 2.7 minutes, and CI neared its 20.
DAYS = 15
TODAY = dt.datetime.now(dt.UTC).date()
FIRST = TODAY - dt.timedelta(days=DAYS)
HISTORY = [(FIRST + dt.timedelta(days=i)).isoformat() for i in range(DAYS - 1)]
NEW_DAY = (TODAY - dt.timedelta(days=1)).isoformat()
DIALOG = "//*[@role='dialog']"
PIPELINE_ASSETS = ("raw_products", "raw_customers", "raw_transactions", "stg_order_lines", "customer_features",
                   "product_embeddings", "customer_segments", "recommendations", "validated_recommendations")


@pytest.fixture(scope="module", autouse=True)
def browser_installed() -> None:
    require_browser()


def land(arriving: Path, landing: Path, day: str) -> None:
    for source in arriving.iterdir():
        for path in source.glob(f"{day}.*"):
            (landing / source.name).mkdir(parents=True, exist_ok=True)
            path.rename(landing / source.name / path.name)


def break_emails(customers_file: Path) -> int:
    """Every customer of the day gets an invalid email; returns how many records."""
    records = [json.loads(line) for line in customers_file.read_text().splitlines() if line.strip()]
    customers_file.write_text("".join(json.dumps({**r, "email": "not-an-email"}) + "\n" for r in records))
    return len(records)


def wait_for(condition, seconds: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {seconds:.0f}s waiting for {what}")


def landing_sensor_cursor(instance: dg.DagsterInstance) -> str | None:
    for state in instance.all_instigator_state():
        if state.name == "landing_sensor" and state.instigator_data is not None:
            return state.instigator_data.cursor
    return None


def incident_observations(instance: dg.DagsterInstance) -> list[dict]:
    """Each incident notice's metadata, with `time`: the event's timestamp as the UI's URLs give it."""
    records = instance.fetch_observations(dg.AssetKey("incidents"), limit=1000).records
    return [{**{k: v.value for k, v in r.asset_observation.metadata.items()}, "time": str(int(r.timestamp * 1000))}
            for r in records]


def test_the_daily_loop_from_the_ui(tmp_path: Path):
    arriving, landing = tmp_path / "arriving", tmp_path / "landing"
    generate(GeneratorConfig(out=arriving, customers=80, products=60, days=DAYS, start=FIRST, seed=23,
                             faults=FaultRates.uniform(0.0)))
    for day in HISTORY:
        land(arriving, landing, day)
    home = write_dagster_home(tmp_path / "dagster_home")
    with FakeOpenAIServer(default_dimensions=384) as model, chromium() as browser:
        env = code_location_env(home, tmp_path / "warehouse.duckdb", landing)
        env.update(MODEL_PROVIDER="openai", OPENAI_BASE_URL=model.base_url, OPENAI_API_KEY="test-key",
                   EMBEDDING_MODEL="fake-embed", EMBEDDING_DIMENSIONS="384", PIPELINE_FIRST_DAY=FIRST.isoformat(),
                   ONLINE_RETAIL_DIR="", LANDING_SENSOR_INTERVAL_SECONDS="3")
        env.pop("PIPELINE_LAST_DAY", None)
        with running_dagster_dev(env, tmp_path / "dagster-dev.log") as ui, \
                dg.DagsterInstance.from_config(str(home)) as instance:
            base = ui.base_url
            # 1. The landing sensor's first tick takes stock of the history: no run of its own.
            wait_for(lambda: landing_sensor_cursor(instance), 120, "the landing sensor's first tick")
            assert instance.get_runs() == []

            # 2. The user backfills the history from the job page: one run, every day materialized.
            with screenshot_on_failure(browser, tmp_path / "backfill.png"):
                browser.get(f"{base}/locations/definitions/jobs/daily_pipeline")
                click_button(browser, "Materialize all…")
                field = wait(browser).until(ec.element_to_be_clickable((By.XPATH, f"{DIALOG}//input[@type='text']")))
                field.send_keys(Keys.CONTROL, "a")
                field.send_keys(f"[{HISTORY[0]}...{HISTORY[-1]}]", Keys.ENTER)
                visible_text(browser, f"{len(HISTORY)} partitions", within=DIALOG)
                click_button(browser, "Launch backfill", within=DIALOG)
                backfill = wait_for(lambda: instance.get_backfills(), 60, "the backfill")[0]
                started = time.monotonic()
                finished = wait_for(lambda: all(r.is_finished for r in runs_of(instance, backfill.backfill_id))
                                    and runs_of(instance, backfill.backfill_id), 600, "the backfill's runs", poll=3)
                backfill_seconds = time.monotonic() - started
            runs = runs_of(instance, backfill.backfill_id)
            assert len(runs) == 1 and finished, [(r.run_id, r.status) for r in runs]
            assert runs[0].status == dg.DagsterRunStatus.SUCCESS, ui.log_tail()
            for asset in PIPELINE_ASSETS:
                assert instance.get_materialized_partitions(dg.AssetKey(asset)) == set(HISTORY), asset
            print(f"backfill of {len(HISTORY)} days: {backfill_seconds:.0f}s in one run")

            # 3. A new day lands with a bad customers file: the landing sensor runs it by itself.
            bad_records = break_emails(arriving / "customers" / f"{NEW_DAY}.jsonl")
            land(arriving, landing, NEW_DAY)
            new_run = wait_for(lambda: [r for r in instance.get_runs() if r.tags.get("trigger") == "landing"],
                               120, "a landing-triggered run")[0]
            assert new_run.tags["dagster/partition"] == NEW_DAY
            status = ui.wait_for_run(new_run.run_id, 300)
            assert status == "SUCCESS", ui.log_tail()
            with screenshot_on_failure(browser, tmp_path / "landing_run.png"):
                browser.get(f"{base}/runs/{new_run.run_id}")
                visible_text(browser, f"partition: {NEW_DAY}")
                wait(browser).until(ec.visibility_of_element_located(
                    (By.XPATH, "//span[starts-with(., 'Launched by')]/following-sibling::*//*[@title='landing_sensor']")), "the run does not say the sensor launched it")

            # 4. One incident for the bad batch, on the incidents asset where the user looks.
            def bad_batch_incidents() -> list[dict]:
                return [o for o in incident_observations(instance)
                        if o.get("asset") == "raw_customers" and o.get("partition") == NEW_DAY]

            found = wait_for(bad_batch_incidents, 150, "the bad batch's incident", poll=3)
            assert len(found) == 1, found
            (incident,) = found
            assert "error_rate" in incident["message"] and f"of {bad_records} customers records bad" in incident["message"]
            with screenshot_on_failure(browser, tmp_path / "incidents.png"):
                browser.get(f"{base}/assets/incidents?view=events&time={incident['time']}")
                wait_for_texts(browser, {incident["title"], incident["alert_id"]})  # this very incident

            # 5. The check's page plots the measured error rate over the days.
            with screenshot_on_failure(browser, tmp_path / "check.png"):
                browser.get(f"{base}/assets/raw_customers?view=checks&checkDetail=error_rate")
                wait(browser).until(ec.visibility_of_element_located(
                    (By.XPATH, "//*[normalize-space()='Plots']/following::*[normalize-space()='error_rate']")),
                    "no plot of error_rate")


def runs_of(instance: dg.DagsterInstance, backfill_id: str) -> list[dg.DagsterRun]:
    return list(instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id})))
