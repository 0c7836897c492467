"""Failed asset checks, WARN or ERROR, each alerted once.

Open-source Dagster shows a failed non-blocking check in the UI and nothing else; this sensor
turns a failed evaluation into an incident (asset, check, partition), raised once while it stays
open, and a later passing evaluation of the same check into the notice that closes it. The
cursor is the event-log storage id of the last evaluation read, so each evaluation is seen
exactly once whatever the tick rate. An evaluation that only re-reports a skipped build (inputs
unchanged) with the verdict the check gave before changes nothing.
"""

from __future__ import annotations

import dagster as dg

from resources.alerts import Alerts
from assets.monitor.alert import Alert
from assets.monitor.delivery import run_alert_sensor
from assets.monitor.event_log import check_evaluations_after, is_skipped, plain_metadata, run_partition
from assets.monitor.settings import MonitoringSettings

RULE = "asset_check_failed"


def repeats_a_skipped_verdict(instance: dg.DagsterInstance, entry: dg.EventLogEntry,
                              evaluation: dg.AssetCheckEvaluation) -> bool:
    """True when the check re-reports a build that was skipped (metadata `skipped` = True) with the
    verdict the check gave before.

    A skipped build keeps the data of an earlier one, whose failed checks were alerted then; a
    daily run over unchanged inputs must not raise the same failure again every day. A verdict
    that changed on a skip is news, though: a threshold tightened, or a later day's build judged
    in an earlier day's run, failed with no incident, and a red run raised none at all (found by
    an outside-in probe).
    """
    target = evaluation.target_materialization_data
    if target is None:
        return False
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=evaluation.asset_key, storage_ids=[target.storage_id]), limit=1
    ).records
    if not (records and is_skipped(records[0])):
        return False
    return previous_verdict(instance, evaluation.asset_check_key, entry.timestamp) == evaluation.passed


def previous_verdict(instance: dg.DagsterInstance, check: dg.AssetCheckKey, before: float,
                     page: int = 100, pages: int = 20) -> bool | None:
    """Whether the check's latest evaluation before `before` passed; None without one. Newest
    first, a page at a time: a sensor catching up reads evaluations older than many others."""
    cursor = None
    for _ in range(pages):
        records = instance.event_log_storage.get_asset_check_execution_history(check, limit=page, cursor=cursor)
        for record in records:
            if record.event is None or record.event.timestamp >= before:
                continue
            earlier = record.event.dagster_event.event_specific_data if record.event.dagster_event else None
            if isinstance(earlier, dg.AssetCheckEvaluation):
                return earlier.passed
        if len(records) < page:
            return None
        cursor = records[-1].id
    return None


def check_failure_alert(instance: dg.DagsterInstance, storage_id: int, entry: dg.EventLogEntry) -> Alert | None:
    """A failed evaluation opens the incident (asset, check, partition); a passing one closes it."""
    evaluation = entry.dagster_event.event_specific_data
    if repeats_a_skipped_verdict(instance, entry, evaluation):
        return None
    asset = evaluation.asset_key.to_user_string()
    # A check declared without its own partitions reports none; the run's partition says which day.
    partition = evaluation.partition or run_partition(instance, entry.run_id)
    severity = evaluation.severity.value
    where = f"{asset}" + (f" [{partition}]" if partition else "")
    # Checks that report the same cause (a batch's quarantined share: error_rate and the suite
    # checks) share one incident; otherwise each check is its own.
    cause = evaluation.metadata.get("incident_cause")
    cause = cause.value if cause is not None else evaluation.check_name
    return Alert.create(
        dedup_key=f"{RULE}:{asset}:{cause}:{partition or '-'}",
        rule=RULE,
        severity=severity,
        resolves=evaluation.passed,
        message=(f"check {evaluation.check_name!r} passes again on {where}" if evaluation.passed
                 else f"{severity} check {evaluation.check_name!r} failed on {where}"
                 + (f": {evaluation.description}" if evaluation.description else "")),
        asset=asset,
        partition=partition,
        details={
            "check": evaluation.check_name,
            "description": evaluation.description,
            "metadata": plain_metadata(dict(evaluation.metadata)),
            "run_id": entry.run_id,
            "storage_id": storage_id,
        },
    )


def failed_check_alerts(instance: dg.DagsterInstance, after_storage_id: int, limit: int) -> tuple[list[Alert], int]:
    """Alerts for the failed evaluations after the cursor, and the cursor to resume from."""
    alerts, cursor = [], after_storage_id
    for storage_id, entry in check_evaluations_after(instance, after_storage_id, limit):
        alert = check_failure_alert(instance, storage_id, entry)
        if alert is not None:
            alerts.append(alert)
        cursor = storage_id
    return alerts, cursor


@dg.sensor(
    name="asset_check_failure_alerts",
    description="Alerts on failed asset checks (WARN or ERROR), once per incident (asset, check, partition); "
                "a later pass resolves it.",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,  # on by default: it reads only the event log
)
def asset_check_failure_alerts(
    context: dg.SensorEvaluationContext, monitoring: MonitoringSettings, alerts: Alerts
) -> dg.SensorResult:
    def find(after: int) -> tuple[list[Alert], int]:
        return failed_check_alerts(context.instance, after, monitoring.events_per_tick)

    return run_alert_sensor(context, alerts, monitoring, find, start=-1)
