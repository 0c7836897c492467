"""Landing files -> raw.* tables: one daily partition per batch, idempotent and atomic.

One asset per source of the registry (assets/common/sources.py). A run covers one day or, as a
single-run backfill (`BackfillPolicy.single_run()`), a range of days; each day is its own batch:
1. the file must exist, be non-empty and readable (else `dg.Failure` naming the path and cause),
   unless the day is closed (`LandingZone.is_closed`) and nothing landed for it: then no file is
   the expected batch, materialized with no records (mark_closed_days);
2. its fingerprint (content hash + hash of the suites + parser version) is compared with the one
   recorded in `ops.batch_fingerprints`: unchanged -> skipped, unless run config `force: true`;
3. the file is read as text with line numbers (assets/ingest/landing_files.py), so a bad line is
   quarantined and never crashes the batch;
4. the suite's rules (assets/validate/rules.py) split staged rows into valid and quarantined;
   Steps 3-4 run in a staging DuckDB of the step's own, under no warehouse lock;
5. one transaction per day, with the warehouse attached under its exclusive lock, replaces the
   partition: delete its rows in the raw tables and in `ops.schema_errors`, insert the new ones,
   upsert the fingerprint. An error anywhere rolls the day back to its previous rows.
A range run lands the days of the range one transaction a day, and reports
one materialization and one result of each check per day. A day of a range without a landing
file has no batch: it is left unmaterialized (a one-day run for it fails instead); if the run
holds steps after this one, Dagster skips them, so the run is then red, naming them.
"""


import datetime as dt
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import numpy as np
import pyarrow as pa
from pydantic import Field

from assets.common.current_state import PII_TAG, register_sources
from assets.common.partitions import daily_partitions, first_partition
from assets.common.range_runs import asset_check_outputs, partition_check_evaluation
from assets.common.sources import SOURCES, Source
from assets.ingest.accounting import BatchCounts, batch_metadata, check_results, check_specs, count_partition, no_records, preview
from assets.ingest.file_shards import Sharding, shard_plan, stage_in_shards
from assets.ingest.landing_files import READERS, Staged, create_from_arrow, line_texts, stage_and_judge
from assets.validate.rules import landed_sql, load_suite
from resources.compute_engine import ComputeEngine
from resources.landing import LandingFileError, LandingZone, checked_encoding, checked_strftime_format
from resources.memory import parse_size
from resources.warehouse import DuckDBWarehouse, fetch_all, rebudget, step_pool, table_exists

# Part of the fingerprint: bump it when files are read differently. 2: bytes read in Python (CR,
# BOM, gzip), CSV columns by name, strict numbers and ISO 8601 timestamps landed in UTC. 3: a line
# over MAX_LINE_BYTES refused wherever it falls (inside a read block it used to be parsed). 4: a
# stray quote refuses its own line only (`unbalanced_quote`); duplicates judged on landed values.
PARSER_VERSION = "4"
HASH_BLOCK_BYTES = 8 << 20


SCHEMA_ERRORS_DDL = """
CREATE TABLE IF NOT EXISTS ops.schema_errors (
    partition_date DATE, source VARCHAR, table_name VARCHAR, record_key VARCHAR, line_no BIGINT,
    rule VARCHAR, column_name VARCHAR, value VARCHAR, raw_record VARCHAR, detected_at TIMESTAMP)"""
FINGERPRINTS_DDL = """
CREATE TABLE IF NOT EXISTS ops.batch_fingerprints (
    source VARCHAR, partition_date DATE, fingerprint VARCHAR, source_path VARCHAR, source_bytes BIGINT,
    input_records BIGINT, valid_records BIGINT, quarantined_records BIGINT, table_counts JSON,
    quarantined_by_rule JSON, landed_at TIMESTAMP, seconds DOUBLE)"""


class IngestionConfig(dg.Config):
    force: bool = Field(default=False, description="Re-ingest even when the source file is unchanged.")
    max_error_rate: float = Field(default=0.05, description="Bad source records / input above this fails the check.")
    min_records_for_error: int = Field(
        default=50, description="A batch smaller than this that breaks max_error_rate fails the check as WARN, "
                                "not ERROR: one bad row in 7 is 14 %, and rarely an outage.")
    preview_rows: int = Field(default=5, description="Rows in the markdown previews.")
    catalog_wait_seconds: float = Field(
        default=300.0, description="raw_customers: how long to wait (by step retries) for earlier catalog days.")


def suites_digest(source: Source) -> str:
    return "+".join(load_suite(t).digest for t in source.table_names)


# ---------------------------------------------------------------------------------------------
# Validation and the partition write
# ---------------------------------------------------------------------------------------------

def ensure_tables(con: duckdb.DuckDBPyConnection, sources: tuple[Source, ...]) -> None:
    """Every raw table of every source, landed or not: the SQL models read them all."""
    con.execute("CREATE SCHEMA IF NOT EXISTS raw; CREATE SCHEMA IF NOT EXISTS ops")
    for table in (t for source in sources for t in source.tables):
        columns = ", ".join(f'"{name}" {kind}' for name, kind in table.columns.items())
        con.execute(f"CREATE TABLE IF NOT EXISTS {table.qualified} (partition_date DATE, line_no BIGINT, {columns})")
    con.execute(SCHEMA_ERRORS_DDL)
    con.execute(FINGERPRINTS_DDL)


def delete_partition(con: duckdb.DuckDBPyConnection, source: Source, partition_date: str) -> None:
    for table in source.tables:
        con.execute(f"DELETE FROM {table.qualified} WHERE partition_date = ?", [partition_date])
    con.execute("DELETE FROM ops.schema_errors WHERE partition_date = ? AND source = ?", [partition_date, source.name])
    con.execute("DELETE FROM ops.batch_fingerprints WHERE partition_date = ? AND source = ?",
                [partition_date, source.name])


def insert_partition(con: duckdb.DuckDBPyConnection, source: Source, partition_date: str) -> None:
    """Valid rows into the raw tables, failures and unparseable lines into ops.schema_errors."""
    for spec in source.tables:
        table = spec.name
        landed = ", ".join(landed_sql(spec, c, source.naive_timezone, source.timestamp_format) for c in spec.columns)
        con.execute(
            f"""INSERT INTO {spec.qualified}
            SELECT $day, line_no, {landed} FROM stg_{table}
            WHERE row_id NOT IN (SELECT row_id FROM failures_{table})""",
            {"day": partition_date},
        )
        con.execute(
            f"""INSERT INTO ops.schema_errors
            SELECT $day, $source, $table, f.record_key, f.line_no, f.rule, f.column_name, f.value,
                   {_raw_record_sql(table)}, now()::TIMESTAMP
            FROM failures_{table} AS f JOIN stg_{table} AS s USING (row_id) ORDER BY f.row_id, f.rule""",
            {"day": partition_date, "source": source.name, "table": table},
        )
    con.execute(
        """INSERT INTO ops.schema_errors
        SELECT $day, $source, $table, NULL, line_no, rule, column_name, NULL, raw_record, now()::TIMESTAMP
        FROM unparseable ORDER BY line_no""",
        {"day": partition_date, "source": source.name, "table": source.table_names[0]},
    )
    if source.reader == "customer_jsonl":
        _fill_customer_raw_records(con, source, partition_date)


def _raw_record_sql(table: str) -> str:
    if table == "customers":
        return "NULL"  # filled from the file afterwards: only quarantined lines are read back
    if table == "customer_purchases":
        return ("json_object('productId', s.product_id, 'amount', s.amount, 'date', s.purchased_at)::VARCHAR")
    return "s.raw_record"


def stage_quarantined_lines(con: duckdb.DuckDBPyConnection, source: Source, path: Path) -> None:
    """The original text of quarantined customer lines, in temp table quarantined_lines: the file
    streams through again and only those lines are kept."""
    wanted = [row[0] for row in fetch_all(con, "SELECT DISTINCT line_no FROM failures_customers ORDER BY 1")]
    found = line_texts(source, path, np.array(wanted, dtype=np.int64)) if wanted else []
    # through Arrow: executemany took 4.7 s for the 12,036 lines of 2M customers
    create_from_arrow(con, "quarantined_lines", pa.table({
        "line_no": pa.array([n for n, _ in found], pa.int64()), "line": pa.array([t for _, t in found], pa.string())}))


def _fill_customer_raw_records(con: duckdb.DuckDBPyConnection, source: Source, partition_date: str) -> None:
    con.execute(
        """UPDATE ops.schema_errors AS e SET raw_record = q.line
        FROM quarantined_lines AS q
        WHERE e.partition_date = $day AND e.source = $source AND e.table_name = 'customers'
          AND e.raw_record IS NULL AND e.line_no = q.line_no""",
        {"day": partition_date, "source": source.name},
    )


def record_fingerprint(con: duckdb.DuckDBPyConnection, source: Source, partition_date: str, fingerprint: str,
                       path: Path, counts: BatchCounts, seconds: float) -> None:
    primary = counts.primary
    con.execute(
        "INSERT INTO ops.batch_fingerprints VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now()::TIMESTAMP, ?)",
        [source.name, partition_date, fingerprint, str(path), path.stat().st_size, primary.input_records,
         primary.valid_records, primary.quarantined_records,
         json.dumps({t: vars(c) for t, c in counts.tables.items()}), json.dumps(primary.by_rule), round(seconds, 3)],
    )


def file_fingerprint(path: Path, source: Source) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK_BYTES):
            digest.update(block)
    read_as = f":tf={source.timestamp_format}" if source.timestamp_format else ""  # another format, other values
    read_as += f":enc={source.encoding}" if source.encoding else ""
    return f"{digest.hexdigest()[:32]}:{suites_digest(source)}:p{PARSER_VERSION}{read_as}"


def land_file(con: duckdb.DuckDBPyConnection, source: Source, sources: tuple[Source, ...], day: str,
              path: Path) -> tuple[BatchCounts, dict[str, Any]]:
    """Stage, judge and write one file as the day's partition of the source, inside the caller's
    transaction (any DuckDB connection: the evaluation lands Online Retail in a scratch one).
    Returns the batch's counts and notes on how the file was read."""
    ensure_tables(con, sources)
    staged = stage_file(con, source, day, path)
    return write_partition(con, source, sources, day, staged), staged.notes


def stage_file(con: duckdb.DuckDBPyConnection, source: Source, day: str, path: Path,
               sharding: Sharding | None = None, catalogs: list[str] | None = None) -> Staged:
    """Read and judge one file into the connection's temp tables (stg_*, failures_*, unparseable).
    Writes nothing to any database table: a step runs it with the warehouse detached. With
    `sharding`, a large file is read and judged in shards on the engine (file_shards.py)."""
    ranges = shard_plan(source, path, sharding.shard_bytes) if sharding else None
    if ranges:
        staged = stage_in_shards(con, source, path, day, ranges, sharding, catalogs or [])
    else:
        staged = stage_and_judge(con, source, day, path)
    if source.reader == "customer_jsonl":
        stage_quarantined_lines(con, source, path)
    rebudget(con)  # the reader's Python side grew since the connection opened: DuckDB gets what is left
    return staged


def write_partition(con: duckdb.DuckDBPyConnection, source: Source, sources: tuple[Source, ...], day: str,
                    staged: Staged) -> BatchCounts:
    """Replace the day's partition with the staged rows, inside the caller's transaction."""
    ensure_tables(con, sources)
    delete_partition(con, source, day)
    insert_partition(con, source, day)
    return count_partition(con, source, day, staged.inputs)


def copy_catalogs(con: duckdb.DuckDBPyConnection, warehouse: DuckDBWarehouse, source: Source,
                  sources: tuple[Source, ...], day: str) -> None:
    """The landed rows (up to the day) of the sources this one is judged against (its `deps`:
    customers against the product catalog), copied into the staging connection under a short read
    lock, where the suite's rules find them by the same names."""
    ensure_tables(con, sources)
    catalogs = catalog_tables(source, sources)
    if not catalogs:
        return
    with warehouse.attached(con, read_only=True):
        for table in catalogs:
            con.execute(f"DELETE FROM memory.{table}")
            if table_exists(con, table, catalog="warehouse"):
                con.execute(f"INSERT INTO memory.{table} BY NAME SELECT * FROM {table} WHERE partition_date <= ?", [day])


def catalog_tables(source: Source, sources: tuple[Source, ...]) -> list[str]:
    """The raw tables of the sources this one is judged against."""
    return [t.qualified for s in sources if s.asset in source.deps for t in s.tables]


# ---------------------------------------------------------------------------------------------
# The catalog a source is judged against, and what already landed
# ---------------------------------------------------------------------------------------------

CATALOG_RETRY_SECONDS = 5.0


def catalog_digests(context: dg.AssetExecutionContext, warehouse: DuckDBWarehouse, landing: LandingZone,
                    catalog: Source, days: list[str], timeout_seconds: float) -> dict[str, str]:
    """A digest of the batches of `catalog` (a source this one is judged against) up to each day,
    once every day up to the last one that has a landing file has landed. In a backfill launched
    at once, customers of day 5 must not be judged against a catalog whose day 1 is still landing.

    It does not sleep in the step: that would hold the `duckdb` pool's only slot, which the
    missing day's raw_products needs, and both would stall until the timeout. It asks Dagster
    for a retry instead; a step up for retry gives its slot back while it waits."""
    last = max(days)
    # files of days before the first partition are no partition: they never land
    expected = set(landing.days_available(catalog.name, last, catalog.landing_pattern, since=first_partition(context)))
    landed = landed_batches(warehouse, catalog.name, last)
    missing = sorted(expected - set(landed))
    if not missing:
        return {day: catalog_digest(landed, day) for day in days}
    interval = min(CATALOG_RETRY_SECONDS, max(timeout_seconds / 4, 0.05))
    shown = f"{missing[:5]}{' ...' if len(missing) > 5 else ''}"
    if context.retry_number * interval >= timeout_seconds:
        raise dg.Failure(
            description=f"the catalog ({catalog.name}) of {shown} has not landed after {timeout_seconds:.0f}s: "
            f"materialize {catalog.asset} for those days first",
            metadata={"missing_catalog_days": missing})
    context.log.info(f"{catalog.name} of {len(missing)} earlier day(s) has not landed yet: {shown}; "
                     f"retrying in {interval:.1f}s (the pool slot is free meanwhile)")
    raise dg.RetryRequested(max_retries=int(timeout_seconds / interval) + 2, seconds_to_wait=interval)


def catalog_digest(landed: dict[str, str], day: str) -> str:
    """A digest of a catalog's batches ({day: fingerprint}) up to a day: part of the fingerprint
    of a batch judged against it."""
    return hashlib.sha256(json.dumps(sorted((d, f) for d, f in landed.items() if d <= day)).encode()).hexdigest()[:16]


def landed_batches(warehouse: DuckDBWarehouse, source: str, until: str) -> dict[str, str]:
    """{day: fingerprint} of the source's batches up to a day."""
    with warehouse.connect(read_only=True) as con:
        if not table_exists(con, "ops.batch_fingerprints"):
            return {}
        rows = fetch_all(con, """SELECT partition_date::VARCHAR, fingerprint FROM ops.batch_fingerprints
                                 WHERE source = ? AND partition_date <= ?""", [source, until])
    return dict(rows)


def stored_batches(warehouse: DuckDBWarehouse, source: Source, days: list[str]) -> dict[str, dict[str, Any]]:
    """{day: fingerprint, inputs per table, landed_at} of the batches of some days, in one query."""
    with warehouse.connect(read_only=True) as con:
        if not table_exists(con, "ops.batch_fingerprints"):
            return {}
        rows = fetch_all(
            con, """SELECT partition_date::VARCHAR, fingerprint, table_counts, landed_at FROM ops.batch_fingerprints
            WHERE source = ? AND list_contains(?, partition_date::VARCHAR)""", [source.name, days])
    return {day: {"fingerprint": fingerprint, "landed_at": landed_at,
                  "inputs": {t: c["input_records"] for t, c in json.loads(table_counts).items()}}
            for day, fingerprint, table_counts, landed_at in rows}


# ---------------------------------------------------------------------------------------------
# The asset body shared by the sources: one day, or each day of a range
# ---------------------------------------------------------------------------------------------

@dataclass
class Day:
    """One partition of a run: its file, fingerprint and stored batch, then what came of it."""

    day: str
    path: Path | None = None
    problem: LandingFileError | None = None  # no file, or a file that cannot be read
    fingerprint: str = ""
    stored: dict[str, Any] | None = None
    counts: BatchCounts | None = None
    skipped: bool = False
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)
    preview: str | None = None
    closed: str = ""  # why no file comes this day (LandingZone.closed_weekdays / closed_days); then nothing lands

    @property
    def has_no_file(self) -> bool:
        return self.problem is not None and self.problem.cause.startswith("missing")


def plan_days(context: dg.AssetExecutionContext, config: IngestionConfig, source: Source,
              sources: tuple[Source, ...], warehouse: DuckDBWarehouse, landing: LandingZone) -> list[Day]:
    days = [Day(key) for key in context.partition_keys]
    for day in days:
        try:
            day.path = landing.require(source.name, day.day, source.landing_pattern)
        except LandingFileError as error:
            day.problem = error
    closed = [d for d in days if missing_on_a_closed_day(landing, d.problem, d.day)]
    present = [d for d in days if d.path is not None]
    for catalog in (s for s in sources if s.asset in source.deps):
        # Records are judged against the catalog up to the day (unknown products): a new catalog means new results.
        digests = catalog_digests(context, warehouse, landing, catalog, [d.day for d in days],
                                  config.catalog_wait_seconds) if present else {}
        for day in present:
            day.fingerprint += f":{catalog.name}=" + digests[day.day]
    looked_up = [d.day for d in present + closed]
    stored = stored_batches(warehouse, source, looked_up) if looked_up else {}
    mark_closed_days(closed, source, landing, stored)
    for day in present:
        day.fingerprint = file_fingerprint(day.path, source) + day.fingerprint
        day.stored = stored.get(day.day)
        day.skipped = bool(day.stored and day.stored["fingerprint"] == day.fingerprint and not config.force)
    return days


def as_written(source: Source, landing: LandingZone) -> Source:
    """The source as this deployment's files write it: its timestamp format and text encoding,
    when the landing zone sets them (the fingerprint holds both: read another way, other values)."""
    written, encoding = landing.timestamp_formats.get(source.name), landing.encodings.get(source.name)
    return replace(source, timestamp_format=checked_strftime_format(written) if written else source.timestamp_format,
                   encoding=checked_encoding(encoding) if encoding else source.encoding)


CLOSED_FINGERPRINT = "closed"


def missing_on_a_closed_day(landing: LandingZone, problem: LandingFileError | None, day: str) -> bool:
    """No file, on a day the landing zone calls closed (whether anything landed is the caller's to ask)."""
    return problem is not None and problem.cause.startswith("missing") and landing.is_closed(day)


def mark_closed_days(closed: list[Day], source: Source, landing: LandingZone, stored: dict[str, Any]) -> None:
    """A closed day without a file lands nothing: it is materialized with no records, its checks
    pass on none, and the stages after it run. A closed day whose file landed before (`stored`)
    is still a missing file: its batch in the warehouse would be unexplained."""
    for day in closed:
        if day.day not in stored:
            day.closed = closed_day_note(landing, source, day.day, day.problem.path)
            day.problem, day.fingerprint, day.counts = None, CLOSED_FINGERPRINT, no_records(source)


def closed_day_note(landing: LandingZone, source: Source, day: str, path: Path) -> str:
    why = "listed in closed_days" if day in landing.closed_days else f"no files on {dt.date.fromisoformat(day):%A}s"
    return f"a closed day ({why}): no {source.name} file expected at {path}, and none has landed"


@contextmanager
def _transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    con.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


@contextmanager
def file_sharding(engine: ComputeEngine, warehouse: DuckDBWarehouse, source: Source) -> Iterator[Sharding | None]:
    """How this step cuts large files (None: it reads them whole): shards of ingest_shard_mb on the
    engine, their Parquet in a folder beside the warehouse, removed at the end."""
    if engine.ingest_shard_mb <= 0:
        yield None
        return
    limit = parse_size(warehouse.connection_memory_limit())
    per_shard = limit if engine.distributed else limit // 2  # threads: two shards at a time in the step
    work_dir = Path(tempfile.mkdtemp(prefix=f".shards-{source.name}-", dir=warehouse.file.parent))
    try:
        yield Sharding(engine, engine.ingest_shard_mb << 20, work_dir, f"{per_shard >> 20}MiB")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def land_days(context: dg.AssetExecutionContext, config: IngestionConfig, source: Source,
              sources: tuple[Source, ...], warehouse: DuckDBWarehouse, days: list[Day],
              engine: ComputeEngine) -> None:
    """Each changed day: its file read and judged in a staging DuckDB under no lock (at 20M
    customers that is 12 minutes; in shards on the engine when configured), then written in one
    transaction with the warehouse attached under its exclusive lock; then the skipped days'
    stored counts."""
    changed = [d for d in days if d.path is not None and not d.skipped]
    if changed:
        with warehouse.staging() as con, file_sharding(engine, warehouse, source) as sharding:
            for day in changed:
                started = time.perf_counter()
                try:
                    copy_catalogs(con, warehouse, source, sources, day.day)
                    staged = stage_file(con, source, day.day, day.path,
                                        replace(sharding, work_dir=sharding.work_dir / day.day) if sharding else None,
                                        catalog_tables(source, sources))
                    with warehouse.attached(con), _transaction(con):
                        day.counts = write_partition(con, source, sources, day.day, staged)
                        day.notes, day.seconds = staged.notes, time.perf_counter() - started
                        record_fingerprint(con, source, day.day, day.fingerprint, day.path, day.counts, day.seconds)
                        day.preview = preview(con, source, day.day, day.counts, config.preview_rows)
                except (LandingFileError, OSError) as error:
                    day.problem = error if isinstance(error, LandingFileError) else \
                        LandingFileError(source.name, day.path, f"unreadable ({error})")
                    continue
                context.log.info(f"landed {source.name} {day.day} from {day.path} in {day.seconds:.1f}s: " + "; ".join(
                    f"{t} {c.valid_records} valid, {c.quarantined_records} quarantined" for t, c in day.counts.tables.items()))
    skipped = [d for d in days if d.skipped]
    if skipped:
        with warehouse.connect(read_only=True) as con:
            for day in skipped:
                day.counts = count_partition(con, source, day.day, day.stored["inputs"])
                context.log.info(f"skipped {source.name} {day.day}: {day.path} unchanged since "
                                 f"{day.stored['landed_at']} ({day.fingerprint})")


def ingest(context: dg.AssetExecutionContext, config: IngestionConfig, source: Source, sources: tuple[Source, ...],
           warehouse: DuckDBWarehouse, landing: LandingZone, engine: ComputeEngine) -> Iterator[Any]:
    """Lands each day of the run. A breach of the error rate is the error_rate check's to report:
    the check-failure sensor turns it into one incident, resolved when the day passes again."""
    started = time.perf_counter()
    source = as_written(source, landing)
    days = plan_days(context, config, source, sources, warehouse, landing)
    one_day = context.has_partition_key  # a one-partition run; otherwise a range (single-run backfill)
    if one_day and days[0].problem:
        raise _failure(days[0].problem)
    land_days(context, config, source, sources, warehouse, days, engine)
    if one_day:
        if days[0].problem:
            raise _failure(days[0].problem)
        day = days[0]
        metadata = _day_metadata(source, day, time.perf_counter() - started)
        yield dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(day.fingerprint),
                                   check_results=check_results(source, day.counts, config.max_error_rate,
                                                                 config.min_records_for_error))
        return
    yield from _range_events(context, config, source, days)


def _failure(problem: LandingFileError) -> dg.Failure:
    return dg.Failure(description=str(problem), metadata={"path": str(problem.path), "cause": problem.cause})


def _day_metadata(source: Source, day: Day, seconds: float) -> dict[str, Any]:
    metadata = batch_metadata(source, day.day, day.path, day.fingerprint, day.counts, seconds, day.skipped)
    if day.closed:
        metadata.pop("source_path")  # there is none
        metadata["closed_day"] = day.closed
    elif day.skipped:
        metadata["skip_reason"] = f"source unchanged since {day.stored['landed_at']}"
    else:
        metadata["read_as"] = {k: v for k, v in day.notes.items() if v not in (None, False, 0)}
        metadata["preview"] = dg.MetadataValue.md(day.preview or "")
    return metadata


def _range_events(context: dg.AssetExecutionContext, config: IngestionConfig, source: Source,
                  days: list[Day]) -> Iterator[Any]:
    """One materialization and one result of each check per landed day of the range.

    When every day landed, one MaterializeResult carries each day's metadata (downstream assets of
    the run go on). When some day had no file, only the landed days are materialized, one event
    each: a MaterializeResult would mark the whole range materialized."""
    landed = [d for d in days if d.counts is not None]
    unreadable = [d for d in days if d.problem is not None and not d.has_no_file]
    without_file = [d.day for d in days if d.has_no_file]
    if without_file:
        context.log.warning(f"{len(without_file)} day(s) of the range have no {source.name} file and stay "
                            f"unmaterialized: {without_file[:10]}{' ...' if len(without_file) > 10 else ''}")
    for day in landed:
        metadata = _day_metadata(source, day, day.seconds)
        if without_file or unreadable:
            yield dg.AssetMaterialization(asset_key=source.asset, partition=day.day, metadata=metadata)
        else:
            context.add_asset_metadata(metadata, partition_key=day.day)
    if not (without_file or unreadable):
        yield dg.MaterializeResult(metadata={"days_in_run": len(days),
                                             "days_skipped": sum(d.skipped for d in days)})
    blocking = {spec.name: spec.blocking for spec in check_specs(source.asset)}
    for day in landed:
        for result in check_results(source, day.counts, config.max_error_rate, config.min_records_for_error):
            yield partition_check_evaluation(context.instance, result, source.asset, result.check_name, day.day,
                                             blocking[result.check_name])
    yield from asset_check_outputs(context)
    waiting = steps_waiting_on(context) if without_file else []
    if unreadable or waiting:
        raise range_failure(source, landed, unreadable, without_file, waiting)


def steps_waiting_on(context: dg.AssetExecutionContext) -> list[str]:
    """The run's steps that take this asset's output (the stages after it, a separate check):
    Dagster skips them when the step yields none."""
    downstream = context.job_def.graph.dependency_structure.output_to_downstream_inputs_for_node(
        context.op_handle.name)
    return sorted({node_input.node.name for inputs in downstream.values() for node_input in inputs})


def range_failure(source: Source, landed: list[Day], unreadable: list[Day], without_file: list[str],
                  waiting: list[str]) -> dg.Failure:
    """A range with days that did not land yields no output (it would mark every day of the range
    materialized), so the run's steps after ingestion are skipped: the run is red then, not a green
    that says the range was processed. (Without such steps, days without a file are only logged:
    a shop closed on Sundays has none.)"""
    problems = []
    if unreadable:
        problems.append(f"{len(unreadable)} day(s) of the range could not be read: "
                        + " | ".join(str(d.problem) for d in unreadable[:5]))
    if without_file:
        more = f" and {len(without_file) - 10} more" if len(without_file) > 10 else ""
        problems.append(f"{len(without_file)} day(s) of the range have no {source.name} file: {without_file[:10]}{more}")
    skipped = f"; so {', '.join(waiting)} did not run" if waiting else ""
    last = (f". Run the range's last landed day ({landed[-1].day}) alone to build what comes after ingestion "
            "from every landed day, or mend the files and run the range again") if landed else ""
    return dg.Failure(
        description=f"{'; '.join(problems)}. The {len(landed)} other day(s) landed and are materialized one by one"
                    + skipped + last + ".",
        metadata={"days": [d.day for d in unreadable] + without_file, "landed_days": len(landed),
                  "steps_not_run": waiting},
        allow_retries=False)


def ingestion_asset(source: Source, sources: tuple[Source, ...]) -> dg.AssetsDefinition:
    if source.reader not in READERS:
        raise ValueError(f"source {source.name!r}: unknown reader {source.reader!r}; known: {sorted(READERS)}")

    @dg.asset(
        name=source.asset,
        partitions_def=daily_partitions,
        # A backfill of many days is one run per range; the body lands each day as its own batch.
        backfill_policy=dg.BackfillPolicy.single_run(),
        # A range with days that have no file materializes the landed days one by one (see _range_events).
        output_required=False,
        **step_pool(),
        deps=list(source.deps),
        check_specs=check_specs(source.asset),
        kinds={"duckdb"},
        group_name="ingest",
        description=source.description,
        metadata={"tables": [t.qualified for t in source.tables]},
        tags=PII_TAG if any(t.personal for t in source.tables) else None,
    )
    def _asset(context: dg.AssetExecutionContext, config: IngestionConfig, warehouse: DuckDBWarehouse,
               landing: LandingZone, compute_engine: ComputeEngine) -> Iterator[Any]:
        yield from ingest(context, config, source, sources, warehouse, landing, compute_engine)

    return _asset


def build_ingestion_assets(sources: tuple[Source, ...] = SOURCES) -> list[dg.AssetsDefinition]:
    register_sources(sources)
    return [ingestion_asset(source, sources) for source in sources]
