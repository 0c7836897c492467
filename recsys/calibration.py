"""Score -> probability: isotonic regression fitted on a held-out time window.

Raw ranking scores have no unit. Confidence must mean something, so it is the empirical hit
probability of recommendations with that score, measured on a validation window: scikit-learn's
IsotonicRegression fits the monotone (non-decreasing) step function that best fits the 0/1
outcomes (equal scores pooled first, so it is a function of the score alone) and interpolates
linearly between its knots. The result is in [0, 1] by construction and never reorders the
recommendations of one customer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class IsotonicCalibrator:
    """A monotone map from score to hit probability, fitted on (score, hit) samples.

    It keeps only the fitted knots and interpolates them as IsotonicRegression.predict does
    (linear, clipped at the ends): a stored model loads without scikit-learn, whose import
    (0.6 s) every process of a run paid at start."""

    x: np.ndarray  # knots: scores, ascending
    y: np.ndarray  # and their probabilities, non-decreasing
    samples: int

    @classmethod
    def fit(cls, scores: np.ndarray, hits: np.ndarray) -> IsotonicCalibrator | None:
        """None when there is nothing to learn from (no samples)."""
        from sklearn.isotonic import IsotonicRegression  # only fitting needs it

        scores = np.asarray(scores, dtype=np.float64)
        if scores.size == 0:
            return None
        model = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        model.fit(scores, np.asarray(hits, dtype=np.float64))
        return cls(x=model.X_thresholds_, y=model.y_thresholds_, samples=int(scores.size))

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        return np.clip(np.interp(np.asarray(scores, dtype=np.float64), self.x, self.y), 0.0, 1.0)

    def to_dict(self) -> dict:
        knots = self.y
        return {
            "samples": self.samples,
            "knots": len(knots),
            "min_probability": float(knots[0]),
            "max_probability": float(knots[-1]),
        }


@dataclass(frozen=True)
class ActivityGroups:
    """Customers in 3 x 3 groups: terciles of recency (days since the last purchase) and of
    frequency (orders), as measured on the calibration sample. Within a customer, rank decides;
    across customers, how recently and how often they buy decides whether they buy at all."""

    recency_edges: np.ndarray  # 2 ascending thresholds
    frequency_edges: np.ndarray

    @classmethod
    def fit(cls, recency: np.ndarray, frequency: np.ndarray) -> ActivityGroups:
        known = np.isfinite(recency)
        if not known.any():
            return cls(np.array([np.inf, np.inf]), np.array([np.inf, np.inf]))
        return cls(np.quantile(recency[known], [1 / 3, 2 / 3]), np.quantile(frequency[known], [1 / 3, 2 / 3]))

    def __call__(self, recency: np.ndarray, frequency: np.ndarray) -> np.ndarray:
        r = np.searchsorted(self.recency_edges, recency, side="right")
        f = np.searchsorted(self.frequency_edges, frequency, side="right")
        return (3 * r + f).astype(np.int64)


@dataclass(frozen=True)
class GroupedCalibrator:
    """Score -> probability within each activity group (isotonic, as above); a group with too
    few validation samples or hits uses the calibrator fitted on all of them."""

    groups: ActivityGroups
    by_group: dict[int, IsotonicCalibrator]
    overall: IsotonicCalibrator

    MIN_SAMPLES = 500
    MIN_HITS = 10

    @classmethod
    def fit(cls, scores: np.ndarray, hits: np.ndarray, recency: np.ndarray, frequency: np.ndarray
            ) -> GroupedCalibrator | None:
        overall = IsotonicCalibrator.fit(scores, hits)
        if overall is None:
            return None
        groups = ActivityGroups.fit(recency, frequency)
        group = groups(recency, frequency)
        by_group = {}
        for value in np.unique(group):
            rows = group == value
            if rows.sum() >= cls.MIN_SAMPLES and hits[rows].sum() >= cls.MIN_HITS:
                by_group[int(value)] = IsotonicCalibrator.fit(scores[rows], hits[rows])
        return cls(groups, by_group, overall)

    def __call__(self, scores: np.ndarray, recency: np.ndarray, frequency: np.ndarray) -> np.ndarray:
        group = self.groups(recency, frequency)
        probability = self.overall(scores)
        for value, calibrator in self.by_group.items():
            rows = group == value
            if rows.any():
                probability[rows] = calibrator(scores[rows])
        return probability

    def to_dict(self) -> dict:
        return {**self.overall.to_dict(), "groups_with_own_calibrator": len(self.by_group),
                "recency_edges_days": [round(float(e), 2) for e in self.groups.recency_edges],
                "frequency_edges_orders": [round(float(e), 2) for e in self.groups.frequency_edges],
                "max_probability_by_group": {g: round(float(c.y[-1]), 5)
                                             for g, c in sorted(self.by_group.items())}}
