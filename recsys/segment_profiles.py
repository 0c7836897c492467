"""Segment profiles: size, RFM statistics, top products and top categories of each segment.

Sizes and products are accumulated chunk by chunk while customers are assigned, in memory
bounded by segments x catalog. RFM is not computed here: it is defined once, in
sql/customer_features.sql, and its per-segment means and medians come in as `RfmSummary`s
(assets/infer/segments.py aggregates that table by segment).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from recsys.segment_names import UNCATEGORIZED, fallback_names



@dataclass(frozen=True)
class RfmSummary:
    """Means and medians of recency (days), frequency (purchase days) and monetary value."""

    recency_days_mean: float
    recency_days_median: float
    frequency_mean: float
    frequency_median: float
    monetary_mean: float
    monetary_median: float

    def medians(self) -> dict[str, float]:
        return {"recency_days": self.recency_days_median, "frequency": self.frequency_median,
                "monetary": self.monetary_median}


@dataclass(frozen=True)
class SegmentProfile:
    segment_id: int
    size: int
    share: float                 # of all assigned customers
    recency_days_mean: float
    recency_days_median: float
    frequency_mean: float        # distinct purchase days
    frequency_median: float
    monetary_mean: float
    monetary_median: float
    top_products: tuple[tuple[str, int], ...]        # (product id, buyers in the segment)
    top_categories: tuple[tuple[str, float], ...]    # (category, share of the segment's spend)
    name: str

    def as_dict(self) -> dict:
        return asdict(self)


class SegmentProfiler:
    """Sizes and product statistics accumulated chunk by chunk (memory: segments x catalog).

    `product_ids` are the columns of the chunks' `product_spend` (ProductEmbeddings.product_ids).
    """

    def __init__(self, segment_ids: Sequence[int] | np.ndarray, product_ids: pa.Array):
        self.segment_ids = np.sort(np.asarray(segment_ids, dtype=np.int64))
        self.product_ids = product_ids
        k, n_products = len(self.segment_ids), len(product_ids)
        self._sizes = np.zeros(k, dtype=np.int64)
        self._buyers = np.zeros((k, n_products), dtype=np.int64)
        self._spend = np.zeros((k, n_products))

    def add(self, segment_of_customer: np.ndarray, product_spend: sp.csr_matrix | None = None) -> None:
        """Count a chunk of customers (their segment ids, and their spend per product)."""
        rows = self._rows(segment_of_customer)
        self._sizes += np.bincount(rows, minlength=len(self.segment_ids))
        if product_spend is not None:
            self._add_products(rows, product_spend)

    def _rows(self, segment_of_customer: np.ndarray) -> np.ndarray:
        labels = np.asarray(segment_of_customer, dtype=np.int64)
        rows = np.searchsorted(self.segment_ids, labels).clip(max=max(len(self.segment_ids) - 1, 0))
        if len(labels) and (not len(self.segment_ids) or (self.segment_ids[rows] != labels).any()):
            raise ValueError("segment labels not in the profiler's segment ids")
        return rows

    def _add_products(self, rows: np.ndarray, product_spend: sp.csr_matrix) -> None:
        spend = sp.csr_matrix(product_spend)
        spend.sum_duplicates()  # one entry per (customer, product): an entry is one buyer
        entry_rows = np.repeat(rows, np.diff(spend.indptr))
        flat = entry_rows * spend.shape[1] + spend.indices
        size = self._buyers.size
        self._buyers += np.bincount(flat, minlength=size).reshape(self._buyers.shape)
        self._spend += np.bincount(flat, weights=spend.data, minlength=size).reshape(self._spend.shape)

    @property
    def sizes(self) -> dict[int, int]:
        """Customers per segment id, empty segments included (see drop_empty_segments)."""
        return dict(zip(self.segment_ids.tolist(), self._sizes.tolist()))

    def profiles(self, rfm: Mapping[int, RfmSummary], everyone: RfmSummary,
                 category_of: Mapping[str, str] | None = None, top_n: int = 5) -> list[SegmentProfile]:
        """One profile per non-empty segment, by id, each with its deterministic name.

        `rfm` holds each segment's RFM summary and `everyone` that of all assigned customers;
        `category_of` maps product id -> category; products it lacks count as "uncategorized".
        """
        categories, codes = self._category_codes(category_of)
        category_spend = np.zeros((len(self.segment_ids), len(categories)))
        for row, spend in enumerate(self._spend):
            category_spend[row] = np.bincount(codes, weights=spend, minlength=len(categories))
        total = max(int(self._sizes.sum()), 1)
        drafts = [
            self._profile(row, segment_id, total, rfm[segment_id], categories, category_spend[row], top_n)
            for row, segment_id in enumerate(self.segment_ids.tolist())
            if self._sizes[row] > 0
        ]
        global_shares = _shares_by_category(categories, category_spend.sum(axis=0))
        names = fallback_names(drafts, everyone.medians(), global_shares, category_of is not None)
        return [replace(profile, name=names[profile.segment_id]) for profile in drafts]

    def _category_codes(self, category_of: Mapping[str, str] | None) -> tuple[list[str], np.ndarray]:
        mapping = category_of or {}
        labels = [mapping.get(pid) or UNCATEGORIZED for pid in self.product_ids.to_pylist()]
        categories, codes = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
        return categories.tolist(), codes

    def _profile(self, row: int, segment_id: int, total: int, rfm: RfmSummary, categories: list[str],
                 category_spend: np.ndarray, top_n: int) -> SegmentProfile:
        size = int(self._sizes[row])
        return SegmentProfile(
            segment_id=segment_id,
            size=size,
            share=size / total,
            **asdict(rfm),
            top_products=self._top_products(row, top_n),
            top_categories=_top_shares(categories, category_spend, top_n),
            name="",
        )

    def _top_products(self, row: int, top_n: int) -> tuple[tuple[str, int], ...]:
        buyers, spend = self._buyers[row], self._spend[row]
        bought = np.flatnonzero(buyers)
        order = bought[np.lexsort((bought, -spend[bought], -buyers[bought]))][:top_n]
        return tuple((self.product_ids[int(i)].as_py(), int(buyers[i])) for i in order)


def _shares_by_category(categories: list[str], spend: np.ndarray) -> dict[str, float]:
    whole = spend.sum()
    return {c: (float(v / whole) if whole > 0 else 0.0) for c, v in zip(categories, spend)}


def _top_shares(categories: list[str], spend: np.ndarray, top_n: int) -> tuple[tuple[str, float], ...]:
    whole = spend.sum()
    if whole <= 0:
        return ()
    order = sorted(range(len(categories)), key=lambda i: (-spend[i], categories[i]))
    return tuple((categories[i], float(spend[i] / whole)) for i in order[:top_n] if spend[i] > 0)
