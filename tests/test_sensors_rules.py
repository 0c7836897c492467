"""The alert rules against a real Dagster instance and real runs: what fires, what doesn't, once."""

import datetime as dt
import json
import time

import dagster as dg
import duckdb
import numpy as np
import pytest

from assets.common.partitions import daily_partitions
from assets.infer.recommendations import confidence_summary
from assets.monitor.check_alerts import failed_check_alerts as check_alerts
from assets.monitor.check_alerts import previous_verdict
from assets.monitor.freshness import late_partition_alerts as freshness_alerts
from assets.monitor.metrics import metric_alerts
from assets.monitor.run_failures import failed_run_alerts, run_failure_alert
from assets.monitor.settings import MonitoringSettings
from tests.sensor_support import dagster_instance, emit


@pytest.fixture
def instance():
    with dagster_instance() as test_instance:
        yield test_instance


def opened(alerts):
    """The alerts that open an incident (the finders also give the notices that would close one)."""
    return [a for a in alerts if not a.resolves]


def failed_check_alerts(instance, after, limit):
    found, cursor = check_alerts(instance, after, limit)
    return opened(found), cursor


def late_partition_alerts(instance, settings, now):
    return opened(freshness_alerts(instance, settings, now))


def new_alerts(instance, settings, positions):
    """Metric alerts since the last call (positions is the per-asset cursor, advanced in place)."""
    found, advanced = metric_alerts(instance, settings, positions)
    positions.clear()
    positions.update(advanced)
    return opened(found)


# ---- asset checks ------------------------------------------------------------------------


class BuildConfig(dg.Config):
    skip: bool = False  # report a skipped build (inputs unchanged) that re-reports its checks
    volume_fails: bool = False  # the stored build judged by a tighter threshold


@dg.asset(
    partitions_def=daily_partitions,
    check_specs=[
        dg.AssetCheckSpec("volume_ok", asset="checked_batch"),
        dg.AssetCheckSpec("keys_unique", asset="checked_batch"),
        dg.AssetCheckSpec("schema_ok", asset="checked_batch"),
    ],
)
def checked_batch(config: BuildConfig) -> dg.MaterializeResult:
    return dg.MaterializeResult(
        metadata={"dagster/row_count": 10, "skipped": config.skip},
        check_results=[
            dg.AssetCheckResult(check_name="volume_ok", passed=not config.volume_fails),
            dg.AssetCheckResult(
                check_name="keys_unique", passed=False, severity=dg.AssetCheckSeverity.WARN,
                metadata={"duplicates": 3, "api_key": "sk-should-never-leave-123456"},
            ),
            dg.AssetCheckResult(
                check_name="schema_ok", passed=False, severity=dg.AssetCheckSeverity.ERROR,
                metadata={"error_rate": 0.12}, description="too many invalid rows",
            ),
        ],
    )


def test_each_failed_check_alerts_once_with_partition_severity_and_metadata(instance):
    dg.materialize([checked_batch], instance=instance, partition_key="2024-03-01")

    alerts, cursor = failed_check_alerts(instance, -1, limit=100)

    by_check = {a.details["check"]: a for a in alerts}
    assert set(by_check) == {"keys_unique", "schema_ok"}
    warn, error = by_check["keys_unique"], by_check["schema_ok"]
    assert (warn.severity, error.severity) == ("WARN", "ERROR")
    assert warn.asset == "checked_batch" and warn.partition == "2024-03-01"
    assert warn.details["metadata"]["duplicates"] == 3
    assert "sk-should" not in json.dumps(warn.to_json())
    assert error.details["description"] == "too many invalid rows"
    assert failed_check_alerts(instance, cursor, limit=100) == ([], cursor)

    dg.materialize([checked_batch], instance=instance, partition_key="2024-03-02")
    later, _ = failed_check_alerts(instance, cursor, limit=100)
    assert {a.partition for a in later} == {"2024-03-02"} and len(later) == 2
    assert not {a.dedup_key for a in later} & {a.dedup_key for a in alerts}


def test_a_skipped_build_re_reporting_its_failed_checks_is_not_alerted_again(instance):
    dg.materialize([checked_batch], instance=instance, partition_key="2024-03-01")
    first, cursor = failed_check_alerts(instance, -1, limit=100)
    dg.materialize([checked_batch], instance=instance, partition_key="2024-03-01",
                   run_config={"ops": {"checked_batch": {"config": {"skip": True}}}})
    assert len(first) == 2 and failed_check_alerts(instance, cursor, limit=100)[0] == []


def test_a_verdict_that_changes_on_a_skipped_build_is_alerted(instance):
    """A threshold tightened, or a later day's build judged in an earlier day's run, fails a
    check on a skip: no incident was opened, and a run stopped by such a blocking check raised
    none at all (found by an outside-in probe). Only a repeated verdict is quiet."""
    dg.materialize([checked_batch], instance=instance, partition_key="2024-03-01")
    _, cursor = failed_check_alerts(instance, -1, limit=100)
    tightened_at = time.time()
    tighter = {"ops": {"checked_batch": {"config": {"skip": True, "volume_fails": True}}}}
    dg.materialize([checked_batch], instance=instance, partition_key="2024-03-01", run_config=tighter)
    changed, cursor = failed_check_alerts(instance, cursor, limit=100)
    assert [(a.details["check"], a.resolves) for a in changed] == [("volume_ok", False)]
    dg.materialize([checked_batch], instance=instance, partition_key="2024-03-01", run_config=tighter)
    assert failed_check_alerts(instance, cursor, limit=100)[0] == []  # the same verdict again
    key = dg.AssetCheckKey(dg.AssetKey("checked_batch"), "volume_ok")
    for size in (1, 100):  # read a page at a time, past the planned evaluations
        assert previous_verdict(instance, key, tightened_at, page=size) is True
        assert previous_verdict(instance, key, time.time(), page=size) is False


def test_check_cursor_pages_through_a_backlog(instance):
    for day in ("2024-03-01", "2024-03-02", "2024-03-03"):
        dg.materialize([checked_batch], instance=instance, partition_key=day)
    seen, cursor = [], -1
    for _ in range(10):
        page, cursor = failed_check_alerts(instance, cursor, limit=2)
        seen += page
    assert len(seen) == 6 and len({a.dedup_key for a in seen}) == 6


# ---- run failures ------------------------------------------------------------------------


def test_run_failure_alert_names_the_step_and_error_without_secrets(instance, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-value-42")

    @dg.asset(partitions_def=daily_partitions)
    def flaky_embeddings() -> None:
        raise ValueError("endpoint refused key sk-test-secret-value-42 with Bearer abcdefghijk123")

    result = dg.materialize([flaky_embeddings], instance=instance, partition_key="2024-03-05", raise_on_error=False)
    assert not result.success
    step_failures = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]

    alert = run_failure_alert(instance, result.dagster_run, result.get_run_failure_event(), step_failures)

    assert alert.dedup_key == "run_failed:__ephemeral_asset_job__:2024-03-05"  # one incident per job and day
    assert alert.partition == "2024-03-05" and alert.severity == "ERROR"
    assert alert.details["failed_steps"][0]["step"] == "flaky_embeddings"
    assert "ValueError: endpoint refused key" in alert.details["failed_steps"][0]["error"]
    text = json.dumps(alert.to_json())
    assert "sk-test-secret" not in text and "abcdefghijk123" not in text


def test_a_run_stopped_by_a_blocking_check_is_one_incident_the_checks_not_two(instance):
    @dg.asset(partitions_def=daily_partitions, check_specs=[
        dg.AssetCheckSpec("error_rate", asset="bad_batch", blocking=True, description="at most 5 % quarantined")])
    def bad_batch() -> dg.MaterializeResult:
        return dg.MaterializeResult(check_results=[dg.AssetCheckResult(
            check_name="error_rate", passed=False, severity=dg.AssetCheckSeverity.ERROR, metadata={"error_rate": 0.2})])

    @dg.asset(partitions_def=daily_partitions, deps=[bad_batch])
    def downstream() -> None:
        pass

    result = dg.materialize([bad_batch, downstream], instance=instance, partition_key="2024-03-05", raise_on_error=False)
    assert not result.success  # the blocking check stopped the run
    checks, _ = failed_check_alerts(instance, -1, limit=100)
    runs, _ = failed_run_alerts(instance, -1, limit=100)
    assert [(a.rule, a.details["check"]) for a in checks] == [("asset_check_failed", "error_rate")]
    assert runs == []

    @dg.asset(partitions_def=daily_partitions)
    def crashing() -> None:
        raise RuntimeError("disk full")

    dg.materialize([crashing], instance=instance, partition_key="2024-03-05", raise_on_error=False)
    (crash,) = failed_run_alerts(instance, -1, limit=100)[0]
    assert "disk full" in crash.message


# ---- partition freshness -----------------------------------------------------------------


def test_late_partitions_alert_per_asset_and_day_after_the_lag(instance):
    for day in ("2024-03-01", "2024-03-02", "2024-03-04"):
        emit(instance, "raw_products", {"dagster/row_count": 100}, partition=day)
    settings = MonitoringSettings(
        freshness_assets=["raw_products", "raw_customers"], freshness_lag_hours=6, freshness_lookback_days=4
    )
    # 2024-03-05 ended at midnight; 05:00 is inside its 6 h lag, so only earlier days can be late;
    # the 4-day look-back starts at 2024-03-02 05:00, the deadline of 2024-03-01 (06:00) is after it.
    now = dt.datetime(2024, 3, 6, 5, tzinfo=dt.timezone.utc)

    late = {(a.asset, a.partition) for a in late_partition_alerts(instance, settings, now)}

    assert late == {
        ("raw_products", "2024-03-03"),
        *{("raw_customers", day) for day in ("2024-03-01", "2024-03-02", "2024-03-03", "2024-03-04")},
    }
    after_lag = {(a.asset, a.partition) for a in late_partition_alerts(instance, settings, now + dt.timedelta(hours=2))}
    assert ("raw_products", "2024-03-05") in after_lag


def test_the_shops_closed_days_are_not_expected_by_the_freshness_sensor(instance, monkeypatch):
    """One calendar: LANDING_CLOSED_WEEKDAYS / LANDING_CLOSED_DAYS make ingestion land those days as
    closed and the default monitoring settings expect no batch on them."""
    from assets.monitor.settings import settings_for

    monkeypatch.setenv("PIPELINE_SOURCES", "transactions")
    monkeypatch.setenv("LANDING_CLOSED_WEEKDAYS", "Sat")
    monkeypatch.setenv("LANDING_CLOSED_DAYS", "2024-03-04")
    calendar = settings_for()
    assert calendar.expected_weekdays == [0, 1, 2, 3, 4, 6] and calendar.holidays == ["2024-03-04"]
    settings = MonitoringSettings(freshness_assets=calendar.freshness_assets, expected_weekdays=calendar.expected_weekdays,
                                  holidays=calendar.holidays, freshness_lookback_days=4)
    emit(instance, "raw_transactions", {"dagster/row_count": 5}, partition="2024-03-01")  # a Friday
    now = dt.datetime(2024, 3, 6, 7, tzinfo=dt.timezone.utc)  # Saturday the 2nd to Tuesday the 5th are due
    late = {a.partition for a in freshness_alerts(instance, settings, now) if not a.resolves}
    assert late == {"2024-03-03", "2024-03-05"}
    monkeypatch.setenv("LANDING_CLOSED_WEEKDAYS", "Saturdays")
    with pytest.raises(ValueError, match="not a day of the week"):
        settings_for()


def test_no_freshness_alert_when_every_due_day_landed(instance):
    for day in ("2024-03-04", "2024-03-05"):
        emit(instance, "raw_transactions", {"dagster/row_count": 5}, partition=day)
    settings = MonitoringSettings(freshness_assets=["raw_transactions"], freshness_lookback_days=2)
    now = dt.datetime(2024, 3, 6, 7, tzinfo=dt.timezone.utc)
    assert late_partition_alerts(instance, settings, now) == []


# ---- metric rules ------------------------------------------------------------------------


def test_row_count_anomaly_against_the_trailing_median_ignoring_skips(instance):
    settings = MonitoringSettings(row_count_min_history=3, row_count_max_change=0.3)
    positions: dict[str, int] = {}
    for day, rows in (("2024-03-01", 1000), ("2024-03-02", 1100), ("2024-03-03", 900), ("2024-03-04", 1200)):
        emit(instance, "raw_products", {"dagster/row_count": rows}, partition=day)
    emit(instance, "raw_products", {"skipped": True, "dagster/row_count": 1}, partition="2024-03-04")
    assert new_alerts(instance, settings, positions) == []

    emit(instance, "raw_products", {"dagster/row_count": 40}, partition="2024-03-05")
    (alert,) = new_alerts(instance, settings, positions)
    assert alert.rule == "row_count_anomaly" and alert.partition == "2024-03-05"
    assert alert.details["median"] == 1050 and alert.details["row_count"] == 40
    assert new_alerts(instance, settings, positions) == []


def test_a_closed_days_empty_batch_is_no_row_count_anomaly_nor_part_of_the_baseline(instance):
    """A closed day (LANDING_CLOSED_*) lands no records by design: 0 rows is neither an anomaly
    nor a point of the trailing median the next day is judged against."""
    settings = MonitoringSettings(row_count_min_history=3, row_count_max_change=0.3)
    positions: dict[str, int] = {}
    for day, rows in (("2024-03-01", 1000), ("2024-03-02", 1100), ("2024-03-04", 900)):
        emit(instance, "raw_transactions", {"dagster/row_count": rows}, partition=day)
    for day in ("2024-03-05", "2024-03-06"):
        emit(instance, "raw_transactions", {"dagster/row_count": 0, "closed_day": "a closed day"}, partition=day)
    assert new_alerts(instance, settings, positions) == []
    emit(instance, "raw_transactions", {"dagster/row_count": 1000}, partition="2024-03-07")
    assert new_alerts(instance, settings, positions) == []  # against 1000, 1100, 900; not against 0, 0


def test_row_count_band_is_thirty_percent_of_the_trailing_median(instance):
    positions: dict[str, int] = {}
    for index, rows in enumerate((1000, 1000, 1000, 1290)):
        emit(instance, "raw_products", {"dagster/row_count": rows}, partition=f"2024-03-0{index + 1}")
    assert new_alerts(instance, MonitoringSettings(), positions) == []
    emit(instance, "raw_products", {"dagster/row_count": 1320}, partition="2024-03-05")
    (alert,) = new_alerts(instance, MonitoringSettings(), positions)
    assert alert.details["change"] == 0.32


def test_a_quiet_sunday_is_judged_against_earlier_sundays_not_against_weekdays(instance):
    positions: dict[str, int] = {}
    day, sunday_rows = dt.date(2024, 3, 4), iter((300, 320, 290, 310, 305))  # a Monday
    for _ in range(5 * 7):
        rows = next(sunday_rows) if day.weekday() == 6 else 1000
        emit(instance, "raw_products", {"dagster/row_count": rows}, partition=day.isoformat())
        day += dt.timedelta(days=1)
    quiet_sundays = [a for a in new_alerts(instance, MonitoringSettings(), positions)
                     if a.rule == "row_count_anomaly"]
    # Only the first Sundays lack the weekday history and are judged by the band alone.
    assert {dt.date.fromisoformat(a.partition).weekday() for a in quiet_sundays} == {6}
    assert len(quiet_sundays) == 4

    emit(instance, "raw_products", {"dagster/row_count": 300}, partition=day.isoformat())  # a Monday
    emit(instance, "raw_products", {"dagster/row_count": 40}, partition=(day + dt.timedelta(days=6)).isoformat())
    alerts = {a.partition: a for a in new_alerts(instance, MonitoringSettings(), positions)}
    assert set(alerts) == {day.isoformat(), (day + dt.timedelta(days=6)).isoformat()}
    sunday = alerts[(day + dt.timedelta(days=6)).isoformat()]
    assert sunday.details["robust_z"] < -3.5 and "weekday" in sunday.message


def test_dlq_alerts_on_growth_or_above_threshold(instance):
    settings = MonitoringSettings(max_dlq_count=50)
    positions: dict[str, int] = {}
    emit(instance, "product_embeddings", {"dlq_count": 3})
    emit(instance, "product_embeddings", {"dlq_count": 3})
    emit(instance, "product_embeddings", {"dlq_count": 2})
    assert new_alerts(instance, settings, positions) == []
    emit(instance, "product_embeddings", {"dlq_count": 7})
    emit(instance, "recommendations", {"dlq_count": 80})
    alerts = {a.asset: a for a in new_alerts(instance, settings, positions)}
    assert set(alerts) == {"product_embeddings", "recommendations"}
    assert "grew from 2" in alerts["product_embeddings"].message
    assert "above 50" in alerts["recommendations"].message


def test_model_latency_thresholds(instance):
    settings = MonitoringSettings(max_latency_p95_ms=500, max_latency_p99_ms=900)
    emit(instance, "product_embeddings", {"latency_p95_ms": 400.0, "latency_p99_ms": 800.0, "requests": 50})
    emit(instance, "product_embeddings", {"latency_p95_ms": 450.0, "latency_p99_ms": 1200.0, "requests": 50})
    emit(instance, "product_embeddings", {"latency_ms_p95": 650.0, "latency_ms_p99": 700.0, "requests": 50})  # the clients' spelling
    emit(instance, "product_embeddings", {"latency_ms_p95": 9000.0, "latency_ms_p99": 9000.0, "requests": 2})  # a cold model's first answers
    alerts = new_alerts(instance, settings, {})
    assert [a.rule for a in alerts] == ["model_latency"] * 2
    assert "latency_p99_ms 1,200 > 900" in alerts[0].message and "latency_p95_ms 650 > 500" in alerts[1].message


def histogram(shares: list[float], total: int = 10_000) -> str:
    return json.dumps([round(s * total) for s in shares])


STABLE = [0.02, 0.03, 0.05, 0.1, 0.15, 0.2, 0.2, 0.15, 0.07, 0.03]
SHIFTED_DOWN = [0.3, 0.25, 0.15, 0.1, 0.08, 0.05, 0.03, 0.02, 0.01, 0.01]


def test_confidence_drop_and_drift_on_recommendations(instance):
    settings = MonitoringSettings()
    positions: dict[str, int] = {}
    for mean in (0.62, 0.60, 0.61):
        emit(instance, "recommendations", {"confidence_mean": mean, "confidence_p50": mean,
                                           "confidence_histogram": dg.MetadataValue.json(json.loads(histogram(STABLE)))})
    assert new_alerts(instance, settings, positions) == []

    emit(instance, "recommendations", {"confidence_mean": 0.35, "confidence_p10": 0.05, "confidence_p50": 0.3,
                                       "confidence_p90": 0.7, "confidence_histogram": histogram(SHIFTED_DOWN)})
    alerts = {a.rule: a for a in new_alerts(instance, settings, positions)}
    assert set(alerts) == {"confidence_drop", "confidence_drift"}
    assert alerts["confidence_drop"].details["baseline_median"] == 0.61
    assert alerts["confidence_drop"].details["confidence_p10"] == 0.05
    assert alerts["confidence_drift"].details["psi"] > 0.2


def test_confidence_bins_follow_the_reference_deciles_so_a_small_shift_is_seen(instance):
    """Confidences lie within a few hundredths: fixed 0-1 bins would hold them all in one bin
    and PSI would be 0 whatever happened; bins at the reference build's deciles see a shift."""
    rng = np.random.default_rng(7)

    def summary(confidences, edges):
        with duckdb.connect() as con:
            con.execute("CREATE SCHEMA ml; CREATE TABLE ml.recommendations (confidence DOUBLE, predicted_value DOUBLE)")
            con.executemany("INSERT INTO ml.recommendations VALUES (?, 1.0)", [[float(c)] for c in confidences])
            return confidence_summary(con, edges)

    reference = summary(rng.normal(0.52, 0.01, 5000), None)
    edges = reference["confidence_edges"].value
    assert len(edges) == 9 and 0.5 < edges[0] < edges[-1] < 0.54
    assert sorted(reference["confidence_histogram"].value)[0] >= 450  # about a tenth in each bin

    positions: dict[str, int] = {}
    emit(instance, "recommendations", reference)
    emit(instance, "recommendations", summary(rng.normal(0.52, 0.01, 5000), edges))
    assert new_alerts(instance, MonitoringSettings(), positions) == []

    emit(instance, "recommendations", summary(rng.normal(0.53, 0.01, 5000), edges))
    (drift,) = [a for a in new_alerts(instance, MonitoringSettings(), positions) if a.rule == "confidence_drift"]
    assert drift.details["psi"] > 0.2

    # New reference bins (reset_confidence_bins): no comparison across different bins.
    emit(instance, "recommendations", summary(rng.normal(0.60, 0.01, 5000), None))
    assert [a.rule for a in new_alerts(instance, MonitoringSettings(), positions)] == []


def test_the_confidence_summary_from_counts_by_value_equals_the_figures_over_every_row():
    rng = np.random.default_rng(11)
    confidences = np.round(rng.beta(2, 30, 20000), 4)  # calibrated: few distinct values
    with duckdb.connect() as con:
        con.execute("CREATE SCHEMA ml; CREATE TABLE ml.recommendations (confidence DOUBLE, predicted_value DOUBLE)")
        con.executemany("INSERT INTO ml.recommendations VALUES (?, ?)",
                        [[float(c), float(i % 17)] for i, c in enumerate(confidences)] + [[None, 3.0], [0.5, None]])
        summary = confidence_summary(con, None)
        expected = con.execute("""SELECT avg(confidence), quantile_cont(confidence, [0.1, 0.5, 0.9]), avg(predicted_value)
                                  FROM ml.recommendations""").fetchone()
        assert not con.execute("SELECT * FROM duckdb_tables() WHERE table_name = 'confidence_counts'").fetchall()
    mean, (p10, p50, p90), value_mean = expected
    assert summary["confidence_mean"] == round(mean, 5) and summary["predicted_value_mean"] == round(value_mean, 4)
    assert (summary["confidence_p10"], summary["confidence_p50"], summary["confidence_p90"]) == (
        round(p10, 5), round(p50, 5), round(p90, 5))
    edges = summary["confidence_edges"].value
    with_last = np.append(confidences, 0.5)
    expected_histogram = np.bincount(np.searchsorted(edges, with_last, side="right"), minlength=len(edges) + 1)
    assert summary["confidence_histogram"].value == expected_histogram.tolist()


def test_segment_drift_by_psi_over_segment_sizes(instance):
    settings = MonitoringSettings()
    positions: dict[str, int] = {}
    emit(instance, "customer_segments", {"segment_sizes": dg.MetadataValue.json({"0": 500, "1": 300, "2": 200})})
    emit(instance, "customer_segments", {"segment_sizes": dg.MetadataValue.json({"0": 510, "1": 290, "2": 200})})
    assert new_alerts(instance, settings, positions) == []
    emit(instance, "customer_segments", {"segment_sizes": dg.MetadataValue.json({"0": 100, "1": 300, "3": 600})})
    (alert,) = new_alerts(instance, settings, positions)
    assert alert.rule == "segment_drift" and alert.details["psi"] > 0.2


def test_rejection_rate_and_absent_or_malformed_keys_never_crash(instance):
    settings = MonitoringSettings()
    emit(instance, "validated_recommendations", {"rejection_rate": 0.1})
    emit(instance, "validated_recommendations", {"rejection_rate": 0.35})
    emit(instance, "recommendations", {"confidence_histogram": "not json", "confidence_mean": "n/a"})
    emit(instance, "recommendations", {"confidence_histogram": dg.MetadataValue.json(["a", "b"])})
    emit(instance, "customer_segments", {"note": "no sizes this time"})
    alerts = new_alerts(instance, settings, {})
    assert [(a.rule, a.asset) for a in alerts] == [("rejection_rate", "validated_recommendations")]


def test_a_range_run_is_judged_once(instance):
    @dg.asset(name="validated_recommendations", partitions_def=daily_partitions,
              backfill_policy=dg.BackfillPolicy.single_run())
    def ranged() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"rejection_rate": 0.5})

    dg.materialize(
        [ranged], instance=instance,
        tags={"dagster/asset_partition_range_start": "2024-03-01", "dagster/asset_partition_range_end": "2024-03-03"},
    )
    (alert,) = new_alerts(instance, MonitoringSettings(), {})
    assert alert.partition == "2024-03-01...2024-03-03"


def test_a_backlog_larger_than_a_tick_is_judged_over_several_ticks_once(instance):
    settings = MonitoringSettings(events_per_tick=2)
    for rate in (0.3, 0.4, 0.5):
        emit(instance, "validated_recommendations", {"rejection_rate": rate})
    emit(instance, "recommendations", {"dlq_count": 500}, partition="2024-03-01")
    positions: dict[str, int] = {}
    found = [new_alerts(instance, settings, positions) for _ in range(3)]
    assert [len(tick) for tick in found] == [2, 2, 0]  # two materializations judged a tick
    assert sorted(a.rule for tick in found for a in tick) == ["dlq_growth"] + ["rejection_rate"] * 3
