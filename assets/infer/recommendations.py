"""Top-K product recommendations for every customer, with a confidence and a predicted value.

A build either **refits** (picks its model on a validation window before as-of with
recsys/selection.py: EASE blends, item-kNN and the popularity baselines, the best hit rate
deployed with the table as metadata; then fits it on everything before the next day) or keeps the
model it fitted last (saved beside the warehouse, `models/`). It refits when the model is
`refit_every_days` old, when the code, its semantic config or the currency changed, when the
purchases since the fit fall outside the model's items more than `max_coverage_drop` beyond
what it was fitted on (drift), or when asked; `build_mode_reason` records which.

Between refits a day is **incremental**: only customers whose recommendations may differ from a
rescoring of everyone with the same model are scored (new customers, changed purchases, open
dead letters, a recommended product that stopped being a candidate, a product that would rank
for them becoming one (tracked per customer in `ml.recommendation_hidden`), a recency group
crossed: those keep their ranking, only their confidence and predicted value are computed
again); their rows are replaced, the others stay, and `ml.recommendation_changes` tells the
output rules whom to recheck. tests/test_incremental_days.py compares the tables with a full
rescore.

Customers are scored in chunks read from a Parquet snapshot of the purchases, so the customer
base never sits in memory and no warehouse lock is held meanwhile; a chunk that fails goes to
the dead-letter queue with its customers and the rest goes on.
"""

import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import numpy as np
import pyarrow as pa
from pydantic import Field

from assets.common.current_state import (
    Built,
    DeadLetterConfig,
    StateBuild,
    current_state_asset,
    fingerprint_of,
    knob,
    semantic_config,
)
from assets.common.sources import CurrencyError, purchases_currency
from assets.infer.embeddings import PRODUCT_VECTORS_SQL
from assets.infer.purchases import (CUSTOMER_STATE_SQL, PURCHASE_STATE_FORMAT, all_purchases_sql,
                                    changed_customers_sql, customers_to_redo, outdated_state_reason,
                                    purchases_of)
from recsys.customer_vectors import ProductEmbeddings
from recsys.purchases import iter_customer_chunks
from recsys.selection import Selection, select_model
from recsys.recommender import (
    HIDDEN_SCHEMA,
    FitReport,
    KeptChunk,
    KeptTopK,
    RECOMMENDATION_SCHEMA,
    SCORED_SCHEMA,
    SKIPPED_SCHEMA,
    TEXT_NEIGHBOUR,
    Recommender,
    RecommenderConfig,
    score_chunk_safely,
)
from resources import dead_letters
from resources.dead_letters import PROCESSING_ERROR, DeadLetter
from resources.memory import release_memory
from resources.warehouse import Snapshot, exact_quantiles, fetch_all, fetch_scalar, snapshot, table_exists

STAGE = "recommendations"
RECOMMENDATIONS_TABLE = "ml.recommendations"
SKIPPED_TABLE = "ml.recommendation_skips"
# What the next day needs to rescore only what changed: per customer the fingerprint of their
# purchases, their last purchase and how they were ranked; the blocked products that would enter
# each customer's top-k as candidates; and the customers the last build rewrote (for the outputs).
CUSTOMERS_TABLE = "ml.recommendation_customers"
HIDDEN_TABLE = "ml.recommendation_hidden"
CHANGES_TABLE = "ml.recommendation_changes"
INPUTS = ("stg_purchases", "dim_products", "product_embeddings")
CODE_VERSION = "calibration-knots-1"  # selection, grouped calibration (kept as knots), kept models, incremental days

# How a build gets its model and whom it scores.
REFIT = "refit"  # select and fit a model, score every customer
RESCORE_ALL = "rescore_all"  # the kept model, every customer
INCREMENTAL = "incremental"  # the kept model, only the customers whose recommendations may have changed


class RecommendationsConfig(DeadLetterConfig):
    top_k: int = Field(default=10, description="Products recommended per customer.")
    max_items: int = Field(default=8_192, description="Products in the item-item model (memory: 3 x 4 x n^2 bytes).")
    score_chunk_customers: int = knob(RecommenderConfig.score_chunk_customers, "Customers scored at once (memory: 2 workers x this x 4 bytes x model items; 1,024 at M = 8,192: 64 MiB, 9 s slower at 2M than 2,048).")
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
    refit_every_days: int = knob(
        7, "Refit (select and fit) the model when it is this many days old; between refits each day scores only "
           "the customers whose recommendations may have changed, with the kept model.", ge=1)
    max_coverage_drop: float = knob(
        0.05, "Refit early when the share of purchases since the fit that the model knows (its items) is this much "
              "below the share it was fitted on (the catalog drifted away from it).", ge=0.0, le=1.0)
    drift_min_pairs: int = knob(1_000, "Fewer customer-product pairs bought since the fit say nothing about drift.", ge=1)
    refit: bool = knob(False, "Refit the model in this build, whatever its age.")
    rescore_all: bool = knob(False, "Score every customer with the kept model, not only those whose "
                                    "recommendations may have changed (what an incremental day must equal).")
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
# The last reason: such a customer keeps their ranking, only confidence and predicted value change (KeptTopK).
RECENCY_GROUP_CHANGED = "recency group changed"

# Whose top-k may differ from the stored one under the same model, and why (the first reason
# in this order is kept). Everyone else's rows would come out the same: same history, same
# model, and no change among the candidates that could enter or had entered their top-k.
RESCORE_SQL = customers_to_redo("rescore", f"""
candidates AS (
    SELECT DISTINCT product_id FROM analytics.dim_products WHERE coalesce(in_stock, false)
),
reasons AS (
    {changed_customers_sql(CUSTOMERS_TABLE)}
    UNION ALL
    SELECT customer_id, 3, 'open dead letter' FROM open_dead_letters
    UNION ALL
    SELECT customer_id, 4, 'not scored last time'
    FROM {CUSTOMERS_TABLE} WHERE collaborative IS NULL
    UNION ALL
    SELECT DISTINCT r.customer_id, 5, 'a recommended product is no longer a candidate'
    FROM {RECOMMENDATIONS_TABLE} AS r ANTI JOIN candidates AS c USING (product_id)
    UNION ALL
    SELECT DISTINCT h.customer_id, 6, 'a product that would rank became a candidate'
    FROM {HIDDEN_TABLE} AS h SEMI JOIN candidates AS c USING (product_id)
    UNION ALL
    -- confidence is calibrated by recency group: crossing an edge changes it (and nothing else)
    SELECT customer_id, 7, '{RECENCY_GROUP_CHANGED}'
    FROM {CUSTOMERS_TABLE}
    WHERE last_purchase_at IS NOT NULL AND len(list_filter($recency_edges::DOUBLE[], lambda e:
          e > epoch_us($previous_as_of::TIMESTAMP - last_purchase_at) / 86400e6
          AND e <= epoch_us($scoring_as_of::TIMESTAMP - last_purchase_at) / 86400e6)) > 0
)""")


@dataclass(frozen=True)
class Plan:
    mode: str  # REFIT, RESCORE_ALL or INCREMENTAL
    reason: str
    stored: dict | None  # the kept model's record (measurements["model"] of the last build)
    base_version: int | None  # INCREMENTAL: the build whose tables this one updates


def plan_build(build: StateBuild, model_fingerprint: str) -> Plan:
    """Refit on a cadence (or when asked, or when what the model depends on changed); otherwise
    keep the model, and score only what changed when the last build left what that needs."""
    config, stored = build.config, build.decision.stored
    kept = (stored.measurements.get("model") if stored else None) or None
    refit_reason = None
    if config.refit:
        refit_reason = "asked by run config (refit)"
    elif kept is None or not kept.get("file"):
        refit_reason = "no kept model (first build)"
    elif kept.get("fingerprint") != model_fingerprint:
        refit_reason = "the code, the model config or the currency changed"
    elif build.as_of < dt.date.fromisoformat(kept["fitted_on_day"]):
        refit_reason = "the kept model was fitted on later days"
    elif (age := (build.as_of - dt.date.fromisoformat(kept["fitted_on_day"])).days) >= config.refit_every_days:
        refit_reason = f"the model is {age} days old (refit every {config.refit_every_days})"
    elif not (models_dir(build) / kept["file"]).exists():
        refit_reason = f"the kept model file {kept['file']} is missing"
    if refit_reason:
        return Plan(REFIT, refit_reason, None, None)
    if config.rescore_all:
        return Plan(RESCORE_ALL, "asked by run config (rescore_all)", kept, None)
    if config.force:
        return Plan(REFIT, "forced by run config", None, None)
    if outdated := outdated_state_reason(kept):
        return Plan(RESCORE_ALL, outdated, kept, None)
    if not kept.get("incremental_ready"):
        return Plan(RESCORE_ALL, "the kept model recommends through product texts, or the last build had no "
                                 "candidates: what an incremental day needs was not tracked", kept, None)
    if stored.as_of > build.as_of:
        return Plan(RESCORE_ALL, "the tables hold a later day", kept, None)
    return Plan(INCREMENTAL, f"model fitted on {kept['fitted_on_day']}, "
                             f"refit every {config.refit_every_days} days", kept, stored.version)


def models_dir(build: StateBuild) -> Path:
    """Kept models live beside the warehouse file."""
    return build.warehouse.file.parent / "models"


def remove_other_models(build: StateBuild, keep: str) -> None:
    """After the commit: the recorded model stays, older (or abandoned) ones go."""
    for path in models_dir(build).glob("recommendations-*.pkl"):
        if path.name != keep:
            path.unlink(missing_ok=True)


def coverage_drift(build: StateBuild, kept: dict, model: Recommender) -> str | None:
    """A refit reason when purchases since the fit lie outside the model's items far more often
    than the purchases it was fitted on did (new products the model cannot rank are selling)."""
    with build.warehouse.connect(read_only=True) as con:
        pairs, covered = coverage_since_fit(con, model.scorer.items.product_ids, model.report.as_of)
    return drift_reason(pairs, covered, float(kept.get("coverage") or 0.0), build.config)


def coverage_since_fit(con, model_items: pa.Array, fitted_as_of: str) -> tuple[int, int]:
    """Customer-product pairs bought since the fit, and how many of them are model items."""
    con.register("model_items", pa.table({"product_id": model_items}))
    return tuple(fetch_all(con, """
        SELECT count(*), count(*) FILTER (WHERE product_id IN (SELECT product_id FROM model_items))
        FROM (SELECT DISTINCT customer_id, product_id FROM analytics.stg_purchases
              WHERE purchased_at >= $fitted::TIMESTAMP AND length(product_id) > 0 AND amount > 0)""",
        {"fitted": fitted_as_of})[0])


def drift_reason(pairs: int, covered: int, fitted_coverage: float, config: RecommendationsConfig) -> str | None:
    if pairs < config.drift_min_pairs:
        return None
    recent = covered / pairs
    if fitted_coverage - recent > config.max_coverage_drop:
        return (f"coverage drift: the model knows {recent:.1%} of the {pairs:,} customer-product pairs bought "
                f"since its fit, against {fitted_coverage:.1%} of those it was fitted on")
    return None


def recency_edges(model: Recommender) -> list[float]:
    """Every recency threshold the confidence calibration groups customers by."""
    edges = {float(e) for c in model.calibrators.values() if c is not None for e in c.groups.recency_edges}
    return sorted(e for e in edges if np.isfinite(e))


def take_snapshot(build: StateBuild, plan: Plan, edges: list[float] | None, scoring_as_of: dt.datetime):
    """Every customer's purchases, or (incremental) the rescored customers' only, with the
    catalog, the product vectors and the customers' current state, under one connection.
    `edges`: the kept model's recency edges (incremental), see `check_kept_model`."""
    queries = {"catalog": CATALOG_SQL, "customer_state": "SELECT * FROM now_state"}
    register: dict[str, pa.Table] = {}
    prepare: list = [f"CREATE TEMP TABLE now_state AS {CUSTOMER_STATE_SQL}"]
    if plan.mode == INCREMENTAL:
        stored = build.decision.stored
        previous_as_of = dt.datetime.combine(stored.as_of + dt.timedelta(days=1), dt.time())
        prepare.append((RESCORE_SQL, {"recency_edges": edges, "previous_as_of": previous_as_of,
                                      "scoring_as_of": scoring_as_of}))
        register["open_dead_letters"] = open_dead_letter_customers(build)
        recalibrate = f"(SELECT customer_id FROM rescore WHERE reason = '{RECENCY_GROUP_CHANGED}')"
        prepare += [f"CREATE TEMP TABLE rank_again AS SELECT customer_id FROM rescore ANTI JOIN {recalibrate} USING (customer_id)",
                    f"CREATE TEMP TABLE recalibrate AS {recalibrate}"]
        queries |= {"purchases": purchases_of("rank_again"), "rescore": "SELECT * FROM rescore",
                    # the state rows that change: the rescored customers' and the customers gone
                    "customer_state": "SELECT * FROM now_state SEMI JOIN rescore USING (customer_id)",
                    "gone": f"SELECT customer_id FROM {CUSTOMERS_TABLE} ANTI JOIN now_state USING (customer_id)",
                    # the customers who only crossed a recency group: their purchases and what they keep
                    "recalibrate_purchases": purchases_of("recalibrate"),
                    "kept_recommendations": f"SELECT customer_id, rank, product_id, score FROM {RECOMMENDATIONS_TABLE} "
                                            "SEMI JOIN recalibrate USING (customer_id)",
                    "kept_hidden": f"SELECT customer_id, product_id FROM {HIDDEN_TABLE} SEMI JOIN recalibrate USING (customer_id)",
                    "kept_customers": f"SELECT customer_id, collaborative FROM {CUSTOMERS_TABLE} "
                                      "SEMI JOIN recalibrate USING (customer_id)"}
    else:
        queries["purchases"] = all_purchases_sql(build.warehouse)
    return snapshot(build.warehouse, queries, optional={"vectors": PRODUCT_VECTORS_SQL}, prepare=prepare,
                    register=register)


def open_dead_letter_customers(build: StateBuild) -> pa.Table:
    """Customers this stage dead-lettered and has not scored since: they are scored again."""
    with build.warehouse.connect(read_only=True) as con:
        keys = (fetch_all(con, f"SELECT DISTINCT item_key FROM {dead_letters.TABLE} WHERE stage = ? AND resolved_at IS NULL",
                          [STAGE]) if table_exists(con, dead_letters.TABLE) else [])
    return pa.table({"customer_id": pa.array([key for (key,) in keys], type=pa.string())})


def purchases_source(taken: Snapshot, batch_rows: int, name: str = "purchases") -> Callable[[], Iterator[pa.RecordBatch]]:
    """A re-readable purchase stream (the fit reads it several times) from the step's snapshot."""
    return lambda: taken.batches(name, batch_rows)


def kept_chunks(taken: Snapshot, model: Recommender, config: RecommendationsConfig) -> Iterator[KeptChunk]:
    """An incremental day's customers who only crossed a recency group, chunk by chunk, with the
    ranking they keep: their purchases still give their recency, orders and spend index. The
    stored rows are indexed now, before any scoring buffer exists (peak memory)."""
    kept = KeptTopK(model, taken.table("kept_recommendations"), taken.table("kept_hidden"), taken.table("kept_customers"))
    chunks = iter_customer_chunks(purchases_source(taken, config.read_batch_rows, "recalibrate_purchases"),
                                  config.score_chunk_customers)
    return (KeptChunk(chunk, kept.ranking(chunk)) for chunk in chunks)


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
        self.files = {
            RECOMMENDATIONS_TABLE: taken.writer("staged_recommendations", schema),
            SKIPPED_TABLE: taken.writer("staged_skips", SKIPPED_SCHEMA),
            "scored": taken.writer("staged_scored", SCORED_SCHEMA),
            HIDDEN_TABLE: taken.writer("staged_hidden", HIDDEN_SCHEMA),
        }
        self.customers_scored = 0

    def add(self, result) -> None:
        batch = result.recommendations
        as_of = pa.array([self.as_of] * batch.num_rows, type=pa.date32())
        currency = pa.array([self.currency] * batch.num_rows, type=pa.string())
        recommendations = self.files[RECOMMENDATIONS_TABLE]
        recommendations.write_batch(pa.RecordBatch.from_arrays([*batch.columns, as_of, currency],
                                                               schema=recommendations.schema))
        self.files[SKIPPED_TABLE].write_batch(result.skipped)
        self.files["scored"].write_batch(result.scored)
        if result.hidden is not None:
            self.files[HIDDEN_TABLE].write_batch(result.hidden)
        self.customers_scored += result.customers

    def close(self) -> None:
        for writer in self.files.values():
            writer.close()

    def path(self, name: str) -> str:
        return str(self.taken.path(name))

    def publish(self, con: duckdb.DuckDBPyConnection, incremental: bool) -> None:
        """Load the files into side tables, committed on their own (20M uncommitted rows in the
        publishing transaction cost gigabytes: 4 GB RSS measured at 2M customers); the caller's
        transaction then swaps them in (or, incremental, merges them)."""
        con.execute("CREATE SCHEMA IF NOT EXISTS ml")
        for table, name in ((RECOMMENDATIONS_TABLE, "staged_recommendations"), (SKIPPED_TABLE, "staged_skips"),
                            (HIDDEN_TABLE, "staged_hidden")):
            con.execute(f"CREATE OR REPLACE TABLE {building(table)} AS SELECT * FROM read_parquet(?)",
                        [self.path(name)])
        # the customers this build rewrote: rescored, and gone (no purchases left)
        changed = ("SELECT customer_id FROM read_parquet($rescore) UNION SELECT customer_id FROM read_parquet($gone)"
                   if incremental else "SELECT NULL::VARCHAR AS customer_id WHERE false")
        con.execute(f"CREATE OR REPLACE TABLE {building(CHANGES_TABLE)} AS {changed}",
                    {"rescore": self.path("rescore"), "gone": self.path("gone")} if incremental else {})
        # every customer's state now, and how they were ranked. Incremental: a customer not rewritten
        # has the same purchases (else rescored), so the same state row and ranking as last time.
        kept = (f"""SELECT * FROM {CUSTOMERS_TABLE}
                    WHERE customer_id NOT IN (SELECT customer_id FROM {building(CHANGES_TABLE)}) UNION ALL"""
                if incremental else "")
        con.execute(
            f"""CREATE OR REPLACE TABLE {building(CUSTOMERS_TABLE)} AS
                SELECT * FROM ({kept}
                               SELECT s.*, scored.collaborative FROM read_parquet($state) AS s
                               LEFT JOIN read_parquet($scored) AS scored ON scored.customer_id = s.customer_id)
                ORDER BY customer_id""",
            {"state": self.path("customer_state"), "scored": self.path("staged_scored")})


REWRITTEN_TABLES = (RECOMMENDATIONS_TABLE, SKIPPED_TABLE, HIDDEN_TABLE)  # rows per customer, merged on incremental days
STATE_TABLES = (CUSTOMERS_TABLE, CHANGES_TABLE)  # replaced by every build


def swap_in_building_tables(con: duckdb.DuckDBPyConnection, tables=(*REWRITTEN_TABLES, *STATE_TABLES)) -> None:
    """Replace the current tables with the finished side tables (inside the caller's transaction)."""
    for table in tables:
        con.execute(f"DROP TABLE IF EXISTS {table}")
        con.execute(f"ALTER TABLE {building(table)} RENAME TO {table.split('.')[1]}")


def merge_changes(con: duckdb.DuckDBPyConnection) -> None:
    """Incremental day: the changed customers' rows are replaced by this build's, the rest stay
    (inside the caller's transaction)."""
    for table in REWRITTEN_TABLES:
        con.execute(f"DELETE FROM {table} WHERE customer_id IN (SELECT customer_id FROM {building(CHANGES_TABLE)})")
        con.execute(f"INSERT INTO {table} SELECT * FROM {building(table)}")
        con.execute(f"DROP TABLE {building(table)}")
    swap_in_building_tables(con, STATE_TABLES)


def next_relation(table: str, incremental: bool) -> str:
    """A table as this build is about to publish it, readable before the publishing transaction
    (measuring 20M rows inside it, next to 3M uncommitted ones, ran out of DuckDB's 1 GB)."""
    if not incremental:
        return building(table)
    return (f"(SELECT * FROM {table} WHERE customer_id NOT IN (SELECT customer_id FROM {building(CHANGES_TABLE)}) "
            f"UNION ALL SELECT * FROM {building(table)})")


def table_counts(con: duckdb.DuckDBPyConnection, recommendations: str = RECOMMENDATIONS_TABLE,
                 skips: str = SKIPPED_TABLE, customers: str = CUSTOMERS_TABLE) -> dict[str, int]:
    """The stage's counts, from its tables (an incremental day rescored only some customers)."""
    everyone, scored, collaborative, popularity, without_valid, invalid = fetch_all(
        con, f"""SELECT count(*), count(*) FILTER (WHERE collaborative IS NOT NULL), count(*) FILTER (WHERE collaborative),
                        count(*) FILTER (WHERE NOT collaborative),
                        count(*) FILTER (WHERE collaborative IS NOT NULL AND last_purchase_at IS NULL),
                        coalesce(sum(invalid_rows) FILTER (WHERE collaborative IS NOT NULL), 0)
                 FROM {customers}""")[0]
    stored, text_neighbour, text_products = fetch_all(
        con, f"""SELECT count(*), count(*) FILTER (WHERE strategy = $s), count(DISTINCT product_id) FILTER (WHERE strategy = $s)
                 FROM {recommendations}""", {"s": TEXT_NEIGHBOUR})[0]
    return {"customers_in_input": everyone, "customers": scored, "collaborative": collaborative, "popularity": popularity,
            "without_valid_purchases": without_valid, "skipped": fetch_scalar(con, f"SELECT count(*) FROM {skips}"),
            "recommendations": stored, "invalid_rows": int(invalid),
            "text_neighbour_recommendations": text_neighbour, "text_neighbour_products": text_products}


def dead_letter_chunk(warehouse_writes: list, chunk, error: Exception) -> None:
    message = f"{type(error).__name__}: {error}"[:500]
    warehouse_writes.extend(DeadLetter(customer, PROCESSING_ERROR, message, 1, "") for customer in chunk.customer_ids.to_pylist())


DECILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def confidence_summary(con: duckdb.DuckDBPyConnection, edges: list[float] | None,
                       source: str = RECOMMENDATIONS_TABLE) -> dict:
    """Distribution of confidence (for the drift sensors) and of predicted value.

    The histogram's bins are the deciles of a reference build (the first, or the last one whose
    edges were reset), kept with the state and reused: bins that fit the data (confidences lie
    within a few hundredths, so fixed 0-1 bins put everything in the first) and the same bins
    from build to build, so PSI compares like with like.

    One pass over the recommendations counts them by confidence (a calibrated confidence takes a
    few thousand values); every figure comes from those counts. Four passes over an incremental
    day's 22M merged rows took 1.98 s at 2M customers, this one 0.37 s."""
    con.execute(f"""CREATE OR REPLACE TEMP TABLE confidence_counts AS
                    SELECT confidence, count(*) AS n, sum(predicted_value) AS value_sum, count(predicted_value) AS value_count
                    FROM {source} GROUP BY confidence""")
    mean, value_mean = fetch_all(con, """SELECT sum(confidence * n) / sum(n) FILTER (WHERE confidence IS NOT NULL),
                                             sum(value_sum) / sum(value_count) FROM confidence_counts""")[0]
    deciles = exact_quantiles(con, "confidence_counts", "confidence", DECILES, weight="n")
    p10, p50, p90 = deciles[0], deciles[4], deciles[8]
    if not edges:
        edges = sorted({round(float(e), 8) for e in deciles if e is not None})
    counts = dict(fetch_all(
        con,
        "SELECT list_position($edges, list_filter($edges, lambda e: e <= confidence)[-1]), sum(n) "
        "FROM confidence_counts WHERE confidence IS NOT NULL GROUP BY 1", {"edges": edges}))
    con.execute("DROP TABLE confidence_counts")
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
    tables=[RECOMMENDATIONS_TABLE, SKIPPED_TABLE, CUSTOMERS_TABLE, HIDDEN_TABLE, CHANGES_TABLE],
    group="infer",
    config_class=RecommendationsConfig,
    checks=[dg.AssetCheckSpec("customers_served", asset=STAGE,
                              description="At least min_served_share of the customers get recommendations.")],
    verdicts=served_verdicts,
    dead_letter_stage=STAGE,
    personal_data=True,  # customer ids
    resources=("warehouse", "compute_engine"),
    pool=None,  # reads a snapshot and publishes in short connections; fits and scores holding none
    fingerprint_extra=lambda context, as_of: {"currency": configured_currency()},  # a new currency rebuilds
    code_version=CODE_VERSION,
)
def recommendations(build: StateBuild) -> Built:
    """Top-K in-stock products per customer that they have not bought, with confidence and predicted value."""
    currency = configured_currency()
    model_fingerprint = fingerprint_of(CODE_VERSION, semantic_config(build.config), currency)
    plan = plan_build(build, model_fingerprint)
    # Purchases on the partition day count as history: the model sees everything before the next day.
    scoring_as_of = dt.datetime.combine(build.as_of + dt.timedelta(days=1), dt.time())
    started = time.perf_counter()
    plan, edges = check_kept_model(build, plan, scoring_as_of)
    checked = time.perf_counter()
    # No lock is held while fitting and scoring: the inputs are a snapshot, the outputs are staged.
    with take_snapshot(build, plan, edges, scoring_as_of) as taken:
        snapshot_seconds = time.perf_counter() - checked
        # score_and_publish holds the only reference, and drops it before publishing
        handed_over = [kept_model(build, plan, scoring_as_of)]
        build.log.info(f"inputs in {time.perf_counter() - started:.1f}s: kept model checked for drift "
                       f"{checked - started:.1f}s, snapshot {snapshot_seconds:.1f}s, kept model loaded "
                       f"{time.perf_counter() - checked - snapshot_seconds:.1f}s")
        return score_and_publish(build, plan, model_fingerprint, currency, scoring_as_of, handed_over, taken)


def kept_model(build: StateBuild, plan: Plan, scoring_as_of: dt.datetime) -> Recommender | None:
    if plan.mode == REFIT:
        return None
    return Recommender.load(models_dir(build) / plan.stored["file"]).scoring_as_of(scoring_as_of)


def check_kept_model(build: StateBuild, plan: Plan, scoring_as_of: dt.datetime) -> tuple[Plan, list[float] | None]:
    """The plan after the kept model's drift check, and the recency edges its calibration groups
    customers by. The model is let go before the snapshot (and loaded again to score): DuckDB
    gets the memory the step budget leaves, and with the model's 256 MiB of weights held the
    snapshot of a 2M-customer day 2 ran at its 256 MiB floor (rescore reasons 1.1-1.9 s, 0.7 s
    with the room)."""
    model = kept_model(build, plan, scoring_as_of)
    if model is None:
        return plan, None
    if not build.config.rescore_all and (drift := coverage_drift(build, plan.stored, model)) is not None:
        return Plan(REFIT, drift, None, None), None
    edges = recency_edges(model)
    del model
    release_memory()
    return plan, edges


@dataclass
class Scored:
    """What scoring leaves for publishing: the staged outputs and what the metadata needs of the
    model, which is gone by then."""

    staged: StagedOutputs
    dead_letters: list[DeadLetter]
    ranking_kept: int  # customers whose kept ranking was only recalibrated (incremental days)
    incremental_ready: bool  # the hidden products were tracked for every chunk
    report: FitReport
    deployed: str
    selection: Selection | None
    model_file: str
    candidates: dict[str, int]


def score_and_publish(build: StateBuild, plan: Plan, model_fingerprint: str, currency: str,
                      scoring_as_of: dt.datetime, handed_over: list[Recommender | None], taken: Snapshot) -> Built:
    scored = score_customers(build, plan, model_fingerprint, currency, scoring_as_of, handed_over, taken)
    # The item-item weights and scoring buffers went with score_customers' frame; they are given
    # back before DuckDB loads the outputs (up to its memory_limit): at 2M customers the step's
    # peak was their sum.
    release_memory()
    return publish(build, plan, model_fingerprint, currency, scored)


def score_customers(build: StateBuild, plan: Plan, model_fingerprint: str, currency: str,
                    scoring_as_of: dt.datetime, handed_over: list[Recommender | None], taken: Snapshot) -> Scored:
    """The kept model (handed over: this frame holds the only reference) or a newly selected and
    fitted one scores the snapshot's customers chunk by chunk into staged outputs."""
    config, as_of = build.config, build.as_of
    model = handed_over.pop()
    source = purchases_source(taken, config.read_batch_rows)
    vectors = (ProductEmbeddings.from_arrow(taken.table("vectors"), vector_column="vector")
               if taken.has("vectors") else None)
    selection = None
    model_file = plan.stored["file"] if plan.stored and plan.mode != REFIT else None
    if model is None:
        selection, model = select_and_fit(build, source, vectors, taken, scoring_as_of)
        model_file = f"recommendations-{as_of}-{model_fingerprint[:12]}-{uuid.uuid4().hex[:8]}.pkl"
        model.save(models_dir(build) / model_file)
    build.log.info(f"{plan.mode} ({plan.reason}); model fitted as of {model.report.as_of}: "
                   f"{model.report.model_items:,} model items")
    candidates = model.candidates(taken.table("catalog"), vectors)
    build.log.info(f"{candidates.in_stock_model_items:,} in-stock candidates, "
                   f"{candidates.cold_start_products:,} more through their text")
    # Incremental days need to know which blocked products would rank. A model that recommends
    # cold products through their text is not continued incrementally: which cold products are in
    # reach follows the catalog and is not tracked per customer.
    cold_start = model.config.text_neighbour_min_similarity is not None
    track_hidden = not cold_start and candidates.in_stock_model_items > 0
    to_score = taken.table("rescore").num_rows if plan.mode == INCREMENTAL else model.report.customers
    progress = Progress(build.log, to_score, config.progress_every_seconds)
    staged = StagedOutputs(taken, as_of, currency)
    dead_letters_: list[DeadLetter] = []
    chunks = iter_customer_chunks(source, config.score_chunk_customers)
    if plan.mode == INCREMENTAL:  # then those who keep their ranking and are recalibrated only
        chunks = chain(chunks, kept_chunks(taken, model, config))
        release_memory()  # the index's temporaries, before the scoring buffers
    engine = build.resources.compute_engine  # threads here, or the workers of a Ray cluster
    ranking_kept = 0
    for chunk, (result, error) in engine.ordered_map(score_chunk_safely, chunks, threads=config.workers,
                                                     shared=(model, candidates, track_hidden)):
        ranking_kept += chunk.n_customers if isinstance(chunk, KeptChunk) else 0
        if error is not None:
            build.log.error(f"a chunk of {chunk.n_customers:,} customers failed ({error!r}); dead-lettered")
            dead_letter_chunk(dead_letters_, chunk, error)
        else:
            staged.add(result)
            track_hidden = track_hidden and result.hidden is not None
        progress.advance(chunk.n_customers)
    staged.close()
    return Scored(staged=staged, dead_letters=dead_letters_, ranking_kept=ranking_kept, incremental_ready=track_hidden,
                  report=model.report, deployed=model.config.model, selection=selection, model_file=model_file,
                  candidates={"in_stock_candidates": candidates.in_stock_model_items,
                              "catalog_products_not_in_model": candidates.catalog_products_not_in_model,
                              "cold_start_products_in_reach": candidates.cold_start_products})


def select_and_fit(build: StateBuild, source, vectors: ProductEmbeddings | None, taken: Snapshot,
                   scoring_as_of: dt.datetime) -> tuple[Selection | None, Recommender]:
    """Model selection on the validation window (when on), then the chosen model fitted."""
    config = build.config
    # customer_state holds a row per customer of the purchases (a refit's snapshot is never incremental)
    selection = (select_model(source, scoring_as_of, config.recommender(), config.selection_window_days,
                              config.selection_customers, product_vectors=vectors,
                              customers=taken.rows("customer_state")) if config.select_model else None)
    if selection is not None:
        build.log.info(f"model selection: {selection.chosen} ({selection.reason}); "
                       f"{selection.evaluated_customers:,} validation customers, {selection.seconds:.1f}s")
    release_memory()  # the selection's sample and candidates are gone: start the fit from the floor
    model = Recommender.fit(source, selection.config if selection else config.recommender(), as_of=scoring_as_of)
    release_memory()  # and the fit's passes, before the scoring buffers
    return selection, model


def publish(build: StateBuild, plan: Plan, model_fingerprint: str, currency: str, scored: Scored) -> Built:
    """Swap in (or merge) the staged outputs, settle the stage's dead letters and record the
    build, in one warehouse transaction."""
    config, staged = build.config, scored.staged
    fitted_on_day = str(build.as_of) if plan.mode == REFIT else plan.stored["fitted_on_day"]
    model_info = {"file": scored.model_file, "fingerprint": model_fingerprint, "fitted_on_day": fitted_on_day,
                  "deployed": scored.deployed, "coverage": scored.report.purchase_pairs_covered_by_model,
                  "incremental_ready": scored.incremental_ready, "purchase_state": PURCHASE_STATE_FORMAT}
    incremental, publishing = plan.mode == INCREMENTAL, time.perf_counter()
    with build.warehouse.connect() as con:
        staged.publish(con, incremental=incremental)
        recommended, skipped = (next_relation(t, incremental) for t in (RECOMMENDATIONS_TABLE, SKIPPED_TABLE))
        reference = (build.decision.stored.measurements.get("distribution", {}) if build.decision.stored else {})
        distribution = confidence_summary(con, None if config.reset_confidence_bins else reference.get("confidence_edges"),
                                          recommended)
        skip_reasons = dict(fetch_all(con, f"SELECT reason, count(*) FROM {skipped} GROUP BY reason"))
        counts = table_counts(con, recommended, skipped, building(CUSTOMERS_TABLE))
        stored, items = counts["recommendations"], counts.pop("customers_in_input")  # items: the DLQ share's denominator
        con.execute("BEGIN TRANSACTION")
        if incremental:
            merge_changes(con)
        else:
            swap_in_building_tables(con)
        # Customers scored this time leave the queue, whatever partition dead-lettered them.
        dead_letters.resolve(con, STAGE, f"SELECT customer_id FROM {CUSTOMERS_TABLE} WHERE collaborative IS NOT NULL")
        dead_letters.supersede(con, STAGE, f"SELECT customer_id FROM {CUSTOMERS_TABLE}")
        dead_letters.write(con, STAGE, build.partition_key, scored.deployed, scored.dead_letters)
        rescored = {"mode": plan.mode, "reason": plan.reason, "customers_scored": staged.customers_scored,
                    "customers_with_kept_ranking": scored.ranking_kept,
                    "base_version": plan.base_version, "by_reason": rescore_reasons(staged.taken) if incremental else {}}
        plain_distribution = {k: (v.value if isinstance(v, dg.JsonMetadataValue) else v) for k, v in distribution.items()}
        build.record(con, stored, {"distribution": plain_distribution, "counts": counts, "skip_reasons": skip_reasons,
                                   "items": items, "deployed_model": scored.deployed,
                                   "currency": currency, "model": model_info, "build": rescored})
        con.execute("COMMIT")
    build.log.info(f"published in {time.perf_counter() - publishing:.1f}s")
    remove_other_models(build, scored.model_file)
    metadata = recommendations_metadata(build, scored.report, counts, distribution, stored, scored.dead_letters,
                                        skip_reasons)
    return Built({**metadata, **selection_metadata(scored.selection, model_info), **build_metadata(rescored, model_info),
                  **build.resources.compute_engine.describe(), **scored.candidates, "currency": currency})


def rescore_reasons(taken: Snapshot) -> dict[str, int]:
    rescore = taken.table("rescore")
    counted = rescore.group_by("reason").aggregate([("customer_id", "count")])
    return dict(zip(counted["reason"].to_pylist(), counted["customer_id_count"].to_pylist()))


def configured_currency() -> str:
    """The currency of predicted_value; sources in two currencies fail the step, naming them."""
    try:
        return purchases_currency()
    except CurrencyError as error:
        raise dg.Failure(description=str(error), allow_retries=False) from None


def selection_metadata(selection: Selection | None, model_info: dict) -> dict:
    if selection is None:  # a kept model: it was selected when it was fitted
        return {"deployed_model": model_info["deployed"]}
    return {
        "deployed_model": selection.chosen,
        "model_selection": dg.MetadataValue.md(
            f"Validation window {selection.window[0]} .. {selection.window[1]} (exclusive), "
            f"{selection.evaluated_customers:,} customers judged of {selection.customers_sampled:,} sampled; "
            f"chosen: **{selection.chosen}** ({selection.reason}).\n\n{selection.to_markdown()}"),
        "model_selection_table": dg.MetadataValue.json(selection.table),
        "model_selection_seconds": selection.seconds,
        "model_selection_weights": selection.weights,  # item-item weights fitted, and re-used by candidates
    }


def build_metadata(rescored: dict, model_info: dict) -> dict:
    """How this build got its model and whom it scored: the refit decision is recorded."""
    return {
        "build_mode": rescored["mode"],
        "build_mode_reason": rescored["reason"],
        "model_fitted_on_day": model_info["fitted_on_day"],
        "customers_scored": rescored["customers_scored"],
        # of them, recalibrated on the ranking they kept (they only crossed a recency group)
        "customers_with_kept_ranking": rescored["customers_with_kept_ranking"],
        "rescored_by_reason": dg.MetadataValue.json(rescored["by_reason"]),
    }


def recommendations_metadata(build, report, counts, distribution, stored, letters, skip_reasons) -> dict:
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
        "cold_start_products_recommended": counts["text_neighbour_products"],
        "cold_start_recommendations": counts["text_neighbour_recommendations"],
        "fit": dg.MetadataValue.json(report.to_dict()),
    }
