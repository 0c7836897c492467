"""Baselines under the same rules as the recommender: global and segment popularity.

Both rank products by distinct buyers before the cut-off (segment popularity: buyers within
the customer's segment, ties broken by buyers overall; last tie-break: product_id), skip what
the customer already bought and recommend only candidate (in-stock) products. Segments come from a mapping customer -> segment id, or, when none is given, from
`RfmSegmenter`: terciles of recency, frequency and monetary value at the cut-off.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import numpy as np

from recsys.ease import top_k_stable
from recsys.purchases import (
    MICROS_PER_DAY,
    CustomerChunk,
    ItemIndex,
    PurchaseSource,
    distinct_pairs,
    iter_customer_chunks,
)

NO_SEGMENT = -1


@dataclass(frozen=True)
class TopK:
    """Recommendations of a chunk as positions in the candidate list."""

    row: np.ndarray
    item: np.ndarray
    rank: np.ndarray


def count_buyers(purchases: PurchaseSource, items: ItemIndex, as_of_us: int, chunk_customers: int, segment_of=None):
    """Distinct buyers per item before as_of; per segment too when `segment_of(chunk)` is given."""
    overall = np.zeros(len(items), dtype=np.int64)
    by_segment: dict[int, np.ndarray] = {}
    for chunk in iter_customer_chunks(purchases, chunk_customers):
        history = chunk.before(as_of_us)
        customer, item, _ = distinct_pairs(history.row_customer, items.positions(history.product_ids), len(items))
        overall += np.bincount(item, minlength=len(items))
        if segment_of is None:
            continue
        segment = segment_of(history)[customer]
        for value in np.unique(segment):
            counts = by_segment.setdefault(int(value), np.zeros(len(items), dtype=np.int64))
            counts += np.bincount(item[segment == value], minlength=len(items))
    return overall, by_segment


def rank_by_scores(history: CustomerChunk, items: ItemIndex, scores: np.ndarray, k: int) -> TopK:
    """Top-k of per-customer score rows (customers x items, modified in place), bought excluded."""
    customer, item, _ = distinct_pairs(history.row_customer, items.positions(history.product_ids), max(len(items), 1))
    scores[customer, item] = -np.inf
    row, column, _, rank = top_k_stable(scores, k)
    return TopK(row, column, rank)


def ordinal_scores(*keys_most_important_first: np.ndarray) -> np.ndarray:
    """float32 scores n-1 .. 0 that order items by the keys (larger first), then by position.

    Items are sorted by product_id, so position breaks the last ties. Ordinals stay exact in
    float32 up to 16 M items, unlike raw counts plus a fractional tie-break.
    """
    n = len(keys_most_important_first[0])
    order = np.lexsort((np.arange(n), *(-key for key in reversed(keys_most_important_first))))
    scores = np.empty(n, dtype=np.float32)
    scores[order] = np.arange(n - 1, -1, -1, dtype=np.float32)
    return scores


class PopularityBaseline:
    name = "global popularity"

    def __init__(self, items: ItemIndex, buyers: np.ndarray):
        self.items = items
        self.scores = ordinal_scores(buyers)

    def rank(self, history: CustomerChunk, k: int) -> TopK:
        rows = np.tile(self.scores, (history.n_customers, 1))
        return rank_by_scores(history, self.items, rows, k)


class SegmentPopularityBaseline:
    name = "segment popularity"

    def __init__(self, items: ItemIndex, buyers: np.ndarray, by_segment: dict[int, np.ndarray], segmenter):
        self.items = items
        self.segmenter = segmenter
        segments = sorted(by_segment)
        self.segment_row = {segment: row for row, segment in enumerate(segments)}
        # row per segment (segment buyers first, overall buyers break ties), last row: global
        self.scores = np.vstack([ordinal_scores(by_segment[s], buyers) for s in segments] + [ordinal_scores(buyers)])

    def rank(self, history: CustomerChunk, k: int) -> TopK:
        fallback = len(self.scores) - 1  # a segment unseen before the cut-off: global popularity
        rows = [self.segment_row.get(int(segment), fallback) for segment in self.segmenter(history)]
        return rank_by_scores(history, self.items, self.scores[np.asarray(rows, dtype=np.int64)], k)


@dataclass(frozen=True)
class MappingSegmenter:
    """Segments given by the caller: customer_id -> any hashable id. Unknown customers: NO_SEGMENT."""

    mapping: Mapping[str, Hashable]

    def __post_init__(self) -> None:
        codes = {value: code for code, value in enumerate(sorted(set(self.mapping.values()), key=repr))}
        object.__setattr__(self, "_codes", codes)

    @property
    def description(self) -> str:
        return f"given mapping ({len(self._codes)} segments)"

    def __call__(self, history: CustomerChunk) -> np.ndarray:
        return np.array(
            [self._codes.get(self.mapping.get(customer), NO_SEGMENT) for customer in history.customer_ids.to_pylist()],
            dtype=np.int64,
        )


@dataclass(frozen=True)
class RfmSegmenter:
    """Deterministic RFM segmentation at the cut-off: segment = 9 r + 3 f + m.

    r, f, m in {0, 1, 2} are terciles (over customers with history) of recency (days since last
    purchase), frequency (distinct purchase timestamps, i.e. orders) and monetary value (total
    spend). Customers without history before the cut-off get NO_SEGMENT.
    """

    as_of_us: int
    thresholds: np.ndarray  # 3 x (bins - 1)

    description = "RFM terciles at the cut-off (recency, frequency, monetary; 27 segments)"

    @classmethod
    def fit(cls, purchases: PurchaseSource, as_of_us: int, chunk_customers: int, bins: int = 3) -> RfmSegmenter:
        values = [customer_rfm(chunk.before(as_of_us), as_of_us) for chunk in iter_customer_chunks(purchases, chunk_customers)]
        rfm = np.concatenate(values) if values else np.zeros((0, 3))
        quantiles = np.linspace(0, 1, bins + 1)[1:-1]
        thresholds = np.quantile(rfm, quantiles, axis=0).T if len(rfm) else np.zeros((3, bins - 1))
        return cls(as_of_us=as_of_us, thresholds=thresholds)

    def __call__(self, history: CustomerChunk) -> np.ndarray:
        segment = np.full(history.n_customers, NO_SEGMENT, dtype=np.int64)
        has_history = history.customers_with_rows()
        rfm = customer_rfm(history, self.as_of_us, keep_empty=True)
        bins = self.thresholds.shape[1] + 1
        code = np.zeros(history.n_customers, dtype=np.int64)
        for dimension in range(3):
            code = code * bins + np.searchsorted(self.thresholds[dimension], rfm[:, dimension], side="right")
        segment[has_history] = code[has_history]
        return segment


def customer_rfm(history: CustomerChunk, as_of_us: int, keep_empty: bool = False) -> np.ndarray:
    """(recency days, orders, spend) per customer; only customers with history unless keep_empty."""
    n = history.n_customers
    last = np.full(n, np.iinfo(np.int64).min)
    np.maximum.at(last, history.row_customer, history.purchased_at)
    order_code = _order_codes(history.purchased_at)
    orders_customer, _, _ = distinct_pairs(history.row_customer, order_code, len(order_code) + 1)
    frequency = np.bincount(orders_customer, minlength=n)
    monetary = np.bincount(history.row_customer, weights=history.amount, minlength=n)
    has_history = frequency > 0
    recency = np.where(has_history, (as_of_us - last) / MICROS_PER_DAY, np.inf)
    rfm = np.column_stack([recency, frequency, monetary])
    return rfm if keep_empty else rfm[has_history]


def _order_codes(purchased_at: np.ndarray) -> np.ndarray:
    """Dense codes of distinct timestamps: same customer + same timestamp = one order."""
    return np.unique(purchased_at, return_inverse=True)[1].astype(np.int64)
