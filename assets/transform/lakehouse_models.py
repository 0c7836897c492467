"""The SQL models on the lakehouse: sql/ over the raw layer's Iceberg tables, each model's table as
of a day written as that day's Iceberg partition of `analytics.<model>`.

    built = build_models_on_lakehouse(lakehouse, day)    # -> LakehouseModels
    lake_sql_models_asset()                              # the asset lake_sql_models, daily partitions

The raw tables up to the day are read from Iceberg (Arrow) into a private DuckDB, and each model's
own SQL (the same file as the warehouse's) builds its table there in dependency order: a full
build, as the warehouse's first build of a day (in ranges of its key where sql/schema.yml says
so); the incremental state of the warehouse has no use here, since a day's partition is written
whole. The dbt-style tests of sql/schema.yml run on
the built tables, and a model that breaks one fails the step before anything is written. Then
each model goes to the lakehouse in one commit, and then its state row in `ops.asset_state`
(version 1; its tables' layouts), from which the stages after it read it as their input
(assets/common/lakehouse_stages.py). Every model's marker is a digest of the sql/
files and of the raw layer's batch markers up to the day: a re-run with nothing new is a skip,
and a landed file or a changed model rebuilds the day.
"""

import datetime as dt
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import duckdb

from assets.common.current_state import STATE_TABLE, ConcurrentBuildError, write_state
from assets.common.lakehouse_stages import publish_state, table_layouts
from assets.common.partitions import daily_partitions
from assets.common.sources import SOURCES, Source
from assets.ingest.lakehouse_landing import (
    LAKEHOUSE_GROUP,
    LakeModelsConfig,
    insert_from_lakehouse,
    lake_asset_name,
    landed_days,
    staging_memory_limit,
    wait_for_landed_days,
    write_query,
)
from assets.ingest.raw_assets import ensure_tables
from assets.transform import incremental, model_tests
from assets.transform.sql_models import MODEL_SCHEMA, SQL_DIR, SqlModel, load_models
from resources.lakehouse import Lakehouse, Written
from resources.landing import LandingZone

LAKE_MODELS_ASSET = "lake_sql_models"


@dataclass(frozen=True)
class LakehouseModels:
    day: str
    skipped: bool
    written: dict[str, Written]  # per model table
    seconds: float


def models_in_order(models: list[SqlModel]) -> list[SqlModel]:
    """Each model after the models it reads (sql/ has no cycles: a cycle is an error here)."""
    by_table = {m.table: m for m in models}
    ordered: list[SqlModel] = []
    visiting: set[str] = set()

    def visit(model: SqlModel) -> None:
        if model in ordered:
            return
        if model.table in visiting:
            raise ValueError(f"sql/{model.name}.sql reads itself through other models")
        visiting.add(model.table)
        for table in model.tables_read:
            if table in by_table:
                visit(by_table[table])
        ordered.append(model)

    for model in models:
        visit(model)
    return ordered


def models_fingerprint(lakehouse: Lakehouse, models: list[SqlModel], sources: tuple[Source, ...], day: str) -> str:
    """A digest of the models' SQL and of every source's batch markers up to the day."""
    landed = {source.name: sorted(landed_days(lakehouse, source.name, day).items()) for source in sources}
    code = {model.name: model.code_version for model in models}
    return hashlib.sha256(json.dumps([code, landed]).encode()).hexdigest()[:32]


def build_models_on_lakehouse(lakehouse: Lakehouse, day: str, sources: tuple[Source, ...] = SOURCES,
                              sql_dir: Path = SQL_DIR, memory_limit: str | None = None, force: bool = False
                              ) -> LakehouseModels:
    started = time.perf_counter()
    models = models_in_order(load_models(sql_dir))
    fingerprint = models_fingerprint(lakehouse, models, sources, day)
    if not force and all(lakehouse.day_fingerprint(m.table, day) == fingerprint and
                         lakehouse.day_fingerprint(STATE_TABLE, day, {"asset": m.name}) == f"{fingerprint}:v1"
                         for m in models):
        return LakehouseModels(day, True, {}, time.perf_counter() - started)
    tests = model_tests.load_tests(sql_dir)
    with tempfile.TemporaryDirectory(prefix="lake-models-") as spill, \
            duckdb.connect(config={"memory_limit": memory_limit or staging_memory_limit(), "temp_directory": spill}) as con:
        ensure_tables(con, sources)
        for table in (t.qualified for source in sources for t in source.tables):
            insert_from_lakehouse(con, lakehouse, table, day)
        if memory_limit is None:
            staging_memory_limit(con)  # what the reads left on the Python side (Arrow batches from S3)
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {MODEL_SCHEMA}")
        increments = incremental.load_incremental(sql_dir)
        for model in models:
            _build(con, model, increments.get(model.name), parameters(model, day))
            broken = {name: count for name, count in
                      model_tests.measure(con, tests.get(model.name, []), model.table, MODEL_SCHEMA).items() if count}
            if broken:
                raise dg.Failure(f"{model.name} as of {day} breaks its tests (violations: {broken}); nothing written",
                                 metadata={"violations": broken}, allow_retries=False)
        written = {model.table: write_query(lakehouse, con, model.table, day, f"SELECT * FROM {model.table}", {},
                                            fingerprint) for model in models}
        for model in models:  # each model's state, as the stages on the lakehouse read their inputs'
            write_state(con, model.name, dt.date.fromisoformat(day), fingerprint, written[model.table].rows)
            if lakehouse.day_fingerprint(model.table, day) != fingerprint:  # dropped meanwhile (the retention)
                raise ConcurrentBuildError(f"{model.table} as of {day} was replaced or dropped meanwhile")
            publish_state(lakehouse, con, model.name, day, table_layouts(con, [model.table]), f"{fingerprint}:v1")
    return LakehouseModels(day, False, written, time.perf_counter() - started)


def _build(con: duckdb.DuckDBPyConnection, model: SqlModel, spec: incremental.Incremental | None, params: dict) -> None:
    """A model's full build as the warehouse's: in ranges of its key where sql/schema.yml says so
    (customer_features at 2M customers ran out of 401 MiB as one statement), else one statement."""
    if spec is None or not incremental.build_in_key_ranges(con, spec.bind(con, model.tables_read), model.table,
                                                            model.sql, params, model.sorted_first_by(spec.unique_key)):
        con.execute(f"CREATE OR REPLACE TABLE {model.table} AS {model.sql}", params)  # SQL from sql/


def parameters(model: SqlModel, day: str) -> dict[str, object]:
    """The warehouse's parameters for a daily partition (sql_models.sql_parameters)."""
    as_of = dt.date.fromisoformat(day)
    available = {"as_of": as_of, "window_start": as_of, "window_end": as_of + dt.timedelta(days=1)}
    return {name: available[name] for name in model.parameters}


def lake_sql_models_asset(sources: tuple[Source, ...] = SOURCES) -> dg.AssetsDefinition:
    @dg.asset(
        name=LAKE_MODELS_ASSET,
        partitions_def=daily_partitions,
        deps=[lake_asset_name(source) for source in sources],
        kinds={"iceberg", "sql"},
        group_name=LAKEHOUSE_GROUP,
        tags={"pii": "true"},  # customer ids
        description="The sql/ models as of the day, over the raw layer on the lakehouse, as Iceberg partitions "
                    "of analytics.<model> (no DuckDB warehouse, no lock).",
    )
    def _asset(context: dg.AssetExecutionContext, config: LakeModelsConfig, lakehouse: Lakehouse,
               landing: LandingZone) -> dg.MaterializeResult:
        day = context.partition_key
        wait_for_landed_days(context, config, lakehouse, landing, list(sources), day)
        try:
            built = build_models_on_lakehouse(lakehouse, day, sources, force=config.force)
        except ConcurrentBuildError as error:  # a state over a missing table would read as an empty one
            raise dg.RetryRequested(max_retries=3, seconds_to_wait=1.0) from error
        context.log.info(f"sql models as of {day}: " + ("skipped (nothing new)" if built.skipped else
                         ", ".join(f"{t} {w.rows:,} rows" for t, w in built.written.items())))
        return dg.MaterializeResult(metadata={
            "skipped": built.skipped,
            "rows": {table: w.rows for table, w in built.written.items()},
            "commit_attempts": sum(w.attempts for w in built.written.values()),
            "seconds": round(built.seconds, 2),
        })

    return _asset
