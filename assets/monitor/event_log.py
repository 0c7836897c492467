"""Reading the Dagster event log: the sensors' only source of truth (never the DuckDB file).

Cursors are event-log storage ids. The cross-run queries used here go through the storage's
index (the `index` shard of the default SQLite storage, the one table of PostgreSQL), so the
same code works on `dagster dev` and on a production instance.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dagster as dg

PARTITION_TAG = "dagster/partition"
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


def plain_value(value: Any) -> Any:
    """A metadata value as plain JSON-able Python (markdown stays text, other objects become text)."""
    if isinstance(value, dg.MetadataValue):
        value = value.value
    if isinstance(value, dg.AssetKey):
        return value.to_user_string()
    if isinstance(value, (str, int, float, bool, list, dict)) or value is None:
        return value
    return str(value)


def plain_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    return {key: plain_value(value) for key, value in metadata.items()}


def parse_json_value(value: Any) -> Any:
    """JSON metadata may arrive as a JSON value or as its text."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


def as_number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# ---- asset check evaluations -------------------------------------------------------------


def check_evaluations_after(
    instance: dg.DagsterInstance, after_storage_id: int, limit: int
) -> list[tuple[int, dg.EventLogEntry]]:
    """Asset check evaluation events with a storage id above the cursor, oldest first."""
    logs = instance.event_log_storage.get_logs_for_all_runs_by_log_id(
        after_cursor=after_storage_id,
        dagster_event_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION,
        limit=limit,
    )
    return sorted(logs.items())


def run_partition(instance: dg.DagsterInstance, run_id: str) -> str | None:
    """The partition (or `start...end` range) a run was launched for, from its tags."""
    run = instance.get_run_by_id(run_id)
    if run is None:
        return None
    tags = run.tags
    if PARTITION_TAG in tags:
        return tags[PARTITION_TAG]
    if RANGE_START_TAG in tags:
        return f"{tags[RANGE_START_TAG]}...{tags.get(RANGE_END_TAG, tags[RANGE_START_TAG])}"
    return None


# ---- materializations --------------------------------------------------------------------


def is_skipped(record: dg.EventLogRecord) -> bool:
    """Builds that found their inputs unchanged say so with metadata `skipped` = True."""
    return plain_value(record.asset_materialization.metadata.get("skipped")) is True


@dataclass(frozen=True)
class Materialization:
    """What the metric rules need of one materialization event."""

    storage_id: int
    asset: str
    partition: str | None
    run_id: str
    metadata: dict[str, Any]

    @property
    def skipped(self) -> bool:
        return self.metadata.get("skipped") is True

    @property
    def measured(self) -> bool:
        """A build that measured its data: not a skip (which re-reports an earlier state) nor a
        closed day (metadata `closed_day`: no file and no records, by design)."""
        return not self.skipped and "closed_day" not in self.metadata

    def number(self, key: str) -> float | None:
        return as_number(self.metadata.get(key))

    def json(self, key: str) -> Any:
        return parse_json_value(self.metadata.get(key))


def _materialization(asset: str, record: dg.EventLogRecord) -> Materialization:
    return Materialization(
        storage_id=record.storage_id,
        asset=asset,
        partition=record.partition_key,
        run_id=record.run_id,
        metadata=plain_metadata(dict(record.asset_materialization.metadata)),
    )


def materializations_after(
    instance: dg.DagsterInstance, asset: str, after_storage_id: int, limit: int
) -> list[Materialization]:
    """New materializations of one asset, oldest first."""
    result = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), after_storage_id=after_storage_id),
        limit=limit,
        ascending=True,
    )
    return [_materialization(asset, record) for record in result.records]


# How far back a baseline is looked for: bounds a tick's work when older runs lack the key.
MAX_EARLIER_RUNS = 100


def earlier_materializations(
    instance: dg.DagsterInstance, current: Materialization, page: int = 50
) -> Iterator[Materialization]:
    """Measured materializations before `current`, newest first, one per run, other runs only.

    A run over a partition range writes one identical materialization per partition; counting
    each would let a single run outvote the history, or make it its own "previous" value.
    """
    seen_runs = {current.run_id}
    before = current.storage_id
    while True:
        result = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(current.asset), before_storage_id=before), limit=page
        )
        for record in result.records:
            if record.run_id not in seen_runs:
                if len(seen_runs) > MAX_EARLIER_RUNS:
                    return
                seen_runs.add(record.run_id)
                earlier = _materialization(current.asset, record)
                if earlier.measured:
                    yield earlier
        if not result.has_more or not result.records:
            return
        before = result.records[-1].storage_id


def trailing_points(instance: dg.DagsterInstance, current: Materialization, key: str,
                    count: int) -> list[tuple[str | None, float]]:
    """(partition, `key`) of up to `count` earlier runs that reported it, newest first."""
    points = []
    for earlier in earlier_materializations(instance, current):
        if len(points) >= count:
            break
        value = earlier.number(key)
        if value is not None:
            points.append((earlier.partition, value))
    return points


def previous_json(instance: dg.DagsterInstance, current: Materialization, key: str) -> Any:
    """The JSON value of `key` on the latest earlier run that reported it."""
    for earlier in earlier_materializations(instance, current):
        value = earlier.json(key)
        if value is not None:
            return value
    return None


def trailing_values(instance: dg.DagsterInstance, current: Materialization, key: str, count: int) -> list[float]:
    """`key` on up to `count` earlier runs that reported it, newest first."""
    return [value for _, value in trailing_points(instance, current, key, count)]
