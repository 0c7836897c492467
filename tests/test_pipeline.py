"""The whole daily pipeline on generated data with faults: every record accounted for, business
rules hold on what is accepted, a re-run is a skip with zero model calls, a new day pays only for
new texts, and the same inputs give identical outputs.

The embedding model is a real OpenAI-compatible HTTP server on 127.0.0.1 (tests/fake_openai_server.py);
the local model gets its own slow test in test_model_clients_local.py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
from pathlib import Path

import dagster as dg
from dagster._core.event_api import PartitionKeyFilter
import pytest

from definitions import build_definitions, defs
from generator import FaultRates, GeneratorConfig, generate
from recsys.recommender import REASON_NO_MODEL
from recsys.selection import CANDIDATES
from resources.alerts import Alerts
from resources.landing import LandingZone
from resources.compute_engine import ComputeEngine
from resources.model_clients import ChatModel, EmbeddingModel
from resources.warehouse import DuckDBWarehouse, fetch_all, fetch_scalar
from tests.fake_openai_server import FakeOpenAIServer

DAY1, DAY2 = "2011-09-01", "2011-09-02"
DETERMINISTIC_TABLES = {
    "segments": "SELECT customer_id, segment_id FROM ml.customer_segments ORDER BY ALL",
    "recommendations": "SELECT customer_id, rank, product_id, round(confidence, 9), round(predicted_value, 6)"
                       " FROM ml.recommendations ORDER BY ALL",
    "accepted": "SELECT customer_id, product_id FROM outputs.recommendations ORDER BY ALL",
}
CUSTOMERS = 1_500


def generate_landing(folder: Path) -> Path:
    """Two days of generated data with faults, as the pipeline tests use them."""
    generate(GeneratorConfig(out=folder, customers=CUSTOMERS, days=2, seed=11, start=dt.date(2011, 9, 1),
                             faults=FaultRates.uniform(0.003)))
    return folder


def modelled_warehouse(folder: Path, customers: int, seed: int, assets: tuple[str, ...]) -> tuple[Path, Path]:
    """One clean generated day (2011-09-01) landed and built up to `assets`: (warehouse, landing)."""
    landing = folder / "landing"
    generate(GeneratorConfig(out=landing, customers=customers, days=1, seed=seed, start=dt.date(2011, 9, 1),
                             faults=FaultRates.uniform(0.0)))
    with FakeOpenAIServer(default_dimensions=384) as server:
        resources = pipeline_resources(folder / "base.duckdb", landing, server)
        selected = [a for a in defs.assets if a.key.to_user_string() in assets]
        assert dg.materialize(selected, partition_key="2011-09-01", resources=resources).success
    return folder / "base.duckdb", landing


@pytest.fixture(scope="module")
def landing(tmp_path_factory) -> Path:
    return generate_landing(tmp_path_factory.mktemp("landing"))


@pytest.fixture(scope="module")
def model_server():
    with FakeOpenAIServer(default_dimensions=384) as server:
        yield server


def pipeline_resources(warehouse_path: Path, landing: Path, server: FakeOpenAIServer) -> dict:
    warehouse = DuckDBWarehouse(path=str(warehouse_path), memory_limit="512MB")
    return {
        "warehouse": warehouse,
        "landing": LandingZone(root=str(landing)),
        "alerts": Alerts(warehouse=warehouse),
        "embedding_model": EmbeddingModel(provider="openai", model="fake-embed", dimensions=384,
                                          base_url=server.base_url, api_key="test-key", max_concurrency=2),
        "chat_model": ChatModel(provider="none"),
        "compute_engine": ComputeEngine(),
    }


def run_day(resources: dict, day: str) -> dg.ExecuteInProcessResult:
    return dg.materialize([*defs.assets, *defs.asset_checks], partition_key=day, resources=resources,
                          run_config={"ops": {"recommendation_quality": {"config": {"online_retail_dir": ""}}}})


def materializations(result) -> dict[str, dict]:
    return {e.asset_key.to_user_string(): {k: v.value for k, v in e.materialization.metadata.items()}
            for e in result.get_asset_materialization_events()}


def table_digest(warehouse: DuckDBWarehouse, sql: str) -> str:
    with warehouse.connect(read_only=True) as con:
        return hashlib.sha256(repr(fetch_all(con, sql)).encode()).hexdigest()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, landing, model_server):
    path = tmp_path_factory.mktemp("pipeline") / "warehouse.duckdb"
    resources = pipeline_resources(path, landing, model_server)
    model_server.reset_stats()
    result = run_day(resources, DAY1)
    stats = model_server.stats_summary()
    digests = {name: table_digest(resources["warehouse"], sql) for name, sql in DETERMINISTIC_TABLES.items()}
    return resources, result, stats, digests


def test_every_stage_succeeds_and_every_record_is_accounted_for(first_run):
    resources, result, _, _ = first_run
    assert result.success
    done = materializations(result)
    expected = {"raw_products", "raw_customers", "raw_transactions", "stg_order_lines", "stg_purchases",
                "stg_customer_history", "dim_products", "customer_features", "product_embeddings", "customer_segments",
                "recommendations", "validated_recommendations", "recommendation_quality"}
    assert expected <= done.keys()
    with resources["warehouse"].connect(read_only=True) as con:
        batches = fetch_all(con, "SELECT source, input_records, valid_records, quarantined_records FROM ops.batch_fingerprints")
        quarantined = fetch_scalar(con, "SELECT count(DISTINCT (source, line_no)) FROM ops.schema_errors")
    assert {b[0] for b in batches} == {"products", "customers", "transactions"}
    for source, input_records, valid, bad in batches:
        assert input_records == valid + bad, source
    assert quarantined > 0, "the generator injected faults: some records must be quarantined"


def test_accepted_recommendations_obey_every_business_rule(first_run):
    resources, _, _, _ = first_run
    with resources["warehouse"].connect(read_only=True) as con:
        total = fetch_scalar(con, "SELECT count(*) FROM ml.recommendations")
        kept = fetch_scalar(con, "SELECT count(*) FROM outputs.recommendations")
        rejected = fetch_scalar(con, "SELECT count(*) FROM outputs.rejected_recommendations")
        violations = fetch_scalar(con, """
            SELECT count(*) FROM outputs.recommendations r
            LEFT JOIN analytics.dim_products p USING (product_id)
            WHERE NOT coalesce(p.in_stock, false) OR r.confidence < 0.01
               OR r.predicted_value NOT BETWEEN 0 AND 10000
               OR EXISTS (SELECT 1 FROM analytics.stg_purchases b
                          WHERE b.customer_id = r.customer_id AND b.product_id = r.product_id)""")
        segments = fetch_scalar(con, "SELECT count(DISTINCT segment_id) FROM ml.customer_segments")
    assert total > 0 and kept > 0 and kept + rejected == total
    assert violations == 0
    assert segments >= 2


def test_rerun_of_an_unchanged_day_skips_everything_with_zero_model_calls(first_run, model_server):
    resources, _, _, _ = first_run
    before = table_digest(resources["warehouse"], "SELECT * FROM outputs.recommendations ORDER BY ALL")
    model_server.reset_stats()
    again = run_day(resources, DAY1)
    assert again.success
    skipped = {name: meta.get("skipped") for name, meta in materializations(again).items() if name != "recommendation_quality"}
    assert skipped and all(skipped.values()), skipped
    assert model_server.stats_summary()["requests"] == 0
    assert table_digest(resources["warehouse"], "SELECT * FROM outputs.recommendations ORDER BY ALL") == before


def test_next_day_pays_only_for_new_product_texts(first_run, model_server):
    resources, _, first_stats, _ = first_run
    model_server.reset_stats()
    result = run_day(resources, DAY2)
    assert result.success
    embedded = materializations(result)["product_embeddings"]
    assert embedded["cache_hits"] >= first_stats["distinct_texts"] * 0.9
    assert model_server.stats_summary()["repeated_texts"] == 0
    assert embedded["items_embedded"] < first_stats["distinct_texts"]
    # Day 2 re-fits the segments: its stability is measured against day 1's model.
    (stability,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "segment_stability"]
    kept = stability.metadata["kept_share"].value
    assert 0.0 <= kept <= 1.0 and stability.description.endswith("keep their segment (at least 80%)")


def test_same_inputs_give_identical_outputs(tmp_path, landing, model_server, first_run):
    _, _, _, first_digests = first_run
    other = pipeline_resources(tmp_path / "other.duckdb", landing, model_server)
    assert run_day(other, DAY1).success
    for name, sql in DETERMINISTIC_TABLES.items():
        assert table_digest(other["warehouse"], sql) == first_digests[name], name


def test_a_range_of_days_runs_the_whole_pipeline_in_one_run(tmp_path, landing, model_server):
    """What a UI backfill of several days does with single-run policies: one run, each raw day
    landed as its own batch, every current-state table built once, as of the range's last day."""
    resources = pipeline_resources(tmp_path / "range.duckdb", landing, model_server)
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [*defs.assets, *defs.asset_checks], resources=resources, instance=instance,
            tags={"dagster/asset_partition_range_start": DAY1, "dagster/asset_partition_range_end": DAY2},
            run_config={"ops": {"recommendation_quality": {"config": {"online_retail_dir": ""}}}})
        assert result.success
        for asset in ("raw_customers", "customer_features", "recommendations", "validated_recommendations"):
            assert instance.get_materialized_partitions(dg.AssetKey(asset)) == {DAY1, DAY2}, asset
        # Every check of every day has its verdict (a stage's used to stay "planned" for each day).
        for check_key in result.job_def.asset_layer.asset_graph.asset_check_keys:
            for day in (DAY1, DAY2):
                (latest,) = instance.event_log_storage.get_asset_check_execution_history(
                    check_key, limit=1, partition_filter=PartitionKeyFilter(key=day))
                assert latest.status.value in ("SUCCEEDED", "FAILED"), (check_key, day, latest.status)
    with resources["warehouse"].connect(read_only=True) as con:
        batches = fetch_all(con, "SELECT source, partition_date::VARCHAR FROM ops.batch_fingerprints ORDER BY ALL")
        as_of = dict(fetch_all(con, "SELECT asset, as_of::VARCHAR FROM ops.asset_state"))
        accepted = fetch_scalar(con, "SELECT count(*) FROM outputs.recommendations")
    assert batches == [(source, day) for source in ("customers", "products", "transactions") for day in (DAY1, DAY2)]
    assert as_of["recommendations"] == as_of["validated_recommendations"] == DAY2
    assert accepted > 0


def test_a_transactions_only_deployment_runs_its_days_end_to_end(tmp_path, landing, model_server, monkeypatch):
    """PIPELINE_SOURCES=transactions (an order-lines shop, like Online Retail): the daily job
    leaves out the ingestion of the sources the deployment never receives, instead of failing
    every day on their missing files, and the AI stages run on products known from order lines."""
    shop = tmp_path / "landing"
    shutil.copytree(landing / "transactions", shop / "transactions")
    monkeypatch.setenv("PIPELINE_SOURCES", "transactions")
    job = build_definitions().resolve_job_def("daily_pipeline")
    selected = {key.to_user_string() for key in job.asset_layer.executable_asset_keys}
    assert "raw_transactions" in selected and not {"raw_products", "raw_customers"} & selected
    resources = pipeline_resources(tmp_path / "shop.duckdb", shop, model_server)
    run_config = {"ops": {"recommendation_quality": {"config": {"online_retail_dir": ""}}}}
    for day in (DAY1, DAY2):
        result = job.execute_in_process(partition_key=day, resources=resources, run_config=run_config,
                                        instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
        assert result.success, [e.message for e in result.all_events if e.is_step_failure]
        assert {"raw_transactions", "dim_products", "recommendations", "validated_recommendations"} <= \
            materializations(result).keys()
    with resources["warehouse"].connect(read_only=True) as con:
        sources = fetch_all(con, "SELECT DISTINCT source FROM ops.batch_fingerprints")
        catalog = fetch_all(con, "SELECT DISTINCT source FROM analytics.dim_products")
        recommended = fetch_scalar(con, "SELECT count(*) FROM ml.recommendations")
        judged = fetch_scalar(con, "SELECT (SELECT count(*) FROM outputs.recommendations)"
                                   " + (SELECT count(*) FROM outputs.rejected_recommendations)")
    assert sources == [("transactions",)] and catalog == [("order_lines",)]
    # Two days of order lines calibrate no confidence yet: the rules reject them all, each kept with its reason.
    assert recommended > 0 and judged == recommended


def test_a_range_with_a_day_without_its_file_is_red_and_its_last_day_builds_the_rest(tmp_path, landing, model_server):
    """A UI backfill over a day whose customers file never came: the landed days land, the stages
    after ingestion are skipped by Dagster (the range has no output), so the run is red and says
    which day to run; that day alone then builds them from every landed day."""
    gap = Path(shutil.copytree(landing, tmp_path / "landing"))
    (gap / "customers" / f"{DAY1}.jsonl").unlink()
    resources = pipeline_resources(tmp_path / "gap.duckdb", gap, model_server)
    run_config = {"ops": {"recommendation_quality": {"config": {"online_retail_dir": ""}}}}
    ranged = dg.materialize([*defs.assets, *defs.asset_checks], resources=resources, run_config=run_config,
                            tags={"dagster/asset_partition_range_start": DAY1,
                                  "dagster/asset_partition_range_end": DAY2}, raise_on_error=False)
    assert not ranged.success
    [failure] = [e for e in ranged.all_events if e.is_step_failure]
    assert failure.step_key == "raw_customers"
    assert "stg_customer_history" in failure.step_failure_data.error.message  # the first stage it skipped
    assert f"({DAY2}) alone" in failure.step_failure_data.error.message
    assert "recommendations" not in materializations(ranged)
    last_day = run_day(resources, DAY2)
    assert last_day.success and "recommendations" in materializations(last_day)


def test_a_range_over_a_closed_saturday_is_green_and_a_closed_day_whose_file_landed_is_not(
        tmp_path, landing, model_server, monkeypatch):
    """LANDING_CLOSED_WEEKDAYS=Sat (Online Retail has no Saturdays): a Saturday without a file lands
    as a closed day, with no records and its checks passed on none, so a backfill over it builds
    every stage instead of going red. A Saturday that has a file lands it; once its batch landed, a
    missing file is missing again (the batch in the warehouse would be unexplained)."""
    saturday = "2011-09-03"
    shop = tmp_path / "landing"
    shutil.copytree(landing / "transactions", shop / "transactions")
    monkeypatch.setenv("PIPELINE_SOURCES", "transactions")
    monkeypatch.setenv("LANDING_CLOSED_WEEKDAYS", "Sat")
    definitions = build_definitions()
    assert definitions.resources["landing"].closed_weekdays == [5]
    resources = {**pipeline_resources(tmp_path / "shop.duckdb", shop, model_server),
                 "landing": LandingZone(root=str(shop), closed_weekdays=[5])}
    run_config = {"ops": {"recommendation_quality": {"config": {"online_retail_dir": ""}}}}
    job = definitions.resolve_job_def("daily_pipeline")
    ranged = job.execute_in_process(resources=resources, run_config=run_config, instance=dg.DagsterInstance.ephemeral(),
                                    tags={"dagster/asset_partition_range_start": DAY1,
                                          "dagster/asset_partition_range_end": saturday}, raise_on_error=False)
    assert ranged.success, [e.message for e in ranged.all_events if e.is_step_failure]
    landed = {e.partition: {k: v.value for k, v in e.materialization.metadata.items()}
              for e in ranged.get_asset_materialization_events() if e.asset_key.to_user_string() == "raw_transactions"}
    assert sorted(landed) == [DAY1, DAY2, saturday]
    assert "no files on Saturdays" in landed[saturday]["closed_day"] and landed[saturday]["input_records"] == 0
    assert "closed_day" not in landed[DAY2] and landed[DAY2]["input_records"] > 0
    checks = {(c.partition, c.check_name): c.passed for c in ranged.get_asset_check_evaluations()
              if c.asset_key.to_user_string() == "raw_transactions"}
    assert checks[(saturday, "record_accounting")] and checks[(saturday, "error_rate")]
    assert {"recommendations", "validated_recommendations"} <= materializations(ranged).keys()
    with resources["warehouse"].connect(read_only=True) as con:
        assert fetch_scalar(con, "SELECT count(*) FROM ops.batch_fingerprints WHERE partition_date = ?", [saturday]) == 0

    ingestion = [a for a in definitions.assets if a.key.to_user_string() == "raw_transactions"]
    alone = materializations(dg.materialize(ingestion, partition_key=saturday, resources=resources))["raw_transactions"]
    assert alone["closed_day"] == landed[saturday]["closed_day"] and alone["dagster/row_count"] == 0
    opened = shop / "transactions" / f"{saturday}.csv"
    opened.write_bytes((shop / "transactions" / f"{DAY2}.csv").read_bytes().replace(DAY2.encode(), saturday.encode()))
    with_file = dg.materialize(ingestion, partition_key=saturday, resources=resources)
    metadata = materializations(with_file)["raw_transactions"]
    assert "closed_day" not in metadata and metadata["input_records"] > 0
    opened.unlink()
    gone = dg.materialize(ingestion, partition_key=saturday, resources=resources, raise_on_error=False)
    assert not gone.success
    assert "missing" in next(e for e in gone.all_events if e.is_step_failure).step_failure_data.error.message


def test_a_new_shops_first_day_with_two_customers_is_green_with_one_segment(tmp_path, model_server, monkeypatch):
    """Too few customers to compare segments (k-means needs 3 for a silhouette) is not a failure
    of the day: they share one segment until more have bought, and the day goes on to the
    served outputs."""
    day = tmp_path / "landing" / "transactions" / f"{DAY1}.csv"
    day.parent.mkdir(parents=True)
    day.write_text("InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
                   "536365,85123A,WHITE HANGING HEART T-LIGHT HOLDER,6,2011-09-01 08:26:00,2.55,17850.0,United Kingdom\n"
                   "536365,71053,WHITE METAL LANTERN,6,2011-09-01 08:26:00,3.39,17850.0,United Kingdom\n"
                   "536366,22633,HAND WARMER UNION JACK,6,2011-09-01 08:28:00,1.85,13047.0,United Kingdom\n"
                   "536366,22632,HAND WARMER RED POLKA DOT,6,2011-09-01 08:28:00,1.85,13047.0,United Kingdom\n")
    monkeypatch.setenv("PIPELINE_SOURCES", "transactions")
    job = build_definitions().resolve_job_def("daily_pipeline")
    resources = pipeline_resources(tmp_path / "shop.duckdb", tmp_path / "landing", model_server)
    result = job.execute_in_process(partition_key=DAY1, resources=resources, instance=dg.DagsterInstance.ephemeral(),
                                    run_config={"ops": {"recommendation_quality": {"config": {"online_retail_dir": ""}}}},
                                    raise_on_error=False)
    assert result.success, [e.message for e in result.all_events if e.is_step_failure]
    built = materializations(result)
    clustering = built["customer_segments"]["clustering"]
    assert clustering["k"] == 1 and "too few customers" in clustering["k_reason"]
    with resources["warehouse"].connect(read_only=True) as con:
        segments = fetch_all(con, "SELECT customer_id, segment_id FROM ml.customer_segments ORDER BY ALL")
    assert [customer for customer, _ in segments] == ["13047", "17850"] and len({s for _, s in segments}) == 1
    # No product has two buyers yet, so nothing can be recommended: said per customer, not hidden.
    assert built["recommendations"]["skip_reasons"] == {REASON_NO_MODEL: 2}
    assert [row["error"][:20] for row in built["recommendations"]["model_selection_table"]] == \
        ["no customer to judge"] * len(CANDIDATES)
