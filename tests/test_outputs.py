"""Business rules on recommendations: each one kept or rejected with its reasons, none lost."""

import datetime as dt

import dagster as dg
import pytest

from assets.outputs.business_rules import output_expectation_suite, validated_recommendations
from assets.common.current_state import write_state
from resources.warehouse import fetch_all
from assets.common.current_state import read_state

DAY = "2011-03-01"

RECOMMENDATIONS = [
    # customer, rank, product, confidence, predicted value
    ("c1", 1, "P1", 0.40, 12.0),  # fine
    ("c1", 2, "P2", 0.30, 8.0),  # out of stock
    ("c1", 3, "P3", 0.005, 1.0),  # below the confidence threshold
    ("c1", 4, "P4", 0.20, 5.0),  # already bought
    ("c2", 1, "P1", 0.50, 25_000.0),  # suspicious value
    ("c2", 2, "NOPE", 0.50, 3.0),  # unknown product
    ("c2", 3, "P2", 0.001, float("nan")),  # three rules at once
]


def seed(warehouse):
    with warehouse.transaction() as con:
        con.execute("CREATE SCHEMA analytics; CREATE SCHEMA ml")
        con.execute("CREATE TABLE analytics.dim_products (product_id VARCHAR, in_stock BOOLEAN)")
        con.execute("INSERT INTO analytics.dim_products VALUES ('P1', true), ('P2', false), ('P3', true), ('P4', true)")
        con.execute("CREATE TABLE analytics.stg_purchases (customer_id VARCHAR, product_id VARCHAR)")
        con.execute("INSERT INTO analytics.stg_purchases VALUES ('c1', 'P4'), ('c2', 'P4')")
        con.execute(
            "CREATE TABLE ml.recommendations (customer_id VARCHAR, rank INTEGER, product_id VARCHAR,"
            " confidence DOUBLE, predicted_value DOUBLE, strategy VARCHAR DEFAULT 'collaborative')"
        )
        con.executemany("INSERT INTO ml.recommendations (customer_id, rank, product_id, confidence, predicted_value)"
                        " VALUES (?, ?, ?, ?, ?)", RECOMMENDATIONS)
        for asset in ("recommendations", "dim_products", "stg_purchases"):
            write_state(con, asset, dt.date(2011, 3, 1), "v1", 0)


@pytest.mark.parametrize("rows_per_shard", [None, 2])
def test_each_rule_rejects_with_its_reason_and_counts_reconcile(warehouse, rows_per_shard):
    """Also in hash shards of customers (a full check of 200M rows at 20M customers): the same verdicts."""
    seed(warehouse)
    run_config = ({"ops": {"validated_recommendations": {"config": {"rows_per_shard": rows_per_shard}}}}
                  if rows_per_shard else None)
    result = dg.materialize([validated_recommendations], partition_key=DAY, resources={"warehouse": warehouse},
                            run_config=run_config)
    assert result.success
    with warehouse.connect(read_only=True) as con:
        accepted = fetch_all(con, "SELECT customer_id, product_id FROM outputs.recommendations")
        rejected = dict(
            fetch_all(con, "SELECT customer_id || '/' || product_id, list_sort(failed_rules) FROM outputs.rejected_recommendations")
        )
    assert accepted == [("c1", "P1")]
    assert rejected == {
        "c1/P2": ["out_of_stock"],
        "c1/P3": ["confidence_below_threshold"],
        "c1/P4": ["already_bought"],
        "c2/P1": ["predicted_value_out_of_range"],
        "c2/NOPE": ["unknown_product"],
        "c2/P2": ["confidence_below_threshold", "out_of_stock", "predicted_value_out_of_range"],
    }
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["every_recommendation_accounted_for"].passed
    assert not checks["rejection_rate"].passed  # 6 of 7 rejected is far above 20 %
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["input_recommendations"].value == 7 and metadata["rejected"].value == 6
    # 4 shards asked; the ranges cut at the sampled ids c1 and c2: (-, c1) is empty, c1 and c2 apart
    assert metadata["rule_shards"].value == (3 if rows_per_shard else 1)


def test_customer_ranges_hold_every_recommendation_once():
    import duckdb

    from assets.common.key_ranges import in_range, key_ranges, range_params

    def customer_ranges(con, shards):
        return key_ranges(con, "ml.recommendations", "customer_id", shards)

    con = duckdb.connect()
    con.execute("CREATE SCHEMA ml; CREATE TABLE ml.recommendations AS "
                "SELECT 'c' || (i % 997)::VARCHAR AS customer_id FROM range(20000) AS t(i) UNION ALL SELECT NULL")
    ranges = customer_ranges(con, 5)
    assert len(ranges) == 5 and ranges == customer_ranges(con, 5)  # repeatable
    counts = []
    for low, high in ranges:
        counts.append(fetch_all(con, f"SELECT count(*), count(DISTINCT customer_id) FROM ml.recommendations AS r "
                                     f"WHERE {in_range('r.customer_id', low, high)}", range_params(low, high))[0])
    assert sum(rows for rows, _ in counts) == 20001 and sum(customers for _, customers in counts) == 997
    assert all(3000 < rows < 5000 for rows, _ in counts)  # about equal


def test_rerun_with_unchanged_inputs_is_a_skip_that_still_reports_checks(warehouse):
    seed(warehouse)
    dg.materialize([validated_recommendations], partition_key=DAY, resources={"warehouse": warehouse})
    again = dg.materialize([validated_recommendations], partition_key=DAY, resources={"warehouse": warehouse})
    assert again.get_asset_materialization_events()[0].materialization.metadata["skipped"].value is True
    assert {c.check_name for c in again.get_asset_check_evaluations()} == {
        "rejection_rate",
        "every_recommendation_accounted_for",
        "incremental_verdicts_verified",
    }


def test_output_suite_runs_gx_on_the_accepted_table(warehouse):
    seed(warehouse)
    result = dg.materialize([validated_recommendations, output_expectation_suite], partition_key=DAY,
                            resources={"warehouse": warehouse})
    check = next(c for c in result.get_asset_check_evaluations() if c.check_name == "output_expectation_suite")
    assert check.passed, check.metadata
    assert check.metadata["rows_validated"].value == 1
    reused = dg.materialize([validated_recommendations, output_expectation_suite], partition_key=DAY,
                            resources={"warehouse": warehouse})
    check = next(c for c in reused.get_asset_check_evaluations() if c.check_name == "output_expectation_suite")
    assert check.passed and check.metadata["reused_result"].value is True
    with warehouse.transaction() as con:  # break the output table behind the rules' back
        con.execute("INSERT INTO outputs.recommendations SELECT * REPLACE (2.5 AS confidence) FROM outputs.recommendations")
        con.execute("DELETE FROM ops.suite_runs")  # forget the stored result, or the unchanged build would reuse it
    # inputs unchanged: the asset skips and leaves the broken table for the check to find
    again = dg.materialize([validated_recommendations, output_expectation_suite], partition_key=DAY,
                           resources={"warehouse": warehouse})
    check = next(c for c in again.get_asset_check_evaluations() if c.check_name == "output_expectation_suite")
    assert not check.passed
    assert set(check.metadata["failed_rules"].value) == {"product_recommended_twice", "confidence_outside_0_1"}


def test_a_build_whose_blocking_check_failed_is_rolled_back_and_not_served(warehouse, monkeypatch):
    """outputs.recommendations is what consumers read, so nothing downstream could block a bad
    build of it: a build that lost recommendations (its blocking accounting check failed) fails
    and rolls back; the tables and the state stay the last good build's, and a plain run with
    unchanged inputs skips to that build's passing verdicts."""
    import assets.outputs.business_rules as business_rules

    seed(warehouse)
    assert dg.materialize([validated_recommendations], partition_key=DAY, resources={"warehouse": warehouse}).success

    def served() -> tuple:
        with warehouse.connect(read_only=True) as con:
            state = read_state(con, "validated_recommendations")
            return (repr(fetch_all(con, "SELECT * FROM outputs.recommendations ORDER BY ALL")),  # repr: NaN == NaN
                    repr(fetch_all(con, "SELECT * FROM outputs.rejected_recommendations ORDER BY ALL")), state.version)

    good = served()
    counted = business_rules.rule_counts
    monkeypatch.setattr(business_rules, "rule_counts", lambda con: {**counted(con), "input": counted(con)["input"] + 1})
    with warehouse.transaction() as con:  # the bad build has something to write: one more accepted row
        con.execute("INSERT INTO ml.recommendations (customer_id, rank, product_id, confidence, predicted_value) "
                    "VALUES ('c3', 1, 'P1', 0.6, 10.0)")
    lossy = dg.materialize([validated_recommendations], partition_key=DAY, resources={"warehouse": warehouse},
                           raise_on_error=False, run_config={"ops": {"validated_recommendations": {"config": {"force": True}}}})
    assert not lossy.success
    (failure,) = [e for e in lossy.all_events if e.is_step_failure]
    message = str(failure.event_specific_data.error)
    assert "not served" in message and "every_recommendation_accounted_for" in message and "1 unaccounted" in message
    assert served() == good
    monkeypatch.undo()
    plain = dg.materialize([validated_recommendations], partition_key=DAY, resources={"warehouse": warehouse})
    assert plain.get_asset_materialization_events()[0].materialization.metadata["skipped"].value
    assert {c.check_name: c.passed for c in plain.get_asset_check_evaluations()}["every_recommendation_accounted_for"]
    assert served() == good  # the skip reports the served build: the last good one
    again = dg.materialize([validated_recommendations], partition_key=DAY, resources={"warehouse": warehouse},
                           run_config={"ops": {"validated_recommendations": {"config": {"force": True}}}})
    assert again.success and served() != good  # a good build is served
