"""What each current-state table was built from, so an unchanged input is never rebuilt.

Stages after ingestion keep one current table each (not a snapshot per day: recomputable data
must not grow the file by gigabytes a day). A build records the fingerprint of its inputs; the
next build with the same fingerprint is skipped, and a build for an older day than the table
already holds is skipped too (current tables only move forward unless forced).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import dagster as dg
import duckdb

from resources.warehouse import fetch_all, table_exists

STATE_TABLE = "ops.asset_state"

# Ingestion assets and the source name they record in ops.batch_fingerprints.
RAW_SOURCES = {"raw_products": "products", "raw_customers": "customers", "raw_transactions": "transactions"}


@dataclass(frozen=True)
class BuildDecision:
    build: bool
    reason: str
    fingerprint: str


def ensure_state_table(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("CREATE SCHEMA IF NOT EXISTS ops")
    con.execute(
        f"""CREATE TABLE IF NOT EXISTS {STATE_TABLE} (
            asset VARCHAR PRIMARY KEY, as_of DATE, fingerprint VARCHAR, row_count BIGINT,
            built_at TIMESTAMP, metadata JSON)"""
    )


def as_of_day(context: dg.AssetExecutionContext) -> dt.date:
    """The last day covered by the run's partition (range): state is built as of that day."""
    window = context.partition_time_window
    return (window.end - dt.timedelta(days=1)).date()


def fingerprint_of(*parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:32]


def upstream_fingerprint(con: duckdb.DuckDBPyConnection, asset: str, as_of: dt.date) -> str:
    """The fingerprint of an upstream asset's content as of a day; fails if it was never built."""
    if asset in RAW_SOURCES:
        return _raw_fingerprint(con, RAW_SOURCES[asset], asset, as_of)
    state = read_state(con, asset)
    if state is None:
        raise dg.Failure(f"upstream asset {asset!r} has not been materialized yet; materialize it first")
    return state["fingerprint"]


def _raw_fingerprint(con: duckdb.DuckDBPyConnection, source: str, asset: str, as_of: dt.date) -> str:
    rows = fetch_all(
        con,
        "SELECT partition_date, fingerprint FROM ops.batch_fingerprints"
        " WHERE source = ? AND partition_date <= ? ORDER BY partition_date",
        [source, as_of],
    ) if table_exists(con, "ops.batch_fingerprints") else []
    # No batch yet is a valid state (a deployment may use only some sources): it fingerprints as empty.
    return fingerprint_of([(str(day), fp) for day, fp in rows])


def read_state(con: duckdb.DuckDBPyConnection, asset: str) -> dict[str, Any] | None:
    if not table_exists(con, STATE_TABLE):
        return None
    rows = fetch_all(con, f"SELECT as_of, fingerprint, row_count, metadata FROM {STATE_TABLE} WHERE asset = ?", [asset])
    if not rows:
        return None
    as_of, fingerprint, row_count, metadata = rows[0]
    return {"as_of": as_of, "fingerprint": fingerprint, "row_count": row_count, "metadata": json.loads(metadata or "{}")}


def decide_build(
    con: duckdb.DuckDBPyConnection, asset: str, as_of: dt.date, fingerprint: str, force: bool
) -> BuildDecision:
    state = read_state(con, asset)
    if force:
        return BuildDecision(True, "forced by run config", fingerprint)
    if state is None:
        return BuildDecision(True, "first build", fingerprint)
    if state["fingerprint"] == fingerprint:
        return BuildDecision(False, f"inputs unchanged since the build as of {state['as_of']}", fingerprint)
    if state["as_of"] > as_of:
        return BuildDecision(
            False, f"table already holds a later day ({state['as_of']}); rebuild with force to go back", fingerprint
        )
    return BuildDecision(True, "inputs changed", fingerprint)


def decide_from_upstream(
    con: duckdb.DuckDBPyConnection, asset: str, as_of: dt.date, upstream, settings: Any, force: bool
) -> BuildDecision:
    """Fingerprint the upstream assets' content and the build's own settings, then decide."""
    inputs = {name: upstream_fingerprint(con, name, as_of) for name in upstream}
    return decide_build(con, asset, as_of, fingerprint_of(settings, inputs), force)


def write_state(
    con: duckdb.DuckDBPyConnection, asset: str, as_of: dt.date, fingerprint: str, row_count: int,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Record a finished build; call inside the transaction that wrote the table."""
    ensure_state_table(con)
    con.execute(
        f"""INSERT OR REPLACE INTO {STATE_TABLE} VALUES (?, ?, ?, ?, now()::TIMESTAMP, ?)""",
        [asset, as_of, fingerprint, row_count, json.dumps(metadata or {}, default=str)],
    )


def skipped_result(
    context: dg.AssetExecutionContext,
    decision: BuildDecision,
    check_results: list[dg.AssetCheckResult] | None = None,
    **metadata: Any,
) -> dg.MaterializeResult:
    """A materialization that records the skip; checks declared on the asset report the kept state."""
    context.log.info(f"skipped: {decision.reason}")
    return dg.MaterializeResult(
        metadata={"skipped": True, "skip_reason": decision.reason, "fingerprint": decision.fingerprint, **metadata},
        check_results=check_results or [],
    )


class BuildConfig(dg.Config):
    """Run config shared by the current-state stages."""

    force: bool = False
