"""Customer segments with stable ids, their profiles and names.

A customer's vector is the spend- and recency-weighted mean of the vectors of the products they
bought (recsys/customer_vectors.py). Pooling 2M customers takes about 16 s, so the vectors are
recomputed when needed rather than stored (3 GB at 2M customers); set `store_customer_vectors`
to keep them in `ml.customer_embeddings`.

Segments: k-means on those vectors, fit on a deterministic sample (only the customers that can be
in it are pooled for it: at 2M, the step 38.9 s -> 31.0 s alone), everyone assigned chunk by
chunk; ids stay stable from one build to the next (recsys/clustering.py, recsys/segment_ids.py).
Profiles take their RFM from `analytics.customer_features` (the one definition of RFM). Names
come from the chat model when one is configured, otherwise from the profile (deterministic).
"""

import datetime as dt
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from assets.common.catalog import NETWORK_RETRY_POLICY
from assets.common.current_state import (
    Built,
    DeadLetterConfig,
    StateBuild,
    current_state_asset,
    fingerprint_of,
    knob,
    semantic_config,
)
from assets.infer.embeddings import PRODUCT_VECTORS_SQL
from assets.infer.purchases import (CUSTOMER_STATE_SQL, PURCHASE_STATE_FORMAT, all_purchases_sql,
                                    changed_customers_sql, customers_to_redo, outdated_state_reason,
                                    purchases_of)
from recsys.clustering import SegmentingConfig, fit_segments
from recsys.customer_sample import CustomerSample, id_priorities
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
    k_min: int = Field(default=4, description="Fewest segments tried (silhouette picks k; a sample too small for it gets the k's it holds, and fewer than 3 customers share one segment).")
    k_max: int = Field(default=12, description="Most segments tried.")
    seed: int = 0
    store_customer_vectors: bool = Field(default=False, description="Also write ml.customer_embeddings (384 floats each).")
    chunk_lines: int = knob(200_000, "Purchase lines pooled at once (memory knob).")
    max_segment_share: float = knob(0.6, "segment_size_balance warns when one segment holds more customers.")
    min_kept_share: float = knob(0.8, "segment_stability warns when fewer sampled customers keep their segment.")
    read_batch_rows: int = knob(100_000, "Rows per Arrow batch read from DuckDB.")
    refit_every_days: int = knob(
        7, "Refit the clustering (and name the segments) when it is this many days old; between refits a day "
           "assigns only the customers whose vector may have changed to the kept centroids.", ge=1)
    reassign_all: bool = knob(False, "Assign every customer to the kept centroids (what an incremental day must equal).")


PRODUCTS_SQL = "SELECT product_id, category, name FROM analytics.dim_products"
PREVIOUS_CENTROIDS_SQL = f"SELECT segment_id, centroid FROM {CENTROIDS_TABLE}"

# What an incremental day compares with: each customer's purchases and each product vector, as
# the last build saw them (fingerprints).
SEGMENT_CUSTOMERS_TABLE = "ml.segment_customers"
SEGMENT_PRODUCTS_TABLE = "ml.segment_product_vectors"
CODE_VERSION = "incremental-days-1"
REFIT, REASSIGN_ALL, INCREMENTAL = "refit", "reassign_all", "incremental"
PRODUCT_VECTOR_STATE_SQL = f"SELECT product_id, hash(vector) AS vector_hash FROM ({PRODUCT_VECTORS_SQL})"

# A customer's vector is a normalized, recency-weighted mean of the vectors of what they bought
# (weights relative to their own latest purchase, so the day itself cancels): it changes only
# with their purchases or those products' vectors.
REASSIGN_SQL = customers_to_redo("reassign", f"""
changed_products AS (
    SELECT coalesce(n.product_id, p.product_id) AS product_id
    FROM now_vectors AS n FULL OUTER JOIN {SEGMENT_PRODUCTS_TABLE} AS p ON n.product_id = p.product_id
    WHERE n.vector_hash IS DISTINCT FROM p.vector_hash
),
reasons AS (
    {changed_customers_sql(SEGMENT_CUSTOMERS_TABLE)}
    UNION ALL
    SELECT DISTINCT customer_id, 3, 'a product they bought has a new text vector'
    FROM analytics.stg_purchases SEMI JOIN changed_products USING (product_id)
)""")


@dataclass(frozen=True)
class SegmentsPlan:
    mode: str  # REFIT, REASSIGN_ALL or INCREMENTAL
    reason: str


def plan_segments(build: StateBuild, fingerprint: str) -> SegmentsPlan:
    """Refit on a cadence (or when the code or config changed, or when asked); in between keep the
    centroids and assign only the customers whose vector may have changed."""
    config, stored = build.config, build.decision.stored
    kept = (stored.measurements.get("model") if stored else None) or {}
    if not kept or kept.get("fingerprint") != fingerprint:
        return SegmentsPlan(REFIT, "no kept clustering of this code and config")
    age = (build.as_of - dt.date.fromisoformat(kept["fitted_on_day"])).days
    if age < 0 or age >= config.refit_every_days:
        return SegmentsPlan(REFIT, f"the clustering is {age} days old (refit every {config.refit_every_days})")
    if config.reassign_all:
        return SegmentsPlan(REASSIGN_ALL, "asked by run config (reassign_all)")
    if config.force:
        return SegmentsPlan(REFIT, "forced by run config")
    if not stored.complete:  # the naming request failed: the full pass names the segments again
        return SegmentsPlan(REASSIGN_ALL, f"retrying an incomplete build ({stored.incomplete_reason})")
    if outdated := outdated_state_reason(kept):
        return SegmentsPlan(REASSIGN_ALL, outdated)
    if config.store_customer_vectors or stored.as_of > build.as_of:
        return SegmentsPlan(REASSIGN_ALL, "customer vectors are stored, or the table holds a later day")
    return SegmentsPlan(INCREMENTAL, f"clustering fitted on {kept['fitted_on_day']}, "
                                     f"refit every {config.refit_every_days} days")


def take_snapshot(build: StateBuild, mode: str = REFIT):
    """Everything the stage computes from, copied out so that no lock is held while it computes
    (incremental: only the purchases of the customers to assign)."""
    queries = {"vectors": PRODUCT_VECTORS_SQL, "products": PRODUCTS_SQL, "customer_state": "SELECT * FROM now_state",
               "product_vector_state": "SELECT * FROM now_vectors"}
    prepare = [f"CREATE TEMP TABLE now_state AS {CUSTOMER_STATE_SQL}",
               f"CREATE TEMP TABLE now_vectors AS {PRODUCT_VECTOR_STATE_SQL}"]
    if mode == INCREMENTAL:
        prepare.append(REASSIGN_SQL)
        queries |= {"purchases": purchases_of("reassign"), "reassign": "SELECT * FROM reassign"}
    else:
        queries["purchases"] = all_purchases_sql(build.warehouse)
    return snapshot(build.warehouse, queries, optional={"centroids": PREVIOUS_CENTROIDS_SQL}, prepare=prepare)


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


def fit(taken: Snapshot, products, as_of, config: SegmentsConfig, previous, mapper=None) -> tuple:
    """Pass 1: pool the customers that can be in the deterministic sample, keep the sample, fit
    the clustering on it."""
    sample = sample_for_fit(taken, products, as_of, config, mapper)
    if not len(sample):
        raise dg.Failure("no customer has an embeddable purchase yet: there is nothing to segment",
                         allow_retries=False)
    segmenting = SegmentingConfig(k_min=config.k_min, k_max=min(config.k_max, len(sample) - 1), seed=config.seed)
    segment_fit = fit_segments(sample.vectors, previous, segmenting)
    return segment_fit, len(sample), kept_share(previous, segment_fit.model, sample.vectors)


# Customers pooled for the sample per place in it: the sample is the customers with the lowest id
# priorities among those with a vector, so pooling the lowest 2 x sample_size (not all 2M, to
# keep 20k) gives the same sample unless half of them have no vector (then everyone is pooled).
SAMPLE_CANDIDATES_PER_PLACE = 2


def sample_candidates(taken: Snapshot, config: SegmentsConfig) -> pa.Array | None:
    """The ids of the customers with the lowest sample priorities (ties at the edge included), or
    None when that is everyone. Streamed: it holds the lowest so far and a batch (20M ids whole
    would hold about 1 GB)."""
    wanted, seen = config.sample_size * SAMPLE_CANDIDATES_PER_PLACE, 0
    ids, priorities = pa.array([], pa.string()), np.zeros(0, np.uint64)
    for batch in taken.batches("customer_state", config.read_batch_rows, columns=["customer_id"]):
        new_ids = pc.drop_null(batch.column("customer_id")).cast(pa.string())
        seen += len(new_ids)
        ids = pa.concat_arrays([ids, new_ids])
        priorities = np.concatenate([priorities, id_priorities(new_ids, config.seed)])
        ids, priorities = lowest(ids, priorities, wanted)
    return None if seen <= wanted else ids


def lowest(ids: pa.Array, priorities: np.ndarray, wanted: int) -> tuple[pa.Array, np.ndarray]:
    """The ids of the `wanted` lowest priorities and any tied with the highest of them."""
    if len(priorities) <= wanted:
        return ids, priorities
    keep = priorities <= np.partition(priorities, wanted - 1)[wanted - 1]
    return ids.filter(pa.array(keep)), priorities[keep]


def sample_for_fit(taken: Snapshot, products, as_of, config: SegmentsConfig, mapper=None) -> CustomerSample:
    """The sample, pooling only its candidates unless too many of them have no vector."""
    candidates = sample_candidates(taken, config)
    sample = pooled_sample(taken, products, as_of, config, mapper, candidates)
    if candidates is not None and len(sample) < config.sample_size:
        sample = pooled_sample(taken, products, as_of, config, mapper, None)
    return sample


def pooled_sample(taken: Snapshot, products, as_of, config: SegmentsConfig, mapper, candidates: pa.Array | None
                  ) -> CustomerSample:
    """The sample of the customers pooled (only `candidates`, when given)."""
    batches = purchase_batches(taken, config.read_batch_rows)
    if candidates is not None:
        batches = (batch.filter(pc.is_in(batch.column("customer_id"), value_set=candidates)) for batch in batches)
    sample = CustomerSample(config.sample_size, config.seed)
    for chunk in iter_customer_vectors(batches, products, as_of=as_of, half_life_days=config.half_life_days,
                                       chunk_lines=config.chunk_lines, mapper=mapper):
        sample.add(chunk.customer_ids, chunk.vectors)
    return sample


def kept_share(previous: SegmentModel | None, model: SegmentModel, vectors: np.ndarray) -> float | None:
    """Share of the sampled customers the new model puts in the segment (id) the previous one did."""
    if previous is None or previous.centroids.shape[1] != vectors.shape[1] or not len(vectors):
        return None
    return float((previous.assign(vectors) == model.assign(vectors)).mean())


def assign(taken: Snapshot, products, as_of, config: SegmentsConfig, model: SegmentModel, mapper=None
           ) -> tuple[SegmentProfiler, PoolingReport]:
    """Pass 2: pool again and label every customer (where `mapper` runs it: the compute engine),
    accumulate profiles, stage the assignments."""
    report = PoolingReport()
    profiler = SegmentProfiler(model.segment_ids, products.product_ids)
    assignments = taken.writer("assignments", pa.schema([("customer_id", pa.string()), ("segment_id", pa.int64()),
                                                         ("similarity", pa.float32())]))
    vectors = (taken.writer("customer_vectors", pa.schema([("customer_id", pa.string()),
                                                           ("vector", pa.list_(pa.float32(), products.dimensions))]))
               if config.store_customer_vectors else None)
    for chunk in iter_customer_vectors(purchase_batches(taken, config.read_batch_rows), products, as_of=as_of,
                                       half_life_days=config.half_life_days, chunk_lines=config.chunk_lines,
                                       report=report, mapper=mapper, label_with=model,
                                       keep_vectors=config.store_customer_vectors):
        labels, similarity = chunk.labels, chunk.similarity
        profiler.add(labels, chunk.product_spend)
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
    publish_fingerprints(con, taken)


def publish_fingerprints(con, taken: Snapshot) -> None:
    """What the next incremental day compares with."""
    for table, name in ((SEGMENT_CUSTOMERS_TABLE, "customer_state"), (SEGMENT_PRODUCTS_TABLE, "product_vector_state")):
        con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT * FROM read_parquet(?)", [str(taken.path(name))])


def merge_assignments(con, taken: Snapshot) -> int:
    """Incremental day: the reassigned customers' rows (and those of customers gone) are replaced;
    returns how many of the customers assigned before moved to another segment or left."""
    # the changed customers once (the anti-join reads 2M rows twice): the moved count reads their rows only
    con.execute(f"""CREATE OR REPLACE TEMP TABLE reassigned AS
                    SELECT customer_id FROM read_parquet($reassign)
                    UNION SELECT customer_id FROM {ASSIGNMENTS_TABLE} ANTI JOIN read_parquet($state) USING (customer_id)""",
                {"reassign": str(taken.path("reassign")), "state": str(taken.path("customer_state"))})
    moved = fetch_all(con, f"""
        SELECT count(*) FROM reassigned JOIN {ASSIGNMENTS_TABLE} AS old USING (customer_id)
        LEFT JOIN read_parquet($assignments) AS new USING (customer_id)
        WHERE new.segment_id IS DISTINCT FROM old.segment_id""", {"assignments": str(taken.path("assignments"))})[0][0]
    con.execute(f"DELETE FROM {ASSIGNMENTS_TABLE} WHERE customer_id IN (SELECT customer_id FROM reassigned)")
    con.execute(f"INSERT INTO {ASSIGNMENTS_TABLE} SELECT * FROM read_parquet(?)", [str(taken.path("assignments"))])
    con.execute("DROP TABLE reassigned")
    publish_fingerprints(con, taken)
    return int(moved)


def refresh_profiles(con, as_of: dt.date) -> dict[str, int]:
    """Incremental day: sizes, shares and RFM of the kept segments from today's assignments; their
    top products, categories and names stay those measured at the last refit."""
    sizes = {int(k): int(v) for k, v in fetch_all(
        con, f"SELECT segment_id, count(*) FROM {ASSIGNMENTS_TABLE} GROUP BY 1")}
    total = sum(sizes.values())
    rfm, _ = segment_rfm(con, everyone=False)
    rows = []
    for (segment_id,) in fetch_all(con, f"SELECT segment_id FROM {PROFILES_TABLE} ORDER BY 1"):
        r = rfm.get(int(segment_id), RfmSummary(*[float("nan")] * 6))
        size = sizes.get(int(segment_id), 0)
        rows.append((size, size / total if total else 0.0, r.recency_days_mean, r.recency_days_median,
                     r.frequency_mean, r.frequency_median, r.monetary_mean, r.monetary_median, as_of, segment_id))
    con.executemany(f"""UPDATE {PROFILES_TABLE} SET size = ?, share = ?, recency_days_mean = ?, recency_days_median = ?,
                        frequency_mean = ?, frequency_median = ?, monetary_mean = ?, monetary_median = ?, as_of = ?
                        WHERE segment_id = ?""", rows)
    return {str(k): v for k, v in sorted(sizes.items())}


def segment_rfm(con: duckdb.DuckDBPyConnection, everyone: bool = True
                ) -> tuple[dict[int, RfmSummary], RfmSummary | None]:
    """RFM means and medians per segment and (unless `everyone` is False: an incremental day
    keeps the names measured at the refit) over every assigned customer, from customer_features.

    DuckDB's `median` holds every value of a group in memory and cannot spill: at 2M customers it
    ran out of a 272 MiB limit. Here a median is the middle of each group's sorted values (a window,
    which spills), the same numbers; in numpy the step's peak went over 1 GiB."""
    by_segment = {int(k): v for k, v in _rfm_by(con, "s.segment_id").items()}
    if not everyone:
        return by_segment, None
    return by_segment, _rfm_by(con, "0").get(0, RfmSummary(*[float("nan")] * 6))


def _rfm_by(con: duckdb.DuckDBPyConnection, group: str) -> dict[Any, RfmSummary]:
    """Mean and median of recency, frequency and monetary per value of `group` (SQL from code);
    NULLs are left out, as avg and median do. One measure a query: each sorts less."""
    found: dict[Any, list[float]] = {}
    for position, measure in enumerate(("recency_days", "frequency", "monetary")):
        for group_value, mean, median in fetch_all(con, f"""
                WITH ranked AS (
                    SELECT {group} AS g, f.{measure} AS x,
                           row_number() OVER (PARTITION BY {group} ORDER BY f.{measure}) AS r,
                           count(*) OVER (PARTITION BY {group}) AS n
                    FROM {ASSIGNMENTS_TABLE} AS s JOIN analytics.customer_features AS f USING (customer_id)
                    WHERE f.{measure} IS NOT NULL)
                SELECT g, avg(x), avg(x) FILTER (WHERE r IN ((n + 1) // 2, (n + 2) // 2)) FROM ranked GROUP BY g"""):
            found.setdefault(group_value, [float("nan")] * 6)[2 * position: 2 * position + 2] = [mean, median]
    return {g: RfmSummary(*(float(v) for v in values)) for g, values in found.items()}


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
    tables=[ASSIGNMENTS_TABLE, CENTROIDS_TABLE, PROFILES_TABLE, VECTORS_TABLE, SEGMENT_CUSTOMERS_TABLE,
            SEGMENT_PRODUCTS_TABLE],
    group="infer",
    config_class=SegmentsConfig,
    resources=("warehouse", "chat_model", "compute_engine"),
    retry_policy=NETWORK_RETRY_POLICY,
    pool=None,  # reads a snapshot and publishes in short connections; clusters and names holding none
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
    fingerprint = fingerprint_of(CODE_VERSION, semantic_config(config))
    plan = plan_segments(build, fingerprint)
    if plan.mode == INCREMENTAL:
        return assign_changed_customers(build, plan, fingerprint)
    # No lock is held while pooling and clustering: the inputs are a snapshot, the outputs are staged.
    with take_snapshot(build) as taken, build.resources.compute_engine.session():
        products, category_of, product_names, inferred = load_products(taken)
        mapper = engine_mapper(build)
        if plan.mode == REFIT:
            segment_fit, sampled, stability = fit(taken, products, build.as_of, config, previous_model(taken), mapper)
            fitted, fitted_on = segment_fit.model, str(build.as_of)
        else:  # the kept centroids, everyone assigned again
            segment_fit, sampled, stability = None, 0, None
            fitted, fitted_on = previous_model(taken), build.decision.stored.measurements["model"]["fitted_on_day"]
        profiler, report = assign(taken, products, build.as_of, config, fitted, mapper)
        model, dropped = drop_empty_segments(fitted, profiler.sizes)
        with build.warehouse.transaction() as con:
            con.execute("CREATE SCHEMA IF NOT EXISTS ml")
            if plan.mode == REASSIGN_ALL:
                stability = 1.0 - moved_share(con, taken)
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
        if not naming_items:  # nothing asks again: a row of an earlier request would stay open for ever
            dead_letters.supersede(con, NAMING_STAGE, current_keys_sql=None)
        build.record(con, sum(sizes.values()), {
            "segment_sizes": sizes, "items": naming_items, "kept_segment_share": stability,
            "model": {"fingerprint": fingerprint, "fitted_on_day": fitted_on,
                      "purchase_state": PURCHASE_STATE_FORMAT},
            "build": {"mode": plan.mode, "reason": plan.reason, "customers_assigned": report.customers_out}})
    named_by = "chat" if names else ("profile (chat answer rejected, dead-lettered)" if letter
                                     else "profile (no chat model configured)")
    built = segments_metadata(build, segment_fit, report, profiles, sizes, dropped, sampled, named_by)
    built.metadata.update({"products_with_inferred_category": inferred,  # topics of their text vectors
                           "build_mode": plan.mode, "build_mode_reason": plan.reason, "clustering_fitted_on_day": fitted_on,
                           "customers_assigned": report.customers_out, **build.resources.compute_engine.describe()})
    return built


def engine_mapper(build: StateBuild):
    """Pooling and labelling run where the compute engine says: in this process (one chunk at a
    time, as always) or on the workers of a Ray cluster."""
    engine = build.resources.compute_engine
    return lambda function, items, shared: engine.ordered_map(function, items, shared=shared, threads=1)


def assign_changed_customers(build: StateBuild, plan: SegmentsPlan, fingerprint: str) -> Built:
    """An incremental day: the customers whose vector may have changed are assigned to the kept
    centroids; everyone else keeps their row. Profiles get today's sizes and RFM."""
    config, kept = build.config, build.decision.stored.measurements["model"]
    with take_snapshot(build, INCREMENTAL) as taken:
        products, _, _, _ = load_products(taken)
        model = previous_model(taken)
        _, report = assign(taken, products, build.as_of, config, model, engine_mapper(build))
        reasons = taken.table("reassign").group_by("reason").aggregate([("customer_id", "count")])
        by_reason = dict(zip(reasons["reason"].to_pylist(), reasons["customer_id_count"].to_pylist()))
        with build.warehouse.transaction() as con:
            before = fetch_all(con, f"SELECT count(*) FROM {ASSIGNMENTS_TABLE}")[0][0]
            moved = merge_assignments(con, taken)
            sizes = refresh_profiles(con, build.as_of)
            stability = 1.0 - moved / before if before else None
            build.record(con, sum(sizes.values()), {
                "segment_sizes": sizes, "items": 0, "kept_segment_share": stability,
                "model": kept, "build": {"mode": plan.mode, "reason": plan.reason,
                                         "customers_assigned": report.customers_out, "by_reason": by_reason}})
    build.log.info(f"{plan.mode} ({plan.reason}): {report.customers_out:,} customers assigned again "
                   f"({by_reason}); {moved:,} of {before:,} moved")
    return Built({
        "dagster/row_count": sum(sizes.values()),
        "segments": len(sizes),
        "segment_sizes": dg.MetadataValue.json(sizes),
        "build_mode": plan.mode,
        "build_mode_reason": plan.reason,
        "clustering_fitted_on_day": kept["fitted_on_day"],
        "customers_assigned": report.customers_out,
        "reassigned_by_reason": dg.MetadataValue.json(by_reason),
        "customers_moved": moved,
        "pooling": dg.MetadataValue.json(report.as_dict()),
        **build.resources.compute_engine.describe(),
    })


def moved_share(con, taken: Snapshot) -> float:
    """Share of the customers assigned before whose segment differs in the staged assignments."""
    before, moved = fetch_all(con, f"""
        SELECT count(*), count(*) FILTER (WHERE new.segment_id IS DISTINCT FROM old.segment_id)
        FROM {ASSIGNMENTS_TABLE} AS old LEFT JOIN read_parquet(?) AS new ON new.customer_id = old.customer_id""",
        [str(taken.path("assignments"))])[0]
    return moved / before if before else 0.0


def segments_metadata(build, segment_fit, report, profiles, sizes, dropped, sampled, named_by) -> Built:
    assigned = sum(sizes.values())
    pooling = report.as_dict()
    how = segment_fit.k_reason if segment_fit else "the kept centroids"
    build.log.info(f"{assigned:,} customers in {len(sizes)} segments ({how}); "
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
        "clustering": dg.MetadataValue.json(segment_fit.summary() if segment_fit else {"k": len(sizes), "fit": "kept"}),
        "dropped_empty_segments": dropped,
        "customers_sampled": sampled,
        "customers_skipped": dg.MetadataValue.json(pooling["customers_skipped"]),
        "pooling": dg.MetadataValue.json(pooling),
        "named_by": named_by,
    })
