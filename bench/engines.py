"""Scoring customers on threads, Ray and Spark on this machine: the figures behind the engine
choice (README, Scaling out). Prints figures; not a test.

    python -m bench.engines --customers 200000                      # threads and Ray
    pip install --target <dir> pyspark==4.3.0        # Spark is not a project dependency
    PYTHONPATH=<dir> python -m bench.engines --customers 200000 --spark

Synthetic purchases (recsys/synthetic.py) are written to one Parquet file; one model is fitted
once. Each engine scores every customer with the same function (`score_chunk_safely`) and its
top-10 rows are compared with the threads engine's:
- threads: the step's own loop (recsys.engines.ordered_threads_map, 2 threads);
- ray: a private local Ray with 2 workers, chunks sent from the driver as the pipeline does;
- spark: `local-cluster[2,1,1024]` (two executors of one core, their own JVMs), the file read by
  Spark, repartitioned by customer, scored in `mapInArrow` with the model in the task closure.
Set-up (starting the engine) and scoring are timed apart. On 2 cores no engine can beat the
threads: what shows is each engine's cost.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 2_048


def purchases_file(customers: int, products: int, folder: Path):
    from recsys.synthetic import SyntheticRetail

    data = SyntheticRetail(customers=customers, products=products, seed=11)
    path = folder / "purchases.parquet"
    with pq.ParquetWriter(path, next(iter(data.batches())).schema) as writer:
        for batch in data.batches():
            writer.write_batch(batch)
    return data, path


def file_source(path: Path):
    from resources.warehouse import parquet_batches

    return lambda: parquet_batches(path, 65_536)


def top_rows(results) -> set[tuple]:
    rows = set()
    for result, error in results:
        if error is not None:
            raise error
        table = pa.Table.from_batches([result.recommendations])
        rows.update(zip(*(table.column(c).to_pylist() for c in ("customer_id", "product_id", "rank")), strict=True))
    return rows


def run_threads(shared, path: Path) -> dict:
    from recsys.engines import ordered_threads_map
    from recsys.purchases import iter_customer_chunks
    from recsys.recommender import score_chunk_safely

    started = time.perf_counter()
    results = [r for _, r in ordered_threads_map(score_chunk_safely, iter_customer_chunks(file_source(path), CHUNK),
                                                 shared, 2)]
    return {"setup_s": 0.0, "score_s": time.perf_counter() - started, "rows": top_rows(results)}


def run_ray(shared, path: Path) -> dict:
    from recsys.engines import ray_ordered_map, ray_session
    from recsys.purchases import iter_customer_chunks
    from recsys.recommender import score_chunk_safely

    started = time.perf_counter()
    with ray_session(None, 2):
        ready = time.perf_counter()
        results = [r for _, r in ray_ordered_map(score_chunk_safely, iter_customer_chunks(file_source(path), CHUNK),
                                                 shared, None, 2)]
        done = time.perf_counter()
    return {"setup_s": ready - started, "score_s": done - ready, "rows": top_rows(results)}


def run_spark(shared, path: Path) -> dict:
    from pyspark.sql import SparkSession

    from recsys.recommender import RECOMMENDATION_SCHEMA

    started = time.perf_counter()
    python_path = os.pathsep.join([str(ROOT), *[p for p in sys.path if p.endswith(("site-packages", "pyspark"))]])
    spark = (SparkSession.builder.master("local-cluster[2,1,1024]").appName("bench-engines")
             .config("spark.executorEnv.PYTHONPATH", python_path)
             .config("spark.sql.execution.arrow.maxRecordsPerBatch", 65_536)
             .config("spark.ui.enabled", "false").getOrCreate())
    spark.range(2).count()  # executors up
    ready = time.perf_counter()
    model, candidates, track_hidden = shared

    def score_partition(batches):
        from recsys.purchases import iter_customer_chunks
        from recsys.recommender import score_chunk_safely

        materialized = list(batches)  # a partition's purchases, sorted by customer
        for chunk in iter_customer_chunks(lambda: iter(materialized), CHUNK):
            result, error = score_chunk_safely((model, candidates, track_hidden), chunk)
            if error is not None:
                raise error
            yield result.recommendations

    purchases = spark.read.parquet(str(path))
    scored = (purchases.repartition(2, "customer_id").sortWithinPartitions("customer_id", "purchased_at")
              .mapInArrow(score_partition, schema=_spark_schema(RECOMMENDATION_SCHEMA)))
    table = scored.select("customer_id", "product_id", "rank").toArrow()
    done = time.perf_counter()
    spark.stop()
    rows = set(zip(*(table.column(c).to_pylist() for c in ("customer_id", "product_id", "rank")), strict=True))
    return {"setup_s": ready - started, "score_s": done - ready, "rows": rows}


def _spark_schema(schema: pa.Schema):
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(schema)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=200_000)
    parser.add_argument("--products", type=int, default=4_000)
    parser.add_argument("--spark", action="store_true", help="also Spark (needs pyspark 4.x and Java 17)")
    parser.add_argument("--only", choices=["threads", "ray", "spark"], action="append",
                        help="run only these (threads always runs first: it is the reference)")
    args = parser.parse_args(argv)
    from recsys.recommender import Recommender, RecommenderConfig

    with tempfile.TemporaryDirectory() as folder:
        data, path = purchases_file(args.customers, args.products, Path(folder))
        started = time.perf_counter()
        model = Recommender.fit(data, RecommenderConfig(), as_of=data.end)
        shared = (model, model.candidates(data.catalog()), False)
        print(f"{args.customers:,} customers, {pq.ParquetFile(path).metadata.num_rows:,} lines, "
              f"{model.report.model_items:,} model items; fitted in {time.perf_counter() - started:.1f}s", flush=True)
        engines = {"threads": run_threads, "ray": run_ray, **({"spark": run_spark} if args.spark else {})}
        if args.only:
            engines = {name: run for name, run in engines.items() if name == "threads" or name in args.only}
        reference = None
        for name, run in engines.items():
            figures = run(shared, path)
            reference = reference if reference is not None else figures["rows"]
            same = figures["rows"] == reference
            print(f"{name:<8} set-up {figures['setup_s']:6.1f}s  scoring {figures['score_s']:6.1f}s  "
                  f"{args.customers / figures['score_s']:>9,.0f} customers/s  top-10 rows {len(figures['rows']):,}"
                  f"  {'identical' if same else 'DIFFERENT'} to threads", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
