"""A 10-partition backfill launched at once: 10 OS processes, one DuckDB file, no lock errors."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from resources.warehouse import DuckDBWarehouse, fetch_all
from tests.ingestion_support import day, generate_landing

PARTITIONS = 10


def materialize_partition(warehouse_path: str, landing: str, partition: str, barrier) -> None:
    """One backfill run in its own process, as the multiprocess executor would launch it."""
    from tests.ingestion_support import materialize, raw_resources

    warehouse = DuckDBWarehouse(path=warehouse_path, memory_limit="256MB", threads=1)
    barrier.wait(timeout=120)  # every process is imported and ready: start writing together
    result = materialize(raw_resources(warehouse, landing), partition, raise_on_error=False)
    if not result.success:
        failures = [e.step_failure_data.error.message for e in result.all_events if e.is_step_failure]
        raise SystemExit(f"{partition} failed: {failures}")


def test_ten_partitions_at_once_all_land(tmp_path: Path):
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
