"""Day 1 on both backends, side by side: every step of the warehouse's daily run (ingestion, SQL
models, AI stages) against the lakehouse's (the same stages on Iceberg), each stage in a process
of its own: seconds and peak RSS. Prints figures; not a test.

    python -m bench.lakehouse --customers 200000        # generates day 1, starts a local PostgreSQL
    python -m bench.lakehouse --landing DIR --day 2011-09-01
    python -m bench.lakehouse --work DIR --landing DIR/landing --lakehouse-only   # a new lake, compared
    python -m bench.lakehouse --customers 20000 --storage-days 4 --keep-days 2   # the lake's size, pruned

After the lakehouse's stages, every AI stage's tables on the lakehouse are compared with the
warehouse's in the same folder, row for row.

Every stage runs through bench.stage (the asset with its checks, in a process of its own, as the
daily run runs it): the warehouse's from the daily_pipeline job, the lakehouse's from the
lakehouse_pipeline job, with the SQL catalog on a PostgreSQL server started here
(tests/postgres_support.py) and the data files in a folder. The warehouse's ingestion steps also
run their GX suites (asset checks); the lakehouse's have none. Both get the same memory rule
(STEP_MEMORY_BUDGET, default 1 GiB a step).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AI_STAGES = ("product_embeddings", "customer_segments", "recommendations", "validated_recommendations",
             "recommendation_quality")
SQL_MODELS = ("stg_order_lines", "dim_products", "stg_customer_history", "stg_purchases", "customer_features")
WAREHOUSE_STAGES = ("raw_products", "raw_transactions", "raw_customers", *SQL_MODELS, *AI_STAGES)
LAKE_STAGES = ("lake_raw_products", "lake_raw_transactions", "lake_raw_customers", "lake_sql_models",
               *(f"lake_{stage}" for stage in AI_STAGES))


def in_process(arguments: list[str], env: dict) -> dict:
    done = subprocess.run([sys.executable, "-m", *arguments], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(arguments)} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not result["success"]:
        raise SystemExit(f"{' '.join(arguments)} failed: {result.get('error')}")
    return result


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=200_000)
    parser.add_argument("--landing", type=Path, help="an existing landing folder (default: generate one day)")
    parser.add_argument("--day", default="2011-09-01")
    parser.add_argument("--work", type=Path, help="where the warehouse and the lake go (default: a temp folder)")
    parser.add_argument("--lakehouse-only", action="store_true", help="the lakehouse's stages alone (a new lake)")
    parser.add_argument("--storage-days", type=int, default=0,
                        help="the lake alone, this many days in a row: its size after each, then pruned")
    parser.add_argument("--keep-days", type=int, default=2, help="with --storage-days: the retention pruned to")
    args = parser.parse_args()
    if args.storage_days:
        args.lakehouse_only = True

    from tests.postgres_support import postgres_server

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-lakehouse-"))
    work.mkdir(parents=True, exist_ok=True)
    landing = args.landing
    if landing is None:
        from generator import GeneratorConfig, generate

        landing = work / "landing"
        started = time.perf_counter()
        generate(GeneratorConfig(out=landing, customers=args.customers, days=max(args.storage_days, 1)))
        print(f"generated {args.customers:,} customers in {time.perf_counter() - started:.0f}s", flush=True)
    env = {**os.environ, "LANDING_DIR": str(landing), "WAREHOUSE_PATH": str(work / "warehouse.duckdb"),
           "PYTHONWARNINGS": "ignore"}
    results: dict[str, dict] = {}
    for stage in () if args.lakehouse_only else WAREHOUSE_STAGES:
        results[stage] = in_process(["bench.stage", stage, args.day], env)
        print(f"warehouse {stage}: {results[stage]['seconds']:.1f}s, {results[stage]['peak_rss_mb']:.0f} MB", flush=True)
    with postgres_server() as server:
        env["LAKEHOUSE_CATALOG_URI"] = (f"postgresql+psycopg2://{server.user}:{server.password}@{server.host}:"
                                        f"{server.port}/{server.db_name}")
        shutil.rmtree(work / "lake", ignore_errors=True)  # its catalog is new
        env["LAKEHOUSE_LOCATION"] = str(work / "lake")
        env["BENCH_JOB"] = "lakehouse_pipeline"
        env["PIPELINE_BACKEND"] = "lakehouse"  # its own catalog: the lake serves outputs.recommendations
        if args.storage_days:
            return storage(env, work, args.day, args.storage_days, args.keep_days)
        for stage in LAKE_STAGES:
            results[stage] = in_process(["bench.stage", stage, args.day], env)
            print(f"lakehouse {stage}: {results[stage]['seconds']:.1f}s, {results[stage]['peak_rss_mb']:.0f} MB",
                  flush=True)
        if (work / "warehouse.duckdb").exists():
            compare(env, work, args.day)
    if not args.lakehouse_only:
        report(results, work)


def comparable_columns(con, database: str, schema: str, table: str, leave_out: tuple[str, ...] = ()) -> str:
    """The columns two backends' copies of a table are compared on: not the times of when rows
    were written (nor `leave_out`); doubles to 9 decimals (sums in another order differ in the
    last bits)."""
    columns = con.execute("SELECT column_name, data_type FROM duckdb_columns() WHERE database_name = ? AND "
                          "schema_name = ? AND table_name = ? ORDER BY column_index", [database, schema, table]).fetchall()
    if not columns:
        raise ValueError(f"{database}.{schema}.{table} does not exist")
    return ", ".join(f'round("{c}", 9)' if kind == "DOUBLE" else f'"{c}"' for c, kind in columns
                     if not kind.startswith("TIMESTAMP") and c not in leave_out)


def compare(env: dict, work: Path, day: str) -> None:
    """Every AI stage's tables as of the day on the lakehouse against the warehouse's: rows on each
    side and rows in one but not the other (times of writing left out, doubles to 9 decimals)."""
    import duckdb

    from assets.common.lakehouse_stages import hydrate_tables, latest_states, stages_among
    from definitions import AI_ASSETS
    from resources.lakehouse import Lakehouse

    lake = Lakehouse(catalog_uri=env["LAKEHOUSE_CATALOG_URI"], location=env["LAKEHOUSE_LOCATION"])
    started = time.perf_counter()
    path = work / "compare.duckdb"
    path.unlink(missing_ok=True)
    states = latest_states(lake, day, stages_among(AI_ASSETS))
    with duckdb.connect(str(path), config={"memory_limit": "1GB", "temp_directory": str(work / "compare.tmp")}) as con:
        hydrate_tables(con, lake, states)
        con.execute(f"ATTACH '{work / 'warehouse.duckdb'}' AS wh (READ_ONLY)")
        print("\n| table | warehouse rows | lakehouse rows | only in one |\n|---|---|---|---|")
        for state in states.values():
            for table in json.loads(state["tables"]):
                schema, name = table.split(".")
                kept = comparable_columns(con, "wh", schema, name)
                lake_rows, warehouse_rows = (con.execute(f"SELECT count(*) FROM {db}{table}").fetchall()[0][0]
                                             for db in ("", "wh."))
                differing = con.execute(f"SELECT (SELECT count(*) FROM (SELECT {kept} FROM {table} EXCEPT ALL "
                                        f"SELECT {kept} FROM wh.{table})) + (SELECT count(*) FROM (SELECT {kept} "
                                        f"FROM wh.{table} EXCEPT ALL SELECT {kept} FROM {table}))").fetchall()[0][0]
                print(f"| {table} | {warehouse_rows:,} | {lake_rows:,} | {differing:,} |", flush=True)
    print(f"compared in {time.perf_counter() - started:.0f}s")


def storage(env: dict, work: Path, first_day: str, days: int, keep_days: int) -> None:
    """The lake's size after each day of the lakehouse's stages, then after prune_builds."""
    from datetime import date, timedelta

    from assets.common.lakehouse_retention import prune_builds
    from resources.lakehouse import Lakehouse

    for offset in range(days):
        day = str(date.fromisoformat(first_day) + timedelta(days=offset))
        seconds = sum(in_process(["bench.stage", stage, day], env)["seconds"] for stage in LAKE_STAGES)
        print(f"day {day}: {seconds:.0f}s of steps, lake folder {folder_bytes(work / 'lake') / 1e6:,.0f} MB", flush=True)
    lake = Lakehouse(catalog_uri=env["LAKEHOUSE_CATALOG_URI"], location=env["LAKEHOUSE_LOCATION"],
                     history_grace_minutes=0)  # no reader here
    started = time.perf_counter()
    pruned = prune_builds(lake, keep_days)
    print(f"pruned to {keep_days} days in {time.perf_counter() - started:.1f}s: "
          f"{sum(len(d) for d in pruned.removed.values())} builds removed, {pruned.data_files_deleted} files deleted, "
          f"{len(pruned.served_days_kept)} served day(s) kept; "
          f"lake folder {folder_bytes(work / 'lake') / 1e6:,.0f} MB")


def report(results: dict[str, dict], work: Path) -> None:
    rows = [(f"raw_{s}", f"lake_raw_{s}") for s in ("products", "transactions", "customers")]
    print("\n| stage | warehouse: seconds | warehouse: peak | lakehouse: seconds | lakehouse: peak |")
    print("|---|---|---|---|---|")
    for warehouse_stage, lake_stage in rows:
        w, lake = results[warehouse_stage], results[lake_stage]
        print(f"| {warehouse_stage} | {w['seconds']:.1f} | {w['peak_rss_mb']:,.0f} MB | {lake['seconds']:.1f} | "
              f"{lake['peak_rss_mb']:,.0f} MB |")
    models = [results[s] for s in SQL_MODELS]
    lake = results["lake_sql_models"]
    print(f"| the 5 SQL models ({', '.join(SQL_MODELS)}) | {sum(m['seconds'] for m in models):.1f} (sum of 5 steps) | "
          f"{max(m['peak_rss_mb'] for m in models):,.0f} MB (highest) | {lake['seconds']:.1f} (one step) | "
          f"{lake['peak_rss_mb']:,.0f} MB |")
    for stage in AI_STAGES:
        w, lake = results[stage], results[f"lake_{stage}"]
        print(f"| {stage} | {w['seconds']:.1f} | {w['peak_rss_mb']:,.0f} MB | {lake['seconds']:.1f} | "
              f"{lake['peak_rss_mb']:,.0f} MB |")
    print(f"\nwarehouse file {os.path.getsize(work / 'warehouse.duckdb') / 1e6:,.0f} MB (every table); "
          f"lake folder {folder_bytes(work / 'lake') / 1e6:,.0f} MB (every stage's tables)")


if __name__ == "__main__":
    main()
