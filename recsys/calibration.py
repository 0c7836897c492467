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
from sklearn.isotonic import IsotonicRegression


@dataclass(frozen=True)
class IsotonicCalibrator:
    """A monotone map from score to hit probability, fitted on (score, hit) samples."""

    model: IsotonicRegression
    samples: int

    @classmethod
    def fit(cls, scores: np.ndarray, hits: np.ndarray) -> IsotonicCalibrator | None:
        """None when there is nothing to learn from (no samples)."""
        scores = np.asarray(scores, dtype=np.float64)
        if scores.size == 0:
            return None
        model = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        model.fit(scores, np.asarray(hits, dtype=np.float64))
        return cls(model=model, samples=int(scores.size))

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        return np.clip(self.model.predict(np.asarray(scores, dtype=np.float64)), 0.0, 1.0)

    def to_dict(self) -> dict:
        knots = self.model.y_thresholds_
        return {
            "samples": self.samples,
            "knots": len(knots),
            "min_probability": float(knots[0]),
            "max_probability": float(knots[-1]),
        }
