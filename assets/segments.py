"""Customer embeddings (pooled) and customer segments with stable ids and profiles.

A customer's vector is the spend- and recency-weighted mean of the vectors of the products they
bought (recsys/customer_vectors.py). Pooling 2M customers takes about 16 s, so the vectors are
recomputed when needed rather than stored (3 GB at 2M customers); set `store_customer_vectors`
to keep them in `ml.customer_embeddings`.

Segments: k-means on those vectors, fit on a deterministic sample, everyone assigned chunk by
chunk; ids stay stable from one build to the next (recsys/segments.py). Names come from the
chat model when one is configured, otherwise from the profile (deterministic).
"""

import datetime as dt
import json
import time
from collections.abc import Iterator

import dagster as dg
import duckdb
import numpy as np
import pyarrow as pa
from pydantic import Field

from assets.partitions import daily_partitions
from assets.state import as_of_day, decide_from_upstream, read_state, skipped_result, write_state
from assets.recommendations import PURCHASES_SQL
from recsys.customer_vectors import PoolingReport, ProductEmbeddings, iter_customer_vectors
from recsys.segments import (
    CustomerSample,
    SegmentingConfig,
    SegmentModel,
    SegmentProfiler,
    drop_empty_segments,
    fit_segments,
    naming_messages,
    parse_segment_names,
)
from resources.model_clients import ChatModel
from resources.model_clients.store import DeadLetter, write_dead_letters
from resources.warehouse import DuckDBWarehouse, arrow_batches, fetch_all, table_exists

STAGE = "customer_segments"
ASSIGNMENTS_TABLE = "ml.customer_segments"
CENTROIDS_TABLE = "ml.segment_centroids"
PROFILES_TABLE = "ml.segment_profiles"
VECTORS_TABLE = "ml.customer_embeddings"
UPSTREAM = ("stg_purchases", "product_embeddings")


class SegmentsConfig(dg.Config):
    half_life_days: float = Field(default=90.0, description="Recency half-life of a purchase's weight.")
    chunk_lines: int = Field(default=200_000, description="Purchase lines pooled at once (memory knob).")
    read_batch_rows: int = Field(default=100_000, description="Rows per Arrow batch read from DuckDB.")
    sample_size: int = Field(default=20_000, description="Customers the clustering is fit on.")
    k_min: int = Field(default=4, description="Fewest segments tried (silhouette picks k).")
    k_max: int = Field(default=12, description="Most segments tried.")
    seed: int = 0
    store_customer_vectors: bool = Field(default=False, description="Also write ml.customer_embeddings (384 floats each).")
    force: bool = False


def purchase_batches(con: duckdb.DuckDBPyConnection, batch_rows: int) -> Iterator[pa.RecordBatch]:
    return arrow_batches(con, PURCHASES_SQL, batch_rows)


def arrow_table(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    return con.sql(sql).to_arrow_table()


def load_products(con: duckdb.DuckDBPyConnection) -> tuple[ProductEmbeddings, dict[str, str], dict[str, str]]:
    """Product vectors, and each product's category and name (for profiles and naming)."""
    vectors = arrow_table(con, "SELECT product_id, vector FROM ml.product_embeddings ORDER BY product_id")
    products = ProductEmbeddings.from_arrow(vectors, vector_column="vector")
    described = fetch_all(con, "SELECT product_id, category, name FROM analytics.dim_products")
    return products, {p: c for p, c, _ in described}, {p: n for p, _, n in described if n}


def previous_model(con: duckdb.DuckDBPyConnection) -> SegmentModel | None:
    if not table_exists(con, CENTROIDS_TABLE):
        return None
    table = arrow_table(con, f"SELECT segment_id, centroid FROM {CENTROIDS_TABLE}")
    return SegmentModel.from_arrow(table) if table.num_rows else None


def fit(con, products, as_of, config: SegmentsConfig, previous) -> tuple:
    """Pass 1: pool every customer, keep the deterministic sample, fit the clustering on it."""
    sample = CustomerSample(config.sample_size, config.seed)
    for chunk in iter_customer_vectors(purchase_batches(con, config.read_batch_rows), products, as_of=as_of,
                                       half_life_days=config.half_life_days, chunk_lines=config.chunk_lines):
        sample.add(chunk.customer_ids, chunk.vectors)
    if len(sample) < config.k_min:
        raise dg.Failure(f"only {len(sample)} customers have embeddable purchases; at least {config.k_min} are needed to segment")
    segmenting = SegmentingConfig(k_min=config.k_min, k_max=min(config.k_max, len(sample) - 1), seed=config.seed)
    return fit_segments(sample.vectors, previous, segmenting), len(sample)


def assign(con, products, as_of, config: SegmentsConfig, model: SegmentModel) -> tuple[SegmentProfiler, PoolingReport]:
    """Pass 2: pool again, label every customer, accumulate profiles, write the assignments."""
    report = PoolingReport()
    profiler = SegmentProfiler(model.segment_ids, products.product_ids)
    con.execute(f"CREATE OR REPLACE TABLE {ASSIGNMENTS_TABLE} (customer_id VARCHAR, segment_id BIGINT, similarity FLOAT)")
    if config.store_customer_vectors:
        con.execute(f"CREATE OR REPLACE TABLE {VECTORS_TABLE} (customer_id VARCHAR, vector FLOAT[{products.dimensions}])")
    centroids = model.centroids / np.linalg.norm(model.centroids, axis=1, keepdims=True)
    for chunk in iter_customer_vectors(purchase_batches(con, config.read_batch_rows), products, as_of=as_of,
                                       half_life_days=config.half_life_days, chunk_lines=config.chunk_lines, report=report):
        labels = model.assign(chunk.vectors)
        profiler.add(labels, chunk)
        rows = np.searchsorted(model.segment_ids, labels)
        similarity = np.einsum("ij,ij->i", chunk.vectors, centroids[rows]).astype(np.float32)
        con.register("chunk", pa.table({"customer_id": chunk.customer_ids, "segment_id": labels, "similarity": similarity}))
        con.execute(f"INSERT INTO {ASSIGNMENTS_TABLE} SELECT * FROM chunk")
        if config.store_customer_vectors:
            flat = pa.FixedSizeListArray.from_arrays(pa.array(chunk.vectors.ravel()), products.dimensions)
            con.register("chunk", pa.table({"customer_id": chunk.customer_ids, "vector": flat}))
            con.execute(f"INSERT INTO {VECTORS_TABLE} SELECT * FROM chunk")
        con.unregister("chunk")
    return profiler, report


def write_model_and_profiles(con, model: SegmentModel, profiles, as_of: dt.date) -> None:
    con.register("centroids", model.to_arrow())
    con.execute(f"CREATE OR REPLACE TABLE {CENTROIDS_TABLE} AS SELECT * FROM centroids")
    con.unregister("centroids")
    rows = [
        (p.segment_id, p.name, p.size, p.share, p.recency_days_mean, p.recency_days_median, p.frequency_mean,
         p.frequency_median, p.monetary_mean, p.monetary_median, json.dumps(p.top_products),
         json.dumps(p.top_categories), as_of, "profile")
        for p in profiles
    ]
    con.execute(
        f"""CREATE OR REPLACE TABLE {PROFILES_TABLE} (segment_id BIGINT, name VARCHAR, size BIGINT, share DOUBLE,
            recency_days_mean DOUBLE, recency_days_median DOUBLE, frequency_mean DOUBLE, frequency_median DOUBLE,
            monetary_mean DOUBLE, monetary_median DOUBLE, top_products JSON, top_categories JSON, as_of DATE,
            named_by VARCHAR)"""
    )
    if rows:
        con.executemany(f"INSERT INTO {PROFILES_TABLE} VALUES ({', '.join(['?'] * 14)})", rows)


def name_with_chat(context, chat_model: ChatModel, warehouse: DuckDBWarehouse, profiles, product_names) -> str:
    """Ask the chat model for names (no warehouse connection is open here); fall back on anything odd."""
    if chat_model.provider == "none" or not profiles:
        return "profile (no chat model configured)"
    ids = [p.segment_id for p in profiles]
    try:
        with chat_model.open(context) as chat:
            names = parse_segment_names(chat.complete_json(naming_messages(profiles, product_names)), ids)
        error = "the answer was not one short, distinct name per segment id"
    except Exception as exc:  # a failing chat model must not fail the segments
        names, error = None, f"{type(exc).__name__}: {exc}"[:500]
    partition = context.partition_key
    if names is None:
        write_dead_letters(warehouse, "segment_names", partition, f"chat:{chat_model.model}",
                           [DeadLetter("segment_names", "invalid_output", error, 1, "")])
        return "profile (chat answer rejected, dead-lettered)"
    with warehouse.transaction() as con:
        con.executemany(f"UPDATE {PROFILES_TABLE} SET name = ?, named_by = 'chat' WHERE segment_id = ?",
                        [(name, segment_id) for segment_id, name in names.items()])
    return "chat"


@dg.asset(
    deps=list(UPSTREAM),
    partitions_def=daily_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    group_name="ai",
    pool="duckdb",
    kinds={"duckdb", "python"},
)
def customer_segments(
    context: dg.AssetExecutionContext, config: SegmentsConfig, warehouse: DuckDBWarehouse, chat_model: ChatModel
) -> dg.MaterializeResult:
    """Every customer with embeddable purchases in one segment; segment profiles and names."""
    as_of = as_of_day(context)
    started = time.perf_counter()
    with warehouse.transaction() as con:
        decision = decide_from_upstream(con, STAGE, as_of, UPSTREAM, config.model_dump(exclude={"force"}), config.force)
        if not decision.build:
            return skipped_result(context, decision, as_of=str(as_of), segment_sizes=dg.MetadataValue.json(
                (read_state(con, STAGE)["metadata"] or {}).get("segment_sizes", {})))
        con.execute("CREATE SCHEMA IF NOT EXISTS ml")
        products, category_of, product_names = load_products(con)
        previous = previous_model(con)
        segment_fit, sampled = fit(con, products, as_of, config, previous)
        profiler, report = assign(con, products, as_of, config, segment_fit.model)
        model, dropped = drop_empty_segments(segment_fit.model, profiler.sizes)
        profiles = profiler.profiles(category_of)
        write_model_and_profiles(con, model, profiles, as_of)
        sizes = {str(p.segment_id): p.size for p in profiles}
        write_state(con, STAGE, as_of, decision.fingerprint, sum(sizes.values()), {"segment_sizes": sizes})
    named_by = name_with_chat(context, chat_model, warehouse, profiles, product_names)
    return segments_result(context, as_of, segment_fit, report, profiles, sizes, dropped, sampled, named_by,
                           time.perf_counter() - started)


def segments_result(context, as_of, segment_fit, report, profiles, sizes, dropped, sampled, named_by, seconds):
    assigned = sum(sizes.values())
    pooling = report.as_dict()
    context.log.info(f"{assigned:,} customers in {len(sizes)} segments ({segment_fit.k_reason}); "
                     f"skipped: {pooling['customers_skipped']}")
    table = "\n".join(
        ["| id | name | size | share | recency (median d) | frequency (median) | monetary (median) |", "|---|---|---|---|---|---|---|"]
        + [f"| {p.segment_id} | {p.name} | {p.size:,} | {p.share:.1%} | {p.recency_days_median:.0f} | "
           f"{p.frequency_median:.0f} | {p.monetary_median:,.2f} |" for p in profiles]
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": assigned,
            "segments": len(sizes),
            "segment_sizes": dg.MetadataValue.json(sizes),
            "segment_profiles": dg.MetadataValue.md(table),
            "clustering": dg.MetadataValue.json(segment_fit.summary()),
            "dropped_empty_segments": dropped,
            "customers_sampled": sampled,
            "customers_skipped": dg.MetadataValue.json(pooling["customers_skipped"]),
            "pooling": dg.MetadataValue.json(pooling),
            "named_by": named_by,
            "as_of": str(as_of),
            "seconds": round(seconds, 3),
            "skipped": False,
        }
    )


defs = dg.Definitions(assets=[customer_segments])
