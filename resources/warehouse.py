"""The DuckDB warehouse: the only door to the database file.

DuckDB lets one process hold a read-write connection to a file at a time. Dagster runs steps,
backfill runs, checks and sensors in separate processes, so every connection here is taken under
an OS file lock (exclusive for writers, shared for readers) that waits instead of failing.
Connections are meant to be short: open, run SQL, close. Never hold one across a model call.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pyarrow as pa
from pydantic import Field

DEFAULT_WAREHOUSE_PATH = "data/warehouse.duckdb"

# Flock locks belong to an open file description, so a second lock taken by the same process
# would wait on itself forever. Refuse nesting instead.
_held = threading.local()


class WarehouseLockTimeout(RuntimeError):
    pass


class DuckDBWarehouse(dg.ConfigurableResource):
    """A DuckDB file with serialized, short-lived connections."""

    path: str = Field(default=DEFAULT_WAREHOUSE_PATH, description="DuckDB database file.")
    memory_limit: str = Field(default="1GB", description="DuckDB memory_limit for every connection.")
    threads: int = Field(default=2, description="DuckDB worker threads for every connection.")
    lock_timeout_seconds: float = Field(
        default=3600.0, description="How long a step waits for another process's connection."
    )

    @property
    def file(self) -> Path:
        return Path(self.path)

    @property
    def lock_file(self) -> Path:
        return Path(f"{self.path}.lock")

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection under the file lock; closed (and the lock released) on exit."""
        if getattr(_held, "depth", 0):
            raise RuntimeError("A warehouse connection is already open in this thread; close it first.")
        self.file.parent.mkdir(parents=True, exist_ok=True)
        if read_only and not self.file.exists():
            read_only = False  # nothing to read yet: create the file so readers see empty tables
        with self._file_lock(exclusive=not read_only):
            con = duckdb.connect(str(self.file), read_only=read_only, config=self._config())
            _held.depth = 1
            try:
                yield con
            finally:
                _held.depth = 0
                con.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write connection inside one transaction: all of it lands, or none of it."""
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def _config(self) -> dict[str, Any]:
        temp_dir = self.file.parent / ".duckdb_tmp"
        return {
            "memory_limit": self.memory_limit,
            "threads": self.threads,
            "temp_directory": str(temp_dir),
            "preserve_insertion_order": True,
        }

    @contextmanager
    def _file_lock(self, exclusive: bool) -> Iterator[None]:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + self.lock_timeout_seconds
            delay = 0.01
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise WarehouseLockTimeout(
                            f"waited {self.lock_timeout_seconds:.0f}s for the warehouse lock {self.lock_file}"
                        ) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.5)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock


def arrow_batches(
    con: duckdb.DuckDBPyConnection, sql: str, batch_rows: int, params: Sequence[Any] | dict | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream a query as Arrow record batches on a cursor of its own, so the connection stays
    free for writes meanwhile; call again for another pass.

    Through the relation API (`sql`), not `execute`: a DB-API result is materialized whole before
    it becomes Arrow (measured: 5 GB RSS for 20M purchase rows), a relation streams.
    """
    cursor = con.cursor()
    try:
        yield from cursor.sql(sql, params=params).to_arrow_reader(batch_rows)
    finally:
        cursor.close()


def fetch_all(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | dict | None = None) -> list[tuple]:
    """Run a query and fetch every row (never leaves a result open on the connection)."""
    return con.execute(sql, params or []).fetchall()


def fetch_scalar(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | dict | None = None) -> Any:
    rows = fetch_all(con, sql, params)
    return rows[0][0] if rows else None


def table_exists(con: duckdb.DuckDBPyConnection, qualified_name: str) -> bool:
    schema, _, table = qualified_name.rpartition(".")
    return bool(
        fetch_scalar(
            con,
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
            [schema or "main", table],
        )
    )
