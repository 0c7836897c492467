"""`raw_customers` against the bare DuckDB yardstick on the same file, and history in one run.

    python -m bench.ingest_vs_bare --customers 200000          # one generated day, both ways
    python -m bench.ingest_vs_bare --online-retail ../shared/data/online-retail/by-day

The first form generates one day (products and customers), lands the catalog, then lands the
customers file with `raw_customers` (a real Dagster run) and with `bench/bare_duckdb_ingest.py`,
and prints both times and their ratio (bare / pipeline: 1.0 is as fast as bare DuckDB). The
asset's time is its own `seconds` metadata (the step without Dagster's process start). The second
form lands every Online Retail day in the folder with one range run of `raw_transactions` and
prints the wall time of the whole run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg

os.environ.setdefault("PIPELINE_FIRST_DAY", "2010-12-01")  # partitions from the Online Retail history on
from assets.ingest import build_ingestion_assets  # noqa: E402 (after the partitions setting)
from generator import FaultRates, GeneratorConfig, generate
from resources.alerts import Alerts
from resources.compute_engine import ComputeEngine
from resources.landing import LandingZone
from resources.warehouse import DuckDBWarehouse

START = dt.date(2011, 9, 1)
RAW = {asset.key.to_user_string(): asset for asset in build_ingestion_assets()}


def resources(root: Path, landing: Path) -> dict:
    warehouse = DuckDBWarehouse(path=str(root / "warehouse.duckdb"))
    return {"warehouse": warehouse, "landing": LandingZone(root=str(landing)), "alerts": Alerts(warehouse=warehouse),
            "compute_engine": ComputeEngine()}


def seconds_of(result: dg.ExecuteInProcessResult, asset: str) -> float:
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    return float(event.materialization.metadata["seconds"].value)


def customers_vs_bare(customers: int, root: Path) -> dict:
    landing = root / "landing"
    generate(GeneratorConfig(out=landing, customers=customers, days=1, start=START, seed=7,
                             faults=FaultRates.uniform(0.002)))
    day = START.isoformat()
    res = resources(root, landing)
    assert dg.materialize([RAW["raw_products"]], partition_key=day, resources=res).success
    result = dg.materialize([RAW["raw_customers"]], partition_key=day, resources=res)
    pipeline = seconds_of(result, "raw_customers")
    bare = json.loads(subprocess.run(
        [sys.executable, "-m", "bench.bare_duckdb_ingest", str(landing / "customers" / f"{day}.jsonl"),
         str(landing / "products" / f"{day}.csv"), str(root / "bare.duckdb")],
        check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    return {"customers": customers, "raw_customers_seconds": round(pipeline, 2), "bare_duckdb_seconds": bare["seconds"],
            "ratio_bare_over_pipeline": round(bare["seconds"] / pipeline, 2)}


def online_retail_in_one_run(folder: Path, root: Path) -> dict:
    days = sorted(path.stem for path in folder.glob("*.csv"))
    res = resources(root, folder)
    res["landing"] = LandingZone(root=str(folder), patterns={"transactions": "{date}.csv"})
    started = time.perf_counter()
    result = dg.materialize([RAW["raw_transactions"]], resources=res, raise_on_error=False, tags={
        "dagster/asset_partition_range_start": days[0], "dagster/asset_partition_range_end": days[-1]})
    seconds = time.perf_counter() - started
    landed = len({e.materialization.partition for e in result.get_asset_materialization_events()})
    return {"files": len(days), "days_landed": landed, "run_seconds": round(seconds, 1), "success": result.success}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, nargs="*", default=[])
    parser.add_argument("--online-retail", type=Path)
    args = parser.parse_args()
    for count in args.customers:
        with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
            print(json.dumps(customers_vs_bare(count, Path(tmp))), flush=True)
    if args.online_retail:
        with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
            print(json.dumps(online_retail_in_one_run(args.online_retail, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
