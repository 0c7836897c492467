"""Scoring with the EASE weights read whole or by column blocks, alternately (a benchmark).

    python3 tasks.py bench --customers 2000000 --workdir data/bench/2m   # a warehouse and its model
    .venv/bin/python -m bench.score_layout data/bench/2m --customers 100000 --rounds 6

Scores a sample of the warehouse's customers with its kept model on the pipeline's threads and
chunk size, in rounds that alternate the two ways (this VM's runs spread by about 10 %: one
round of each says little). Prints seconds per round extrapolated to 2M customers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from pathlib import Path

import numpy as np

import recsys.ease as ease
from assets.infer.embeddings import PRODUCT_VECTORS_SQL
from assets.infer.recommendations import CATALOG_SQL
from recsys.customer_vectors import ProductEmbeddings
from recsys.purchases import iter_customer_chunks
from recsys.recommender import Recommender, RecommenderConfig, ordered_parallel_map
from resources.warehouse import DuckDBWarehouse, snapshot

SAMPLE_SQL = """SELECT customer_id, product_id, amount, purchased_at FROM analytics.stg_purchases
    WHERE customer_id IN (SELECT DISTINCT customer_id FROM analytics.stg_purchases USING SAMPLE {n} ROWS)
    ORDER BY customer_id, purchased_at"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path, help="a scale benchmark's workdir (warehouse.duckdb, models/)")
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    model = Recommender.load(next((args.workdir / "models").glob("*.pkl")))
    model = model.scoring_as_of(model.as_of + dt.timedelta(days=1))
    blocks = model.scorer.weights
    whole = np.ascontiguousarray(blocks.transpose(1, 0, 2)).reshape(blocks.shape[1], -1)
    ways = {"whole matrix": lambda history, _: np.asarray(history @ whole),
            "column blocks": ease.times_column_blocks}
    warehouse = DuckDBWarehouse(path=str(args.workdir / "warehouse.duckdb"))
    config = RecommenderConfig()
    queries = {"purchases": SAMPLE_SQL.format(n=int(args.customers)), "catalog": CATALOG_SQL}
    with snapshot(warehouse, queries, optional={"vectors": PRODUCT_VECTORS_SQL}) as taken:
        vectors = ProductEmbeddings.from_arrow(taken.table("vectors"), vector_column="vector")
        candidates = model.candidates(taken.table("catalog"), vectors)
        chunks = list(iter_customer_chunks(lambda: taken.batches("purchases", 100_000), config.score_chunk_customers))
    customers = sum(c.n_customers for c in chunks)
    print(f"{customers:,} customers, {blocks.shape[0]} column blocks of {blocks.shape[2]}, "
          f"{config.workers} threads, chunks of {config.score_chunk_customers}")
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for _ in range(args.rounds):
            for name, multiply in ways.items():
                ease.times_column_blocks = multiply
                started = time.perf_counter()
                for _ in ordered_parallel_map(lambda c: model.score_chunk(c, candidates, track_hidden=True),
                                              chunks, config.workers):
                    pass
                seconds[name].append((time.perf_counter() - started) * 2e6 / customers)
    finally:
        ease.times_column_blocks = ways["column blocks"]
    for name, values in seconds.items():
        print(f"{name:>14}: at 2M {statistics.median(values):6.1f} s median, {min(values):6.1f} s best "
              f"({', '.join(f'{v:.0f}' for v in values)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
