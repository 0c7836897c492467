"""Top-K product recommendations for every customer, with a confidence and a predicted value.

Each build picks its model on a validation window before as-of (recsys/selection.py: EASE
blends, item-kNN and the popularity baselines; the best hit rate is deployed, with the table as
metadata), then fits it on everything before the next day (recsys/recommender.py). Customers are
scored in chunks read from a Parquet snapshot of the purchases, so the customer base never sits
in memory and no warehouse lock is held meanwhile; a chunk that fails goes to the dead-letter
queue with its customers and the rest goes on.
"""

import ctypes
import datetime as dt
import gc
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import dagster as dg
import duckdb
import pyarrow as pa
from pydantic import Field

from assets.common.current_state import Built, DeadLetterConfig, StateBuild, current_state_asset, knob
from assets.common.sources import CurrencyError, purchases_currency
from assets.infer.embeddings import PRODUCT_VECTORS_SQL
from assets.infer.purchases import PURCHASES_SQL
from recsys.customer_vectors import ProductEmbeddings
from recsys.purchases import iter_customer_chunks
from recsys.selection import Selection, select_model
from recsys.recommender import (
    RECOMMENDATION_SCHEMA,
    SKIPPED_SCHEMA,
    TEXT_NEIGHBOUR,
    Recommender,
    RecommenderConfig,
    ordered_parallel_map,
)
from resources import dead_letters
from resources.dead_letters import PROCESSING_ERROR, DeadLetter
from resources.warehouse import Snapshot, fetch_all, fetch_scalar, snapshot

STAGE = "recommendations"
RECOMMENDATIONS_TABLE = "ml.recommendations"
SKIPPED_TABLE = "ml.recommendation_skips"
INPUTS = ("stg_purchases", "dim_products", "product_embeddings")


class RecommendationsConfig(DeadLetterConfig):
    top_k: int = Field(default=10, description="Products recommended per customer.")
    max_items: int = Field(default=8_192, description="Products in the item-item model (memory: 3 x 4 x n^2 bytes).")
    score_chunk_customers: int = knob(2_048, "Customers scored at once.")
    fit_chunk_customers: int = knob(20_000, "Customers per chunk while fitting.")
    read_batch_rows: int = knob(100_000, "Purchase rows per Arrow batch read from DuckDB.")
    workers: int = knob(2, "Scoring threads.")
    progress_every_seconds: float = knob(10.0, "How often progress (%, ETA) is logged.")
    min_served_share: float = knob(0.5, "The check warns when fewer customers get a recommendation.")
    reset_confidence_bins: bool = knob(False, "Take this build's deciles as the new reference bins of the confidence histogram.")
    select_model: bool = Field(
        default=True, description="Deploy the best of EASE, item-kNN and the popularity baselines on a validation "
                                  "window before as-of (recsys/selection.py); false: always EASE.")
    selection_window_days: int = Field(default=60, ge=1, description="Validation window of the model selection.")
    selection_customers: int = knob(50_000, "Customers (a stable sample) the selection fits and judges on.")
    text_neighbour_min_similarity: float | None = Field(
        default=RecommenderConfig.text_neighbour_min_similarity, ge=0.0, le=1.0,
        description="Cold start: an in-stock product outside the collaborative model is recommended through its "
                    "nearest model item by text when at least this alike (cosine), if model selection deploys it "
                    "(it must win the validation window) or selection is off; null: never.")

    def recommender(self) -> RecommenderConfig:
        return RecommenderConfig(
            top_k=self.top_k, max_items=self.max_items, score_chunk_customers=self.score_chunk_customers,
            fit_chunk_customers=self.fit_chunk_customers, workers=self.workers,
            text_neighbour_min_similarity=self.text_neighbour_min_similarity,
        )


CATALOG_SQL = "SELECT product_id, in_stock, price FROM analytics.dim_products"


def purchases_source(taken: Snapshot, batch_rows: int) -> Callable[[], Iterator[pa.RecordBatch]]:
    """A re-readable purchase stream (the fit reads it several times) from the step's snapshot."""
    return lambda: taken.batches("purchases", batch_rows)


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


class StagedOutputs:
    """Scored chunks go to Parquet files while no lock is held; `publish` loads them in one go."""

    def __init__(self, taken: Snapshot, as_of: dt.date, currency: str):
        self.taken, self.as_of, self.currency = taken, as_of, currency
        # predicted_value is money: its currency is stored with it
        schema = RECOMMENDATION_SCHEMA.append(pa.field("as_of", pa.date32())).append(pa.field("currency", pa.string()))
        self.recommendations = taken.writer("staged_recommendations", schema)
        self.skips = taken.writer("staged_skips", SKIPPED_SCHEMA)

    def add(self, result) -> None:
        batch = result.recommendations
        as_of = pa.array([self.as_of] * batch.num_rows, type=pa.date32())
        currency = pa.array([self.currency] * batch.num_rows, type=pa.string())
        self.recommendations.write_batch(pa.RecordBatch.from_arrays([*batch.columns, as_of, currency],
                                                                    schema=self.recommendations.schema))
        self.skips.write_batch(result.skipped)

    def close(self) -> None:
        self.recommendations.close()
        self.skips.close()

    def publish(self, con: duckdb.DuckDBPyConnection) -> None:
        """Load the files into side tables, committed on their own (20M uncommitted rows in the
        publishing transaction cost gigabytes: 4 GB RSS measured at 2M customers); the caller's
        transaction then swaps them in."""
        con.execute("CREATE SCHEMA IF NOT EXISTS ml")
        for table, name in ((RECOMMENDATIONS_TABLE, "staged_recommendations"), (SKIPPED_TABLE, "staged_skips")):
            con.execute(f"CREATE OR REPLACE TABLE {building(table)} AS SELECT * FROM read_parquet(?)",
                        [str(self.taken.path(name))])


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


def confidence_summary(con: duckdb.DuckDBPyConnection, edges: list[float] | None) -> dict:
    """Distribution of confidence (for the drift sensors) and of predicted value.

    The histogram's bins are the deciles of a reference build (the first, or the last one whose
    edges were reset), kept with the state and reused: bins that fit the data (confidences lie
    within a few hundredths, so fixed 0-1 bins put everything in the first) and the same bins
    from build to build, so PSI compares like with like."""
    mean, p10, p50, p90, value_mean = fetch_all(
        con,
        f"""SELECT avg(confidence), quantile_cont(confidence, 0.1), quantile_cont(confidence, 0.5),
                   quantile_cont(confidence, 0.9), avg(predicted_value) FROM {RECOMMENDATIONS_TABLE}""",
    )[0]
    if not edges:
        deciles = fetch_all(con, f"SELECT quantile_cont(confidence, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]) "
                                 f"FROM {RECOMMENDATIONS_TABLE}")[0][0]
        edges = sorted({round(float(e), 8) for e in deciles or []})
    counts = dict(fetch_all(
        con,
        f"SELECT list_position($edges, list_filter($edges, lambda e: e <= confidence)[-1]), count(*) "
        f"FROM {RECOMMENDATIONS_TABLE} WHERE confidence IS NOT NULL GROUP BY 1", {"edges": edges}))
    histogram = [int(counts.get(None, 0))] + [int(counts.get(i, 0)) for i in range(1, len(edges) + 1)]
    return {
        "confidence_mean": round(mean or 0.0, 5),
        "confidence_p10": round(p10 or 0.0, 5),
        "confidence_p50": round(p50 or 0.0, 5),
        "confidence_p90": round(p90 or 0.0, 5),
        "confidence_histogram": dg.MetadataValue.json(histogram),
        "confidence_edges": dg.MetadataValue.json(edges),
        "predicted_value_mean": round(value_mean or 0.0, 4),
    }


def served_verdicts(measured: Mapping[str, Any], config: RecommendationsConfig) -> list[dg.AssetCheckResult]:
    """A catalog with nothing in stock, or a model with no items, serves nobody: say so loudly."""
    counts, skip_reasons = measured.get("counts", {}), measured.get("skip_reasons", {})
    customers = counts.get("customers", 0)
    served = customers - counts.get("skipped", 0)
    share = served / customers if customers else 0.0
    return [dg.AssetCheckResult(
        check_name="customers_served",
        passed=share >= config.min_served_share,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"customers": customers, "served": served, "share": round(share, 4), "skip_reasons": skip_reasons,
                  "min_served_share": config.min_served_share},
        description=f"{share:.0%} of customers got recommendations"
        + (f"; not served because: {', '.join(skip_reasons)}" if skip_reasons else ""),
    )]


@current_state_asset(
    name=STAGE,
    inputs=INPUTS,
    tables=[RECOMMENDATIONS_TABLE, SKIPPED_TABLE],
    group="infer",
    config_class=RecommendationsConfig,
    checks=[dg.AssetCheckSpec("customers_served", asset=STAGE,
                              description="At least min_served_share of the customers get recommendations.")],
    verdicts=served_verdicts,
    dead_letter_stage=STAGE,
    personal_data=True,  # customer ids
    fingerprint_extra=lambda context: {"currency": configured_currency()},  # a new currency rebuilds
    code_version="model-selection-1",  # selection and grouped calibration change what the same inputs give
)
def recommendations(build: StateBuild) -> Built:
    """Top-K in-stock products per customer that they have not bought, with confidence and predicted value."""
    config, as_of = build.config, build.as_of
    currency = configured_currency()
    dead_letters_: list[DeadLetter] = []
    # No lock is held while fitting and scoring: the inputs are a snapshot, the outputs are staged.
    with snapshot(build.warehouse, {"purchases": PURCHASES_SQL, "catalog": CATALOG_SQL},
                  optional={"vectors": PRODUCT_VECTORS_SQL}) as taken:
        source = purchases_source(taken, config.read_batch_rows)
        catalog = taken.table("catalog")
        vectors = (ProductEmbeddings.from_arrow(taken.table("vectors"), vector_column="vector")
                   if taken.has("vectors") else None)
        # Purchases on the partition day count as history: the model sees everything before the next day.
        model_as_of = dt.datetime.combine(as_of + dt.timedelta(days=1), dt.time())
        selection = (select_model(source, model_as_of, config.recommender(), config.selection_window_days,
                                  config.selection_customers, product_vectors=vectors) if config.select_model else None)
        if selection is not None:
            build.log.info(f"model selection: {selection.chosen} ({selection.reason}); "
                           f"{selection.evaluated_customers:,} validation customers, {selection.seconds:.1f}s")
        model = Recommender.fit(source, selection.config if selection else config.recommender(), as_of=model_as_of)
        candidates = model.candidates(catalog, vectors)
        build.log.info(f"fitted on {model.report.customers:,} customers, {model.report.model_items:,} model items; "
                       f"{candidates.in_stock_model_items:,} in-stock candidates, "
                       f"{candidates.cold_start_products:,} more through their text")
        counts = {"customers": 0, "collaborative": 0, "popularity": 0, "without_valid_purchases": 0, "skipped": 0,
                  "recommendations": 0, "invalid_rows": 0, "text_neighbour_recommendations": 0}
        progress = Progress(build.log, model.report.customers, config.progress_every_seconds)
        staged = StagedOutputs(taken, as_of, currency)
        chunks = iter_customer_chunks(source, config.score_chunk_customers)
        for chunk, result, error in ordered_parallel_map(score_safely(model, candidates), chunks, config.workers):
            if error is not None:
                build.log.error(f"a chunk of {chunk.n_customers:,} customers failed ({error!r}); dead-lettered")
                dead_letter_chunk(dead_letters_, chunk, error)
            else:
                staged.add(result)
                for key, value in result.counts().items():
                    counts[key] += value
            progress.advance(chunk.n_customers)
        staged.close()
        # The item-item weights and scoring buffers go before DuckDB loads the outputs (up to its
        # memory_limit): at 2M customers the step's peak was their sum.
        report, deployed = model.report, model.config.model
        del model, chunks, vectors
        release_memory()
        with build.warehouse.connect() as con:
            staged.publish(con)
            con.execute("BEGIN TRANSACTION")
            swap_in_building_tables(con)
            reference = (build.decision.stored.measurements.get("distribution", {}) if build.decision.stored else {})
            distribution = confidence_summary(con, None if config.reset_confidence_bins else reference.get("confidence_edges"))
            stored = fetch_scalar(con, f"SELECT count(*) FROM {RECOMMENDATIONS_TABLE}")
            skip_reasons = dict(fetch_all(con, f"SELECT reason, count(*) FROM {SKIPPED_TABLE} GROUP BY reason"))
            counts["text_neighbour_products"] = fetch_scalar(
                con, f"SELECT count(DISTINCT product_id) FROM {RECOMMENDATIONS_TABLE} WHERE strategy = ?", [TEXT_NEIGHBOUR])
            # Customers scored this time leave the queue, whatever partition dead-lettered them.
            dead_letters.resolve(con, STAGE, f"SELECT DISTINCT customer_id FROM {RECOMMENDATIONS_TABLE}"
                                             f" UNION SELECT customer_id FROM {SKIPPED_TABLE}")
            dead_letters.supersede(con, STAGE, "SELECT DISTINCT customer_id FROM analytics.stg_purchases")
            dead_letters.write(con, STAGE, build.partition_key, deployed, dead_letters_)
            plain_distribution = {k: (v.value if isinstance(v, dg.JsonMetadataValue) else v) for k, v in distribution.items()}
            build.record(con, stored, {"distribution": plain_distribution, "counts": counts, "skip_reasons": skip_reasons,
                                       "items": report.customers, "deployed_model": deployed,
                                       "currency": currency})
            con.execute("COMMIT")
    return Built({**recommendations_metadata(build, report, candidates, counts, distribution, stored, dead_letters_,
                                             skip_reasons), **selection_metadata(selection), "currency": currency})


def release_memory() -> None:
    """Give freed memory back to the system: Python's cycles, Arrow's pool, glibc's arenas."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def configured_currency() -> str:
    """The currency of predicted_value; sources in two currencies fail the step, naming them."""
    try:
        return purchases_currency()
    except CurrencyError as error:
        raise dg.Failure(description=str(error), allow_retries=False) from None


def selection_metadata(selection: Selection | None) -> dict:
    if selection is None:
        return {"deployed_model": "ease (selection off)"}
    return {
        "deployed_model": selection.chosen,
        "model_selection": dg.MetadataValue.md(
            f"Validation window {selection.window[0]} .. {selection.window[1]} (exclusive), "
            f"{selection.evaluated_customers:,} customers judged of {selection.customers_sampled:,} sampled; "
            f"chosen: **{selection.chosen}** ({selection.reason}).\n\n{selection.to_markdown()}"),
        "model_selection_table": dg.MetadataValue.json(selection.table),
        "model_selection_seconds": selection.seconds,
    }


def recommendations_metadata(build, report, candidates, counts, distribution, stored, letters, skip_reasons) -> dict:
    dlq_customers = len(letters)
    build.log.info(f"{stored:,} recommendations for {counts['customers']:,} customers "
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
        "model_items": report.model_items,
        "in_stock_candidates": candidates.in_stock_model_items,
        "catalog_products_not_in_model": candidates.catalog_products_not_in_model,
        "cold_start_products_in_reach": candidates.cold_start_products,
        "cold_start_products_recommended": counts["text_neighbour_products"],
        "cold_start_recommendations": counts["text_neighbour_recommendations"],
        "fit": dg.MetadataValue.json(report.to_dict()),
    }
