"""Offline quality of the recommender against baselines, under the same business rules.

Two datasets, each with a time split (train before a cut-off, test on the products each
customer bought after it that were new to them): the warehouse's own purchases (generated data
in the demo), and the real UCI Online Retail data when `ONLINE_RETAIL_DIR` points at its
by-day CSVs. Results go to `ml.evaluation_results` (one row per as-of day, dataset and method).
"""

import datetime as dt
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
from pydantic import Field

from assets.common.current_state import Built, StateBuild, StateConfig, current_state_asset
from assets.evaluate import online_retail
from recsys.evaluation import OURS, EvaluationReport, evaluate_split
from resources.warehouse import snapshot

RESULTS_TABLE = "ml.evaluation_results"
STAGE = "recommendation_quality"
# recommendations is not read (the recommender is refit on the split), but it is what is judged.
INPUTS = ("recommendations", "customer_segments", "dim_products", "stg_purchases")
ONLINE_RETAIL_CUTOFF = dt.datetime(2011, 6, 1)
ONLINE_RETAIL_TEST_END = dt.datetime(2011, 9, 1)
POPULARITY = "global popularity"


class EvaluationConfig(StateConfig):
    test_days: int = Field(default=60, description="Warehouse split: test window = the last N days up to as-of.")
    k: int = Field(default=10, description="Cut-off of the ranking metrics (@K).")
    max_customers: int = Field(
        default=50_000, ge=1,
        description="Warehouse split: above this many customers, evaluate a stable hash sample of about this size.",
    )
    online_retail_dir: str = Field(
        default_factory=lambda: os.getenv("ONLINE_RETAIL_DIR", ""),
        description="Folder of the Online Retail by-day CSVs; empty: that evaluation is skipped.",
    )


# Above max_customers, a stable hash sample of about that many customers (by per mille).
SAMPLED = """hash(customer_id) % 1000 < (SELECT least(1000, ceil(1000 * $max_customers
             / greatest(count(DISTINCT customer_id), 1))) FROM analytics.stg_purchases)"""


def evaluate_warehouse(warehouse, as_of: dt.date, config: EvaluationConfig) -> EvaluationReport | None:
    """Split the warehouse's clean purchases at as-of minus test_days; segments from ml.customer_segments.

    The inputs are a snapshot, so no lock is held while the evaluation refits and scores."""
    test_end = dt.datetime.combine(as_of + dt.timedelta(days=1), dt.time())
    cutoff = test_end - dt.timedelta(days=config.test_days)
    params = {"max_customers": config.max_customers}
    # stg_purchases is stored sorted by customer, so the sample streams customer by customer; only
    # the sampled customers' segments are read (a dict of 2M customers costs hundreds of MB).
    optional = {
        "purchases": (f"SELECT customer_id, product_id, amount, purchased_at FROM analytics.stg_purchases"
                      f" WHERE {SAMPLED}", params),
        "segments": (f"SELECT customer_id, segment_id FROM ml.customer_segments WHERE {SAMPLED}", params),
    }
    with snapshot(warehouse, {"catalog": "SELECT product_id, in_stock, price FROM analytics.dim_products"},
                  optional=optional) as taken:
        if not taken.has("purchases"):
            return None
        source = lambda: taken.batches("purchases", 50_000)  # noqa: E731 (re-readable)
        segments = (dict(zip(*taken.table("segments").to_pydict().values(), strict=True))
                    if taken.has("segments") else None)
        return evaluate_split(source, cutoff, test_end, catalog=taken.table("catalog"), segments=segments, k=config.k)


def evaluate_online_retail(folder: Path, config: EvaluationConfig) -> EvaluationReport:
    """The reference split on real data: train < 2011-06-01, test 2011-06-01..2011-08-31."""
    with duckdb.connect(config={"memory_limit": "1GB", "threads": 2}) as con:
        online_retail.load_online_retail(con, folder)
        source = online_retail.purchases_source(con)
        catalog = online_retail.catalog_before(con, ONLINE_RETAIL_CUTOFF)
        return evaluate_split(source, ONLINE_RETAIL_CUTOFF, ONLINE_RETAIL_TEST_END, catalog=catalog, k=config.k)


def store_results(build: StateBuild, reports: dict[str, EvaluationReport], lifts: dict) -> None:
    rows = [
        (build.as_of, dataset, report.cutoff, report.test_end, report.evaluated_customers, row["method"],
         row.get(f"hit_rate@{report.k}"), row.get(f"precision@{report.k}"), row.get(f"recall@{report.k}"),
         row.get(f"ndcg@{report.k}"), row.get("coverage"))
        for dataset, report in reports.items() for row in report.table
    ]
    with build.warehouse.transaction() as con:
        con.execute("CREATE SCHEMA IF NOT EXISTS ml")
        con.execute(
            f"""CREATE TABLE IF NOT EXISTS {RESULTS_TABLE} (as_of DATE, dataset VARCHAR, cutoff VARCHAR,
                test_end VARCHAR, evaluated_customers BIGINT, method VARCHAR, hit_rate DOUBLE,
                precision DOUBLE, recall DOUBLE, ndcg DOUBLE, coverage DOUBLE)"""
        )
        con.execute(f"DELETE FROM {RESULTS_TABLE} WHERE as_of = ?", [build.as_of])
        if rows:
            con.executemany(f"INSERT INTO {RESULTS_TABLE} VALUES ({', '.join(['?'] * 11)})", rows)
        build.record(con, len(rows), {"lift_over_popularity": lifts})


def lift_over_popularity(report: EvaluationReport) -> float | None:
    key = f"hit_rate@{report.k}"
    popularity = report.row(POPULARITY)[key]
    return round(report.row(OURS)[key] / popularity, 3) if popularity else None


def quality_verdicts(measured: Mapping[str, Any], config: EvaluationConfig) -> list[dg.AssetCheckResult]:
    lifts = measured.get("lift_over_popularity", {})
    measured_lifts = [lift for lift in lifts.values() if lift is not None]
    weakest = min(measured_lifts) if measured_lifts and len(measured_lifts) == len(lifts) else None
    return [dg.AssetCheckResult(
        check_name="beats_global_popularity",
        passed=weakest is not None and weakest >= 1.0,
        severity=dg.AssetCheckSeverity.WARN,
        # The weakest lift is a float, so the UI plots it from build to build.
        metadata={"lift_over_popularity": dg.MetadataValue.json(lifts),
                  **({"min_lift_over_popularity": float(weakest)} if weakest is not None else {})},
        description="no dataset could be evaluated against popularity" if weakest is None else
        f"our hit-rate is {weakest:.2f}x that of recommending the most popular products "
        f"(weakest of {len(lifts)} dataset(s); must be at least 1x)",
    )]


@current_state_asset(
    name=STAGE,
    inputs=INPUTS,
    tables=[RESULTS_TABLE],
    group="evaluate",
    config_class=EvaluationConfig,
    pool=None,  # reads in one short connection; the evaluation itself holds none
    kinds={"python"},
    checks=[dg.AssetCheckSpec("beats_global_popularity", asset=STAGE,
                              description="Our hit-rate beats recommending the most popular products.")],
    verdicts=quality_verdicts,
)
def recommendation_quality(build: StateBuild) -> Built:
    """Hit-rate, precision, recall, NDCG @K and coverage: ours vs global and segment popularity."""
    config = build.config
    reports: dict[str, EvaluationReport] = {}
    warehouse_report = evaluate_warehouse(build.warehouse, build.as_of, config)
    if warehouse_report is not None and warehouse_report.evaluated_customers:
        reports["warehouse"] = warehouse_report
    else:
        build.log.warning("warehouse split: no customer bought a new product in the test window; nothing to evaluate")
    folder = Path(config.online_retail_dir) if config.online_retail_dir else None
    if folder and folder.is_dir():
        reports["online_retail"] = evaluate_online_retail(folder, config)
    elif folder:
        build.log.warning(f"ONLINE_RETAIL_DIR {folder} is not a folder; the Online Retail evaluation is skipped")
    lifts = {name: lift_over_popularity(report) for name, report in reports.items()}
    store_results(build, reports, lifts)
    metadata: dict = {"lift_over_popularity": lifts}
    for name, report in reports.items():
        metadata[f"{name}_table"] = dg.MetadataValue.md(report.to_markdown())
        metadata[f"{name}_evaluated_customers"] = report.evaluated_customers
        metadata[f"{name}_split"] = f"train < {report.cutoff}, test until {report.test_end}"
    build.log.info(f"lift of HR@{config.k} over global popularity: {lifts}")
    return Built(metadata)
