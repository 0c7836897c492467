"""Failed runs: which step failed and why (exception class and message, never the stack).

The equivalent of `dg.run_failure_sensor`, written as a plain sensor over the RUN_FAILURE events
of the event log so it shares the storage-id cursor and the delivery outbox of the other sensors
(a run-status sensor's cursor is Dagster's own and cannot hold alerts awaiting the table). It sees
the failed runs of every code location on the instance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dataclasses import replace

import dagster as dg

from resources.alerts import Alerts
from assets.monitor.alert import ERROR, Alert
from assets.monitor.delivery import run_alert_sensor
from assets.monitor.event_log import run_partition
from assets.monitor.settings import MonitoringSettings

if TYPE_CHECKING:
    from dagster._utils.error import SerializableErrorInfo

RULE = "run_failed"
BLOCKING_CHECK_ERROR = "DagsterAssetCheckFailedError"  # what a step raises after its blocking check failed
MAX_CAUSES = 3  # the wrapper Dagster adds, the user's exception, and what that one was raised from


def error_summary(error: SerializableErrorInfo | None) -> str | None:
    """"Class: message" along the cause chain; stacks stay in the run's logs."""
    parts = []
    while error is not None and len(parts) < MAX_CAUSES:
        message = error.message.strip()
        # Messages often already start with their class, qualified or not ("pkg.mod.Failure: ...").
        named = not error.cls_name or f"{error.cls_name}:" in message.split(" ", 1)[0]
        parts.append(message if named else f"{error.cls_name}: {message}")
        error = error.cause or error.context
    return " <- caused by ".join(parts) if parts else None


def step_failures(instance: dg.DagsterInstance, run_id: str) -> list[dg.DagsterEvent]:
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records
    return [record.event_log_entry.dagster_event for record in records]


def run_failure_alert(
    instance: dg.DagsterInstance, run: dg.DagsterRun, run_failure: dg.DagsterEvent, failed_steps: list[dg.DagsterEvent]
) -> Alert:
    steps = [
        {"step": event.step_key, "error": error_summary(getattr(event.event_specific_data, "error", None))}
        for event in failed_steps
    ]
    run_error = error_summary(getattr(run_failure.event_specific_data, "error", None))
    partition = run_partition(instance, run.run_id)
    where = ", ".join(s["step"] for s in steps if s["step"]) or "no step (run-level failure)"
    first_error = next((s["error"] for s in steps if s["error"]), run_error) or run_failure.message
    return Alert.create(
        dedup_key=run_incident(run.job_name, partition),
        rule=RULE,
        severity=ERROR,
        message=f"run {run.run_id[:8]} of {run.job_name} failed" + (f" [{partition}]" if partition else "")
        + f" at {where}: {first_error}",
        partition=partition,
        details={
            "run_id": run.run_id,
            "job": run.job_name,
            "failed_steps": steps,
            "run_error": run_error,
            "assets": sorted(key.to_user_string() for key in (run.asset_selection or [])),
        },
    )


def stopped_by_blocking_checks(failed_steps: list[dg.DagsterEvent]) -> bool:
    """Every failed step failed because a blocking check of its own failed (nothing crashed)."""
    errors = [getattr(event.event_specific_data, "error", None) for event in failed_steps]
    return bool(errors) and all(error is not None and error.cls_name == BLOCKING_CHECK_ERROR for error in errors)


def run_incident(job: str, partition: str | None) -> str:
    """A job's failures on one partition are one incident, until a run of it succeeds."""
    return f"{RULE}:{job}:{partition or '-'}"


def succeeded_run_notices(instance: dg.DagsterInstance, after_storage_id: int, limit: int) -> tuple[list[Alert], int]:
    """The notices that close the incidents of the (job, partition)s whose runs succeeded."""
    records = instance.fetch_run_status_changes(
        dg.RunStatusChangeRecordsFilter(dg.DagsterEventType.RUN_SUCCESS, after_storage_id=after_storage_id),
        limit=limit, ascending=True,
    ).records
    notices, cursor = [], after_storage_id
    for record in records:
        cursor = record.storage_id
        run = instance.get_run_by_id(record.run_id)
        if run is not None:
            partition = run_partition(instance, run.run_id)
            notices.append(Alert.create(
                dedup_key=run_incident(run.job_name, partition), rule=RULE, severity=ERROR, resolves=True,
                message=f"run {run.run_id[:8]} of {run.job_name} succeeded" + (f" [{partition}]" if partition else ""),
                partition=partition, details={"run_id": run.run_id, "job": run.job_name, "storage_id": cursor}))
    return notices, cursor


def failed_run_alerts(instance: dg.DagsterInstance, after_storage_id: int, limit: int) -> tuple[list[Alert], int]:
    """Alerts for the runs that failed after the cursor, and the cursor to resume from."""
    records = instance.fetch_run_status_changes(
        dg.RunStatusChangeRecordsFilter(dg.DagsterEventType.RUN_FAILURE, after_storage_id=after_storage_id),
        limit=limit,
        ascending=True,
    ).records
    alerts, cursor = [], after_storage_id
    for record in records:
        cursor = record.storage_id
        run = instance.get_run_by_id(record.run_id)
        if run is None:  # a deleted run has nothing left to report
            continue
        failed_steps = step_failures(instance, run.run_id)
        if stopped_by_blocking_checks(failed_steps):
            continue  # the failed check is the incident (check_alerts.py); the run only obeyed it
        event = record.event_log_entry.dagster_event
        alert = run_failure_alert(instance, run, event, failed_steps)
        alerts.append(replace(alert, details={**alert.details, "storage_id": record.storage_id}))
    return alerts, cursor


@dg.sensor(
    name="run_failure_alerts",
    description="Alerts on failed runs (failed steps and errors, no stack, no secrets), once per incident "
                "(job, partition); a later successful run resolves it.",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,  # on by default: it reads only the event log
)
def run_failure_alerts(
    context: dg.SensorEvaluationContext, monitoring: MonitoringSettings, alerts: Alerts
) -> dg.SensorResult:
    def find(after: dict[str, int]) -> tuple[list[Alert], dict[str, int]]:
        failed, failed_at = failed_run_alerts(context.instance, after["failed"], monitoring.events_per_tick)
        succeeded, succeeded_at = succeeded_run_notices(context.instance, after["succeeded"], monitoring.events_per_tick)
        # Failures and successes in the order they happened: a success closes only what failed before it.
        ordered = sorted(failed + succeeded, key=lambda a: a.details["storage_id"])
        return ordered, {"failed": failed_at, "succeeded": succeeded_at}

    return run_alert_sensor(context, alerts, monitoring, find, start={"failed": -1, "succeeded": -1})
