"""The one current-state abstraction, tested once with small assets of its own and a real one:
a failed check stays failed on a skipped re-run, a knob is a skip, an undeclared read fails, an
incomplete build is retried, a failed blocking check is red and blocks what builds on it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg
import pytest
from pydantic import Field

from assets.common.current_state import (
    Built,
    DeadLetterConfig,
    StateBuild,
    current_state_asset,
    knob,
    read_state,
    write_state,
)
from resources import dead_letters
from resources.dead_letters import DeadLetter
from resources.warehouse import fetch_scalar

DAY = "2011-03-01"


class ToyConfig(DeadLetterConfig):
    scale: int = Field(default=1, description="Semantic: changes what the build produces.")
    batch_rows: int = knob(100, "Operational: how the build runs.")
    max_value: float = knob(10.0, "A check threshold.")
    fail_items: int = knob(0, "Items to dead-letter (test knob).")


def value_verdicts(measured: Mapping[str, Any], config: ToyConfig) -> list[dg.AssetCheckResult]:
    return [dg.AssetCheckResult(check_name="value_in_range", passed=measured["value"] <= config.max_value,
                                severity=dg.AssetCheckSeverity.WARN, metadata={"value": measured["value"]})]


builds: list[str] = []


@current_state_asset(name="toy_source", inputs=[], tables=["analytics.toy_source"], group="test")
def toy_source(build: StateBuild) -> Built:
    with build.warehouse.transaction() as con:
        con.execute("CREATE SCHEMA IF NOT EXISTS analytics")
        con.execute("CREATE OR REPLACE TABLE analytics.toy_source AS SELECT range AS v FROM range(5)")
        build.record(con, 5)
    return Built()


@current_state_asset(name="toy_state", inputs=["toy_source"], tables=["ml.toy_state"], group="test",
                     config_class=ToyConfig, checks=[dg.AssetCheckSpec("value_in_range", asset="toy_state")],
                     verdicts=value_verdicts, dead_letter_stage="toy_state")
def toy_state(build: StateBuild) -> Built:
    builds.append(build.decision.reason)
    config = build.config
    with build.warehouse.transaction() as con:
        con.execute("CREATE SCHEMA IF NOT EXISTS ml")
        con.execute("CREATE OR REPLACE TABLE ml.toy_state AS SELECT sum(v) * ? AS value FROM analytics.toy_source",
                    [config.scale])
        value = fetch_scalar(con, "SELECT value FROM ml.toy_state")
        dead_letters.resolve_keys(con, "toy_state", ["item-0", "item-1"])
        dead_letters.write(con, "toy_state", build.partition_key, "toy",
                           [DeadLetter(f"item-{i}", "server_error", "503", 1, "") for i in range(config.fail_items)])
        build.record(con, 1, {"value": value, "items": 1000})
    return Built({"value": value})


def run(warehouse, assets=(toy_source, toy_state), raise_on_error=True, **config) -> dg.ExecuteInProcessResult:
    run_config = {"ops": {"toy_state": {"config": config}}} if config else None
    return dg.materialize(list(assets), partition_key=DAY, resources={"warehouse": warehouse},
                          run_config=run_config, raise_on_error=raise_on_error)


def verdict(result, check="value_in_range"):
    [evaluation] = [e for e in result.get_asset_check_evaluations() if e.check_name == check]
    return evaluation


def toy_metadata(result) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == "toy_state"]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def test_a_failed_check_stays_failed_on_every_skipped_rerun(warehouse):
    first = run(warehouse, max_value=5.0)  # 0+1+2+3+4 = 10 > 5
    assert not verdict(first).passed and toy_metadata(first)["skipped"] is False
    for _ in range(2):
        again = run(warehouse, max_value=5.0)
        assert toy_metadata(again)["skipped"] is True
        assert not verdict(again).passed
        assert verdict(again).metadata["verdict_of_build_as_of"].value == DAY
    # A threshold is judged again on the stored measurement, without a rebuild.
    relaxed = run(warehouse, max_value=50.0)
    assert toy_metadata(relaxed)["skipped"] is True and verdict(relaxed).passed


def test_a_knob_is_a_skip_and_semantic_config_a_rebuild(warehouse):
    builds.clear()
    run(warehouse)
    assert toy_metadata(run(warehouse, batch_rows=7))["skipped"] is True
    rebuilt = run(warehouse, scale=3)
    assert toy_metadata(rebuilt)["skipped"] is False and toy_metadata(rebuilt)["value"] == 30
    assert builds == ["first build", "inputs changed"]


def test_a_rebuild_upstream_rebuilds_downstream_even_with_the_same_inputs(warehouse):
    run(warehouse)
    forced = dg.materialize([toy_source, toy_state], partition_key=DAY, resources={"warehouse": warehouse},
                            run_config={"ops": {"toy_source": {"config": {"force": True}}}})
    assert toy_metadata(forced)["skipped"] is False  # its input's content is a new version


def test_a_build_that_leaves_dead_letters_is_retried_until_they_are_gone(warehouse):
    builds.clear()
    run(warehouse, fail_items=2)
    with warehouse.connect(read_only=True) as con:
        state = read_state(con, "toy_state")
    assert not state.complete and "2 open dead letters" in state.incomplete_reason
    retried = run(warehouse)  # same inputs, same semantic config: still rebuilt, and the items succeed
    assert toy_metadata(retried)["skipped"] is False
    assert builds[-1].startswith("retrying: the build as of 2011-03-01 was incomplete (2 open dead letters")
    assert toy_metadata(run(warehouse))["skipped"] is True


def test_reading_an_undeclared_table_fails_the_build(warehouse):
    @current_state_asset(name="toy_sneaky", inputs=["toy_source"], tables=["ml.toy_sneaky"], group="test")
    def toy_sneaky(build: StateBuild) -> Built:
        with build.warehouse.transaction() as con:
            con.execute("CREATE OR REPLACE TABLE ml.toy_sneaky AS SELECT * FROM ml.toy_state")  # not an input
            build.record(con, 0)
        return Built()

    run(warehouse)
    result = dg.materialize([toy_sneaky], partition_key=DAY, resources={"warehouse": warehouse}, raise_on_error=False)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.error.cause.message if failure.step_failure_data.error.cause else ""
    assert "UndeclaredInputError" in (failure.step_failure_data.error.message + message)
    assert "reads ml.toy_state (written by toy_state)" in (failure.step_failure_data.error.message + message)


def test_a_build_on_inputs_that_hold_a_later_day_is_a_skip_or_refused_when_forced(warehouse):
    run(warehouse)
    with warehouse.transaction() as con:
        write_state(con, "toy_source", __import__("datetime").date(2011, 3, 5), "later", 5)
    plain = dg.materialize([toy_state], partition_key=DAY, resources={"warehouse": warehouse},
                           run_config={"ops": {"toy_state": {"config": {"scale": 2}}}})
    assert toy_metadata(plain)["skipped"] is True and "already hold a later day" in toy_metadata(plain)["skip_reason"]
    result = dg.materialize([toy_state], partition_key=DAY, resources={"warehouse": warehouse},
                            run_config={"ops": {"toy_state": {"config": {"force": True}}}}, raise_on_error=False)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "inputs hold later days {'toy_source': '2011-03-05'}" in failure.step_failure_data.error.message


def test_a_run_of_an_earlier_day_that_changed_the_inputs_of_the_tables_day_builds_again_as_of_that_day(warehouse):
    """A backfill of earlier days after a later day was built changes what the later build read:
    the stage used to skip ("a run of the later day rebuilds it"), green, and nothing asked for
    that day (found by an outside-in probe). Now it catches up as of the table's day; unchanged
    inputs are still a skip."""
    later = "2011-03-05"
    dg.materialize([toy_source, toy_state], partition_key=later, resources={"warehouse": warehouse})
    plain = dg.materialize([toy_state], partition_key=DAY, resources={"warehouse": warehouse})
    assert toy_metadata(plain)["skipped"] is True  # nothing changed: the later build stands
    with warehouse.transaction() as con:  # an earlier day changes an input (a late or corrected file)
        write_state(con, "toy_source", __import__("datetime").date(2011, 3, 1), "corrected", 5)

    caught_up = dg.materialize([toy_state], partition_key=DAY, resources={"warehouse": warehouse})

    meta = toy_metadata(caught_up)
    assert meta["skipped"] is False and meta["as_of"] == later and meta["build_reason"].startswith("caught up")
    with warehouse.connect(read_only=True) as con:
        assert str(read_state(con, "toy_state").as_of) == later
    assert toy_metadata(dg.materialize([toy_state], partition_key=DAY, resources={"warehouse": warehouse}))["skipped"]


def test_a_stage_never_built_whose_inputs_hold_a_later_day_fails_naming_the_day_to_run(warehouse):
    """No skip can stand for a build that never happened: the run is red and says which day builds it."""
    run(warehouse, assets=(toy_source,))
    with warehouse.transaction() as con:
        write_state(con, "toy_source", __import__("datetime").date(2011, 3, 5), "later", 5)
    result = dg.materialize([toy_state], partition_key=DAY, resources={"warehouse": warehouse}, raise_on_error=False)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.error.message
    assert "toy_state has never been built" in message and "run the partition 2011-03-05" in message
    assert not result.get_asset_materialization_events()  # nothing claims the table is there


@current_state_asset(name="toy_gate", inputs=["toy_source"], tables=["ml.toy_gate"], group="test",
                     config_class=ToyConfig, verdicts=lambda m, c: [dg.AssetCheckResult(
                         check_name="counts_reconcile", passed=m["value"] <= c.max_value,
                         severity=dg.AssetCheckSeverity.ERROR)],
                     checks=[dg.AssetCheckSpec("counts_reconcile", asset="toy_gate", blocking=True)])
def toy_gate(build: StateBuild) -> Built:
    with build.warehouse.transaction() as con:
        con.execute("CREATE SCHEMA IF NOT EXISTS ml")
        con.execute("CREATE OR REPLACE TABLE ml.toy_gate AS SELECT sum(v) AS value FROM analytics.toy_source")
        build.record(con, 1, {"value": fetch_scalar(con, "SELECT value FROM ml.toy_gate")})
    return Built()


@current_state_asset(name="toy_downstream", inputs=["toy_gate"], tables=["ml.toy_downstream"], group="test")
def toy_downstream(build: StateBuild) -> Built:
    with build.warehouse.transaction() as con:
        con.execute("CREATE OR REPLACE TABLE ml.toy_downstream AS SELECT * FROM ml.toy_gate")
        build.record(con, 1)
    return Built()


def test_a_failed_blocking_check_is_red_blocks_downstream_and_is_rebuilt_next_time(warehouse):
    def gate_run(max_value: float) -> dg.ExecuteInProcessResult:
        return dg.materialize([toy_source, toy_gate, toy_downstream], partition_key=DAY, raise_on_error=False,
                              resources={"warehouse": warehouse},
                              run_config={"ops": {"toy_gate": {"config": {"max_value": max_value}}}})

    red = gate_run(5.0)
    assert not red.success
    materialized = {e.asset_key.to_user_string() for e in red.get_asset_materialization_events()}
    assert "toy_downstream" not in materialized
    with warehouse.connect(read_only=True) as con:
        assert "failed blocking checks ['counts_reconcile']" in read_state(con, "toy_gate").incomplete_reason
    again = gate_run(5.0)  # not an unchanged success: rebuilt, and red again
    assert not again.success
    green = gate_run(50.0)
    assert green.success
    assert "toy_downstream" in {e.asset_key.to_user_string() for e in green.get_asset_materialization_events()}


@pytest.fixture(autouse=True)
def _isolated_builds():
    builds.clear()
    yield


attempts: list[int] = []


@current_state_asset(name="toy_hungry", inputs=["toy_source"], tables=["ml.toy_hungry"], group="test",
                     retry_policy=dg.RetryPolicy(max_retries=2))
def toy_hungry(build: StateBuild) -> Built:
    attempts.append(1)
    with build.warehouse.connect(read_only=True) as con:
        con.execute("SET memory_limit = '1MiB'")
        # median holds a group's values in memory and cannot spill
        con.execute("SELECT median(i) FROM range(3000000) t(i)").fetchall()
    return Built()


def test_running_out_of_duckdb_memory_fails_once_with_what_to_do_and_is_not_retried(warehouse):
    attempts.clear()
    result = run(warehouse, assets=(toy_source, toy_hungry), raise_on_error=False)
    assert not result.success and len(attempts) == 1  # the retry policy would retry any other error
    [failure] = [e for e in result.all_events if e.is_step_failure]
    message = failure.event_specific_data.error.message
    assert "toy_hungry ran out of DuckDB memory; not retried" in message and "STEP_MEMORY_BUDGET" in message
