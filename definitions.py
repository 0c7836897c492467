"""The code location: every asset, check, sensor and resource, put together once."""

from pathlib import Path

import dagster as dg

from assets import evaluate, infer, monitor, outputs
from assets.common.catalog import with_catalog
from assets.common.partitions import daily_partitions
from assets.infer.dead_letter_replay import build_replay_job
from assets.common.lakehouse_retention import prune_lakehouse_builds, prune_schedule
from assets.ingest.retention import build_purge_job
from assets.common.sources import SOURCES, Source, configured_sources
from assets.ingest import build_ingestion_assets
from assets.ingest.lakehouse_landing import (LAKEHOUSE_GROUP, build_lakehouse_ingestion_assets, build_lakehouse_pipeline,
                                             lake_asset_name)
from assets.ingest.triggers import build_daily_schedule, build_landing_sensor
from assets.transform import build_sql_assets
from assets.common.lakehouse_stages import build_lakehouse_stage_assets, lake_name
from assets.outputs.business_rules import STAGE as VALIDATED, lake_output_expectation_suite
from assets.transform.lakehouse_models import LAKE_MODELS_ASSET, lake_sql_models_asset
from assets.transform.sql_models import SQL_DIR, load_models
from assets.validate import build_suite_checks
from assets.outputs.publish import published_recommendations
from resources import build_resources, lakehouse_configured, pipeline_backend
from resources.warehouse import WAREHOUSE_STEP_TAGS


# One process a step, two steps at a time. A step's memory goes back to the system when it ends,
# so every step has the whole memory budget: in one process for the whole run, day 2 at 2M
# customers ran out of DuckDB memory in its fourth step (RSS 916 MB held from the steps before).
# Steps are forked from a server that imported these definitions and the instance's storage
# modules once (each step importing them cost about 3 s). The warehouse writers share the one
# `duckdb` pool slot (dagster.yaml), so the second place runs what holds no slot: the GX suites,
# the model calls, segments, recommendations and the evaluation, each under short warehouse
# connections. A worker that dies is retried as a run (run_retries in dagster.yaml).
STEP_PRELOAD = ["definitions", "dagster._core.storage.runs", "dagster._core.storage.event_log",
                "dagster._core.storage.schedules"]  # a module that is not there is skipped
STEP_EXECUTOR_CONFIG = {
    "max_concurrent": 2, "start_method": {"forkserver": {"preload_modules": STEP_PRELOAD}},
    "tag_concurrency_limits": [{"key": key, "value": value, "limit": 1} for key, value in WAREHOUSE_STEP_TAGS.items()]}
STEP_PROCESSES = dg.multiprocess_executor.configured(STEP_EXECUTOR_CONFIG, name="step_processes")


AI_ASSETS = [*infer.ASSETS, *outputs.ASSETS, *evaluate.ASSETS]  # the stages after the SQL models


def build_definitions(sources: tuple[Source, ...] = SOURCES, sql_dir: Path = SQL_DIR) -> dg.Definitions:
    """Everything derives from the source registry and the sql/ folder."""
    # Every stage for one day, from landing files to validated recommendations and their checks.
    lake = lakehouse_configured()
    # A source the deployment never receives (not in PIPELINE_SOURCES) is not ingested by the
    # runs: its missing file would fail every day. The SQL models read its empty raw tables.
    received = configured_sources(sources)
    not_received = [source for source in sources if source not in received]
    daily_pipeline = dg.define_asset_job(
        "daily_pipeline",
        selection=(dg.AssetSelection.all() - dg.AssetSelection.groups(LAKEHOUSE_GROUP)
                   - dg.AssetSelection.assets(*[source.asset for source in not_received])),
        partitions_def=daily_partitions,
        description="One daily batch end to end: ingestion (of the sources in PIPELINE_SOURCES), validation, "
                    "SQL models, AI stages, output rules, checks.",
        tags={"pipeline": "daily"},  # the instance runs one such run at a time (dagster.yaml)
    )
    # What the schedule and the landing sensor start: the run on the chosen backend.
    on_lake = pipeline_backend() == "lakehouse"
    lakehouse_pipeline = build_lakehouse_pipeline(lake_name(VALIDATED), serves=on_lake,
                                                  not_received=[lake_asset_name(s) for s in not_received])
    triggered = lakehouse_pipeline if on_lake else daily_pipeline
    purge_job, purge_schedule = build_purge_job(with_lakehouse=lake)
    return dg.Definitions.merge(
        dg.Definitions(
            assets=with_catalog([*build_ingestion_assets(sources), *build_sql_assets(sql_dir, sources), *AI_ASSETS,
                                 monitor.INCIDENTS,
                                 # the day's outputs to shared Iceberg tables, when a lakehouse is configured
                                 # (on the lakehouse backend lake_validated_recommendations writes that table)
                                 *([published_recommendations] if lake and not on_lake else []),
                                 # the whole run on the lakehouse, a job of its own (not in the daily run)
                                 *([*build_lakehouse_ingestion_assets(sources), lake_sql_models_asset(sources),
                                    *build_lakehouse_stage_assets(LAKE_MODELS_ASSET,
                                                                  [m.name for m in load_models(sql_dir)], AI_ASSETS)]
                                   if lake else [])],
                                sources),
            asset_checks=[*build_suite_checks(sources), *outputs.CHECKS,
                          *([lake_output_expectation_suite(lake_name(VALIDATED))] if lake else [])],
            resources=build_resources(tuple(source.name for source in sources)),
            jobs=[daily_pipeline, build_replay_job(on_lakehouse=on_lake), purge_job,
                  *([lakehouse_pipeline, prune_lakehouse_builds] if lake else [])],
            schedules=[build_daily_schedule(triggered), purge_schedule, *([prune_schedule] if lake else [])],
            sensors=[build_landing_sensor(triggered, sources)],
            executor=STEP_PROCESSES,
        ),
        monitor.build_monitor_defs(sources),
    )


defs = build_definitions()
