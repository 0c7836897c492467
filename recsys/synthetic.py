"""Seeded synthetic purchases with a collaborative structure, streamed in customer order.

For benchmarks and tests of the recommender (the landing-data generator lives in generator/).
Products belong to `topics` (product p is in topic p mod topics); each customer prefers one
topic and buys from it with probability `topic_affinity`, otherwise from the whole catalog;
within either, product rank follows a Zipf-like law, so a few products dominate like in real
retail. About `lines_per_customer` lines per customer, timestamps uniform over `days` days.
Customer ids are zero-padded so that generation order is sorted order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa

from recsys.purchases import to_micros


@dataclass(frozen=True)
class SyntheticRetail:
    customers: int = 10_000
    products: int = 2_000
    topics: int = 40
    lines_per_customer: float = 10.0
    topic_affinity: float = 0.7
    zipf_exponent: float = 1.1
    in_stock_share: float = 0.95
    start: datetime = datetime(2024, 1, 1)
    days: int = 365
    seed: int = 7
    batch_customers: int = 50_000

    @property
    def end(self) -> datetime:
        return self.start + timedelta(days=self.days)

    def product_ids(self) -> pa.Array:
        return pa.array([f"P{p:06d}" for p in range(self.products)])

    def catalog(self) -> pa.Table:
        rng = np.random.default_rng([self.seed, 1])
        return pa.table(
            {
                "product_id": self.product_ids(),
                "in_stock": pa.array(rng.random(self.products) < self.in_stock_share),
                "price": pa.array(np.round(rng.lognormal(1.5, 0.8, self.products), 2)),
            }
        )

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The purchases, grouped (and sorted) by customer_id, one batch per block of customers."""
        prices = self.catalog()["price"].to_numpy()
        product_ids = self.product_ids()
        for first in range(0, self.customers, self.batch_customers):
            count = min(self.batch_customers, self.customers - first)
            yield self._batch(first, count, prices, product_ids)

    def __call__(self) -> Iterator[pa.RecordBatch]:  # a re-readable PurchaseSource
        return self.batches()

    def _batch(self, first: int, count: int, prices: np.ndarray, product_ids: pa.Array) -> pa.RecordBatch:
        rng = np.random.default_rng([self.seed, 2, first])
        lines = 1 + rng.poisson(self.lines_per_customer - 1, count)
        row_customer = np.repeat(np.arange(count), lines)
        topic = rng.integers(0, self.topics, count)[row_customer]
        product = self._products(rng, topic)
        quantity = rng.integers(1, 6, len(product))
        seconds = rng.integers(0, self.days * 86_400, len(product))
        customer_ids = pa.array([f"C{first + c:09d}" for c in range(count)])
        start_us = to_micros(self.start)
        return pa.RecordBatch.from_arrays(
            [
                customer_ids.take(pa.array(row_customer)),
                product_ids.take(pa.array(product)),
                pa.array(prices[product] * quantity),
                pa.array(start_us + seconds * 1_000_000, type=pa.int64()).cast(pa.timestamp("us")),
            ],
            names=["customer_id", "product_id", "amount", "purchased_at"],
        )

    def _products(self, rng: np.random.Generator, topic: np.ndarray) -> np.ndarray:
        per_topic = self.products // self.topics
        in_topic = rng.random(len(topic)) < self.topic_affinity
        rank_in_topic = _zipf_ranks(rng, len(topic), per_topic, self.zipf_exponent)
        rank_overall = _zipf_ranks(rng, len(topic), self.products, self.zipf_exponent)
        return np.where(in_topic, topic + self.topics * rank_in_topic, rank_overall)


def _zipf_ranks(rng: np.random.Generator, size: int, n: int, exponent: float) -> np.ndarray:
    """Ranks 0 .. n-1 with P(rank r) proportional to (r + 1) ** -exponent (inverse-CDF draw)."""
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(weights)
    return np.minimum(np.searchsorted(cdf, rng.random(size) * cdf[-1]), n - 1)
