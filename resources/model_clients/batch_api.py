"""Bulk embedding through the OpenAI Batch API: a whole catalog at half the price, within a day.

    upload a JSONL file of requests (one text each, custom_id = its cache key)
      -> batches.create(endpoint="/v1/embeddings") -> poll batches.retrieve until a final status
      -> stream the output file: checked vectors go into ops.embedding_cache in chunks
      -> stream the error file: per-request failures come back to the caller for the DLQ

`EmbeddingSession.embed_items` uses it before its ordinary run when at least
`batch_api_min_texts` texts are missing from the cache (a first catalog, a new model): the
ordinary run then finds those texts cached, dead-letters the batch's failures with their reason,
and sends nothing else. A daily delta stays below the threshold and keeps the synchronous client.

Final statuses and what becomes of the requests:
- completed: the output file has the answers; failed requests are in the error file;
- expired (the completion window passed): requests done in time are in the output file, the
  rest are in the error file as `batch_expired` (DLQ reason timeout);
- failed (the input file was rejected) or cancelled: every request left without an answer is a
  dead letter with the batch's own error.

Each submitted batch is recorded in `ops.embedding_batches` with its requests' cache keys. A
step that stops waiting (`max_wait_seconds`) or is killed leaves its batch there; the next run
collects it first instead of paying for the same texts again.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from resources.model_clients import store
from resources.model_clients.base import assemble_vectors
from resources.model_clients.errors import CLIENT_ERROR, TIMEOUT, InvalidOutputError, ModelCallError, classify_status
from resources.model_clients.openai_compat import call_translating_errors, decode_vector
from resources.redaction import redact_text
from resources.warehouse import DuckDBWarehouse, fetch_all

Pair = tuple[str, str]  # (text_hash, text)

BATCHES_DDL = """
    CREATE TABLE IF NOT EXISTS ops.embedding_batches (
        batch_id      VARCHAR   PRIMARY KEY,   -- the provider's id
        stage         VARCHAR   NOT NULL,
        model         VARCHAR   NOT NULL,      -- the cache namespace the vectors go to
        dimensions    INTEGER   NOT NULL,
        text_hashes   VARCHAR[] NOT NULL,      -- the requests' custom_ids (cache keys)
        status        VARCHAR   NOT NULL,      -- the provider's status when last seen
        submitted_at  TIMESTAMP NOT NULL,
        collected_at  TIMESTAMP,               -- set once its files were read: not in flight any more
        embedded      INTEGER,
        failed        INTEGER,
        tokens        BIGINT
    )
    """
# Told after each submission's ledger row is committed, in the submitting thread: a caller whose
# warehouse is private (a lake build) copies the ledger out then, so even a step killed outright
# (SIGKILL, out of memory) leaves its batch to the next run. The callback must not raise.
_ledger_written: ContextVar[Callable[[], None] | None] = ContextVar("batch_ledger_written", default=None)


@contextmanager
def on_ledger_written(callback: Callable[[], None]) -> Iterator[None]:
    token = _ledger_written.set(callback)
    try:
        yield
    finally:
        _ledger_written.reset(token)


FINAL_STATUSES = frozenset({"completed", "expired", "failed", "cancelled"})
EXPIRED_CODE = "batch_expired"
WRITE_CHUNK_ROWS = 4_096


@dataclass(frozen=True)
class BatchSettings:
    completion_window: str = "24h"
    poll_interval_seconds: float = 30.0
    max_wait_seconds: float = 26 * 3600.0  # the window and a margin; past it the batch is left for the next run
    max_requests_per_batch: int = 50_000  # the API's limit per file


@dataclass
class BatchOutcome:
    """What the Batch API did for one `embed` call."""

    embedded: int = 0  # vectors stored in the cache
    failed: dict[str, ModelCallError] = field(default_factory=dict)  # text hash -> why
    batches: list[dict[str, Any]] = field(default_factory=list)  # id, status, requests, embedded, failed
    tokens: int = 0
    seconds: float = 0.0

    def to_metadata(self) -> dict[str, Any]:
        return {
            "batch_api_batches": len(self.batches),
            "batch_api_embedded": self.embedded,
            "batch_api_failed": len(self.failed),
            "batch_api_tokens": self.tokens,
            "batch_api_seconds": round(self.seconds, 3),
            "batch_api_ids": ", ".join(b["batch_id"] for b in self.batches),
        }


class BatchEmbedder:
    """Embeds texts through the Batch API of an OpenAI-compatible endpoint into the vector cache."""

    def __init__(
        self,
        sdk: Any,
        *,
        model: str,
        cache_model: str,
        dimensions: int,
        send_dimensions: bool,
        encoding_format: str,
        settings: BatchSettings,
        secrets: Sequence[str | None] = (),
        log: logging.Logger | Any | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._sdk = sdk
        self.model = model
        self.cache_model = cache_model
        self.dimensions = dimensions
        self._send_dimensions = send_dimensions
        self._encoding = encoding_format
        self.settings = settings
        self._secrets = tuple(secrets)
        self.log = log or logging.getLogger(__name__)
        self._sleep = sleep

    # -- the entry point ----------------------------------------------------------------------
    def embed(self, warehouse: DuckDBWarehouse, stage: str, pairs: Sequence[Pair], min_texts: int) -> BatchOutcome | None:
        """Collect the stage's batches still in flight; then, when at least `min_texts` of the
        `pairs` are neither cached nor failed in those, send them as new batches and collect
        them. None when the Batch API had nothing to do (the synchronous client does the rest)."""
        started = time.monotonic()
        outcome = BatchOutcome()
        ensure_table(warehouse)
        for batch_id, hashes in self._in_flight(warehouse, stage):
            self.log.info(f"collecting batch {batch_id} of an earlier run ({len(hashes):,} requests)")
            self._collect(warehouse, batch_id, hashes, outcome)
        cached = store.cached_hashes(warehouse, self.cache_model, self.dimensions, [h for h, _ in pairs])
        todo = [(h, text) for h, text in pairs if h not in cached and h not in outcome.failed]
        if len(todo) >= min_texts:
            submitted = [self._submit(warehouse, stage, chunk)
                         for chunk in _chunks(todo, self.settings.max_requests_per_batch)]
            for batch_id, hashes in submitted:
                self._collect(warehouse, batch_id, hashes, outcome)
        if not outcome.batches:
            return None
        outcome.seconds = time.monotonic() - started
        return outcome

    # -- submitting ---------------------------------------------------------------------------
    def _submit(self, warehouse: DuckDBWarehouse, stage: str, pairs: list[Pair]) -> tuple[str, list[str]]:
        lines = (json.dumps({"custom_id": h, "method": "POST", "url": "/v1/embeddings", "body": self._body(text)})
                 for h, text in pairs)
        payload = ("\n".join(lines) + "\n").encode("utf-8")
        uploaded = self._call(lambda: self._sdk.files.create(file=(f"{stage}.jsonl", io.BytesIO(payload)),
                                                             purpose="batch"))
        batch = self._call(lambda: self._sdk.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window=self.settings.completion_window,
            metadata={"stage": stage, "cache_model": self.cache_model},
        ))
        hashes = [h for h, _ in pairs]
        with warehouse.transaction() as con:
            con.execute(
                "INSERT INTO ops.embedding_batches (batch_id, stage, model, dimensions, text_hashes, status, submitted_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [batch.id, stage, self.cache_model, self.dimensions, hashes, batch.status, store.utc_now()],
            )
        if (listener := _ledger_written.get()) is not None:
            listener()
        self.log.info(f"submitted batch {batch.id}: {len(pairs):,} texts ({len(payload):,} bytes)")
        return batch.id, hashes

    def _body(self, text: str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "input": text, "encoding_format": self._encoding}
        if self._send_dimensions:
            body["dimensions"] = self.dimensions
        return body

    # -- waiting and collecting ---------------------------------------------------------------
    def _in_flight(self, warehouse: DuckDBWarehouse, stage: str) -> list[tuple[str, list[str]]]:
        with warehouse.connect(read_only=True) as con:
            return [(row[0], list(row[1])) for row in fetch_all(
                con,
                "SELECT batch_id, text_hashes FROM ops.embedding_batches "
                "WHERE stage = ? AND model = ? AND dimensions = ? AND collected_at IS NULL ORDER BY submitted_at",
                [stage, self.cache_model, self.dimensions],
            )]

    def _collect(self, warehouse: DuckDBWarehouse, batch_id: str, hashes: list[str], outcome: BatchOutcome) -> None:
        batch = self._wait(batch_id)
        summary = {"batch_id": batch_id, "status": batch.status, "requests": len(hashes), "embedded": 0, "failed": 0}
        if batch.status not in FINAL_STATUSES:  # still running: the next run collects it
            error = ModelCallError(TIMEOUT, f"batch {batch_id} still {batch.status} after "
                                            f"{self.settings.max_wait_seconds:.0f} s; the next run collects it")
            outcome.failed.update(dict.fromkeys(hashes, error))
            summary["failed"] = len(hashes)
            self._record(warehouse, batch_id, batch.status, None, summary, 0)
            outcome.batches.append(summary)
            return
        answered: set[str] = set()
        tokens = 0
        if getattr(batch, "output_file_id", None):
            embedded, tokens = self._read_output(warehouse, batch.output_file_id, answered, outcome)
            summary["embedded"] = embedded
        if getattr(batch, "error_file_id", None):
            self._read_errors(batch.error_file_id, answered, outcome)
        unanswered = [h for h in hashes if h not in answered]
        if unanswered:  # failed or cancelled batches, or a provider that omitted lines
            error = _batch_error(batch)
            outcome.failed.update(dict.fromkeys(unanswered, error))
        summary["failed"] = sum(1 for h in hashes if h in outcome.failed)
        outcome.embedded += summary["embedded"]
        outcome.tokens += tokens
        outcome.batches.append(summary)
        self._record(warehouse, batch_id, batch.status, store.utc_now(), summary, tokens)
        log = self.log.warning if summary["failed"] else self.log.info
        log(f"batch {batch_id} {batch.status}: {summary['embedded']:,} embedded, {summary['failed']:,} failed")

    def _wait(self, batch_id: str) -> Any:
        """Poll until a final status or `max_wait_seconds`; a transient polling error is waited out."""
        deadline = time.monotonic() + self.settings.max_wait_seconds
        while True:
            try:
                batch = self._call(lambda: self._sdk.batches.retrieve(batch_id))
            except ModelCallError as error:
                if not error.retryable or time.monotonic() >= deadline:
                    raise
                self.log.warning(f"polling batch {batch_id} failed ({error.message}); trying again")
                self._sleep(self.settings.poll_interval_seconds)
                continue
            if batch.status in FINAL_STATUSES or time.monotonic() >= deadline:
                return batch
            self._sleep(min(self.settings.poll_interval_seconds, max(0.0, deadline - time.monotonic())))

    def _read_output(
        self, warehouse: DuckDBWarehouse, file_id: str, answered: set[str], outcome: BatchOutcome
    ) -> tuple[int, int]:
        """Stream the output file into the cache in chunks; a bad answer fails its own request."""
        embedded = tokens = 0
        chunk: list[tuple[str, np.ndarray]] = []
        for record in self._lines(file_id):
            text_hash_ = str(record.get("custom_id"))
            answered.add(text_hash_)
            response = record.get("response") or {}
            status, body = response.get("status_code"), response.get("body") or {}
            if record.get("error") or status != 200:
                outcome.failed[text_hash_] = _request_error(record)
                continue
            try:
                vector = self._vector(body)
            except InvalidOutputError as error:
                outcome.failed[text_hash_] = error
                continue
            usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
            tokens += int(usage.get("prompt_tokens") or 0)
            chunk.append((text_hash_, vector))
            if len(chunk) >= WRITE_CHUNK_ROWS:
                embedded += self._store(warehouse, chunk)
        embedded += self._store(warehouse, chunk)
        return embedded, tokens

    def _read_errors(self, file_id: str, answered: set[str], outcome: BatchOutcome) -> None:
        for record in self._lines(file_id):
            text_hash_ = str(record.get("custom_id"))
            answered.add(text_hash_)
            outcome.failed[text_hash_] = _request_error(record)

    def _vector(self, body: dict[str, Any]) -> np.ndarray:
        data = body.get("data")
        if not isinstance(data, list):
            raise InvalidOutputError("answer has no `data` list")
        rows = [(item.get("index"), decode_vector(item.get("embedding"))) for item in data if isinstance(item, dict)]
        vectors, valid, problem = assemble_vectors(rows, 1, self.dimensions)
        if not valid[0]:
            raise InvalidOutputError(f"unusable output: {problem}")
        return vectors[0]

    def _store(self, warehouse: DuckDBWarehouse, chunk: list[tuple[str, np.ndarray]]) -> int:
        if not chunk:
            return 0
        store.write_progress(warehouse, stage="", partition_key="", model=self.cache_model, dimensions=self.dimensions,
                             vectors=chunk, item_rows=[], letters=[])
        stored = len(chunk)
        chunk.clear()
        return stored

    def _lines(self, file_id: str) -> Iterator[dict[str, Any]]:
        """A result file, one JSON object a line, streamed (a catalog's vectors can be GBs)."""
        with ExitStack() as stack:
            # The request is made on entering the streaming context: its errors are translated too.
            response = self._call(lambda: stack.enter_context(self._sdk.files.with_streaming_response.content(file_id)))
            for line in response.iter_lines():
                if line.strip():
                    try:
                        record = json.loads(line)
                    except ValueError:
                        raise InvalidOutputError(f"file {file_id} has a line that is not JSON") from None
                    if isinstance(record, dict):
                        yield record

    def _record(self, warehouse, batch_id: str, status: str, collected_at, summary: dict, tokens: int) -> None:
        with warehouse.transaction() as con:
            con.execute(
                "UPDATE ops.embedding_batches SET status = ?, collected_at = ?, embedded = ?, failed = ?, tokens = ? "
                "WHERE batch_id = ?",
                [status, collected_at, summary["embedded"], summary["failed"], tokens, batch_id],
            )

    def _call(self, call: Callable[[], Any]) -> Any:
        return call_translating_errors(call, self._secrets)

    def close(self) -> None:
        self._sdk.close()


def ensure_table(warehouse: DuckDBWarehouse) -> None:
    with warehouse.transaction() as con:
        con.execute("CREATE SCHEMA IF NOT EXISTS ops")
        con.execute(BATCHES_DDL)


def _chunks(pairs: Sequence[Pair], size: int) -> Iterable[list[Pair]]:
    for start in range(0, len(pairs), size):
        yield list(pairs[start:start + size])


def _request_error(record: dict[str, Any]) -> ModelCallError:
    """A failed request of a batch, in the DLQ's vocabulary."""
    error = record.get("error") or {}
    if isinstance(error, dict) and error.get("code") == EXPIRED_CODE:
        return ModelCallError(TIMEOUT, "not run before the batch's completion window expired")
    response = record.get("response") or {}
    status = response.get("status_code")
    body = response.get("body") or {}
    detail = (body.get("error") or {}).get("message") if isinstance(body.get("error"), dict) else None
    detail = detail or (error.get("message") if isinstance(error, dict) else None) or "no detail"
    if isinstance(status, int):
        reason, retryable = classify_status(status)
        return ModelCallError(reason, redact_text(f"HTTP {status}: {detail}", (), limit=500), status=status,
                              retryable=retryable)
    return ModelCallError(CLIENT_ERROR, redact_text(f"batch request failed: {detail}", (), limit=500))


def _batch_error(batch: Any) -> ModelCallError:
    """Why a request got no line in either file: the batch's own error, or its status."""
    errors = getattr(batch, "errors", None)
    data = getattr(errors, "data", None) or []
    detail = "; ".join(str(getattr(e, "message", e)) for e in data[:3]) or f"batch {batch.status}"
    if batch.status == "expired":
        return ModelCallError(TIMEOUT, f"not run before the batch's completion window expired ({detail})")
    return ModelCallError(CLIENT_ERROR, redact_text(f"batch {batch.id} {batch.status}: {detail}", (), limit=500))
