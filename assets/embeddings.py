"""Product embeddings from product text through the model resource, and customer embeddings
pooled from the products each customer bought.

Product texts go through the content-hash cache: only new or changed texts cost a model call.
Customers are not sent to the model: a customer's vector is the spend- and recency-weighted
mean of their products' vectors (recsys/customer_vectors.py), which takes seconds for millions
of customers where embedding a text dump of each would take hours.
"""

import time

import dagster as dg
import pyarrow as pa

from assets.metadata import table_preview
from assets.partitions import daily_partitions
from assets.state import BuildConfig, as_of_day, decide_from_upstream, read_state, skipped_result, write_state
from resources.model_clients import EmbeddingModel
from resources.warehouse import DuckDBWarehouse, fetch_all, fetch_scalar

PRODUCT_EMBEDDINGS_TABLE = "ml.product_embeddings"
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


def read_product_texts(warehouse: DuckDBWarehouse) -> tuple[list[tuple[str, str]], list[str]]:
    """(product_id, text) for every product with text, and the ids of products with none."""
    with warehouse.connect(read_only=True) as con:
        rows = fetch_all(con, PRODUCT_TEXT_SQL)
    with_text = [(pid, text) for pid, text in rows if text]
    without_text = [pid for pid, text in rows if not text]
    return with_text, without_text


def store_product_vectors(
    warehouse: DuckDBWarehouse, reader: pa.RecordBatchReader, as_of, fingerprint: str, with_text: int
) -> int:
    """Replace ml.product_embeddings with the vectors just embedded (or found in the cache)."""
    with warehouse.transaction() as con:
        con.execute("CREATE SCHEMA IF NOT EXISTS ml")
        con.register("embedded_products", reader)
        con.execute(
            f"CREATE OR REPLACE TABLE {PRODUCT_EMBEDDINGS_TABLE} AS "
            "SELECT item_key AS product_id, text_hash, vector FROM embedded_products ORDER BY product_id"
        )
        con.unregister("embedded_products")
        rows = fetch_scalar(con, f"SELECT count(*) FROM {PRODUCT_EMBEDDINGS_TABLE}")
        write_state(con, STAGE, as_of, fingerprint, rows, {"embedded": rows, "with_text": with_text})
    return rows


def coverage_check(embedded: int, with_text: int, dlq_count: int | None = None) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name="products_embedded",
        passed=embedded == with_text,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "embedded": embedded,
            "with_text": with_text,
            "coverage": round(embedded / with_text, 4) if with_text else 1.0,
            **({"dlq_count": dlq_count} if dlq_count is not None else {}),
        },
        description="Every product with text has a vector (the rest are in the DLQ).",
    )


@dg.asset(
    deps=["dim_products"],
    partitions_def=daily_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    group_name="ai",
    kinds={"duckdb", "python"},
    check_specs=[dg.AssetCheckSpec("products_embedded", asset="product_embeddings")],
)
def product_embeddings(
    context: dg.AssetExecutionContext, config: BuildConfig, warehouse: DuckDBWarehouse, embedding_model: EmbeddingModel
) -> dg.MaterializeResult:
    """One vector per product (name, description, category) from the embedding model; cached by text."""
    as_of = as_of_day(context)
    with warehouse.connect(read_only=True) as con:
        decision = decide_from_upstream(con, STAGE, as_of, ["dim_products"], embedding_model.model_id, config.force)
        kept = read_state(con, STAGE)
    if not decision.build:
        kept_counts = kept["metadata"]
        check = coverage_check(kept_counts["embedded"], kept_counts["with_text"])
        return skipped_result(context, decision, [check], as_of=str(as_of), model_calls=0)
    items, without_text = read_product_texts(warehouse)
    if without_text:
        context.log.warning(f"{len(without_text):,} products have no text and get no vector: {without_text[:5]}")
    started = time.perf_counter()
    # No warehouse connection is open here: embed_items takes short ones around each model call.
    with embedding_model.open(context) as embedder:
        report = embedder.embed_items(warehouse, items, stage=STAGE, partition_key=context.partition_key)
        reader = embedder.to_arrow_reader(warehouse, stage=STAGE, partition_key=context.partition_key)
        stored = store_product_vectors(warehouse, reader, as_of, decision.fingerprint, len(items))
    with warehouse.connect(read_only=True) as con:
        preview = table_preview(con, f"SELECT product_id, text_hash, vector[1:3] AS vector_head FROM {PRODUCT_EMBEDDINGS_TABLE}")
    metrics = report.to_metadata()
    context.log.info(f"{stored:,} product vectors stored; {report.dlq_count:,} in the DLQ; {metrics.get('requests')} requests")
    return dg.MaterializeResult(
        metadata={
            **metrics,
            "dagster/row_count": stored,
            "products": len(items) + len(without_text),
            "products_without_text": len(without_text),
            "model_calls": metrics.get("requests", 0),
            "as_of": str(as_of),
            "seconds_total": round(time.perf_counter() - started, 3),
            "preview": preview,
            "skipped": False,
        },
        check_results=[coverage_check(stored, len(items), report.dlq_count)],
    )
