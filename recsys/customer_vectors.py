"""Customer embeddings by pooling the embeddings of the products each customer bought.

A customer's vector is the unit-normalized weighted mean of the (unit-normalized) vectors of
the products they bought, one term per purchase line:

    weight(line) = amount * 0.5 ** (age_days / half_life_days)

* Spend is linear: the vector is the customer's share of wallet over the catalog, so a product
  bought ten times weighs ten times as much as one bought once for the same price.
* Recency decays exponentially; `age_days` is the number of whole days between the purchase day
  and the as-of day (as `recency_days` in sql/customer_features.sql). A purchase dated after the
  as-of day counts as age 0 and is counted in `PoolingReport.lines_after_as_of`.
* Weights are rescaled per customer (divided by the customer's largest weight, in log space)
  before the sum. Normalization makes that invisible in the result, and it stops a customer whose
  purchases are all years old from underflowing to a zero vector.

Purchases arrive as a stream of Arrow record batches sorted by `customer_id`; a customer may span
batch boundaries. They are regrouped into chunks of about `chunk_lines` lines that hold whole
customers, and each chunk becomes one sparse (customers x products) weight matrix multiplied by
the product matrix. Memory is bounded by the chunk size and the catalog, never by the number of
customers. Every per-customer value depends only on that customer's lines in their given order,
so the output is identical whatever the batch sizes and chunk size.

Bad input has a defined outcome, counted in `PoolingReport`:
  lines  null customer id -> ignored; amount null, NaN or <= 0 or timestamp null -> ignored
         (not a valid purchase); product without an embedding -> left out of the vector;
  customers  no valid purchase -> skipped ("no_valid_purchases"); valid purchases but none of
         an embedded product -> skipped ("no_embedded_products"); a weighted mean of norm ~0
         -> skipped ("degenerate_vector").
Input that is not sorted by customer_id raises ValueError: a customer seen twice would silently
get two vectors.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from recsys.purchases import run_starts  # lines of a customer are contiguous (_check_sorted)

PURCHASE_COLUMNS = ("customer_id", "product_id", "amount", "purchased_at")
MICROSECONDS_PER_DAY = 86_400_000_000
DEFAULT_HALF_LIFE_DAYS = 90.0
DEFAULT_CHUNK_LINES = 200_000
LINE_IGNORE_REASONS = ("null_customer", "invalid_amount", "null_timestamp", "no_embedding")
CUSTOMER_SKIP_REASONS = ("no_valid_purchases", "no_embedded_products", "degenerate_vector")
# Below this norm a pooled vector has no direction worth keeping.
MIN_POOLED_NORM = 1e-6


@dataclass(frozen=True)
class ProductEmbeddings:
    """Product vectors by id: row i of `vectors` (float32, unit norm) belongs to `product_ids[i]`.

    Build it with `from_arrays` or `from_arrow`: they drop products whose vector is not finite
    or is all zeros (such a product counts as having no embedding) and normalize the rest.
    """

    product_ids: pa.StringArray
    vectors: np.ndarray
    dropped_product_ids: tuple[str, ...] = ()

    @property
    def dimensions(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.product_ids)

    @classmethod
    def from_arrays(cls, product_ids: Sequence[str] | pa.Array, vectors: np.ndarray) -> ProductEmbeddings:
        ids = product_ids if isinstance(product_ids, pa.Array) else pa.array(product_ids, type=pa.string())
        ids = ids.cast(pa.string())
        matrix = np.asarray(vectors, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[0] != len(ids):
            raise ValueError(f"vectors must be (products x dims) with {len(ids)} rows, got {matrix.shape}")
        if ids.null_count or pc.count_distinct(ids).as_py() != len(ids):
            raise ValueError("product ids must be unique and not null")
        norms = _row_norms(matrix)
        usable = np.isfinite(norms) & (norms > 0)
        dropped = tuple(ids.filter(pa.array(~usable)).to_pylist())
        kept = matrix[usable]
        kept /= norms[usable, None].astype(np.float32)
        return cls(ids.filter(pa.array(usable)), np.ascontiguousarray(kept), dropped)

    @classmethod
    def from_arrow(
        cls, table: pa.Table, id_column: str = "product_id", vector_column: str = "embedding"
    ) -> ProductEmbeddings:
        """From a table with one id column and one list<float> (fixed or variable size) column."""
        vectors = table.column(vector_column).combine_chunks()
        lengths = pc.list_value_length(vectors).to_numpy(zero_copy_only=False)
        if len(lengths) and (vectors.null_count or lengths.min() != lengths.max()):
            raise ValueError(f"{vector_column} must hold vectors of one length and no nulls")
        dims = int(lengths[0]) if len(lengths) else 0
        flat = pc.list_flatten(vectors).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        return cls.from_arrays(table.column(id_column).combine_chunks(), flat.reshape(len(lengths), dims))


def _zero_counts(reasons: tuple[str, ...]) -> Counter:
    """Every reason present from the start, so run metadata always has the same keys."""
    return Counter(dict.fromkeys(reasons, 0))


@dataclass
class PoolingReport:
    """What happened to the input, filled in while the chunks are consumed."""

    lines_in: int = 0
    customers_in: int = 0
    customers_out: int = 0
    chunks: int = 0
    lines_ignored: Counter = field(default_factory=lambda: _zero_counts(LINE_IGNORE_REASONS))
    lines_after_as_of: int = 0
    customers_skipped: Counter = field(default_factory=lambda: _zero_counts(CUSTOMER_SKIP_REASONS))

    def add(self, part: PoolingReport) -> None:
        """Add the counts of a chunk pooled elsewhere (lines_in and null customers are counted
        where the chunks are cut, so they are not in `part`)."""
        self.lines_in += part.lines_in
        self.customers_in += part.customers_in
        self.customers_out += part.customers_out
        self.lines_after_as_of += part.lines_after_as_of
        self.lines_ignored.update(part.lines_ignored)
        self.customers_skipped.update(part.customers_skipped)

    def as_dict(self) -> dict:
        return {
            "lines_in": self.lines_in,
            "customers_in": self.customers_in,
            "customers_out": self.customers_out,
            "chunks": self.chunks,
            "lines_ignored": dict(sorted(self.lines_ignored.items())),
            "lines_after_as_of": self.lines_after_as_of,
            "customers_skipped": dict(sorted(self.customers_skipped.items())),
        }


@dataclass(frozen=True)
class CustomerVectorChunk:
    """Pooled vectors of the customers of one chunk, in input order.

    `product_spend` is (customers x products of the ProductEmbeddings), the summed amount per
    embedded product, canonical CSR (one entry per distinct product): segment profiles read their
    top products from it. (RFM is sql/customer_features.sql's, never computed here.)
    """

    customer_ids: pa.StringArray
    vectors: np.ndarray
    product_spend: sp.csr_matrix
    labels: np.ndarray | None = None  # segment ids, when pooled with a segment model (pool_chunk)
    similarity: np.ndarray | None = None  # cosine to the customer's centroid, likewise

    def __len__(self) -> int:
        return len(self.customer_ids)


def iter_customer_vectors(
    purchase_batches: Iterable[pa.RecordBatch | pa.Table],
    products: ProductEmbeddings,
    *,
    as_of: dt.date | dt.datetime,
    half_life_days: float = DEFAULT_HALF_LIFE_DAYS,
    chunk_lines: int = DEFAULT_CHUNK_LINES,
    report: PoolingReport | None = None,
    mapper: Callable | None = None,
    label_with: Any = None,
    keep_vectors: bool = True,
) -> Iterator[CustomerVectorChunk]:
    """Yield one CustomerVectorChunk per ~`chunk_lines` purchase lines, whole customers only.

    `mapper(function, tables, shared)` -> (table, result) in order runs the pooling elsewhere (a
    compute engine's `ordered_map`); by default it runs here. `label_with` (a SegmentModel) also
    labels each chunk where it is pooled (`chunk.labels`, `chunk.similarity`); then
    `keep_vectors=False` leaves the vectors out of the chunks (n x 0).

    `purchase_batches` need the columns customer_id (str), product_id (str), amount (float),
    purchased_at (timestamp or date), sorted by customer_id. `report` is updated in place.
    """
    if not half_life_days > 0:
        raise ValueError("half_life_days must be > 0")
    if chunk_lines < 1:
        raise ValueError("chunk_lines must be >= 1")
    report = report if report is not None else PoolingReport()
    as_of_day = _day_number(as_of)
    tables = _sorted_tables(_whole_customer_tables(purchase_batches, chunk_lines, report))
    shared = (products, as_of_day, half_life_days, label_with, keep_vectors)
    for _, (chunk, part) in (mapper or _in_process)(pool_chunk, tables, shared):
        report.add(part)
        report.chunks += 1
        if len(chunk):
            yield chunk


def pool_chunk(shared: tuple, table: pa.Table) -> tuple[CustomerVectorChunk, PoolingReport]:
    """Pool one whole-customer table (and label it when a segment model is shared): what a
    compute engine's worker runs (recsys/engines.py). Returns the chunk and its own report."""
    products, as_of_day, half_life_days, label_with, keep_vectors = shared
    part = PoolingReport()
    chunk = _pool_table(table, products, as_of_day, half_life_days, part)
    if label_with is not None and len(chunk):
        labels, similarity = label_with.label(chunk.vectors)
        chunk = replace(chunk, labels=labels, similarity=similarity)
    if not keep_vectors:  # labelled: the vectors need not travel back
        chunk = replace(chunk, vectors=np.zeros((len(chunk), 0), np.float32))
    return chunk, part


def _in_process(function, items, shared):
    return ((item, function(shared, item)) for item in items)


def _sorted_tables(tables: Iterable[pa.Table]) -> Iterator[pa.Table]:
    previous_last_id: str | None = None
    for table in tables:
        previous_last_id = _check_sorted(table.column("customer_id"), previous_last_id)
        yield table


def _day_number(as_of: dt.date | dt.datetime) -> int:
    """Days since 1970-01-01 of the as-of day (a datetime counts by its date, in UTC if aware)."""
    if isinstance(as_of, dt.datetime):
        if as_of.tzinfo is not None:
            as_of = as_of.astimezone(dt.timezone.utc)
        as_of = as_of.date()
    return (as_of - dt.date(1970, 1, 1)).days


def _normalized_batch(batch: pa.RecordBatch | pa.Table) -> pa.Table:
    """The four purchase columns with fixed types; timestamps become int64 day numbers."""
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    missing = [name for name in PURCHASE_COLUMNS if name not in table.column_names]
    if missing:
        raise ValueError(f"purchase batches lack columns {missing}")
    return pa.table(
        {
            "customer_id": table.column("customer_id").cast(pa.string()),
            "product_id": table.column("product_id").cast(pa.string()),
            "amount": table.column("amount").cast(pa.float64()),
            "purchase_day": _day_numbers(table.column("purchased_at")),
        }
    )


def _day_numbers(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_date(column.type):
        column = column.cast(pa.date32())
        return column.cast(pa.int32()).cast(pa.int64())
    if not pa.types.is_timestamp(column.type):
        raise ValueError(f"purchased_at must be a timestamp or date, got {column.type}")
    # Aware timestamps hold UTC instants: keep the tz on the unit cast, then read the integer.
    micros = pc.cast(column, pa.timestamp("us", tz=column.type.tz), safe=False).cast(pa.int64())
    return pc.floor(pc.divide(micros.cast(pa.float64()), float(MICROSECONDS_PER_DAY))).cast(pa.int64())


def _whole_customer_tables(
    batches: Iterable[pa.RecordBatch | pa.Table], chunk_lines: int, report: PoolingReport
) -> Iterator[pa.Table]:
    """Regroup the batches into tables of about chunk_lines lines that never split a customer.

    Batches are only concatenated once enough lines are pending, so every line is copied a
    bounded number of times whatever the batch size.
    """
    pending: list[pa.Table] = []
    pending_lines = 0
    for batch in batches:
        table = _normalized_batch(batch)
        report.lines_in += table.num_rows
        report.lines_ignored["null_customer"] += table.column("customer_id").null_count
        table = table.filter(pc.is_valid(table.column("customer_id")))
        if not table.num_rows:
            continue
        pending.append(table)
        pending_lines += table.num_rows
        if pending_lines >= chunk_lines:
            merged = pa.concat_tables(pending).combine_chunks()
            ready, rest = _split_before_last_customer(merged, chunk_lines)
            yield from ready
            pending, pending_lines = [rest], rest.num_rows
    if pending_lines:
        yield pa.concat_tables(pending).combine_chunks()


def _split_before_last_customer(table: pa.Table, chunk_lines: int) -> tuple[list[pa.Table], pa.Table]:
    """Cut whole-customer slices of about chunk_lines; the last customer may go on in the next batch."""
    starts = run_starts(table.column("customer_id").chunk(0))
    last_start = int(starts[-1])
    ready, position = [], 0
    while last_start - position >= chunk_lines:
        # The furthest customer start within chunk_lines, or the next start when a single
        # customer has more lines than chunk_lines.
        index = np.searchsorted(starts, position + chunk_lines, side="right") - 1
        if starts[index] <= position:
            index = np.searchsorted(starts, position, side="right")
        cut = int(starts[index])
        ready.append(table.slice(position, cut - position))
        position = cut
    return ready, table.slice(position)


def _check_sorted(customer_ids: pa.ChunkedArray, previous_last_id: str | None) -> str:
    ids = customer_ids.combine_chunks()
    out_of_order = len(ids) > 1 and pc.any(pc.less(ids[1:], ids[:-1])).as_py()
    first = ids[0].as_py()
    if out_of_order or (previous_last_id is not None and first <= previous_last_id):
        raise ValueError("purchase batches must be sorted by customer_id (each customer's lines together)")
    return ids[-1].as_py()


def _pool_table(
    table: pa.Table, products: ProductEmbeddings, as_of_day: int, half_life_days: float, report: PoolingReport
) -> CustomerVectorChunk:
    customer_ids = table.column("customer_id").combine_chunks()
    starts = run_starts(customer_ids)
    report.customers_in += len(starts)
    lines = _valid_lines(table, products, _customer_of_line(starts, len(customer_ids)), report)
    report.lines_after_as_of += int((lines.day > as_of_day).sum())
    embedded = lines.only(lines.product >= 0)
    has_embedded = _count_skipped_customers(lines, embedded, len(starts), report)

    ages = np.maximum(as_of_day - embedded.day, 0)
    weights = _decayed_spend_weights(embedded.amount, ages, embedded.customer, half_life_days)
    rows = _compact_rows(embedded.customer, has_embedded)
    n_rows, n_products = int(has_embedded.sum()), len(products)
    weight_matrix = _csr(rows, embedded.product, weights.astype(np.float32), n_rows, n_products)
    vectors, usable = _normalized(weight_matrix @ products.vectors)
    report.customers_skipped["degenerate_vector"] += int((~usable).sum())

    kept = np.flatnonzero(has_embedded)[usable]
    report.customers_out += len(kept)
    spend = _csr(rows, embedded.product, embedded.amount, n_rows, n_products)
    spend.sum_duplicates()
    return CustomerVectorChunk(
        customer_ids=customer_ids.take(pa.array(starts[kept])),
        vectors=vectors if usable.all() else vectors[usable],
        product_spend=spend if usable.all() else spend[np.flatnonzero(usable)],
    )


def _customer_of_line(starts: np.ndarray, n_lines: int) -> np.ndarray:
    return np.repeat(np.arange(len(starts)), np.diff(np.append(starts, n_lines)))


def _count_skipped_customers(
    lines: _Lines, embedded: _Lines, n_customers: int, report: PoolingReport
) -> np.ndarray:
    """Count customers with nothing to pool; return which customers have an embedded line."""
    has_valid = np.bincount(lines.customer, minlength=n_customers) > 0
    has_embedded = np.bincount(embedded.customer, minlength=n_customers) > 0
    report.customers_skipped["no_valid_purchases"] += int((~has_valid).sum())
    report.customers_skipped["no_embedded_products"] += int((has_valid & ~has_embedded).sum())
    return has_embedded


def _normalized(pooled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows scaled to unit norm in place, and which rows had a usable norm."""
    pooled = np.asarray(pooled, dtype=np.float32)
    norms = _row_norms(pooled)
    usable = np.isfinite(norms) & (norms > MIN_POOLED_NORM)
    pooled /= np.where(usable, norms, 1.0).astype(np.float32)[:, None]
    return pooled, usable


@dataclass(frozen=True)
class _Lines:
    """The valid purchase lines of a chunk as numpy arrays (product -1 = no embedding)."""

    customer: np.ndarray
    product: np.ndarray
    amount: np.ndarray
    day: np.ndarray

    def only(self, mask: np.ndarray) -> _Lines:
        return _Lines(self.customer[mask], self.product[mask], self.amount[mask], self.day[mask])


def _valid_lines(
    table: pa.Table, products: ProductEmbeddings, customer_of_line: np.ndarray, report: PoolingReport
) -> _Lines:
    amount = table.column("amount").to_numpy().astype(np.float64, copy=False)
    day_column = table.column("purchase_day")
    day = day_column.fill_null(0).to_numpy()
    has_day = pc.is_valid(day_column).to_numpy()
    good_amount = np.isfinite(amount) & (amount > 0)
    report.lines_ignored["invalid_amount"] += int((~good_amount).sum())
    report.lines_ignored["null_timestamp"] += int((good_amount & ~has_day).sum())
    valid = good_amount & has_day
    product = pc.index_in(table.column("product_id"), value_set=products.product_ids)
    product = product.fill_null(-1).to_numpy().astype(np.int64, copy=False)
    report.lines_ignored["no_embedding"] += int((valid & (product < 0)).sum())
    return _Lines(customer_of_line[valid], product[valid], amount[valid], day[valid])


def _decayed_spend_weights(
    amount: np.ndarray, age_days: np.ndarray, customer: np.ndarray, half_life_days: float
) -> np.ndarray:
    """amount * 0.5 ** (age / half_life), divided by the customer's largest weight (log space)."""
    log_weights = np.log(amount) - (math.log(2.0) / half_life_days) * age_days
    if not len(log_weights):
        return log_weights
    group_starts = np.concatenate([[0], np.flatnonzero(np.diff(customer)) + 1])
    group_max = np.maximum.reduceat(log_weights, group_starts)
    group_sizes = np.diff(np.append(group_starts, len(customer)))
    return np.exp(log_weights - np.repeat(group_max, group_sizes))


def _compact_rows(customer: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Map chunk customer indices to row numbers among the kept customers."""
    return (np.cumsum(kept) - 1)[customer]


def _csr(
    rows: np.ndarray, columns: np.ndarray, values: np.ndarray, n_rows: int, n_columns: int
) -> sp.csr_matrix:
    """CSR from entries already grouped by row (no sort needed; duplicates are summed by @)."""
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    return sp.csr_matrix((values, columns.astype(np.int32, copy=False), indptr), shape=(n_rows, n_columns))


def _row_norms(matrix: np.ndarray) -> np.ndarray:
    """Euclidean norm of each row, accumulated in float64."""
    return np.sqrt(np.einsum("ij,ij->i", matrix, matrix, dtype=np.float64))
