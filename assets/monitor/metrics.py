"""Metric anomalies read from materialization metadata: volumes, errors, DLQ, latency, confidence, drift.

Each new materialization of a watched asset is judged once (per-asset storage-id cursor) by the
rules that watch that asset. A rule whose metadata key is absent does not apply: no alert, no
error. Skipped materializations (metadata `skipped` = True) re-report old state and are ignored,
both as the subject and in the history a baseline is taken from.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from resources.alerts import Alerts
from assets.monitor.alert import ERROR, WARN, Alert
from assets.monitor.delivery import run_alert_sensor
from assets.monitor.drift import psi, psi_of_categories
from assets.monitor.event_log import Materialization, materializations_after, previous_json, run_partition, trailing_values
from assets.monitor.settings import EVERY_ASSET, MonitoringSettings

ROW_COUNT = "dagster/row_count"


@dataclass(frozen=True)
class Finding:
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    severity: str = WARN


Rule = Callable[[dg.DagsterInstance, Materialization, MonitoringSettings], "Finding | None"]


def row_count_anomaly(instance: dg.DagsterInstance, m: Materialization, s: MonitoringSettings) -> Finding | None:
    count = m.number(ROW_COUNT)
    if count is None:
        return None
    history = trailing_values(instance, m, ROW_COUNT, s.history_size)
    if len(history) < s.row_count_min_history:
        return None
    baseline = statistics.median(history)
    if baseline <= 0:
        return None  # no volume to compare against
    ratio = count / baseline
    if 1 / s.row_count_factor <= ratio <= s.row_count_factor:
        return None
    return Finding(
        f"row count {count:,.0f} is {ratio:.2f}x the median {baseline:,.0f} of the last {len(history)} runs",
        {"row_count": count, "median": baseline, "ratio": round(ratio, 3), "history": history,
         "factor": s.row_count_factor},
    )


def schema_error_rate(instance: dg.DagsterInstance, m: Materialization, s: MonitoringSettings) -> Finding | None:
    # `error_rate` is the batch's main table; raw_customers adds `customer_purchases.error_rate`.
    rates = {k: m.number(k) for k in m.metadata if k == "error_rate" or k.endswith(".error_rate")}
    over = {k: rate for k, rate in rates.items() if rate is not None and rate > s.max_error_rate}
    if not over:
        return None
    text = ", ".join(f"{k.removesuffix('error_rate').rstrip('.') or 'batch'} {rate:.1%}" for k, rate in over.items())
    return Finding(
        f"schema error rate above {s.max_error_rate:.1%}: {text}",
        {**over, "threshold": s.max_error_rate, "quarantined_by_rule": m.json("quarantined_by_rule")},
        ERROR,
    )


def dlq_growth(instance: dg.DagsterInstance, m: Materialization, s: MonitoringSettings) -> Finding | None:
    count = m.number("dlq_count")
    if count is None:
        return None
    previous = trailing_values(instance, m, "dlq_count", 1)
    grew = s.alert_on_dlq_growth and bool(previous) and count > previous[0]
    if not grew and count <= s.max_dlq_count:
        return None
    reasons = ([f"grew from {previous[0]:,.0f}"] if grew else []) + (
        [f"above {s.max_dlq_count:,}"] if count > s.max_dlq_count else []
    )
    return Finding(
        f"dead-letter count {count:,.0f} " + " and ".join(reasons),
        {"dlq_count": count, "previous": previous[0] if previous else None, "threshold": s.max_dlq_count},
    )


# The model clients' own metrics spell the percentiles `latency_ms_p95`; either spelling is read.
LATENCY_KEYS = {"latency_p95_ms": ("latency_p95_ms", "latency_ms_p95"), "latency_p99_ms": ("latency_p99_ms", "latency_ms_p99")}


def model_latency(instance: dg.DagsterInstance, m: Materialization, s: MonitoringSettings) -> Finding | None:
    limits = {"latency_p95_ms": s.max_latency_p95_ms, "latency_p99_ms": s.max_latency_p99_ms}
    values = {name: next((v for k in LATENCY_KEYS[name] if (v := m.number(k)) is not None), None) for name in limits}
    over = {name: value for name, value in values.items() if value is not None and value > limits[name]}
    if not over:
        return None
    text = ", ".join(f"{name} {value:,.0f} > {limits[name]:,.0f}" for name, value in over.items())
    return Finding(f"model latency over threshold: {text}", {**over, "thresholds": limits})


def confidence_drop(instance: dg.DagsterInstance, m: Materialization, s: MonitoringSettings) -> Finding | None:
    mean = m.number("confidence_mean")
    if mean is None:
        return None
    history = trailing_values(instance, m, "confidence_mean", s.history_size)
    if not history:
        return None
    baseline = statistics.median(history)
    if baseline - mean <= s.max_confidence_mean_drop:
        return None
    quantiles = {k: m.number(k) for k in ("confidence_p10", "confidence_p50", "confidence_p90") if m.number(k) is not None}
    return Finding(
        f"mean confidence fell to {mean:.3f} from a median of {baseline:.3f} (drop > {s.max_confidence_mean_drop})",
        {"confidence_mean": mean, "baseline_median": baseline, "history": history, **quantiles},
    )


def _drift(label: str, key: str, compare: Callable[[Any, Any], float | None], expected_type: type) -> Rule:
    def rule(instance: dg.DagsterInstance, m: Materialization, s: MonitoringSettings) -> Finding | None:
        current = m.json(key)
        if not isinstance(current, expected_type):
            return None
        previous = previous_json(instance, m, key)
        if not isinstance(previous, expected_type):
            return None
        value = _safe(compare, previous, current)
        if value is None or value <= s.max_psi:
            return None
        return Finding(
            f"{label} drifted: PSI {value:.3f} > {s.max_psi} vs the previous run",
            {"psi": round(value, 4), "threshold": s.max_psi, "previous": previous, "current": current},
        )

    return rule


def _safe(compare: Callable[[Any, Any], float | None], previous: Any, current: Any) -> float | None:
    """Malformed metadata (strings in a histogram, nested dicts) means "not applicable", not a crash."""
    try:
        return compare(previous, current)
    except (TypeError, ValueError):
        return None


def rejection_rate(instance: dg.DagsterInstance, m: Materialization, s: MonitoringSettings) -> Finding | None:
    rate = m.number("rejection_rate")
    if rate is None or rate <= s.max_rejection_rate:
        return None
    return Finding(
        f"rejection rate {rate:.1%} above {s.max_rejection_rate:.1%}",
        {"rejection_rate": rate, "threshold": s.max_rejection_rate,
         "rejected_by_rule": m.json("rejected_by_rule")},
    )


RULES: dict[str, Rule] = {
    "row_count_anomaly": row_count_anomaly,
    "schema_error_rate": schema_error_rate,
    "dlq_growth": dlq_growth,
    "model_latency": model_latency,
    "confidence_drop": confidence_drop,
    "confidence_drift": _drift("confidence distribution", "confidence_histogram", psi, list),
    "segment_drift": _drift("segment sizes", "segment_sizes", psi_of_categories, dict),
    "rejection_rate": rejection_rate,
}


def rules_for(asset: str, settings: MonitoringSettings) -> list[str]:
    return [
        name for name, assets in settings.rule_assets.items()
        if name in RULES and (asset in assets or EVERY_ASSET in assets)
    ]


def watched_assets(instance: dg.DagsterInstance, settings: MonitoringSettings) -> list[str]:
    named = {asset for assets in settings.rule_assets.values() for asset in assets}
    if EVERY_ASSET in named:
        named |= {key.to_user_string() for key in instance.get_asset_keys()}
    return sorted(named - {EVERY_ASSET})


def materialization_alerts(instance: dg.DagsterInstance, m: Materialization, settings: MonitoringSettings) -> list[Alert]:
    alerts = []
    for name in rules_for(m.asset, settings):
        finding = RULES[name](instance, m, settings)
        if finding is not None:
            partition = run_partition(instance, m.run_id) or m.partition
            alerts.append(Alert.create(
                # One alert per rule, asset and run: a run over a range materializes every
                # partition with the same metadata, and that is one problem, not thirty.
                dedup_key=f"{name}:{m.asset}:{m.run_id}",
                rule=name,
                severity=finding.severity,
                message=f"{m.asset}" + (f" [{partition}]" if partition else "") + f": {finding.message}",
                asset=m.asset,
                partition=partition,
                details={**finding.details, "run_id": m.run_id, "storage_id": m.storage_id},
            ))
    return alerts


def metric_alerts(
    instance: dg.DagsterInstance, settings: MonitoringSettings, positions: dict[str, int]
) -> tuple[list[Alert], dict[str, int]]:
    """Alerts for the materializations after each asset's cursor, and the advanced cursors.

    At most `events_per_tick` materializations in all (each costs history queries); assets not
    reached keep their cursor for the next tick.
    """
    alerts, positions, budget = [], dict(positions), settings.events_per_tick
    for asset in watched_assets(instance, settings):
        if budget <= 0:
            break
        judged_runs = set()
        for m in materializations_after(instance, asset, positions.get(asset, -1), budget):
            budget -= 1
            positions[asset] = m.storage_id
            if m.skipped or m.run_id in judged_runs:
                continue
            judged_runs.add(m.run_id)
            alerts.extend(materialization_alerts(instance, m, settings))
    return alerts, positions


@dg.sensor(
    name="metric_anomaly_alerts",
    description="Alerts on row-count anomalies, schema error rate, DLQ growth, model latency, "
    "confidence drops, output drift (PSI) and rejection rate, from materialization metadata.",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
)
def metric_anomaly_alerts(
    context: dg.SensorEvaluationContext, monitoring: MonitoringSettings, alerts: Alerts
) -> dg.SensorResult:
    def find(positions: dict[str, int]) -> tuple[list[Alert], dict[str, int]]:
        return metric_alerts(context.instance, monitoring, positions)

    return run_alert_sensor(context, alerts, monitoring, find, start={})
