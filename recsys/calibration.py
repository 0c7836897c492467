"""Score -> probability: isotonic regression fitted on a held-out time window.

Raw ranking scores have no unit. Confidence must mean something, so it is the empirical hit
probability of recommendations with that score, measured on a validation window: fit the
monotone (non-decreasing) step function that best fits the 0/1 outcomes (pool adjacent
violators), then interpolate linearly between the pooled blocks. The result is in [0, 1] by
construction and never reorders the recommendations of one customer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class IsotonicCalibrator:
    """Piecewise-linear monotone map through (block mean score, block hit rate) points."""

    score_knots: np.ndarray
    probability_knots: np.ndarray
    samples: int

    @classmethod
    def fit(cls, scores: np.ndarray, hits: np.ndarray) -> IsotonicCalibrator | None:
        """None when there is nothing to learn from (no samples)."""
        scores = np.asarray(scores, dtype=np.float64)
        hits = np.asarray(hits, dtype=np.float64)
        if scores.size == 0:
            return None
        order = np.lexsort((hits, scores))  # deterministic order for equal scores
        block_scores, block_rates = _pool_adjacent_violators(scores[order], hits[order])
        return cls(score_knots=block_scores, probability_knots=block_rates, samples=int(scores.size))

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        probabilities = np.interp(np.asarray(scores, dtype=np.float64), self.score_knots, self.probability_knots)
        return np.clip(probabilities, 0.0, 1.0)

    def to_dict(self) -> dict:
        return {
            "samples": self.samples,
            "knots": len(self.score_knots),
            "min_probability": float(self.probability_knots[0]),
            "max_probability": float(self.probability_knots[-1]),
        }


def _pool_adjacent_violators(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of the isotonic fit of y on sorted x: (weighted mean x, mean y) per block.

    Equal x values are pooled first so the fit is a function of the score alone.
    """
    unique_x, start = np.unique(x, return_index=True)
    counts = np.diff(np.append(start, len(x))).astype(np.float64)
    sums_y = np.add.reduceat(y, start)
    sums_x = unique_x * counts
    # stack of blocks: (sum_x, sum_y, count); merge while the previous mean exceeds the new one
    block_x, block_y, block_n = [], [], []
    for sx, sy, n in zip(sums_x, sums_y, counts):
        block_x.append(sx), block_y.append(sy), block_n.append(n)
        while len(block_n) > 1 and block_y[-2] * block_n[-1] >= block_y[-1] * block_n[-2]:
            sy_last, sx_last, n_last = block_y.pop(), block_x.pop(), block_n.pop()
            block_y[-1] += sy_last
            block_x[-1] += sx_last
            block_n[-1] += n_last
    n = np.asarray(block_n)
    return np.asarray(block_x) / n, np.asarray(block_y) / n
