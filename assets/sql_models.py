"""dbt-style SQL models: each `sql/<name>.sql` is one asset `<name>` writing `analytics.<name>`.

Upstream assets come from the tables the SQL reads, found with a real SQL parser (sqlglot).
The partition's day reaches the SQL as the parameter `$as_of`; a model is rebuilt only when its
SQL or what it reads changed (see assets/state.py).
"""


import hashlib
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import dagster as dg
import sqlglot
from sqlglot import exp

from assets.metadata import table_preview, table_schema
from assets.partitions import daily_partitions
from assets.state import BuildConfig, as_of_day, decide_from_upstream, skipped_result, write_state
from resources.warehouse import DuckDBWarehouse, fetch_scalar

SQL_DIR = Path(__file__).resolve().parents[1] / "sql"
MODEL_SCHEMA = "analytics"

# Tables written by ingestion and the asset that owns each one.
RAW_TABLE_OWNERS = {
    "raw.products": "raw_products",
    "raw.customers": "raw_customers",
    "raw.customer_purchases": "raw_customers",
    "raw.transactions": "raw_transactions",
}


@dataclass(frozen=True)
class SqlModel:
    name: str
    sql: str

    @property
    def table(self) -> str:
        return f"{MODEL_SCHEMA}.{self.name}"

    @cached_property
    def parsed(self) -> exp.Expression:
        return sqlglot.parse_one(self.sql, read="duckdb")

    @cached_property
    def tables_read(self) -> tuple[str, ...]:
        cte_names = {cte.alias_or_name for cte in self.parsed.find_all(exp.CTE)}
        found = {
            f"{t.db}.{t.name}" if t.db else t.name
            for t in self.parsed.find_all(exp.Table)
            if t.db or t.name not in cte_names
        }
        return tuple(sorted(found))

    @cached_property
    def parameters(self) -> tuple[str, ...]:
        return tuple(sorted({p.name for p in self.parsed.find_all(exp.Placeholder) if p.name}))

    @property
    def description(self) -> str:
        """The leading `--` comment block of the file."""
        lines = []
        for line in self.sql.splitlines():
            if not line.startswith("--"):
                break
            lines.append(line[2:].strip())
        return " ".join(lines)

    @property
    def code_version(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()[:16]


def load_models(sql_dir: Path = SQL_DIR) -> list[SqlModel]:
    return [SqlModel(path.stem, path.read_text()) for path in sorted(sql_dir.glob("*.sql"))]


def upstream_assets(model: SqlModel, model_names: set[str]) -> list[str]:
    """Map each table the SQL reads to the asset that writes it; unknown tables are an error."""
    owners = []
    for table in model.tables_read:
        schema, _, name = table.rpartition(".")
        if table in RAW_TABLE_OWNERS:
            owners.append(RAW_TABLE_OWNERS[table])
        elif schema == MODEL_SCHEMA and name in model_names:
            owners.append(name)
        else:
            raise ValueError(f"sql/{model.name}.sql reads {table!r}, which no asset writes")
    return sorted(set(owners))


def sql_parameters(model: SqlModel, context: dg.AssetExecutionContext) -> dict[str, object]:
    window = context.partition_time_window
    available = {
        "as_of": as_of_day(context),
        "window_start": window.start.date(),
        "window_end": window.end.date(),
    }
    unknown = set(model.parameters) - available.keys()
    if unknown:
        raise dg.Failure(f"sql/{model.name}.sql uses unknown parameters {sorted(unknown)}; available: {sorted(available)}")
    return {name: available[name] for name in model.parameters}


def build_sql_asset(model: SqlModel, model_names: set[str]) -> dg.AssetsDefinition:
    upstream = upstream_assets(model, model_names)

    @dg.asset(
        name=model.name,
        description=model.description or None,
        deps=upstream,
        partitions_def=daily_partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        group_name="analytics",
        code_version=model.code_version,
        pool="duckdb",
        kinds={"duckdb", "sql"},
        metadata={"table": model.table, "sql_file": f"sql/{model.name}.sql"},
    )
    def _sql_model(context: dg.AssetExecutionContext, config: BuildConfig, warehouse: DuckDBWarehouse) -> dg.MaterializeResult:
        as_of = as_of_day(context)
        params = sql_parameters(model, context)
        started = time.perf_counter()
        with warehouse.transaction() as con:
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {MODEL_SCHEMA}")
            decision = decide_from_upstream(con, model.name, as_of, upstream, [model.code_version, params], config.force)
            if not decision.build:
                return skipped_result(context, decision, as_of=str(as_of))
            con.execute(f"CREATE OR REPLACE TABLE {model.table} AS {model.sql}", params)
            row_count = fetch_scalar(con, f"SELECT count(*) FROM {model.table}")
            write_state(con, model.name, as_of, decision.fingerprint, row_count)
            preview = table_preview(con, f"SELECT * FROM {model.table}")
            schema = table_schema(con, model.table)
        seconds = time.perf_counter() - started
        context.log.info(f"{model.table}: {row_count:,} rows as of {as_of} in {seconds:.1f}s ({decision.reason})")
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": row_count,
                "dagster/column_schema": schema,
                "as_of": str(as_of),
                "seconds": round(seconds, 3),
                "build_reason": decision.reason,
                "fingerprint": decision.fingerprint,
                "preview": preview,
                "skipped": False,
            }
        )

    return _sql_model


def build_sql_assets(sql_dir: Path = SQL_DIR) -> list[dg.AssetsDefinition]:
    models = load_models(sql_dir)
    names = {m.name for m in models}
    return [build_sql_asset(model, names) for model in models]


defs = dg.Definitions(assets=build_sql_assets())
