"""The model clients' tables in DuckDB: vector cache and item map (failed items go to the
dead-letter queue, resources/dead_letters.py).

    ops.embedding_cache  (model, dimensions, text_hash) -> vector FLOAT[]      one row per text
    ops.embedding_items  (stage, partition_key, item_key) -> text_hash          the last run's items

Every function opens one short connection through the warehouse and closes it; none is held
while a model is called. Data always travels as parameters or registered Arrow tables.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from resources import dead_letters
from resources.dead_letters import DeadLetter
from resources.warehouse import DuckDBWarehouse, fetch_all, fetch_scalar

CACHE_DDL = """
    CREATE TABLE IF NOT EXISTS ops.embedding_cache (
        -- unique by (model, dimensions, text_hash): kept by write_progress's anti-join under the
        -- warehouse's exclusive lock, not by a PRIMARY KEY, whose index every write's checkpoint
        -- re-serializes (measured: a write cost 2-3x more with it, growing with the cache)
        model       VARCHAR   NOT NULL,  -- provider:model, e.g. local:all-MiniLM-L6-v2
        dimensions  INTEGER   NOT NULL,
        text_hash   VARCHAR   NOT NULL,  -- sha256 hex of the normalized, truncated text
        vector      FLOAT[]   NOT NULL,
        created_at  TIMESTAMP NOT NULL
    )
    """

ITEMS_DDL = """
    CREATE TABLE IF NOT EXISTS ops.embedding_items (
        stage          VARCHAR   NOT NULL,
        partition_key  VARCHAR   NOT NULL,  -- '' when the step is not partitioned
        item_key       VARCHAR   NOT NULL,
        model          VARCHAR   NOT NULL,
        dimensions     INTEGER   NOT NULL,
        text_hash      VARCHAR   NOT NULL,
        truncated      BOOLEAN   NOT NULL,
        updated_at     TIMESTAMP NOT NULL,
        PRIMARY KEY (stage, partition_key, item_key)
    )
    """

DDL = (
    "CREATE SCHEMA IF NOT EXISTS ops",
    CACHE_DDL,
    ITEMS_DDL,
)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def ensure_tables(warehouse: DuckDBWarehouse) -> None:
    with warehouse.transaction() as con:
        ensure_tables_on(con)


def ensure_tables_on(con) -> None:
    """The cache, item and dead-letter tables, on the caller's connection."""
    _create_tables(con)
    dead_letters.ensure_table(con)
    _drop_old_cache_key(con)


def _drop_old_cache_key(con) -> None:
    """Warehouses made before the cache lost its PRIMARY KEY still have it (CREATE ... IF NOT
    EXISTS keeps them as they are): rebuild the table once, without it, in the caller's
    transaction."""
    keyed = fetch_scalar(
        con,
        """SELECT count(*) FROM duckdb_constraints()
           WHERE schema_name = 'ops' AND table_name = 'embedding_cache' AND constraint_type = 'PRIMARY KEY'""",
    )
    if not keyed:
        return
    con.execute("ALTER TABLE ops.embedding_cache RENAME TO embedding_cache_keyed")
    con.execute(CACHE_DDL)
    con.execute("INSERT INTO ops.embedding_cache SELECT * FROM ops.embedding_cache_keyed")
    con.execute("DROP TABLE ops.embedding_cache_keyed")


def _create_tables(con) -> None:
    for statement in DDL:
        con.execute(statement)


def start_run(warehouse: DuckDBWarehouse, stage: str, partition_key: str) -> None:
    """The tables exist, and a new run of a stage/partition starts a fresh item map (the cache
    stays): one transaction, so a run beside the warehouse writers waits for the lock once."""
    with warehouse.transaction() as con:
        ensure_tables_on(con)
        con.execute("DELETE FROM ops.embedding_items WHERE stage = ? AND partition_key = ?", [stage, partition_key])


def cache_keep_days() -> int:
    """EMBEDDING_CACHE_KEEP_DAYS: how long a cached vector no item map names stays (0: for ever)."""
    return int(os.getenv("EMBEDDING_CACHE_KEEP_DAYS", "30"))


# A DELETE updates the item map's key index row by row: 2.4M rows took 19 s under the warehouse
# lock, keeping the 20,000 current ones and rebuilding 0.03 s (a day's 20,000 deleted: 0.2 s).
REBUILD_ITEMS_ABOVE = 100_000


def retire_superseded(con, stage: str, partition_key: str, cache_keep_days: int) -> tuple[int, int]:
    """On the caller's connection, inside the transaction that publishes the build of
    `partition_key` (so a concurrent build of the stage, refused at its own publish, never reads
    what this removes): the stage's item maps of earlier days, which nothing reads once a later
    build is published, and the cached vectors no item map names and older than `cache_keep_days`
    (0: kept for ever), so the cache holds what the catalog and the model in use need, not every
    text ever embedded. The age spares vectors a running step just wrote (a Batch API collection
    caches before it maps) and a product that comes back soon. Returns (item rows, vectors) removed."""
    # days only: the replay job's own item map stays
    earlier = r"stage = $stage AND partition_key < $day AND regexp_full_match(partition_key, '\d{4}-\d{2}-\d{2}')"
    params = {"stage": stage, "day": partition_key}
    items = fetch_scalar(con, f"SELECT count(*) FROM ops.embedding_items WHERE {earlier}", params)
    if items > REBUILD_ITEMS_ABOVE:  # the first build after months of maps: keep the few, not delete the many
        con.execute(f"CREATE TEMP TABLE kept_items AS SELECT * FROM ops.embedding_items WHERE NOT ({earlier})", params)
        con.execute("DROP TABLE ops.embedding_items")
        con.execute(ITEMS_DDL)
        con.execute("INSERT INTO ops.embedding_items SELECT * FROM kept_items")
        con.execute("DROP TABLE kept_items")
    elif items:
        con.execute(f"DELETE FROM ops.embedding_items WHERE {earlier}", params)
    if cache_keep_days <= 0:
        return items, 0
    vectors = fetch_scalar(con, """
        DELETE FROM ops.embedding_cache c
        WHERE c.created_at < ? AND NOT EXISTS (
            SELECT 1 FROM ops.embedding_items m
            WHERE m.model = c.model AND m.dimensions = c.dimensions AND m.text_hash = c.text_hash)""",
        [utc_now() - dt.timedelta(days=cache_keep_days)])
    return items, vectors


def cached_hashes(warehouse: DuckDBWarehouse, model: str, dimensions: int, hashes: Sequence[str]) -> set[str]:
    if not hashes:
        return set()
    with warehouse.connect(read_only=True) as con:
        rows = fetch_all(
            con,
            """
            SELECT text_hash FROM ops.embedding_cache
            WHERE model = ? AND dimensions = ? AND text_hash IN (SELECT unnest(?::VARCHAR[]))
            """,
            [model, dimensions, list(hashes)],
        )
    return {row[0] for row in rows}


def write_progress(
    warehouse: DuckDBWarehouse,
    *,
    stage: str,
    partition_key: str,
    model: str,
    dimensions: int,
    vectors: Sequence[tuple[str, np.ndarray]],
    item_rows: Sequence[tuple[str, str, bool]],
    letters: Sequence[DeadLetter],
) -> None:
    """One transaction: new vectors into the cache, item map rows, dead letters."""
    now = utc_now()
    with warehouse.transaction() as con:
        if vectors:
            con.register("new_vectors", _vector_table(vectors, dimensions))
            con.execute(
                """
                INSERT INTO ops.embedding_cache
                SELECT $model, $dimensions, text_hash, vector::FLOAT[], $now
                FROM new_vectors
                ANTI JOIN (
                    SELECT text_hash FROM ops.embedding_cache WHERE model = $model AND dimensions = $dimensions
                ) USING (text_hash)
                """,
                {"model": model, "dimensions": dimensions, "now": now},
            )
            con.unregister("new_vectors")
        if item_rows:
            keys, hashes, truncated = zip(*item_rows, strict=True)
            items = pa.table({"item_key": keys, "text_hash": hashes, "truncated": truncated})
            con.register("new_items", items)
            con.execute(
                """
                INSERT OR REPLACE INTO ops.embedding_items
                SELECT ?, ?, item_key, ?, ?, text_hash, truncated, ? FROM new_items
                """,
                [stage, partition_key, model, dimensions, now],
            )
            con.unregister("new_items")
        dead_letters.write(con, stage, partition_key, model, letters)


def resolve_embedded_dead_letters(warehouse: DuckDBWarehouse, stage: str, partition_key: str) -> tuple[int, int]:
    """Close the stage's open dead letters, in any partition, of items this run now has a vector
    for; returns (closed, still open), counted in the same transaction."""
    with warehouse.transaction() as con:
        resolved = dead_letters.resolve(
            con, stage,
            f"SELECT m.item_key {ITEM_VECTORS_FROM}",
            {"partition_key": partition_key},
        )
        return resolved, dead_letters.count_open(con, stage)


# A stage/partition's items with their cached vectors: the one join every reader of them uses.
ITEM_VECTORS_FROM = """
    FROM ops.embedding_items m
    JOIN ops.embedding_cache c USING (model, dimensions, text_hash)
    WHERE m.stage = $stage AND m.partition_key = $partition_key"""
ITEM_VECTORS_SQL = f"""
    SELECT m.item_key, m.text_hash, c.vector {ITEM_VECTORS_FROM} AND m.item_key > $after
    ORDER BY m.item_key
"""


def item_vectors_sql(dimensions: int) -> str:
    """The items without paging, vectors typed as fixed-size arrays (as the readers give them)."""
    return f"SELECT m.item_key, m.text_hash, c.vector::FLOAT[{int(dimensions)}] AS vector {ITEM_VECTORS_FROM}"


def iter_item_vectors(
    warehouse: DuckDBWarehouse, stage: str, partition_key: str, dimensions: int, batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """(item_key, text_hash, vector) of the stage/partition's stored items, ordered by item_key,
    one short connection per page: the consumer may do anything between batches, except hold a
    warehouse connection of its own while asking for the next one."""
    after = ""
    while True:
        with warehouse.connect(read_only=True) as con:
            page = con.sql(
                f"{ITEM_VECTORS_SQL} LIMIT $limit",
                params={"stage": stage, "partition_key": partition_key, "after": after, "limit": batch_rows},
            ).to_arrow_table()
        if page.num_rows == 0:
            return
        yield _with_fixed_vectors(page, dimensions)
        if page.num_rows < batch_rows:
            return
        after = page.column("item_key")[-1].as_py()


def spool_item_vectors(
    warehouse: DuckDBWarehouse, stage: str, partition_key: str, dimensions: int, batch_rows: int
) -> pa.RecordBatchReader:
    """The same rows as a reader detached from the database: one read streams them into an
    Arrow file beside the warehouse (memory stays at one batch), the file is unlinked at once
    (nothing is left behind, even on a crash) and read back through a memory map. So the reader
    can be registered in DuckDB inside the caller's own warehouse transaction."""
    schema = item_vector_schema(dimensions)
    fd, path = tempfile.mkstemp(dir=warehouse.file.parent, prefix=".vectors-", suffix=".arrow")
    os.close(fd)
    try:
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            with warehouse.connect(read_only=True) as con:
                params = {"stage": stage, "partition_key": partition_key, "after": ""}
                for batch in con.sql(ITEM_VECTORS_SQL, params=params).to_arrow_reader(batch_rows):
                    if batch.num_rows:
                        writer.write_batch(_with_fixed_vectors(pa.Table.from_batches([batch]), dimensions))
        return pa.ipc.open_stream(pa.memory_map(path))
    finally:
        os.unlink(path)  # the open mapping keeps the bytes readable until the reader is dropped


def iter_vectors_for_hashes(
    warehouse: DuckDBWarehouse, model: str, dimensions: int, hashes: Sequence[str], batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """(text_hash, vector) for the given hashes that are cached, `batch_rows` hashes per query."""
    for start in range(0, len(hashes), batch_rows):
        chunk = list(hashes[start : start + batch_rows])
        with warehouse.connect(read_only=True) as con:
            page = con.sql(
                """
                SELECT text_hash, vector FROM ops.embedding_cache
                WHERE model = $model AND dimensions = $dimensions AND text_hash IN (SELECT unnest($hashes::VARCHAR[]))
                """,
                params={"model": model, "dimensions": dimensions, "hashes": chunk},
            ).to_arrow_table()
        if page.num_rows:
            yield _with_fixed_vectors(page, dimensions)


VECTOR_FIELD = "vector"


def item_vector_schema(dimensions: int) -> pa.Schema:
    return pa.schema(
        [("item_key", pa.string()), ("text_hash", pa.string()), (VECTOR_FIELD, pa.list_(pa.float32(), dimensions))]
    )


def _vector_table(vectors: Sequence[tuple[str, np.ndarray]], dimensions: int) -> pa.Table:
    hashes = [text_hash for text_hash, _ in vectors]
    flat = np.ascontiguousarray(np.stack([vector for _, vector in vectors]), dtype=np.float32).ravel()
    # from_buffers wraps the numpy memory as is; pa.array() would first import pandas (0.4 s)
    values = pa.Array.from_buffers(pa.float32(), len(flat), [None, pa.py_buffer(flat)])
    return pa.table({"text_hash": hashes, "vector": pa.FixedSizeListArray.from_arrays(values, dimensions)})


def _with_fixed_vectors(table: pa.Table, dimensions: int) -> pa.RecordBatch:
    """Vectors as fixed-size float32 lists, so `.flatten()` reshapes straight into numpy."""
    column = table.column(VECTOR_FIELD).combine_chunks()
    fixed = pa.FixedSizeListArray.from_arrays(column.flatten().cast(pa.float32()), dimensions)
    arrays = [table.column(name).combine_chunks().cast(pa.string()) for name in table.column_names if name != VECTOR_FIELD]
    names = [name for name in table.column_names if name != VECTOR_FIELD]
    return pa.RecordBatch.from_arrays([*arrays, fixed], names=[*names, VECTOR_FIELD])
