"""Incremental days: between refits a day rebuilds only what changed (the SQL models by key,
segments for the customers whose vectors may have changed, recommendations for those whose
top-10 may have, the outputs for those), yet every table equals a full rebuild of the same inputs
by the same models; the refit cadence and drift are decided and recorded.

Real Dagster runs of the whole pipeline on generated data (two days), a fake OpenAI-compatible
server for the embeddings, DuckDB files in tmp dirs.
"""

from __future__ import annotations

import datetime as dt
import gc
import shutil
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest

from assets.common.current_state import STATE_TABLE, write_state
from assets.infer.purchases import CUSTOMER_STATE_SQL
from assets.infer.recommendations import RecommendationsConfig, coverage_since_fit, drift_reason
from definitions import defs
from resources.warehouse import DuckDBWarehouse, fetch_all
from tests.fake_openai_server import FakeOpenAIServer
from tests.test_pipeline import DAY1, DAY2, generate_landing, materializations, pipeline_resources, run_day

# as_of is the day a row was scored; rejected_at when it was rejected: both differ by design
COMPARED = {
    "ml.recommendations": "SELECT * EXCLUDE (as_of) FROM ml.recommendations ORDER BY ALL",
    "ml.recommendation_skips": "SELECT * FROM ml.recommendation_skips ORDER BY ALL",
    # what the next day compares with: each customer's purchase state, how they were ranked, hidden products
    "ml.recommendation_customers": "SELECT * FROM ml.recommendation_customers ORDER BY ALL",
    "ml.recommendation_hidden": "SELECT * FROM ml.recommendation_hidden ORDER BY ALL",
    "outputs.recommendations": "SELECT * EXCLUDE (as_of) FROM outputs.recommendations ORDER BY ALL",
    "outputs.rejected_recommendations":
        "SELECT * EXCLUDE (as_of, rejected_at) FROM outputs.rejected_recommendations ORDER BY ALL",
    "ml.customer_segments": "SELECT customer_id, segment_id, round(similarity, 5) FROM ml.customer_segments ORDER BY ALL",
    "analytics.stg_customer_history": "SELECT * FROM analytics.stg_customer_history ORDER BY ALL",
    "analytics.stg_purchases": "SELECT * FROM analytics.stg_purchases ORDER BY ALL",
    # what the next day compares with: an incremental build replaces only the fingerprints that differ
    "ops.sql_model_keys": "SELECT * FROM ops.sql_model_keys ORDER BY ALL",
    # sums of doubles depend on the order DuckDB's threads add them in: compared to 9 decimals
    "analytics.customer_features": "SELECT * REPLACE (round(monetary, 9) AS monetary, round(top_category_share, 9)"
                                   " AS top_category_share) FROM analytics.customer_features ORDER BY ALL",
}
INCREMENTAL_SQL_MODELS = ("stg_customer_history", "stg_purchases", "customer_features")


def copy_warehouse(source: Path, target_dir: Path) -> Path:
    """The DuckDB file and the kept models beside it."""
    target_dir.mkdir(parents=True)
    shutil.copy(source, target_dir / source.name)
    shutil.copytree(source.parent / "models", target_dir / "models")
    return target_dir / source.name


def rows_of(resources: dict, sql: str) -> list[tuple]:
    with resources["warehouse"].connect(read_only=True) as con:
        return fetch_all(con, sql)


def run_day_with(resources: dict, day: str, recommendations: dict) -> dg.ExecuteInProcessResult:
    ops = {"recommendation_quality": {"config": {"online_retail_dir": ""}},
           "recommendations": {"config": recommendations}}
    return dg.materialize([*defs.assets, *defs.asset_checks], partition_key=day, resources=resources,
                          run_config={"ops": ops})


@pytest.fixture(scope="module")
def landing(tmp_path_factory) -> Path:
    return generate_landing(tmp_path_factory.mktemp("landing"))


@pytest.fixture(scope="module")
def model_server():
    with FakeOpenAIServer(default_dimensions=384) as server:
        yield server


@pytest.fixture(scope="module")
def after_day_one(tmp_path_factory, landing, model_server) -> Path:
    path = tmp_path_factory.mktemp("day1") / "warehouse.duckdb"
    assert run_day(pipeline_resources(path, landing, model_server), DAY1).success
    return path


MODELS_ALIVE_AT_PUBLISH: list[int] = []  # recommender objects alive when the incremental day published


@contextmanager
def counting_models_at_publish(counts: list[int]):
    """Count the recommender objects still alive when the recommendations step publishes."""
    from assets.infer.recommendations import StagedOutputs
    from recsys.ease import EaseScorer
    from recsys.recommender import Recommender

    publish = StagedOutputs.publish

    def counting_publish(self, con, incremental):
        gc.collect()
        counts.append(sum(isinstance(o, (Recommender, EaseScorer)) for o in gc.get_objects()))
        return publish(self, con, incremental)

    StagedOutputs.publish = counting_publish
    try:
        yield
    finally:
        StagedOutputs.publish = publish


@pytest.fixture(scope="module")
def incremental_day(tmp_path_factory, after_day_one, landing, model_server):
    path = copy_warehouse(after_day_one, tmp_path_factory.mktemp("incremental") / "w")
    resources = pipeline_resources(path, landing, model_server)
    # a sample smaller than the table, so that validating "changed + sample" is not everything
    with counting_models_at_publish(MODELS_ALIVE_AT_PUBLISH):
        result = dg.materialize([*defs.assets, *defs.asset_checks], partition_key=DAY2, resources=resources, run_config={
            "ops": {"recommendation_quality": {"config": {"online_retail_dir": ""}},
                    "validated_recommendations_output_expectation_suite": {"config": {"incremental_sample_rows": 1_000}}}})
    assert result.success
    return resources, materializations(result), result


def test_a_day_between_refits_rescores_only_changed_customers(incremental_day):
    _, done, _ = incremental_day
    built = done["recommendations"]
    assert built["build_mode"] == "incremental"
    assert 0 < built["customers_scored"] < built["customers"]
    reasons = built["rescored_by_reason"]
    assert reasons.get("new customer", 0) + reasons.get("purchases changed", 0) > 0
    assert sum(reasons.values()) == built["customers_scored"]
    # those who only crossed a recency group keep their ranking: recalibrated, not ranked again
    assert built["customers_with_kept_ranking"] == reasons.get("recency group changed", 0) > 0
    for model in INCREMENTAL_SQL_MODELS:
        assert done[model]["build_mode"] == "incremental", model
        assert 0 < done[model]["keys_rebuilt"] < done["customer_features"]["dagster/row_count"], model
    # their upstream incremental models' stored key fingerprints stood for those models' rows
    assert done["stg_purchases"]["key_fingerprints_kept_from"] == ["stg_customer_history"]
    assert done["customer_features"]["key_fingerprints_kept_from"] == ["stg_purchases"]
    assert "key_fingerprints_kept_from" not in done["stg_customer_history"]
    segments = done["customer_segments"]
    assert segments["build_mode"] == "incremental"
    assert 0 < segments["customers_assigned"] < segments["dagster/row_count"]
    outputs = done["validated_recommendations"]
    assert outputs["build_mode"] == "incremental"
    assert outputs["rechecked_recommendations"] < outputs["input_recommendations"]
    assert outputs["verified_sample_rows"] > 0 and outputs["verified_sample_disagreeing"] == 0


def test_the_output_suite_validates_the_changed_customers_and_a_sample(incremental_day):
    _, _, result = incremental_day
    (suite,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "output_expectation_suite"]
    assert suite.passed
    validated, total = suite.metadata["rows_validated"].value, suite.metadata["rows_in_partition"].value
    assert 0 < validated < total
    assert "rows_validated_of" in suite.metadata


def test_the_evaluation_stands_between_its_days_and_says_of_which_day(incremental_day):
    _, done, result = incremental_day
    quality = done["recommendation_quality"]
    assert quality["skipped"] is False and quality["evaluated_on_day"] == DAY1
    assert quality["evaluation"] == f"carried forward from {DAY1}"
    (check,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "beats_best_baseline"]
    assert check.description.endswith(f"(evaluated as of {DAY1})")


def test_an_incremental_day_equals_a_full_rescore_with_the_same_model(tmp_path, incremental_day, landing,
                                                                      model_server):
    incremental, _, _ = incremental_day
    full = pipeline_resources(copy_warehouse(Path(incremental["warehouse"].path), tmp_path / "full"), landing,
                              model_server)
    result = dg.materialize(
        [*defs.assets, *defs.asset_checks], partition_key=DAY2, resources=full,
        selection=[*INCREMENTAL_SQL_MODELS, "customer_segments", "recommendations", "validated_recommendations"],
        run_config={"ops": {"recommendations": {"config": {"force": True, "rescore_all": True}},
                            "customer_segments": {"config": {"force": True, "reassign_all": True}},
                            "validated_recommendations": {"config": {"force": True}},
                            **{model: {"config": {"force": True}} for model in INCREMENTAL_SQL_MODELS}}})
    assert result.success
    done = materializations(result)
    assert done["customer_segments"]["build_mode"] == "reassign_all"
    assert {done[model]["build_mode"] for model in INCREMENTAL_SQL_MODELS} == {"full"}
    assert done["recommendations"]["build_mode"] == "rescore_all"
    assert done["recommendations"]["customers_scored"] == done["recommendations"]["customers"]
    assert done["validated_recommendations"]["build_mode"] == "full"
    for table, sql in COMPARED.items():
        assert rows_of(incremental, sql) == rows_of(full, sql), table
    assert rows_of(full, "SELECT count(*) FROM outputs.recommendations")[0][0] > 0


def test_purchases_updated_in_place_keep_each_customer_one_run_and_full_readers_sort(tmp_path, incremental_day,
                                                                                     landing, model_server):
    """An incremental stg_purchases deletes the changed customers' rows and appends theirs in the
    model's order: each customer is one run, sorted within, but the customers are no longer in
    order. The table says so, and a full read (rescore everyone, reassign everyone) sorts."""
    incremental, done, _ = incremental_day
    assert done["stg_purchases"]["build_mode"] == "incremental"
    assert 0 < done["stg_purchases"]["keys_rebuilt"] < done["customer_features"]["dagster/row_count"]
    stored = rows_of(incremental, "SELECT customer_id, purchased_at, product_id, amount, source FROM analytics.stg_purchases")
    runs = [stored[0][0]] + [row[0] for before, row in zip(stored, stored[1:]) if row[0] != before[0]]
    assert len(runs) == len(set(runs))  # each customer one run
    assert runs != sorted(runs)  # appended after the others
    by_customer: dict[str, list] = {}
    for row in stored:
        by_customer.setdefault(row[0], []).append(tuple(row[1:]))
    assert all(rows == sorted(rows, key=lambda r: (r[0], r[1], r[2], r[3])) for rows in by_customer.values())
    state = rows_of(incremental, "SELECT metadata FROM ops.asset_state WHERE asset = 'stg_purchases'")[0][0]
    assert '"in_order": false' in state

    again = pipeline_resources(copy_warehouse(Path(incremental["warehouse"].path), tmp_path / "again"), landing,
                               model_server)
    result = dg.materialize(
        [*defs.assets, *defs.asset_checks], partition_key=DAY2, resources=again,
        selection=["customer_segments", "recommendations"],
        run_config={"ops": {"recommendations": {"config": {"force": True, "rescore_all": True}},
                            "customer_segments": {"config": {"force": True, "reassign_all": True}}}})
    assert result.success
    assert {m["build_mode"] for m in materializations(result).values()} == {"rescore_all", "reassign_all"}
    for table in ("ml.recommendations", "ml.customer_segments"):
        assert rows_of(again, COMPARED[table]) == rows_of(incremental, COMPARED[table]), table


def test_the_kept_model_is_freed_before_the_outputs_are_published(incremental_day):
    """The item-item weights (256 MiB at 8,192 items) are not held while DuckDB loads the outputs:
    on an incremental day the step loads the kept model and must let go of every reference."""
    _, done, _ = incremental_day
    assert done["recommendations"]["build_mode"] == "incremental"
    assert MODELS_ALIVE_AT_PUBLISH == [0]


def test_the_model_is_refit_on_its_cadence_and_the_reason_recorded(tmp_path, after_day_one, landing, model_server):
    resources = pipeline_resources(copy_warehouse(after_day_one, tmp_path / "cadence"), landing, model_server)
    result = run_day_with(resources, DAY2, {"refit_every_days": 1})
    assert result.success
    built = materializations(result)["recommendations"]
    assert built["build_mode"] == "refit"
    assert built["build_mode_reason"] == "the model is 1 days old (refit every 1)"
    assert built["model_fitted_on_day"] == DAY2
    assert "model_selection" in built
    assert materializations(result)["validated_recommendations"]["build_mode"] == "full"
    models = list((Path(resources["warehouse"].path).parent / "models").glob("recommendations-*.pkl"))
    assert len(models) == 1 and DAY2 in models[0].name  # the replaced model is removed


FINGERPRINTED = {"recommendations": "ml.recommendation_customers", "customer_segments": "ml.segment_customers"}


def test_the_stored_purchase_fingerprints_are_exact(after_day_one):
    """What an incremental day compares with passes through Parquet snapshots: each customer's
    fingerprint comes back with every bit (a DOUBLE would round away changes below its step)."""
    warehouse = DuckDBWarehouse(path=str(after_day_one))
    with warehouse.connect(read_only=True) as con:
        for table in FINGERPRINTED.values():
            types = dict(fetch_all(con, f"SELECT column_name, column_type FROM (DESCRIBE {table})"))
            assert types["history_hash"] == "UBIGINT", table
            differing, customers = fetch_all(con, f"""
                SELECT count(*) FILTER (WHERE s.history_hash IS DISTINCT FROM n.history_hash), count(*)
                FROM {table} AS s FULL JOIN ({CUSTOMER_STATE_SQL}) AS n USING (customer_id)""")[0]
            assert differing == 0 and customers > 0, table


def test_a_stored_purchase_state_of_an_older_format_is_rebuilt_for_everyone(tmp_path, after_day_one, landing,
                                                                           model_server):
    """A build that stored its fingerprints as DOUBLE (before they were exact): the next day does
    not compare with them (every customer would differ), it rescores and reassigns everyone once."""
    resources = pipeline_resources(copy_warehouse(after_day_one, tmp_path / "older"), landing, model_server)
    with resources["warehouse"].transaction() as con:
        for asset, table in FINGERPRINTED.items():
            con.execute(f"ALTER TABLE {table} ALTER history_hash TYPE DOUBLE")
            con.execute(f"""UPDATE {STATE_TABLE} SET metadata = json_remove(metadata, '$.model.purchase_state')
                            WHERE asset = ?""", [asset])
    result = run_day_with(resources, DAY2, {})
    assert result.success
    built = materializations(result)
    assert built["recommendations"]["build_mode"] == "rescore_all"
    assert built["customer_segments"]["build_mode"] == "reassign_all"
    for asset in FINGERPRINTED:
        assert built[asset]["build_mode_reason"] == "the stored purchase fingerprints are of an older format"
    with resources["warehouse"].connect(read_only=True) as con:
        for table in FINGERPRINTED.values():
            assert fetch_all(con, f"SELECT DISTINCT typeof(history_hash) FROM {table}") == [("UBIGINT",)], table


def test_coverage_drift_is_measured_on_purchases_since_the_fit(tmp_path):
    """Refit early when what sells since the fit lies outside the model's items far more often
    than what it was fitted on; too few purchases since say nothing."""
    warehouse = DuckDBWarehouse(path=str(tmp_path / "w.duckdb"))
    with warehouse.connect() as con:
        con.execute("CREATE SCHEMA analytics")
        con.execute("CREATE TABLE analytics.stg_purchases (customer_id VARCHAR, product_id VARCHAR, amount DOUBLE,"
                    " purchased_at TIMESTAMP)")
        # before the fit: ignored; since: 10 pairs, 6 of them model items (one line repeats a pair)
        con.executemany("INSERT INTO analytics.stg_purchases VALUES (?, ?, 1.0, ?)",
                        [["c0", "new", "2011-08-30 10:00"]]
                        + [[f"c{i}", "known" if i < 6 else "new", "2011-09-02 10:00"] for i in range(10)]
                        + [["c1", "known", "2011-09-02 11:00"]])
        pairs, covered = coverage_since_fit(con, pa.array(["known", "other"]), "2011-09-02 00:00:00")
    assert (pairs, covered) == (10, 6)
    config = RecommendationsConfig(max_coverage_drop=0.05, drift_min_pairs=5)
    assert drift_reason(pairs, covered, 0.95, config).startswith("coverage drift: the model knows 60.0% of the 10")
    assert drift_reason(pairs, covered, 0.64, config) is None  # within the tolerated drop
    assert drift_reason(pairs, covered, 0.95, RecommendationsConfig(drift_min_pairs=11)) is None


def test_stock_changes_rescore_exactly_the_customers_they_reach(tmp_path, incremental_day, landing, model_server):
    """The most recommended product goes out of stock and the product that would rank for the
    most customers comes back: an incremental build rescores the customers each reaches, and its
    tables equal a full rescore of the same inputs."""
    incremental, _, _ = incremental_day
    flipped = pipeline_resources(copy_warehouse(Path(incremental["warehouse"].path), tmp_path / "flipped"), landing,
                                 model_server)
    with flipped["warehouse"].connect() as con:
        (gone,) = fetch_all(con, "SELECT product_id FROM ml.recommendations GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1")[0]
        (back,) = fetch_all(con, """SELECT h.product_id FROM ml.recommendation_hidden AS h
                                    JOIN analytics.dim_products AS p USING (product_id) WHERE NOT p.in_stock
                                    GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1""")[0]
        con.execute("UPDATE analytics.dim_products SET in_stock = (product_id = ?) WHERE product_id IN (?, ?)",
                    [back, gone, back])
        rows = fetch_all(con, "SELECT count(*) FROM analytics.dim_products")[0][0]
        write_state(con, "dim_products", dt.date.fromisoformat(DAY2), "stock changed by the test", rows)
    full = pipeline_resources(copy_warehouse(Path(flipped["warehouse"].path), tmp_path / "full"), landing, model_server)
    selection = ["recommendations", "validated_recommendations"]
    result = dg.materialize([*defs.assets, *defs.asset_checks], partition_key=DAY2, resources=flipped,
                            selection=selection)
    assert result.success
    built = materializations(result)["recommendations"]
    assert built["build_mode"] == "incremental"
    reasons = built["rescored_by_reason"]
    assert reasons["a recommended product is no longer a candidate"] > 0
    assert reasons["a product that would rank became a candidate"] > 0
    assert materializations(result)["validated_recommendations"]["build_mode"] == "incremental"
    assert dg.materialize(
        [*defs.assets, *defs.asset_checks], partition_key=DAY2, resources=full, selection=selection,
        run_config={"ops": {"recommendations": {"config": {"force": True, "rescore_all": True}},
                            "validated_recommendations": {"config": {"force": True}}}}).success
    for table, sql in COMPARED.items():
        assert rows_of(flipped, sql) == rows_of(full, sql), table
    assert rows_of(flipped, f"SELECT count(*) FROM ml.recommendations WHERE product_id = '{gone}'") == [(0,)]
    assert rows_of(flipped, f"SELECT count(*) FROM ml.recommendations WHERE product_id = '{back}'")[0][0] > 0


def test_a_verified_sample_that_disagrees_rebuilds_the_outputs_and_fails_its_check(
        tmp_path, after_day_one, incremental_day, landing, model_server):
    """Stored verdicts that no longer match the rules (here: tampered with) are found by the
    verified sample: the outputs are rebuilt from every recommendation, and the WARN check says so."""
    resources = pipeline_resources(copy_warehouse(after_day_one, tmp_path / "tampered"), landing, model_server)
    with resources["warehouse"].transaction() as con:
        con.execute("""INSERT INTO outputs.rejected_recommendations BY NAME
                       SELECT *, ['tampered']::VARCHAR[] AS failed_rules, now()::TIMESTAMP AS rejected_at
                       FROM outputs.recommendations""")
        con.execute("DELETE FROM outputs.recommendations")
    result = run_day_with(resources, DAY2, {})
    assert result.success  # repaired, so the outputs stand; the check is a WARN
    built = materializations(result)["validated_recommendations"]
    assert built["build_mode"] == "full" and built["build_mode_reason"].startswith("the verified sample disagreed")
    assert built["verified_sample_disagreeing"] > 0
    (check,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "incremental_verdicts_verified"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert check.metadata["disagreeing"].value == built["verified_sample_disagreeing"]
    reference, _, clean = incremental_day
    (clean_check,) = [c for c in clean.get_asset_check_evaluations() if c.check_name == "incremental_verdicts_verified"]
    assert clean_check.passed and clean_check.metadata["sampled_rows"].value > 0
    for table in ("outputs.recommendations", "outputs.rejected_recommendations"):
        assert rows_of(resources, COMPARED[table]) == rows_of(reference, COMPARED[table]), table
