"""The whole daily pipeline on the lakehouse (Iceberg, SQL catalog on a real PostgreSQL) against
the same pipeline on the DuckDB warehouse: the same generated files, two days in a row, give the
same tables at every stage (embeddings, segments, recommendations with the kept model of day 1
scoring day 2 incrementally, validated outputs, the evaluation) and the same dead letters, row
for row; the model cache on the lakehouse saves the same model calls as the warehouse's; a re-run
of the day reports the same verdicts, and retries only the build its dead letter left incomplete."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import dagster as dg
import duckdb
import pytest

from assets.common.current_state import STATE_TABLE, tables_of
from assets.common.lakehouse_retention import prune_builds
from assets.infer.recommendations import INCREMENTAL
from assets.outputs.business_rules import lake_output_expectation_suite, output_expectation_suite
from assets.common.lakehouse_stages import (
    CACHE_TABLE,
    FAR_FUTURE,
    WRITER_COLUMN,
    build_lakehouse_stage_assets,
    hydrate_stage_rows,
    hydrate_tables,
    stages_among,
    latest_states,
)
from assets.ingest.lakehouse_landing import build_lakehouse_ingestion_assets
from assets.transform.lakehouse_models import LAKE_MODELS_ASSET, lake_sql_models_asset
from assets.transform.sql_models import SQL_DIR, load_models
from bench.lakehouse import comparable_columns
from definitions import AI_ASSETS, defs
from generator import FaultRates, GeneratorConfig, generate
from resources.compute_engine import ComputeEngine
from resources.lakehouse import Lakehouse
from resources.landing import LandingZone
from resources.model_clients import ChatModel, EmbeddingModel
from tests.fake_openai_server import NAN, FakeOpenAIServer
from tests.lakehouse_support import local_s3
from tests.postgres_support import postgres_fixture  # noqa: F401 (`postgres`)
from tests.test_lakehouse_landing import lakehouse_options
from tests.test_pipeline import pipeline_resources

pytestmark = pytest.mark.slow  # a PostgreSQL server

DAYS = ["2011-09-01", "2011-09-02"]
RUNS = [*DAYS, DAYS[-1]]  # the last day again
NEXT_DAY = "2011-09-03"  # the lake only: then pruned
LAKEHOUSE_STAGES = stages_among(AI_ASSETS)
OUTPUT_SUITE = [output_expectation_suite]
LAKE_OUTPUT_SUITE = [lake_output_expectation_suite("lake_validated_recommendations")]
POISONED = "Vintage Red Teapot"  # a product whose vector comes back NaN: a dead letter on both backends
WAREHOUSE_STAGES = {"raw_products", "raw_customers", "raw_transactions", *(m.name for m in load_models(SQL_DIR)),
                    *LAKEHOUSE_STAGES}


def lake_assets() -> list[dg.AssetsDefinition]:
    return [*build_lakehouse_ingestion_assets(), lake_sql_models_asset(),
            *build_lakehouse_stage_assets(LAKE_MODELS_ASSET, [m.name for m in load_models(SQL_DIR)], AI_ASSETS)]


def comparable(con: duckdb.DuckDBPyConnection, database: str, schema: str, table: str) -> list[tuple]:
    """The table's rows on the columns the backends are compared on (bench.lakehouse's), ordered;
    a dead letter's attempts left out too: the lake ran the last day once more."""
    kept = comparable_columns(con, database, schema, table, ("attempts",) if table == "dead_letter" else ())
    return con.execute(f"SELECT {kept} FROM {database}.{schema}.{table} ORDER BY ALL").fetchall()


def checks(result: dg.ExecuteInProcessResult) -> dict[tuple[str, str], tuple[bool, str]]:
    return {(e.asset_key.to_user_string().removeprefix("lake_"), e.check_name): (e.passed, e.description)
            for e in result.get_asset_check_evaluations()}


@pytest.fixture(scope="module")
def both_backends(postgres, tmp_path_factory):
    """Two generated days, then the last day again, through the warehouse's stages and through
    the lakehouse's; {(backend, run): (result, the texts the run asked the model for)}."""
    root = tmp_path_factory.mktemp("lake-pipeline")
    landing = root / "landing"
    generate(GeneratorConfig(out=landing, customers=250, days=len(DAYS) + 1, seed=5, start=dt.date(2011, 9, 1),
                             faults=FaultRates.uniform(0.003), returning_share=0.4))
    config = {"ops": {"recommendation_quality": {"config": {"online_retail_dir": ""}}}}
    lake_config = {"ops": {f"lake_{op}": value for op, value in config["ops"].items()}}
    with FakeOpenAIServer(default_dimensions=384) as server, pytest.MonkeyPatch.context() as environment:
        server.poison[POISONED] = NAN
        resources = pipeline_resources(root / "warehouse.duckdb", landing, server)
        lakehouse = Lakehouse(**lakehouse_options(postgres, root, "pipeline"))
        # the lake serves outputs.recommendations: on the warehouse backend its builds may not
        environment.setenv("PIPELINE_BACKEND", "lakehouse")
        environment.setenv("LAKEHOUSE_CATALOG_URI", lakehouse.catalog_uri)
        lake_resources = {"lakehouse": lakehouse, "landing": LandingZone(root=str(landing)),
                          "embedding_model": resources["embedding_model"], "chat_model": ChatModel(provider="none"),
                          "compute_engine": ComputeEngine()}
        warehouse_assets = [a for a in defs.assets if a.key.to_user_string() in WAREHOUSE_STAGES]

        def run(assets: list, run_resources: dict, run_config: dict, day: str) -> tuple:
            before = server.stats.per_text.copy()
            result = dg.materialize(assets, partition_key=day, resources=run_resources, run_config=run_config)
            assert result.success
            return result, set(server.stats.per_text - before)

        runs = {"landing": landing}
        for index, day in enumerate(RUNS):
            last = index == len(RUNS) - 1  # then with the GX suite on the outputs too (GX takes seconds)
            runs[("warehouse", index)] = run(warehouse_assets + (OUTPUT_SUITE if last else []), resources, config, day)
            runs[("lake", index)] = run(lake_assets() + (LAKE_OUTPUT_SUITE if last else []), lake_resources,
                                        lake_config, day)
        # the lake a day later, pruned to what runs of that day read; then that day again, and a pruned day
        runs[("lake", "next day")] = run(lake_assets(), lake_resources, lake_config, NEXT_DAY)
        runs["pruned"] = prune_builds(Lakehouse(**lakehouse_options(postgres, root, "pipeline"), history_grace_minutes=0),
                                      keep_days=1)
        runs[("lake", "next day again")] = run(lake_assets(), lake_resources, lake_config, NEXT_DAY)
        runs[("lake", "pruned day")] = run(lake_assets(), lake_resources, lake_config, DAYS[0])
        runs["stored on a path"] = stored_tables(lakehouse, DAYS[0], root / "on_path.duckdb")
        with local_s3() as s3:  # day 1 on S3: the tables go through Arrow chunks, the kept model through FileIO
            on_s3 = Lakehouse(**{**lakehouse_options(postgres, root, "pipeline_s3"), "location": "s3://lake/warehouse",
                                 "storage_options": s3.storage_options})
            runs[("s3", 0)] = run(lake_assets(), {**lake_resources, "lakehouse": on_s3}, lake_config, DAYS[0])
            runs["stored on S3"] = stored_tables(on_s3, DAYS[0], root / "on_s3.duckdb")
            runs["kept files on S3"] = [o["Key"] for o in s3.client.list_objects_v2(
                Bucket="lake", Prefix="warehouse/files/").get("Contents", [])]
    return resources["warehouse"], lakehouse, runs


def stored_tables(lakehouse: Lakehouse, day: str, path) -> dict[str, list[tuple]]:
    """Every stage's tables and dead letters as of the day, as compared between the backends."""
    states = latest_states(lakehouse, day, LAKEHOUSE_STAGES)
    with duckdb.connect(str(path)) as con:
        hydrate_tables(con, lakehouse, states)
        hydrate_stage_rows(con, lakehouse, states)
        [(database,)] = con.execute("SELECT current_database()").fetchall()
        return {table: comparable(con, database, *table.split("."))
                for state in states.values() for table in [*json.loads(state["tables"]), "ops.dead_letter"]}


def test_every_stage_on_the_lakehouse_equals_the_warehouse_row_for_row(both_backends, tmp_path):
    warehouse, lakehouse, runs = both_backends
    states = latest_states(lakehouse, DAYS[-1], LAKEHOUSE_STAGES)
    assert set(states) == set(LAKEHOUSE_STAGES)
    assert all(str(state["as_of"]) == DAYS[-1] for state in states.values())
    with duckdb.connect(str(tmp_path / "lake.duckdb")) as con:  # the database "lake"
        hydrate_tables(con, lakehouse, states)
        hydrate_stage_rows(con, lakehouse, states)
        con.execute(f"ATTACH '{warehouse.file}' AS wh (READ_ONLY)")
        compared = {}
        for stage, state in states.items():
            tables = json.loads(state["tables"])
            assert set(tables) >= tables_of(stage) - {"ml.customer_embeddings"}, stage  # written only on request
            for table in [*tables, "ops.dead_letter"]:
                schema, name = table.split(".")
                expected, got = comparable(con, "wh", schema, name), comparable(con, "lake", schema, name)
                assert got == expected, table
                compared[table] = len(expected)
    print(compared)
    assert compared["ml.recommendations"] > 1000 and compared["outputs.recommendations"] > 500
    assert compared["ops.dead_letter"] == 2  # the poisoned product, a row for each day it failed, on both


def materialized(result: dg.ExecuteInProcessResult) -> dict[str, dict]:
    return {e.asset_key.to_user_string().removeprefix("lake_"): {k: v.value for k, v in e.materialization.metadata.items()}
            for e in result.get_asset_materialization_events()}


def test_the_lake_builds_calls_the_model_and_judges_as_the_warehouse_run_after_run(both_backends):
    """Day 2 scores incrementally with day 1's kept model on both; the lake's model cache saves
    the same calls; the re-run of the day skips what is unchanged, retries the build its dead
    letter left incomplete (and what follows it), and every check gives the same verdict."""
    _, _, runs = both_backends
    for index in range(len(RUNS)):
        (warehouse_run, warehouse_calls), (lake_run, lake_calls) = runs[("warehouse", index)], runs[("lake", index)]
        assert lake_calls == warehouse_calls, index  # texts sent to the model
        judged = {key[0] for key in checks(lake_run)}
        assert judged >= {*LAKEHOUSE_STAGES, "raw_customers"}
        assert checks(lake_run) == {key: verdict for key, verdict in checks(warehouse_run).items()
                                    if key[0] in judged}, index
        lake, warehouse = materialized(lake_run), materialized(warehouse_run)
        for stage in LAKEHOUSE_STAGES:
            assert (lake[stage]["skipped"], lake.get(stage, {}).get("build_reason")) == \
                (warehouse[stage]["skipped"], warehouse[stage].get("build_reason")), (index, stage)
        assert lake["recommendations"].get("build_mode") == warehouse["recommendations"].get("build_mode")
    assert materialized(runs[("lake", 1)][0])["recommendations"]["build_mode"] == INCREMENTAL
    assert len(runs[("lake", 0)][1]) > 100 and len(runs[("lake", 2)][1]) == 1  # again: the dead-lettered text only
    again = materialized(runs[("lake", 2)][0])
    assert all(again[f"raw_{source}"]["skipped"] for source in ("products", "customers", "transactions"))
    assert again[LAKE_MODELS_ASSET.removeprefix("lake_")]["skipped"]
    assert "incomplete" in again["product_embeddings"]["build_reason"]  # its open dead letter
    suite = ("validated_recommendations", "output_expectation_suite")
    assert checks(runs[("lake", 2)][0])[suite] == checks(runs[("warehouse", 2)][0])[suite]  # the outputs' GX suite


def the_lake_serves(monkeypatch) -> None:
    """The lakehouse backend: the lake's validated_recommendations writes the served table (on the
    warehouse backend its builds may not); the switch needs a lakehouse, the tests pass their own."""
    monkeypatch.setenv("PIPELINE_BACKEND", "lakehouse")
    monkeypatch.setenv("LAKEHOUSE_CATALOG_URI", "set")


def test_a_build_that_another_run_committed_meanwhile_is_built_again(both_backends, monkeypatch, tmp_path):
    """Two runs of the same stage and day: the one that finds the other's state row committed
    since it read the states writes nothing more, retries, and builds on top of it (runs last:
    it leaves the lake's last day of validated_recommendations rebuilt)."""
    import assets.common.lakehouse_stages as lakehouse_stages
    from assets.common.current_state import write_state

    the_lake_serves(monkeypatch)
    _, lakehouse, _ = both_backends
    stage, day = "validated_recommendations", DAYS[-1]
    before = latest_states(lakehouse, day, [stage])[stage]
    real_materialize = lakehouse_stages.materialize_stage
    competitors = []

    def another_run_commits_first(recipe, context, config):
        result = real_materialize(recipe, context, config)
        if not competitors:  # the other run's state row lands while this one builds
            with duckdb.connect(str(tmp_path / "other.duckdb")) as con:
                write_state(con, stage, dt.date.fromisoformat(day), "another-runs-fingerprint", 1)
                competitors.append(f"another:{uuid.uuid4().hex}")
                lakehouse_stages.publish_state(lakehouse, con, stage, day, {}, competitors[0])
        return result

    monkeypatch.setattr(lakehouse_stages, "materialize_stage", another_run_commits_first)
    selected = [a for a in lake_assets() if a.key.to_user_string() == f"lake_{stage}"]
    result = dg.materialize(selected, partition_key=day, resources={"lakehouse": lakehouse},
                            run_config={"ops": {f"lake_{stage}": {"config": {"force": True}}}})
    assert result.success
    events = [e.event_type_value for e in result.all_events]
    assert events.count("STEP_UP_FOR_RETRY") == 1
    after = latest_states(lakehouse, day, [stage])[stage]
    assert after["fingerprint"] == before["fingerprint"] != "another-runs-fingerprint"
    assert after["version"] == 2  # on top of the other run's row (version 1), not of the one it first read
    assert lakehouse.day_fingerprint("outputs.recommendations", day) == \
        lakehouse.day_fingerprint(STATE_TABLE, day, {"asset": stage})  # its tables and its marker: one build


def test_a_build_whose_table_was_dropped_before_its_state_row_is_built_again(both_backends, monkeypatch):
    """The retention (or another run) drops a day's table between the build's writes and its
    state row: the state would describe a table that is not there, so the build is tried again."""
    import assets.common.lakehouse_stages as lakehouse_stages

    the_lake_serves(monkeypatch)
    _, lakehouse, _ = both_backends
    stage, day = "validated_recommendations", DAYS[-1]
    real_keep_files = lakehouse_stages.keep_files
    dropped = []

    def dropped_meanwhile(lake, name, folder):
        if not dropped:
            dropped.append(lakehouse.drop_day("outputs.recommendations", day))
        return real_keep_files(lake, name, folder)

    monkeypatch.setattr(lakehouse_stages, "keep_files", dropped_meanwhile)
    selected = [a for a in lake_assets() if a.key.to_user_string() == f"lake_{stage}"]
    result = dg.materialize(selected, partition_key=day, resources={"lakehouse": lakehouse},
                            run_config={"ops": {f"lake_{stage}": {"config": {"force": True}}}})
    assert result.success and dropped
    assert [e.event_type_value for e in result.all_events].count("STEP_UP_FOR_RETRY") == 1
    assert lakehouse.day_fingerprint("outputs.recommendations", day) == \
        lakehouse.day_fingerprint(STATE_TABLE, day, {"asset": stage})
    assert lakehouse.read_day("outputs.recommendations", day).num_rows > 500


def test_sql_models_whose_table_was_dropped_before_their_state_row_are_built_again(both_backends, monkeypatch):
    import assets.transform.lakehouse_models as lakehouse_models

    _, lakehouse, runs = both_backends
    real_write_state, dropped = lakehouse_models.write_state, []

    def dropped_meanwhile(con, asset, *args):
        if not dropped:
            dropped.append(lakehouse.drop_day("analytics.stg_purchases", DAYS[-1]))
        return real_write_state(con, asset, *args)

    monkeypatch.setattr(lakehouse_models, "write_state", dropped_meanwhile)
    selected = [a for a in lake_assets() if a.key.to_user_string() == LAKE_MODELS_ASSET]
    result = dg.materialize(selected, partition_key=DAYS[-1],
                            resources={"lakehouse": lakehouse, "landing": LandingZone(root=str(runs["landing"]))},
                            run_config={"ops": {LAKE_MODELS_ASSET: {"config": {"force": True}}}})
    assert result.success and dropped
    assert [e.event_type_value for e in result.all_events].count("STEP_UP_FOR_RETRY") == 1
    assert lakehouse.day_fingerprint("analytics.stg_purchases", DAYS[-1]) + ":v1" == \
        lakehouse.day_fingerprint(STATE_TABLE, DAYS[-1], {"asset": "stg_purchases"})

def test_on_the_warehouse_backend_a_lake_build_serves_no_day(both_backends, monkeypatch):
    """On the warehouse backend, published_recommendations writes the served days of the lake's
    outputs.recommendations: a lakehouse_pipeline trial on that catalog fails before writing a day,
    published (its marker) or not yet, and says what to do; on the lakehouse backend its builds own
    the table and replace the day."""
    from assets.outputs.publish import PUBLISHED_MARKER_PREFIX
    from resources.lakehouse import PARTITION_COLUMN

    _, lakehouse, _ = both_backends
    stage, table = "validated_recommendations", "outputs.recommendations"
    published = f"{PUBLISHED_MARKER_PREFIX}7:served"
    served = lakehouse.read_day(table, DAYS[-1]).drop_columns([PARTITION_COLUMN])
    lakehouse.write_day(table, DAYS[-1], served, published)
    selected = [a for a in lake_assets() if a.key.to_user_string() == f"lake_{stage}"]

    def build_again(day: str) -> dg.ExecuteInProcessResult:
        return dg.materialize(selected, partition_key=day, resources={"lakehouse": lakehouse}, raise_on_error=False,
                              run_config={"ops": {f"lake_{stage}": {"config": {"force": True}}}})

    monkeypatch.delenv("PIPELINE_BACKEND", raising=False)  # the warehouse backend
    for day, marker in [(DAYS[-1], published), (DAYS[0], lakehouse.day_fingerprint(table, DAYS[0]))]:
        state_before = lakehouse.day_fingerprint(STATE_TABLE, day, {"asset": stage})
        refused = build_again(day)
        assert not refused.success
        (failure,) = [e for e in refused.all_events if e.is_step_failure]
        assert "published_recommendations writes it" in str(failure.event_specific_data.error)
        assert lakehouse.day_fingerprint(table, day) == marker  # nothing written
        assert lakehouse.day_fingerprint(STATE_TABLE, day, {"asset": stage}) == state_before
    the_lake_serves(monkeypatch)
    assert build_again(DAYS[-1]).success
    assert lakehouse.day_fingerprint(table, DAYS[-1]) == lakehouse.day_fingerprint(STATE_TABLE, DAYS[-1],
                                                                                   {"asset": stage})
    assert lakehouse.read_day(table, DAYS[-1]).num_rows == served.num_rows


def test_on_the_lakehouse_backend_outputs_whose_blocking_check_failed_are_not_served(both_backends, monkeypatch):
    """A lake build of validated_recommendations that lost recommendations (its blocking
    accounting check failed) writes nothing: the served day and the state stay the last good
    build's, and the run is red saying why."""
    import assets.outputs.business_rules as business_rules

    the_lake_serves(monkeypatch)
    _, lakehouse, _ = both_backends
    stage, table, day = "validated_recommendations", "outputs.recommendations", DAYS[-1]
    served, state = lakehouse.day_fingerprint(table, day), lakehouse.day_fingerprint(STATE_TABLE, day, {"asset": stage})
    counted = business_rules.rule_counts
    monkeypatch.setattr(business_rules, "rule_counts", lambda con: {**counted(con), "input": counted(con)["input"] + 1})
    selected = [a for a in lake_assets() if a.key.to_user_string() == f"lake_{stage}"]
    lossy = dg.materialize(selected, partition_key=day, resources={"lakehouse": lakehouse}, raise_on_error=False,
                           run_config={"ops": {f"lake_{stage}": {"config": {"force": True}}}})
    assert not lossy.success
    (failure,) = [e for e in lossy.all_events if e.is_step_failure]
    message = str(failure.event_specific_data.error)
    assert "not served" in message and "every_recommendation_accounted_for" in message and "unaccounted" in message
    assert lakehouse.day_fingerprint(table, day) == served
    assert lakehouse.day_fingerprint(STATE_TABLE, day, {"asset": stage}) == state


def test_a_pruned_lake_runs_its_newest_day_as_before_and_builds_a_pruned_day_afresh(both_backends):
    """Pruned to one day after day 3: the builds of day 1 go (day 2's are what day 3 read); day 3
    again decides as the re-run of day 2 did; day 1 again builds from the raw layer."""
    _, lakehouse, runs = both_backends
    assets = {*LAKEHOUSE_STAGES, *(m.name for m in load_models(SQL_DIR))}
    assert runs["pruned"].horizon == NEXT_DAY
    assert runs["pruned"].removed == {asset: [DAYS[0]] for asset in assets}  # every asset built on day 2
    assert runs["pruned"].data_files_deleted > 0 and runs["pruned"].orphans == []  # no build died here
    again, before = materialized(runs[("lake", "next day again")][0]), materialized(runs[("lake", 2)][0])
    assert {stage: (again[stage]["skipped"], again[stage].get("build_reason")) for stage in again} == \
        {stage: (before[stage]["skipped"], (before[stage].get("build_reason") or "").replace(DAYS[-1], NEXT_DAY) or None)
         for stage in again}
    afresh = materialized(runs[("lake", "pruned day")][0])
    assert not afresh[LAKE_MODELS_ASSET.removeprefix("lake_")]["skipped"]  # its markers went with its rows
    assert not any(afresh[stage]["skipped"] for stage in LAKEHOUSE_STAGES)
    assert {name: str(state["as_of"]) for name, state in latest_states(lakehouse, DAYS[0], assets).items()} == \
        {asset: DAYS[0] for asset in assets}


def test_day_one_on_s3_stores_the_same_tables_as_on_a_local_path(both_backends):
    """On S3 every stage's tables go to Iceberg and back through Arrow chunks (DuckDB writes and
    reads the Parquet files itself only on a local path), and the kept model through FileIO."""
    _, _, runs = both_backends
    assert runs["stored on S3"] == runs["stored on a path"]
    assert len(runs["stored on S3"]["ml.recommendations"]) > 1000
    assert any(key.startswith("warehouse/files/recommendations/") for key in runs["kept files on S3"])


def open_dead_letters_on_the_lake(lakehouse: Lakehouse, path) -> list[tuple]:
    """(stage, item) of the open dead letters of every stage's latest build on the lake."""
    states = latest_states(lakehouse, FAR_FUTURE, LAKEHOUSE_STAGES)
    with duckdb.connect(str(path)) as con:
        hydrate_stage_rows(con, lakehouse, states)
        return con.execute("SELECT DISTINCT stage, item_key FROM ops.dead_letter WHERE resolved_at IS NULL "
                           "ORDER BY ALL").fetchall()


def replay_shares(lakehouse: Lakehouse) -> list[str]:
    cache = lakehouse.read_through(CACHE_TABLE, FAR_FUTURE, columns=(WRITER_COLUMN,)).read_all()
    return sorted({writer for writer in cache.column(WRITER_COLUMN).to_pylist() if writer.startswith("replay")})


def test_on_the_lakehouse_backend_the_replay_job_embeds_the_lakes_dead_letters_for_the_next_build(
        both_backends, monkeypatch, tmp_path):
    """On the lakehouse backend the DLQ is on the lake (the warehouse file has none): the replay
    job reads the lake's open rows, embeds the selected products again and puts their vectors in
    the lake's model cache; the stage's next build takes them without a model call and closes
    the rows. Runs last: it leaves product_embeddings rebuilt."""
    from definitions import build_definitions
    from resources.warehouse import DuckDBWarehouse

    _, lakehouse, _ = both_backends
    the_lake_serves(monkeypatch)
    monkeypatch.setenv("LAKEHOUSE_CATALOG_URI", lakehouse.catalog_uri)
    stage = "product_embeddings"
    poisoned = open_dead_letters_on_the_lake(lakehouse, tmp_path / "before.duckdb")
    assert poisoned and {row[0] for row in poisoned} == {stage}  # the poisoned product, still failing
    day = str(latest_states(lakehouse, FAR_FUTURE, [stage])[stage]["as_of"])
    replay = build_definitions().resolve_job_def("replay_dead_letters")
    config = {"ops": {"replay_open_dead_letters": {"config": {"stages": [stage]}}}}
    with FakeOpenAIServer(default_dimensions=384) as server:  # the model is well again
        resources = {"lakehouse": lakehouse, "warehouse": DuckDBWarehouse(path=str(tmp_path / "warehouse.duckdb")),
                     "embedding_model": EmbeddingModel(provider="openai", model="fake-embed", dimensions=384,
                                                       base_url=server.base_url, api_key="test-key")}

        def replayed() -> dict:
            result = replay.execute_in_process(run_config=config, resources=resources)
            assert result.success
            [output] = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
            return {k: v.value for k, v in output.event_specific_data.metadata.items()}

        server.poison[POISONED] = NAN  # still failing first: red, and nothing written to the lake
        failing = replay.execute_in_process(run_config=config, resources=resources, raise_on_error=False)
        assert not failing.success and server.stats.requests >= 1 and replay_shares(lakehouse) == []
        assert open_dead_letters_on_the_lake(lakehouse, tmp_path / "failing.duckdb") == poisoned
        server.poison.clear()
        server.reset_stats()
        first = replayed()
        assert first["by_stage"][stage] == {"selected": len(poisoned), "embedded_now": len(poisoned),
                                            "failed_again": 0, "left_the_catalog": 0, "model_calls": 1}
        assert first["still_open"] == {stage: first["still_open"][stage]} and first["still_open"][stage] >= 1
        assert "next build" in first["rows_close_at"][stage]
        assert server.stats.requests == 1 and len(replay_shares(lakehouse)) == 1
        again = replayed()  # the vector is in the lake's cache now: no call, nothing written
        assert again["by_stage"][stage]["model_calls"] == 0 and again["by_stage"][stage]["embedded_now"] == 1
        assert server.stats.requests == 1 and len(replay_shares(lakehouse)) == 1

        selected = [a for a in lake_assets() if a.key.to_user_string() == f"lake_{stage}"]
        built = dg.materialize(selected, partition_key=day, resources=resources)
        assert materialized(built)[stage]["skipped"] is False  # its last build was incomplete
        assert server.stats.requests == 1  # the vector came from the cache
        assert open_dead_letters_on_the_lake(lakehouse, tmp_path / "after.duckdb") == []
        assert replayed()["by_stage"] == {}


def test_a_transactions_only_deployment_runs_a_day_on_the_lakehouse(postgres, tmp_path, monkeypatch):
    """PIPELINE_SOURCES=transactions on the lakehouse backend: lakehouse_pipeline leaves out the
    lake ingestion of products and customers (their files never come) and the day is green to
    the served outputs, with products known from the order lines (checked by hand before). The
    day's file is cp1252, read with the encoding the landing zone sets."""
    from definitions import build_definitions

    landing = tmp_path / "landing"
    generate(GeneratorConfig(out=tmp_path / "generated", customers=200, days=1, seed=9, start=dt.date(2011, 9, 1),
                             faults=FaultRates.uniform(0.0), returning_share=0.5))
    landing.mkdir()
    (tmp_path / "generated" / "transactions").rename(landing / "transactions")  # products, customers never come
    # the shop writes cp1252 (LANDING_TRANSACTIONS_ENCODING): its accents land as text, not as bad_encoding
    day_file = landing / "transactions" / f"{DAYS[0]}.csv"
    header, first, *rest = day_file.read_text(encoding="utf-8").splitlines(keepends=True)
    fields = first.split(",")
    fields[2] = "CAFÉ CRÈME MUG"
    day_file.write_bytes("".join([header, ",".join(fields), *rest]).encode("cp1252"))
    lakehouse = Lakehouse(**lakehouse_options(postgres, tmp_path, "transactions_only"))
    monkeypatch.setenv("PIPELINE_SOURCES", "transactions")
    monkeypatch.setenv("PIPELINE_BACKEND", "lakehouse")
    monkeypatch.setenv("LAKEHOUSE_CATALOG_URI", lakehouse.catalog_uri)
    job = build_definitions().resolve_job_def("lakehouse_pipeline")
    selected = {key.to_user_string() for key in job.asset_layer.executable_asset_keys}
    assert "lake_raw_transactions" in selected and not {"lake_raw_products", "lake_raw_customers"} & selected
    with FakeOpenAIServer(default_dimensions=384) as server:
        resources = {**pipeline_resources(tmp_path / "unused.duckdb", landing, server), "lakehouse": lakehouse,
                     "landing": LandingZone(root=str(landing), closed_weekdays=[5], encodings={"transactions": "cp1252"})}
        run_config = {"ops": {"lake_recommendation_quality": {"config": {"online_retail_dir": ""}}}}
        result, closed_saturday = (
            job.execute_in_process(partition_key=day, resources=resources, instance=dg.DagsterInstance.ephemeral(),
                                   run_config=run_config, raise_on_error=False) for day in (DAYS[0], "2011-09-03"))
    assert result.success, [e.message for e in result.all_events if e.is_step_failure]
    assert {"raw_transactions", "recommendations", "validated_recommendations"} <= materialized(result).keys()
    # A closed Saturday without a file (closed_weekdays, as on the warehouse) is green to the served outputs.
    assert closed_saturday.success, [e.message for e in closed_saturday.all_events if e.is_step_failure]
    built = materialized(closed_saturday)
    assert "no files on Saturdays" in built["raw_transactions"]["closed_day"] and "validated_recommendations" in built
    catalog = lakehouse.read_day("analytics.dim_products", DAYS[0])
    assert catalog.num_rows > 0 and set(catalog.column("source").to_pylist()) == {"order_lines"}
    assert "CAFÉ CRÈME MUG" in lakehouse.read_day("raw.transactions", DAYS[0]).column("description").to_pylist()
    assert materialized(result)["raw_transactions"]["quarantined_records"] == 0  # no bad_encoding (no faults generated)
    assert lakehouse.read_day("outputs.recommendations", DAYS[0]).num_rows + \
        lakehouse.read_day("outputs.rejected_recommendations", DAYS[0]).num_rows > 0
