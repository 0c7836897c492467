"""Who buys what: latent customer taste, so that a recommender has a real signal to find.

Each customer has a favourite style and three (category, style) "slots" with weights. An item is
bought from one of the slots (sometimes in another style of that category), or, now and then, at
random by global popularity. Inside a (category, style) group products follow a Zipf law. So
customers who share slots buy the same products (collaborative filtering beats global popularity
on held-out purchases), and styles link products across categories (co-purchase structure).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from generator.catalog import CATEGORY_NAMES, N_GROUPS, Catalog
from generator.randomness import integers, uniform, zipf_cdf
from generator.vocab import STYLES

SLOTS = 3
EXPLORE_SHARE = 0.08  # items bought outside the customer's taste, by global popularity
STYLE_LOYALTY = 0.8  # items of a slot's category bought in the slot's style
MAIN_STYLE_SHARE = 0.6  # slots that use the customer's favourite style
PRODUCT_ZIPF = 1.1  # popularity inside a group
CATEGORY_ZIPF = 0.7  # popularity of categories
QUANTITIES = np.array([1, 1, 1, 1, 2, 2, 3, 4, 6, 12])
SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class Purchases:
    """Purchase items of a set of customers, grouped by customer (counts give the grouping)."""

    customer: np.ndarray  # customer index of each item
    item_no: np.ndarray  # position of the item in its customer's list, from 0
    counts: np.ndarray  # items per customer, in the order of the customers asked for
    product: np.ndarray  # catalog index
    quantity: np.ndarray
    amount: np.ndarray
    at: np.ndarray  # epoch seconds


class ProductSampler:
    """Draws a product of a (category, style) group by Zipf rank, in one vectorized search."""

    def __init__(self, catalog: Catalog, excluded: np.ndarray):
        products = np.arange(catalog.initial_size)
        group, rank = catalog.group[products], catalog.rank[products]
        weight = 1.0 / (rank + 1.0) ** PRODUCT_ZIPF
        weight = np.where(excluded, 0.0, weight)  # a group left empty hands its buyers to the next one
        order = np.lexsort((rank, group))
        self.products = products[order]
        sorted_group, sorted_weight = group[order], weight[order]
        totals = np.bincount(sorted_group, weights=sorted_weight, minlength=N_GROUPS)
        with np.errstate(invalid="ignore", divide="ignore"):
            within = np.nan_to_num(_cumsum_by_group(sorted_group, sorted_weight) / totals[sorted_group])
        # Keys rise from g to g+1 inside group g, so one searchsorted finds group and rank at once.
        self.keys = sorted_group + within
        last_of_group = np.r_[sorted_group[1:] != sorted_group[:-1], True]
        self.keys[last_of_group] = sorted_group[last_of_group] + 1.0  # exact, whatever the rounding
        self.has_products = totals > 0

    def sample(self, group: np.ndarray, u: np.ndarray) -> np.ndarray:
        group = self._nearest_stocked(group)
        position = np.searchsorted(self.keys, group + u, side="right")
        return self.products[np.minimum(position, len(self.products) - 1)]

    def _nearest_stocked(self, group: np.ndarray) -> np.ndarray:
        """Tiny catalogs or excluded products leave some groups empty: their buyers take the next group."""
        if self.has_products.all():
            return group
        stocked = np.flatnonzero(self.has_products)
        return stocked[np.searchsorted(stocked, group) % len(stocked)]


class TasteModel:
    def __init__(self, seed: int, catalog: Catalog, excluded_products: np.ndarray):
        self.seed = seed
        self.sampler = ProductSampler(catalog, excluded_products)
        self.category_cdf = zipf_cdf(len(CATEGORY_NAMES), CATEGORY_ZIPF)

    def slots(self, customers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each customer's (category, style) groups and the cumulative weights of choosing them."""
        seed = self.seed
        slot = np.arange(SLOTS)[None, :]
        who = customers[:, None]
        category = np.searchsorted(self.category_cdf, uniform(seed, "taste:category", who, slot), side="right")
        main_style = integers(seed, "taste:main_style", len(STYLES), customers)[:, None]
        own_style = integers(seed, "taste:slot_style", len(STYLES), who, slot)
        style = np.where(uniform(seed, "taste:use_main", who, slot) < MAIN_STYLE_SHARE, main_style, own_style)
        weight = 0.15 + uniform(seed, "taste:weight", who, slot) ** 2
        cumulative = np.cumsum(weight, axis=1) / weight.sum(axis=1, keepdims=True)
        return category * len(STYLES) + style, cumulative

    def items(self, customers: np.ndarray, counts: np.ndarray, day_key: int) -> tuple[np.ndarray, np.ndarray]:
        """Products for `counts[i]` items of each customer; day_key separates the draws of each day."""
        seed = self.seed
        local = np.repeat(np.arange(len(customers)), counts)
        customer = customers[local]
        item_no = np.arange(len(local)) - np.repeat(np.cumsum(counts) - counts, counts)
        groups, cumulative = self.slots(customers)
        keys = (day_key, customer, item_no)
        chosen = (uniform(seed, "item:slot", *keys)[:, None] > cumulative[local, :-1]).sum(axis=1)
        group = groups[local, chosen]
        other_style = integers(seed, "item:other_style", len(STYLES), *keys)
        group = np.where(uniform(seed, "item:style", *keys) < STYLE_LOYALTY, group,
                         (group // len(STYLES)) * len(STYLES) + other_style)
        explore = uniform(seed, "item:explore", *keys) < EXPLORE_SHARE
        random_group = np.searchsorted(self.category_cdf, uniform(seed, "item:random_cat", *keys), side="right")
        random_group = random_group * len(STYLES) + integers(seed, "item:random_style", len(STYLES), *keys)
        group = np.where(explore, random_group, group)
        return self.sampler.sample(group, uniform(seed, "item:rank", *keys)), item_no


def item_counts(seed: int, stream: str, mean: float, *keys: np.ndarray | int) -> np.ndarray:
    """Items per customer: 1 + geometric, so most buy a few things and some buy a lot."""
    u = np.maximum(uniform(seed, stream, *keys), 1e-12)
    if mean <= 1:
        return np.ones(u.shape, dtype=np.int64)
    return 1 + np.floor(np.log(u) / np.log1p(-1.0 / mean)).astype(np.int64)


def build_purchases(
    model: TasteModel, catalog: Catalog, customers: np.ndarray, counts: np.ndarray, day_key: int,
    first_second: np.ndarray | int, span_seconds: np.ndarray | int,
) -> Purchases:
    """Items with product, quantity, amount and a time in [first_second, first_second + span)."""
    product, item_no = model.items(customers, counts, day_key)
    customer = np.repeat(customers, counts)
    keys = (day_key, customer, item_no)
    quantity = QUANTITIES[integers(model.seed, "item:quantity", len(QUANTITIES), *keys)]
    amount = np.round(quantity * catalog.base_price[product], 2)
    start = np.repeat(np.broadcast_to(first_second, customers.shape), counts)
    span = np.repeat(np.broadcast_to(span_seconds, customers.shape), counts)
    at = start + np.floor(uniform(model.seed, "item:time", *keys) * span).astype(np.int64)
    return Purchases(customer, item_no, counts, product, quantity, amount, (at // 60) * 60)


def _cumsum_by_group(group: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Running sum of weights that restarts at every group (rows sorted by group)."""
    running = np.cumsum(weight)
    starts = np.r_[0, np.flatnonzero(group[1:] != group[:-1]) + 1]
    before = np.repeat(running[starts] - weight[starts], np.diff(np.r_[starts, len(group)]))
    return running - before

