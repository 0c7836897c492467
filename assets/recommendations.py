"""Top-K product recommendations for every customer, with a confidence and a predicted value.

The ranking is EASE (a closed-form item-item model) blended with recent popularity
(recsys/recommender.py): on the Online Retail time split it beats global popularity where text
embeddings alone lose to it (see the README's evaluation table). Customers are scored in chunks
streamed from DuckDB, so the customer base never sits in memory; a chunk that fails goes to the
dead-letter queue with its customers and the rest goes on.
"""

import datetime as dt
import time
from collections.abc import Callable, Iterator

import dagster as dg
import duckdb
import pyarrow as pa
from pydantic import Field

from assets.partitions import daily_partitions
from assets.state import as_of_day, decide_from_upstream, read_state, skipped_result, write_state
from recsys.purchases import iter_customer_chunks
from recsys.recommender import Recommender, RecommenderConfig, ordered_parallel_map
from resources.model_clients.errors import PROCESSING_ERROR
from resources.model_clients.store import DeadLetter, write_dead_letters
from resources.warehouse import DuckDBWarehouse, arrow_batches, fetch_all, fetch_scalar

STAGE = "recommendations"
RECOMMENDATIONS_TABLE = "ml.recommendations"
SKIPPED_TABLE = "ml.recommendation_skips"
UPSTREAM = ("stg_purchases", "dim_products")
# analytics.stg_purchases is stored sorted by customer (sql/stg_purchases.sql) and DuckDB keeps
# insertion order on plain scans, so no pass sorts 20M rows again; recsys raises if the stream
# ever interleaves customers.
PURCHASES_SQL = "SELECT customer_id, product_id, amount, purchased_at FROM analytics.stg_purchases"
CONFIDENCE_BINS = 10


class RecommendationsConfig(dg.Config):
    top_k: int = Field(default=10, description="Products recommended per customer.")
    max_items: int = Field(default=8_192, description="Products in the item-item model (memory: 3 x 4 x n^2 bytes).")
    score_chunk_customers: int = Field(default=2_048, description="Customers scored at once.")
    fit_chunk_customers: int = Field(default=20_000, description="Customers per chunk while fitting.")
    read_batch_rows: int = Field(default=100_000, description="Purchase rows per Arrow batch read from DuckDB.")
    workers: int = Field(default=2, description="Scoring threads.")
    progress_every_seconds: float = Field(default=10.0, description="How often progress (%, ETA) is logged.")
    min_served_share: float = Field(default=0.5, description="The check warns when fewer customers get a recommendation.")
    force: bool = False

    def recommender(self) -> RecommenderConfig:
        return RecommenderConfig(
            top_k=self.top_k, max_items=self.max_items, score_chunk_customers=self.score_chunk_customers,
            fit_chunk_customers=self.fit_chunk_customers, workers=self.workers,
        )


def purchases_source(con: duckdb.DuckDBPyConnection, batch_rows: int) -> Callable[[], Iterator[pa.RecordBatch]]:
    """A re-readable purchase stream (the fit reads it several times), each pass on its own cursor."""
    return lambda: arrow_batches(con, PURCHASES_SQL, batch_rows)


class Progress:
    """Logs percent done and an ETA at most every `every` seconds."""

    def __init__(self, log, total: int, every: float):
        self.log, self.total, self.every = log, max(total, 1), every
        self.started = self.last = time.perf_counter()
        self.done = 0

    def advance(self, customers: int) -> None:
        self.done += customers
        now = time.perf_counter()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            self.log.info(f"recommendations: {self.done:,}/{self.total:,} customers "
                          f"({self.done / self.total:.0%}), {rate:,.0f}/s, ETA {eta:,.0f}s")


def building(table: str) -> str:
    return f"{table}_building"


def create_building_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Chunks land in side tables committed as they go: 20M uncommitted rows in one transaction
    cost gigabytes of memory (measured: 4 GB RSS at 2M customers). The swap is one transaction."""
    con.execute("CREATE SCHEMA IF NOT EXISTS ml")
    con.execute(
        f"""CREATE OR REPLACE TABLE {building(RECOMMENDATIONS_TABLE)} (customer_id VARCHAR, rank SMALLINT,
            product_id VARCHAR, score DOUBLE, confidence DOUBLE, predicted_value DOUBLE, strategy VARCHAR, as_of DATE)"""
    )
    con.execute(f"CREATE OR REPLACE TABLE {building(SKIPPED_TABLE)} (customer_id VARCHAR, reason VARCHAR)")


def swap_in_building_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Replace the current tables with the finished side tables (inside the caller's transaction)."""
    for table in (RECOMMENDATIONS_TABLE, SKIPPED_TABLE):
        con.execute(f"DROP TABLE IF EXISTS {table}")
        con.execute(f"ALTER TABLE {building(table)} RENAME TO {table.split('.')[1]}")


def score_safely(model: Recommender, candidates):
    """Score a chunk; an exception is returned (not raised) so the chunk can be dead-lettered."""

    def score(chunk):
        try:
            return chunk, model.score_chunk(chunk, candidates), None
        except Exception as error:  # one bad chunk must not stop the other customers
            return chunk, None, error

    return score


def dead_letter_chunk(warehouse_writes: list, chunk, error: Exception) -> None:
    message = f"{type(error).__name__}: {error}"[:500]
    warehouse_writes.extend(DeadLetter(customer, PROCESSING_ERROR, message, 1, "") for customer in chunk.customer_ids.to_pylist())


def write_chunk(con: duckdb.DuckDBPyConnection, result, as_of: dt.date) -> None:
    con.register("chunk_recommendations", result.recommendations)
    con.execute(f"INSERT INTO {building(RECOMMENDATIONS_TABLE)} SELECT *, ?::DATE FROM chunk_recommendations", [as_of])
    con.register("chunk_skips", result.skipped)
    con.execute(f"INSERT INTO {building(SKIPPED_TABLE)} SELECT * FROM chunk_skips")
    con.unregister("chunk_recommendations")
    con.unregister("chunk_skips")


def confidence_summary(con: duckdb.DuckDBPyConnection) -> dict:
    """Distribution of confidence (for the drift sensors) and of predicted value."""
    mean, p10, p50, p90, value_mean = fetch_all(
        con,
        f"""SELECT avg(confidence), quantile_cont(confidence, 0.1), quantile_cont(confidence, 0.5),
                   quantile_cont(confidence, 0.9), avg(predicted_value) FROM {RECOMMENDATIONS_TABLE}""",
    )[0]
    bins = dict(fetch_all(
        con,
        f"SELECT least(floor(confidence * {CONFIDENCE_BINS}), {CONFIDENCE_BINS - 1})::INT, count(*) "
        f"FROM {RECOMMENDATIONS_TABLE} WHERE confidence BETWEEN 0 AND 1 GROUP BY 1",
    ))
    return {
        "confidence_mean": round(mean or 0.0, 5),
        "confidence_p10": round(p10 or 0.0, 5),
        "confidence_p50": round(p50 or 0.0, 5),
        "confidence_p90": round(p90 or 0.0, 5),
        "confidence_histogram": dg.MetadataValue.json([bins.get(i, 0) for i in range(CONFIDENCE_BINS)]),
        "predicted_value_mean": round(value_mean or 0.0, 4),
    }


@dg.asset(
    deps=list(UPSTREAM),
    partitions_def=daily_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    group_name="ai",
    pool="duckdb",
    kinds={"duckdb", "python"},
    check_specs=[dg.AssetCheckSpec("customers_served", asset="recommendations")],
)
def recommendations(
    context: dg.AssetExecutionContext, config: RecommendationsConfig, warehouse: DuckDBWarehouse
) -> dg.MaterializeResult:
    """Top-K in-stock products per customer that they have not bought, with confidence and predicted value."""
    as_of = as_of_day(context)
    started = time.perf_counter()
    dead_letters: list[DeadLetter] = []
    with warehouse.connect() as con:
        decision = decide_from_upstream(con, STAGE, as_of, UPSTREAM, config.model_dump(exclude={"force"}), config.force)
        if not decision.build:
            kept = read_state(con, STAGE)["metadata"]
            check = served_check(config, kept.get("counts", {}), kept.get("skip_reasons", {}))
            return skipped_result(context, decision, [check], as_of=str(as_of), dlq_count=0, **(kept.get("distribution") or {}))
        source = purchases_source(con, config.read_batch_rows)
        catalog = con.sql("SELECT product_id, in_stock, price FROM analytics.dim_products").to_arrow_table()
        # Purchases on the partition day count as history: the model sees everything before the next day.
        model = Recommender.fit(source, config.recommender(), as_of=dt.datetime.combine(as_of + dt.timedelta(days=1), dt.time()))
        candidates = model.candidates(catalog)
        context.log.info(f"fitted on {model.report.customers:,} customers, {model.report.model_items:,} model items; "
                         f"{candidates.in_stock_model_items:,} in-stock candidates")
        create_building_tables(con)
        counts = {"customers": 0, "collaborative": 0, "popularity": 0, "without_valid_purchases": 0, "skipped": 0,
                  "recommendations": 0, "invalid_rows": 0}
        progress = Progress(context.log, model.report.customers, config.progress_every_seconds)
        chunks = iter_customer_chunks(source, config.score_chunk_customers)
        for chunk, result, error in ordered_parallel_map(score_safely(model, candidates), chunks, config.workers):
            if error is not None:
                context.log.error(f"a chunk of {chunk.n_customers:,} customers failed ({error!r}); dead-lettered")
                dead_letter_chunk(dead_letters, chunk, error)
            else:
                write_chunk(con, result, as_of)
                for key, value in result.counts().items():
                    counts[key] += value
            progress.advance(chunk.n_customers)
        con.execute("BEGIN TRANSACTION")
        swap_in_building_tables(con)
        distribution = confidence_summary(con)
        stored = fetch_scalar(con, f"SELECT count(*) FROM {RECOMMENDATIONS_TABLE}")
        plain_distribution = {k: (v.value if isinstance(v, dg.JsonMetadataValue) else v) for k, v in distribution.items()}
        skip_reasons = dict(fetch_all(con, f"SELECT reason, count(*) FROM {SKIPPED_TABLE} GROUP BY reason"))
        write_state(con, STAGE, as_of, decision.fingerprint, stored,
                    {"distribution": plain_distribution, "counts": counts, "skip_reasons": skip_reasons})
        con.execute("COMMIT")
    write_dead_letters(warehouse, STAGE, context.partition_key, "ease", dead_letters)
    metadata = recommendations_metadata(context, as_of, model, candidates, counts, distribution, stored, dead_letters,
                                        skip_reasons, time.perf_counter() - started)
    return dg.MaterializeResult(metadata=metadata, check_results=[served_check(config, counts, skip_reasons)])


def served_check(config: RecommendationsConfig, counts: dict, skip_reasons: dict) -> dg.AssetCheckResult:
    """A catalog with nothing in stock, or a model with no items, serves nobody: say so loudly."""
    customers = counts.get("customers", 0)
    served = customers - counts.get("skipped", 0)
    share = served / customers if customers else 0.0
    return dg.AssetCheckResult(
        check_name="customers_served",
        passed=share >= config.min_served_share,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"customers": customers, "served": served, "share": round(share, 4), "skip_reasons": skip_reasons},
        description=f"{share:.0%} of customers got recommendations"
        + (f"; not served because: {', '.join(skip_reasons)}" if skip_reasons else ""),
    )


def recommendations_metadata(context, as_of, model, candidates, counts, distribution, stored, dead_letters, skip_reasons, seconds):
    dlq_customers = len(dead_letters)
    context.log.info(f"{stored:,} recommendations for {counts['customers']:,} customers "
                     f"({counts['popularity']:,} by popularity, {counts['skipped']:,} skipped, {dlq_customers:,} in the DLQ)")
    return {
        "dagster/row_count": stored,
        "customers": counts["customers"],
        "customers_collaborative": counts["collaborative"],
        "customers_popularity_fallback": counts["popularity"],
        "customers_without_valid_purchases": counts["without_valid_purchases"],
        "customers_skipped": counts["skipped"],
        "skip_reasons": dg.MetadataValue.json(skip_reasons),
        "dlq_count": dlq_customers,
        **distribution,
        "model_items": model.report.model_items,
        "in_stock_candidates": candidates.in_stock_model_items,
        "catalog_products_not_in_model": candidates.catalog_products_not_in_model,
        "fit": dg.MetadataValue.json(model.report.to_dict()),
        "as_of": str(as_of),
        "seconds": round(seconds, 3),
        "customers_per_second": round(counts["customers"] / max(seconds, 1e-9), 1),
        "skipped": False,
    }


defs = dg.Definitions(assets=[recommendations])
