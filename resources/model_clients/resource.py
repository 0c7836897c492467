"""Dagster resources: `EmbeddingModel` (local | openai) and `ChatModel` (none | openai).

A step opens its model once and uses it for everything it embeds:

    with embedding_model.open(context) as embedder:
        report = embedder.embed_items(warehouse, items, stage="product_embeddings", partition_key=pk)

`open` builds the client (loading the local model, or an SDK client with `max_retries=0`), one
throttle and one circuit breaker for the whole step, and closes the client on exit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import dagster as dg
import pyarrow as pa
from pydantic import Field

from resources.background import import_in_background
from resources.model_clients import store
from resources.model_clients.base import ChatClient, EmbeddingClient
from resources.model_clients.chat import ChatSession
from resources.model_clients.embedder import EmbeddingSession, EmbeddingSettings
from resources.model_clients.local import DEFAULT_LOCAL_MODEL, LOCAL_DIMENSIONS
from resources.model_clients.resilience import AdaptiveThrottle, CircuitBreaker, ResilientCaller, RetryPolicy
from resources.warehouse import DuckDBWarehouse

MAX_INPUTS_PER_REQUEST = 2048  # the OpenAI embeddings API limit
BATCH_FILE_TIMEOUT_SECONDS = 600.0  # Batch API files are up to 200 MB each way


class _RemoteModelResource(dg.ConfigurableResource):
    """Endpoint and resilience knobs shared by the embedding and chat resources."""

    base_url: str | None = Field(
        default=None, description="OpenAI-compatible base URL (ends in /v1); Azure: the resource endpoint."
    )
    # repr=False: the key never shows in a repr, a log line or an exception that prints the resource.
    api_key: str | None = Field(
        default=None, repr=False, description="API key; pass dg.EnvVar('OPENAI_API_KEY'), never a literal.")
    azure_api_version: str | None = Field(default=None, description="Set to use Azure OpenAI (e.g. 2024-10-21).")
    azure_deployment: str | None = Field(default=None, description="Azure deployment name (defaults to the model).")
    max_concurrency: int = Field(default=8, ge=1, le=256, description="Requests in flight at most.")
    max_attempts: int = Field(default=5, ge=1, description="Attempts per request, the first one included.")
    request_timeout_seconds: float = Field(default=30.0, gt=0, description="Per-request timeout.")
    backoff_base_seconds: float = Field(default=0.5, ge=0, description="Full-jitter backoff: base * 2^(attempt-1).")
    backoff_cap_seconds: float = Field(default=20.0, ge=0, description="Full-jitter backoff: upper bound.")
    max_retry_after_seconds: float = Field(
        default=60.0, ge=0, description="A longer Retry-After gives up (dead letter) instead of waiting."
    )
    breaker_failure_threshold: int = Field(default=5, ge=1, description="Consecutive failures that open the breaker.")
    breaker_cooldown_seconds: float = Field(
        default=5.0, ge=0, description="Open breaker: requests wait this long, then one probes (doubles per failed probe, up to 60 s).")
    max_outage_seconds: float = Field(
        default=600.0, ge=0, description="How long requests wait out an outage (open breaker) before their items are dead-lettered.")
    price_per_1k_tokens: float = Field(default=0.0, ge=0, description="USD per 1000 tokens, for cost estimates.")

    def _caller(self, max_concurrency: int, log: Any) -> ResilientCaller:
        policy = RetryPolicy(
            self.max_attempts, self.backoff_base_seconds, self.backoff_cap_seconds, self.max_retry_after_seconds
        )
        breaker = CircuitBreaker(self.breaker_failure_threshold, self.breaker_cooldown_seconds,
                                 max_outage_s=self.max_outage_seconds, log=log.warning)
        return ResilientCaller(policy, AdaptiveThrottle(max_concurrency), breaker)

    def _sdk(self, timeout_s: float | None = None):
        from resources.model_clients.openai_compat import build_sdk_client

        return build_sdk_client(
            base_url=self.base_url,
            api_key=self.api_key,
            timeout_s=timeout_s or self.request_timeout_seconds,
            azure_api_version=self.azure_api_version,
            azure_deployment=self.azure_deployment,
        )


def _step_log(context: Any) -> Any:
    return getattr(context, "log", None) or logging.getLogger("resources.model_clients")


class EmbeddingModel(_RemoteModelResource):
    """Text embeddings: the offline local model by default, or any OpenAI-compatible endpoint."""

    provider: Literal["local", "openai"] = Field(default="local", description="local (offline) or openai (compatible).")
    model: str = Field(default=DEFAULT_LOCAL_MODEL, description="Model name (Azure: used when no deployment is set).")
    dimensions: int = Field(default=LOCAL_DIMENSIONS, ge=1, description="Vector length; every vector is checked.")
    send_dimensions: bool | None = Field(
        default=None, description="Send `dimensions` in requests; None = only for text-embedding-3 models."
    )
    encoding_format: Literal["base64", "float"] = Field(default="base64", description="Wire format of vectors.")
    cache_namespace: str | None = Field(default=None, description="Cache key prefix; default provider:model.")
    local_model_path: str | None = Field(default=None, description="Local model folder; default: the bundled one.")
    local_threads: int = Field(
        default=2, ge=0, description="torch threads for the local model (0 = torch's default, one a core); "
                                     "1 where many runs share the cores."
    )
    local_precision: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="auto: bfloat16 where the CPU computes it natively (vectors within cosine "
                                    "0.9999 of float32's, 1.9x faster), else float32."
    )
    local_encode_batch_size: int = Field(default=32, ge=1, description="Texts per forward pass of the local model.")
    max_batch_size: int = Field(default=256, ge=1, le=MAX_INPUTS_PER_REQUEST, description="Inputs per request.")
    max_batch_chars: int = Field(default=100_000, ge=1, description="Characters per request (~4 a token).")
    max_input_chars: int = Field(default=8_000, ge=1, description="Longer texts are truncated (and counted).")
    lookup_chunk_size: int = Field(default=32_768, ge=1, description="Items read and looked up in the cache at once "
                                                                      "(each look-up is a trip to the warehouse lock).")
    write_chunk_rows: int = Field(
        default=512, ge=1, description="Vectors buffered before a cache write starts (when none is running)."
    )
    write_interval_seconds: float = Field(
        default=2.0, gt=0, description="A buffered vector is written within this long (a killed run re-pays at most this window)."
    )
    max_write_rows: int = Field(
        default=4_096, ge=1, description="Most vectors one write gathers while the previous write runs."
    )
    read_batch_rows: int = Field(default=8_192, ge=1, description="Rows per page when reading vectors back.")
    batch_api_min_texts: int = Field(
        default=0, ge=0, description="openai only: when a run finds at least this many texts missing from the "
                                     "cache (a first catalog, a new model), they go through the Batch API (half "
                                     "price, answered within the completion window); fewer use the synchronous "
                                     "client. 0: never use the Batch API.")
    batch_completion_window: str = Field(default="24h", description="Batch API completion window.")
    batch_poll_seconds: float = Field(default=30.0, gt=0, description="Seconds between two looks at a batch.")
    batch_max_wait_seconds: float = Field(
        default=26 * 3600.0, ge=0, description="A step waits this long for its batches; one still running is "
                                               "dead-lettered for now and collected by the next run.")
    batch_max_requests: int = Field(default=50_000, ge=1, le=50_000, description="Texts per batch (API limit 50,000).")

    @property
    def model_id(self) -> str:
        """The cache namespace: vectors of different models never mix."""
        return self.cache_namespace or f"{self.provider}:{self.model}"

    @contextmanager
    def open(self, context: Any = None) -> Iterator[EmbeddingSession]:
        """The step's embedding session; the client is built once and closed on exit."""
        client = self.build_client()
        settings = EmbeddingSettings(
            max_batch_size=self.max_batch_size,
            max_batch_chars=self.max_batch_chars,
            max_input_chars=self.max_input_chars,
            max_concurrency=self.max_concurrency,
            lookup_chunk_size=self.lookup_chunk_size,
            write_chunk_rows=self.write_chunk_rows,
            write_interval_seconds=self.write_interval_seconds,
            max_write_rows=max(self.max_write_rows, self.write_chunk_rows),
            read_batch_rows=self.read_batch_rows,
            price_per_1k_tokens=self.price_per_1k_tokens,
        )
        concurrency = min(self.max_concurrency, client.max_parallel_requests or self.max_concurrency)
        log = _step_log(context)
        bulk = self.build_batch_embedder(log)
        try:
            yield EmbeddingSession(client, settings, self._caller(concurrency, log), self.model_id, log,
                                   bulk=bulk, bulk_min_texts=self.batch_api_min_texts)
        finally:
            client.close()
            if bulk is not None:
                bulk.close()

    def warm_up(self) -> threading.Thread | None:
        """Start importing what the local model needs (about 1.1 s in a step's fresh process) in a
        thread, before the step waits for the warehouse: the imports overlap the wait, and the
        model itself still loads only when a text is not in the cache."""
        if self.provider != "local":
            return None
        return import_in_background("torch", "tokenizers", "safetensors.torch")

    def build_batch_embedder(self, log: Any = None):
        """The Batch API path, when configured (openai provider, batch_api_min_texts > 0)."""
        if self.provider != "openai" or self.batch_api_min_texts <= 0:
            return None
        from resources.model_clients.batch_api import BatchEmbedder, BatchSettings

        settings = BatchSettings(
            completion_window=self.batch_completion_window,
            poll_interval_seconds=self.batch_poll_seconds,
            max_wait_seconds=self.batch_max_wait_seconds,
            max_requests_per_batch=self.batch_max_requests,
        )
        return BatchEmbedder(
            self._sdk(timeout_s=max(self.request_timeout_seconds, BATCH_FILE_TIMEOUT_SECONDS)),
            model=self.model,
            cache_model=self.model_id,
            dimensions=self.dimensions,
            send_dimensions=self._sends_dimensions(),
            encoding_format=self.encoding_format,
            settings=settings,
            secrets=[self.api_key],
            log=log,
        )

    def _sends_dimensions(self) -> bool:
        if self.send_dimensions is None:
            return self.model.startswith("text-embedding-3")
        return self.send_dimensions

    def build_client(self) -> EmbeddingClient:
        if self.provider == "local":
            from resources.model_clients.local import LocalSentenceTransformerClient

            return LocalSentenceTransformerClient(
                model=self.model,
                model_path=self.local_model_path,
                dimensions=self.dimensions,
                encode_batch_size=self.local_encode_batch_size,
                torch_threads=self.local_threads,
                precision=self.local_precision,
            )
        from resources.model_clients.openai_compat import OpenAIEmbeddingClient

        return OpenAIEmbeddingClient(
            self._sdk(),
            model=self.model,
            dimensions=self.dimensions,
            send_dimensions=self._sends_dimensions(),
            encoding_format=self.encoding_format,
            secrets=[self.api_key],
        )

    def to_arrow_reader(
        self, warehouse: DuckDBWarehouse, *, stage: str, partition_key: str | None = None, batch_rows: int | None = None
    ) -> pa.RecordBatchReader:
        """Stored vectors without loading the model (see EmbeddingSession.to_arrow_reader)."""
        rows = batch_rows or self.read_batch_rows
        return store.spool_item_vectors(warehouse, stage, partition_key or "", self.dimensions, rows)


class ChatModel(_RemoteModelResource):
    """JSON answers from a chat model, for optional LLM steps. `provider="none"` (the default)
    means the steps that need it are skipped: the pipeline runs fully offline."""

    provider: Literal["none", "openai"] = Field(default="none", description="none (disabled) or openai (compatible).")
    model: str = Field(default="gpt-4o-mini", description="Chat model (Azure: used when no deployment is set).")
    json_mode: bool = Field(default=True, description="Ask for response_format=json_object.")
    temperature: float = Field(default=0.0, ge=0, le=2)
    max_output_tokens: int | None = Field(default=512, description="max_tokens per reply.")
    max_concurrency: int = Field(default=4, ge=1, le=256, description="Requests in flight at most.")
    request_timeout_seconds: float = Field(default=60.0, gt=0, description="Per-request timeout.")

    @property
    def enabled(self) -> bool:
        return self.provider != "none"

    @contextmanager
    def open(self, context: Any = None) -> Iterator[ChatSession]:
        if not self.enabled:
            raise dg.Failure("ChatModel is disabled (provider='none'); set MODEL_PROVIDER/CHAT_MODEL to enable it")
        client = self.build_client()
        try:
            log = _step_log(context)
            caller = self._caller(self.max_concurrency, log)
            yield ChatSession(client, caller, self.max_concurrency, self.price_per_1k_tokens, log)
        finally:
            client.close()

    def build_client(self) -> ChatClient:
        from resources.model_clients.openai_compat import OpenAIChatClient

        return OpenAIChatClient(
            self._sdk(),
            model=self.model,
            json_mode=self.json_mode,
            temperature=self.temperature,
            max_output_tokens=self.max_output_tokens,
            secrets=[self.api_key],
        )
