"""Customer segments: a k-means clustering of the pooled customer vectors.

Method (the choices, and why):

* **Space: the pooled vectors only, no RFM columns.** The vectors are unit norm, so k-means on
  them is close to cosine clustering: segments are *tastes* (what people buy). Appending
  standardized RFM would need an arbitrary weight between 3 heavy-tailed columns and 384 taste
  columns, and would make the centroids (saved for the next run) depend on this run's scaling.
  RFM describes each segment instead (profiles, and the value/loyalty part of the name).
* **Fit on a sample, assign everyone** (recsys/customer_sample.py, `SegmentModel.assign`).
  scikit-learn's MiniBatchKMeans (greedy k-means++ init, best of `n_init`, seeded), then
  `polish_steps` full Lloyd steps (KMeans), fits the sample; BLAS and OpenMP run on one thread,
  which keeps the fit deterministic and, on a busy 2-core machine, faster (many small products
  wait on each other otherwise).
* **k by silhouette** (Euclidean, on the first `silhouette_sample` customers of the sample) for
  k in [k_min, k_max]. With a previous model, its k is kept unless another k beats it by
  `k_switch_margin`: a coin-flip between two k's would otherwise reshuffle every segment.
* **Continuity.** Candidates, most stable first: the previous centroids unchanged (when k is the
  same), a Lloyd refit started from them (when k grew, the cold fit's centroids that match no
  previous one are added; Lloyd from the previous centroids stays in the previous solution's
  basin), and the best cold fit. A less stable candidate wins only if it lowers the sample inertia by
  more than `min_refit_gain` (against the unchanged centroids) or `warm_start_slack` (against the
  refit): segments move when the data moved, not because of sampling noise or another local
  optimum. Ids then follow recsys/segment_ids.py. Measured on pooled synthetic purchases (8,000
  customers, 2 % of the lines dropped, amounts +-2 %, 5 catalogs): 97.8-98.3 % of customers keep
  their id, which is what reassigning the changed vectors to unchanged centroids gives; refits
  from the previous centroids kept 93.7-98 %, and cold refits matched by the Hungarian step alone
  69-86 %.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment
from threadpoolctl import threadpool_limits

from recsys.segment_ids import SegmentModel, match_segment_ids, nearest_centroid, unit_rows


FEWEST_TO_COMPARE = 3  # customers: below this no silhouette compares two k's, so they share one segment


@dataclass(frozen=True)
class SegmentingConfig:
    k_min: int = 4
    k_max: int = 12
    seed: int = 0
    n_init: int = 3                  # cold k-means++ starts per k; the lowest inertia wins
    batch_size: int = 1024           # mini-batch k-means: customers a step
    max_epochs: int = 8              # mini-batch passes over the sample at most
    polish_steps: int = 3            # full-sample Lloyd steps after the mini-batch epochs
    max_iter: int = 100              # Lloyd iterations at most of a refit from the previous centroids
    tolerance: float = 1e-4          # scikit-learn's relative tolerance on centroid moves
    warm_start: bool = True          # also try the previous centroids as the initialization
    silhouette_sample: int = 3000
    k_switch_margin: float = 0.02    # silhouette gain needed to leave the previous k
    warm_start_slack: float = 0.03   # inertia a refit from the previous centroids may lose and still win
    min_refit_gain: float = 0.005    # inertia gain needed to move the previous centroids at all
    max_match_distance: float = 0.3  # cosine distance beyond which two centroids are different segments


@dataclass(frozen=True)
class SegmentFit:
    """The fitted model and how it was reached (all of it fit for run metadata)."""

    model: SegmentModel
    silhouette_by_k: dict[int, float]
    chosen_k: int
    k_reason: str
    init: str
    inertia: float
    kept_ids: list[int] = field(default_factory=list)
    new_ids: list[int] = field(default_factory=list)
    retired_ids: list[int] = field(default_factory=list)
    dropped_empty: int = 0

    def summary(self) -> dict:
        return {
            "k": self.model.k,
            "chosen_k": self.chosen_k,
            "k_reason": self.k_reason,
            "silhouette_by_k": {str(k): round(v, 4) for k, v in self.silhouette_by_k.items()},
            "init": self.init,
            "inertia": round(self.inertia, 4),
            "kept_ids": self.kept_ids,
            "new_ids": self.new_ids,
            "retired_ids": self.retired_ids,
            "dropped_empty_in_fit": self.dropped_empty,
        }


def fit_segments(
    sample_vectors: np.ndarray,
    previous: SegmentModel | None = None,
    config: SegmentingConfig = SegmentingConfig(),
) -> SegmentFit:
    """Choose k, fit k-means on the sample and give the centroids stable ids."""
    with threadpool_limits(limits=1):
        return _fit_segments(_checked_sample(sample_vectors, previous), previous, config)


def _fit_segments(vectors: np.ndarray, previous: SegmentModel | None, config: SegmentingConfig) -> SegmentFit:
    if len(vectors) < FEWEST_TO_COMPARE:
        scores, k = {}, 1
        reason = (f"too few customers to compare segments ({len(vectors)}; a silhouette needs {FEWEST_TO_COMPARE}):"
                  " one segment until more have bought")
        centroids, inertia, init = _one_segment(vectors)
    else:
        fits = {k: _best_fit(vectors, k, config) for k in _k_values(config, len(vectors))}
        scores = _silhouette_by_k(vectors, fits, config)
        k, reason = _choose_k(scores, previous, config)
        centroids, inertia, init = _with_warm_start(vectors, fits[k], previous, config)
    sizes = np.bincount(nearest_centroid(vectors, centroids), minlength=len(centroids))
    dropped = int((sizes == 0).sum())
    centroids, sizes = centroids[sizes > 0], sizes[sizes > 0]
    ids, kept, new, retired = match_segment_ids(centroids, sizes, previous, config.max_match_distance)
    order = np.argsort(ids)
    model = SegmentModel(ids[order], np.ascontiguousarray(centroids[order], dtype=np.float32))
    return SegmentFit(model, scores, k, reason, init, inertia, kept, new, retired, dropped)


def _one_segment(vectors: np.ndarray) -> _Fit:
    """k-means with k = 1: the mean."""
    centroid = vectors.mean(axis=0, keepdims=True, dtype=np.float64).astype(np.float32)
    return _Fit(centroid, _inertia(vectors, centroid), "the sample's mean")


def _checked_sample(sample_vectors: np.ndarray, previous: SegmentModel | None) -> np.ndarray:
    vectors = np.ascontiguousarray(sample_vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) < 1:
        raise ValueError("need a (customers x dims) sample of at least one customer")
    if not np.isfinite(vectors).all():
        raise ValueError("sample vectors must be finite")
    if previous is not None and previous.centroids.shape[1] != vectors.shape[1]:
        raise ValueError("previous centroids have another dimension than the sample")
    return vectors


def _k_values(config: SegmentingConfig, n: int) -> list[int]:
    """[k_min, k_max], clipped so that every k leaves room for a silhouette (k < customers);
    a sample too small for k_min gets the k's it can hold, down to 2."""
    top = min(config.k_max, min(n, config.silhouette_sample) - 1)
    bottom = min(max(2, config.k_min), top)
    if top < 2 or config.k_max < 2:
        raise ValueError(f"segments need k >= 2 and at least 3 customers (sample: {n})")
    return list(range(bottom, top + 1))


def _choose_k(
    scores: dict[int, float], previous: SegmentModel | None, config: SegmentingConfig
) -> tuple[int, str]:
    best = max(scores, key=lambda k: (scores[k], -k))  # ties: the smaller k
    if previous is not None and previous.k in scores and previous.k != best:
        if scores[best] < scores[previous.k] + config.k_switch_margin:
            gain = scores[best] - scores[previous.k]
            return previous.k, f"kept the previous k={previous.k} (k={best} gains only {gain:.4f})"
    return best, f"highest silhouette (k={best})"


class _Fit(NamedTuple):
    centroids: np.ndarray
    inertia: float
    init: str


def _lloyd(vectors: np.ndarray, start: np.ndarray, max_iter: int, seed: int, config: SegmentingConfig) -> np.ndarray:
    from sklearn.cluster import KMeans  # scikit-learn is imported where a fit needs it: 0.6 s off every process start

    model = KMeans(n_clusters=len(start), init=start, n_init=1, max_iter=max_iter, tol=config.tolerance,
                   random_state=seed, algorithm="lloyd")
    return model.fit(vectors).cluster_centers_.astype(np.float32)


def _best_fit(vectors: np.ndarray, k: int, config: SegmentingConfig) -> _Fit:
    """Mini-batch k-means from the best of n_init seeded k-means++ starts, then a few full Lloyd
    steps: the mini-batch centroids carry the noise of their last batches, which would move
    segment borders from run to run for no reason in the data. (Measured on a 20,000 x 384
    sample, k = 4..12: full Lloyd with 3 starts took 5.5 s, mini-batch 1.5 s.)"""
    from sklearn.cluster import MiniBatchKMeans

    fits = []
    for attempt in range(config.n_init):
        seed = _seed(config.seed, k, attempt)
        minibatch = MiniBatchKMeans(n_clusters=k, init="k-means++", n_init=1, batch_size=config.batch_size,
                                    max_iter=config.max_epochs, reassignment_ratio=0.0, random_state=seed)
        start = minibatch.fit(vectors).cluster_centers_.astype(np.float32)
        centroids = _lloyd(vectors, start, config.polish_steps, seed, config)
        fits.append(_Fit(centroids, _inertia(vectors, centroids), f"k-means++ #{attempt}, mini-batch"))
    return min(fits, key=lambda fit: fit.inertia)  # min keeps the first of equals


def _seed(seed: int, k: int, attempt: int = 0) -> int:
    """One random stream per (seed, k, attempt), so adding a k never changes the fits of the others."""
    return int(np.random.SeedSequence([seed, k, attempt]).generate_state(1)[0])


def _silhouette_by_k(
    vectors: np.ndarray, fits: Mapping[int, _Fit], config: SegmentingConfig
) -> dict[int, float]:
    """Mean silhouette of each k's fit, on a prefix of the sample (itself a uniform sample); a
    fit that puts every customer of the prefix in one segment scores 0. The distances are
    computed once for every k."""
    from sklearn.metrics import pairwise_distances, silhouette_score

    subsample = vectors[: config.silhouette_sample]
    distances = pairwise_distances(subsample)
    scores = {}
    for k, fit in fits.items():
        labels = nearest_centroid(subsample, fit.centroids)
        single = len(np.unique(labels)) < 2
        scores[k] = 0.0 if single else float(silhouette_score(distances, labels, metric="precomputed"))
    return scores


def _with_warm_start(
    vectors: np.ndarray, best: _Fit, previous: SegmentModel | None, config: SegmentingConfig
) -> _Fit:
    """Prefer continuity. Candidates, most stable first: the previous centroids as they are (same
    k only), a refit started from them, the best cold fit. A less stable candidate wins only if
    its inertia is lower by more than the margin: min_refit_gain against the unchanged
    centroids, warm_start_slack against the refit."""
    k = len(best.centroids)
    if not config.warm_start or previous is None or previous.k > k:
        return best
    start = np.vstack([previous.centroids, _unmatched(best.centroids, previous.centroids)]).astype(np.float32)
    warm = _lloyd(vectors, start, config.max_iter, _seed(config.seed, k, config.n_init), config)
    chosen = best
    if _inertia(vectors, warm) <= best.inertia * (1 + config.warm_start_slack):
        chosen = _Fit(warm, _inertia(vectors, warm), "refit from the previous centroids")
    if previous.k == k:
        unchanged = previous.centroids.astype(np.float32, copy=True)
        if _inertia(vectors, unchanged) <= chosen.inertia * (1 + config.min_refit_gain):
            chosen = _Fit(unchanged, _inertia(vectors, unchanged), "previous centroids unchanged")
    return chosen


def _unmatched(cold: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """The cold fit's centroids that no previous centroid matches (what a grown k adds)."""
    if len(cold) <= len(previous):
        return cold[:0]
    rows, _ = linear_sum_assignment(1.0 - unit_rows(cold) @ unit_rows(previous).T)
    return cold[np.setdiff1d(np.arange(len(cold)), rows)]


def _inertia(vectors: np.ndarray, centroids: np.ndarray) -> float:
    nearest = centroids[nearest_centroid(vectors, centroids)]
    return float(((vectors - nearest) ** 2).sum(dtype=np.float64))
