"""The dead-letter queue: items a stage could not process, with why, until a later run succeeds.

    ops.dead_letter  (stage, partition_key, item_key) -> reason_class, error, attempts, resolved_at

Any stage dead-letters here: the model clients (a text that could not be embedded, a chat
answer that was unusable) and the pipeline's own steps (a chunk of customers that could not be
scored). A row stays open (`resolved_at IS NULL`) until the item succeeds in a later run of the
same stage, in any partition (`resolve`), or is no longer asked for at all (`supersede`: a
product that left the catalog). Rows are never deleted, so the history stays auditable; a
re-failing item reopens its row, attempts add up and `last_seen` moves.

The functions take the caller's connection (to write inside its transaction) except
`write_dead_letters`, which opens its own short one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from resources.warehouse import DuckDBWarehouse, fetch_all, fetch_scalar

TABLE = "ops.dead_letter"

# Reason classes: what went wrong, in one vocabulary for every stage.
RATE_LIMITED = "rate_limited"
SERVER_ERROR = "server_error"
TIMEOUT = "timeout"
INVALID_OUTPUT = "invalid_output"
CLIENT_ERROR = "client_error"
CIRCUIT_OPEN = "circuit_open"
# Not a model call: a pipeline step's own computation failed for these items.
PROCESSING_ERROR = "processing_error"
REASON_CLASSES = (RATE_LIMITED, SERVER_ERROR, TIMEOUT, INVALID_OUTPUT, CLIENT_ERROR, CIRCUIT_OPEN, PROCESSING_ERROR)

# How an open row was closed.
SUCCEEDED = "succeeded"  # a later run processed the item
SUPERSEDED = "superseded"  # the item is no longer asked for (it left the stage's input)

DDL = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    stage          VARCHAR   NOT NULL,
    partition_key  VARCHAR   NOT NULL,  -- the run's partition ('' when not partitioned)
    item_key       VARCHAR   NOT NULL,
    reason_class   VARCHAR   NOT NULL,  -- one of REASON_CLASSES
    error_message  VARCHAR,             -- redacted: never a credential
    attempts       INTEGER   NOT NULL,  -- requests that carried the item, summed over runs
    payload_hash   VARCHAR,             -- sha256 of what was sent (the payload itself is not kept)
    model          VARCHAR,
    first_seen     TIMESTAMP NOT NULL,
    last_seen      TIMESTAMP NOT NULL,
    resolved_at    TIMESTAMP,           -- NULL = still open
    PRIMARY KEY (stage, partition_key, item_key)
)"""


@dataclass(frozen=True)
class DeadLetter:
    item_key: str
    reason_class: str
    error_message: str
    attempts: int
    payload_hash: str


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def ensure_table(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("CREATE SCHEMA IF NOT EXISTS ops")
    con.execute(DDL)
    # Warehouses made before resolutions were recorded gain the column (NULL for old rows).
    con.execute(f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS resolution VARCHAR")


def write(con: duckdb.DuckDBPyConnection, stage: str, partition_key: str | None, model: str,
          letters: Sequence[DeadLetter]) -> None:
    """Upsert one row per item inside the caller's transaction (re-failing reopens the row)."""
    if not letters:
        return
    ensure_table(con)
    # One row per item a statement: DuckDB refuses to update the same row twice in one statement.
    latest = {letter.item_key: dataclasses.asdict(letter) for letter in letters}
    con.register("new_dead_letters", pa.Table.from_pylist(list(latest.values())))
    con.execute(
        f"""
        INSERT INTO {TABLE}
        SELECT $stage, $partition_key, item_key, reason_class, error_message, attempts, payload_hash,
               $model, $now, $now, NULL, NULL
        FROM new_dead_letters
        ON CONFLICT (stage, partition_key, item_key) DO UPDATE SET
            reason_class = excluded.reason_class,
            error_message = excluded.error_message,
            attempts = {TABLE}.attempts + excluded.attempts,
            payload_hash = excluded.payload_hash,
            model = excluded.model,
            last_seen = excluded.last_seen,
            resolved_at = NULL,
            resolution = NULL
        """,
        {"stage": stage, "partition_key": partition_key or "", "model": model, "now": utc_now()},
    )
    con.unregister("new_dead_letters")


def write_dead_letters(warehouse: DuckDBWarehouse, stage: str, partition_key: str | None, model: str,
                       letters: Sequence[DeadLetter]) -> None:
    """`write` in a short transaction of its own."""
    if letters:
        with warehouse.transaction() as con:
            write(con, stage, partition_key, model, letters)


def resolve(con: duckdb.DuckDBPyConnection, stage: str, item_keys_sql: str, params: dict | None = None,
            resolution: str = SUCCEEDED) -> int:
    """Close the open rows of `stage`, in any partition, whose item is among `item_keys_sql` (a
    query of one column, from code); returns how many were closed."""
    if not count_open(con, stage):  # the usual case: no query over the items at all
        return 0
    closed = fetch_all(
        con,
        f"""UPDATE {TABLE} SET resolved_at = $now, resolution = $resolution
            WHERE stage = $stage AND resolved_at IS NULL AND item_key IN ({item_keys_sql})
            RETURNING item_key""",
        {**(params or {}), "now": utc_now(), "stage": stage, "resolution": resolution},
    )
    return len(closed)


def resolve_keys(con: duckdb.DuckDBPyConnection, stage: str, item_keys: Sequence[str]) -> int:
    """Close the open rows of these items (they succeeded this time), in any partition."""
    if not item_keys:
        return 0
    return resolve(con, stage, "SELECT unnest($keys::VARCHAR[])", {"keys": list(item_keys)})


def supersede(con: duckdb.DuckDBPyConnection, stage: str, current_keys_sql: str | None,
              params: dict | None = None) -> int:
    """Close the open rows of `stage` whose item is not among the items the stage now processes
    (`current_keys_sql`; None: it processes none, every open row closes)."""
    if not count_open(con, stage):
        return 0
    still_processed = f"AND item_key NOT IN ({current_keys_sql})" if current_keys_sql is not None else ""
    closed = fetch_all(
        con,
        f"""UPDATE {TABLE} SET resolved_at = $now, resolution = '{SUPERSEDED}'
            WHERE stage = $stage AND resolved_at IS NULL {still_processed}
            RETURNING item_key""",
        {**(params or {}), "now": utc_now(), "stage": stage},
    )
    return len(closed)


def count_open(con: duckdb.DuckDBPyConnection, stage: str, partition_key: str | None = None) -> int:
    """Open rows of a stage (in one partition when given)."""
    if not _exists(con):
        return 0
    where, params = "stage = ? AND resolved_at IS NULL", [stage]
    if partition_key is not None:
        where, params = where + " AND partition_key = ?", [*params, partition_key]
    return int(fetch_scalar(con, f"SELECT count(*) FROM {TABLE} WHERE {where}", params))


def count_open_items(con: duckdb.DuckDBPyConnection, stage: str) -> int:
    """Items of a stage with an open row: an item that failed in two partitions has two rows but is
    one item (the dead-letter share divides this by the items a build processed)."""
    if not _exists(con):
        return 0
    return int(fetch_scalar(con, f"SELECT count(DISTINCT item_key) FROM {TABLE} WHERE stage = ? AND resolved_at IS NULL",
                            [stage]))


def open_by_reason(con: duckdb.DuckDBPyConnection, stage: str) -> dict[str, int]:
    if not _exists(con):
        return {}
    return dict(fetch_all(con, f"SELECT reason_class, count(*) FROM {TABLE} WHERE stage = ? AND resolved_at IS NULL"
                               " GROUP BY 1 ORDER BY 1", [stage]))


def _exists(con: duckdb.DuckDBPyConnection) -> bool:
    return bool(fetch_scalar(con, "SELECT count(*) FROM information_schema.tables"
                                  " WHERE table_schema = 'ops' AND table_name = 'dead_letter'"))
