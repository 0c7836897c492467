"""The DuckDB warehouse: the only door to the database file.

DuckDB lets one process hold a read-write connection to a file at a time. Dagster runs steps,
backfill runs, checks and sensors in separate processes, so every connection here is taken under
an OS file lock (exclusive for writers, shared for readers) that waits instead of failing.
Connections are meant to be short: open, run SQL, close. Never hold one across a model call.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from resources.memory import (budgeted_memory_limit, parse_size, process_rss,
                              release_memory_at_most_every)

DEFAULT_WAREHOUSE_PATH = "data/warehouse.duckdb"
DEFAULT_STEP_MEMORY_BUDGET = "1GiB"

# The steps that write the warehouse share this pool (one slot: dagster.yaml), across runs. The
# op tag says the same to a run's own executor, which then launches its writers one at a time
# (definitions.py) instead of having them poll the pool with a back-off that grows to 15 s.
WAREHOUSE_POOL = "duckdb"
WAREHOUSE_STEP_TAGS = {"warehouse_pool": WAREHOUSE_POOL}


def step_pool(pool: str | None = WAREHOUSE_POOL, priority: int = 0) -> dict[str, Any]:
    """A step's `pool` and `op_tags` as one: a warehouse writer carries the tag with the pool, and
    a step whose priority is not 0 carries its priority tag."""
    tags = {**(WAREHOUSE_STEP_TAGS if pool == WAREHOUSE_POOL else {}), **step_priority(priority)}
    return {"pool": pool, "op_tags": tags or None}


def step_priority(priority: int) -> dict[str, str]:
    """Dagster's tag by which a run launches a ready step before the ready steps of lower priority
    (none for the default, 0)."""
    return {"dagster/priority": str(priority)} if priority else {}

# Flock locks belong to an open file description, so a second lock taken by the same process
# would wait on itself forever. Refuse nesting instead.
_held = threading.local()
log = logging.getLogger(__name__)
# A waiter polls the lock at least this often: polling every 0.5 s, a step that waited for another's
# lock went on 0.25 s after it was free, on average (a poll costs one syscall).
LOCK_POLL_MAX_SECONDS = 0.05


class WarehouseLockTimeout(RuntimeError):
    pass


# DuckDB refuses a second connection to a file that one of this process's connections has open
# with another configuration, and the memory_limit follows the process's RSS: readers in two
# threads at once (shared locks) take the configuration of the one already open.
_open_configs: dict[str, tuple[int, dict[str, Any]]] = {}
_open_configs_lock = threading.Lock()


@contextmanager
def _shared_config(file: Path, make: Callable[[], dict[str, Any]]) -> Iterator[dict[str, Any]]:
    key = str(file.resolve())
    with _open_configs_lock:
        count, config = _open_configs.get(key, (0, None))
        config = config if count else make()
        _open_configs[key] = (count + 1, config)
    try:
        yield config
    finally:
        with _open_configs_lock:
            count, config = _open_configs[key]
            if count > 1:
                _open_configs[key] = (count - 1, config)
            else:
                del _open_configs[key]


_budgeted: dict[int, DuckDBWarehouse] = {}  # id of an open connection -> the warehouse that opened it


def rebudget(con: duckdb.DuckDBPyConnection) -> str | None:
    """Set an open connection's memory_limit again from what the process holds now besides its
    buffers: a step that parsed a file in Python since it connected holds more than it did then
    (landing 2M JSON lines: 387 MiB besides DuckDB's against 333 MiB at connect, and the step's
    peak passed 1 GiB). Returns the new limit; a connection no budgeted warehouse opened is left
    as it is (None). For a writer's connection: the limit is the database's, which readers of
    other threads would share."""
    warehouse = _budgeted.get(id(con))
    if warehouse is None or not warehouse.step_memory_budget:
        return None
    return rebudget_within(con, warehouse.memory_limit, warehouse.step_memory_budget, warehouse.min_memory_limit)


def rebudget_within(con: duckdb.DuckDBPyConnection, cap: str, budget: str | None, floor: str) -> str | None:
    """rebudget's rule for any connection: memory_limit from what the process holds now besides
    the connection's buffers, within `budget` (None: left as it is)."""
    if not budget:
        return None
    # At most every 10 s, as at connect: a full collection takes ~140 ms in a loaded code location,
    # which a range run of small days paid once a day (219 Online Retail days: 20 s -> 55 s).
    release_memory_at_most_every(10.0)
    buffers = int(fetch_scalar(con, "SELECT coalesce(sum(memory_usage_bytes), 0) FROM duckdb_memory()"))
    limit = budgeted_memory_limit(cap, budget, floor, held=max(process_rss() - buffers, 0))
    con.execute(f"SET memory_limit = '{limit}'")
    log.debug(f"DuckDB memory_limit {limit} again (process at {process_rss() // 2**20} MiB, buffers {buffers // 2**20} MiB)")
    return limit


class DuckDBWarehouse(dg.ConfigurableResource):
    """A DuckDB file with serialized, short-lived connections."""

    path: str = Field(default=DEFAULT_WAREHOUSE_PATH, description="DuckDB database file.")
    memory_limit: str = Field(default="1GB", description="DuckDB memory_limit for every connection (the cap).")
    step_memory_budget: str | None = Field(
        default=DEFAULT_STEP_MEMORY_BUDGET,
        description="The peak RSS a step's process aims at: each connection's DuckDB memory_limit is this budget "
                    "minus what the process already holds when it connects (minus a reserve for DuckDB's memory "
                    "outside its buffer pool), at least min_memory_limit, at most memory_limit. None: memory_limit.")
    min_memory_limit: str = Field(default="256MiB", description="The least DuckDB memory_limit a budget leaves.")
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

    @property
    def scratch_dir(self) -> Path:
        """Where snapshots and staged outputs live while a step computes (same disk as the file)."""
        return self.file.parent / ".scratch"

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection under the file lock; closed (and the lock released) on exit."""
        with (self._door(read_only) as read_only, _shared_config(self.file, self._config) as config,
              self._opened(str(self.file), read_only, config) as con):
            yield con

    @contextmanager
    def _opened(self, database: str, read_only: bool, config: dict[str, Any]) -> Iterator[duckdb.DuckDBPyConnection]:
        """A DuckDB connection whose memory_limit `rebudget` may set again; closed on exit."""
        con = duckdb.connect(database, read_only=read_only, config=config)
        _budgeted[id(con)] = self
        try:
            yield con
        finally:
            _budgeted.pop(id(con), None)
            con.close()

    @contextmanager
    def _door(self, read_only: bool) -> Iterator[bool]:
        """The rules of every way in: one connection a thread, the file lock (exclusive for a
        writer), and a file that does not exist yet opened to be created. Yields read_only as it
        stands."""
        if getattr(_held, "depth", 0):
            raise RuntimeError("A warehouse connection is already open in this thread; close it first.")
        self.file.parent.mkdir(parents=True, exist_ok=True)
        if read_only and not self.file.exists():
            read_only = False  # nothing to read yet: create the file so readers see empty tables
        with self._file_lock(exclusive=not read_only):
            _held.depth = 1
            try:
                yield read_only
            finally:
                _held.depth = 0

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

    @contextmanager
    def staging(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """An in-memory DuckDB of the step's own, with the warehouse connections' budget and spill
        folder, under no lock: a step parses and judges a file there, then writes its rows into the
        warehouse attached for that moment only (`attached`)."""
        self.file.parent.mkdir(parents=True, exist_ok=True)  # the spill folder's parent
        with self._opened(":memory:", False, self._config()) as con:
            yield con

    @contextmanager
    def attached(self, con: duckdb.DuckDBPyConnection, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """The warehouse attached to a staging connection as its default database, under the file
        lock; detached (its checkpoint written) and the lock released on exit. The staging
        connection's temp tables stay readable meanwhile."""
        with self._door(read_only) as read_only:
            path = str(self.file).replace("'", "''")
            con.execute(f"ATTACH '{path}' AS warehouse{' (READ_ONLY)' if read_only else ''}")
            try:
                con.execute("USE warehouse")
                yield con
            finally:
                con.execute("USE memory")
                con.execute("DETACH warehouse")

    def connection_memory_limit(self) -> str:
        """DuckDB's memory_limit for a connection opened now in this process."""
        if self.step_memory_budget and process_rss() > parse_size(self.step_memory_budget) // 2:
            release_memory_at_most_every(10.0)  # what the step freed (a model, scoring buffers) is DuckDB's
        limit = budgeted_memory_limit(self.memory_limit, self.step_memory_budget, self.min_memory_limit)
        log.debug(f"DuckDB memory_limit {limit} (process at {process_rss() // 2**20} MiB, budget {self.step_memory_budget})")
        return limit

    def _config(self) -> dict[str, Any]:
        temp_dir = self.file.parent / ".duckdb_tmp"
        return {
            "memory_limit": self.connection_memory_limit(),
            "threads": self.threads,
            "temp_directory": str(temp_dir),
            "preserve_insertion_order": True,
        }

    @contextmanager
    def _file_lock(self, exclusive: bool) -> Iterator[None]:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            started = time.monotonic()
            deadline = started + self.lock_timeout_seconds
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
                    delay = min(delay * 2, LOCK_POLL_MAX_SECONDS)
            waited = time.monotonic() - started
            if waited > 0.1:
                log.debug(f"waited {waited:.2f}s for the {'exclusive' if exclusive else 'shared'} warehouse lock")
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


Query = str | tuple[str, Any]


def parquet_batches(path: Path | str, batch_rows: int, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """A Parquet file's rows in stored order, as Arrow batches, one row group at a time.

    Not `ParquetFile.iter_batches()` over the whole file: its reader keeps what it has read until
    the end (measured: RSS grows by the file's size, 366 MiB over a 20M-row purchases snapshot,
    which was most of the recommendations step's creep while scoring); read per row group, it
    stays flat."""
    parquet = pq.ParquetFile(path)
    for row_group in range(parquet.num_row_groups):
        yield from parquet.iter_batches(batch_size=batch_rows, row_groups=[row_group], columns=columns)


class Snapshot:
    """Parquet files a step computes from and stages its outputs in, without any warehouse lock."""

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.parquet"

    def has(self, name: str) -> bool:
        return self.path(name).exists()

    def batches(self, name: str, batch_rows: int, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Stream a file in stored order (a snapshot of a customer-sorted table stays sorted)."""
        yield from parquet_batches(self.path(name), batch_rows, columns)

    def table(self, name: str) -> pa.Table:
        return pq.read_table(self.path(name))

    def rows(self, name: str) -> int:
        """How many rows a file holds (from its footer: nothing else is read)."""
        return pq.ParquetFile(self.path(name)).metadata.num_rows

    def writer(self, name: str, schema: pa.Schema) -> pq.ParquetWriter:
        """A file written once and read once by DuckDB. Without dictionary encoding: for ids that
        barely repeat it only costs (3.2M staged recommendations: 1.12 s -> 0.51 s to write, on the
        thread that feeds the scoring workers; DuckDB loads either in about 0.5 s)."""
        return pq.ParquetWriter(self.path(name), schema, use_dictionary=False)


@contextmanager
def snapshot(warehouse: Any, queries: Mapping[str, Query], optional: Mapping[str, Query] | None = None,
             prepare: Sequence[Query] = (), register: Mapping[str, pa.Table] | None = None) -> Iterator[Snapshot]:
    """Copy each query's result to a Parquet file under one read-only connection, then let go.

    The shared lock is held only while copying (20M purchase rows: about 2 s), so a step that
    computes for minutes (fitting, scoring, clustering) blocks no writer meanwhile: alert rows,
    other partitions. The step writes its outputs back in a short transaction of its own; the
    state's version check catches a rebuild that happened in between. The files are deleted on
    exit. A query is SQL or (SQL, parameters); an `optional` one may read a table that does not
    exist yet (`Snapshot.has` tells). `prepare` statements run first on the same connection (for
    example TEMP tables the queries share, so one consistent view feeds them all), after the
    `register`ed Arrow tables are made visible under their names.
    """
    warehouse.scratch_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="snapshot-", dir=warehouse.scratch_dir))
    taken = Snapshot(folder)
    try:
        with warehouse.connect(read_only=True) as con:
            for name, table in (register or {}).items():
                con.register(name, table)
            for statement in prepare:
                sql, params = statement if isinstance(statement, tuple) else (statement, None)
                con.execute(sql, params or [])
            for name, query in [*queries.items(), *(optional or {}).items()]:
                sql, params = query if isinstance(query, tuple) else (query, None)
                try:
                    con.sql(sql, params=params).write_parquet(str(taken.path(name)))
                except duckdb.CatalogException:
                    if name in queries:
                        raise
        yield taken
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def fetch_all(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | dict | None = None) -> list[tuple]:
    """Run a query and fetch every row (never leaves a result open on the connection)."""
    return con.execute(sql, params or []).fetchall()


def fetch_scalar(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | dict | None = None) -> Any:
    rows = fetch_all(con, sql, params)
    return rows[0][0] if rows else None


def exact_quantiles(con: duckdb.DuckDBPyConnection, source: str, column: str, quantiles: Sequence[float],
                    weight: str | None = None) -> list[float | None]:
    """`quantile_cont(column, q)` for each q, computed from the column's distinct values and their
    counts (`source` and `column` are SQL from code).

    quantile_cont holds every value in memory and cannot spill: over 20M recommendations it ran
    out of a 256 MiB memory_limit. A calibrated confidence takes a few thousand distinct values
    (16,765 over 20M rows measured), so grouping first costs little and gives the same numbers
    (the same interpolation between the two values around (n - 1) x q). With `weight`, each row
    of `source` stands for that many values (a table already counted by value)."""
    n = f"sum({weight})" if weight else "count(*)"
    total = int(fetch_scalar(con, f"SELECT {n} FILTER (WHERE {column} IS NOT NULL) FROM {source}") or 0)
    if total == 0:
        return [None] * len(quantiles)
    positions = [(total - 1) * q for q in quantiles]
    ranks = sorted({int(math.floor(h)) for h in positions} | {int(math.ceil(h)) for h in positions})
    value_at = dict(fetch_all(con, f"""
        WITH counted AS (SELECT {column} AS x, {n} AS n FROM {source} WHERE {column} IS NOT NULL GROUP BY 1),
             ranked AS (SELECT x, sum(n) OVER (ORDER BY x) AS below_next FROM counted)
        SELECT r.rank, (SELECT min(x) FROM ranked WHERE below_next > r.rank)
        FROM unnest($ranks::BIGINT[]) AS r(rank)""", {"ranks": ranks}))
    values = []
    for h in positions:
        low, high = value_at[int(math.floor(h))], value_at[int(math.ceil(h))]
        values.append(float(low + (h - math.floor(h)) * (high - low)))
    return values


def table_exists(con: duckdb.DuckDBPyConnection, qualified_name: str, catalog: str | None = None) -> bool:
    """`catalog`: only in that attached database (a staging connection holds the same names)."""
    schema, _, table = qualified_name.rpartition(".")
    sql = "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = ?"
    params = [schema or "main", table]
    if catalog is not None:
        sql += " AND table_catalog = ?"
        params.append(catalog)
    return bool(fetch_scalar(con, sql, params))
