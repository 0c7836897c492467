"""Customer data stays in the warehouse: after the pipeline and a bad batch, no customer's email
appears in the Dagster instance's storage (event log, runs, compute logs), in the alerts sent to a
webhook, or in the captured logs; quarantined raw text is purged after the retention."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from assets.ingest.retention import build_purge_job, purge_lake_raw_text, purge_raw_text
from assets.monitor.check_alerts import asset_check_failure_alerts
from assets.monitor.metrics import metric_anomaly_alerts
from assets.monitor.run_failures import run_failure_alerts
from assets.monitor.settings import MonitoringSettings
from generator import FaultRates, GeneratorConfig, generate
from resources.alerts import Alerts
from resources.lakehouse import Lakehouse
from resources.landing import LandingZone
from resources.compute_engine import ComputeEngine
from resources.model_clients import ChatModel, EmbeddingModel
from resources.warehouse import DuckDBWarehouse, fetch_all, fetch_scalar
from tests.fake_openai_server import FakeOpenAIServer
from tests.lakehouse_support import files_left_behind
from tests.sensor_support import WebhookServer

DAYS = ("2011-09-01", "2011-09-02")


def customer_emails(landing: Path) -> set[str]:
    """Every email the generator wrote, valid or broken, and its local part (the personal bit)."""
    found = set()
    for path in (landing / "customers").glob("*.jsonl"):
        for address in re.findall(r'"email"\s*:\s*"([^"]*)"', path.read_text(errors="replace")):
            local = re.split(r"@| at ", address)[0]
            found |= {address, local} if len(local) >= 6 else {address}
    return {needle for needle in found if needle}


def texts_under(folder: Path) -> str:
    return "\n".join(path.read_bytes().decode("utf-8", errors="replace")
                     for path in folder.rglob("*") if path.is_file())


@pytest.fixture
def pipeline_and_bad_batch(tmp_path):
    landing = tmp_path / "landing"
    # A bad batch: a fifth of the emails broken, besides the usual faults.
    generate(GeneratorConfig(out=landing, customers=300, days=2, seed=21, start=dt.date(2011, 9, 1),
                             faults=FaultRates(**{**FaultRates.uniform(0.01).__dict__, "invalid_email": 0.2})))
    home = tmp_path / "dagster_home"
    home.mkdir()
    warehouse = DuckDBWarehouse(path=str(tmp_path / "warehouse.duckdb"), memory_limit="512MB")
    with FakeOpenAIServer(default_dimensions=384) as server, WebhookServer() as webhook, \
            dg.instance_for_test(temp_dir=str(home)) as instance:
        alerts = Alerts(warehouse=warehouse, webhook_url=webhook.url)
        resources = {
            "warehouse": warehouse, "landing": LandingZone(root=str(landing)), "alerts": alerts,
            "embedding_model": EmbeddingModel(provider="openai", model="fake-embed", dimensions=384,
                                              base_url=server.base_url, api_key="test-key"),
            "chat_model": ChatModel(provider="none"),
            "compute_engine": ComputeEngine(),
        }
        from definitions import defs

        for day in DAYS:
            dg.materialize([*defs.assets, *defs.asset_checks], partition_key=day, resources=resources,
                           instance=instance, raise_on_error=False,
                           run_config={"ops": {"recommendation_quality": {"config": {"online_retail_dir": ""}}}})
        sensor_resources = {"alerts": alerts, "monitoring": MonitoringSettings()}
        for sensor in (asset_check_failure_alerts, metric_anomaly_alerts, run_failure_alerts):
            with dg.build_sensor_context(instance=instance, resources=sensor_resources) as context:
                sensor(context)
        yield landing, home, webhook.received, warehouse


def test_no_customer_email_leaves_the_warehouse(pipeline_and_bad_batch, capfd):
    landing, home, webhook_bodies, warehouse = pipeline_and_bad_batch
    needles = customer_emails(landing)
    assert len(needles) > 300
    captured = capfd.readouterr()
    places = {
        "instance storage (event log, runs, compute logs)": texts_under(home),
        "webhook alerts": json.dumps(webhook_bodies),
        "captured logs": captured.out + captured.err,
    }
    assert webhook_bodies, "the bad batch raised alerts"
    # One incident for the bad batch (the check's, not a second one from the run), with the measured rate.
    error_rate = [body for body in webhook_bodies if body["details"].get("dedup_key", "").startswith(
        "asset_check_failed:raw_customers:quarantined_share:")]
    assert len(error_rate) == len(DAYS) and all("records bad: error_rate" in body["message"] for body in error_rate)
    # The suite checks fail on the same quarantined share: the same incident, not another one.
    assert len([body for body in webhook_bodies if body["details"].get("asset") == "raw_customers"]) == len(DAYS)
    for place, text in places.items():
        leaked = sorted(needle for needle in needles if needle in text)
        assert not leaked, f"{len(leaked)} customer emails in {place}, e.g. {leaked[:3]}"
    # The previews are still there, masked: a masked address and pseudonymous ids.
    assert re.search(r"\w\*\*\*@[\w.-]+\.\w+", places["instance storage (event log, runs, compute logs)"])
    assert "id:" in places["instance storage (event log, runs, compute logs)"]
    with warehouse.connect(read_only=True) as con:  # the warehouse itself keeps the data
        assert fetch_scalar(con, "SELECT count(*) FROM raw.customers WHERE email LIKE '%@%.%'") > 0


def test_the_purge_blanks_exactly_the_raw_text_older_than_the_retention(warehouse):
    now = dt.datetime(2026, 12, 1, 12, 0)
    with warehouse.transaction() as con:
        con.execute("CREATE SCHEMA ops")
        con.execute("""CREATE TABLE ops.schema_errors (partition_date DATE, source VARCHAR, table_name VARCHAR,
            record_key VARCHAR, line_no BIGINT, rule VARCHAR, column_name VARCHAR, value VARCHAR,
            raw_record VARCHAR, detected_at TIMESTAMP)""")
        rows = [(age, f"c{age}", "email_invalid", f"bob{age} at example.com", f'{{"email": "bob{age} at example.com"}}',
                 now - dt.timedelta(days=age)) for age in (1, 89, 91, 200)]
        rows.append((300, "c300", "email_invalid", None, None, now - dt.timedelta(days=300)))  # already purged
        con.executemany("INSERT INTO ops.schema_errors VALUES ('2011-09-01', 'customers', 'customers', ?, ?, ?,"
                        " 'email', ?, ?, ?)", [(key, age, rule, value, raw, at) for age, key, rule, value, raw, at in rows])
    assert purge_raw_text(warehouse, retention_days=90, now=now) == 2
    assert purge_raw_text(warehouse, retention_days=90, now=now) == 0  # nothing more to purge
    with warehouse.connect(read_only=True) as con:
        kept = fetch_all(con, "SELECT line_no, rule, value IS NOT NULL, raw_record IS NOT NULL FROM ops.schema_errors"
                              " ORDER BY line_no")
    assert kept == [(1, "email_invalid", True, True), (89, "email_invalid", True, True),
                    (91, "email_invalid", False, False), (200, "email_invalid", False, False),
                    (300, "email_invalid", False, False)]


def quarantine_rows(source: str, ages: tuple[int, ...], now: dt.datetime) -> pa.Table:
    return pa.table({"source": [source] * len(ages), "line_no": pa.array(ages, pa.int64()),
                     "rule": ["email_invalid"] * len(ages), "value": [f"bob{age} at example.com" for age in ages],
                     "raw_record": [f'{{"email": "bob{age} at example.com"}}' for age in ages],
                     "detected_at": pa.array([now - dt.timedelta(days=age) for age in ages], pa.timestamp("us"))})


def test_the_purge_on_the_lakehouse_blanks_the_old_raw_text_and_deletes_every_file_that_held_it(tmp_path, warehouse):
    """Blanking rows in Iceberg only adds a snapshot: the old files keep the text (and the
    manifests their bounds) until the history is expired and the files deleted, which waits for
    the readers of a snapshot replaced within the last hour (the next day's purge deletes them)."""
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    options = {"catalog_uri": f"sqlite:///{tmp_path}/catalog.db", "location": str(tmp_path / "lake")}
    lakehouse = Lakehouse(**options)
    table = "ops.schema_errors"
    for day, source, ages, fingerprint in [("2011-09-01", "customers", (200, 91), "a"),
                                           ("2011-09-01", "transactions", (95, 2), "b"),
                                           ("2011-09-02", "customers", (89, 1), "c"),
                                           ("2011-09-02", "customers", (88, 1), "d")]:  # a re-landed day
        lakehouse.write_day(table, day, quarantine_rows(source, ages, now), fingerprint, keys={"source": source})
    job, _ = build_purge_job(with_lakehouse=True)
    result = job.execute_in_process(resources={"warehouse": warehouse, "lakehouse": lakehouse},
                                    run_config={"ops": {"purge_old_quarantined_raw_text": {"config": {"retention_days": 90}}}})
    [materialization] = [event for event in result.all_events if event.event_type_value == "STEP_OUTPUT"]
    metadata = {key: value.value for key, value in materialization.step_output_data.metadata.items()}
    assert metadata == {"purged_rows": 0, "retention_days": 90, "purged_rows_on_lakehouse": 3}
    assert purge_lake_raw_text(lakehouse, 90) == 0  # nothing more to purge

    rows = lakehouse.read_through(table, "2011-09-02").read_all().to_pylist()
    assert sorted((r["partition_day"], r["source"], r["line_no"], r["value"] is not None, r["raw_record"] is not None)
                  for r in rows) == [
        ("2011-09-01", "customers", 91, False, False), ("2011-09-01", "customers", 200, False, False),
        ("2011-09-01", "transactions", 2, True, True), ("2011-09-01", "transactions", 95, False, False),
        ("2011-09-02", "customers", 1, True, True), ("2011-09-02", "customers", 88, True, True)]
    assert lakehouse.day_fingerprint(table, "2011-09-02", {"source": "customers"}) == "d"  # the markers stay

    held_for_readers = files_left_behind(lakehouse, table)
    assert held_for_readers  # the snapshot the purge replaced: readers may be scanning it
    assert Lakehouse(**options, history_grace_minutes=0).expire_history(table) == len(held_for_readers)
    assert len(lakehouse.catalog().load_table(table).snapshots()) == 1
    assert files_left_behind(lakehouse, table) == set()
    texts = {value for path in (tmp_path / "lake").rglob("*.parquet")
             for value in pq.read_table(path).column("raw_record").to_pylist() if value is not None}
    assert texts == {'{"email": "bob1 at example.com"}', '{"email": "bob2 at example.com"}',
                     '{"email": "bob88 at example.com"}'}
