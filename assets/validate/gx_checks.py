"""The suites of `expectations/` run by GX itself, as partitioned asset checks on the raw tables
(and, from assets/outputs, on the accepted recommendations).

GX validates what landed, after the quarantine took the bad records out; so that a bad batch is
never all green, a raw table's check reports beside GX's verdict the share of the batch as it
arrived that was quarantined (per rule too), and fails (WARN) when it is over
`max_rejected_share` (5 %, as the `error_rate` check).

GX validates pandas batches streamed from a Parquet export of the partition (Arrow record batches
of `chunk_rows`), so no database lock is held while it works. GX sees a repeatable sample of
`max_rows` (a pandas GX costs seconds per million rows); every row of the partition is judged by
the same row-level rules counted in SQL (`count_rule_breaks`), and a rule fails when either finds
a break. A suite's result is kept per
(table, partition, data fingerprint): re-running a check on unchanged data reports the stored
result instead of validating millions of rows again.
"""

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from assets.common.current_state import raw_source_of, read_state
from assets.common.metadata import markdown_table
from assets.common.partitions import daily_partitions
from assets.common.range_runs import asset_check_outputs, partition_check_evaluation
from assets.common.sources import SOURCES, Source, personal_columns
from assets.validate.rules import Suite, count_rule_breaks, load_suite, suite_parameter_values
from resources.background import import_in_background
from resources.redaction import mask_column
from resources.warehouse import DuckDBWarehouse, fetch_all, fetch_scalar, parquet_batches, step_priority, table_exists

# ---------------------------------------------------------------------------------------------
# The same suites with GX itself, as partitioned asset checks on the raw tables
# ---------------------------------------------------------------------------------------------

@dataclass
class ExpectationTally:
    """One expectation's result summed over the batches of a partition."""

    rule: str
    kind: str
    severity: str
    column: str | None = None  # the column it judges (its examples are masked when personal)
    success: bool = True
    element_count: int = 0
    unexpected_count: int = 0
    observed: Any = None
    examples: list[Any] = field(default_factory=list)
    # Counted in SQL over every row in scope (None: GX's sample only, see validate_partition).
    rows_breaking_in_sql: int | None = None

    def add(self, result: Any) -> None:
        summary = result.result or {}
        self.success = self.success and bool(result.success)
        self.element_count += int(summary.get("element_count") or 0)
        self.unexpected_count += int(summary.get("unexpected_count") or 0)
        self.observed = summary.get("observed_value", self.observed)
        if len(self.examples) < 5:
            self.examples.extend((summary.get("partial_unexpected_list") or [])[: 5 - len(self.examples)])


class SuiteCheckConfig(dg.Config):
    # GX re-serializes each expectation's arguments per batch (a 20k-product value set costs ~3 s):
    # few large batches beat many small ones.
    chunk_rows: int = Field(default=500_000, description="Rows per pandas batch handed to GX (1,000,000: 4 s faster on 2M purchase rows, 180 MiB more).")
    max_rows: int = Field(default=250_000, description="GX validates a repeatable sample of about this many rows (0: all rows); every row of the partition is also judged in SQL by the suite's row-level rules (`count_rule_breaks`), and a rule fails when either finds a break.")
    max_rejected_share: float = Field(default=0.05, description="Quarantined / arrived records of the table above this fails the check (WARN), whatever GX says of the landed rows.")


def gx_suite(suite: Suite) -> Any:
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    expectations = [ExpectationConfiguration(**e).to_domain_obj() for e in suite.expectations]
    return gx.ExpectationSuite(name=suite.name, expectations=expectations)


def validate_partition(warehouse: DuckDBWarehouse, suite: Suite, table: str, partition_date: str | None,
                       chunk_rows: int, max_rows: int = 0, only: str | None = None, every_row_in_sql: bool = False
                       ) -> tuple[list[ExpectationTally], int, int]:
    """Run the suite with GX over a partition (or, with no partition date, a whole current-state
    table); returns (tallies, rows validated, rows in the partition or table).

    The rows go to a Parquet file in one short connection, so no database lock is held while GX
    works; batches are ordered by the uniqueness key and a key never straddles two. `only` (SQL
    from code, never from data) narrows the rows validated; the total still counts them all.
    `every_row_in_sql`: the suite's row-level expectations are also counted in SQL over every row
    in scope (`count_rule_breaks`), so GX's sample of them (`max_rows`) can be small; a rule
    fails when either finds a break.
    """
    import_in_background("great_expectations")  # while DuckDB exports the rows
    with tempfile.TemporaryDirectory(prefix="gx-") as folder:
        export = Path(folder) / "partition.parquet"
        total, parameters, breaks = _export_partition(warehouse, suite, table, partition_date, export, max_rows, only,
                                                      every_row_in_sql)
        tallies = [ExpectationTally(e.get("meta", {}).get("rule") or e["type"], e["type"],
                                    e.get("severity", "critical"), _judged_column(e)) for e in suite.expectations]
        validated = 0
        batch_definition = _batch_definition(suite.name)
        gx_expectation_suite = gx_suite(suite)
        for frame in _frames(export, chunk_rows, suite.unique_columns):
            batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
            result = batch.validate(gx_expectation_suite, result_format="SUMMARY", expectation_parameters=parameters)
            for tally, expectation_result in zip(tallies, result.results):
                tally.add(expectation_result)
            validated += len(frame)
    for tally in tallies:
        if tally.rule in breaks:
            tally.rows_breaking_in_sql = breaks[tally.rule]
            tally.success = tally.success and not breaks[tally.rule]
    return tallies, validated, total


SAMPLE_BUCKETS = 1_000_003
SAMPLE_METHOD = f"hash%{SAMPLE_BUCKETS}"


def _export_partition(warehouse: DuckDBWarehouse, suite: Suite, table: str, partition_date: str | None, export: Path,
                      max_rows: int, only: str | None = None, every_row_in_sql: bool = False
                      ) -> tuple[int, dict[str, list], dict[str, int]]:
    columns = sorted({c for e in suite.expectations for c in _expectation_columns(e)})
    # Raw tables break ties by source line; current-state tables have no line numbers.
    tiebreak = ["line_no"] if partition_date is not None else []
    # Sorted only when a uniqueness key must keep its rows in one batch (sorting 20M rows costs).
    order = "ORDER BY " + ", ".join(f'"{c}"' for c in suite.unique_columns + tiebreak) if suite.unique_columns else ""
    select = ", ".join(f'"{c}"' for c in [*columns, *tiebreak])
    where, params = (("WHERE partition_date = $partition_date", {"partition_date": partition_date})
                     if partition_date is not None else ("", {}))
    scope = f"SELECT * FROM {table} {where} {('AND ' if where else 'WHERE ') + only if only else ''}"
    source = f"({scope})"
    with warehouse.connect(read_only=True) as con:
        if not table_exists(con, table):
            raise dg.Failure(f"{table} does not exist yet: materialize the asset that writes it first")
        total = fetch_scalar(con, f"SELECT count(*) FROM {table} {where}", params)
        breaks = {}
        if every_row_in_sql and only:  # the rows in scope once (`only` costs a semi-join), then SQL counts and GX's sample
            con.execute(f"CREATE OR REPLACE TEMP TABLE rows_in_scope AS {scope}", params)
            source, params = "rows_in_scope", {}
            breaks = count_rule_breaks(con, suite, source, where_params={"partition_date": partition_date})
        elif every_row_in_sql:  # a partition or a whole table: counted where it is stored, in one pass a rule kind
            breaks = count_rule_breaks(con, suite, table, where, params)
        rows = fetch_scalar(con, f"SELECT count(*) FROM {source}", params) if only else total
        # A repeatable sample by a hash of the row streams through (and the sort can spill); a
        # reservoir sample holds its rows in memory: 2M customer rows ran out of a 289 MiB limit.
        sampled = (f"WHERE hash({select}) % {SAMPLE_BUCKETS} < {max(1, SAMPLE_BUCKETS * max_rows // rows)}"
                   if max_rows and rows > max_rows else "")
        con.execute(f"COPY (SELECT {select} FROM {source} {sampled} {order}) TO '{export}' (FORMAT parquet)", params)
        parameters = suite_parameter_values(con, suite, partition_date)
    return int(total), parameters, breaks


def _frames(export: Path, chunk_rows: int, key: list[str]) -> Iterator[pd.DataFrame]:
    """Pandas frames of about `chunk_rows`, never splitting rows that share a uniqueness key."""
    carry: pa.Table | None = None
    for batch in parquet_batches(export, max(chunk_rows, 1)):
        chunk = pa.Table.from_batches([batch]) if carry is None else pa.concat_tables([carry, pa.Table.from_batches([batch])])
        if len(chunk) < chunk_rows:  # batches end with row groups: gather them up to chunk_rows
            carry = chunk
            continue
        keep = len(chunk) - _trailing_key_rows(chunk, key) if key else len(chunk)
        carry = chunk.slice(keep)
        if keep:
            yield _to_pandas(chunk.slice(0, keep))
    if carry is not None and len(carry):
        yield _to_pandas(carry)


def _trailing_key_rows(chunk: pa.Table, key: list[str]) -> int:
    """How many rows at the end share the last row's key (rows are sorted by the key)."""
    same = None
    for name in key:
        column = chunk[name]
        last = column[len(column) - 1]
        equal = pc.is_null(column) if not last.is_valid else pc.fill_null(pc.equal(column, last), False)
        same = equal if same is None else pc.and_(same, equal)
    return int(pc.sum(same).as_py() or 0)


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    return table.drop_columns([c for c in ("line_no",) if c in table.column_names]).to_pandas()


@cache
def _batch_definition(suite_name: str) -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    asset = context.data_sources.add_pandas(f"raw_{suite_name}").add_dataframe_asset(suite_name)
    return asset.add_batch_definition_whole_dataframe("partition_chunk")


def _judged_column(expectation: dict[str, Any]) -> str | None:
    """The column an expectation judges; of several, a personal one (its examples get masked)."""
    columns = _expectation_columns(expectation)
    personal = personal_columns()
    return next((c for c in columns if c in personal), columns[0] if columns else None)


def _expectation_columns(expectation: dict[str, Any]) -> list[str]:
    kwargs = expectation.get("kwargs", {})
    return list(kwargs.get("column_list", [])) + ([kwargs["column"]] if "column" in kwargs else [])


def suite_check_result(suite: Suite, tallies: list[ExpectationTally], validated: int, total: int,
                       seconds: float, quarantined_by_rule: dict[str, int] | None = None) -> dg.AssetCheckResult:
    failed = [t for t in tallies if not t.success]
    severity = dg.AssetCheckSeverity.ERROR if any(t.severity == "critical" for t in failed) else dg.AssetCheckSeverity.WARN
    personal = personal_columns()

    def shown(t: ExpectationTally) -> str:  # examples of a personal column leave masked
        if t.observed is not None:
            return str(t.observed)
        how = personal.get(t.column or "")
        return ", ".join(str(mask_column(x, how) if how else x) for x in t.examples)

    quarantined = quarantined_by_rule or {}
    in_sql = {t.rule: t.rows_breaking_in_sql for t in tallies if t.rows_breaking_in_sql is not None}
    rows = [(t.rule, t.kind.removeprefix("expect_"), "pass" if t.success else "FAIL", t.unexpected_count,
             *([in_sql.get(t.rule, "")] if in_sql else []), quarantined.get(t.rule, 0), shown(t)) for t in tallies]
    return dg.AssetCheckResult(
        passed=not failed,
        severity=severity,
        description=f"{len(failed)} of {len(tallies)} expectations of suite {suite.name!r} failed" if failed
        else f"all {len(tallies)} expectations of suite {suite.name!r} passed",
        metadata={
            "suite": suite.name,
            "rows_validated": validated,
            "rows_in_partition": total,
            "failed_rules": [t.rule for t in failed],
            "unexpected_by_rule": {t.rule: t.unexpected_count for t in tallies},
            **({"breaking_in_sql_by_rule": in_sql} if in_sql else {}),
            "seconds": round(seconds, 2),
            "results": dg.MetadataValue.md(
                markdown_table(["rule", "expectation", "result", "unexpected (landed)",
                                *(["breaking, every row in SQL"] if in_sql else []), "quarantined before landing",
                                "observed"], rows, max_width=80)),
        },
    )


# A run launches the steps that build the day before a GX suite that is ready at the same time:
# at 2M customers the suites of raw_customers took both places of a run for 12 s while
# stg_customer_history, on the way to everything else, waited.
SUITE_STEP_TAGS = step_priority(-1)


def build_batch_suites(source: Source) -> dg.AssetChecksDefinition:
    """The GX checks of a source's landed batch, one a table, run in one step: importing GX costs
    about 1.8 s of a step's fresh process and validating a day's batch far less (a 2M-customer
    day 2: 0.4 s and 1.7 s for raw_customers' two suites). Each check can still be run alone."""
    asset = source.asset
    specs = [dg.AssetCheckSpec(
        suite_check_name(table.name), asset=asset, blocking=False, partitions_def=daily_partitions,
        description=f"The GX suite expectations/{table.name}.json on the partition of raw.{table.name}, with the "
                    "share of the batch quarantined before landing.") for table in source.tables]

    @dg.multi_asset_check(
        specs=specs,
        name=f"{asset}_expectation_suites",
        can_subset=True,
        pool=None,  # reads in short connections and validates holding none: it runs beside the warehouse steps
        op_tags=SUITE_STEP_TAGS,
    )
    def _checks(context: dg.AssetCheckExecutionContext, config: SuiteCheckConfig,
                warehouse: DuckDBWarehouse) -> Iterator[Any]:
        selected = {key.name for key in context.selected_asset_check_keys}
        tables = [table.name for table in source.tables if suite_check_name(table.name) in selected]
        if context.has_partition_key:
            for table in tables:
                result = raw_suite_check(warehouse, load_suite(table), table, context.partition_key, asset, config)
                yield result._replace(asset_key=dg.AssetKey(asset), check_name=suite_check_name(table))
            return
        # A range run (single-run backfill of the asset): one evaluation per day that has a batch.
        days = landed_days(warehouse, asset, context.partition_keys)
        for table in tables:
            suite = load_suite(table)  # once a table, not once a day
            for day in days:
                result = raw_suite_check(warehouse, suite, table, day, asset, config)
                yield partition_check_evaluation(context.instance, result, asset, suite_check_name(table), day,
                                                 blocking=False)
        yield from asset_check_outputs(context)

    return _checks


def suite_check_name(table: str) -> str:
    return f"{table}_expectation_suite"


def landed_days(warehouse: DuckDBWarehouse, asset: str, days: list[str]) -> list[str]:
    """The days of a range that have a landed batch of the asset's source."""
    with warehouse.connect(read_only=True) as con:
        if not table_exists(con, "ops.batch_fingerprints"):
            return []
        rows = fetch_all(con, """SELECT partition_date::VARCHAR FROM ops.batch_fingerprints WHERE source = ?
                                 AND list_contains(?, partition_date::VARCHAR) ORDER BY 1""", [raw_source_of(asset), days])
    return [row[0] for row in rows]


QUARANTINED_SHARE = "quarantined_share"  # the cause both this and the error_rate check report


def raw_suite_check(warehouse: DuckDBWarehouse, suite: Suite, table: str, day: str, asset: str,
                    config: SuiteCheckConfig) -> dg.AssetCheckResult:
    """GX's verdict on the landed rows, with the share of the batch quarantined before landing."""
    arrived, rejected, by_rule = batch_as_arrived(warehouse, asset, table, day)
    result = run_suite_check(warehouse, suite, f"raw.{table}", day, asset, config.chunk_rows, config.max_rows,
                             quarantined_by_rule=by_rule, every_row_in_sql=True)
    share = rejected / arrived if arrived else 0.0
    over = share > config.max_rejected_share
    shares = (f"{share:.1%} of the batch as it arrived ({rejected:,} of {arrived:,} records) was quarantined "
              f"before landing ({'over' if over else 'within'} {config.max_rejected_share:.1%})")
    return dg.AssetCheckResult(
        passed=result.passed and not over,
        severity=result.severity if not result.passed else dg.AssetCheckSeverity.WARN,
        description=f"{result.description}; {shares}",
        metadata={**result.metadata, "rejected_share": round(share, 6), "records_arrived": arrived,
                  "records_quarantined": rejected, "max_rejected_share": float(config.max_rejected_share),
                  # Failing on the share alone is the error_rate check's incident, not a second one.
                  **({"incident_cause": QUARANTINED_SHARE} if result.passed and over else {})},
    )


def batch_as_arrived(warehouse: DuckDBWarehouse, asset: str, table: str, day: str) -> tuple[int, int, dict[str, int]]:
    """(records of the table as they arrived, records quarantined, quarantined by rule) of a batch."""
    with warehouse.connect(read_only=True) as con:
        if not table_exists(con, "ops.batch_fingerprints"):
            return 0, 0, {}
        rows = fetch_all(con, "SELECT table_counts FROM ops.batch_fingerprints WHERE source = ? AND partition_date = ?",
                         [raw_source_of(asset), day])
    counts = json.loads(rows[0][0]).get(table) if rows else None
    if not counts:
        return 0, 0, {}
    return int(counts["input_records"]), int(counts["quarantined_records"]), dict(counts["by_rule"])


# ---------------------------------------------------------------------------------------------
# A suite's result is kept per (table, partition, data fingerprint): re-running a check on data
# that has not changed reports the stored result instead of validating millions of rows again.
# ---------------------------------------------------------------------------------------------

SUITE_RUNS_TABLE = "ops.suite_runs"


def run_suite_check(warehouse: DuckDBWarehouse, suite: Suite, table: str, partition_key: str, asset: str,
                    chunk_rows: int, max_rows: int, partitioned: bool = True,
                    quarantined_by_rule: dict[str, int] | None = None, only: str | None = None,
                    every_row_in_sql: bool = False) -> dg.AssetCheckResult:
    """The suite's check result on a raw partition (or, `partitioned=False`, a current-state
    table; `only`, `every_row_in_sql`: the rows of it to validate and how, see validate_partition)."""
    started = time.perf_counter()
    # the rows judged: how many, how sampled, which (a verdict on another sample is not reused)
    fingerprint = _data_fingerprint(warehouse, asset, partition_key, suite,
                                    f"{max_rows}|{SAMPLE_METHOD}" + (f"|{only}" if only else "")
                                    + ("|every row in SQL" if every_row_in_sql else ""))
    stored = _stored_suite_run(warehouse, table, partition_key, fingerprint) if fingerprint else None
    if stored is not None:
        tallies, validated, total = stored
        result = suite_check_result(suite, tallies, validated, total, time.perf_counter() - started, quarantined_by_rule)
        return result._replace(metadata={**result.metadata, "reused_result": True})
    tallies, validated, total = validate_partition(
        warehouse, suite, table, partition_key if partitioned else None, chunk_rows, max_rows, only, every_row_in_sql)
    if fingerprint:
        _store_suite_run(warehouse, table, partition_key, fingerprint, tallies, validated, total)
    return suite_check_result(suite, tallies, validated, total, time.perf_counter() - started, quarantined_by_rule)


def _data_fingerprint(warehouse: DuckDBWarehouse, asset: str, partition_key: str, suite: Suite, rows: str) -> str | None:
    """What the checked data was built from: the landed batch (raw assets) or the last build (others)."""
    with warehouse.connect(read_only=True) as con:
        source = raw_source_of(asset)
        if source is not None:
            if not table_exists(con, "ops.batch_fingerprints"):
                return None
            landed = fetch_all(con, "SELECT fingerprint FROM ops.batch_fingerprints WHERE source = ? AND partition_date = ?",
                               [source, partition_key])
            data = landed[0][0] if landed else None
        else:
            state = read_state(con, asset)
            data = f"{state.fingerprint}:v{state.version}" if state else None
    return hashlib.sha256(f"{data}|{suite.digest}|{rows}".encode()).hexdigest()[:32] if data else None


def _stored_suite_run(warehouse: DuckDBWarehouse, table: str, partition_key: str, fingerprint: str):
    with warehouse.connect(read_only=True) as con:
        if not table_exists(con, SUITE_RUNS_TABLE):
            return None
        rows = fetch_all(con, f"SELECT tallies, validated, total FROM {SUITE_RUNS_TABLE}"
                              " WHERE table_name = ? AND partition_key = ? AND fingerprint = ?",
                         [table, partition_key, fingerprint])
    if not rows:
        return None
    tallies, validated, total = rows[0]
    return [ExpectationTally(**t) for t in json.loads(tallies)], validated, total


def _store_suite_run(warehouse: DuckDBWarehouse, table: str, partition_key: str, fingerprint: str,
                     tallies: list[ExpectationTally], validated: int, total: int) -> None:
    payload = json.dumps([t.__dict__ for t in tallies], default=str)
    with warehouse.transaction() as con:
        con.execute("CREATE SCHEMA IF NOT EXISTS ops")
        con.execute(f"""CREATE TABLE IF NOT EXISTS {SUITE_RUNS_TABLE} (table_name VARCHAR, partition_key VARCHAR,
                        fingerprint VARCHAR, tallies JSON, validated BIGINT, total BIGINT, validated_at TIMESTAMP)""")
        con.execute(f"DELETE FROM {SUITE_RUNS_TABLE} WHERE table_name = ? AND partition_key = ?", [table, partition_key])
        con.execute(f"INSERT INTO {SUITE_RUNS_TABLE} VALUES (?, ?, ?, ?, ?, ?, now()::TIMESTAMP)",
                    [table, partition_key, fingerprint, payload, validated, total])


def build_suite_checks(sources: tuple[Source, ...] = SOURCES) -> list[dg.AssetChecksDefinition]:
    """A GX check per raw table of the registry, on the asset that writes it; a step per source."""
    return [build_batch_suites(source) for source in sources]
