"""Partition-aware freshness: every day's partition of the ingestion assets must land in time.

Dagster's freshness policies look at the latest materialization only, so a backfill of old days
looks fresh while yesterday is missing. Here each day is judged alone: once a day has ended and
`freshness_lag_hours` more have passed, a partition with no materialization is late, and alerted
once per (asset, partition). Only the last `freshness_lookback_days` days are watched, only the
configured sources (`PIPELINE_SOURCES`), and only the days a batch is expected (weekdays and
holidays in `MonitoringSettings`); days beyond the partitions' last day do not exist, so
historical data raises nothing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import dagster as dg

from assets.common.partitions import daily_partitions
from resources.alerts import Alerts
from assets.monitor.alert import ERROR, Alert
from assets.monitor.delivery import run_alert_sensor
from assets.monitor.settings import MonitoringSettings

RULE = "partition_late"

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def due_partitions(
    partitions_def: dg.TimeWindowPartitionsDefinition, now: dt.datetime, lag: dt.timedelta, lookback: dt.timedelta
) -> dict[str, dt.datetime]:
    """Partition keys whose deadline (window end + lag) has passed within the look-back, with that deadline."""
    # One day wider than needed: the query returns only whole windows, the deadline test decides.
    window = dg.TimeWindow(now - lag - lookback - dt.timedelta(days=1), now - lag)
    due = {}
    for key in partitions_def.get_partition_keys_in_time_window(window):
        deadline = partitions_def.time_window_for_partition_key(key).end + lag
        if now - lookback <= deadline <= now:
            due[key] = deadline
    return due


def expected_day(partition_key: str, settings: MonitoringSettings) -> bool:
    """A batch is expected on the configured weekdays, except holidays."""
    day = dt.date.fromisoformat(partition_key)
    return day.weekday() in settings.expected_weekdays and partition_key not in settings.holidays


def late_partition_alerts(
    instance: dg.DagsterInstance,
    settings: MonitoringSettings,
    now: dt.datetime,
    partitions_def: dg.TimeWindowPartitionsDefinition = daily_partitions,
) -> list[Alert]:
    lag = dt.timedelta(hours=settings.freshness_lag_hours)
    due = {key: deadline for key, deadline in
           due_partitions(partitions_def, now, lag, dt.timedelta(days=settings.freshness_lookback_days)).items()
           if expected_day(key, settings)}
    alerts = []
    for asset in settings.freshness_assets:
        landed = instance.get_materialized_partitions(dg.AssetKey(asset))
        for partition, deadline in sorted(due.items()):
            alerts.append(late_partition_alert(asset, partition, deadline, now, landed=partition in landed))
    return alerts


def late_partition_alert(asset: str, partition: str, deadline: dt.datetime, now: dt.datetime,
                         landed: bool = False) -> Alert:
    """Late: opens the incident (asset, partition); landed: the notice that closes it, if open."""
    hours_late = (now - deadline).total_seconds() / 3600
    return Alert.create(
        dedup_key=f"{RULE}:{asset}:{partition}",
        rule=RULE,
        severity=ERROR,
        resolves=landed,
        message=f"{asset} partition {partition} has landed" if landed else
        f"{asset} partition {partition} not materialized; due {deadline.isoformat()} ({hours_late:.1f} h late)",
        asset=asset,
        partition=partition,
        details={"deadline": deadline.isoformat(), "checked_at": now.isoformat(), "hours_late": round(hours_late, 2)},
    )


def build_partition_freshness_sensor(clock: Clock = utc_now, name: str = "partition_freshness_alerts") -> dg.SensorDefinition:
    """The sensor, with the clock injectable so tests can pin "now"."""

    @dg.sensor(
        name=name,
        description="Alerts once per (asset, day) when a daily partition is not materialized in time.",
        minimum_interval_seconds=300,
        default_status=dg.DefaultSensorStatus.STOPPED,
    )
    def partition_freshness(
        context: dg.SensorEvaluationContext, monitoring: MonitoringSettings, alerts: Alerts
    ) -> dg.SensorResult:
        # No position: every tick looks at the whole look-back window; the dedup keys remember.
        def find(_: None) -> tuple[list[Alert], None]:
            return late_partition_alerts(context.instance, monitoring, clock()), None

        return run_alert_sensor(context, alerts, monitoring, find, start=None)

    return partition_freshness


partition_freshness_alerts = build_partition_freshness_sensor()
