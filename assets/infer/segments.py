"""Customer segments with stable ids, their profiles and names.

A customer's vector is the spend- and recency-weighted mean of the vectors of the products they
bought (recsys/customer_vectors.py). Pooling 2M customers takes about 16 s, so the vectors are
recomputed when needed rather than stored (3 GB at 2M customers); set `store_customer_vectors`
to keep them in `ml.customer_embeddings`.

Segments: k-means on those vectors, fit on a deterministic sample, everyone assigned chunk by
chunk; ids stay stable from one build to the next (recsys/clustering.py, recsys/segment_ids.py).
Profiles take their RFM from `analytics.customer_features` (the one definition of RFM). Names
come from the chat model when one is configured, otherwise from the profile (deterministic).
"""

import datetime as dt
import hashlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

import dagster as dg
import duckdb
import numpy as np
import pyarrow as pa
from pydantic import Field

from assets.common.catalog import NETWORK_RETRY_POLICY
from assets.common.current_state import Built, DeadLetterConfig, StateBuild, current_state_asset, knob
from assets.infer.embeddings import PRODUCT_VECTORS_SQL
from assets.infer.purchases import PURCHASES_SQL
from recsys.clustering import SegmentingConfig, fit_segments
from recsys.customer_sample import CustomerSample
from recsys.customer_vectors import PoolingReport, ProductEmbeddings, iter_customer_vectors
from recsys.segment_ids import SegmentModel, drop_empty_segments
from recsys.product_topics import infer_topics
from recsys.segment_names import UNCATEGORIZED, naming_messages, parse_segment_names
from recsys.segment_profiles import RfmSummary, SegmentProfile, SegmentProfiler
from resources import dead_letters
from resources.dead_letters import DeadLetter
from resources.model_clients.errors import ModelCallError, ModelConfigurationError
from resources.warehouse import Snapshot, fetch_all, snapshot

STAGE = "customer_segments"
NAMING_STAGE = "segment_names"
ASSIGNMENTS_TABLE = "ml.customer_segments"
CENTROIDS_TABLE = "ml.segment_centroids"
PROFILES_TABLE = "ml.segment_profiles"
VECTORS_TABLE = "ml.customer_embeddings"
INPUTS = ("stg_purchases", "product_embeddings", "dim_products", "customer_features")

RFM_COLUMNS = """avg(f.recency_days), median(f.recency_days), avg(f.frequency), median(f.frequency),
                 avg(f.monetary), median(f.monetary)"""


def segment_verdicts(measured: Mapping[str, Any], config: "SegmentsConfig") -> list[dg.AssetCheckResult]:
    sizes = measured.get("segment_sizes", {})
    total = sum(sizes.values())
    largest = max(sizes.values(), default=0) / total if total else 0.0
    kept = measured.get("kept_segment_share")
    return [
        dg.AssetCheckResult(
            check_name="segment_size_balance", passed=largest <= config.max_segment_share,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"largest_share": round(largest, 4), "segments": float(len(sizes)),
                      "max_segment_share": config.max_segment_share},
            description=f"the largest segment holds {largest:.1%} of customers (at most {config.max_segment_share:.0%})"),
        dg.AssetCheckResult(
            check_name="segment_stability", passed=kept is None or kept >= config.min_kept_share,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"kept_share": round(kept, 4) if kept is not None else 1.0, "min_kept_share": config.min_kept_share},
            description="first build: nothing to compare" if kept is None else
            f"{kept:.1%} of sampled customers keep their segment (at least {config.min_kept_share:.0%})"),
    ]


class SegmentsConfig(DeadLetterConfig):
    half_life_days: float = Field(default=90.0, description="Recency half-life of a purchase's weight.")
    sample_size: int = Field(default=20_000, description="Customers the clustering is fit on.")
    k_min: int = Field(default=4, description="Fewest segments tried (silhouette picks k).")
    k_max: int = Field(default=12, description="Most segments tried.")
    seed: int = 0
    store_customer_vectors: bool = Field(default=False, description="Also write ml.customer_embeddings (384 floats each).")
    chunk_lines: int = knob(200_000, "Purchase lines pooled at once (memory knob).")
    max_segment_share: float = knob(0.6, "segment_size_balance warns when one segment holds more customers.")
    min_kept_share: float = knob(0.8, "segment_stability warns when fewer sampled customers keep their segment.")
    read_batch_rows: int = knob(100_000, "Rows per Arrow batch read from DuckDB.")


PRODUCTS_SQL = "SELECT product_id, category, name FROM analytics.dim_products"
PREVIOUS_CENTROIDS_SQL = f"SELECT segment_id, centroid FROM {CENTROIDS_TABLE}"


def take_snapshot(build: StateBuild):
    """Everything the stage computes from, copied out so that no lock is held while it computes."""
    return snapshot(build.warehouse, {"purchases": PURCHASES_SQL, "vectors": PRODUCT_VECTORS_SQL, "products": PRODUCTS_SQL},
                    optional={"centroids": PREVIOUS_CENTROIDS_SQL})


def purchase_batches(taken: Snapshot, batch_rows: int) -> Iterator[pa.RecordBatch]:
    return taken.batches("purchases", batch_rows)


def load_products(taken: Snapshot) -> tuple[ProductEmbeddings, dict[str, str], dict[str, str], int]:
    """Product vectors, each product's category and name (for profiles and naming), and how many
    categories were inferred: a product without one gets the topic of its text vector."""
    products = ProductEmbeddings.from_arrow(taken.table("vectors"), vector_column="vector")
    described = taken.table("products").to_pylist()
    category_of = {row["product_id"]: row["category"] for row in described}
    names = {row["product_id"]: row["name"] for row in described if row["name"]}
    without = [i for i, pid in enumerate(products.product_ids.to_pylist())
               if category_of.get(pid) in (None, "", UNCATEGORIZED)]
    if without:
        ids = products.product_ids.take(pa.array(without)).to_pylist()
        category_of.update(infer_topics(ids, products.vectors[without], names))
    return products, category_of, names, len(without)


def previous_model(taken: Snapshot) -> SegmentModel | None:
    if not taken.has("centroids"):
        return None
    table = taken.table("centroids")
    return SegmentModel.from_arrow(table) if table.num_rows else None


def fit(taken: Snapshot, products, as_of, config: SegmentsConfig, previous) -> tuple:
    """Pass 1: pool every customer, keep the deterministic sample, fit the clustering on it."""
    sample = CustomerSample(config.sample_size, config.seed)
    for chunk in iter_customer_vectors(purchase_batches(taken, config.read_batch_rows), products, as_of=as_of,
                                       half_life_days=config.half_life_days, chunk_lines=config.chunk_lines):
        sample.add(chunk.customer_ids, chunk.vectors)
    if len(sample) < config.k_min:
        raise dg.Failure(f"only {len(sample)} customers have embeddable purchases; at least {config.k_min} are needed "
                         "to segment", allow_retries=False)
    segmenting = SegmentingConfig(k_min=config.k_min, k_max=min(config.k_max, len(sample) - 1), seed=config.seed)
    segment_fit = fit_segments(sample.vectors, previous, segmenting)
    return segment_fit, len(sample), kept_share(previous, segment_fit.model, sample.vectors)


def kept_share(previous: SegmentModel | None, model: SegmentModel, vectors: np.ndarray) -> float | None:
    """Share of the sampled customers the new model puts in the segment (id) the previous one did."""
    if previous is None or previous.centroids.shape[1] != vectors.shape[1] or not len(vectors):
        return None
    return float((previous.assign(vectors) == model.assign(vectors)).mean())


def assign(taken: Snapshot, products, as_of, config: SegmentsConfig, model: SegmentModel
           ) -> tuple[SegmentProfiler, PoolingReport]:
    """Pass 2: pool again, label every customer, accumulate profiles, stage the assignments."""
    report = PoolingReport()
    profiler = SegmentProfiler(model.segment_ids, products.product_ids)
    assignments = taken.writer("assignments", pa.schema([("customer_id", pa.string()), ("segment_id", pa.int64()),
                                                         ("similarity", pa.float32())]))
    vectors = (taken.writer("customer_vectors", pa.schema([("customer_id", pa.string()),
                                                           ("vector", pa.list_(pa.float32(), products.dimensions))]))
               if config.store_customer_vectors else None)
    centroids = model.centroids / np.linalg.norm(model.centroids, axis=1, keepdims=True)
    for chunk in iter_customer_vectors(purchase_batches(taken, config.read_batch_rows), products, as_of=as_of,
                                       half_life_days=config.half_life_days, chunk_lines=config.chunk_lines, report=report):
        labels = model.assign(chunk.vectors)
        profiler.add(labels, chunk.product_spend)
        rows = np.searchsorted(model.segment_ids, labels)
        similarity = np.einsum("ij,ij->i", chunk.vectors, centroids[rows]).astype(np.float32)
        assignments.write_table(pa.table({"customer_id": pa.array(chunk.customer_ids, pa.string()),
                                          "segment_id": pa.array(labels, pa.int64()), "similarity": similarity},
                                         schema=assignments.schema))
        if vectors is not None:
            flat = pa.FixedSizeListArray.from_arrays(pa.array(chunk.vectors.ravel(), pa.float32()), products.dimensions)
            vectors.write_table(pa.table({"customer_id": pa.array(chunk.customer_ids, pa.string()), "vector": flat},
                                         schema=vectors.schema))
    assignments.close()
    if vectors is not None:
        vectors.close()
    return profiler, report


def publish_assignments(con, taken: Snapshot, config: SegmentsConfig) -> None:
    con.execute(f"CREATE OR REPLACE TABLE {ASSIGNMENTS_TABLE} AS SELECT * FROM read_parquet(?)",
                [str(taken.path("assignments"))])
    if config.store_customer_vectors:
        con.execute(f"CREATE OR REPLACE TABLE {VECTORS_TABLE} AS SELECT * FROM read_parquet(?)",
                    [str(taken.path("customer_vectors"))])


def segment_rfm(con: duckdb.DuckDBPyConnection) -> tuple[dict[int, RfmSummary], RfmSummary]:
    """RFM means and medians per segment and over every assigned customer, from customer_features."""
    joined = f"FROM {ASSIGNMENTS_TABLE} AS s JOIN analytics.customer_features AS f USING (customer_id)"
    by_segment = {int(row[0]): RfmSummary(*_floats(row[1:]))
                  for row in fetch_all(con, f"SELECT s.segment_id, {RFM_COLUMNS} {joined} GROUP BY 1")}
    everyone = RfmSummary(*_floats(fetch_all(con, f"SELECT {RFM_COLUMNS} {joined}")[0]))
    return by_segment, everyone


def _floats(values) -> list[float]:
    return [float(v) if v is not None else float("nan") for v in values]


def write_model_and_profiles(con, model: SegmentModel, profiles: list[SegmentProfile], as_of: dt.date) -> None:
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


def chat_names(build: StateBuild, profiles: list[SegmentProfile], product_names: Mapping[str, str]
               ) -> tuple[dict[int, str] | None, DeadLetter | None]:
    """Names from the chat model (no warehouse connection is open here), or the dead letter of a
    request that failed for good: its reason class and the attempts it took. An answer that is
    not one short, distinct name per segment is retried like any unusable output. A wrong key or
    model fails the step (ModelConfigurationError)."""
    chat_model = build.resources.chat_model
    if chat_model.provider == "none" or not profiles:
        return None, None
    ids = [p.segment_id for p in profiles]
    messages = naming_messages(profiles, product_names)
    try:
        with chat_model.open(build.context) as chat:
            answer = chat.complete_json(messages, validate=lambda data: parse_segment_names(data, ids) is not None)
        return parse_segment_names(answer, ids), None
    except ModelConfigurationError:
        raise
    except ModelCallError as error:
        payload = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
        return None, DeadLetter(NAMING_STAGE, error.reason_class, error.message, getattr(error, "attempts", 1), payload)


@current_state_asset(
    name=STAGE,
    inputs=INPUTS,
    tables=[ASSIGNMENTS_TABLE, CENTROIDS_TABLE, PROFILES_TABLE, VECTORS_TABLE],
    group="infer",
    config_class=SegmentsConfig,
    resources=("warehouse", "chat_model"),
    retry_policy=NETWORK_RETRY_POLICY,
    checks=[dg.AssetCheckSpec("segment_size_balance", asset=STAGE, description="No segment swallows the customer base."),
            dg.AssetCheckSpec("segment_stability", asset=STAGE,
                              description="Customers keep their segment from one build to the next.")],
    verdicts=segment_verdicts,
    dead_letter_stage=NAMING_STAGE,
    personal_data=True,  # customer ids
)
def customer_segments(build: StateBuild) -> Built:
    """Every customer with embeddable purchases in one segment; segment profiles and names."""
    config = build.config
    # No lock is held while pooling and clustering: the inputs are a snapshot, the outputs are staged.
    with take_snapshot(build) as taken:
        products, category_of, product_names, inferred = load_products(taken)
        segment_fit, sampled, stability = fit(taken, products, build.as_of, config, previous_model(taken))
        profiler, report = assign(taken, products, build.as_of, config, segment_fit.model)
        model, dropped = drop_empty_segments(segment_fit.model, profiler.sizes)
        with build.warehouse.transaction() as con:
            con.execute("CREATE SCHEMA IF NOT EXISTS ml")
            publish_assignments(con, taken, config)
            rfm, everyone = segment_rfm(con)
            profiles = profiler.profiles(rfm, everyone, category_of)
            write_model_and_profiles(con, model, profiles, build.as_of)
    names, letter = chat_names(build, profiles, product_names)
    sizes = {str(p.segment_id): p.size for p in profiles}
    with build.warehouse.transaction() as con:
        if names:
            con.executemany(f"UPDATE {PROFILES_TABLE} SET name = ?, named_by = 'chat' WHERE segment_id = ?",
                            [(name, segment_id) for segment_id, name in names.items()])
            dead_letters.resolve_keys(con, NAMING_STAGE, [NAMING_STAGE])
        dead_letters.write(con, NAMING_STAGE, build.partition_key, f"chat:{build.resources.chat_model.model}",
                           [letter] if letter else [])
        # The naming request is the stage's one model item (none when no chat model is configured).
        naming_items = int(build.resources.chat_model.provider != "none" and bool(profiles))
        build.record(con, sum(sizes.values()), {"segment_sizes": sizes, "items": naming_items,
                                                "kept_segment_share": stability})
    named_by = "chat" if names else ("profile (chat answer rejected, dead-lettered)" if letter
                                     else "profile (no chat model configured)")
    built = segments_metadata(build, segment_fit, report, profiles, sizes, dropped, sampled, named_by)
    built.metadata["products_with_inferred_category"] = inferred  # topics of their text vectors
    return built


def segments_metadata(build, segment_fit, report, profiles, sizes, dropped, sampled, named_by) -> Built:
    assigned = sum(sizes.values())
    pooling = report.as_dict()
    build.log.info(f"{assigned:,} customers in {len(sizes)} segments ({segment_fit.k_reason}); "
                   f"skipped: {pooling['customers_skipped']}")
    table = "\n".join(
        ["| id | name | size | share | recency (median d) | frequency (median) | monetary (median) |", "|---|---|---|---|---|---|---|"]
        + [f"| {p.segment_id} | {p.name} | {p.size:,} | {p.share:.1%} | {p.recency_days_median:.0f} | "
           f"{p.frequency_median:.0f} | {p.monetary_median:,.2f} |" for p in profiles]
    )
    return Built({
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
    })
