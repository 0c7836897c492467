"""The product catalog: ids, realistic names and descriptions by category and style, prices, stock.

Products are laid out in (category, style) groups with a Zipf popularity inside each group; the
groups are what gives purchases their co-purchase structure (see purchases.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from generator import text
from generator.config import GeneratorConfig
from generator.randomness import integers, uniform
from generator.vocab import CATEGORIES, DESCRIPTION_CLOSINGS, DESCRIPTION_OPENINGS, FINISHES, STYLES

CATEGORY_NAMES = list(CATEGORIES)
N_GROUPS = len(CATEGORY_NAMES) * len(STYLES)
FIRST_PRODUCT_CODE = 10_000  # five-digit codes, like Online Retail stock codes
UNKNOWN_PRODUCT_CODE = 900_000  # six-digit codes are never issued: the unknown-product fault uses them
OUT_OF_STOCK_SHARE = 0.07
DAILY_UPDATE_SHARE = 0.01  # catalog rows re-sent on a later day with a new price or stock level


@dataclass(frozen=True)
class Catalog:
    """Every product that will exist over the generated days (index = position in these arrays)."""

    seed: int
    initial_size: int
    new_per_day: int
    category: np.ndarray
    style: np.ndarray
    rank: np.ndarray  # popularity rank inside the (category, style) group, 0 = most popular
    base_price: np.ndarray

    @property
    def size(self) -> int:
        return len(self.category)

    @property
    def group(self) -> np.ndarray:
        return self.category * len(STYLES) + self.style

    def introduced_on(self, day_index: int) -> np.ndarray:
        """Indices of the products first listed on that day (the whole initial catalog on day 0)."""
        if day_index == 0:
            return np.arange(self.initial_size)
        start = self.initial_size + (day_index - 1) * self.new_per_day
        return np.arange(start, start + self.new_per_day)

    def updated_on(self, day_index: int) -> np.ndarray:
        """Existing products re-sent on a later day with a new price or stock level."""
        if day_index == 0:
            return np.arange(0)
        existing = np.arange(self.initial_size + (day_index - 1) * self.new_per_day)
        return existing[uniform(self.seed, "catalog:update", day_index, existing) < DAILY_UPDATE_SHARE]


def build_catalog(config: GeneratorConfig) -> Catalog:
    initial = config.catalog_size
    new_per_day = max(1, initial // 200)
    index = np.arange(initial + new_per_day * max(config.days - 1, 0))
    group = index % N_GROUPS
    category = group // len(STYLES)
    base = np.array([CATEGORIES[name]["price"] for name in CATEGORY_NAMES])[category]
    spread = np.exp(0.45 * _normal(config.seed, "catalog:price", index))
    price = np.maximum(np.round(base * spread, 2), 0.29)
    return Catalog(config.seed, initial, new_per_day, category, group % len(STYLES), index // N_GROUPS, price)


def product_codes(index: np.ndarray) -> pa.Array:
    return text.numbers(index + FIRST_PRODUCT_CODE)


def product_names(catalog: Catalog, index: np.ndarray) -> pa.Array:
    """"Vintage Enamel Mug": style, finish and a noun of the product's category."""
    noun = _nouns(catalog, index)
    finish = text.words(FINISHES, integers(catalog.seed, "catalog:finish", len(FINISHES), index))
    return text.join_fields(text.words(STYLES, catalog.style[index]), finish, noun, separator=" ")


def product_descriptions(catalog: Catalog, index: np.ndarray) -> pa.Array:
    """A sentence in a shop's voice; it contains commas, as real descriptions do."""
    seed = catalog.seed
    opening = text.words(DESCRIPTION_OPENINGS, integers(seed, "catalog:opening", len(DESCRIPTION_OPENINGS), index))
    style = text.words([s.lower() for s in STYLES], catalog.style[index])
    noun = pa.compute.utf8_lower(_nouns(catalog, index))
    finish = text.words([f.lower() for f in FINISHES], integers(seed, "catalog:finish", len(FINISHES), index))
    use = _per_category_words(catalog, index, "uses", "catalog:use")
    closing = text.words(DESCRIPTION_CLOSINGS, integers(seed, "catalog:closing", len(DESCRIPTION_CLOSINGS), index))
    return text.concat(opening, " ", style, " ", noun, " in ", finish, ", perfect for ", use, ". ", closing)


def categories(catalog: Catalog, index: np.ndarray) -> pa.Array:
    return text.words(CATEGORY_NAMES, catalog.category[index])


def prices_on(catalog: Catalog, index: np.ndarray, day_index: int) -> np.ndarray:
    """The listed price: the base price on the first listing, moved by up to 10 % on a re-listing."""
    change = 1.0 + 0.2 * (uniform(catalog.seed, "catalog:reprice", day_index, index) - 0.5)
    moved = np.maximum(np.round(catalog.base_price[index] * change, 2), 0.29)
    return np.where(day_index == 0, catalog.base_price[index], moved)


def in_stock_on(catalog: Catalog, index: np.ndarray, day_index: int) -> np.ndarray:
    return uniform(catalog.seed, "catalog:stock", day_index, index) >= OUT_OF_STOCK_SHARE


def _nouns(catalog: Catalog, index: np.ndarray) -> pa.Array:
    return _per_category_words(catalog, index, "nouns", "catalog:noun")


def _per_category_words(catalog: Catalog, index: np.ndarray, kind: str, stream: str) -> pa.Array:
    """One word of the product's own category list (lists differ in length per category)."""
    lists = [CATEGORIES[name][kind] for name in CATEGORY_NAMES]
    flat = [word for words in lists for word in words]
    starts = np.cumsum([0] + [len(words) for words in lists[:-1]])
    lengths = np.array([len(words) for words in lists])
    category = catalog.category[index]
    return text.words(flat, starts[category] + integers(catalog.seed, stream, lengths[category], index))


def _normal(seed: int, stream: str, index: np.ndarray) -> np.ndarray:
    """Standard normal draws (Box-Muller on two counter-based uniforms)."""
    u1 = np.maximum(uniform(seed, stream + ":1", index), 1e-12)
    u2 = uniform(seed, stream + ":2", index)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
