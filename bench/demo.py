"""The README's main command: generate sample data, run the daily pipeline, summarize.

    python3 tasks.py demo [--customers 5000] [--days 3] [--fresh]

Runs the `daily_pipeline` job for each generated day on the local Dagster instance
(.dagster_home), so every run, materialization and check shows in the UI afterwards
(`python3 tasks.py ui`). Uses embedded defaults: a DuckDB file under data/, the local
embedding model, generated landing files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
FIRST_DAY = dt.date(2011, 9, 1)

SUMMARY_QUERIES = {
    "landed": """
        SELECT 'products' AS source, count(*) FROM raw.products UNION ALL
        SELECT 'customers', count(*) FROM raw.customers UNION ALL
        SELECT 'customer purchase items', count(*) FROM raw.customer_purchases UNION ALL
        SELECT 'transactions', count(*) FROM raw.transactions""",
    "quarantined records by rule": """
        SELECT source || ': ' || rule, count(*) FROM ops.schema_errors GROUP BY ALL ORDER BY 2 DESC LIMIT 12""",
    "models": """
        SELECT 'clean purchases', count(*) FROM analytics.stg_purchases UNION ALL
        SELECT 'products in catalog', count(*) FROM analytics.dim_products UNION ALL
        SELECT 'customers with features', count(*) FROM analytics.customer_features""",
    "AI stages": """
        SELECT 'product vectors', count(*) FROM ml.product_embeddings UNION ALL
        SELECT 'customers in segments', count(*) FROM ml.customer_segments UNION ALL
        SELECT 'segments', count(*) FROM ml.segment_profiles UNION ALL
        SELECT 'recommendations', count(*) FROM ml.recommendations UNION ALL
        SELECT 'accepted by the business rules', count(*) FROM outputs.recommendations UNION ALL
        SELECT 'rejected (kept with reasons)', count(*) FROM outputs.rejected_recommendations""",
    "dead-letter queue (open)": """
        SELECT stage || ': ' || reason_class, count(*) FROM ops.dead_letter WHERE resolved_at IS NULL GROUP BY ALL""",
    # the demo starts no daemon: its failed checks are on each day's line; sensors raise the alerts
    "alerts raised (by the sensors, which run with the daemon: python3 tasks.py ui)": """SELECT severity || ': ' || title, count(*) FROM ops.alerts GROUP BY ALL ORDER BY 2 DESC LIMIT 8""",
}


def generate(landing: Path, customers: int, days: int, seed: int) -> None:
    from generator import FaultRates, GeneratorConfig, generate as generate_landing

    generate_landing(
        GeneratorConfig(out=landing, customers=customers, days=days, seed=seed, start=FIRST_DAY,
                        faults=FaultRates.uniform(0.004))
    )


def run_day(day: dt.date) -> bool:
    import dagster as dg

    from bench.stage import daily_pipeline_job

    started = time.perf_counter()
    # as the daemon runs it: a process per step (in one process, 2M customers ran out of memory)
    result = dg.execute_job(daily_pipeline_job(), instance=dg.DagsterInstance.get(),
                            tags={"dagster/partition": day.isoformat()}, raise_on_error=False)
    failed_checks = [f"{c.asset_key.to_user_string()}:{c.check_name}" for c in result.get_asset_check_evaluations() if not c.passed]
    status = "succeeded" if result.success else "FAILED"
    print(f"  {day}: run {result.run_id[:8]} {status} in {time.perf_counter() - started:.1f}s"
          + (f"; failed checks: {', '.join(failed_checks)}" if failed_checks else ""), flush=True)
    return result.success


def print_summary(warehouse_path: Path) -> None:
    import duckdb

    from resources.warehouse import DuckDBWarehouse, fetch_all

    with DuckDBWarehouse(path=str(warehouse_path)).connect(read_only=True) as con:
        for title, sql in SUMMARY_QUERIES.items():
            try:
                rows = fetch_all(con, sql)
            except duckdb.CatalogException:  # nothing written there yet (no alert raised, ...)
                rows = []
            rows = rows or [("(none)", "")]
            print(f"\n{title}:")
            for label, count in rows:
                print(f"  {label:<45} {count:>12,}" if isinstance(count, int) else f"  {label:<45} {count}")
    print(f"\nwarehouse: {warehouse_path} ({warehouse_path.stat().st_size / 2**20:.1f} MiB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=5_000)
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--fresh", action="store_true", help="delete data/ (warehouse and landing) first")
    args = parser.parse_args(argv)

    landing = Path(os.environ.setdefault("LANDING_DIR", str(DATA / "landing")))
    warehouse = Path(os.environ.setdefault("WAREHOUSE_PATH", str(DATA / "warehouse.duckdb")))
    if args.fresh:
        shutil.rmtree(landing, ignore_errors=True)
        warehouse.unlink(missing_ok=True)
    print(f"generating {args.customers:,} customers over {args.days} days into {landing}", flush=True)
    generate(landing, args.customers, args.days, args.seed)
    # The partitions end on the last landed day (historical data); set before definitions load.
    os.environ.setdefault("PIPELINE_LAST_DAY", "landing")
    print("running the daily_pipeline job (the first run loads the local model and embeds the catalog)", flush=True)
    ok = all([run_day(FIRST_DAY + dt.timedelta(days=i)) for i in range(args.days)])
    print_summary(warehouse)
    print("\nSee the runs, assets and checks in the UI: python3 tasks.py ui  ->  http://127.0.0.1:3000")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
