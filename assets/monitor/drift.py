"""Population Stability Index between two distributions given as counts."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

# Empty bins get this share instead of 0, so the log stays finite (the usual PSI convention).
EMPTY_BIN_SHARE = 1e-4


def _shares(counts: Sequence[float]) -> list[float]:
    total = float(sum(counts))
    return [max(c / total, EMPTY_BIN_SHARE) for c in counts]


def psi(expected: Sequence[float], actual: Sequence[float]) -> float | None:
    """PSI of `actual` against `expected` (same bins); None when either side is empty or the bins differ."""
    if len(expected) != len(actual) or not expected or sum(expected) <= 0 or sum(actual) <= 0:
        return None
    if any(c < 0 for c in (*expected, *actual)):
        return None
    return sum((a - e) * math.log(a / e) for e, a in zip(_shares(expected), _shares(actual)))


def psi_of_categories(expected: Mapping[str, float], actual: Mapping[str, float]) -> float | None:
    """PSI over the union of categories (a category absent on one side counts 0 there)."""
    categories = sorted(set(expected) | set(actual), key=str)
    return psi([expected.get(c, 0) for c in categories], [actual.get(c, 0) for c in categories])
