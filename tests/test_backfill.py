"""A 5-partition backfill launched at once: 5 OS processes, one DuckDB file, no lock errors."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path


from resources.warehouse import DuckDBWarehouse, fetch_all
from tests.ingestion_support import RAW, day, generate_landing, raw_resources

PARTITIONS = 5  # more writers than cores


def materialize_partition(warehouse_path: str, landing: str, partition: str, barrier) -> None:
    """One backfill run in its own process, as the multiprocess executor would launch it."""
    from tests.ingestion_support import materialize, raw_resources

    warehouse = DuckDBWarehouse(path=warehouse_path, memory_limit="256MB", threads=1)
    barrier.wait(timeout=120)  # every process is imported and ready: start writing together
    result = materialize(raw_resources(warehouse, landing), partition, raise_on_error=False)
    if not result.success:
        failures = [e.step_failure_data.error.message for e in result.all_events if e.is_step_failure]
        raise SystemExit(f"{partition} failed: {failures}")


def test_five_partitions_at_once_all_land(tmp_path: Path):
    landing = generate_landing(tmp_path / "landing", customers=150, days=PARTITIONS, products=200)
    warehouse_path = str(tmp_path / "warehouse.duckdb")
    context = mp.get_context("spawn")
    barrier = context.Barrier(PARTITIONS)
    processes = [context.Process(target=materialize_partition, args=(warehouse_path, str(landing), day(i), barrier))
                 for i in range(PARTITIONS)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(240)
    assert [p.exitcode for p in processes] == [0] * PARTITIONS

    with DuckDBWarehouse(path=warehouse_path).connect(read_only=True) as con:
        landed = {table: dict(fetch_all(con, f"SELECT partition_date::VARCHAR, count(*) FROM raw.{table} GROUP BY 1"))
                  for table in ("products", "customers", "customer_purchases", "transactions")}
        fingerprints = fetch_all(con, "SELECT source, count(*) FROM ops.batch_fingerprints GROUP BY 1 ORDER BY 1")
        unbalanced = fetch_all(con, """SELECT source, partition_date FROM ops.batch_fingerprints
                                       WHERE input_records <> valid_records + quarantined_records""")
        # No faults were generated: a purchase judged against a catalog still landing would show here.
        quarantined = fetch_all(con, "SELECT partition_date, rule, count(*) FROM ops.schema_errors GROUP BY ALL")
    expected_days = {day(i) for i in range(PARTITIONS)}
    assert {t: sorted(per_day) for t, per_day in landed.items()} == {t: sorted(expected_days) for t in landed}
    assert fingerprints == [("customers", PARTITIONS), ("products", PARTITIONS), ("transactions", PARTITIONS)]
    assert unbalanced == [] and quarantined == []


# -- the duckdb pool: a step that must wait for another day does not keep the only slot -----------

POOL_CONFIG = "concurrency:\n  pools:\n    granularity: op\n    default_limit: 1\ntelemetry:\n  enabled: false\n"


def materialize_on_instance(dagster_home: str, warehouse_path: str, landing: str, asset_name: str, partition: str,
                            wait_seconds: float) -> None:
    """One run in its own process, on the shared instance whose `duckdb` pool has one slot."""
    import dagster as dg

    from tests.ingestion_support import RAW, raw_resources

    warehouse = DuckDBWarehouse(path=warehouse_path, memory_limit="256MB", threads=1)
    run_config = {"ops": {"raw_customers": {"config": {"catalog_wait_seconds": wait_seconds}}}}
    with dg.DagsterInstance.from_config(dagster_home) as instance:
        result = dg.materialize([RAW[asset_name]], partition_key=partition, instance=instance,
                                resources=raw_resources(warehouse, landing), raise_on_error=False,
                                run_config=run_config if asset_name == "raw_customers" else None)
    raise SystemExit(0 if result.success else 1)


def step_events(instance, asset_name: str, event_type) -> list:
    import dagster as dg

    records = instance.get_event_records(dg.EventRecordsFilter(event_type=event_type))
    return [r for r in records if r.event_log_entry.step_key == asset_name]


def test_customers_waiting_for_an_earlier_catalog_leave_the_pool_slot_to_it(tmp_path: Path):
    # Day 1's customers start first and find day 0's catalog missing; day 0's raw_products, in
    # the same one-slot pool, can only land if the waiting step gives the slot back. (A step that
    # slept in place held the slot until catalog_wait_seconds ran out, and failed.)
    import dagster as dg

    landing = generate_landing(tmp_path / "landing", customers=100, days=2, products=150)
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(POOL_CONFIG)
    warehouse = DuckDBWarehouse(path=str(tmp_path / "warehouse.duckdb"), memory_limit="256MB", threads=1)
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        instance.event_log_storage.set_concurrency_slots("duckdb", 1)
        assert dg.materialize([RAW["raw_products"]], partition_key=day(1), instance=instance,
                              resources=raw_resources(warehouse, landing)).success

    context = mp.get_context("spawn")
    def launch(asset_name: str, partition: str):
        args = (str(dagster_home), warehouse.path, str(landing), asset_name, partition, 120.0)
        process = context.Process(target=materialize_on_instance, args=args)
        process.start()
        return process

    customers = launch("raw_customers", day(1))
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        deadline = time.monotonic() + 60
        while not step_events(instance, "raw_customers", dg.DagsterEventType.STEP_START):
            assert time.monotonic() < deadline and customers.is_alive(), "raw_customers never started"
            time.sleep(0.1)
        catalog = launch("raw_products", day(0))
        for process in (catalog, customers):
            process.join(90)  # well under catalog_wait_seconds (120 s): waiting in place would time out
        alive = [p for p in (catalog, customers) if p.is_alive()]
        for process in alive:
            process.kill()
        assert not alive and [catalog.exitcode, customers.exitcode] == [0, 0]
        assert step_events(instance, "raw_customers", dg.DagsterEventType.STEP_UP_FOR_RETRY)

    with warehouse.connect(read_only=True) as con:
        landed = fetch_all(con, "SELECT source, partition_date::VARCHAR FROM ops.batch_fingerprints ORDER BY ALL")
        unknown = fetch_all(con, "SELECT count(*) FROM ops.schema_errors WHERE rule LIKE '%unknown%'")
    assert landed == [("customers", day(1)), ("products", day(0)), ("products", day(1))]
    assert unknown == [(0,)]  # day 1's customers were judged against the whole catalog
