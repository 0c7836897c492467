"""Landing files -> raw.* tables: one daily partition per batch, idempotent and atomic.

One asset per source of the registry (assets/common/sources.py). For each source and day:
1. the file must exist, be non-empty and readable (else `dg.Failure` naming the path and cause);
2. its fingerprint (content hash + hash of the suites + parser version) is compared with the one
   recorded in `ops.batch_fingerprints`: unchanged -> skipped, unless run config `force: true`;
3. DuckDB reads it as text with line numbers (assets/ingest/landing_files.py): CSV through `read_csv` (all
   VARCHAR, rejected lines kept with their error), JSON Lines line by line (`json_transform`),
   so a bad line is quarantined and never crashes the batch;
4. the suite's rules (assets/validate/rules.py) split staged rows into valid and quarantined;
5. one transaction replaces the partition: delete its rows in the raw tables and in
   `ops.schema_errors`, insert the new ones, upsert the fingerprint. An error anywhere rolls the
   whole partition back to its previous rows.
"""


import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
from pydantic import Field

from assets.common.current_state import PII_TAG, register_sources
from assets.common.metadata import markdown_table
from assets.common.partitions import daily_partitions
from assets.common.sources import SOURCES, RawTable, Source
from assets.ingest.landing_files import read_lines, stage_csv, stage_customer_purchases, stage_customers
from assets.validate.rules import load_suite, quarantine, typed
from resources.alerts import Alerts
from resources.landing import LandingFileError, LandingZone
from resources.warehouse import DuckDBWarehouse, fetch_all, fetch_scalar, table_exists

PARSER_VERSION = "1"  # part of the fingerprint: bump it when staging reads files differently
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
    max_error_rate: float = Field(default=0.05, description="Quarantined / input above this fails the check.")
    preview_rows: int = Field(default=5, description="Rows in the markdown previews.")
    catalog_wait_seconds: float = Field(
        default=300.0, description="raw_customers: how long to wait (by step retries) for earlier catalog days.")


@dataclass
class TableCounts:
    input_records: int
    valid_records: int
    quarantined_records: int
    by_rule: dict[str, int]

    @property
    def error_rate(self) -> float:
        return self.quarantined_records / self.input_records if self.input_records else 0.0

    @property
    def reconciles(self) -> bool:
        return self.input_records == self.valid_records + self.quarantined_records


def suites_digest(source: Source) -> str:
    return "+".join(load_suite(t).digest for t in source.table_names)


def landed_sql(table: RawTable, column: str) -> str:
    """SQL of a staged text column as it lands in the raw table."""
    return table.landed.get(column) or typed(f'"{column}"', table.columns[column])


# ---------------------------------------------------------------------------------------------
# Validation and the partition write
# ---------------------------------------------------------------------------------------------

def validate_staged(con: duckdb.DuckDBPyConnection, table: RawTable, partition_date: str) -> None:
    """Quarantine every staged row of `table` that breaks a rule of its suite into failures_<table>."""
    name = table.name
    con.execute(f"""CREATE OR REPLACE TEMP TABLE failures_{name} (
        row_id BIGINT, line_no BIGINT, record_key VARCHAR, rule VARCHAR, column_name VARCHAR, value VARCHAR)""")
    columns = set(table.columns) | {"line_no"}
    quarantine(con, load_suite(name), f"stg_{name}", columns, table.record_key, f"failures_{name}", partition_date)


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


def insert_partition(con: duckdb.DuckDBPyConnection, source: Source, partition_date: str, path: Path) -> None:
    """Valid rows into the raw tables, failures and unparseable lines into ops.schema_errors."""
    for spec in source.tables:
        table = spec.name
        landed = ", ".join(landed_sql(spec, c) for c in spec.columns)
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
        _fill_customer_raw_records(con, path, partition_date)


def _raw_record_sql(table: str) -> str:
    if table == "customers":
        return "NULL"  # filled from the file afterwards: only quarantined lines are read back
    if table == "customer_purchases":
        return ("json_object('productId', s.product_id, 'amount', s.amount, 'date', s.purchased_at)::VARCHAR")
    return "s.raw_record"


def _fill_customer_raw_records(con: duckdb.DuckDBPyConnection, path: Path, partition_date: str) -> None:
    """The original text of quarantined customer lines: the file streams through again and only
    those lines are kept (position in the read = line number minus the undecodable lines before)."""
    if not fetch_scalar(con, "SELECT count(*) FROM failures_customers"):
        return
    con.execute("""CREATE OR REPLACE TEMP TABLE wanted_positions AS
        SELECT DISTINCT f.line_no - (SELECT count(*) FROM json_lines_rejects AS r WHERE r.line_no < f.line_no) AS k
        FROM failures_customers AS f""")
    read_lines(con, path, "quarantined_lines", keep_text="ordinality IN (SELECT k FROM wanted_positions)")
    con.execute(
        """UPDATE ops.schema_errors AS e SET raw_record = q.line
        FROM quarantined_lines AS q
        WHERE e.partition_date = $day AND e.source = 'customers' AND e.table_name = 'customers'
          AND e.raw_record IS NULL AND e.line_no = q.line_no""",
        {"day": partition_date},
    )
    con.execute("DROP TABLE quarantined_lines")


def count_partition(con: duckdb.DuckDBPyConnection, source: Source, partition_date: str,
                    inputs: dict[str, int]) -> dict[str, TableCounts]:
    """Record accounting recounted from what landed: valid rows in the raw tables, distinct
    quarantined records in ops.schema_errors, against the records read from the file."""
    counts = {}
    for spec in source.tables:
        table = spec.name
        valid = fetch_scalar(con, f"SELECT count(*) FROM {spec.qualified} WHERE partition_date = ?", [partition_date])
        rows = fetch_all(
            con,
            """SELECT rule, count(DISTINCT (line_no, record_key)) FROM ops.schema_errors
            WHERE partition_date = ? AND source = ? AND table_name = ? GROUP BY ALL ORDER BY 2 DESC, 1""",
            [partition_date, source.name, table],
        )
        quarantined = fetch_scalar(
            con,
            """SELECT count(DISTINCT (line_no, record_key)) FROM ops.schema_errors
            WHERE partition_date = ? AND source = ? AND table_name = ?""",
            [partition_date, source.name, table],
        )
        counts[table] = TableCounts(inputs.get(table, 0), int(valid), int(quarantined), dict(rows))
    return counts


def record_fingerprint(con: duckdb.DuckDBPyConnection, source: Source, partition_date: str, fingerprint: str,
                       path: Path, counts: dict[str, TableCounts], seconds: float) -> None:
    primary = counts[source.table_names[0]]
    con.execute(
        "INSERT INTO ops.batch_fingerprints VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now()::TIMESTAMP, ?)",
        [source.name, partition_date, fingerprint, str(path), path.stat().st_size, primary.input_records,
         primary.valid_records, primary.quarantined_records,
         json.dumps({t: vars(c) for t, c in counts.items()}), json.dumps(primary.by_rule), round(seconds, 3)],
    )


def file_fingerprint(path: Path, source: Source) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return f"{digest.hexdigest()[:32]}:{suites_digest(source)}:p{PARSER_VERSION}"


CATALOG_RETRY_SECONDS = 5.0


def wait_for_catalog(context: dg.AssetExecutionContext, warehouse: DuckDBWarehouse, landing: LandingZone,
                     catalog: Source, day: str, timeout_seconds: float) -> str:
    """Returns a digest of the batches of `catalog` (a source this one is judged against) up to
    `day` once every day that has a landing file has landed. In a backfill launched at once,
    customers of day 5 must not be judged against a catalog whose day 1 is still landing in
    another run.

    It does not sleep in the step: that would hold the `duckdb` pool's only slot, which the
    missing day's raw_products needs, and both would stall until the timeout. It asks Dagster
    for a retry instead; a step up for retry gives its slot back while it waits."""
    expected = set(landing.days_available(catalog.name, day, catalog.landing_pattern))
    landed = landed_batches(warehouse, catalog.name, day)
    missing = sorted(expected - set(landed))
    if not missing:
        return hashlib.sha256(json.dumps(sorted(landed.items())).encode()).hexdigest()[:16]
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


def landed_batches(warehouse: DuckDBWarehouse, source: str, until: str) -> dict[str, str]:
    """{day: fingerprint} of the source's batches up to a day."""
    with warehouse.connect(read_only=True) as con:
        if not table_exists(con, "ops.batch_fingerprints"):
            return {}
        rows = fetch_all(con, """SELECT partition_date::VARCHAR, fingerprint FROM ops.batch_fingerprints
                                 WHERE source = ? AND partition_date <= ?""", [source, until])
    return dict(rows)


def stored_batch(warehouse: DuckDBWarehouse, source: Source, partition_date: str) -> dict[str, Any] | None:
    with warehouse.connect(read_only=True) as con:
        if not table_exists(con, "ops.batch_fingerprints"):
            return None
        rows = fetch_all(
            con, """SELECT fingerprint, table_counts, landed_at FROM ops.batch_fingerprints
            WHERE source = ? AND partition_date = ?""", [source.name, partition_date])
    if not rows:
        return None
    fingerprint, table_counts, landed_at = rows[0]
    return {"fingerprint": fingerprint, "inputs": {t: c["input_records"] for t, c in json.loads(table_counts).items()},
            "landed_at": landed_at}


# ---------------------------------------------------------------------------------------------
# The asset body shared by the three sources
# ---------------------------------------------------------------------------------------------

def ingest(context: dg.AssetExecutionContext, config: IngestionConfig, source: Source, sources: tuple[Source, ...],
           warehouse: DuckDBWarehouse, landing: LandingZone, alerts: Alerts) -> dg.MaterializeResult:
    started = time.perf_counter()
    day = context.partition_key
    try:
        path = landing.require(source.name, day, source.landing_pattern)
    except LandingFileError as error:
        raise dg.Failure(description=str(error), metadata={"path": str(error.path), "cause": error.cause}) from None
    fingerprint = file_fingerprint(path, source)
    for catalog in (s for s in sources if s.asset in source.deps):
        # Records are judged against the catalog up to the day (unknown products): a new catalog means new results.
        fingerprint += f":{catalog.name}=" + wait_for_catalog(context, warehouse, landing, catalog, day,
                                                              config.catalog_wait_seconds)
    stored = stored_batch(warehouse, source, day)
    if stored and stored["fingerprint"] == fingerprint and not config.force:
        context.log.info(f"skipped {source.name} {day}: {path} unchanged since {stored['landed_at']} ({fingerprint})")
        return _skipped_result(context, config, source, warehouse, day, path, fingerprint, stored, started)
    try:
        with warehouse.transaction() as con:
            counts, preview = _land(con, source, sources, day, path, fingerprint, config, started)
    except LandingFileError as error:
        raise dg.Failure(description=str(error), metadata={"path": str(error.path), "cause": error.cause}) from None
    except duckdb.IOException as error:
        raise dg.Failure(description=f"{source.name} file {path}: unreadable ({error})",
                         metadata={"path": str(path), "cause": str(error)}) from None
    seconds = time.perf_counter() - started
    context.log.info(f"landed {source.name} {day} from {path} in {seconds:.1f}s: "
                     + "; ".join(f"{t} {c.valid_records} valid, {c.quarantined_records} quarantined" for t, c in counts.items()))
    checks = _check_results(source, counts, config.max_error_rate)
    _alert_on_error_rate(alerts, context, source, day, path, counts, config.max_error_rate)
    metadata = _metadata(source, day, path, fingerprint, counts, seconds, skipped=False)
    metadata["preview"] = dg.MetadataValue.md(preview)
    return dg.MaterializeResult(metadata=metadata, check_results=checks, data_version=dg.DataVersion(fingerprint))


def land_file(con: duckdb.DuckDBPyConnection, source: Source, sources: tuple[Source, ...], day: str,
              path: Path) -> dict[str, TableCounts]:
    """Stage, judge and write one file as the day's partition of the source, inside the caller's
    transaction (any DuckDB connection: the evaluation lands Online Retail in a scratch one)."""
    ensure_tables(con, sources)
    reader = READERS[source.reader]
    inputs = reader.stage(con, path, source)
    validate_staged(con, source.tables[0], day)
    for part in source.tables[1:]:  # parts of the records that passed (a customer's purchase items)
        inputs[part.name] = reader.stage_part(con, part)
        validate_staged(con, part, day)
    delete_partition(con, source, day)
    insert_partition(con, source, day, path)
    return count_partition(con, source, day, inputs)


def _land(con: duckdb.DuckDBPyConnection, source: Source, sources: tuple[Source, ...], day: str, path: Path,
          fingerprint: str, config: IngestionConfig, started: float) -> tuple[dict[str, TableCounts], str]:
    counts = land_file(con, source, sources, day, path)
    record_fingerprint(con, source, day, fingerprint, path, counts, time.perf_counter() - started)
    return counts, _preview(con, source, day, counts, config.preview_rows)


def _skipped_result(context: dg.AssetExecutionContext, config: IngestionConfig, source: Source,
                    warehouse: DuckDBWarehouse, day: str, path: Path, fingerprint: str, stored: dict[str, Any],
                    started: float) -> dg.MaterializeResult:
    with warehouse.connect(read_only=True) as con:
        counts = count_partition(con, source, day, stored["inputs"])
    metadata = _metadata(source, day, path, fingerprint, counts, time.perf_counter() - started, skipped=True)
    metadata["skip_reason"] = f"source unchanged since {stored['landed_at']}"
    return dg.MaterializeResult(metadata=metadata, check_results=_check_results(source, counts, config.max_error_rate),
                                data_version=dg.DataVersion(fingerprint))


def _metadata(source: Source, day: str, path: Path, fingerprint: str, counts: dict[str, TableCounts],
              seconds: float, skipped: bool) -> dict[str, Any]:
    primary = counts[source.table_names[0]]
    metadata: dict[str, Any] = {
        "partition_date": day,
        "source_path": str(path),
        "fingerprint": fingerprint,
        "skipped": skipped,
        "input_records": primary.input_records,
        "valid_records": primary.valid_records,
        "quarantined_records": primary.quarantined_records,
        "error_rate": round(primary.error_rate, 6),
        "quarantined_by_rule": primary.by_rule,
        "seconds": round(seconds, 3),
        "dagster/row_count": primary.valid_records,
    }
    for table, table_counts in list(counts.items())[1:]:
        metadata[f"{table}.input_records"] = table_counts.input_records
        metadata[f"{table}.valid_records"] = table_counts.valid_records
        metadata[f"{table}.quarantined_records"] = table_counts.quarantined_records
        metadata[f"{table}.error_rate"] = round(table_counts.error_rate, 6)
        metadata[f"{table}.quarantined_by_rule"] = table_counts.by_rule
    return metadata


def _preview(con: duckdb.DuckDBPyConnection, source: Source, day: str, counts: dict[str, TableCounts],
             limit: int) -> str:
    parts = []
    for spec in source.tables:
        table = spec.name
        result = con.execute(
            f"SELECT * EXCLUDE (partition_date) FROM {spec.qualified} WHERE partition_date = ? "
            f"ORDER BY ALL LIMIT {int(limit)}", [day])  # line_no first, then item_no for purchases
        parts.append(f"**raw.{table}** (first valid rows)\n\n"
                     + markdown_table([d[0] for d in result.description], result.fetchall()))
        rules = [(rule, n) for rule, n in counts[table].by_rule.items()]
        if rules:
            parts.append(f"**{table}: quarantined by rule**\n\n" + markdown_table(["rule", "records"], rules))
    return "\n\n".join(parts)


def _check_results(source: Source, counts: dict[str, TableCounts], max_error_rate: float) -> list[dg.AssetCheckResult]:
    asset = f"raw_{source.name}"
    unbalanced = [t for t, c in counts.items() if not c.reconciles]
    too_many = {t: round(c.error_rate, 6) for t, c in counts.items() if c.error_rate > max_error_rate}
    accounting = {t: {"input": c.input_records, "valid": c.valid_records, "quarantined": c.quarantined_records}
                  for t, c in counts.items()}
    return [
        dg.AssetCheckResult(
            asset_key=asset, check_name="record_accounting", passed=not unbalanced,
            severity=dg.AssetCheckSeverity.ERROR,
            description="input = valid + quarantined for every table" if not unbalanced
            else f"records lost or counted twice in {unbalanced}",
            metadata={"accounting": accounting},
        ),
        dg.AssetCheckResult(
            asset_key=asset, check_name="error_rate", passed=not too_many, severity=dg.AssetCheckSeverity.ERROR,
            description=f"quarantined share above {max_error_rate:.1%} in {sorted(too_many)}" if too_many
            else f"quarantined share within {max_error_rate:.1%}",
            metadata={"error_rate": {t: round(c.error_rate, 6) for t, c in counts.items()},
                      "max_error_rate": max_error_rate},
        ),
    ]


def _alert_on_error_rate(alerts: Alerts, context: dg.AssetExecutionContext, source: Source, day: str, path: Path,
                         counts: dict[str, TableCounts], max_error_rate: float) -> None:
    """Called after the write transaction has closed: the alert opens its own connection."""
    for table, table_counts in counts.items():
        if table_counts.error_rate <= max_error_rate:
            continue
        alerts.send(
            "ERROR", f"raw_{source.name}",
            f"schema error rate {table_counts.error_rate:.1%} in {table} on {day}",
            f"{table_counts.quarantined_records} of {table_counts.input_records} {table} records were quarantined "
            f"(limit {max_error_rate:.1%}); see ops.schema_errors",
            details={"partition_date": day, "table": table, "source_path": str(path),
                     "error_rate": round(table_counts.error_rate, 6), "by_rule": table_counts.by_rule},
            log=context.log,
        )


def _check_specs(asset: str) -> list[dg.AssetCheckSpec]:
    return [
        # Blocking: records lost or counted twice mean the partition is wrong; nothing builds on it.
        dg.AssetCheckSpec("record_accounting", asset=asset, partitions_def=daily_partitions, blocking=True,
                          description="Every input record of the partition is either valid or quarantined."),
        dg.AssetCheckSpec("error_rate", asset=asset, partitions_def=daily_partitions,
                          description="Quarantined / input stays within max_error_rate (default 5 %)."),
    ]


@dataclass(frozen=True)
class Reader:
    """How a file format is staged: its records, then the parts of the valid ones (if any)."""

    stage: Callable[[duckdb.DuckDBPyConnection, Path, Source], dict[str, int]]
    stage_part: Callable[[duckdb.DuckDBPyConnection, RawTable], int] | None = None


READERS = {"csv": Reader(stage_csv), "customer_jsonl": Reader(stage_customers, stage_customer_purchases)}


def ingestion_asset(source: Source, sources: tuple[Source, ...]) -> dg.AssetsDefinition:
    if source.reader not in READERS:
        raise ValueError(f"source {source.name!r}: unknown reader {source.reader!r}; known: {sorted(READERS)}")

    @dg.asset(
        name=source.asset,
        partitions_def=daily_partitions,
        pool="duckdb",
        deps=list(source.deps),
        check_specs=_check_specs(source.asset),
        kinds={"duckdb"},
        group_name="ingest",
        description=source.description,
        metadata={"tables": [t.qualified for t in source.tables]},
        tags=PII_TAG if any(t.personal for t in source.tables) else None,
    )
    def _asset(context: dg.AssetExecutionContext, config: IngestionConfig, warehouse: DuckDBWarehouse,
               landing: LandingZone, alerts: Alerts) -> dg.MaterializeResult:
        return ingest(context, config, source, sources, warehouse, landing, alerts)

    return _asset


def build_ingestion_assets(sources: tuple[Source, ...] = SOURCES) -> list[dg.AssetsDefinition]:
    register_sources(sources)
    return [ingestion_asset(source, sources) for source in sources]
