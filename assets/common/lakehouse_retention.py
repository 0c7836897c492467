"""Retention of superseded builds on the lakehouse: its storage stays bounded.

Every build of a stage or an SQL model writes its tables whole, as the partition of its day, so
without a retention the lake grows by the pipeline's tables every day (about 2.5 GB at 2M
customers). A run as of day D reads each asset's latest build up to D. `prune_builds` therefore
keeps, per asset, every build of the last `keep_days` days (counted back from the newest build in
the lake) and the newest build before them (what those days read), and removes the others: first
the state row (no run picks that build any more), then the day of its tables, its dead letters,
model items and Batch API ledger, and the kept files no remaining build names; also a table's
days before the horizon that no build names (a build that died before its state row). Last,
every lake table's history replaced more than `history_grace_minutes` ago (readers may still
scan what was replaced just now) is expired and its files deleted: today's removals leave
storage at the next run. The raw layer (the landed data) is not removed. The model cache
(content-addressed: any day's vectors serve; a build's additions are its (day, stage) share)
loses, as on the warehouse, the vectors no remaining item map names once cached more than
`cache_keep_days` ago (EMBEDDING_CACHE_KEEP_DAYS; 0: for ever): the shares holding them are
rewritten without them. A build running meanwhile that found such a vector still has it in its
own table (a stage's table copies its vectors); only a later build pays for it again.

The served table, `outputs.recommendations` (consumers read "the recommendations of day D"),
keeps its days when their builds go, whichever backend wrote them (`published_recommendations`
on the warehouse backend, `lake_validated_recommendations` on the lakehouse's): its history has
a retention of its own, `keep_served_days` (0: for ever, as the warehouse backend's publication
always kept it), counted back from its newest day; a day a kept build names always stays.

A day before the horizon can still be run again: its SQL models rebuild from the raw layer (their
day markers went with their rows), and the stages then build afresh.
"""

import json
import os
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import dagster as dg
import duckdb
from pydantic import Field

from assets.common.current_state import STATE_TABLE, stage_names
from assets.common.lakehouse_stages import (CACHE_KEY, CACHE_TABLE, FAR_FUTURE, ITEMS_TABLE, SERVED_TABLE,
                                            WRITER_COLUMN, row_tables_of, stages_of)
from resources.lakehouse import PARTITION_COLUMN, Lakehouse
from resources.model_clients.store import cache_keep_days
from resources.warehouse import fetch_all, fetch_scalar

DEFAULT_KEEP_DAYS = int(os.getenv("LAKEHOUSE_KEEP_BUILD_DAYS", "14"))
DEFAULT_KEEP_SERVED_DAYS = int(os.getenv("LAKEHOUSE_KEEP_SERVED_DAYS", "0"))


@dataclass
class PruneReport:
    horizon: str | None  # builds before this day are removed, but for each asset's newest
    removed: dict[str, list[str]] = field(default_factory=dict)  # asset -> the days of its removed builds
    kept_builds: int = 0
    orphans: list[str] = field(default_factory=list)  # "<table> <day>": rows no build names, removed
    kept_files_deleted: int = 0
    served_days_kept: list[str] = field(default_factory=list)  # days of the served table whose builds went
    served_days_removed: list[str] = field(default_factory=list)  # days before keep_served_days
    cached_vectors_pruned: int = 0  # vectors no item map names, cached before cache_keep_days
    data_files_deleted: int = 0  # data files, manifests and manifest lists, by the history expiry


def prune_builds(lakehouse: Lakehouse, keep_days: int, keep_served_days: int = 0,
                 cache_keep_days: int = 0) -> PruneReport:
    """Remove the builds no run within the last `keep_days` days reads, the served days older
    than `keep_served_days` (0: none) that no kept build names, and the cached vectors no item map
    names older than `cache_keep_days` (0: none) (module docstring)."""
    if keep_days < 1 or keep_served_days < 0:
        raise ValueError("keep_days must be at least 1 (the newest day's builds are always read), "
                         "keep_served_days at least 0 (0: for ever)")
    states = _all_states(lakehouse)
    report = PruneReport(horizon=None)
    named: set[tuple[str, str]] = set()  # (table, day) of the kept builds' tables
    if states:
        horizon = max(row["as_of"] for row in states) - timedelta(days=keep_days - 1)
        removed, kept = _superseded(states, horizon)
        report.horizon, report.kept_builds = str(horizon), len(kept)
        _remove_builds(lakehouse, removed, kept, report)
        named = _named_days(kept)
        _remove_orphans(lakehouse, named, str(horizon), report)
    if keep_served_days:
        _remove_old_served_days(lakehouse, named, keep_served_days, report)
    if cache_keep_days:  # after the builds: their item maps went with them
        report.cached_vectors_pruned = _prune_cache(lakehouse, cache_keep_days)
    # every table's: the files of what today removed go at the next run (history_grace_minutes)
    report.data_files_deleted = sum(lakehouse.expire_history(table) for table in lakehouse.table_names())
    return report


def _remove_builds(lakehouse: Lakehouse, removed: list[dict], kept: list[dict], report: PruneReport) -> None:
    for row in sorted(removed, key=lambda row: (row["asset"], row["as_of"])):
        asset, day = row["asset"], str(row["as_of"])
        lakehouse.drop_day(STATE_TABLE, day, {"asset": asset})  # first: no run takes this build from now on
        for table in json.loads(row["tables"] or "{}"):
            if table == SERVED_TABLE:  # served history: its own retention
                report.served_days_kept.append(day)
            else:
                lakehouse.drop_day(table, day)
        if asset in stage_names():
            for table in row_tables_of(asset):
                for stage in stages_of(asset):
                    lakehouse.drop_day(table, day, {"stage": stage})
        report.removed.setdefault(asset, []).append(day)
    named = {key for row in kept for key in _kept_file_keys(row)}
    for key in sorted({key for row in removed for key in _kept_file_keys(row)} - named):
        lakehouse.delete_file(key)
        report.kept_files_deleted += 1


def _remove_orphans(lakehouse: Lakehouse, named: set[tuple[str, str]], horizon: str, report: PruneReport) -> None:
    """Days of the assets' tables before the horizon that no build names: left by a build that
    died before its state row (a build running now re-checks its tables before its state row)."""
    for table in sorted({table for table, _ in named} - {SERVED_TABLE}):
        for day in lakehouse.partition_days(table):
            if day < horizon and (table, day) not in named:
                lakehouse.drop_day(table, day)
                report.orphans.append(f"{table} {day}")


def _remove_old_served_days(lakehouse: Lakehouse, named: set[tuple[str, str]], keep_served_days: int,
                            report: PruneReport) -> None:
    days = lakehouse.partition_days(SERVED_TABLE)
    if not days:
        return
    horizon = str(date.fromisoformat(days[-1]) - timedelta(days=keep_served_days - 1))
    for day in days:
        if day < horizon and (SERVED_TABLE, day) not in named:
            lakehouse.drop_day(SERVED_TABLE, day)
            report.served_days_removed.append(day)


def _prune_cache(lakehouse: Lakehouse, keep_days: int) -> int:
    """Rewrite the cache's (day, stage) shares that hold vectors no item map names and cached
    more than `keep_days` ago, without them; returns how many went. The keys are read first, then
    one share at a time with its vectors (memory holds a share, not the cache)."""
    key = tuple(column.strip() for column in CACHE_KEY.split(","))
    cache = lakehouse.read_through(CACHE_TABLE, FAR_FUTURE, columns=(PARTITION_COLUMN, WRITER_COLUMN, *key, "created_at"))
    if cache is None:
        return 0
    items = lakehouse.read_through(ITEMS_TABLE, FAR_FUTURE, columns=key)
    horizon = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=keep_days)
    with duckdb.connect() as con:
        con.register("cache_keys", cache)
        con.execute(f"CREATE TABLE named ({CACHE_KEY}) AS SELECT {CACHE_KEY} FROM cache_keys LIMIT 0")
        if items is not None:
            con.register("item_keys", items)
            con.execute(f"INSERT INTO named SELECT DISTINCT {CACHE_KEY} FROM item_keys")
        con.execute(f"CREATE TABLE gone AS SELECT {PARTITION_COLUMN}, {WRITER_COLUMN}, {CACHE_KEY} FROM cache_keys "
                    f"ANTI JOIN named USING ({CACHE_KEY}) WHERE created_at < ?", [horizon])
        for day, writer in fetch_all(con, f"SELECT DISTINCT {PARTITION_COLUMN}, {WRITER_COLUMN} FROM gone ORDER BY 1, 2"):
            share = {WRITER_COLUMN: writer}
            con.register("share", lakehouse.read_day(CACHE_TABLE, day, where={WRITER_COLUMN: [writer]}))
            kept = con.sql(f"SELECT * EXCLUDE ({PARTITION_COLUMN}) FROM share ANTI JOIN (SELECT {CACHE_KEY} FROM gone "
                           f"WHERE {PARTITION_COLUMN} = $day AND {WRITER_COLUMN} = $writer) USING ({CACHE_KEY})",
                           params={"day": day, "writer": writer}).to_arrow_table()
            con.unregister("share")
            if kept.num_rows:
                lakehouse.write_day(CACHE_TABLE, day, kept, f"pruned:{uuid.uuid4().hex[:12]}", keys=share)
            else:
                lakehouse.drop_day(CACHE_TABLE, day, share)
        return fetch_scalar(con, "SELECT count(*) FROM gone")


def _named_days(kept: list[dict]) -> set[tuple[str, str]]:
    """(table, day) of every kept build's tables."""
    return {(table, str(row["as_of"])) for row in kept for table in json.loads(row["tables"] or "{}")}


def _all_states(lakehouse: Lakehouse) -> list[dict[str, Any]]:
    reader = lakehouse.read_through(STATE_TABLE, FAR_FUTURE)
    return reader.read_all().to_pylist() if reader is not None else []


def _superseded(states: list[dict[str, Any]], horizon: date) -> tuple[list[dict], list[dict]]:
    """(removed, kept): per asset, builds before the horizon but its newest one are removed."""
    by_asset: dict[str, list[dict]] = defaultdict(list)
    for row in states:
        by_asset[row["asset"]].append(row)
    removed, kept = [], []
    for rows in by_asset.values():
        superseded = sorted(row["as_of"] for row in rows if row["as_of"] < horizon)[:-1]  # one row a day
        removed += [row for row in rows if row["as_of"] in superseded]
        kept += [row for row in rows if row["as_of"] not in superseded]
    return removed, kept


def _kept_file_keys(row: dict[str, Any]) -> list[str]:
    return [f"{row['asset']}/{relative}" for relative in json.loads(row["files"] or "[]")]


class PruneConfig(dg.Config):
    keep_days: int = Field(default=DEFAULT_KEEP_DAYS, ge=1,
                           description="Builds of the last this many days stay, with each asset's newest before them "
                                       "(LAKEHOUSE_KEEP_BUILD_DAYS).")
    keep_served_days: int = Field(default=DEFAULT_KEEP_SERVED_DAYS, ge=0,
                                  description="Days of the served outputs.recommendations kept (LAKEHOUSE_KEEP_SERVED_DAYS; "
                                              "0: for ever).")
    cache_keep_days: int = Field(default_factory=cache_keep_days, ge=0,
                                 description="Cached vectors no item map names go once cached this many days ago "
                                             "(EMBEDDING_CACHE_KEEP_DAYS; 0: for ever).")


@dg.op(required_resource_keys={"lakehouse"})
def prune_superseded_builds(context: dg.OpExecutionContext, config: PruneConfig) -> dg.Output:
    report = prune_builds(context.resources.lakehouse, config.keep_days, config.keep_served_days,
                          config.cache_keep_days)
    removed = sum(len(days) for days in report.removed.values())
    context.log.info(f"removed {removed} builds before {report.horizon} ({report.data_files_deleted} files deleted)")
    return dg.Output(None, metadata={
        "keep_days": config.keep_days, "horizon": str(report.horizon), "builds_removed": removed,
        "builds_kept": report.kept_builds, "removed_by_asset": dg.MetadataValue.json(report.removed),
        "orphan_days_removed": len(report.orphans), "keep_served_days": config.keep_served_days,
        "served_days_kept": len(report.served_days_kept), "served_days_removed": len(report.served_days_removed),
        "kept_files_deleted": report.kept_files_deleted, "cache_keep_days": config.cache_keep_days,
        "cached_vectors_pruned": report.cached_vectors_pruned, "data_files_deleted": report.data_files_deleted})


@dg.job(description="Remove the lakehouse builds no run within the retention reads, and their files.")
def prune_lakehouse_builds() -> None:
    prune_superseded_builds()


prune_schedule = dg.ScheduleDefinition(
    job=prune_lakehouse_builds, cron_schedule="0 4 * * *", default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily: without it the lake grows by the pipeline's tables every day.",
)
