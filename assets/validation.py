"""Rules declared once, as GX 1.x expectation suites in `expectations/<table>.json`, used twice:

1. Row-level quarantine (ingestion): each row-level expectation compiles to a DuckDB predicate
   that is TRUE when a staged row breaks it, so a whole partition is judged in a few vectorized
   scans. Every failure becomes one `ops.schema_errors` row named by the expectation's
   `meta.rule`. (GX's `mostly` does not apply here: every failing row is quarantined.)
2. A partitioned asset check per raw table runs the same suite with GX itself, on pandas batches
   streamed from a Parquet export of the partition (Arrow record batches of `chunk_rows`).

Staged values are text as they arrived; `expect_column_values_to_be_of_type` says what each
column must cast to (`float64` -> DOUBLE, `int32` -> INTEGER, `datetime64[us]` -> TIMESTAMP,
`bool` -> BOOLEAN), and comparisons (`be_between`) use that cast. A uniqueness expectation keeps
the first row (by line) of each value and quarantines the repeats.
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
import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from assets.metadata import markdown_table
from assets.partitions import daily_partitions
from resources.warehouse import DuckDBWarehouse, fetch_all, fetch_scalar, table_exists

EXPECTATIONS_DIR = Path(__file__).resolve().parents[1] / "expectations"

# Suite parameters (`{"$PARAMETER": name}`) and the SQL that gives their values for a partition.
SUITE_PARAMETERS = {
    "known_product_ids": "SELECT DISTINCT product_id FROM raw.products"
    " WHERE partition_date <= $partition_date AND product_id IS NOT NULL",
}

# What a column must cast to, by the numpy dtype name GX checks on the landed table.
DUCKDB_TYPES = {
    "float64": "DOUBLE", "float32": "DOUBLE", "float": "DOUBLE",
    "int64": "BIGINT", "int32": "INTEGER", "int": "BIGINT",
    "bool": "BOOLEAN", "boolean": "BOOLEAN",
    "str": "VARCHAR", "object": "VARCHAR", "string": "VARCHAR",
}
ROW_LEVEL_TYPES = {
    "expect_column_values_to_not_be_null", "expect_column_values_to_be_null", "expect_column_values_to_be_unique",
    "expect_compound_columns_to_be_unique", "expect_column_values_to_be_of_type",
    "expect_column_values_to_match_regex", "expect_column_values_to_not_match_regex",
    "expect_column_values_to_match_strftime_format", "expect_column_values_to_be_dateutil_parseable",
    "expect_column_values_to_be_in_set", "expect_column_values_to_not_be_in_set",
    "expect_column_values_to_be_between", "expect_column_value_lengths_to_be_between",
}
AGGREGATE_PREFIXES = ("expect_table_", "expect_column_mean", "expect_column_median", "expect_column_max",
                      "expect_column_min", "expect_column_sum", "expect_column_stdev", "expect_column_proportion",
                      "expect_column_distinct", "expect_column_unique_value_count", "expect_column_most_common",
                      "expect_column_quantile", "expect_column_to_exist", "expect_column_kl")


# ---------------------------------------------------------------------------------------------
# Suites and their compilation to DuckDB predicates
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RowRule:
    """One row-level expectation as SQL over a staged relation."""

    rule: str
    column_name: str
    fails: str  # boolean SQL: TRUE when the row breaks the rule
    value: str  # SQL of the offending value, as text
    params: dict[str, Any] = field(default_factory=dict)
    window: bool = False  # judged across rows (uniqueness): goes in QUALIFY, not WHERE


@dataclass(frozen=True)
class Suite:
    name: str
    expectations: tuple[dict[str, Any], ...]
    digest: str  # changes when any rule changes: part of the ingestion fingerprint

    @property
    def column_types(self) -> dict[str, str]:
        """Column -> DuckDB type, from the suite's `be_of_type` expectations."""
        return {e["kwargs"]["column"]: duckdb_type(e["kwargs"]["type_"])
                for e in self.expectations if e["type"] == "expect_column_values_to_be_of_type"}

    @property
    def rule_names(self) -> list[str]:
        return [e.get("meta", {}).get("rule") for e in self.expectations if e.get("meta", {}).get("rule")]

    @property
    def unique_columns(self) -> list[str]:
        """Columns of the first uniqueness expectation (the GX check orders its batches by them)."""
        for e in self.expectations:
            if e["type"] == "expect_column_values_to_be_unique":
                return [e["kwargs"]["column"]]
            if e["type"] == "expect_compound_columns_to_be_unique":
                return list(e["kwargs"]["column_list"])
        return []

    def row_rules(self, columns: set[str]) -> list[RowRule]:
        """The suite's row-level expectations compiled against a staged relation with `columns`."""
        rules = []
        for position, expectation in enumerate(self.expectations):
            if expectation["type"].startswith(AGGREGATE_PREFIXES):
                continue  # nothing to quarantine row by row; the GX check still runs it
            rules.append(compile_expectation(expectation, f"p{position}_", columns, self.column_types))
        return rules


@cache
def load_suite(name: str) -> Suite:
    path = EXPECTATIONS_DIR / f"{name}.json"
    text = path.read_text()
    data = json.loads(text)
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    return Suite(data["name"], tuple(data["expectations"]), digest)


def duckdb_type(numpy_type: str) -> str:
    if numpy_type.startswith("datetime64"):
        return "TIMESTAMP"
    if numpy_type not in DUCKDB_TYPES:
        raise ValueError(f"type_ {numpy_type!r} has no DuckDB cast; known: {sorted(DUCKDB_TYPES)} and datetime64[..]")
    return DUCKDB_TYPES[numpy_type]


def typed(column_sql: str, duckdb_type_name: str) -> str:
    """SQL of a staged text value cast to its type; NULL when it does not cast cleanly."""
    if duckdb_type_name == "VARCHAR":
        return column_sql
    if duckdb_type_name == "DOUBLE":
        return f"(CASE WHEN isfinite(TRY_CAST({column_sql} AS DOUBLE)) THEN TRY_CAST({column_sql} AS DOUBLE) END)"
    if duckdb_type_name in ("INTEGER", "BIGINT"):
        # Via DOUBLE so that '6.5' is refused instead of rounded (a plain cast would round it).
        number = f"TRY_CAST({column_sql} AS DOUBLE)"
        return f"(CASE WHEN {number} = trunc({number}) THEN TRY_CAST({number} AS {duckdb_type_name}) END)"
    return f"TRY_CAST({column_sql} AS {duckdb_type_name})"


def compile_expectation(expectation: dict[str, Any], prefix: str, columns: set[str],
                        column_types: dict[str, str]) -> RowRule:
    kind, kwargs = expectation["type"], expectation.get("kwargs", {})
    rule = expectation.get("meta", {}).get("rule")
    if not rule:
        raise ValueError(f"{kind} on {kwargs} has no meta.rule (the quarantine reason)")
    if kind not in ROW_LEVEL_TYPES:
        raise ValueError(f"{kind} has no row-level DuckDB compilation; supported: {sorted(ROW_LEVEL_TYPES)}")
    if kind == "expect_compound_columns_to_be_unique":
        names = [_identifier(c, columns) for c in kwargs["column_list"]]
        value = "concat_ws(',', " + ", ".join(f"CAST({n} AS VARCHAR)" for n in names) + ")"
        fails = f"row_number() OVER (PARTITION BY {', '.join(names)} ORDER BY line_no, row_id) > 1"
        return RowRule(rule, ",".join(kwargs["column_list"]), fails, value, window=True)
    column = _identifier(kwargs["column"], columns)
    as_text, value_type = f"CAST({column} AS VARCHAR)", column_types.get(kwargs["column"], "VARCHAR")
    fails, params = _fails(kind, kwargs, column, value_type, prefix)
    return RowRule(rule, kwargs["column"], fails, as_text, params, window=kind == "expect_column_values_to_be_unique")


def _fails(kind: str, kwargs: dict[str, Any], column: str, value_type: str, prefix: str) -> tuple[str, dict]:
    """The failing predicate of a single-column expectation. Like GX, nulls only fail null checks."""
    present = f"{column} IS NOT NULL"
    text = f"CAST({column} AS VARCHAR)"
    p = prefix
    if kind == "expect_column_values_to_not_be_null":
        return f"{column} IS NULL", {}
    if kind == "expect_column_values_to_be_null":
        return present, {}
    if kind == "expect_column_values_to_be_unique":
        return f"{present} AND row_number() OVER (PARTITION BY {column} ORDER BY line_no, row_id) > 1", {}
    if kind == "expect_column_values_to_be_of_type":
        return f"{present} AND {typed(column, duckdb_type(kwargs['type_']))} IS NULL", {}
    if kind == "expect_column_values_to_match_regex":
        return f"{present} AND NOT regexp_matches({text}, ${p}regex)", {f"{p}regex": kwargs["regex"]}
    if kind == "expect_column_values_to_not_match_regex":
        return f"{present} AND regexp_matches({text}, ${p}regex)", {f"{p}regex": kwargs["regex"]}
    if kind == "expect_column_values_to_match_strftime_format":
        return f"{present} AND try_strptime({text}, ${p}fmt) IS NULL", {f"{p}fmt": kwargs["strftime_format"]}
    if kind == "expect_column_values_to_be_dateutil_parseable":
        return f"{present} AND TRY_CAST({text} AS TIMESTAMP) IS NULL", {}
    if kind in ("expect_column_values_to_be_in_set", "expect_column_values_to_not_be_in_set"):
        member = _membership(kwargs["value_set"], text, p)
        negate = "NOT " if kind == "expect_column_values_to_be_in_set" else ""
        return f"{present} AND {negate}({member[0]})", member[1]
    if kind == "expect_column_values_to_be_between":
        return _between(typed(column, value_type), value_type, kwargs, p)
    if kind == "expect_column_value_lengths_to_be_between":
        return _between(f"length({text})", "BIGINT", kwargs, p)
    raise AssertionError(f"{kind} is listed in ROW_LEVEL_TYPES but not compiled")


def _membership(value_set: Any, text: str, prefix: str) -> tuple[str, dict]:
    if isinstance(value_set, dict) and "$PARAMETER" in value_set:
        name = value_set["$PARAMETER"]
        if name not in SUITE_PARAMETERS:
            raise ValueError(f"suite parameter {name!r} is not defined; known: {sorted(SUITE_PARAMETERS)}")
        return f"{text} IN ({SUITE_PARAMETERS[name]})", {}
    return f"list_contains(${prefix}set::VARCHAR[], {text})", {f"{prefix}set": [str(v) for v in value_set]}


def _between(value_sql: str, value_type: str, kwargs: dict[str, Any], prefix: str) -> tuple[str, dict]:
    conditions, params = [], {}
    for bound, strict_key, low in (("min_value", "strict_min", True), ("max_value", "strict_max", False)):
        if kwargs.get(bound) is None:
            continue
        name = f"{prefix}{bound}"
        operator = ("<=" if kwargs.get(strict_key) else "<") if low else (">=" if kwargs.get(strict_key) else ">")
        conditions.append(f"{value_sql} {operator} CAST(${name} AS {value_type})")
        params[name] = kwargs[bound]
    if not conditions:
        raise ValueError(f"be_between on {kwargs.get('column')} has neither min_value nor max_value")
    return f"({' OR '.join(conditions)})", params


def _identifier(column: str, columns: set[str]) -> str:
    """Suite columns are checked against the staged relation's own columns before use in SQL."""
    if column not in columns:
        raise ValueError(f"expectation column {column!r} is not a column of the staged table {sorted(columns)}")
    return f'"{column}"'


def quarantine(con: duckdb.DuckDBPyConnection, suite: Suite, staged: str, columns: set[str], record_key: str,
               failures: str, partition_date: str) -> None:
    """Append every (row, broken rule) of the staged relation to the `failures` temp table.

    `staged` and `record_key` are SQL from code; the staged relation has `row_id` and `line_no`.
    """
    for rule in suite.row_rules(columns):
        where = "QUALIFY" if rule.window else "WHERE"
        sql = (f"INSERT INTO {failures} SELECT row_id, line_no, {record_key}, $rule, $column_name, {rule.value}"
               f" FROM {staged} {where} {rule.fails}")
        params = {"rule": rule.rule, "column_name": rule.column_name, **rule.params}
        if "$partition_date" in rule.fails:
            params["partition_date"] = partition_date
        con.execute(sql, params)


# ---------------------------------------------------------------------------------------------
# The same suites with GX itself, as partitioned asset checks on the raw tables
# ---------------------------------------------------------------------------------------------

@dataclass
class ExpectationTally:
    """One expectation's result summed over the batches of a partition."""

    rule: str
    kind: str
    severity: str
    success: bool = True
    element_count: int = 0
    unexpected_count: int = 0
    observed: Any = None
    examples: list[Any] = field(default_factory=list)

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
    chunk_rows: int = Field(default=1_000_000, description="Rows per pandas batch handed to GX.")
    max_rows: int = Field(default=2_000_000, description="Validate a repeatable sample of this many rows (0: all rows); every row is already judged by the compiled SQL rules.")


def gx_suite(suite: Suite) -> Any:
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    expectations = [ExpectationConfiguration(**e).to_domain_obj() for e in suite.expectations]
    return gx.ExpectationSuite(name=suite.name, expectations=expectations)


def validate_partition(warehouse: DuckDBWarehouse, suite: Suite, table: str, partition_date: str | None,
                       chunk_rows: int, max_rows: int = 0) -> tuple[list[ExpectationTally], int, int]:
    """Run the suite with GX over a partition (or, with no partition date, a whole current-state
    table); returns (tallies, rows validated, rows in the partition or table).

    The rows go to a Parquet file in one short connection, so no database lock is held while GX
    works; batches are ordered by the uniqueness key and a key never straddles two.
    """
    with tempfile.TemporaryDirectory(prefix="gx-") as folder:
        export = Path(folder) / "partition.parquet"
        total, parameters = _export_partition(warehouse, suite, table, partition_date, export, max_rows)
        tallies = [ExpectationTally(e.get("meta", {}).get("rule") or e["type"], e["type"],
                                    e.get("severity", "critical")) for e in suite.expectations]
        validated = 0
        batch_definition = _batch_definition(suite.name)
        gx_expectation_suite = gx_suite(suite)
        for frame in _frames(export, chunk_rows, suite.unique_columns):
            batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
            result = batch.validate(gx_expectation_suite, result_format="SUMMARY", expectation_parameters=parameters)
            for tally, expectation_result in zip(tallies, result.results):
                tally.add(expectation_result)
            validated += len(frame)
    return tallies, validated, total


def _export_partition(warehouse: DuckDBWarehouse, suite: Suite, table: str, partition_date: str | None, export: Path,
                      max_rows: int) -> tuple[int, dict[str, list]]:
    columns = sorted({c for e in suite.expectations for c in _expectation_columns(e)})
    # Raw tables break ties by source line; current-state tables have no line numbers.
    tiebreak = ["line_no"] if partition_date is not None else []
    # Sorted only when a uniqueness key must keep its rows in one batch (sorting 20M rows costs).
    order = "ORDER BY " + ", ".join(f'"{c}"' for c in suite.unique_columns + tiebreak) if suite.unique_columns else ""
    select = ", ".join(f'"{c}"' for c in [*columns, *tiebreak])
    where, params = ("WHERE partition_date = $day", {"day": partition_date}) if partition_date is not None else ("", {})
    source = f"(SELECT * FROM {table} {where})"
    if max_rows:
        source = f"(SELECT * FROM {source} USING SAMPLE reservoir({int(max_rows)} ROWS) REPEATABLE (42))"
    with warehouse.connect(read_only=True) as con:
        if not table_exists(con, table):
            raise dg.Failure(f"{table} does not exist yet: materialize the asset that writes it first")
        total = fetch_scalar(con, f"SELECT count(*) FROM {table} {where}", params)
        con.execute(f"COPY (SELECT {select} FROM {source} {order}) TO '{export}' (FORMAT parquet)", params)
        parameters = {name: [r[0] for r in fetch_all(con, sql, {"partition_date": partition_date})]
                      for name, sql in SUITE_PARAMETERS.items() if _suite_uses(suite, name)}
    return int(total), parameters


def _frames(export: Path, chunk_rows: int, key: list[str]) -> Iterator[pd.DataFrame]:
    """Pandas frames of about `chunk_rows`, never splitting rows that share a uniqueness key."""
    carry: pa.Table | None = None
    for batch in pq.ParquetFile(export).iter_batches(batch_size=max(chunk_rows, 1)):
        chunk = pa.Table.from_batches([batch]) if carry is None else pa.concat_tables([carry, pa.Table.from_batches([batch])])
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


def _expectation_columns(expectation: dict[str, Any]) -> list[str]:
    kwargs = expectation.get("kwargs", {})
    return list(kwargs.get("column_list", [])) + ([kwargs["column"]] if "column" in kwargs else [])


def _suite_uses(suite: Suite, parameter: str) -> bool:
    return parameter in json.dumps(suite.expectations)


def suite_check_result(suite: Suite, tallies: list[ExpectationTally], validated: int, total: int,
                       seconds: float) -> dg.AssetCheckResult:
    failed = [t for t in tallies if not t.success]
    severity = dg.AssetCheckSeverity.ERROR if any(t.severity == "critical" for t in failed) else dg.AssetCheckSeverity.WARN
    rows = [(t.rule, t.kind.removeprefix("expect_"), "pass" if t.success else "FAIL", t.unexpected_count,
             t.observed if t.observed is not None else ", ".join(map(str, t.examples))) for t in tallies]
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
            "seconds": round(seconds, 2),
            "results": dg.MetadataValue.md(
                markdown_table(["rule", "expectation", "result", "unexpected", "observed"], rows, max_width=80)),
        },
    )


# Raw table -> the ingestion asset that writes it.
CHECKED_TABLES = {
    "products": "raw_products",
    "customers": "raw_customers",
    "customer_purchases": "raw_customers",
    "transactions": "raw_transactions",
}


def build_suite_check(table: str, asset: str) -> dg.AssetChecksDefinition:
    suite_name = table

    @dg.asset_check(
        asset=asset,
        name=f"{table}_expectation_suite",
        description=f"The GX suite expectations/{table}.json on the partition of raw.{table}.",
        partitions_def=daily_partitions,
        pool="duckdb",
        blocking=False,
    )
    def _check(context: dg.AssetCheckExecutionContext, config: SuiteCheckConfig,
               warehouse: DuckDBWarehouse) -> dg.AssetCheckResult:
        return run_suite_check(warehouse, load_suite(suite_name), f"raw.{table}", context.partition_key,
                               asset, config.chunk_rows, config.max_rows)

    return _check


# ---------------------------------------------------------------------------------------------
# A suite's result is kept per (table, partition, data fingerprint): re-running a check on data
# that has not changed reports the stored result instead of validating millions of rows again.
# ---------------------------------------------------------------------------------------------

SUITE_RUNS_TABLE = "ops.suite_runs"


def run_suite_check(warehouse: DuckDBWarehouse, suite: Suite, table: str, partition_key: str, asset: str,
                    chunk_rows: int, max_rows: int, partitioned: bool = True) -> dg.AssetCheckResult:
    """The suite's check result on a raw partition (or, `partitioned=False`, a current-state table)."""
    started = time.perf_counter()
    fingerprint = _data_fingerprint(warehouse, asset, partition_key, suite, max_rows)
    stored = _stored_suite_run(warehouse, table, partition_key, fingerprint) if fingerprint else None
    if stored is not None:
        tallies, validated, total = stored
        result = suite_check_result(suite, tallies, validated, total, time.perf_counter() - started)
        return result._replace(metadata={**result.metadata, "reused_result": True})
    tallies, validated, total = validate_partition(
        warehouse, suite, table, partition_key if partitioned else None, chunk_rows, max_rows)
    if fingerprint:
        _store_suite_run(warehouse, table, partition_key, fingerprint, tallies, validated, total)
    return suite_check_result(suite, tallies, validated, total, time.perf_counter() - started)


def _data_fingerprint(warehouse: DuckDBWarehouse, asset: str, partition_key: str, suite: Suite, max_rows: int) -> str | None:
    """What the checked data was built from: the landed batch (raw assets) or the last build (others)."""
    from assets.state import RAW_SOURCES, read_state

    with warehouse.connect(read_only=True) as con:
        if asset in RAW_SOURCES:
            if not table_exists(con, "ops.batch_fingerprints"):
                return None
            rows = fetch_all(con, "SELECT fingerprint FROM ops.batch_fingerprints WHERE source = ? AND partition_date = ?",
                             [RAW_SOURCES[asset], partition_key])
            data = rows[0][0] if rows else None
        else:
            state = read_state(con, asset)
            data = state["fingerprint"] if state else None
    return hashlib.sha256(f"{data}|{suite.digest}|{max_rows}".encode()).hexdigest()[:32] if data else None


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


suite_checks = [build_suite_check(table, asset) for table, asset in CHECKED_TABLES.items()]

defs = dg.Definitions(asset_checks=suite_checks)
