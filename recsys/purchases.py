"""Purchases in, customer chunks out: the streaming input every recsys pass shares.

A purchases *source* is re-readable, because fitting needs several passes over the data:
either a `pa.Table`, or a zero-argument callable that returns a fresh iterable of Arrow record
batches each time it is called (for example `lambda: relation.to_arrow_reader(100_000)`).
Rows carry `customer_id` (str), `product_id` (str), `amount` (double), `purchased_at`
(timestamp) and must be grouped by `customer_id` (sorted is fine): a customer's rows may span
batches, but must not reappear after another customer's rows.

A row is a *valid purchase* when product_id is non-empty, purchased_at is set and amount is a
positive number. Other rows are counted and ignored; a row with a null product_id is how a
customer without any purchase can be passed in (LEFT JOIN customers to purchases) so that the
customer still gets a popularity fallback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PURCHASE_COLUMNS = ("customer_id", "product_id", "amount", "purchased_at")
PurchaseSource = pa.Table | Callable[[], Iterable[pa.RecordBatch]]
MICROS_PER_DAY = 86_400 * 1_000_000


class PurchasesNotGrouped(ValueError):
    """The stream interleaves customers; chunking by customer would split their history."""


def open_batches(source: PurchaseSource) -> Iterator[pa.RecordBatch]:
    """A fresh pass over the source, as record batches."""
    if isinstance(source, pa.Table):
        yield from source.to_batches()
        return
    if not callable(source):
        raise TypeError(
            "purchases must be a pa.Table or a zero-argument callable returning record batches "
            "(a single RecordBatchReader can be read only once, and fitting needs several passes)"
        )
    for batch in source():
        if isinstance(batch, pa.Table):  # tolerate callables that yield tables
            yield from batch.to_batches()
        else:
            yield batch


def to_micros(moment: datetime) -> int:
    """Microseconds since the epoch; naive datetimes are read as UTC, like naive timestamps."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(round(moment.timestamp() * 1_000_000))


def from_micros(micros: int) -> datetime:
    return datetime.fromtimestamp(micros / 1_000_000, tz=timezone.utc).replace(tzinfo=None)


@dataclass(frozen=True)
class CustomerChunk:
    """Complete histories of a run of customers, in stream order, valid purchase rows only."""

    customer_ids: pa.Array  # unique, stream order; includes customers whose rows were all invalid
    row_customer: np.ndarray  # int64 index into customer_ids, one per valid row
    product_ids: pa.Array  # str, one per valid row
    amount: np.ndarray  # float64, one per valid row
    purchased_at: np.ndarray  # int64 microseconds since the epoch, one per valid row
    invalid_rows: int

    @property
    def n_customers(self) -> int:
        return len(self.customer_ids)

    def rows_where(self, keep: np.ndarray) -> CustomerChunk:
        """The same customers with only the rows where `keep` is true."""
        indices = pa.array(np.flatnonzero(keep))
        return CustomerChunk(
            customer_ids=self.customer_ids,
            row_customer=self.row_customer[keep],
            product_ids=self.product_ids.take(indices),
            amount=self.amount[keep],
            purchased_at=self.purchased_at[keep],
            invalid_rows=self.invalid_rows,
        )

    def select_customers(self, keep: np.ndarray) -> CustomerChunk:
        """Only the customers where `keep` is true (and their rows), re-indexed."""
        new_index = np.cumsum(keep) - 1
        rows = keep[self.row_customer]
        indices = pa.array(np.flatnonzero(rows))
        return CustomerChunk(
            customer_ids=self.customer_ids.filter(pa.array(keep)),
            row_customer=new_index[self.row_customer[rows]],
            product_ids=self.product_ids.take(indices),
            amount=self.amount[rows],
            purchased_at=self.purchased_at[rows],
            invalid_rows=0,
        )

    def slices(self, max_customers: int) -> Iterator[CustomerChunk]:
        """Consecutive sub-chunks of at most `max_customers` customers (rows stay grouped)."""
        if self.n_customers <= max_customers:
            yield self
            return
        for first in range(0, self.n_customers, max_customers):
            stop = min(first + max_customers, self.n_customers)
            row_start, row_stop = np.searchsorted(self.row_customer, [first, stop])
            yield CustomerChunk(
                customer_ids=self.customer_ids.slice(first, stop - first),
                row_customer=self.row_customer[row_start:row_stop] - first,
                product_ids=self.product_ids.slice(row_start, row_stop - row_start),
                amount=self.amount[row_start:row_stop],
                purchased_at=self.purchased_at[row_start:row_stop],
                invalid_rows=0,
            )

    def before(self, cutoff_us: int) -> CustomerChunk:
        return self.rows_where(self.purchased_at < cutoff_us)

    def between(self, start_us: int, end_us: int) -> CustomerChunk:
        return self.rows_where((self.purchased_at >= start_us) & (self.purchased_at < end_us))

    def customers_with_rows(self) -> np.ndarray:
        """Boolean per customer: has at least one (valid) row in this chunk."""
        has_rows = np.zeros(self.n_customers, dtype=bool)
        has_rows[self.row_customer] = True
        return has_rows


def iter_customer_chunks(source: PurchaseSource, max_customers: int) -> Iterator[CustomerChunk]:
    """One pass over the source, cut into chunks of at most `max_customers` whole customers."""
    if max_customers < 1:
        raise ValueError("max_customers must be at least 1")
    pending: list[pa.RecordBatch] = []
    pending_runs = 0  # customers pending, counted batch by batch: a customer continued from the last batch once
    for batch in open_batches(source):
        if batch.num_rows == 0:
            continue
        batch = conform_batch(batch)
        ids = batch.column("customer_id")
        continued = bool(pending) and ids[0].as_py() == pending[-1].column("customer_id")[-1].as_py()
        pending.append(batch)
        pending_runs += len(run_starts(ids)) - continued
        if pending_runs - 1 < max_customers:
            continue  # no chunk yet: small batches are not put together (and scanned) again and again
        table = pa.Table.from_batches(pending).combine_chunks()
        starts = customer_run_starts(table["customer_id"])
        complete_runs = len(starts) - 1  # the last customer may continue in the next batch
        emitted_runs = 0
        while complete_runs - emitted_runs >= max_customers:
            yield _chunk_of_runs(table, starts, emitted_runs, emitted_runs + max_customers)
            emitted_runs += max_customers
        rest = table.slice(int(starts[emitted_runs])) if emitted_runs else table
        pending, pending_runs = rest.to_batches(), len(starts) - emitted_runs
    if pending:
        table = pa.Table.from_batches(pending).combine_chunks()
        starts = customer_run_starts(table["customer_id"])
        for first in range(0, len(starts), max_customers):
            yield _chunk_of_runs(table, starts, first, min(first + max_customers, len(starts)))


def conform_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Select and type the four columns; timestamps become int64 microseconds (UTC)."""
    missing = [name for name in PURCHASE_COLUMNS if name not in batch.schema.names]
    if missing:
        raise ValueError(f"purchases lack column(s) {missing}; expected {list(PURCHASE_COLUMNS)}")
    purchased_at = batch.column("purchased_at")
    if pa.types.is_timestamp(purchased_at.type):
        purchased_at = pc.cast(purchased_at, pa.timestamp("us", purchased_at.type.tz)).view(pa.int64())
    elif pa.types.is_date(purchased_at.type):
        purchased_at = pc.cast(pc.cast(purchased_at, pa.timestamp("us")), pa.int64())
    else:
        raise ValueError(f"purchased_at must be a timestamp or date, not {purchased_at.type}")
    if batch.column("customer_id").null_count:
        raise ValueError("customer_id must not be null (drop anonymous purchases before the recommender)")
    return pa.RecordBatch.from_arrays(
        [
            pc.cast(batch.column("customer_id"), pa.string()),
            pc.cast(batch.column("product_id"), pa.string()),
            pc.cast(batch.column("amount"), pa.float64()),
            purchased_at,
        ],
        names=list(PURCHASE_COLUMNS),
    )


def run_starts(customer_ids: pa.Array) -> np.ndarray:
    """Row offsets where the customer id differs from the row before (a new run begins)."""
    if len(customer_ids) == 0:
        return np.zeros(0, dtype=np.int64)
    changed = pc.not_equal(customer_ids.slice(1), customer_ids.slice(0, len(customer_ids) - 1))
    return np.concatenate([[0], np.flatnonzero(changed.to_numpy(zero_copy_only=False)) + 1]).astype(np.int64)


def customer_run_starts(customer_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Row offsets where a new customer begins; checks that each customer is one run."""
    if isinstance(customer_ids, pa.ChunkedArray):
        customer_ids = customer_ids.combine_chunks()
    starts = run_starts(customer_ids)
    if len(starts) != pc.count_distinct(customer_ids).as_py():
        raise PurchasesNotGrouped("purchases must be grouped by customer_id (ORDER BY customer_id)")
    return starts


def _chunk_of_runs(table: pa.Table, run_starts: np.ndarray, first: int, stop: int) -> CustomerChunk:
    """Customers `first` .. `stop - 1` of the table (run indices) as a CustomerChunk."""
    row_start = int(run_starts[first])
    row_stop = int(run_starts[stop]) if stop < len(run_starts) else table.num_rows
    rows = table.slice(row_start, row_stop - row_start)
    run_lengths = np.diff(np.append(run_starts[first:stop], row_stop))
    row_customer = np.repeat(np.arange(stop - first, dtype=np.int64), run_lengths)
    customer_ids = rows["customer_id"].combine_chunks().take(pa.array(run_starts[first:stop] - row_start))
    valid = _valid_rows(rows)
    valid_index = pa.array(np.flatnonzero(valid))
    return CustomerChunk(
        customer_ids=customer_ids,
        row_customer=row_customer[valid],
        product_ids=rows["product_id"].combine_chunks().take(valid_index),
        amount=rows["amount"].to_numpy()[valid].astype(np.float64, copy=False),
        purchased_at=rows["purchased_at"].to_numpy()[valid].astype(np.int64, copy=False),
        invalid_rows=int(len(valid) - valid.sum()),
    )


def _valid_rows(rows: pa.Table) -> np.ndarray:
    product_ok = pc.fill_null(pc.greater(pc.utf8_length(rows["product_id"]), 0), False)
    amount_ok = pc.fill_null(pc.greater(rows["amount"], 0.0), False)
    time_ok = pc.is_valid(rows["purchased_at"])
    valid = pc.and_(pc.and_(product_ok, amount_ok), time_ok)
    if isinstance(valid, pa.ChunkedArray):
        valid = valid.combine_chunks()
    return valid.to_numpy(zero_copy_only=False)


class ItemIndex:
    """Product ids -> column positions (or -1), via Arrow's hash lookup."""

    def __init__(self, product_ids: pa.Array | list[str]):
        self.product_ids = pa.array(product_ids, type=pa.string())

    def __len__(self) -> int:
        return len(self.product_ids)

    def positions(self, product_ids: pa.Array) -> np.ndarray:
        found = pc.index_in(product_ids, value_set=self.product_ids)
        return pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def distinct_pairs(
    row_customer: np.ndarray, row_item: np.ndarray, n_items: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique (customer, item) pairs of rows with a known item, and the row -> pair map.

    Returns (pair_customer, pair_item, row_pair) where row_pair[i] is the pair of the i-th known row.
    """
    known = row_item >= 0
    keys = row_customer[known] * n_items + row_item[known]
    pair_keys, row_pair = np.unique(keys, return_inverse=True)
    return pair_keys // n_items, pair_keys % n_items, row_pair
