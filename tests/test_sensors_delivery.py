"""Sensors end to end: real runs, real ticks, alerts on a real webhook and in a real DuckDB file, once."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time

import dagster as dg
import pytest

from assets.common.partitions import daily_partitions
from resources.alerts import Alerts
from resources.warehouse import DuckDBWarehouse, fetch_all, table_exists
from assets.monitor import defs as sensor_defs
from assets.monitor.check_alerts import asset_check_failure_alerts
from assets.monitor.delivery import AlertSensorState
from assets.monitor.freshness import build_partition_freshness_sensor
from assets.monitor.metrics import metric_anomaly_alerts
from assets.monitor.run_failures import run_failure_alerts
from assets.monitor.settings import MonitoringSettings
from tests.sensor_support import WebhookServer, dagster_instance, emit


@pytest.fixture
def instance():
    with dagster_instance() as test_instance:
        yield test_instance


@pytest.fixture
def webhook():
    with WebhookServer() as server:
        yield server


@pytest.fixture
def resources(warehouse: DuckDBWarehouse, webhook: WebhookServer) -> dict:
    return {
        "alerts": Alerts(warehouse=warehouse, webhook_url=webhook.url, webhook_attempts=1),
        "monitoring": MonitoringSettings(alert_row_lock_timeout_seconds=0.5),
    }


def tick(sensor: dg.SensorDefinition, instance, resources: dict, cursor: str | None) -> str | None:
    """One evaluation of the sensor, as the daemon would run it; returns the next cursor."""
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        return sensor(context).cursor


def alert_rows(warehouse: DuckDBWarehouse) -> list[tuple]:
    with warehouse.connect(read_only=True) as con:
        if not table_exists(con, "ops.alerts"):
            return []
        return fetch_all(con, "SELECT severity, source, title, details FROM ops.alerts ORDER BY raised_at")


@dg.asset(partitions_def=daily_partitions, check_specs=[dg.AssetCheckSpec("rows_reconcile", asset="landed_batch")])
def landed_batch() -> dg.MaterializeResult:
    return dg.MaterializeResult(
        metadata={"dagster/row_count": 3},
        check_results=[dg.AssetCheckResult(
            check_name="rows_reconcile", passed=False, severity=dg.AssetCheckSeverity.WARN,
            metadata={"input": 10, "valid": 6, "quarantined": 3},
        )],
    )


def test_failed_check_reaches_webhook_and_table_once_across_ticks(instance, resources, webhook, warehouse):
    dg.materialize([landed_batch], instance=instance, partition_key="2024-05-01")

    cursor = tick(asset_check_failure_alerts, instance, resources, None)
    cursor = tick(asset_check_failure_alerts, instance, resources, cursor)

    (sent,) = webhook.received
    assert sent["severity"] == "WARN" and sent["source"] == "sensor:asset_check_failed"
    assert sent["details"]["partition"] == "2024-05-01" and sent["details"]["check"] == "rows_reconcile"
    assert sent["details"]["metadata"] == {"input": 10, "valid": 6, "quarantined": 3}
    ((severity, source, title, details),) = alert_rows(warehouse)
    assert (severity, source) == ("WARN", "sensor:asset_check_failed")
    assert json.loads(details)["dedup_key"] == sent["details"]["dedup_key"]

    dg.materialize([landed_batch], instance=instance, partition_key="2024-05-02")
    tick(asset_check_failure_alerts, instance, resources, cursor)
    assert [a["details"]["partition"] for a in webhook.received] == ["2024-05-01", "2024-05-02"]


def test_run_failure_alert_from_the_event_log(instance, resources, webhook, monkeypatch):
    monkeypatch.setenv("MODEL_API_KEY", "very-secret-model-key")

    @dg.asset
    def product_embeddings() -> None:
        raise RuntimeError("model endpoint said 401 for key very-secret-model-key")

    tick(run_failure_alerts, instance, resources, None)
    assert webhook.received == []  # nothing failed yet
    dg.materialize([product_embeddings], instance=instance, raise_on_error=False)
    cursor = tick(run_failure_alerts, instance, resources, None)
    tick(run_failure_alerts, instance, resources, cursor)

    (sent,) = webhook.received
    assert sent["severity"] == "ERROR"
    assert sent["details"]["failed_steps"][0]["step"] == "product_embeddings"
    assert "RuntimeError: model endpoint said 401" in sent["message"]
    assert "very-secret-model-key" not in json.dumps(sent)


def test_late_partition_alerts_once_per_asset_and_day(instance, resources, webhook):
    emit(instance, "raw_products", {"dagster/row_count": 10}, partition="2024-05-01")
    now = {"value": dt.datetime(2024, 5, 3, 12, tzinfo=dt.timezone.utc)}
    sensor = build_partition_freshness_sensor(clock=lambda: now["value"], name="freshness_under_test")
    resources["monitoring"] = MonitoringSettings(
        freshness_assets=["raw_products"], freshness_lag_hours=6, freshness_lookback_days=2
    )

    cursor = tick(sensor, instance, resources, None)
    cursor = tick(sensor, instance, resources, cursor)
    assert [a["details"]["partition"] for a in webhook.received] == ["2024-05-02"]

    now["value"] += dt.timedelta(days=1)  # 2024-05-03 is now due too, and still missing
    tick(sensor, instance, resources, cursor)
    assert [a["details"]["partition"] for a in webhook.received] == ["2024-05-02", "2024-05-03"]


def test_metric_anomaly_alert_once(instance, resources, webhook, warehouse):
    emit(instance, "validated_recommendations", {"rejection_rate": 0.31, "rejected_by_rule": {"out_of_stock": 31}})
    cursor = tick(metric_anomaly_alerts, instance, resources, None)
    tick(metric_anomaly_alerts, instance, resources, cursor)
    (sent,) = webhook.received
    assert sent["source"] == "sensor:rejection_rate" and sent["details"]["rejection_rate"] == 0.31
    assert len(alert_rows(warehouse)) == 1


def test_busy_warehouse_never_blocks_the_alert_and_the_row_lands_later(instance, resources, webhook, warehouse):
    dg.materialize([landed_batch], instance=instance, partition_key="2024-05-01")
    holding, release = threading.Event(), threading.Event()

    def long_pipeline_step() -> None:
        with warehouse.connect():
            holding.set()
            release.wait(30)

    step = threading.Thread(target=long_pipeline_step)
    step.start()
    holding.wait(10)
    try:
        started = time.monotonic()
        cursor = tick(asset_check_failure_alerts, instance, resources, None)
        assert time.monotonic() - started < 10
        assert len(webhook.received) == 1  # the alert went out while the lock was held
        assert len(AlertSensorState.from_cursor(cursor).outbox) == 1
    finally:
        release.set()
        step.join()

    assert alert_rows(warehouse) == []
    cursor = tick(asset_check_failure_alerts, instance, resources, cursor)
    assert len(alert_rows(warehouse)) == 1 and len(webhook.received) == 1
    assert AlertSensorState.from_cursor(cursor).outbox == []


def test_a_webhook_that_is_down_does_not_lose_the_alert(instance, resources, webhook, warehouse):
    webhook.status = 503
    dg.materialize([landed_batch], instance=instance, partition_key="2024-05-01")
    cursor = tick(asset_check_failure_alerts, instance, resources, None)
    ((_, _, _, details),) = alert_rows(warehouse)
    assert json.loads(details)["check"] == "rows_reconcile"
    assert AlertSensorState.from_cursor(cursor).outbox == []


def test_alerts_left_over_when_a_tick_runs_out_of_time_go_out_on_the_next(instance, resources, webhook):
    for day in ("2024-05-01", "2024-05-02"):
        dg.materialize([landed_batch], instance=instance, partition_key=day)
    out_of_time = {**resources, "monitoring": MonitoringSettings(tick_budget_seconds=0)}
    cursor = tick(asset_check_failure_alerts, instance, out_of_time, None)
    assert webhook.received == [] and AlertSensorState.from_cursor(cursor).unsent() == 2

    cursor = tick(asset_check_failure_alerts, instance, resources, cursor)
    tick(asset_check_failure_alerts, instance, resources, cursor)
    assert sorted(a["details"]["partition"] for a in webhook.received) == ["2024-05-01", "2024-05-02"]


def test_sensor_definitions_load():
    names = {sensor.name for sensor in sensor_defs.sensors}
    assert names == {"asset_check_failure_alerts", "run_failure_alerts", "partition_freshness_alerts",
                     "metric_anomaly_alerts"}


@dg.asset(partitions_def=daily_partitions, check_specs=[dg.AssetCheckSpec("volume_ok", asset="daily_counts")],
          config_schema={"passed": bool})
def daily_counts(context) -> dg.MaterializeResult:
    passed = context.op_config["passed"]
    return dg.MaterializeResult(check_results=[dg.AssetCheckResult(
        check_name="volume_ok", passed=passed, severity=dg.AssetCheckSeverity.ERROR,
        metadata={"row_count": 10.0 if passed else 1.0})])


def run_counts(instance, passed: bool) -> None:
    dg.materialize([daily_counts], instance=instance, partition_key="2024-05-01",
                   run_config={"ops": {"daily_counts": {"config": {"passed": passed}}}})


def evaluate(sensor: dg.SensorDefinition, instance, resources: dict, cursor: str | None) -> dg.SensorResult:
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        return sensor(context)


def test_one_incident_while_the_problem_lasts_a_notice_when_it_resolves_all_visible_in_the_ui(
        instance, resources, webhook):
    run_counts(instance, passed=False)
    run_counts(instance, passed=False)  # the same problem on the next run: still one incident
    first = evaluate(asset_check_failure_alerts, instance, resources, None)
    assert [(a["severity"], a["details"]["incident"]) for a in webhook.received] == [("ERROR", "open")]
    # Where a user of the UI looks: an observation of the `incidents` asset (and the tick's events).
    (opened,) = first.asset_events
    assert opened.asset_key == dg.AssetKey("incidents") and opened.metadata["incident"].value == "open"
    assert opened.metadata["asset"].value == "daily_counts" and opened.metadata["severity"].value == "ERROR"

    run_counts(instance, passed=True)
    resolved = evaluate(asset_check_failure_alerts, instance, resources, first.cursor)
    assert [(a["severity"], a["details"]["incident"]) for a in webhook.received][1:] == [("INFO", "resolved")]
    assert webhook.received[1]["title"].startswith("resolved: ")
    assert resolved.asset_events[0].metadata["incident"].value == "resolved"

    run_counts(instance, passed=True)  # passing again: nothing open, nothing sent
    quiet = evaluate(asset_check_failure_alerts, instance, resources, resolved.cursor)
    run_counts(instance, passed=False)  # a new failure is a new incident
    evaluate(asset_check_failure_alerts, instance, resources, quiet.cursor)
    assert [a["details"]["incident"] for a in webhook.received] == ["open", "resolved", "open"]


def test_a_run_failure_incident_is_resolved_by_the_next_successful_run_of_the_day(instance, resources, webhook):
    @dg.asset(partitions_def=daily_partitions, config_schema={"fail": bool})
    def shaky(context) -> None:
        if context.op_config["fail"]:
            raise RuntimeError("boom")

    for fail in (True, True, False):
        dg.materialize([shaky], instance=instance, partition_key="2024-05-03", raise_on_error=False,
                       run_config={"ops": {"shaky": {"config": {"fail": fail}}}})
    evaluate(run_failure_alerts, instance, resources, None)
    assert [(a["severity"], a["details"]["incident"]) for a in webhook.received] == [("ERROR", "open"), ("INFO", "resolved")]
