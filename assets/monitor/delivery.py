"""Getting alerts out from a sensor: once each, and never stuck behind the DuckDB lock.

A sensor tick must stay short, but a pipeline step may hold the warehouse lock for minutes. So
delivery is split in two through the `Alerts` resource: `notify` (log line and webhook) happens
at once, and `record` (the `ops.alerts` row) waits at most `alert_row_lock_timeout_seconds`. An
alert whose row could not be written stays in the sensor's cursor (the outbox) and its row is
retried on the next ticks; it is never notified twice. Choice: the cursor rather than a spool
file, because Dagster already stores and versions cursors per sensor, and one tick's cursor is
written atomically with its outcome.

The cursor also remembers the dedup keys already raised (hashed, bounded), so a problem found
again on a later tick (a partition still late) is not raised again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import dagster as dg

from resources.alerts import AlertRecord, Alerts
from resources.warehouse import WarehouseLockTimeout
from assets.monitor.alert import Alert
from assets.monitor.settings import MonitoringSettings

MAX_REMEMBERED_KEYS = 2_000  # far more than one look-back window of late partitions
MAX_UNSENT = 1_000  # alerts waiting to be notified; beyond this the sensor stops reading new events
MAX_UNWRITTEN_ROWS = 1_000  # beyond this the oldest rows are dropped: they already reached the log and webhook


def key_digest(dedup_key: str) -> str:
    """Cursors are stored every tick: keep them small."""
    return hashlib.sha256(dedup_key.encode()).hexdigest()[:16]


@dataclass
class AlertSensorState:
    """What a sensor's cursor holds between ticks."""

    position: Any = None  # where the event log was read up to (a storage id, or one per asset)
    raised: list[str] = field(default_factory=list)  # digests of dedup keys already raised, oldest first
    outbox: list[dict[str, Any]] = field(default_factory=list)  # {"alert": ...} to notify, {"row": ...} to record

    @classmethod
    def from_cursor(cls, cursor: str | None) -> AlertSensorState:
        return cls(**json.loads(cursor)) if cursor else cls()

    def read_from(self, start: Any) -> Any:
        """The position to read from: `start` on the first tick (the whole event log is read)."""
        return start if self.position is None else self.position

    def to_cursor(self) -> str:
        return json.dumps({"position": self.position, "raised": self.raised, "outbox": self.outbox})

    def unsent(self) -> int:
        return sum("alert" in item for item in self.outbox)

    def queue_new(self, alerts: list[Alert]) -> int:
        """Queue the alerts whose problem was not raised before; returns how many."""
        known = set(self.raised)
        queued = 0
        for alert in alerts:
            digest = key_digest(alert.dedup_key)
            if digest not in known:
                known.add(digest)
                self.raised.append(digest)
                self.outbox.append({"alert": alert.to_json()})
                queued += 1
        del self.raised[:-MAX_REMEMBERED_KEYS]
        return queued


def notify(alerts: Alerts, alert: Alert, log) -> AlertRecord:
    location = f"{alert.asset}" + (f" [{alert.partition}]" if alert.partition else "") if alert.asset else ""
    return alerts.notify(
        severity=alert.severity,
        source=f"sensor:{alert.rule}",
        title=f"{alert.rule} {location}".strip(),
        message=alert.message,
        details={"dedup_key": alert.dedup_key, "asset": alert.asset, "partition": alert.partition, **alert.details},
        log=log,
    )


def row_to_json(row: AlertRecord) -> dict[str, Any]:
    return {**row.__dict__, "raised_at": row.raised_at.isoformat()}


def row_from_json(data: dict[str, Any]) -> AlertRecord:
    return AlertRecord(**{**data, "raised_at": dt.datetime.fromisoformat(data["raised_at"])})


def work_outbox(alerts: Alerts, state: AlertSensorState, settings: MonitoringSettings, log) -> tuple[int, int]:
    """Notify queued alerts and write pending rows, oldest first, within the tick's time budget.

    Returns (notified, recorded). Once the lock is found busy, no more rows are tried this tick
    (each try would wait the timeout again), but new alerts are still notified.
    """
    deadline = time.monotonic() + settings.tick_budget_seconds
    notified = recorded = 0
    lock_busy = False
    remaining = []
    for item in state.outbox:
        if time.monotonic() > deadline:
            remaining.append(item)
            continue
        if "alert" in item:
            item = {"row": row_to_json(notify(alerts, Alert.from_json(item["alert"]), log))}
            notified += 1
        if not lock_busy:
            try:
                alerts.record(row_from_json(item["row"]), lock_timeout_seconds=settings.alert_row_lock_timeout_seconds)
                recorded += 1
                continue
            except WarehouseLockTimeout:
                lock_busy = True
                log.warning("warehouse busy: alert rows stay in the sensor cursor and are written on a later tick")
        remaining.append(item)
    state.outbox = _bounded(remaining, log)
    return notified, recorded


def _bounded(outbox: list[dict[str, Any]], log) -> list[dict[str, Any]]:
    """Drop the oldest unwritten rows beyond the bound; alerts not yet notified are never dropped."""
    excess = sum("row" in item for item in outbox) - MAX_UNWRITTEN_ROWS
    if excess <= 0:
        return outbox
    log.warning(f"dropping {excess} alert rows never written to ops.alerts (they were logged and sent)")
    kept = []
    for item in outbox:
        if "row" in item and excess > 0:
            excess -= 1
            continue
        kept.append(item)
    return kept


# A sensor's reading step: from its last position, the problems found and the position reached.
Finder = Callable[[Any], tuple[list[Alert], Any]]


def run_alert_sensor(
    context: dg.SensorEvaluationContext, alerts: Alerts, settings: MonitoringSettings, find: Finder, start: Any
) -> dg.SensorResult:
    """One tick: read what is new since the cursor, raise the new problems, finish earlier deliveries.

    While too many alerts wait to be notified (a webhook so slow that ticks run out of time), new
    events are left in the event log, where they wait safely, instead of growing the cursor.
    """
    state = AlertSensorState.from_cursor(context.cursor)
    if state.unsent() < MAX_UNSENT:
        found, state.position = find(state.read_from(start))
        state.queue_new(found)
    notified, recorded = work_outbox(alerts, state, settings, context.log)
    summary = f"{notified} alert(s) raised, {recorded} row(s) recorded, {len(state.outbox)} waiting"
    # Alert sensors request no runs: the skip reason is the tick's summary in the UI.
    return dg.SensorResult(cursor=state.to_cursor(), skip_reason=summary)
