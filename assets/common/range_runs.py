"""Runs over a range of partitions (single-run backfills): one check evaluation per partition.

An asset with `BackfillPolicy.single_run()` runs once for a whole range of days. Its per-day
metadata goes on each day's materialization with `context.add_asset_metadata(..., partition_key=)`
(Dagster's multi-partition pattern), and its checks, which are partitioned, must be reported per
day too: `AssetCheckResult` knows only a run's single partition key, so a range run reports each
day's result as an `AssetCheckEvaluation` with `partition=day`, aimed at that day's latest
materialization (what Dagster does for a one-partition run), then closes the check outputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import dagster as dg
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)


def latest_materialization(instance: dg.DagsterInstance, asset_key: dg.AssetKey,
                           partition: str) -> AssetCheckEvaluationTargetMaterializationData | None:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition]), limit=1).records
    if not records:
        return None
    record = records[0]
    return AssetCheckEvaluationTargetMaterializationData(
        run_id=record.event_log_entry.run_id, storage_id=record.storage_id, timestamp=record.timestamp)


def partition_check_evaluation(instance: dg.DagsterInstance, result: dg.AssetCheckResult, asset_key: str,
                               check_name: str, partition: str, blocking: bool) -> dg.AssetCheckEvaluation:
    """A check result of one partition of a range run, as the event Dagster records for it."""
    key = dg.AssetKey(asset_key)
    return dg.AssetCheckEvaluation(
        asset_key=key, check_name=check_name, passed=result.passed, metadata=result.metadata,
        severity=result.severity, description=result.description, blocking=blocking, partition=partition,
        target_materialization_data=latest_materialization(instance, key, partition))


def asset_check_outputs(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> Iterator[dg.Output]:
    """The (empty) outputs of the step's selected checks (an asset's own, or a multi-check's), once
    their evaluations were reported per day."""
    definition = context.op_execution_context.assets_def
    for key in context.selected_asset_check_keys:
        yield dg.Output(None, output_name=definition.get_output_name_for_asset_check_key(key))


def range_days(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> list[str]:
    """The days of a run over a range of partitions; none for a one-day run."""
    return [] if context.has_partition_key else list(context.partition_keys)


def verdicts_on_every_day(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext, asset_key: str,
                          results: list[dg.AssetCheckResult], blocking: Mapping[str, bool],
                          days: list[str]) -> Iterator[Any]:
    """The checks of one build that covers every day of a range (a current-state build, as of the
    range's last day), reported for each day: they kept "planned" for ever otherwise, so a failed
    one showed on no day. Then the check outputs are closed."""
    for day in days:
        for result in results:
            yield partition_check_evaluation(context.instance, result, asset_key, result.check_name, day,
                                             blocking[result.check_name])
    yield from asset_check_outputs(context)


def check_per_day(context: dg.AssetCheckExecutionContext, result: dg.AssetCheckResult, asset_key: str,
                  check_name: str) -> Iterator[Any]:
    """A (non-blocking) check of a current-state build: in a range run, its verdict on every day
    of the range; in a one-day run, the result itself."""
    days = range_days(context)
    if len(days) <= 1:
        yield result
        return
    yield from verdicts_on_every_day(context, asset_key, [result._replace(check_name=check_name)],
                                     {check_name: False}, days)
