"""History in one run: a range of days ingested by one run (a single-run backfill), each day still
its own partition, idempotent per day, with one materialization and one result per check a day."""

from __future__ import annotations

import collections
import shutil
import time
from pathlib import Path

import dagster as dg
import pytest

from generator import FaultRates
from resources.landing import LandingZone
from resources.warehouse import fetch_all
from tests.ingestion_support import RAW, RAW_ASSETS, SUITE_CHECKS, day, generate_landing, materialize, raw_resources, snapshot

DAYS = 5  # the 14-day backfill from the UI is tests/test_ui_daily_loop.py's; 10 days here took 158 s of a CI worker


def materialize_range(resources: dict, first: str, last: str, assets: list | None = None) -> dg.ExecuteInProcessResult:
    tags = {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}
    return dg.materialize(assets or RAW_ASSETS, resources=resources, tags=tags, raise_on_error=False)


def materialized(result: dg.ExecuteInProcessResult) -> collections.Counter:
    return collections.Counter((e.asset_key.to_user_string(), e.materialization.partition)
                               for e in result.get_asset_materialization_events())


def evaluations(result: dg.ExecuteInProcessResult) -> dict[tuple[str, str, str], bool]:
    return {(e.asset_key.to_user_string(), e.check_name, e.partition): e.passed
            for e in result.get_asset_check_evaluations()}


@pytest.fixture(scope="module")
def month(tmp_path_factory) -> Path:
    return generate_landing(tmp_path_factory.mktemp("month"), customers=60, days=DAYS, products=80,
                            faults=FaultRates.uniform(0.01), seed=17)


def test_a_range_in_one_run_gives_the_same_rows_as_single_day_runs(month, tmp_path):
    from resources.warehouse import DuckDBWarehouse

    one_run = DuckDBWarehouse(path=str(tmp_path / "one_run.duckdb"), memory_limit="512MB")
    day_by_day = DuckDBWarehouse(path=str(tmp_path / "day_by_day.duckdb"), memory_limit="512MB")

    result = materialize_range(raw_resources(one_run, month), day(0), day(DAYS - 1))
    for index in range(DAYS):
        assert materialize(raw_resources(day_by_day, month), day(index)).success

    assert result.success
    assert snapshot(one_run) == snapshot(day_by_day)
    keys = [(asset, day(i)) for asset in RAW for i in range(DAYS)]
    assert materialized(result) == collections.Counter(keys)  # one materialization per asset and day
    checks = evaluations(result)
    assert set(checks) == {(asset, check, key) for asset, key in keys for check in ("record_accounting", "error_rate")}
    assert all(passed for (_, check, _), passed in checks.items() if check == "record_accounting")
    with one_run.connect(read_only=True) as con:
        per_day = fetch_all(con, "SELECT partition_date::VARCHAR, count(*) FROM raw.customers GROUP BY 1 ORDER BY 1")
    assert [d for d, _ in per_day] == [day(i) for i in range(DAYS)]

    again = materialize_range(raw_resources(one_run, month), day(0), day(DAYS - 1))
    assert again.success and snapshot(one_run) == snapshot(day_by_day)
    assert {e.materialization.metadata["skipped"].value for e in again.get_asset_materialization_events()} == {True}
    assert evaluations(again) == checks  # a skip reports each day's stored verdict


def test_a_range_leaves_days_without_a_file_unmaterialized_lands_the_others_and_is_red_for_what_it_skipped(
        month, tmp_path, warehouse):
    """Without an output for the range, Dagster skips the run's steps after ingestion (here the GX
    suite): the run is red and names them, instead of a green run that did not do them."""
    landing = Path(shutil.copytree(month, tmp_path / "landing"))
    (landing / "transactions" / f"{day(2)}.csv").unlink()
    resources = raw_resources(warehouse, landing)
    (suite_check,) = [c for c in SUITE_CHECKS if "transactions" in str(c.check_keys)]

    result = materialize_range(resources, day(0), day(3), [RAW["raw_transactions"], suite_check])

    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    message = failure.step_failure_data.error.message
    assert f"1 day(s) of the range have no transactions file: ['{day(2)}']" in message
    assert "so raw_transactions_expectation_suites did not run" in message and f"({day(3)}) alone" in message
    landed = [day(0), day(1), day(3)]
    assert materialized(result) == collections.Counter(("raw_transactions", d) for d in landed)
    assert set(evaluations(result)) == {("raw_transactions", check, d) for d in landed
                                        for check in ("record_accounting", "error_rate")}
    with warehouse.connect(read_only=True) as con:
        days = fetch_all(con, "SELECT DISTINCT partition_date::VARCHAR FROM raw.transactions ORDER BY 1")
    assert [d for (d,) in days] == landed
    # What depends on the asset in that run (its GX check) waited; run alone, it judges the landed days.
    tags = {"dagster/asset_partition_range_start": day(0), "dagster/asset_partition_range_end": day(3)}
    checks = dg.materialize([RAW["raw_transactions"], suite_check], resources=resources, tags=tags,
                            selection=dg.AssetSelection.checks(suite_check))
    assert set(evaluations(checks)) == {("raw_transactions", "transactions_expectation_suite", d) for d in landed}


def test_a_range_with_an_unreadable_day_fails_naming_it_after_landing_the_others(month, tmp_path, warehouse):
    landing = Path(shutil.copytree(month, tmp_path / "landing"))
    broken = landing / "products" / f"{day(1)}.csv"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n")

    result = materialize_range(raw_resources(warehouse, landing), day(0), day(2), [RAW["raw_products"]])

    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert str(broken) in failure.step_failure_data.error.message
    assert materialized(result) == collections.Counter([("raw_products", day(0)), ("raw_products", day(2))])


def test_online_retail_days_land_in_one_range_run(online_retail_dir, warehouse, monkeypatch):
    """... and the run gives memory back to the system at most every 10 s, not once a day: a full
    collection takes ~140 ms in a loaded code location, and the 219 days took 55 s instead of 20."""
    import gc

    zone = LandingZone(root=str(online_retail_dir), patterns={"transactions": "{date}.csv"})
    first, last = "2010-12-01", "2010-12-14"
    files = sorted(p.stem for p in online_retail_dir.glob("2010-12-*.csv") if first <= p.stem <= last)
    releases, collect = [], gc.collect  # each release of memory starts with a full collection
    monkeypatch.setattr(gc, "collect", lambda *args: (releases.append(1), collect(*args))[1])

    started = time.monotonic()
    result = materialize_range(raw_resources(warehouse, zone), first, last, [RAW["raw_transactions"]])
    assert len(releases) <= 1 + (time.monotonic() - started) / 10 < len(files)

    # the shop was closed on some days: they have no file, and nothing in this run waits on them
    assert result.success and len(files) < 14
    assert materialized(result) == collections.Counter(("raw_transactions", d) for d in files)
    assert all(passed for (_, check, _), passed in evaluations(result).items() if check == "record_accounting")
    with warehouse.connect(read_only=True) as con:
        lines = dict(fetch_all(con, "SELECT partition_date::VARCHAR, input_records FROM ops.batch_fingerprints"))
    assert lines == {d: len((online_retail_dir / f"{d}.csv").read_text().splitlines()) - 1 for d in files}


def test_a_batchs_suites_share_one_step_and_each_still_runs_alone(month, tmp_path, warehouse):
    """raw_customers lands two tables: their GX suites run in one step (one GX import), over a
    range each day of each table once, and a check selected alone runs alone."""
    resources = raw_resources(warehouse, Path(month))
    (suites,) = [c for c in SUITE_CHECKS if "customers_expectation_suite" in str(c.check_keys)]
    names = {key.name for key in suites.check_keys}
    assert names == {"customers_expectation_suite", "customer_purchases_expectation_suite"}

    landed = materialize_range(resources, day(0), day(2), [RAW["raw_products"], RAW["raw_customers"]])
    assert landed.success
    tags = {"dagster/asset_partition_range_start": day(0), "dagster/asset_partition_range_end": day(2)}
    ranged = dg.materialize([RAW["raw_customers"], suites], resources=resources, tags=tags,
                            selection=dg.AssetSelection.checks(suites))
    assert ranged.success
    assert set(evaluations(ranged)) == {("raw_customers", name, day(i)) for name in names for i in range(3)}

    # the day again (its batch is skipped as landed) with one of the two checks
    one = dg.AssetCheckKey(dg.AssetKey("raw_customers"), "customers_expectation_suite")
    alone = dg.materialize([RAW["raw_customers"], suites], resources=resources, partition_key=day(1),
                           selection=dg.AssetSelection.assets("raw_customers").without_checks()
                           | dg.AssetSelection.checks(*RAW["raw_customers"].check_keys, one))
    assert alone.success
    assert {key for key in evaluations(alone) if "expectation_suite" in key[1]} == {
        ("raw_customers", "customers_expectation_suite", day(1))}
