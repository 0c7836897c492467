"""Product embeddings from product text through the model resource, and customer embeddings
pooled from the products each customer bought.

Product texts go through the content-hash cache: only new or changed texts cost a model call.
Customers are not sent to the model: a customer's vector is the spend- and recency-weighted
mean of their products' vectors (recsys/customer_vectors.py), which takes seconds for millions
of customers where embedding a text dump of each would take hours.
"""

import time
from collections.abc import Mapping
from typing import Any

import dagster as dg

from assets.common.catalog import NETWORK_RETRY_POLICY
from assets.common.current_state import Built, DeadLetterConfig, StateBuild, current_state_asset
from assets.common.metadata import table_preview
from resources import dead_letters
from resources.model_clients import store
from resources.warehouse import fetch_all, fetch_scalar

PRODUCT_EMBEDDINGS_TABLE = "ml.product_embeddings"
PRODUCT_VECTORS_SQL = f"SELECT product_id, vector FROM {PRODUCT_EMBEDDINGS_TABLE} ORDER BY product_id"
STAGE = "product_embeddings"

# Name, description and category make the text; a description equal to the name is said once.
PRODUCT_TEXT_SQL = """
SELECT
    product_id,
    trim(concat_ws('. ',
        nullif(trim(name), ''),
        CASE WHEN trim(description) IS DISTINCT FROM trim(name) THEN nullif(trim(description), '') END,
        CASE WHEN category IS NOT NULL AND category <> 'uncategorized' THEN 'Category: ' || category END
    )) AS text
FROM analytics.dim_products
ORDER BY product_id
"""


def read_product_texts(warehouse) -> tuple[list[tuple[str, str]], list[str]]:
    """(product_id, text) for every product with text, and the ids of products with none."""
    with warehouse.connect(read_only=True) as con:
        rows = fetch_all(con, PRODUCT_TEXT_SQL)
    with_text = [(pid, text) for pid, text in rows if text]
    without_text = [pid for pid, text in rows if not text]
    return with_text, without_text


def store_product_vectors(build: StateBuild, item_vectors: tuple[str, dict], measurements: dict
                          ) -> tuple[int, dg.MarkdownMetadataValue, dict[str, int]]:
    """Replace ml.product_embeddings with the vectors just embedded (or found in the cache), close
    the dead letters of products no longer in the catalog or without text, and retire the item
    maps and cached vectors nothing needs any more, in the same transaction (one trip to the
    warehouse lock: this step runs beside the writer steps). Returns the rows, a preview and what
    was retired."""
    sql, params = item_vectors
    with build.warehouse.transaction() as con:
        con.execute("CREATE SCHEMA IF NOT EXISTS ml")
        con.execute(f"CREATE OR REPLACE TABLE {PRODUCT_EMBEDDINGS_TABLE} AS "
                    f"SELECT item_key AS product_id, text_hash, vector FROM ({sql}) ORDER BY product_id", params)
        rows = fetch_scalar(con, f"SELECT count(*) FROM {PRODUCT_EMBEDDINGS_TABLE}")
        # a product that left the catalog, or lost its text, is no longer sent: its rows close
        dead_letters.supersede(con, STAGE, f"SELECT product_id FROM ({PRODUCT_TEXT_SQL}) WHERE text <> ''")
        build.record(con, rows, {**measurements, "embedded": rows})
        items, vectors = store.retire_superseded(con, STAGE, build.partition_key, store.cache_keep_days())
        retired = {"item_map_rows_retired": items, "cached_vectors_pruned": vectors,
                   "cached_vectors": fetch_scalar(con, "SELECT count(*) FROM ops.embedding_cache")}
        preview = table_preview(con, f"SELECT product_id, text_hash, vector[1:3] AS vector_head FROM {PRODUCT_EMBEDDINGS_TABLE}")
    return rows, preview, retired


def coverage_verdicts(measured: Mapping[str, Any], config: DeadLetterConfig) -> list[dg.AssetCheckResult]:
    embedded, with_text = measured.get("embedded", 0), measured.get("with_text", 0)
    return [dg.AssetCheckResult(
        check_name="products_embedded",
        passed=embedded == with_text,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "embedded": embedded,
            "with_text": with_text,
            "coverage": round(embedded / with_text, 4) if with_text else 1.0,
            "dlq_open": measured.get("dlq_open", 0),
        },
        description=f"{embedded:,} of {with_text:,} products with text have a vector"
                    + (f" ({embedded / with_text:.2%}); the rest are in the DLQ" if with_text else ""),
    )]


@current_state_asset(
    name=STAGE,
    inputs=["dim_products"],
    tables=[PRODUCT_EMBEDDINGS_TABLE],
    group="infer",
    config_class=DeadLetterConfig,
    resources=("warehouse", "embedding_model"),
    retry_policy=NETWORK_RETRY_POLICY,
    pool=None,  # the model call holds no connection; writes take the warehouse lock briefly
    checks=[dg.AssetCheckSpec("products_embedded", asset=STAGE,
                              description="Every product with text has a vector (the rest are in the DLQ).")],
    verdicts=coverage_verdicts,
    dead_letter_stage=STAGE,
    # Vectors of another model are other vectors.
    fingerprint_extra=lambda context, as_of: context.resources.embedding_model.model_id,
)
def product_embeddings(build: StateBuild) -> Built:
    """One vector per product (name, description, category) from the embedding model; cached by text."""
    build.resources.embedding_model.warm_up()  # this step runs because the catalog changed: new texts are likely
    items, without_text = read_product_texts(build.warehouse)
    if without_text:
        build.log.warning(f"{len(without_text):,} products have no text and get no vector: {without_text[:5]}")
    started = time.perf_counter()
    # No warehouse connection is open here: embed_items takes short ones around each model call.
    with build.resources.embedding_model.open(build.context) as embedder:
        report = embedder.embed_items(build.warehouse, items, stage=STAGE, partition_key=build.partition_key)
        item_vectors = embedder.item_vectors_sql(stage=STAGE, partition_key=build.partition_key)
        stored, preview, retired = store_product_vectors(build, item_vectors,
                                                         {"with_text": len(items), "items": len(items)})
    metrics = report.to_metadata()
    build.log.info(f"{stored:,} product vectors stored; {report.dlq_count:,} in the DLQ; {metrics.get('requests')} requests")
    return Built({
        **metrics,
        "dagster/row_count": stored,
        "products": len(items) + len(without_text),
        "products_without_text": len(without_text),
        # batches of the Batch API are model calls too (one per batch, whatever its requests)
        "model_calls": metrics.get("requests", 0) + metrics.get("batch_api_batches", 0),
        "seconds_embedding": round(time.perf_counter() - started, 3),
        **retired,
        "preview": preview,
    })
