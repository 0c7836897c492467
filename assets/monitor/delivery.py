"""Getting alerts out from a sensor: once each, and never stuck behind the DuckDB lock.

A sensor tick must stay short, but a pipeline step may hold the warehouse lock for minutes. So
delivery is split in two through the `Alerts` resource: `notify` (log line and webhook) happens
at once, and `record` (the `ops.alerts` row) waits at most `alert_row_lock_timeout_seconds`. An
alert whose row could not be written stays in the sensor's cursor (the outbox) and its row is
retried on the next ticks; it is never notified twice. Choice: the cursor rather than a spool
file, because Dagster already stores and versions cursors per sensor, and one tick's cursor is
written atomically with its outcome.

The cursor also keeps the open incidents (their dedup keys, hashed, bounded): a problem found
again while its incident is open (a partition still late, the same check failing on the next
run) is not raised again; a resolving alert of an open incident sends one notice and closes it,
so the same problem can be raised again later. Every alert sent is also an observation of the
`incidents` asset, so it shows in the UI (its event history, and the sensor's tick).
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

MAX_OPEN_INCIDENTS = 2_000  # far more than one look-back window of late partitions
INCIDENTS_ASSET = "incidents"
MAX_UNSENT = 1_000  # alerts waiting to be notified; beyond this the sensor stops reading new events
MAX_UNWRITTEN_ROWS = 1_000  # beyond this the oldest rows are dropped: they already reached the log and webhook


def key_digest(dedup_key: str) -> str:
    """Cursors are stored every tick: keep them small."""
    return hashlib.sha256(dedup_key.encode()).hexdigest()[:16]


@dataclass
class AlertSensorState:
    """What a sensor's cursor holds between ticks."""

    position: Any = None  # where the event log was read up to (a storage id, or one per asset)
    open: dict[str, str] = field(default_factory=dict)  # digest of an open incident's key -> its title, oldest first
    outbox: list[dict[str, Any]] = field(default_factory=list)  # {"alert": ...} to notify, {"row": ...} to record

    @classmethod
    def from_cursor(cls, cursor: str | None) -> AlertSensorState:
        data = json.loads(cursor) if cursor else {}
        data.pop("raised", None)  # cursors written before incidents: those problems may be raised once more
        return cls(**data)

    def read_from(self, start: Any) -> Any:
        """The position to read from: `start` on the first tick (the whole event log is read)."""
        return start if self.position is None else self.position

    def to_cursor(self) -> str:
        return json.dumps({"position": self.position, "open": self.open, "outbox": self.outbox})

    def unsent(self) -> int:
        return sum("alert" in item for item in self.outbox)

    def queue_new(self, alerts: list[Alert]) -> int:
        """Queue the alerts that open an incident, and the notices that close an open one;
        returns how many."""
        queued = 0
        for alert in alerts:
            digest = key_digest(alert.dedup_key)
            if alert.resolves == (digest in self.open):
                if alert.resolves:
                    del self.open[digest]
                else:
                    self.open[digest] = alert.message[:120]
                self.outbox.append({"alert": alert.to_json()})
                queued += 1
        for digest in list(self.open)[:-MAX_OPEN_INCIDENTS]:
            del self.open[digest]
        return queued


def notify(alerts: Alerts, alert: Alert, log) -> AlertRecord:
    location = f"{alert.asset}" + (f" [{alert.partition}]" if alert.partition else "") if alert.asset else ""
    return alerts.notify(
        severity="INFO" if alert.resolves else alert.severity,
        source=f"sensor:{alert.rule}",
        title=("resolved: " if alert.resolves else "") + f"{alert.rule} {location}".strip(),
        message=alert.message,
        details={"dedup_key": alert.dedup_key, "asset": alert.asset, "partition": alert.partition,
                 "incident": "resolved" if alert.resolves else "open", **alert.details},
        log=log,
    )


def observation(row: AlertRecord) -> dg.AssetObservation:
    """The alert as an event of the `incidents` asset: where a user of the UI looks."""
    details = row.details
    return dg.AssetObservation(
        asset_key=INCIDENTS_ASSET,
        description=f"{row.severity}: {row.title}",
        metadata={
            "severity": row.severity,
            "incident": str(details.get("incident", "open")),
            "title": row.title,
            "message": row.message,
            "asset": str(details.get("asset") or ""),
            "partition": str(details.get("partition") or ""),
            "source": row.source,
            "alert_id": row.alert_id,
            **({"run_id": str(details["run_id"])} if details.get("run_id") else {}),
        },
    )


def row_to_json(row: AlertRecord) -> dict[str, Any]:
    return {**row.__dict__, "raised_at": row.raised_at.isoformat()}


def row_from_json(data: dict[str, Any]) -> AlertRecord:
    return AlertRecord(**{**data, "raised_at": dt.datetime.fromisoformat(data["raised_at"])})


def work_outbox(alerts: Alerts, state: AlertSensorState, settings: MonitoringSettings,
                log) -> tuple[list[AlertRecord], int]:
    """Notify queued alerts and write pending rows, oldest first, within the tick's time budget.

    Returns (the alerts notified, rows recorded). Once the lock is found busy, no more rows are
    tried this tick (each try would wait the timeout again), but new alerts are still notified.
    """
    deadline = time.monotonic() + settings.tick_budget_seconds
    notified: list[AlertRecord] = []
    recorded = 0
    lock_busy = False
    remaining = []
    for item in state.outbox:
        if time.monotonic() > deadline:
            remaining.append(item)
            continue
        if "alert" in item:
            row = notify(alerts, Alert.from_json(item["alert"]), log)
            notified.append(row)
            item = {"row": row_to_json(row)}
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
    summary = (f"{len(notified)} alert(s) sent, {recorded} row(s) recorded, {len(state.outbox)} waiting, "
               f"{len(state.open)} incident(s) open")
    if notified:  # the tick shows its events; the incidents asset keeps them
        return dg.SensorResult(cursor=state.to_cursor(), asset_events=[observation(row) for row in notified])
    return dg.SensorResult(cursor=state.to_cursor(), skip_reason=summary)
