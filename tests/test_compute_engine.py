"""Scoring and segment assignment on a Ray cluster: a real two-node local cluster (two raylets,
one CPU each) gives what the step's own process gives, chunk for chunk and table for table."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest

from assets.infer.recommendations import recommendations
from assets.infer.segments import customer_segments
from recsys.engines import ordered_threads_map, ray_ordered_map
from recsys.purchases import iter_customer_chunks
from recsys.recommender import Recommender, RecommenderConfig, score_chunk_safely
from recsys.synthetic import SyntheticRetail
from resources.compute_engine import ComputeEngine
from tests.fake_openai_server import FakeOpenAIServer
from tests.test_pipeline import modelled_warehouse, pipeline_resources, table_digest

DAY = "2011-09-01"
UPSTREAM = ["raw_products", "raw_customers", "raw_transactions", "stg_order_lines", "stg_customer_history",
            "stg_purchases", "dim_products", "customer_features", "product_embeddings"]
OUTPUT_TABLES = {
    "ml.recommendations": "SELECT * FROM ml.recommendations ORDER BY customer_id, rank",
    "ml.recommendation_skips": "SELECT * FROM ml.recommendation_skips ORDER BY ALL",
    "ml.recommendation_hidden": "SELECT * FROM ml.recommendation_hidden ORDER BY ALL",
    "ml.customer_segments": "SELECT * FROM ml.customer_segments ORDER BY customer_id",
    "ml.segment_centroids": "SELECT * FROM ml.segment_centroids ORDER BY segment_id",
    "ml.segment_profiles": "SELECT * FROM ml.segment_profiles ORDER BY segment_id",
}


@pytest.fixture(scope="module")
def ray_cluster():
    """Two Ray nodes on this machine, as a cluster of two hosts would be (no dashboard)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def test_scoring_chunks_on_two_ray_nodes_equals_scoring_them_in_one_process(ray_cluster):
    data = SyntheticRetail(customers=3_000, products=400, seed=3)
    model = Recommender.fit(data, RecommenderConfig(), as_of=data.end)
    shared = (model, model.candidates(data.catalog()), True)
    local = list(ordered_threads_map(score_chunk_safely, iter_customer_chunks(data, 400), shared, 2))
    remote = list(ray_ordered_map(score_chunk_safely, iter_customer_chunks(data, 400), shared, ray_cluster.address, 2))
    assert len(local) == len(remote) == 8
    for (chunk, (mine, error)), (their_chunk, (theirs, their_error)) in zip(local, remote, strict=True):
        assert error is None and their_error is None
        assert chunk.customer_ids.equals(their_chunk.customer_ids)  # results come back in input order
        assert mine.recommendations.equals(theirs.recommendations)
        assert mine.skipped.equals(theirs.skipped) and mine.hidden.equals(theirs.hidden)
        assert mine.counts() == theirs.counts()


@pytest.fixture(scope="module")
def before_recommendations(tmp_path_factory) -> tuple[Path, Path]:
    """A warehouse with everything recommendations reads (600 customers)."""
    return modelled_warehouse(tmp_path_factory.mktemp("engine"), 600, 9, tuple(UPSTREAM))


def build_on(folder: Path, before, engine: ComputeEngine) -> tuple[dict, dict]:
    """recommendations and customer_segments on a copy of the warehouse, in small chunks."""
    folder.mkdir()
    path = folder / "warehouse.duckdb"
    shutil.copy(before[0], path)
    with FakeOpenAIServer(default_dimensions=384) as server:
        resources = {**pipeline_resources(path, before[1], server), "compute_engine": engine}
        config = {"ops": {"recommendations": {"config": {"score_chunk_customers": 100}},  # six chunks
                          "customer_segments": {"config": {"chunk_lines": 1_000}}}}
        result = dg.materialize([recommendations, customer_segments], partition_key=DAY, resources=resources,
                                run_config=config)
    assert result.success
    metadata = {e.asset_key.to_user_string(): {k: v.value for k, v in e.materialization.metadata.items()}
                for e in result.get_asset_materialization_events()}
    digests = {table: table_digest(resources["warehouse"], sql) for table, sql in OUTPUT_TABLES.items()}
    return metadata, digests


def test_scoring_and_segment_assignment_on_a_ray_cluster_write_what_the_threads_engine_writes(
        tmp_path, before_recommendations, ray_cluster):
    in_process, in_process_tables = build_on(tmp_path / "threads", before_recommendations, ComputeEngine())
    on_ray, on_ray_tables = build_on(tmp_path / "ray", before_recommendations,
                                     ComputeEngine(kind="ray", address=ray_cluster.address, workers=2))
    for stage in ("recommendations", "customer_segments"):
        assert in_process[stage]["engine"] == "threads", stage
        assert on_ray[stage]["engine"] == "ray" and on_ray[stage]["engine_workers"] == 2, stage
        assert on_ray[stage]["dagster/row_count"] == in_process[stage]["dagster/row_count"] > 0, stage
    assert on_ray_tables == in_process_tables
    assert on_ray["recommendations"]["dlq_count"] == 0
    assert on_ray["customer_segments"]["pooling"] == in_process["customer_segments"]["pooling"]
    assert on_ray["customer_segments"]["pooling"]["chunks"] > 3


def test_a_chunk_that_fails_on_a_worker_is_returned_as_its_error_and_the_others_are_scored(ray_cluster):
    data = SyntheticRetail(customers=1_000, products=200, seed=4)
    model = Recommender.fit(data, RecommenderConfig(), as_of=data.end)
    broken = (model, None, False)  # no candidates: every chunk fails inside score_chunk, on the worker
    results = list(ray_ordered_map(score_chunk_safely, iter_customer_chunks(data, 500), broken, ray_cluster.address, 2))
    assert len(results) == 2 and all(result is None and isinstance(error, AttributeError)
                                     for _, (result, error) in results)


def test_the_engine_is_chosen_by_environment(monkeypatch):
    from resources import build_resources

    assert build_resources()["compute_engine"].kind == "threads"
    monkeypatch.setenv("COMPUTE_ENGINE", "ray")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    engine = build_resources()["compute_engine"]
    assert (engine.kind, engine.address, engine.workers) == ("ray", "ray://head:10001", 2)
    with pytest.raises(Exception, match="kind"):
        ComputeEngine(kind="spark")


KEYED_MODELS = {  # doubles summed by different threads or shards may differ in the last bits
    "stg_customer_history": "SELECT * FROM analytics.stg_customer_history ORDER BY ALL",
    "stg_purchases": "SELECT * FROM analytics.stg_purchases ORDER BY ALL",
    "customer_features": "SELECT * REPLACE (round(monetary, 9) AS monetary, round(top_category_share, 9) AS "
                         "top_category_share) FROM analytics.customer_features ORDER BY ALL",
}


UNKEYED_MODELS = {
    "stg_order_lines": "SELECT * FROM analytics.stg_order_lines ORDER BY ALL",
    "dim_products": "SELECT * FROM analytics.dim_products ORDER BY ALL",
}


def test_sql_models_built_on_ray_equal_the_warehouse_build(tmp_path, before_recommendations, ray_cluster):
    """The model's own DuckDB SQL on the Ray workers: per hash shard of its key, or whole on one
    worker for a model without a key."""
    built = rebuild_models_on(tmp_path, before_recommendations,
                              ComputeEngine(kind="ray", address=ray_cluster.address, workers=2))
    for name in {**UNKEYED_MODELS, **KEYED_MODELS}:
        assert built[name]["engine"] == "ray", name
        assert built[name]["engine_shards"] == (4 if name in KEYED_MODELS else 1), name


def test_keyed_sql_models_built_in_shards_in_the_step_equal_the_warehouse_build(tmp_path, before_recommendations):
    """SQL_SHARDS with the threads engine: the same shards one after another in the step's
    process, each in its own DuckDB (for a model whose one query does not fit); the models
    without a key still build in the warehouse."""
    built = rebuild_models_on(tmp_path, before_recommendations, ComputeEngine(sql_shards=3))
    for name in KEYED_MODELS:
        assert built[name]["engine"] == "threads" and built[name]["engine_shards"] == 3, name
    for name in UNKEYED_MODELS:
        assert "engine_shards" not in built[name], name


def rebuild_models_on(tmp_path: Path, before, engine: ComputeEngine) -> dict[str, dict]:
    """Force a full build of every SQL model on a copy of the warehouse with `engine`: each
    table equals the warehouse's own build, and stg_purchases is stored in its model's order."""
    from definitions import defs

    path = tmp_path / "warehouse.duckdb"
    shutil.copy(before[0], path)
    with FakeOpenAIServer(default_dimensions=384) as server:
        resources = {**pipeline_resources(path, before[1], server), "compute_engine": engine}
        models = {**UNKEYED_MODELS, **KEYED_MODELS}
        reference = {name: table_digest(resources["warehouse"], sql) for name, sql in models.items()}
        assets = [defs.get_assets_def(dg.AssetKey(name)) for name in models]
        config = {"ops": {name: {"config": {"force": True}} for name in models}}
        result = dg.materialize(assets, partition_key=DAY, resources=resources, run_config=config)
    assert result.success
    built = {e.asset_key.to_user_string(): {k: v.value for k, v in e.materialization.metadata.items()}
             for e in result.get_asset_materialization_events()}
    assert all(built[name]["build_mode"] == "full" for name in models)
    assert {name: table_digest(resources["warehouse"], sql) for name, sql in models.items()} == reference
    with resources["warehouse"].connect(read_only=True) as con:  # the shards are loaded in the model's order
        stored = [row[0] for row in con.execute("SELECT customer_id FROM analytics.stg_purchases").fetchall()]
    assert stored == sorted(stored)
    return built


def test_a_landing_file_judged_in_shards_on_ray_workers_lands_what_the_whole_file_lands(tmp_path, ray_cluster):
    """ingest_shard_mb=1: the shards of a 3.5 MB JSON Lines file and a 2 MB CSV file are read and
    judged on the two Ray nodes; the landed partitions equal reading the files whole in the step."""
    from generator import FaultRates
    from resources.warehouse import DuckDBWarehouse
    from tests.ingestion_support import day, generate_landing, materialize, raw_resources, snapshot

    landing = generate_landing(tmp_path / "landing", customers=4_000, days=1, faults=FaultRates.uniform(0.01),
                               returning_share=1.0, mean_daily_items=12)
    whole = DuckDBWarehouse(path=str(tmp_path / "whole" / "warehouse.duckdb"), memory_limit="512MB")
    on_ray = DuckDBWarehouse(path=str(tmp_path / "ray" / "warehouse.duckdb"), memory_limit="512MB")
    assert materialize(raw_resources(whole, landing), day(0)).success
    engine = ComputeEngine(kind="ray", address=ray_cluster.address, workers=2, ingest_shard_mb=1)
    result = materialize({**raw_resources(on_ray, landing), "compute_engine": engine}, day(0))
    assert result.success
    assert snapshot(on_ray) == snapshot(whole)
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey("raw_customers")]
    read_as = event.materialization.metadata["read_as"].value
    assert read_as["shards"] >= 3 and read_as["shards_engine"] == "ray"
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey("raw_transactions")]
    read_as = event.materialization.metadata["read_as"].value
    assert read_as["shards"] >= 2 and read_as["shards_engine"] == "ray"  # CSV: the header travels with the job
