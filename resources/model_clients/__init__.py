"""Model clients: the only door to embedding and chat models.

Resources (registered by `resources.build_resources()`):

    EmbeddingModel(provider="local" | "openai", model, dimensions, base_url, api_key=dg.EnvVar(...),
                   azure_api_version, azure_deployment, max_batch_size, max_batch_chars,
                   max_input_chars, max_concurrency, max_attempts, request_timeout_seconds,
                   backoff_base_seconds, backoff_cap_seconds, max_retry_after_seconds,
                   breaker_failure_threshold, breaker_cooldown_seconds, price_per_1k_tokens, ...)
    ChatModel(provider="none" | "openai", model, ... the same endpoint and resilience knobs)

`EmbeddingModel(batch_api_min_texts=N)` sends a run's uncached texts through the OpenAI Batch
API first when there are at least N of them (batch_api.py); `embed_items` does the rest as usual.

In a step, open the model once:

    with embedding_model.open(context) as embedder:                 # EmbeddingSession
        report = embedder.embed_items(warehouse, ((p.id, p.text) for p in products),
                                      stage="product_embeddings", partition_key=pk)
        reader = embedder.to_arrow_reader(warehouse, stage="product_embeddings", partition_key=pk)
    with warehouse.transaction() as con:             # the reader holds no connection: register it
        con.register("vectors", reader)              # item_key, text_hash, vector FLOAT[dim]
        con.execute("CREATE OR REPLACE TABLE ml.product_embeddings AS SELECT * FROM vectors")
    return dg.MaterializeResult(metadata=report.to_metadata())

    sql, params = embedder.item_vectors_sql(stage=..., partition_key=...)  # the same rows, read inside
                                                    # your own connection: no trip to the lock of its own
    embedder.iter_numpy(warehouse, stage=..., partition_key=...)    # (keys, float32 matrix) pages
    embedder.iter_vector_batches(...)                               # Arrow pages, a connection each
    embedder.embed_texts(["a query"]) -> np.ndarray                 # ad hoc, uncached
    embedder.text_hash(text) -> str                                 # the cache key of a text
    embedder.iter_vectors_for_hashes(warehouse, hashes)             # (text_hash, vector) pages
    embedding_model.to_arrow_reader(warehouse, stage=..., partition_key=...)   # no model load

Readers never hold a connection while you use their rows: `to_arrow_reader` streams the rows
into an unlinked Arrow file beside the warehouse and maps it (memory: one batch), the `iter_*`
pages open one short read connection per page. Memory stays bounded for any number of items.

    with chat_model.open(context) as chat:                          # ChatSession
        data = chat.complete_json([{"role": "user", "content": "..."}])        # dict
        report = chat.complete_items(warehouse, items, stage=..., partition_key=...)

What `embed_items` guarantees:
- texts are normalized (NFC, single spaces), truncated to `max_input_chars` (counted) and keyed
  by sha256; a text already in `ops.embedding_cache` for (model, dimensions) is never requested
  again, across runs and within one;
- requests carry at most `max_batch_size` (<= 2048) inputs and `max_batch_chars` characters,
  never an empty string (empty items are dead-lettered as client_error);
- up to `max_concurrency` requests in flight, fewer when the server pushes back (429,
  x-ratelimit-remaining-*); retries with full-jitter backoff, Retry-After honoured; a circuit
  breaker stops calling a failing endpoint (resilience.py; the SDK's own retries are off);
- vectors are checked (count, `index` order, length, NaN/inf) before they are stored;
- results are written in short transactions of `write_chunk_rows` vectors or more (group
  commits of up to `max_write_rows` while the database is busy): a killed run resumes from the
  last committed write;
- items that still fail land in `ops.dead_letter` (one row per stage/partition/item: attempts add
  up, last_seen moves); when a later run embeds them their row gets `resolved_at` (kept, not
  deleted, so the history stays auditable; open = `resolved_at IS NULL`);
- the report's `to_metadata()` holds metrics.METRIC_KEYS plus dlq_open and dlq_resolved.
"""

from resources.model_clients.base import ChatClient, EmbeddingClient, EmbeddingResponse, RateLimitInfo
from resources.model_clients.chat import ChatReport, ChatSession
from resources.model_clients.embedder import EmbeddingReport, EmbeddingSession, EmbeddingSettings, batch_as_numpy
from resources.model_clients.errors import REASON_CLASSES, InvalidOutputError, ModelCallError
from resources.model_clients.metrics import METRIC_KEYS, CallMetrics
from resources.model_clients.resource import ChatModel, EmbeddingModel
from resources.model_clients.texts import normalize_text, text_hash

__all__ = [
    "METRIC_KEYS",
    "REASON_CLASSES",
    "CallMetrics",
    "ChatClient",
    "ChatModel",
    "ChatReport",
    "ChatSession",
    "EmbeddingClient",
    "EmbeddingModel",
    "EmbeddingReport",
    "EmbeddingResponse",
    "EmbeddingSession",
    "EmbeddingSettings",
    "InvalidOutputError",
    "ModelCallError",
    "RateLimitInfo",
    "batch_as_numpy",
    "normalize_text",
    "text_hash",
]
