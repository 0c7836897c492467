"""Landing files -> the raw layer on the lakehouse (Iceberg tables): no DuckDB warehouse, no lock.

    batch = land_on_lakehouse(lakehouse, source, day, path)     # -> LakehouseBatch
    build_lakehouse_ingestion_assets()                           # lake_raw_<source>, daily partitions

The file is staged, judged and written exactly as the warehouse path does it (`land_file`), but
into a private in-memory DuckDB; then each table's share of the day goes to its Iceberg table as
one partition overwrite: the source's raw tables (the day), `ops.schema_errors` (the day's rows of
this source), and last `ops.batch_fingerprints` (the batch's row), whose fingerprint is the
batch's commit marker. Iceberg commits one table at a time: a writer that dies before the marker
leaves none, so the day is not skipped and its next run replaces every table again (an overwrite
never adds rows). The rules that look up another source (a customer's products) read that
source's Iceberg table up to the day, so land the catalog's days first, as the assets' deps do;
as in the warehouse, a batch's fingerprint includes a digest of that catalog's batches up to the
day, so a changed catalog makes the day land again.
Processes landing other days (or other sources) race only on the catalog's commits.

The assets `lake_raw_<source>` (group `lakehouse`, defined when a lakehouse is configured) run it
per partition, without the `duckdb` pool: a backfill lands its days in as many runs at once as
the run queue allows. The SQL models follow on the lakehouse (assets/transform/lakehouse_models.py);
the AI stages still read the DuckDB warehouse, which the `raw_*` assets fill.
"""


import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from assets.common.partitions import daily_partitions, first_partition
from assets.common.sources import SOURCES, Source
from assets.ingest.accounting import BatchCounts, TableCounts, check_results, check_specs, no_records
from assets.ingest.raw_assets import (
    CLOSED_FINGERPRINT,
    IngestionConfig,
    as_written,
    catalog_digest,
    catalog_tables,
    closed_day_note,
    ensure_tables,
    file_fingerprint,
    land_file,
    missing_on_a_closed_day,
    record_fingerprint,
)
from resources.lakehouse import PARTITION_COLUMN, Lakehouse, Written
from resources.landing import LandingFileError, LandingZone
from resources.memory import budgeted_memory_limit
from resources.warehouse import rebudget_within

MARKER_TABLE = "ops.batch_fingerprints"  # written last: its row says the batch landed whole
SHARED_TABLES = ("ops.schema_errors",)  # one table for every source: written per (day, source)
MIN_MEMORY_LIMIT = "256MiB"  # the warehouse's min_memory_limit
WRITE_BATCH_ROWS = 500_000  # rows a data file holds at most when Arrow writes a table to the lakehouse
# HUGEINT (a SQL sum of integers): Parquet and Arrow have no 128-bit integer. Unsigned integers
# (UBIGINT: a hash): Iceberg has none, so the next wider signed type. JSON: text (DuckDB's Parquet
# marks it JSON, whose statistics pyiceberg cannot read as a string column's).
STORED_AS = {"HUGEINT": "DECIMAL(38, 0)", "UBIGINT": "DECIMAL(20, 0)", "UINTEGER": "BIGINT", "USMALLINT": "INTEGER",
             "UTINYINT": "SMALLINT", "JSON": "VARCHAR"}


@dataclass(frozen=True)
class LakehouseBatch:
    source: str
    day: str
    skipped: bool  # the marker holds this file's fingerprint: nothing was written
    rows: dict[str, int]  # rows written per table
    commit_attempts: int  # more than one per table: other writers won races first
    seconds: float
    counts: BatchCounts  # of the batch that landed (on a skip: as its marker stored them)


def staging_memory_limit(con: duckdb.DuckDBPyConnection | None = None) -> str | None:
    """DuckDB's memory_limit for a lakehouse step's private DuckDB, by the warehouse's rule:
    DUCKDB_MEMORY_LIMIT, within STEP_MEMORY_BUDGET beside what the process holds now. With `con`:
    set again on it, beside what the process holds besides its buffers (rebudget)."""
    from resources import step_memory_budget

    cap, budget = os.getenv("DUCKDB_MEMORY_LIMIT", "1GB"), step_memory_budget()
    if con is not None:
        return rebudget_within(con, cap, budget, MIN_MEMORY_LIMIT)
    return budgeted_memory_limit(cap, budget, MIN_MEMORY_LIMIT)


def land_on_lakehouse(lakehouse: Lakehouse, source: Source, day: str, path: Path,
                      sources: tuple[Source, ...] = SOURCES, force: bool = False,
                      memory_limit: str | None = None) -> LakehouseBatch:
    """One file as the day's partition of the source on the lakehouse (skipped when its batch
    marker holds the file's fingerprint, unless `force`)."""
    started = time.perf_counter()
    fingerprint = file_fingerprint(path, source) + _catalog_fingerprints(lakehouse, source, sources, day)
    keys = {"source": source.name}
    if not force and lakehouse.day_fingerprint(MARKER_TABLE, day, keys) == fingerprint:
        return LakehouseBatch(source.name, day, True, {}, 0, time.perf_counter() - started,
                              stored_counts(lakehouse, source, day))
    with tempfile.TemporaryDirectory(prefix="lake-landing-") as spill, \
            duckdb.connect(config={"memory_limit": memory_limit or staging_memory_limit(), "temp_directory": spill}) as con:
        ensure_tables(con, sources)
        _load_catalogs(con, lakehouse, source, sources, day)
        counts, _ = land_file(con, source, sources, day, path)
        record_fingerprint(con, source, day, fingerprint, path, counts, time.perf_counter() - started)
        if memory_limit is None:
            staging_memory_limit(con)  # the parse grew the Python side; the writes' chunks come next
        tables = [t.qualified for t in source.tables] + list(SHARED_TABLES) + [MARKER_TABLE]
        rows, attempts = {}, 0
        for table in tables:  # the marker last
            shared = table in SHARED_TABLES or table == MARKER_TABLE
            query = f"SELECT * FROM {table} WHERE partition_date = $day" + (" AND source = $source" if shared else "")
            params = {"day": day, "source": source.name} if shared else {"day": day}
            written = write_query(lakehouse, con, table, day, query, params, fingerprint, keys if shared else None)
            rows[table], attempts = written.rows, attempts + written.attempts
    return LakehouseBatch(source.name, day, False, rows, attempts, time.perf_counter() - started, counts)


def stored_counts(lakehouse: Lakehouse, source: Source, day: str) -> BatchCounts:
    """A landed batch's counts as its marker row stored them (per table, from count_partition at
    landing), and its bad records counted again from the day's errors of the source: a skip
    reports the verdicts of what landed, never a fresh pass."""
    of_source = {"source": source.name}
    [marker] = lakehouse.read_day(MARKER_TABLE, day, of_source, ("table_counts",)).to_pylist()
    tables = {name: TableCounts(**counts) for name, counts in json.loads(marker["table_counts"]).items()}
    bad_lines = lakehouse.read_day("ops.schema_errors", day, of_source, ("line_no",))["line_no"]
    return BatchCounts(tables, pc.count_distinct(bad_lines).as_py())


def write_query(lakehouse: Lakehouse, con: duckdb.DuckDBPyConnection, table: str, day: str, query: str,
                params: dict, fingerprint: str, keys: dict[str, str] | None = None) -> Written:
    """A query's rows as the day of an Iceberg table, in one commit. On a local location DuckDB
    writes the Parquet files itself (within its memory limit) and pyiceberg adds them; elsewhere
    (S3) the rows go through Arrow in chunks of WRITE_BATCH_ROWS. Types Iceberg does not have are
    stored as STORED_AS says, either way."""
    relation = con.sql(query, params=params or None)
    query = "SELECT " + ", ".join(f'"{c}"::{STORED_AS[str(t)]} AS "{c}"' if str(t) in STORED_AS else f'"{c}"'
                                  for c, t in zip(relation.columns, relation.types)) + f" FROM ({query})"
    schema = con.sql(f"{query} LIMIT 0", params=params or None).to_arrow_table().schema
    if lakehouse.writes_local_files:
        def write(folder: Path) -> int:
            copy = (f"COPY (SELECT *, $partition_day AS {PARTITION_COLUMN} FROM ({query})) "
                    f"TO '{folder / 'data_0.parquet'}' (FORMAT parquet, COMPRESSION zstd)")  # our folder; pyiceberg's codec
            # One file a write: with FILE_SIZE_BYTES, duckdb 2.0.1 moves row groups out of the
            # query's order (8 places in stg_purchases at 2M), and a model's stored order (the
            # purchases by customer, which segments read in order) is part of its contract.
            return int(con.execute(copy, {**params, "partition_day": day}).fetchall()[0][0])

        return lakehouse.write_day_files(table, day, write, fingerprint, schema, keys)

    def chunks():
        for batch in con.sql(query, params=params or None).fetch_record_batch(WRITE_BATCH_ROWS):  # the SQL is ours
            yield pa.Table.from_batches([batch])

    return lakehouse.write_day(table, day, chunks, fingerprint, schema=schema, keys=keys)


def landed_days(lakehouse: Lakehouse, source: str, day: str) -> dict[str, str]:
    """{day: fingerprint} of the source's batches on the lakehouse up to a day (their markers)."""
    reader = lakehouse.read_through(MARKER_TABLE, day, where={"source": source})
    if reader is None:
        return {}
    rows = reader.read_all()  # a row a batch: small
    return {str(d): f for d, f in zip(rows["partition_date"].to_pylist(), rows["fingerprint"].to_pylist())}


def _catalog_fingerprints(lakehouse: Lakehouse, source: Source, sources: tuple[Source, ...], day: str) -> str:
    """What the warehouse path adds to a batch's fingerprint for each catalog it is judged against
    (plan_days): a digest of that catalog's batches up to the day, from their markers."""
    return "".join(f":{catalog.name}=" + catalog_digest(landed_days(lakehouse, catalog.name, day), day)
                   for catalog in sources if catalog.asset in source.deps)


def _load_catalogs(con: duckdb.DuckDBPyConnection, lakehouse: Lakehouse, source: Source,
                   sources: tuple[Source, ...], day: str) -> None:
    """The landed rows (up to the day) of the sources this one is judged against, from the
    lakehouse into the staging DuckDB's tables of the same names (copy_catalogs' lakehouse twin)."""
    for table in catalog_tables(source, sources):
        insert_from_lakehouse(con, lakehouse, table, day)


def insert_from_lakehouse(con: duckdb.DuckDBPyConnection, lakehouse: Lakehouse, table: str, day: str,
                          day_only: bool = False, select: str = f"* EXCLUDE ({PARTITION_COLUMN})",
                          where: str = "TRUE", params: dict | None = None) -> None:
    """The rows of an Iceberg table's days up to `day` (`day_only`: of that day) appended to the
    DuckDB table of the same name (by column name, without the partition column; `select` and
    `where` may cast and filter them). DuckDB reads the data files the scan plans when they are
    local Parquet without deletes (within its memory limit: at 2M customers the Arrow batches of
    pyiceberg's reader held 800 MB more); otherwise Arrow batches."""
    files = lakehouse.local_files_through(table, day, day_only)
    params = {"day": day, **(params or {})}
    days = f"{PARTITION_COLUMN} {'=' if day_only else '<='} $day"
    if files is not None:
        if files:
            con.execute(f"""INSERT INTO {table} BY NAME SELECT {select}
                            FROM read_parquet($files, union_by_name = true) WHERE {days} AND ({where})""",
                        {"files": files, **params})  # names and filters from code
        return
    reader = lakehouse.read_through(table, day, day_only)
    if reader is None:
        return
    con.register("lake_rows", reader)
    try:
        con.execute(f"INSERT INTO {table} BY NAME SELECT {select} FROM lake_rows WHERE {days} AND ({where})",
                    params)  # names and filters from code
    finally:
        con.unregister("lake_rows")


# ---------------------------------------------------------------------------------------------
# Assets: lake_raw_<source>
# ---------------------------------------------------------------------------------------------

CATALOG_RETRY_SECONDS = 5.0
LAKEHOUSE_GROUP = "lakehouse"


class LakeModelsConfig(dg.Config):
    force: bool = False  # build again even when the models' fingerprint is the day's marker
    catalog_wait_seconds: float = 600.0  # how long a day waits for the earlier days it reads


def lake_asset_name(source: Source) -> str:
    return f"lake_{source.asset}"


def wait_for_landed_days(context: dg.AssetExecutionContext, config: IngestionConfig | LakeModelsConfig, lakehouse: Lakehouse,
                         landing: LandingZone, sources: list[Source], day: str) -> None:
    """Every day of these sources that has a file up to the day must have landed on the lakehouse
    first (a backfill runs days at once): else a retry, whose wait holds no slot, and in the end a
    failure naming the days."""
    first = first_partition(context)  # files of earlier days are no partition: they never land
    for source in sources:
        missing = sorted(set(landing.days_available(source.name, day, source.landing_pattern, since=first))
                         - set(landed_days(lakehouse, source.name, day)))
        if not missing:
            continue
        if context.retry_number * CATALOG_RETRY_SECONDS >= config.catalog_wait_seconds:
            raise dg.Failure(f"the {source.name} of {missing[:5]} has not landed on the lakehouse after "
                             f"{config.catalog_wait_seconds:.0f}s: materialize {lake_asset_name(source)} for those days",
                             metadata={"missing_days": missing})
        context.log.info(f"{source.name} of {len(missing)} day(s) up to {day} not landed yet; retrying")
        raise dg.RetryRequested(max_retries=int(config.catalog_wait_seconds / CATALOG_RETRY_SECONDS) + 2,
                                seconds_to_wait=CATALOG_RETRY_SECONDS)


def lakehouse_ingestion_asset(source: Source, sources: tuple[Source, ...]) -> dg.AssetsDefinition:
    by_asset = {s.asset: s for s in sources}

    @dg.asset(
        name=lake_asset_name(source),
        partitions_def=daily_partitions,
        deps=[lake_asset_name(by_asset[d]) for d in source.deps if d in by_asset],
        kinds={"iceberg"},
        group_name=LAKEHOUSE_GROUP,
        description=f"The day's {source.name} file landed on the lakehouse: "
                    + ", ".join(t.qualified for t in source.tables) + " and its errors, as Iceberg partitions "
                    "(no DuckDB warehouse, no lock).",
        tags={"pii": "true"} if any(t.personal for t in source.tables) else None,
        check_specs=check_specs(lake_asset_name(source)),  # the warehouse's: record accounting (blocking), error rate
    )
    def _asset(context: dg.AssetExecutionContext, config: IngestionConfig, lakehouse: Lakehouse,
               landing: LandingZone) -> dg.MaterializeResult:
        day, written = context.partition_key, as_written(source, landing)
        try:
            path = landing.require(source.name, day, source.landing_pattern)
        except LandingFileError as error:
            if not (missing_on_a_closed_day(landing, error, day) and day not in landed_days(lakehouse, source.name, day)):
                raise dg.Failure(str(error), allow_retries=False) from None
            return closed_day_result(source, closed_day_note(landing, source, day, error.path), config)
        try:
            wait_for_landed_days(context, config, lakehouse, landing, [s for s in sources if s.asset in source.deps], day)
            batch = land_on_lakehouse(lakehouse, written, day, path, sources, force=config.force)
        except LandingFileError as error:
            raise dg.Failure(str(error), allow_retries=False) from None
        context.log.info(f"{source.name} {day}: " + ("skipped (the marker holds this file)" if batch.skipped else
                         ", ".join(f"{t} {n:,} rows" for t, n in batch.rows.items())))
        return dg.MaterializeResult(
            metadata={
                "skipped": batch.skipped,
                "rows": batch.rows,  # written now: none on a skip
                "input_records": batch.counts.primary.input_records,
                "valid_records": batch.counts.primary.valid_records,
                "quarantined_records": batch.counts.primary.quarantined_records,
                **batch.counts.rates,
                "dagster/row_count": batch.counts.primary.valid_records,
                "commit_attempts": batch.commit_attempts,
                "seconds": round(batch.seconds, 2),
            },
            check_results=check_results(source, batch.counts, config.max_error_rate, config.min_records_for_error,
                                        asset=lake_asset_name(source)))

    return _asset


def closed_day_result(source: Source, note: str, config: IngestionConfig) -> dg.MaterializeResult:
    """A closed day (LandingZone.is_closed) without a file, of which nothing landed: no records, as
    on the warehouse (raw_assets.mark_closed_days)."""
    counts = no_records(source)
    return dg.MaterializeResult(
        metadata={"closed_day": note,
                  "skipped": False, "rows": {}, "input_records": 0, "valid_records": 0, "quarantined_records": 0,
                  **counts.rates, "dagster/row_count": 0},
        data_version=dg.DataVersion(CLOSED_FINGERPRINT),
        check_results=check_results(source, counts, config.max_error_rate, config.min_records_for_error,
                                    asset=lake_asset_name(source)))


def build_lakehouse_ingestion_assets(sources: tuple[Source, ...] = SOURCES) -> list[dg.AssetsDefinition]:
    return [lakehouse_ingestion_asset(source, sources) for source in sources]


def build_lakehouse_pipeline(serving_asset: str, serves: bool, not_received: list[str] | None = None):
    """The day on the lakehouse (Iceberg), no warehouse lock: backfill many days at once. On the
    warehouse backend the lake does not serve (the warehouse publishes the served table), so the
    job is a trial of every other stage and leaves out `serving_asset`, which would refuse to build:
    its green then means every stage it runs built. `not_received`: the lake ingestion assets of
    sources the deployment never receives (PIPELINE_SOURCES), left out as in the daily job."""
    description = ("The day's landing files -> every stage on the lakehouse (Iceberg), no warehouse lock: "
                   "backfill many days at once.")
    selection = dg.AssetSelection.groups(LAKEHOUSE_GROUP) - dg.AssetSelection.assets(*(not_received or []))
    if not serves:
        selection -= dg.AssetSelection.assets(serving_asset)
        description += (f" A trial on the warehouse backend: {serving_asset} is left out (the warehouse "
                        "publishes the served table); PIPELINE_BACKEND=lakehouse runs it too.")
    return dg.define_asset_job("lakehouse_pipeline", selection=selection, partitions_def=daily_partitions,
                               description=description)
