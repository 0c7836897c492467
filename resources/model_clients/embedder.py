"""The embedding session: what a step holds between `open()` and the end of the step.

`embed_items` streams (item_key, text) pairs in chunks of `lookup_chunk_size`:

    prepare (normalize, truncate, hash) -> look the hashes up in ops.embedding_cache
      -> unseen texts are grouped into requests (count and character limits)
      -> requests run on a pool of `max_concurrency` threads, each with its own retries,
         through the shared throttle and breaker (resilience.py)
      -> finished vectors are buffered and handed, with the item map and dead letters, to the
         run's database thread: one short transaction a write

The database thread runs the cache look-ups and the writes in order, while the requests go on
(no connection is ever held across a model call, and the model never waits for a checkpoint).
Two things keep the requests busy while it works:

- look-ups run one chunk ahead: the next chunk's hashes are queued while this chunk's requests
  are sent, so the pool never waits for a look-up stuck behind a write;
- writes are group commits: one starts once `write_chunk_rows` vectors are buffered (or the
  oldest has waited `write_interval_seconds`) and no write is running; while one runs, the next
  gathers up to `max_write_rows`. A write costs a connection
  open and a checkpoint whatever its size (measured: 100 us a vector at 2,048 rows, 35 us at
  16,384), so bigger writes under load are what lets the database keep up with the model.

At most 4 x max_concurrency requests are outstanding and at most 2 x max_write_rows vectors wait
to be written, so memory stays bounded whatever the number of items. A text shared by several
items is requested once. A killed run leaves every committed write in the cache; the next run
finds those texts there and does not pay for them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from resources.dead_letters import DeadLetter
from resources.model_clients import store
from resources.model_clients.base import EmbeddingClient, EmbeddingResponse
from resources.model_clients.errors import (
    CLIENT_ERROR,
    CircuitOpenError,
    InvalidOutputError,
    ModelCallError,
)
from resources.model_clients.metrics import CallMetrics
from resources.model_clients.resilience import ResilientCaller
from resources.model_clients.texts import PreparedText, chunked, estimate_tokens, plan_batches, prepare_text, text_hash
from resources.warehouse import DuckDBWarehouse

if TYPE_CHECKING:  # the Batch API module imports the openai SDK: only when it is configured
    from resources.model_clients.batch_api import BatchEmbedder, BatchOutcome

Pair = tuple[str, str]  # (text_hash, text)


@dataclass(frozen=True)
class EmbeddingSettings:
    max_batch_size: int = 256
    max_batch_chars: int = 100_000
    max_input_chars: int = 8_000
    max_concurrency: int = 8
    lookup_chunk_size: int = 32_768
    write_chunk_rows: int = 512
    max_write_rows: int = 4_096
    max_item_rows: int = 65_536
    write_interval_seconds: float = 2.0
    read_batch_rows: int = 8_192
    price_per_1k_tokens: float = 0.0
    chars_per_token: float = 4.0


@dataclass
class EmbeddingReport:
    stage: str
    partition_key: str
    metrics: CallMetrics
    dead_letters_open: int = 0
    dead_letters_resolved: int = 0
    bulk: BatchOutcome | None = None  # what the Batch API did first, if it was used

    @property
    def dlq_count(self) -> int:
        """Items that failed in this run."""
        return self.metrics.dlq_count

    def as_dict(self) -> dict[str, Any]:
        return {**self.metrics.as_dict(), "dlq_open": self.dead_letters_open, "dlq_resolved": self.dead_letters_resolved}

    def to_metadata(self) -> dict[str, Any]:
        return {
            **self.metrics.to_metadata(),
            "dlq_open": self.dead_letters_open,
            "dlq_resolved": self.dead_letters_resolved,
            **(self.bulk.to_metadata() if self.bulk else {}),
        }


@dataclass
class _BatchOutcome:
    embedded: list[tuple[str, np.ndarray]] = field(default_factory=list)
    failed: list[tuple[str, ModelCallError, int]] = field(default_factory=list)  # (hash, error, attempts)

    def fail(self, batch: Sequence[Pair], error: ModelCallError, attempts: int) -> None:
        self.failed.extend((text_hash_, error, attempts) for text_hash_, _ in batch)


class EmbeddingSession:
    def __init__(
        self,
        client: EmbeddingClient,
        settings: EmbeddingSettings,
        caller: ResilientCaller,
        model_id: str,
        log: logging.Logger | Any | None = None,
        bulk: BatchEmbedder | None = None,
        bulk_min_texts: int = 0,
    ) -> None:
        self.client = client
        self.settings = settings
        self.caller = caller
        self.model_id = model_id
        self.log = log or logging.getLogger(__name__)
        self.bulk = bulk  # the Batch API, for runs with at least `bulk_min_texts` uncached texts
        self.bulk_min_texts = bulk_min_texts

    @property
    def dimensions(self) -> int:
        return self.client.dimensions

    @property
    def concurrency(self) -> int:
        wanted = self.settings.max_concurrency
        return max(1, min(wanted, self.client.max_parallel_requests or wanted))

    def text_hash(self, text: str) -> str:
        """The cache key of `text` as this session would send it."""
        return prepare_text("", text, self.settings.max_input_chars).text_hash

    def new_metrics(self) -> CallMetrics:
        metrics = CallMetrics(self.client.provider, self.client.model, self.settings.price_per_1k_tokens)
        return metrics

    # -- the step's entry point ---------------------------------------------------------------
    def embed_items(
        self,
        warehouse: DuckDBWarehouse,
        items: Iterable[tuple[object, object]],
        *,
        stage: str,
        partition_key: str | None = None,
    ) -> EmbeddingReport:
        """Embed every (item_key, text) not yet cached; failures go to ops.dead_letter.

        With a Batch API configured, the uncached texts go there first when there are enough of
        them (batch_api.py); this run then finds them cached and dead-letters the batch's
        failures with their reason."""
        bulk: BatchOutcome | None = None
        if self.bulk is not None:
            items = list(items)
            bulk = self._embed_in_bulk(warehouse, items, stage)
        known_failures = bulk.failed if bulk else {}
        report = _EmbedRun(self, warehouse, stage, partition_key or "").run(items, known_failures)
        report.bulk = bulk
        return report

    def _embed_in_bulk(self, warehouse: DuckDBWarehouse, items: list[tuple[object, object]], stage: str) -> BatchOutcome | None:
        unique: dict[str, str] = {}
        for key, text in items:
            prepared = prepare_text(key, text, self.settings.max_input_chars)
            if prepared.text:
                unique.setdefault(prepared.text_hash, prepared.text)
        store.ensure_tables(warehouse)
        assert self.bulk is not None
        return self.bulk.embed(warehouse, stage, list(unique.items()), self.bulk_min_texts)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors for a few ad-hoc texts (no cache, no DLQ); raises the first failure."""
        prepared = [prepare_text(i, text, self.settings.max_input_chars) for i, text in enumerate(texts)]
        if any(not p.text for p in prepared):
            raise ValueError("cannot embed an empty text")
        unique = dict((p.text_hash, p.text) for p in prepared)
        vectors: dict[str, np.ndarray] = {}
        metrics = self.new_metrics()
        for batch in plan_batches(unique.items(), self.settings.max_batch_size, self.settings.max_batch_chars):
            outcome = self.embed_batch(batch, metrics)
            if outcome.failed:
                raise outcome.failed[0][1]
            vectors.update(outcome.embedded)
        if not prepared:
            return np.zeros((0, self.dimensions), np.float32)
        return np.stack([vectors[p.text_hash] for p in prepared])

    # -- reading vectors back -----------------------------------------------------------------
    def iter_vector_batches(
        self, warehouse: DuckDBWarehouse, *, stage: str, partition_key: str | None = None, batch_rows: int | None = None
    ) -> Iterator[pa.RecordBatch]:
        """Pages of (item_key, text_hash, vector), one short read connection per page; do not ask
        for the next page while holding a warehouse connection (use to_arrow_reader for that)."""
        yield from store.iter_item_vectors(
            warehouse, stage, partition_key or "", self.dimensions, batch_rows or self.settings.read_batch_rows
        )

    def item_vectors_sql(self, *, stage: str, partition_key: str | None = None) -> tuple[str, dict[str, str]]:
        """(SQL, parameters) of the stage/partition's stored items as (item_key, text_hash,
        vector FLOAT[dimensions]), to read inside the caller's own warehouse connection (no
        trip to the lock of its own)."""
        return store.item_vectors_sql(self.dimensions), {"stage": stage, "partition_key": partition_key or ""}

    def to_arrow_reader(
        self, warehouse: DuckDBWarehouse, *, stage: str, partition_key: str | None = None, batch_rows: int | None = None
    ) -> pa.RecordBatchReader:
        """(item_key, text_hash, vector) of the stage/partition's stored items, ordered by item_key,
        detached from the database (see store.spool_item_vectors): safe to register in DuckDB
        inside your own warehouse transaction."""
        rows = batch_rows or self.settings.read_batch_rows
        return store.spool_item_vectors(warehouse, stage, partition_key or "", self.dimensions, rows)

    def iter_numpy(
        self, warehouse: DuckDBWarehouse, *, stage: str, partition_key: str | None = None, batch_rows: int | None = None
    ) -> Iterator[tuple[list[str], np.ndarray]]:
        """(item keys, float32 matrix) pages of the stage/partition's stored items."""
        for batch in self.iter_vector_batches(warehouse, stage=stage, partition_key=partition_key, batch_rows=batch_rows):
            yield batch_as_numpy(batch, self.dimensions)

    def iter_vectors_for_hashes(
        self, warehouse: DuckDBWarehouse, text_hashes: Sequence[str], batch_rows: int | None = None
    ) -> Iterator[pa.RecordBatch]:
        """(text_hash, vector) pages for the given cache keys that are stored."""
        yield from store.iter_vectors_for_hashes(
            warehouse, self.model_id, self.dimensions, text_hashes, batch_rows or self.settings.read_batch_rows
        )

    # -- one request's worth, with retries (runs on a worker thread) --------------------------
    def embed_batch(self, batch: Sequence[Pair], metrics: CallMetrics) -> _BatchOutcome:
        outcome = _BatchOutcome()
        self._embed_with_retries(list(batch), metrics, outcome)
        return outcome

    def _embed_with_retries(
        self, todo: list[Pair], metrics: CallMetrics, outcome: _BatchOutcome, carried: int = 0
    ) -> None:
        """Send `todo` until every input has a trustworthy vector or a final failure. `carried`
        counts the requests that already carried these inputs (before a split)."""
        attempt = 0
        while todo:
            attempt += 1
            texts = [text for _, text in todo]
            estimated = sum(estimate_tokens(text, self.settings.chars_per_token) for text in texts)
            try:
                response = self.caller.attempt(lambda: self.client.embed(texts), metrics, estimated)
            except CircuitOpenError as error:
                outcome.fail(todo, error, carried + attempt - 1)
                return
            except ModelCallError as error:
                if self.caller.free_retry(error, metrics, self.client.provider, self.client.model):
                    attempt -= 1  # a failed outage probe spends no attempt
                    continue
                if error.blames_inputs and len(todo) > 1:  # halve until the rejected input is alone
                    middle = len(todo) // 2
                    self._embed_with_retries(todo[:middle], metrics, outcome, carried + attempt)
                    self._embed_with_retries(todo[middle:], metrics, outcome, carried + attempt)
                    return
                if not self.caller.pause_before_retry(attempt, error, metrics):
                    outcome.fail(todo, error, carried + attempt)
                    return
                continue
            todo = self._keep_valid(todo, response, outcome)
            if todo:  # only the inputs whose vectors were unusable go again
                error = InvalidOutputError(f"unusable output: {response.problem or 'invalid vector'}")
                if not self.caller.pause_before_retry(attempt, error, metrics):
                    outcome.fail(todo, error, carried + attempt)
                    return

    @staticmethod
    def _keep_valid(todo: list[Pair], response: EmbeddingResponse, outcome: _BatchOutcome) -> list[Pair]:
        """Keep the trustworthy vectors; return the inputs whose vectors were not."""
        invalid = []
        for (text_hash_, text), vector, ok in zip(todo, response.vectors, response.valid, strict=True):
            if ok:
                outcome.embedded.append((text_hash_, vector.copy()))
            else:
                invalid.append((text_hash_, text))
        return invalid


def batch_as_numpy(batch: pa.RecordBatch, dimensions: int) -> tuple[list[str], np.ndarray]:
    keys = batch.column(0).to_pylist()
    vectors = batch.column(store.VECTOR_FIELD)
    matrix = vectors.flatten().to_numpy(zero_copy_only=False).reshape(len(batch), dimensions)
    return keys, matrix


@dataclass
class _Lookup:
    prepared: list[PreparedText]
    cached: Future[set[str]]  # the hashes already in the cache
    committed: set[str]  # hashes committed since the look-up was queued


@dataclass
class _WriteJob:
    vectors: list[tuple[str, np.ndarray]]
    item_rows: list[tuple[str, str, bool]]
    dead_letters: list[DeadLetter]


class _EmbedRun:
    """The bookkeeping of one `embed_items` call (main thread only, except futures and writer)."""

    def __init__(self, session: EmbeddingSession, warehouse: DuckDBWarehouse, stage: str, partition_key: str) -> None:
        self.session = session
        self.settings = session.settings
        self.warehouse = warehouse
        self.stage = stage
        self.partition_key = partition_key
        self.metrics = session.new_metrics()
        self.pending: dict[str, list[str]] = {}  # text hash in flight -> item keys waiting for it
        self.buffered: dict[str, np.ndarray] = {}  # embedded, not yet in the cache
        self.buffered_since: float | None = None  # when the oldest buffered vector arrived
        self.failed: dict[str, tuple[ModelCallError, int]] = {}  # text hash -> (error, attempts)
        self.item_rows: dict[str, tuple[str, bool]] = {}  # item key -> (text hash, truncated), unflushed
        self.dead: dict[str, DeadLetter] = {}  # unflushed dead letters by item key
        # Hashes handed to the database thread and not yet committed, and, for each look-up not
        # yet admitted, those committed since it was queued: it may not see them, the run must
        # still not resend them.
        self.writing: set[str] = set()
        self.open_lookups: list[set[str]] = []
        self.writing_lock = threading.Lock()
        self.database = ThreadPoolExecutor(1, thread_name_prefix="embed-db")  # look-ups and writes, in order
        self.writes: deque[Future[None]] = deque()
        self.futures: set[Future[_BatchOutcome]] = set()
        self.submit: Callable[[list[Pair]], Future[_BatchOutcome]] | None = None
        breaker, throttle = session.caller.breaker, session.caller.throttle
        self._opens_before, self._throttle_wait_before = breaker.opens, throttle.wait_seconds

    def run(self, items: Iterable[tuple[object, object]],
            known_failures: dict[str, ModelCallError] | None = None) -> EmbeddingReport:
        """`known_failures`: texts that failed just before (in a batch): dead-lettered, not sent."""
        store.start_run(self.warehouse, self.stage, self.partition_key)
        self.failed.update({key: (error, 1) for key, error in (known_failures or {}).items()})
        try:
            with ThreadPoolExecutor(self.session.concurrency, thread_name_prefix="embed") as executor:
                self.submit = lambda batch: executor.submit(self.session.embed_batch, batch, self.metrics)
                try:
                    ahead: _Lookup | None = None
                    for chunk in chunked(items, self.settings.lookup_chunk_size):
                        queued = self._queue_lookup(chunk)
                        if ahead is not None:
                            self._admit(ahead)
                        ahead = queued
                    if ahead is not None:
                        self._admit(ahead)
                    while self.futures:
                        self._drain_some()
                except BaseException:
                    for future in self.futures:
                        future.cancel()
                    raise
        finally:
            try:
                self._flush()  # what was embedded is kept, even when the step fails
                self._wait_for_writes(0)
            finally:
                self.database.shutdown(wait=True)
        return self._report()

    # -- admission ----------------------------------------------------------------------------
    def _queue_lookup(self, chunk: list[tuple[object, object]]) -> _Lookup:
        """Prepare a chunk and queue its cache look-up on the database thread, behind the writes
        queued before it (so it sees them). What is written after it is queued is tracked in
        the look-up's own `committed` set, so admission still knows those texts are stored."""
        prepared = [prepare_text(key, text, self.settings.max_input_chars) for key, text in chunk]
        hashes = {p.text_hash for p in prepared if p.text}
        unknown = sorted(h for h in hashes if h not in self.pending and h not in self.buffered and h not in self.failed)
        committed: set[str] = set()
        with self.writing_lock:
            self.open_lookups.append(committed)
        model, dimensions = self.session.model_id, self.session.dimensions
        cached = self.database.submit(store.cached_hashes, self.warehouse, model, dimensions, unknown)
        return _Lookup(prepared, cached, committed)

    def _admit(self, lookup: _Lookup) -> None:
        while not lookup.cached.done() and self.futures:  # absorb finished requests meanwhile
            self._drain_some(lookup.cached)
        cached = lookup.cached.result()
        with self.writing_lock:  # a hash moves from `writing` to the committed sets under the lock
            embedded_earlier = self.writing | lookup.committed
            self.open_lookups = [s for s in self.open_lookups if s is not lookup.committed]
        to_send: dict[str, str] = {}
        for item in lookup.prepared:
            self._admit_item(item, cached, embedded_earlier, to_send)
        for batch in plan_batches(to_send.items(), self.settings.max_batch_size, self.settings.max_batch_chars):
            self._submit(batch)
        self._maybe_flush()

    def _admit_item(
        self, item: PreparedText, cached: set[str], embedded_earlier: set[str], to_send: dict[str, str]
    ) -> None:
        self.metrics.items += 1
        if not item.text:
            self._dead_letter(item.item_key, text_hash(""), ModelCallError(CLIENT_ERROR, "empty text"), 0)
            return
        self.metrics.truncated += item.truncated
        self.item_rows[item.item_key] = (item.text_hash, item.truncated)
        key = item.text_hash
        if key in cached:
            self.metrics.cache_hits += 1
        elif key in self.buffered or key in embedded_earlier:
            self.metrics.deduplicated += 1
        elif key in self.pending:
            self.metrics.deduplicated += 1
            self.pending[key].append(item.item_key)
        elif key in self.failed:
            error, attempts = self.failed[key]
            self._dead_letter(item.item_key, key, error, attempts)
        else:
            self.pending[key] = [item.item_key]
            to_send[key] = item.text

    def _submit(self, batch: list[Pair]) -> None:
        while len(self.futures) >= 4 * self.session.concurrency:
            self._drain_some()
        assert self.submit is not None
        self.futures.add(self.submit(batch))

    # -- completion ---------------------------------------------------------------------------
    def _drain_some(self, also: Future | None = None) -> None:
        """Absorb the requests that finished (returning early, too, when `also` is done, when the
        running write ends while vectors wait, or when buffered vectors are due to be written)."""
        waiting = self.futures | ({also} if also else set())
        if self.writes and self.buffered:
            waiting.add(self.writes[0])
        done, _ = wait(waiting, timeout=self._seconds_until_due(), return_when=FIRST_COMPLETED)
        for future in done & self.futures:
            self.futures.discard(future)
            self._absorb(future.result())
        self._maybe_flush()

    def _seconds_until_due(self) -> float | None:
        if self.buffered_since is None:
            return None
        return max(0.0, self.buffered_since + self.settings.write_interval_seconds - time.monotonic())

    def _absorb(self, outcome: _BatchOutcome) -> None:
        if outcome.embedded and self.buffered_since is None:
            self.buffered_since = time.monotonic()
        for key, vector in outcome.embedded:
            self.pending.pop(key, None)
            self.buffered[key] = vector
            self.metrics.items_embedded += 1
        for key, error, attempts in outcome.failed:
            self.failed[key] = (error, attempts)
            for item_key in self.pending.pop(key, []):
                self._dead_letter(item_key, key, error, attempts)

    def _dead_letter(self, item_key: str, payload_hash: str, error: ModelCallError, attempts: int) -> None:
        self.metrics.record_dead_letters(error.reason_class)
        self.dead[item_key] = DeadLetter(item_key, error.reason_class, error.message, attempts, payload_hash)

    def _maybe_flush(self) -> None:
        """Group commit: write once `write_chunk_rows` vectors are buffered or the oldest has
        waited `write_interval_seconds` (or `max_item_rows` item rows, when most items are cache
        hits) and no write is running; while one runs, gather up to `max_write_rows`, then wait
        for it (back-pressure). So answered vectors reach the cache within a bounded time and
        count: a killed run pays again for at most that window. Item rows need no hurry: a new
        run rebuilds the item map, only vectors are what a resume saves; written with the vectors
        or past their own bound, they cost no extra trip to the warehouse lock (a catalog of
        20,000 cached products took five, each waiting for the writer steps beside it)."""
        self._wait_for_writes(most_waiting=len(self.writes))  # collect finished writes, raise their errors
        vectors, item_rows = len(self.buffered), len(self.item_rows)
        due = vectors and (vectors >= self.settings.write_chunk_rows or self._seconds_until_due() == 0.0)
        if not due and item_rows < self.settings.max_item_rows:
            return
        if self.writes:
            if vectors < self.settings.max_write_rows and item_rows < self.settings.max_item_rows:
                return
            self._wait_for_writes(0)
        self._flush()

    def _flush(self) -> None:
        """Hand the buffered vectors, item rows and dead letters to the writer."""
        if not (self.buffered or self.item_rows or self.dead):
            return
        job = _WriteJob(
            vectors=list(self.buffered.items()),
            item_rows=[(key, h, truncated) for key, (h, truncated) in self.item_rows.items()],
            dead_letters=list(self.dead.values()),
        )
        with self.writing_lock:
            self.writing.update(self.buffered)
        self.buffered.clear()
        self.buffered_since = None
        self.item_rows.clear()
        self.dead.clear()
        self.writes.append(self.database.submit(self._write, job))

    def _wait_for_writes(self, most_waiting: int) -> None:
        """Back-pressure: block until at most `most_waiting` writes are pending (raises their errors)."""
        while self.writes and (len(self.writes) > most_waiting or self.writes[0].done()):
            self.writes.popleft().result()

    def _write(self, job: _WriteJob) -> None:
        """On the database thread: one short transaction."""
        store.write_progress(
            self.warehouse,
            stage=self.stage,
            partition_key=self.partition_key,
            model=self.session.model_id,
            dimensions=self.session.dimensions,
            vectors=job.vectors,
            item_rows=job.item_rows,
            letters=job.dead_letters,
        )
        written = {text_hash_ for text_hash_, _ in job.vectors}
        with self.writing_lock:
            self.writing -= written
            for committed in self.open_lookups:
                committed |= written

    def _report(self) -> EmbeddingReport:
        resolved, still_open = store.resolve_embedded_dead_letters(self.warehouse, self.stage, self.partition_key)
        caller = self.session.caller
        self.metrics.breaker_opens = caller.breaker.opens - self._opens_before
        self.metrics.throttle_wait_seconds = caller.throttle.wait_seconds - self._throttle_wait_before
        # A local model loads on its first texts (0 when every text was cached or it was loaded already).
        self.metrics.model_load_seconds = self.session.client.load_seconds
        self.metrics.finish()
        report = EmbeddingReport(self.stage, self.partition_key, self.metrics, still_open, resolved)
        self._log(report)
        return report

    def _log(self, report: EmbeddingReport) -> None:
        m = report.metrics
        message = (
            f"embedded {self.stage}/{self.partition_key or '-'}: {m.items} items, {m.cache_hits} cached, "
            f"{m.items_embedded} new in {m.requests} requests, {sum(m.retries.values())} retries, "
            f"{m.dlq_count} dead-lettered ({report.dead_letters_open} open), {m.seconds:.1f}s"
        )
        (self.session.log.warning if m.dlq_count else self.session.log.info)(message)
        if m.breaker_opens:
            self.session.log.warning(f"circuit breaker opened {m.breaker_opens}x: {self.session.caller.breaker.last_error}")
