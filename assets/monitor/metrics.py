"""Metric anomalies read from materialization metadata: volumes, errors, DLQ, latency, confidence, drift.

Each new materialization of a watched asset is judged once (per-asset storage-id cursor) by the
rules that watch that asset. A rule whose metadata key is absent does not apply: no alert, no
error. Skipped materializations (metadata `skipped` = True) re-report old state, and closed days
(metadata `closed_day`) have no data by design: both are ignored, as the subject and in the
history a baseline is taken from.
"""

from __future__ import annotations

import datetime as dt
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from resources.alerts import Alerts
from assets.monitor.alert import WARN, Alert
from assets.monitor.delivery import run_alert_sensor
from assets.monitor.drift import psi, psi_of_categories
from assets.monitor.event_log import (
    Materialization,
    materializations_after,
    previous_json,
    run_partition,
    trailing_points,
    trailing_values,
)
from assets.monitor.settings import EVERY_ASSET, MonitoringSettings

ROW_COUNT = "dagster/row_count"


@dataclass(frozen=True)
class Finding:
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    severity: str = WARN


Rule = Callable[[dg.DagsterInstance, Materialization, MonitoringSettings], "Finding | None"]


def row_count_anomaly(instance: dg.DagsterInstance, m: Materialization, s: MonitoringSettings) -> Finding | None:
    """Off by more than `row_count_max_change` of the trailing median (the seed's 30 % band), and,
    when the same weekday has history enough, also off its robust z-score: a shop that sells
    less on Sundays has small Sundays, and that is no anomaly."""
    count = m.number(ROW_COUNT)
    if count is None:
        return None
    history = trailing_points(instance, m, ROW_COUNT, s.history_size * 4)
    recent = [value for _, value in history[: s.history_size]]
    if len(recent) < s.row_count_min_history:
        return None
    baseline = statistics.median(recent)
    if baseline <= 0:
        return None  # no volume to compare against
    change = count / baseline - 1
    if abs(change) <= s.row_count_max_change:
        return None
    details = {"row_count": count, "median": baseline, "change": round(change, 4), "history": recent,
               "max_change": s.row_count_max_change}
    weekday = _weekday(m.partition)
    same_day = [value for partition, value in history if weekday is not None and _weekday(partition) == weekday]
    if len(same_day) >= s.row_count_weekday_history:
        z = robust_z(count, same_day)
        details.update(weekday_history=same_day, robust_z=round(z, 2), max_z=s.row_count_max_z)
        if abs(z) <= s.row_count_max_z:
            return None  # usual for this weekday
    return Finding(f"row count {count:,.0f} is {change:+.0%} off the median {baseline:,.0f} of the last "
                   f"{len(recent)} runs" + (f" (robust z {details['robust_z']} on its weekday)" if "robust_z" in details else ""),
                   details)


def robust_z(value: float, sample: list[float]) -> float:
    """(value - median) / (1.4826 x MAD): a z-score that a few outliers in the history do not move."""
    median = statistics.median(sample)
    mad = statistics.median(abs(x - median) for x in sample) * 1.4826
    return (value - median) / mad if mad > 0 else (0.0 if value == median else float("inf") * (value - median))


def _weekday(partition: str | None) -> int | None:
    try:
        return dt.date.fromisoformat((partition or "")[:10]).weekday()
    except ValueError:
        return None


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
    # A handful of requests has no tail: a cold model's first answer is not a latency problem.
    if (m.number("requests") or 0) < s.latency_min_requests:
        return None
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


def _drift(label: str, key: str, compare: Callable[[Any, Any], float | None], expected_type: type,
           bins_key: str | None = None) -> Rule:
    """PSI of a distribution against the previous materialization's; with `bins_key`, only when
    both were counted over the same bins (other bins: no verdict)."""
    def rule(instance: dg.DagsterInstance, m: Materialization, s: MonitoringSettings) -> Finding | None:
        current = m.json(key)
        if not isinstance(current, expected_type):
            return None
        previous = previous_json(instance, m, key)
        if not isinstance(previous, expected_type):
            return None
        if bins_key and m.json(bins_key) != previous_json(instance, m, bins_key):
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
    "dlq_growth": dlq_growth,
    "model_latency": model_latency,
    "confidence_drop": confidence_drop,
    "confidence_drift": _drift("confidence distribution", "confidence_histogram", psi, list, "confidence_edges"),
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
    """One incident per rule and asset: it opens on a finding and closes on the next
    materialization the rule finds nothing in (a run over a range, or a problem that lasts for
    days, is one incident, not thirty)."""
    alerts = []
    partition = run_partition(instance, m.run_id) or m.partition
    for name in rules_for(m.asset, settings):
        finding = RULES[name](instance, m, settings)
        where = f"{m.asset}" + (f" [{partition}]" if partition else "")
        alerts.append(Alert.create(
            dedup_key=f"{name}:{m.asset}",
            rule=name,
            severity=finding.severity if finding else WARN,
            resolves=finding is None,
            message=f"{where}: {finding.message}" if finding else f"{where}: {name} back within its bounds",
            asset=m.asset,
            partition=partition,
            details={**(finding.details if finding else {}), "run_id": m.run_id, "storage_id": m.storage_id},
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
            if not m.measured or m.run_id in judged_runs:
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
