"""Offline quality of the recommender vs popularity baselines (a benchmark, not a test).

    python -m bench.recsys_quality                       # Online Retail split (the selected model), README table
    python -m bench.recsys_quality --tune                # + the validation grid behind the defaults
    python -m bench.recsys_quality --text-neighbours     # + cold start through product text (local model)
    python -m bench.recsys_quality --synthetic 200000 --max-items 1024,2048,4096,8192

Online Retail: train < 2011-06-01, test 2011-06-01 .. 2011-08-31 (data read from
--online-retail, default ../shared/data/online-retail/by-day). Synthetic: recsys.synthetic with
20,000 products, last 92 of 365 days as the test window; shows what the top-M restriction costs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa

from recsys.customer_vectors import ProductEmbeddings
from recsys.evaluation import OURS, evaluate_split, tune_on_validation
from assets.evaluate.online_retail import catalog_before, load_online_retail, product_texts_before, purchases_source
from recsys.recommender import RecommenderConfig
from recsys.selection import select_model
from recsys.synthetic import SyntheticRetail

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ONLINE_RETAIL = ROOT.parent / "shared" / "data" / "online-retail" / "by-day"
CUTOFF, TEST_END = datetime(2011, 6, 1), datetime(2011, 9, 1)
VALIDATION_CUTOFF = datetime(2011, 4, 2)  # the 60 days before CUTOFF: the cold-start threshold sweep
COLD_START_THRESHOLDS = [None, 0.95, 0.9, 0.85, 0.8, 0.7]
TUNING_GRID = {
    "l2_regularization": [1, 2, 4, 8, 16, 32],
    "gram_half_life_days": [30, 45, 90],
    "activity_exponent": [0.25, 0.5, 0.75],
    "popularity_blend": [0.05, 0.1, 0.2, 0.3],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--online-retail", default=str(DEFAULT_ONLINE_RETAIL))
    parser.add_argument("--tune", action="store_true", help="also run the validation grid (minutes)")
    parser.add_argument("--text-neighbours", action="store_true",
                        help="embed product descriptions with the local model; selection judges text neighbours; "
                             "also print a similarity-threshold sweep on the validation window")
    parser.add_argument("--synthetic", type=int, default=0, help="customers of a synthetic run (0: skip)")
    parser.add_argument("--max-items", default="", help="comma-separated M values for the synthetic run")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    results = {}
    if Path(args.online_retail).is_dir():
        results["online_retail"] = online_retail(Path(args.online_retail), args.tune, args.text_neighbours)
    else:
        print(f"Online Retail not found at {args.online_retail}: skipped")
    if args.synthetic:
        sizes = [int(m) for m in args.max_items.split(",") if m] or [RecommenderConfig.max_items]
        results["synthetic"] = synthetic(args.synthetic, sizes)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


def online_retail(directory: Path, tune: bool, text_neighbours: bool = False) -> dict:
    con = duckdb.connect()
    rows = load_online_retail(con, directory)
    source = purchases_source(con)
    result = {"clean_purchase_lines": rows}
    if tune:
        clock = time.perf_counter()
        grid = tune_on_validation(source, CUTOFF, TUNING_GRID)
        result["tuning_seconds"] = round(time.perf_counter() - clock, 1)
        result["tuning_top10"] = grid[:10]
        print("validation grid, best first:")
        for row in grid[:10]:
            print(" ", row)
    vectors = text_vectors(con, CUTOFF) if text_neighbours else None
    selection = select_model(source, CUTOFF, product_vectors=vectors)  # what the pipeline deploys at the cut-off
    print(f"model selection before {CUTOFF:%Y-%m-%d}: {selection.chosen}\n{selection.to_markdown()}")
    if text_neighbours:
        result["text_neighbours_validation"] = cold_start_on_validation(con, source, selection.config)
    report = evaluate_split(source, CUTOFF, TEST_END, catalog=catalog_before(con, CUTOFF), config=selection.config,
                            product_vectors=vectors)
    result["selection"] = selection.to_dict()
    print(f"\nOnline Retail, train < {CUTOFF:%Y-%m-%d}, test until {TEST_END:%Y-%m-%d} (exclusive), "
          f"{report.evaluated_customers} evaluated customers, {report.candidate_products} candidate products")
    print(report.to_markdown())
    print("segments:", report.segmentation)
    print("calibration check:", report.calibration_check)
    result.update(table=report.table, calibration_check=report.calibration_check, fit_report=report.fit_report)
    return result


def text_vectors(con: duckdb.DuckDBPyConnection, cutoff: datetime) -> ProductEmbeddings:
    """Local-model vectors of each product's latest description before the cut-off."""
    from resources.model_clients.local import LocalSentenceTransformerClient

    texts = product_texts_before(con, cutoff)
    clock = time.perf_counter()
    response = LocalSentenceTransformerClient(torch_threads=2, encode_batch_size=64).embed(texts["text"].to_pylist())
    print(f"embedded {texts.num_rows:,} product texts before {cutoff:%Y-%m-%d} in {time.perf_counter() - clock:.1f}s")
    return ProductEmbeddings.from_arrays(texts["product_id"].filter(pa.array(response.valid)),
                                         response.vectors[response.valid])


def cold_start_on_validation(con, source, config: RecommenderConfig) -> list[dict]:
    """The similarity threshold on the validation window before the test cut-off (no peeking):
    hit rate, and how many cold products are recommended and bought, per threshold."""
    vectors = text_vectors(con, VALIDATION_CUTOFF)
    rows = []
    for threshold in COLD_START_THRESHOLDS:
        report = evaluate_split(source, VALIDATION_CUTOFF, CUTOFF, catalog=catalog_before(con, VALIDATION_CUTOFF),
                                config=replace(config, text_neighbour_min_similarity=threshold),
                                product_vectors=vectors)
        cold = report.calibration_check["text_neighbour"]
        rows.append({"min_similarity": threshold, "hit_rate@10": report.row(OURS)["hit_rate@10"],
                     "cold_products_in_reach": report.fit_report["cold_start"].get("products", 0),
                     "cold_products_recommended": cold["products"], "cold_recommendations": cold["recommendations"],
                     "cold_share_bought": cold["share_bought_in_test_window"]})
        print(rows[-1], flush=True)
    return rows


def synthetic(customers: int, max_items: list[int]) -> list[dict]:
    data = SyntheticRetail(customers=customers, products=20_000)
    cutoff = data.end - timedelta(days=92)
    rows = []
    for size in max_items:
        clock = time.perf_counter()
        report = evaluate_split(data, cutoff, data.end, catalog=data.catalog(), config=replace(RecommenderConfig(), max_items=size))
        ours = report.row(OURS)
        rows.append(
            {
                "max_items": size,
                "pairs_covered": report.fit_report["purchase_pairs_covered_by_model"],
                **{key: ours[key] for key in ("hit_rate@10", "ndcg@10", "coverage", "hr_vs_popularity")},
                "popularity_hit_rate@10": report.row("global popularity")["hit_rate@10"],
                "seconds": round(time.perf_counter() - clock, 1),
            }
        )
        print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
