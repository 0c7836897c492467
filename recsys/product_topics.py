"""Categories for a catalog that has none: topics from the product text vectors.

Online Retail's order lines carry no category, so every product was "uncategorized" and segment
names could not say what a segment buys. Here the products without a category are clustered by
their text vectors (k-means, k by silhouette, deterministic seed) and each cluster is named by the words of its
product names that are most typical of it (document frequency in the cluster x inverse document
frequency over the catalog), two words per name, a third when two clusters would share a name.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

# words that say nothing about what a product is
STOPWORDS = frozenset(
    "the and for with set of in on to a an by from pack box size small large big mini new assorted "
    "design colour color colours red blue green pink white black ivory cream vintage retro".split()
)
WORD = re.compile(r"[a-z][a-z]{2,}")
MAX_TOPICS = 24
MIN_PRODUCTS_PER_TOPIC = 5
FIT_SAMPLE = 3_000  # k-means is fitted on at most this many products, then everyone is assigned


def words(name: str) -> set[str]:
    return {w for w in WORD.findall(name.lower()) if w not in STOPWORDS}


def infer_topics(product_ids: Sequence[str], vectors: np.ndarray, names: Mapping[str, str],
                 seed: int = 0) -> dict[str, str]:
    """product_id -> topic label ("Lunch & Bag") for the given products (rows of `vectors`)."""
    n = len(product_ids)
    if n == 0:
        return {}
    unit = (vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)).astype(np.float64)
    labels = _cluster(unit, seed)
    product_words = [words(names.get(pid) or "") for pid in product_ids]
    document_frequency = Counter(w for ws in product_words for w in ws)
    ranked = {c: _typical_words(product_words, labels == c, document_frequency, n) for c in np.unique(labels)}
    names_of = _unique_names(ranked)
    return {pid: names_of[labels[i]] for i, pid in enumerate(product_ids)}


def _cluster(unit: np.ndarray, seed: int) -> np.ndarray:
    """k-means labels, k in 2..24 chosen by silhouette on a deterministic sample."""
    from sklearn.cluster import KMeans  # imported where used: 0.6 s off every process start
    from sklearn.metrics import silhouette_score

    n = len(unit)
    top_k = min(MAX_TOPICS, n // MIN_PRODUCTS_PER_TOPIC)
    if top_k < 2:
        return np.zeros(n, dtype=np.int64)
    sample = unit[np.random.default_rng(seed).permutation(n)[:FIT_SAMPLE]] if n > FIT_SAMPLE else unit
    fits = [KMeans(n_clusters=k, n_init=4, random_state=seed).fit(sample) for k in range(2, top_k + 1)]
    scores = [silhouette_score(sample, fit.labels_, random_state=seed) for fit in fits]
    best = fits[int(np.argmax(scores))]
    return best.predict(unit)


def _typical_words(product_words, members: np.ndarray, document_frequency: Counter, n: int) -> list[str]:
    size = int(members.sum())
    counts = Counter(w for ws, member in zip(product_words, members) if member for w in ws)
    score = {w: (c / size) * math.log(n / document_frequency[w]) for w, c in counts.items()}
    return sorted(score, key=lambda w: (-score[w], w))


def _unique_names(ranked: Mapping[int, list[str]]) -> dict[int, str]:
    def name(terms: list[str], count: int) -> str:
        return " & ".join(t.capitalize() for t in terms[:count]) or "Other products"

    names = {c: name(terms, 2) for c, terms in ranked.items()}
    duplicates = Counter(names.values())
    names = {c: (name(ranked[c], 3) if duplicates[names[c]] > 1 else names[c]) for c in ranked}
    duplicates = Counter(names.values())
    return {c: (f"{names[c]} ({c + 1})" if duplicates[names[c]] > 1 else names[c]) for c in ranked}
