"""Benchmark of the recommender (fit + score) on synthetic purchases (a benchmark, not a test).

    python -m bench.recommender --customers 200000
    python -m bench.recommender --customers 2000000 --json-out bench/results/recommender-2m.json

A child process generates the purchases (recsys.synthetic: about --lines-per-customer lines per
customer over --products products with topic structure) into a temporary DuckDB file, so data
generation never counts in the figures. This process then reads it back the way the pipeline
does (DuckDB -> Arrow record batches, grouped by customer) and times each stage:

    item_scan     pass 1: vocabulary and buyers per product, choice of the top-M items
    validation_gram_pass  pass 2: the validation window's Gram matrix, popularity, spend
    calibration   validation model solve + pass 3 on a sample of customers
    gram_pass     pass 4: the full history's Gram matrix, popularity, spend
    solve         final EASE solve
    score         pass 4: top-K for every customer, chunk by chunk (results counted, dropped)

For each stage: rows, seconds, rows/s and the peak RSS of that stage (the kernel's high-water
mark, reset between stages through /proc/self/clear_refs), plus the process peak, as a table and
as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import duckdb

from recsys.recommender import Recommender, RecommenderConfig
from recsys.synthetic import SyntheticRetail

TABLE = "purchases"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    data = SyntheticRetail(
        customers=args.customers, products=args.products, lines_per_customer=args.lines_per_customer, seed=args.seed
    )
    if args.generate_into:
        _generate(data, Path(args.generate_into))
        return 0
    config = replace(
        RecommenderConfig(),
        max_items=args.max_items,
        score_chunk_customers=args.chunk_customers,
        workers=args.workers,
    )
    with tempfile.TemporaryDirectory(prefix="bench-recsys-") as tmp:
        database = Path(tmp) / "purchases.duckdb"
        generation_seconds = _generate_in_child(args, database)
        figures = _run(database, data, config, args.batch_rows)
    figures["generation_seconds"] = generation_seconds
    _print_table(figures)
    output = json.dumps(figures, indent=2, default=str)
    print(output)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(output + "\n")
    return 0


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=200_000)
    parser.add_argument("--products", type=int, default=20_000)
    parser.add_argument("--lines-per-customer", type=float, default=10.0)
    parser.add_argument("--max-items", type=int, default=RecommenderConfig.max_items)
    parser.add_argument("--chunk-customers", type=int, default=RecommenderConfig.score_chunk_customers)
    parser.add_argument("--workers", type=int, default=RecommenderConfig.workers)
    parser.add_argument("--batch-rows", type=int, default=100_000, help="rows per Arrow batch from DuckDB")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json-out")
    parser.add_argument("--generate-into", help=argparse.SUPPRESS)  # child-process mode
    return parser.parse_args(argv)


def _generate_in_child(args, database: Path) -> float:
    clock = time.perf_counter()
    command = [sys.executable, "-m", "bench.recommender", "--generate-into", str(database)]
    command += ["--customers", str(args.customers), "--products", str(args.products)]
    command += ["--lines-per-customer", str(args.lines_per_customer), "--seed", str(args.seed)]
    subprocess.run(command, check=True)
    return round(time.perf_counter() - clock, 2)


def _generate(data: SyntheticRetail, database: Path) -> None:
    con = duckdb.connect(str(database), config={"memory_limit": "1GB", "threads": 2})
    try:
        con.execute(
            f"CREATE TABLE {TABLE} (customer_id VARCHAR, product_id VARCHAR, amount DOUBLE, purchased_at TIMESTAMP)"
        )
        for batch in data.batches():  # generated in customer order: insertion order is sorted
            con.register("batch", batch)
            con.execute(f"INSERT INTO {TABLE} SELECT * FROM batch")
            con.unregister("batch")
    finally:
        con.close()


def _run(database: Path, data: SyntheticRetail, config: RecommenderConfig, batch_rows: int) -> dict:
    con = duckdb.connect(str(database), read_only=True, config={"memory_limit": "256MB", "threads": 1})
    rows = con.execute(f"SELECT count(*) FROM {TABLE}").fetchall()[0][0]
    # insertion order is customer order and DuckDB preserves it; the pipeline would ORDER BY.
    query = f"SELECT customer_id, product_id, amount, purchased_at FROM {TABLE}"
    source = lambda: con.sql(query).to_arrow_reader(batch_rows)  # noqa: E731
    stages = []
    _reset_peak()
    clock = time.perf_counter()
    model = Recommender.fit(source, config=config)
    fit_seconds = time.perf_counter() - clock
    fit_peak = _stage_peak_mb()
    for stage, seconds in model.report.seconds.items():
        stages.append(_stage(stage, rows if stage != "solve" else model.report.model_items, seconds, None))
    stages[-1]["peak_rss_mb"] = fit_peak  # the kernel mark covers the whole fit
    _reset_peak()
    clock = time.perf_counter()
    recommendations = customers = skipped = popularity = 0
    for part in model.recommend(source, data.catalog()):
        recommendations += part.recommendations.num_rows
        customers += part.customers
        skipped += part.skipped.num_rows
        popularity += part.popularity
    score_seconds = time.perf_counter() - clock
    stages.append(_stage("score", customers, score_seconds, _stage_peak_mb()))
    con.close()
    return {
        "customers": data.customers,
        "purchase_lines": rows,
        "products": data.products,
        "config": asdict(config),
        "stages": stages,
        "fit_seconds": round(fit_seconds, 2),
        "fit_peak_rss_mb": fit_peak,
        "score_seconds": round(score_seconds, 2),
        "total_seconds": round(fit_seconds + score_seconds, 2),
        "process_peak_rss_mb": max(fit_peak, stages[-1]["peak_rss_mb"], _process_peak_mb()),
        "recommendations": recommendations,
        "customers_scored": customers,
        "customers_popularity": popularity,
        "customers_skipped": skipped,
        "fit_report": model.report.to_dict(),
        "machine": _machine(),
    }


def _stage(name: str, rows: int, seconds: float, peak_mb: float | None) -> dict:
    return {
        "stage": name,
        "rows": rows,
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds) if seconds > 0 else None,
        "peak_rss_mb": peak_mb,
    }


def _reset_peak() -> None:
    """Reset the kernel's RSS high-water mark (VmHWM) so the next reading is per stage."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: the reading becomes the process peak so far


def _stage_peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return _process_peak_mb()


def _process_peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(), "load_average": load}


def _print_table(figures: dict) -> None:
    print(f"\nrecommender: {figures['customers']:,} customers, {figures['purchase_lines']:,} lines, {figures['products']:,} products")
    print(f"{'stage':<12} {'rows':>12} {'seconds':>9} {'rows/s':>12} {'peak RSS MiB':>13}")
    for stage in figures["stages"]:
        peak = "" if stage["peak_rss_mb"] is None else f"{stage['peak_rss_mb']:.0f}"
        rate = "" if stage["rows_per_s"] is None else f"{stage['rows_per_s']:,}"
        print(f"{stage['stage']:<12} {stage['rows']:>12,} {stage['seconds']:>9.2f} {rate:>12} {peak:>13}")
    print(
        f"{'total':<12} {figures['purchase_lines']:>12,} {figures['total_seconds']:>9.2f} "
        f"{'':>12} {figures['process_peak_rss_mb']:>13.0f}  (fit {figures['fit_seconds']} s, score {figures['score_seconds']} s)\n"
    )


if __name__ == "__main__":
    sys.exit(main())
