"""The current-state stages on the lakehouse: each stage's own build, on a private DuckDB that is
filled from Iceberg before and emptied into Iceberg after.

    lakehouse_stage_asset("recommendations")   # the asset lake_recommendations, daily partitions

A current-state stage (assets/common/current_state.py) reads its declared inputs' tables and its
own state, and writes its own tables. On the lakehouse every (stage, day) is a snapshot: the day's
Iceberg partition of each of its tables holds the tables as built as of that day, and a row of
`ops.asset_state` (partition = the day, keys asset=<stage>) holds its recorded state, the
measurements its checks are computed from, and the layout (DDL and column types) of each table.
That row is written last: it is the build's commit marker.

A run of stage S as of day D:
1. **States.** The latest `ops.asset_state` row up to D of S and of each input goes into a private
   DuckDB file, so the stage's own code decides as in the warehouse: a skip when its inputs are
   unchanged since its last build up to D, a build otherwise (or on force, or when that build was
   incomplete: open dead letters, a failed blocking check).
2. **Tables**, only for a build: each input's tables at its state's day, and S's own tables, dead
   letters and model items at its last build's day, recreated with their warehouse DDL and types;
   for a stage that embeds, the whole model cache (content-addressed: any day's vectors serve).
3. **Build**: the stage's unchanged build function and checks run on that file (no lock shared with
   anyone, no `duckdb` pool slot).
4. **Snapshot**: S's tables as day D's partitions, its dead letters and model items (keys
   stage=...), the cache rows it added (keys written_by=S), and last its state row. A build of
   the same (S, D) that committed meanwhile fails this one's commit check: the step retries.

Days are independent partitions, so any day may be built at any time (no "only forward" rule);
a stage that skips writes nothing, and its readers take its latest build up to their day.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb

from assets.common.current_state import (
    PII_TAG,
    PIPELINE_SCHEMAS,
    STATE_TABLE,
    ConcurrentBuildError,
    StageRecipe,
    as_of_day,
    checks_per_day,
    decide_stage,
    ensure_state_table,
    materialize_stage,
    stage_names,
    stage_recipe,
    tables_of,
)
from assets.common.partitions import daily_partitions
from assets.ingest.lakehouse_landing import LAKEHOUSE_GROUP, insert_from_lakehouse, write_query
from resources import pipeline_backend, step_memory_budget
from resources.lakehouse import PARTITION_COLUMN, Lakehouse
from resources.model_clients import batch_api, store
from resources.model_clients.batch_api import BATCHES_DDL
from resources.warehouse import DuckDBWarehouse, fetch_all

ITEMS_TABLE = "ops.embedding_items"  # the model clients' item maps (resources/model_clients/store.py)
STAGE_ROW_TABLES = ("ops.dead_letter", ITEMS_TABLE)  # rows a stage owns, by their `stage`
BATCHES_TABLE = "ops.embedding_batches"  # the Batch API's ledger (resources/model_clients/batch_api.py)
CACHE_TABLE = "ops.embedding_cache"
CACHE_KEY = "model, dimensions, text_hash"
KEPT_FOLDERS = ("models",)  # beside the warehouse file: what a build keeps for the next (recommendations' model)
WRITER_COLUMN = "written_by"  # the cache's rows on the lakehouse: which stage added them
FAR_FUTURE = "9999-12-31"


def lake_name(stage: str) -> str:
    return f"lake_{stage}"


# ---------------------------------------------------------------------------------------------
# The states on the lakehouse
# ---------------------------------------------------------------------------------------------

def latest_states(lakehouse: Lakehouse, day: str, assets: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{asset: its state row} of each asset's latest build up to the day (a row a build: small)."""
    reader = lakehouse.read_through(STATE_TABLE, day, where={"asset": sorted(set(assets))})
    latest: dict[str, dict[str, Any]] = {}
    for row in (reader.read_all().to_pylist() if reader is not None else []):
        if row["asset"] not in latest or row["as_of"] > latest[row["asset"]]["as_of"]:
            latest[row["asset"]] = row
    return latest


def table_layouts(con: duckdb.DuckDBPyConnection, tables: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{table: its DDL and column types} as DuckDB has them (the lakehouse stores some types as
    others: HUGEINT as DECIMAL, JSON as text, fixed-size arrays as lists)."""
    layouts = {}
    for table in tables:
        schema, name = table.split(".")
        [(ddl,)] = fetch_all(con, "SELECT sql FROM duckdb_tables() WHERE schema_name = ? AND table_name = ?",
                             [schema, name])
        columns = fetch_all(con, "SELECT column_name, data_type FROM duckdb_columns() WHERE schema_name = ? AND "
                                 "table_name = ? ORDER BY column_index", [schema, name])
        layouts[table] = {"ddl": ddl, "columns": [list(c) for c in columns]}
    return layouts


def publish_state(lakehouse: Lakehouse, con: duckdb.DuckDBPyConnection, asset: str, day: str,
                  layouts: dict[str, dict[str, Any]], marker: str, files: list[str] | None = None) -> None:
    """The asset's state row (from the DuckDB's ops.asset_state) as its (day, asset) row on the
    lakehouse, with its tables' layouts and its kept files: the commit marker of what was
    written before it."""
    write_query(lakehouse, con, STATE_TABLE, day,
                f"SELECT * REPLACE (metadata::VARCHAR AS metadata), $tables AS tables, $files AS files "
                f"FROM {STATE_TABLE} WHERE asset = $asset",
                {"asset": asset, "tables": json.dumps(layouts), "files": json.dumps(files or [])}, marker,
                {"asset": asset})


def state_marker(con: duckdb.DuckDBPyConnection, asset: str) -> str:
    """The marker of the asset's recorded build: its fingerprint and version."""
    [(fingerprint, version)] = fetch_all(con, f"SELECT fingerprint, version FROM {STATE_TABLE} WHERE asset = ?", [asset])
    return f"{fingerprint}:v{version}"


# ---------------------------------------------------------------------------------------------
# The private DuckDB: filled before a build, emptied after
# ---------------------------------------------------------------------------------------------

def hydrate_states(con: duckdb.DuckDBPyConnection, states: dict[str, dict[str, Any]]) -> None:
    ensure_state_table(con)
    for row in states.values():
        columns = [c for c in row if c not in ("tables", "files", PARTITION_COLUMN)]
        con.execute(f"INSERT INTO {STATE_TABLE} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                    [row[c] for c in columns])  # names from the state table


def hydrate_tables(con: duckdb.DuckDBPyConnection, lakehouse: Lakehouse, states: dict[str, dict[str, Any]],
                   only: Iterable[str] | None = None) -> None:
    """Each state's tables as of its build's day (`only`: these), with their DDL and types."""
    only = None if only is None else set(only)
    for row in states.values():
        for table, layout in json.loads(row["tables"] or "{}").items():
            if only is not None and table not in only:
                continue
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {table.split('.')[0]}")
            con.execute(layout["ddl"])  # DDL DuckDB wrote
            casts = ", ".join(f'"{column}"::{kind} AS "{column}"' for column, kind in layout["columns"])
            insert_from_lakehouse(con, lakehouse, table, str(row["as_of"]), day_only=True, select=casts)


def kept_files(folder: Path) -> list[str]:
    """The files a build keeps beside the warehouse file for its next build (a fitted model)."""
    return sorted(str(path.relative_to(folder)) for kept in KEPT_FOLDERS if (folder / kept).is_dir()
                  for path in (folder / kept).rglob("*") if path.is_file())


def fetch_kept_files(lakehouse: Lakehouse, state: dict[str, Any] | None, folder: Path) -> None:
    """The files the stage's last build kept, back beside the private warehouse file."""
    for relative in json.loads((state or {}).get("files") or "[]"):
        lakehouse.get_file(f"{state['asset']}/{relative}", folder / relative)


def keep_files(lakehouse: Lakehouse, stage: str, folder: Path) -> list[str]:
    """The build's kept files on the lakehouse (once: their names are unique); their names."""
    files = kept_files(folder)
    for relative in files:
        if not lakehouse.has_file(f"{stage}/{relative}"):
            lakehouse.put_file(f"{stage}/{relative}", folder / relative)
    return files


def row_tables_of(name: str) -> tuple[str, ...]:
    """The shared tables whose rows (by `stage`) a stage owns: its dead letters and model items,
    and for a stage that embeds, its Batch API ledger, so that a batch still running when a step
    stopped waiting is collected by the next build instead of paid for again."""
    embeds = "embedding_model" in stage_recipe(name).resources
    return STAGE_ROW_TABLES + ((BATCHES_TABLE,) if embeds else ())


def hydrate_stage_rows(con: duckdb.DuckDBPyConnection, lakehouse: Lakehouse, states: dict[str, dict[str, Any]],
                       tables: Iterable[str] = STAGE_ROW_TABLES) -> None:
    """The dead letters and model items (`tables`: these) each state's build left (its stages'
    rows at its day)."""
    store.ensure_tables_on(con)
    for name, row in states.items():
        for table in tables:
            insert_from_lakehouse(con, lakehouse, table, str(row["as_of"]), day_only=True,
                                  where="stage IN (SELECT unnest($stages::VARCHAR[]))",
                                  params={"stages": stages_of(name)})


def hydrate_cache(con: duckdb.DuckDBPyConnection, lakehouse: Lakehouse, stage: str, day: str,
                  text_hashes: Sequence[str] | None = None) -> None:
    """The whole model cache (one row a key; it is content-addressed, so any day's vectors
    serve), or only the vectors of `text_hashes`, and `main.lake_cache_seen`: its keys that came
    from other builds than this (stage, day)'s. The rows this build adds, or its earlier run
    added, are the rest."""
    store.ensure_tables_on(con)
    con.execute(f"CREATE TABLE main.lake_cache_seen AS SELECT {CACHE_KEY} FROM {CACHE_TABLE} LIMIT 0")
    reader = lakehouse.read_through(CACHE_TABLE, FAR_FUTURE,
                                    where=None if text_hashes is None else {"text_hash": list(text_hashes)})
    if reader is None:
        return
    con.register("lake_rows", reader)
    try:
        con.execute("CREATE TABLE main.lake_cache_rows AS SELECT * FROM lake_rows")
    finally:
        con.unregister("lake_rows")
    con.execute(f"INSERT INTO {CACHE_TABLE} BY NAME SELECT DISTINCT ON ({CACHE_KEY}) * EXCLUDE "
                f"({PARTITION_COLUMN}, {WRITER_COLUMN}) FROM main.lake_cache_rows")
    con.execute(f"INSERT INTO main.lake_cache_seen SELECT DISTINCT {CACHE_KEY} FROM main.lake_cache_rows "
                f"WHERE NOT ({PARTITION_COLUMN} = $day AND {WRITER_COLUMN} = $stage)", {"day": day, "stage": stage})
    con.execute("DROP TABLE main.lake_cache_rows")


CACHE_ADDITIONS = (f"SELECT c.*, $writer AS {WRITER_COLUMN} FROM {CACHE_TABLE} c "
                   f"ANTI JOIN main.lake_cache_seen USING ({CACHE_KEY})")  # after hydrate_cache


def write_cache_additions(lakehouse: Lakehouse, con: duckdb.DuckDBPyConnection, day: str, writer: str,
                          marker: str) -> None:
    """The vectors cached since hydrate_cache, as the cache's (day, writer) share."""
    write_query(lakehouse, con, CACHE_TABLE, day, CACHE_ADDITIONS, {"writer": writer}, marker, {WRITER_COLUMN: writer})


def hydrate_ledger(con: duckdb.DuckDBPyConnection, lakehouse: Lakehouse, name: str) -> None:
    """The stage's Batch API ledger from every day on the lake, builds' and unfinished steps'
    (write_ledger_to_lake), each batch once: collected if any row says so, else its latest."""
    con.execute(BATCHES_DDL)
    reader = lakehouse.read_through(BATCHES_TABLE, FAR_FUTURE, where={"stage": [name]})
    if reader is None:
        return
    con.register("lake_ledger", reader)
    try:
        con.execute(f"""INSERT INTO {BATCHES_TABLE} BY NAME
                        SELECT DISTINCT ON (batch_id) * EXCLUDE ({PARTITION_COLUMN}) FROM lake_ledger
                        ORDER BY batch_id, collected_at IS NULL, {PARTITION_COLUMN} DESC""")
    finally:
        con.unregister("lake_ledger")


def ledger_keeper(lakehouse: Lakehouse, warehouse: DuckDBWarehouse, name: str, day: str,
                  log: Any) -> Callable[[], None]:
    """write_ledger_to_lake as a callback that never raises (batch_api.on_ledger_written's rule):
    the step goes on, or reports its own failure; the build writes the ledger too."""
    def keep() -> None:
        try:
            write_ledger_to_lake(lakehouse, warehouse, name, day)
        except Exception as error:
            log.warning(f"{name}: its Batch API ledger could not be kept on the lakehouse: {error}")
    return keep


def write_ledger_to_lake(lakehouse: Lakehouse, warehouse: DuckDBWarehouse, name: str, day: str) -> None:
    """The stage's Batch API ledger on the lake as it stands, before its build: written when a
    batch is submitted (so a step killed outright leaves it) and when a step fails (it gave up
    polling, it was terminated), so the next build collects the batch instead of paying again.
    The build's own write of the day replaces it."""
    with warehouse.connect(read_only=True) as con:
        held = fetch_all(con, "SELECT 1 FROM duckdb_tables() WHERE schema_name = 'ops' AND table_name = "
                              "'embedding_batches'")  # not there when the step failed before its build began
        if not held or not fetch_all(con, f"SELECT 1 FROM {BATCHES_TABLE} WHERE stage = ? LIMIT 1", [name]):
            return
        write_query(lakehouse, con, BATCHES_TABLE, day, f"SELECT * FROM {BATCHES_TABLE} WHERE stage = $stage",
                    {"stage": name}, f"unfinished:{uuid.uuid4().hex[:12]}", {"stage": name})


def stages_of(name: str) -> list[str]:
    """The `stage` values of the rows a stage owns: its name, and its dead letters' stage."""
    dead_letter_stage = stage_recipe(name).spec.dead_letter_stage
    return [name] + ([dead_letter_stage] if dead_letter_stage and dead_letter_stage != name else [])


def input_tables(states: dict[str, dict[str, Any]], inputs: Iterable[str]) -> set[str]:
    return {table.lower() for name in inputs for table in json.loads(states[name]["tables"] or "{}")}


def own_tables(con: duckdb.DuckDBPyConnection, taken: set[str]) -> list[str]:
    """The pipeline tables in the DuckDB that are not its inputs': the stage's own."""
    rows = fetch_all(con, "SELECT schema_name || '.' || table_name FROM duckdb_tables() WHERE schema_name IN "
                          "(SELECT unnest(?::VARCHAR[])) ORDER BY 1", [list(PIPELINE_SCHEMAS)])
    return [table for (table,) in rows if table.lower() not in taken]


# What consumers read, "the recommendations of day D": written by lake_validated_recommendations
# on the lakehouse backend, by published_recommendations (assets/outputs/publish.py) on the
# warehouse's.
SERVED_TABLE = "outputs.recommendations"


def refuse_to_serve_on_the_warehouse_backend(name: str) -> None:
    """On the warehouse backend published_recommendations writes the served days: a lake build
    (a trial of lakehouse_pipeline on that catalog) must write none of them, published yet or not,
    or consumers would read the trial's recommendations. Refused before anything is written."""
    if SERVED_TABLE not in tables_of(name) or pipeline_backend() != "warehouse":
        return  # not its table, or the lake is the backend: its builds write what is served
    raise dg.Failure(
        f"{SERVED_TABLE} is what consumers read, and on the warehouse backend (PIPELINE_BACKEND=warehouse) "
        f"published_recommendations writes it: {name} on the lakehouse would serve a trial's recommendations. "
        "Switch to PIPELINE_BACKEND=lakehouse (the lake then serves), or try lakehouse_pipeline with "
        "PIPELINE_BACKEND=lakehouse against another catalog (LAKEHOUSE_CATALOG_URI or LAKEHOUSE_REST_URI).",
        allow_retries=False)


def snapshot_build(lakehouse: Lakehouse, warehouse: DuckDBWarehouse, recipe: StageRecipe, day: str,
                   taken: set[str], caches: bool, built_before: dict | None) -> str:
    """The build's tables, rows and cache additions as day `day` on the lakehouse, its state row
    last. Refused (the step retries) when another build of the same (stage, day) committed since
    this one read the states."""
    name = recipe.spec.name

    def refuse_if_built_meanwhile() -> None:
        now = latest_states(lakehouse, day, [name]).get(name)
        if now is not None and str(now["as_of"]) == day and now != built_before:
            raise ConcurrentBuildError(f"{name} as of {day} was built by another run meanwhile")

    refuse_if_built_meanwhile()
    with warehouse.connect(read_only=True) as con:
        # this build's own: a table a dead attempt of the same version wrote is not taken for it
        marker = f"{state_marker(con, name)}:{uuid.uuid4().hex[:12]}"
        tables = own_tables(con, taken)
        # its tables whole, and its rows of the shared ones (names from the catalog and our constants)
        writes = [(table, None) for table in tables] + [(table, {"stage": stage}) for table in row_tables_of(name)
                                                        for stage in stages_of(name)]
        for table, keys in writes:
            write_query(lakehouse, con, table, day, f"SELECT * FROM {table}" + (" WHERE stage = $stage" if keys else ""),
                        keys or {}, marker, keys)
        if caches:
            write_cache_additions(lakehouse, con, day, name, marker)
        files = keep_files(lakehouse, name, warehouse.file.parent)
        refuse_if_built_meanwhile()
        # and when a write was replaced or dropped meanwhile (another run; the retention pruning
        # an old day): a state row over missing tables would read as empty tables
        lost = [table for table, keys in writes if lakehouse.day_fingerprint(table, day, keys) != marker]
        if lost:
            raise ConcurrentBuildError(f"{name} as of {day}: {', '.join(lost)} replaced or dropped meanwhile")
        publish_state(lakehouse, con, name, day, table_layouts(con, tables), marker, files)
    return marker


# ---------------------------------------------------------------------------------------------
# The asset
# ---------------------------------------------------------------------------------------------

class _Resources:
    """The run's resources, with the stage's private warehouse as `warehouse`."""

    def __init__(self, resources: Any, warehouse: DuckDBWarehouse):
        self._resources, self.warehouse = resources, warehouse

    def __getattr__(self, name: str) -> Any:
        return getattr(self._resources, name)


class _OnPrivateWarehouse:
    """The run's context as the stage's build sees it: everything the same but the warehouse."""

    def __init__(self, context: dg.AssetExecutionContext, warehouse: DuckDBWarehouse):
        self._context, self.resources = context, _Resources(context.resources, warehouse)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def private_warehouse(folder: Path) -> DuckDBWarehouse:
    """A step's own DuckDB file, with the warehouse's memory rule."""
    return DuckDBWarehouse(path=str(folder / "stage.duckdb"), memory_limit=os.getenv("DUCKDB_MEMORY_LIMIT", "1GB"),
                           step_memory_budget=step_memory_budget())


@contextmanager
def builds_on_private_warehouse(lakehouse: Lakehouse, day: str, tables: dict[str, list[str]]) -> Iterator[DuckDBWarehouse]:
    """A private DuckDB with the latest builds up to the day of these stages: their state rows
    and the tables named ({stage: tables}), for a check that judges a build (as its warehouse
    twin judges the warehouse's)."""
    states = latest_states(lakehouse, day, tables)
    missing = sorted(set(tables) - set(states))
    if missing:
        raise dg.Failure(f"{', '.join(missing)} has no build on the lakehouse up to {day}", allow_retries=False)
    with tempfile.TemporaryDirectory(prefix="lake-check-") as folder:
        warehouse = private_warehouse(Path(folder))
        with warehouse.transaction() as con:
            hydrate_states(con, states)
            hydrate_tables(con, lakehouse, states, only=[t for names in tables.values() for t in names])
        yield warehouse


def run_on_lakehouse(recipe: StageRecipe, context: dg.AssetExecutionContext, config: Any,
                     lakehouse: Lakehouse) -> dg.MaterializeResult:
    """The stage's own decision, build and checks, on a private DuckDB filled from the lakehouse."""
    spec = recipe.spec
    day = as_of_day(context).isoformat()
    states = latest_states(lakehouse, day, [spec.name, *spec.inputs])
    missing = [name for name in spec.inputs if name not in states]
    if missing:
        raise dg.Failure(f"{spec.name} as of {day}: {', '.join(missing)} has no build on the lakehouse up to that "
                         "day; materialize its lake asset for the day first", metadata={"missing_inputs": missing},
                         allow_retries=False)
    caches = "embedding_model" in recipe.resources
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"lake-{spec.name}-") as folder:
        warehouse = private_warehouse(Path(folder))
        with warehouse.transaction() as con:
            hydrate_states(con, states)
        on_private = _OnPrivateWarehouse(context, warehouse)
        if decide_stage(recipe, on_private, config)[0].build:  # else the stage reports its skip
            refuse_to_serve_on_the_warehouse_backend(spec.name)
            with warehouse.transaction() as con:
                hydrate_tables(con, lakehouse, states)
                # its own dead letters and model items: no stage reads another's
                hydrate_stage_rows(con, lakehouse, {n: row for n, row in states.items() if n == spec.name})
                if caches:
                    hydrate_cache(con, lakehouse, spec.name, day)
                    hydrate_ledger(con, lakehouse, spec.name)
            fetch_kept_files(lakehouse, states.get(spec.name), Path(folder))
            context.log.info(f"{spec.name}: inputs and state read from the lakehouse in "
                             f"{time.perf_counter() - started:.1f}s")
        keep_ledger = ledger_keeper(lakehouse, warehouse, spec.name, day, context.log)
        try:
            with batch_api.on_ledger_written(keep_ledger) if caches else nullcontext():
                result = materialize_stage(recipe, on_private, config)
        except BaseException:
            if caches:
                keep_ledger()
            raise
        if result.metadata.get("skipped"):
            return result
        try:
            marker = snapshot_build(lakehouse, warehouse, recipe, day, input_tables(states, spec.inputs), caches,
                                    states.get(spec.name))
        except ConcurrentBuildError as error:
            context.log.warning(f"{error}: building again")
            raise dg.RetryRequested(max_retries=3, seconds_to_wait=1.0) from error
    metadata = {**result.metadata, "lakehouse_marker": marker, "seconds": round(time.perf_counter() - started, 3)}
    return dg.MaterializeResult(metadata=metadata, check_results=result.check_results)


def lakehouse_stage_asset(name: str, upstream: dict[str, str]) -> dg.AssetsDefinition:
    """The stage `name` on the lakehouse, as the asset lake_<name>; `upstream`: the lake asset that
    builds each of its inputs there."""
    recipe = stage_recipe(name)
    asset = lake_name(name)
    resources = (set(recipe.resources) - {"warehouse"}) | {"lakehouse"}

    def body(context: dg.AssetExecutionContext, config: Any) -> Iterator[Any]:
        yield from checks_per_day(context, run_on_lakehouse(recipe, context, config, context.resources.lakehouse))

    body.__name__ = asset
    body.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
        inspect.Parameter("context", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=dg.AssetExecutionContext),
        inspect.Parameter("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=recipe.config_class),
    ])
    return dg.asset(
        name=asset,
        deps=sorted({upstream[i] for i in recipe.spec.inputs}),
        partitions_def=daily_partitions,
        group_name=LAKEHOUSE_GROUP,
        kinds={"iceberg", "python"},
        check_specs=[dg.AssetCheckSpec(c.name, asset=asset, blocking=c.blocking, description=c.description)
                     for c in recipe.checks],
        required_resource_keys=resources,
        description=f"{name} on the lakehouse: its build as of the day, its tables as Iceberg partitions "
                    f"(no DuckDB warehouse, no lock). {recipe.description or ''}",
        tags=PII_TAG if recipe.personal_data else None,
    )(body)


def build_lakehouse_stage_assets(models_asset: str, model_names: Iterable[str],
                                 assets: Iterable[dg.AssetsDefinition]) -> list[dg.AssetsDefinition]:
    """lake_<stage> for every current-state stage among `assets` (the stages after the SQL
    models); the SQL models come from `models_asset` (lake_sql_models, which writes every model's
    state row)."""
    stages = stages_among(assets)
    upstream = {**{name: models_asset for name in model_names}, **{name: lake_name(name) for name in stages}}
    return [lakehouse_stage_asset(name, upstream) for name in stages]


def stages_among(assets: Iterable[dg.AssetsDefinition]) -> list[str]:
    """The assets that are current-state stages (embeddings, segments, recommendations, output
    rules, evaluation), by name."""
    registered = set(stage_names())
    return [key.to_user_string() for asset in assets for key in asset.keys if key.to_user_string() in registered]
