"""dbt-style SQL models: each `sql/<name>.sql` is one asset `<name>` writing `analytics.<name>`.

Upstream assets come from the tables the SQL reads, found with a real SQL parser (sqlglot).
The partition's day reaches the SQL as the parameter `$as_of`; a model is rebuilt only when its
SQL, its parameters or what it reads changed (assets/common/current_state.py). dbt-style tests
declared next to the SQL (`sql/schema.yml`) are its blocking checks (model_tests.py).
"""


import datetime as dt
import hashlib
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import dagster as dg
import sqlglot
from sqlglot import exp

from assets.common.catalog import code_references
from assets.common.current_state import Built, StateBuild, as_of_day, current_state_asset, read_state, register_sources
from assets.common.metadata import table_preview, table_schema
from assets.common.sources import SOURCES, Source, personal_columns, raw_table_owners
from assets.transform import incremental, model_tests, sharded
from assets.transform.model_tests import ModelTest
from resources.warehouse import fetch_all, fetch_scalar

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
MODEL_SCHEMA = "analytics"


@dataclass(frozen=True)
class SqlModel:
    name: str
    sql: str
    path: Path | None = None  # its file under sql/

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

    @cached_property
    def order_by(self) -> str:
        """The final SELECT's ORDER BY over output columns (the order a full build stores), or ''."""
        order = self.parsed.args.get("order")
        if order is None or not all(isinstance(o.this, exp.Column) for o in order.expressions):
            return ""
        return order.sql(dialect="duckdb")

    def sorted_first_by(self, column: str) -> bool:
        """Whether the order a full build stores (if any) starts with `column`, ascending: rows
        computed range by range of it and appended in range order keep that order."""
        order = self.parsed.args.get("order")
        if order is None:
            return True
        first = order.expressions[0]  # an expression (say lower(key)) is not the key's order
        return isinstance(first.this, exp.Column) and not first.args.get("desc") and first.this.name == column

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
    return [SqlModel(path.stem, path.read_text(), path) for path in sorted(sql_dir.glob("*.sql"))]


def upstream_assets(model: SqlModel, model_names: set[str], raw_owners: dict[str, str] | None = None) -> list[str]:
    """Map each table the SQL reads to the asset that writes it; unknown tables are an error."""
    raw_owners = raw_table_owners() if raw_owners is None else raw_owners
    owners = []
    for table in model.tables_read:
        schema, _, name = table.rpartition(".")
        if table in raw_owners:
            owners.append(raw_owners[table])
        elif schema == MODEL_SCHEMA and name in model_names:
            owners.append(name)
        else:
            raise ValueError(f"sql/{model.name}.sql reads {table!r}, which no asset writes")
    return sorted(set(owners))


def sql_parameters(model: SqlModel, context: dg.AssetExecutionContext, as_of: dt.date | None = None
                   ) -> dict[str, object]:
    """The parameters a model uses, for the build's day (`as_of`; the run's by default: a build
    that catches up the table's later day is as of that day, its window that day alone)."""
    run_day = as_of_day(context)
    as_of = as_of or run_day
    window = context.partition_time_window
    start, end = (window.start.date(), window.end.date()) if as_of == run_day else (as_of, as_of + dt.timedelta(days=1))
    available = {"as_of": as_of, "window_start": start, "window_end": end}
    unknown = set(model.parameters) - available.keys()
    if unknown:
        raise dg.Failure(f"sql/{model.name}.sql uses unknown parameters {sorted(unknown)}; available: {sorted(available)}",
                         allow_retries=False)
    return {name: available[name] for name in model.parameters}


def holds_personal_data(model: SqlModel, models: dict[str, SqlModel], personal: set[str]) -> bool:
    """Whether the model's rows carry a personal column: by its output columns, or, for a
    `SELECT *`, by what it reads."""
    named = set(model.parsed.named_selects)
    if "*" not in named:
        return bool(named & personal)
    upstream = [models[t.split(".", 1)[1]] for t in model.tables_read if t.startswith(f"{MODEL_SCHEMA}.")]
    return any(holds_personal_data(m, models, personal) for m in upstream) or any(
        t.startswith("raw.") for t in model.tables_read)


def build_sql_asset(model: SqlModel, model_names: set[str], owners: dict[str, str],
                    personal_data: bool = False, tests: list[ModelTest] | None = None,
                    keyed: incremental.Incremental | None = None,
                    upstream: dict[str, incremental.Incremental] | None = None,
                    run_first: bool = False) -> dg.AssetsDefinition:
    """`upstream`: the incremental models among its inputs, by table (see incremental.kept_upstream);
    `run_first`: a run launches it before the other ready steps of priority 0."""
    tests = tests or []

    @current_state_asset(
        name=model.name,
        inputs=upstream_assets(model, model_names, owners),
        tables=[model.table],
        group="transform",
        description=model.description or None,
        code_version=model.code_version,
        # The day reaches the SQL as a parameter: it is part of what the model produces.
        fingerprint_extra=lambda context, as_of: sql_parameters(model, context, as_of),
        kinds={"duckdb", "sql"},
        metadata={"table": model.table, "sql_file": f"sql/{model.name}.sql", **(code_references(model.path) if model.path else {})},
        personal_data=personal_data,
        # A full build can run on the compute engine: a keyed model's in shards (sharded.py).
        resources=("warehouse", "compute_engine"),
        checks=model_tests.check_specs(model.name, tests),
        verdicts=model_tests.verdicts(tests) if tests else None,
        priority=int(run_first),
    )
    def _build(build: StateBuild) -> Built:
        params = sql_parameters(model, build.context, build.as_of)
        with ExitStack() as stack:
            computed, where = None, {}
            engine = build.resources.compute_engine
            in_shards = engine.builds_in_shards(keyed is not None)
            if in_shards and (keyed is None or rebuilds_fully(build, model, keyed)):
                computed = stack.enter_context(sharded.computed_on_engine(build, model, keyed, params, engine))
                where = {**engine.describe(), "engine_shards": computed[2]}
            with build.warehouse.transaction() as con:
                con.execute(f"CREATE SCHEMA IF NOT EXISTS {MODEL_SCHEMA}")
                mode, why, keys, kept = build_table(con, build, model, params, keyed,
                                                    computed[0] if computed else None, upstream or {})
                row_count = fetch_scalar(con, f"SELECT count(*) FROM {model.table}")
                violations = model_tests.measure(con, tests, model.table, MODEL_SCHEMA)
                build.record(con, row_count, {"rows": row_count, "test_violations": violations,
                                              "build": {"mode": mode, "reason": why, "keys_rebuilt": keys,
                                                        "code": model.code_version,
                                                        **stored_order(build, model, mode, keys)}})
                preview = table_preview(con, f"SELECT * FROM {model.table}")
                schema = table_schema(con, model.table)
        build.log.info(f"{model.table}: {mode} ({why})")
        return Built({"dagster/row_count": row_count, "dagster/column_schema": schema, "preview": preview,
                      "build_mode": mode, "build_mode_reason": why, **where,
                      **({"keys_rebuilt": keys} if keys is not None else {}),
                      **({"key_fingerprints_kept_from": kept} if kept else {})})

    return _build


def build_table(con, build: StateBuild, model: SqlModel, params: dict, spec: incremental.Incremental | None,
                computed: Path | None = None, upstream: dict[str, incremental.Incremental] | None = None
                ) -> tuple[str, str, int | None, list[str]]:
    """Rebuild the table, or (an incremental model continuing its last build) only its changed keys.
    `computed`: the full build's rows, already computed on the compute engine (sharded.py).
    Returns (mode, reason, keys rebuilt, the upstream models whose key fingerprints it took)."""
    if spec is None:
        if computed is not None:
            load_computed(con, model, params, computed)
        else:
            con.execute(f"CREATE OR REPLACE TABLE {model.table} AS {model.sql}", params)
        return "full", "not an incremental model", None, []
    spec = spec.bind(con, model.tables_read)
    built_with = {u.model: built_code(read_state(con, u.model)) for u in (upstream or {}).values()}
    kept = incremental.kept_upstream(con, spec, upstream or {}, built_with)
    incremental.fingerprint_now(con, spec, params.get("as_of"), kept)
    kept_from = sorted(model_name for model_name, _ in kept.values())
    reason = continue_reason(con, build, spec, model)
    if reason is None:
        if computed is not None:
            load_computed(con, model, params, computed)
        elif not incremental.build_in_key_ranges(con, spec, model.table, model.sql, params,
                                                 model.sorted_first_by(spec.unique_key)):
            con.execute(f"CREATE OR REPLACE TABLE {model.table} AS {model.sql}", params)
        incremental.remember(con, spec)
        return "full", full_reason(build), None, kept_from
    keys = incremental.changed_keys(con, spec)
    incremental.update(con, spec, model.table, model.sql, params, model.order_by)
    incremental.remember(con, spec, only_differing=True)
    return "incremental", reason, keys, kept_from


def built_code(state) -> str | None:
    """The code version a model's stored build ran (None: no build recorded)."""
    return (state.measurements.get("build") or {}).get("code") if state else None


def load_computed(con, model: SqlModel, params: dict, computed: Path) -> None:
    """The shards' rows into the model's table, with the column types the SQL gives here
    (Parquet has no HUGEINT: a sum of integers comes back as DOUBLE and is cast back)."""
    columns = fetch_all(con, f"DESCRIBE {model.sql}", params)  # binds the query, runs nothing
    con.execute(f"CREATE OR REPLACE TABLE {model.table} ({', '.join(f'{quote(name)} {kind}' for name, kind, *_ in columns)})")
    con.execute(f"INSERT INTO {model.table} BY NAME SELECT * FROM read_parquet(?) {model.order_by}",
                [str(computed / "*.parquet")])


def stored_order(build: StateBuild, model: SqlModel, mode: str, keys: int | None) -> dict:
    """For a model with an ORDER BY: whether its table is stored in that order. A full build is;
    an incremental one appends the changed keys' rows (each key still one run, in order), so the
    table stays in order only if no key changed (readers sort meanwhile: assets/infer/purchases.py)."""
    if not model.order_by:
        return {}
    stored = build.decision.stored
    was_in_order = stored is not None and (stored.measurements.get("build") or {}).get("in_order", True)
    return {"in_order": mode == "full" or (keys == 0 and was_in_order)}


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def rebuilds_fully(build: StateBuild, model: SqlModel, spec: incremental.Incremental) -> bool:
    """Whether this build will be a full one (decided again in the write transaction)."""
    with build.warehouse.connect(read_only=True) as con:
        return continue_reason(con, build, spec, model) is None


def continue_reason(con, build: StateBuild, spec: incremental.Incremental, model: SqlModel) -> str | None:
    """Why this build may update the last one by key, or None (a full rebuild)."""
    stored = build.decision.stored
    if stored is None or not stored.complete or build.config.force or stored.as_of > build.as_of:
        return None
    if built_code(stored) != model.code_version:  # new SQL: every key
        return None
    if set(model.parameters) - {"as_of"} or not incremental.has_fingerprints(con, spec):
        return None
    return f"keys whose inputs changed since the build as of {stored.as_of}"


def full_reason(build: StateBuild) -> str:
    stored = build.decision.stored
    if stored is None:
        return "first build"
    if build.config.force:
        return "forced by run config"
    return "no complete earlier build with key fingerprints to continue"


def build_sql_assets(sql_dir: Path = SQL_DIR, sources: tuple[Source, ...] = SOURCES) -> list[dg.AssetsDefinition]:
    register_sources(sources)
    models = load_models(sql_dir)
    by_name = {m.name: m for m in models}
    owners = raw_table_owners(sources)
    personal = set(personal_columns(sources))
    tests = model_tests.load_tests(sql_dir)
    unknown = set(tests) - set(by_name)
    if unknown:
        raise ValueError(f"sql/{model_tests.SCHEMA_FILE} tests models that do not exist: {sorted(unknown)}")
    increments = incremental.load_incremental(sql_dir)
    unknown = set(increments) - set(by_name)
    if unknown:
        raise ValueError(f"sql/{model_tests.SCHEMA_FILE} declares incremental models that do not exist: {sorted(unknown)}")
    # Only models whose rows follow from their inputs and SQL alone: another parameter (config)
    # could change the rows without changing the fingerprints.
    by_table = {by_name[name].table: spec for name, spec in increments.items()
                if set(by_name[name].parameters) <= {"as_of"}}
    run_first = load_run_first(sql_dir)
    unknown = set(run_first) - set(by_name)
    if unknown:
        raise ValueError(f"sql/{model_tests.SCHEMA_FILE} runs first models that do not exist: {sorted(unknown)}")
    return [build_sql_asset(model, set(by_name), owners, holds_personal_data(model, by_name, personal),
                            tests.get(model.name), increments.get(model.name),
                            {t: by_table[t] for t in model.tables_read if t in by_table},
                            model.name in run_first) for model in models]


def load_run_first(sql_dir: Path) -> list[str]:
    """The models sql/schema.yml lists under `run_first`."""
    return list(model_tests.schema_section(sql_dir, "run_first") or [])
