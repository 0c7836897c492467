"""The code location on a PostgreSQL-backed instance, configured by deploy/dagster.postgres.yaml as shipped.

Several partitions, all three ingestion assets each, are ingested at once by separate OS processes,
all recording their runs, events, check evaluations and pool-slot claims in the one PostgreSQL
database at the same time, as a production backfill does. Then the sensors, which read only the
event log, are ticked against that instance. One batch carries invalid emails and the day after
the backfill never lands: monitoring must see both.
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
import yaml

from resources.alerts import Alerts
from resources.warehouse import DuckDBWarehouse, fetch_all
from assets.monitor.check_alerts import asset_check_failure_alerts
from assets.monitor.freshness import build_partition_freshness_sensor
from assets.monitor.metrics import metric_anomaly_alerts
from assets.monitor.run_failures import run_failure_alerts
from assets.monitor.settings import MonitoringSettings
from tests.conftest import ROOT
from tests.ingestion_support import RAW_ASSETS, day, generate_landing, raw_resources
from tests.postgres_support import PostgresServer, newest_bin_dir, postgres_fixture  # noqa: F401 (`postgres`)
from tests.sensor_support import WebhookServer

pytestmark = pytest.mark.slow

DEPLOY_CONFIG = ROOT / "deploy" / "dagster.postgres.yaml"
PARTITIONS = 5
DAYS = [day(i) for i in range(PARTITIONS)]
BAD_DAY = day(3)  # its customers file gets invalid emails
MISSING_DAY = day(PARTITIONS)  # never lands: the freshness sensor must call it late
CORRUPT_EVERY = 3  # every third customer record of the bad day
# All three assets of every day at once: raw_customers of a day whose earlier catalog is still
# queued gives the pool's one slot back (a step retry) instead of holding it while it waits.
CONCURRENT_ASSETS = RAW_ASSETS
POOL = "duckdb"
RAW_TABLES = ("products", "customers", "customer_purchases", "transactions")  # identifiers from code


@dataclass(frozen=True)
class Backfill:
    dagster_home: Path
    warehouse: DuckDBWarehouse
    corrupted: int  # customer records of BAD_DAY given an invalid email
    customers: int  # customer records of BAD_DAY in all


def pg_env(server: PostgresServer) -> dict[str, str]:
    """The environment deploy/dagster.postgres.yaml reads its connection settings from."""
    return {"DAGSTER_PG_HOST": server.host, "DAGSTER_PG_PORT": str(server.port), "DAGSTER_PG_USER": server.user,
            "DAGSTER_PG_PASSWORD": server.password, "DAGSTER_PG_DB": server.db_name}


def corrupt_emails(customers_file: Path) -> tuple[int, int]:
    """Gives every CORRUPT_EVERY-th record an invalid email; returns (corrupted, records)."""
    records = [json.loads(line) for line in customers_file.read_text().splitlines() if line.strip()]
    for index in range(0, len(records), CORRUPT_EVERY):
        records[index]["email"] = "not-an-email"
    customers_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    return len(range(0, len(records), CORRUPT_EVERY)), len(records)


def materialize_partition(dagster_home: str, warehouse_path: str, landing: str, partition: str, barrier) -> None:
    """One backfill run in its own process, on the shared PostgreSQL instance (env inherited)."""
    warehouse = DuckDBWarehouse(path=warehouse_path, memory_limit="256MB", threads=1)
    with dg.DagsterInstance.from_config(dagster_home) as instance:
        barrier.wait(timeout=120)  # every process is imported and connected: start together
        result = dg.materialize(CONCURRENT_ASSETS, partition_key=partition, instance=instance,
                                resources=raw_resources(warehouse, landing), raise_on_error=False)
    if not result.success:
        failures = [e.step_failure_data.error.message for e in result.all_events if e.is_step_failure]
        raise SystemExit(f"{partition} failed: {failures}")


def run_concurrently(dagster_home: Path, warehouse_path: str, landing: Path) -> list[int | None]:
    context = mp.get_context("spawn")
    barrier = context.Barrier(PARTITIONS)
    processes = [context.Process(target=materialize_partition,
                                 args=(str(dagster_home), warehouse_path, str(landing), partition, barrier))
                 for partition in DAYS]
    for process in processes:
        process.start()
    deadline = time.monotonic() + 240
    for process in processes:
        process.join(max(deadline - time.monotonic(), 0))
    for process in processes:
        if process.is_alive():  # a stuck worker must fail the test, not hang it
            process.kill()
            process.join()
    return [process.exitcode for process in processes]


def prepare_instance(dagster_home: Path) -> None:
    """What a deployment does once before its first backfill."""
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:  # creates the schema
        # `dagster instance concurrency set duckdb 1`: on PostgreSQL, runs that first use a pool at
        # the same moment race to create its default limit, and the losers fail (UniqueViolation).
        instance.event_log_storage.set_concurrency_slots(POOL, 1)


@pytest.fixture(scope="module")
def backfill(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backfill]:
    root = tmp_path_factory.mktemp("postgres_instance")
    landing = generate_landing(root / "landing", customers=150, days=PARTITIONS, products=200)
    corrupted, customers = corrupt_emails(landing / "customers" / f"{BAD_DAY}.jsonl")
    dagster_home = root / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(DEPLOY_CONFIG, dagster_home / "dagster.yaml")
    warehouse = DuckDBWarehouse(path=str(root / "warehouse.duckdb"), memory_limit="256MB", threads=1)
    with pytest.MonkeyPatch.context() as env:
        for name, value in pg_env(postgres).items():
            env.setenv(name, value)  # spawned processes inherit it
        prepare_instance(dagster_home)
        assert run_concurrently(dagster_home, warehouse.path, landing) == [0] * PARTITIONS
        yield Backfill(dagster_home, warehouse, corrupted, customers)


@pytest.fixture
def instance(backfill: Backfill) -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.from_config(str(backfill.dagster_home)) as pg_instance:
        yield pg_instance


def run_partitions(instance: dg.DagsterInstance) -> dict[str, str]:
    """run id -> partition of every run the instance holds."""
    return {run.run_id: run.tags["dagster/partition"] for run in instance.get_runs()}


# ---- the instance --------------------------------------------------------------------------


def test_the_shipped_config_keeps_every_storage_in_postgres_with_credentials_from_env(instance):
    storages = (instance.run_storage, instance.event_log_storage, instance.schedule_storage)
    assert [type(s).__name__ for s in storages] == [
        "PostgresRunStorage", "PostgresEventLogStorage", "PostgresScheduleStorage"]
    shipped = yaml.safe_load(DEPLOY_CONFIG.read_text())
    for storage in ("run_storage", "event_log_storage", "schedule_storage"):
        assert shipped[storage]["config"]["postgres_db"]["password"] == {"env": "DAGSTER_PG_PASSWORD"}
    local = yaml.safe_load((ROOT / ".dagster_home" / "dagster.yaml").read_text())
    assert shipped["concurrency"] == local["concurrency"]


def test_every_run_is_recorded_as_a_success(instance):
    runs = instance.get_runs()
    assert sorted(run.tags["dagster/partition"] for run in runs) == DAYS  # one run a day, all at once
    assert {run.status for run in runs} == {dg.DagsterRunStatus.SUCCESS}
    assert instance.event_log_storage.get_concurrency_info(POOL).slot_count == 1


def test_the_event_log_holds_each_partitions_materializations_and_check_evaluations(instance):
    for asset in RAW_ASSETS:
        records = instance.fetch_materializations(asset.key, limit=100).records
        assert sorted(r.partition_key for r in records) == DAYS
        assert instance.get_materialized_partitions(asset.key) == set(DAYS)

    partition_of = run_partitions(instance)
    evaluations = instance.event_log_storage.get_logs_for_all_runs_by_log_id(
        dagster_event_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION, limit=1000).values()
    verdicts = {}
    for entry in evaluations:
        evaluation = entry.dagster_event.event_specific_data
        key = (evaluation.asset_key.to_user_string(), evaluation.check_name, partition_of[entry.run_id])
        verdicts[key] = evaluation.passed
    expected = {(asset.key.to_user_string(), check, partition): True for asset in RAW_ASSETS
                for check in ("record_accounting", "error_rate") for partition in DAYS}
    expected[("raw_customers", "error_rate", BAD_DAY)] = False
    assert verdicts == expected


def test_the_duckdb_pool_is_claimed_and_given_back_across_processes(instance):
    """Every warehouse step of every run claimed the pool's one slot in PostgreSQL and gave it back.

    The pool keeps waiting steps out of worker processes; it is not what keeps writes apart. On
    PostgreSQL, Dagster 1.13 claims a slot with a SELECT ... FOR UPDATE and an UPDATE in two
    autocommit statements, so two processes can, rarely, both claim the one free slot (CI saw
    two steps overlap by 0.9 s). The warehouse's own file lock serializes the writes either way:
    test_the_duckdb_data_reconciles checks the rows that result."""
    events = [entry for run in instance.get_runs() for entry in instance.all_logs(
        run.run_id, of_type={dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.ENGINE_EVENT})]
    succeeded = sum(entry.dagster_event_type == dg.DagsterEventType.STEP_SUCCESS for entry in events)
    blocked = sum(entry.message == f"Step blocked by limit for pool {POOL}" for entry in events)
    info = instance.event_log_storage.get_concurrency_info(POOL)
    assert succeeded == PARTITIONS * len(RAW_ASSETS)
    assert blocked >= PARTITIONS - 1  # fifteen steps started together: most waited for the slot
    assert info.slot_count == 1 and info.claimed_slots == [] and info.pending_steps == []


def test_the_duckdb_data_reconciles(backfill):
    with backfill.warehouse.connect(read_only=True) as con:
        landed = {table: [d for (d,) in fetch_all(
            con, f"SELECT DISTINCT partition_date::VARCHAR FROM raw.{table} ORDER BY 1")] for table in RAW_TABLES}
        fingerprints = fetch_all(con, "SELECT source, count(*) FROM ops.batch_fingerprints GROUP BY 1 ORDER BY 1")
        unbalanced = fetch_all(con, """SELECT source, partition_date FROM ops.batch_fingerprints
                                       WHERE input_records <> valid_records + quarantined_records""")
        bad_batch = fetch_all(con, """SELECT input_records, quarantined_records FROM ops.batch_fingerprints
                                      WHERE source = 'customers' AND partition_date = ?""", [BAD_DAY])
        quarantined = fetch_all(con, """SELECT partition_date::VARCHAR, table_name, rule, count(*)
                                        FROM ops.schema_errors GROUP BY ALL""")
    assert landed == {table: DAYS for table in landed}
    assert fingerprints == [("customers", PARTITIONS), ("products", PARTITIONS), ("transactions", PARTITIONS)]
    assert unbalanced == [] and bad_batch == [(backfill.customers, backfill.corrupted)]
    assert quarantined == [(BAD_DAY, "customers", "email_invalid", backfill.corrupted)]


def test_the_password_is_stored_nowhere_in_postgres_or_the_instance_dir(backfill, postgres):
    dump = subprocess.run(
        [str(newest_bin_dir() / "pg_dump"), "--data-only", "-h", postgres.host, "-p", str(postgres.port),
         "-U", postgres.user, postgres.db_name],
        capture_output=True, env={**os.environ, "PGPASSWORD": postgres.password}, timeout=60, check=True).stdout
    assert b"raw_customers" in dump  # the dump does hold the event log
    assert postgres.password.encode() not in dump
    for path in backfill.dagster_home.rglob("*"):
        assert not path.is_file() or postgres.password.encode() not in path.read_bytes(), path


# ---- monitoring on the PostgreSQL event log ------------------------------------------------


def tick(sensor: dg.SensorDefinition, instance: dg.DagsterInstance, resources: dict, cursor: str | None) -> str | None:
    """One evaluation of the sensor, as the daemon would run it; returns the next cursor."""
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        return sensor(context).cursor


def test_sensors_read_the_postgres_event_log_and_alert_on_the_bad_batch_and_the_missing_day(instance, backfill):
    # Deadline of the missing day (its end + 6 h) just passed; the look-back covers the backfilled days.
    now = dt.datetime.fromisoformat(MISSING_DAY).replace(tzinfo=dt.UTC) + dt.timedelta(days=1, hours=7)
    freshness = build_partition_freshness_sensor(clock=lambda: now, name="freshness_under_test")
    # Tiny generated batches vary more than 3x from day to day, and concurrent runs land in any
    # order: the row-count rule (tested in test_sensors_rules) gets too little history to judge.
    monitoring = MonitoringSettings(freshness_lookback_days=PARTITIONS + 1, row_count_min_history=PARTITIONS + 1)
    sensors = (asset_check_failure_alerts, run_failure_alerts, metric_anomaly_alerts, freshness)

    with WebhookServer() as webhook:
        resources = {"alerts": Alerts(warehouse=backfill.warehouse, webhook_url=webhook.url, webhook_attempts=1),
                     "monitoring": monitoring}
        cursors = {sensor.name: tick(sensor, instance, resources, None) for sensor in sensors}
        first_tick = list(webhook.received)
        for sensor in sensors:
            tick(sensor, instance, resources, cursors[sensor.name])
        second_tick = webhook.received[len(first_tick):]

    raised = sorted((a["source"], a["details"].get("asset"), a["details"].get("partition")) for a in first_tick)

    assert raised == [
        ("sensor:asset_check_failed", "raw_customers", BAD_DAY),
        *sorted(("sensor:partition_late", asset.key.to_user_string(), MISSING_DAY) for asset in RAW_ASSETS),
    ]
    assert second_tick == []  # each problem is raised once
    # The failed error_rate check is the one incident for the bad batch (no second metric alert).
    (error_rate,) = [a for a in first_tick if a["source"] == "sensor:asset_check_failed"]
    assert error_rate["details"]["check"] == "error_rate"
    assert error_rate["details"]["metadata"]["error_rate"] == round(backfill.corrupted / backfill.customers, 6)
