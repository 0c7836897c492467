"""Top-K ranking metrics, accumulated chunk by chunk.

For an evaluated customer u with relevant set T_u (products bought in the test window, new to u,
and recommendable: in the candidate catalog) and top-K list L_u:
- hit rate@K   = mean over u of [ |L_u ∩ T_u| > 0 ]
- precision@K  = mean of |L_u ∩ T_u| / K  (K, even when fewer than K were recommended)
- recall@K     = mean of |L_u ∩ T_u| / |T_u|
- NDCG@K       = mean of DCG / IDCG, DCG = sum over hits of 1 / log2(rank + 1),
                 IDCG = sum over ranks 1 .. min(|T_u|, K) of 1 / log2(rank + 1)
- coverage     = distinct products recommended to evaluated customers / candidate products

`paired_ratio_interval`: a 95 % interval of one method's hit rate over another's on the same
customers (the delta method for a ratio of paired means: their covariance counts).
`paired_difference_margin`: 1.96 standard errors of the difference of two hit rates on the same
customers (the standard error of the per-customer differences' mean).
"""

from __future__ import annotations

import numpy as np


class RankingMetrics:
    """Sums of per-customer metrics; items are positions in a candidate list of n_candidates."""

    def __init__(self, k: int, n_candidates: int):
        self.k = k
        self.n_candidates = n_candidates
        self.customers = 0
        self.hit_customers = 0
        self.precision_sum = 0.0
        self.recall_sum = 0.0
        self.ndcg_sum = 0.0
        self.recommended = np.zeros(n_candidates, dtype=bool)
        self._hits: list[np.ndarray] = []  # per evaluated customer, in order: a hit in the top K
        self._ideal = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))])

    def add(
        self,
        n_customers: int,
        rec_customer: np.ndarray,
        rec_item: np.ndarray,
        rec_rank: np.ndarray,
        truth_customer: np.ndarray,
        truth_item: np.ndarray,
    ) -> None:
        """One chunk: customers 0 .. n_customers-1, each with at least one truth item.

        rec_rank is 1-based; recommendations beyond rank K are ignored.
        """
        top = rec_rank <= self.k
        rec_customer, rec_item, rec_rank = rec_customer[top], rec_item[top], rec_rank[top]
        hit = _is_member(rec_customer, rec_item, truth_customer, truth_item, self.n_candidates)
        hits = np.bincount(rec_customer[hit], minlength=n_customers)
        dcg = np.bincount(rec_customer[hit], weights=1.0 / np.log2(rec_rank[hit] + 1.0), minlength=n_customers)
        relevant = np.bincount(truth_customer, minlength=n_customers)
        if (relevant == 0).any():
            raise ValueError("every evaluated customer needs at least one relevant item")
        self.customers += n_customers
        self.hit_customers += int(np.count_nonzero(hits))
        self._hits.append(hits > 0)
        self.precision_sum += float((hits / self.k).sum())
        self.recall_sum += float((hits / relevant).sum())
        self.ndcg_sum += float((dcg / self._ideal[np.minimum(relevant, self.k)]).sum())
        self.recommended[rec_item] = True

    def hit_vector(self) -> np.ndarray:
        """Per evaluated customer, in the order added: whether the top K holds a hit."""
        return np.concatenate(self._hits) if self._hits else np.zeros(0, dtype=bool)

    def summary(self) -> dict:
        n = max(self.customers, 1)
        k = self.k
        return {
            "customers": self.customers,
            f"hit_rate@{k}": round(self.hit_customers / n, 4),
            f"precision@{k}": round(self.precision_sum / n, 4),
            f"recall@{k}": round(self.recall_sum / n, 4),
            f"ndcg@{k}": round(self.ndcg_sum / n, 4),
            "coverage": round(float(self.recommended.mean()) if self.n_candidates else 0.0, 4),
        }


def paired_ratio_interval(ours: np.ndarray, theirs: np.ndarray, z: float = 1.96) -> list[float] | None:
    """[low, high] of mean(ours) / mean(theirs) over the same customers (None: too few, or 0 hits)."""
    n = len(ours)
    if n < 2 or len(theirs) != n or not theirs.any():
        return None
    a, b = float(ours.mean()), float(theirs.mean())
    cov = np.cov(ours.astype(np.float64), theirs.astype(np.float64))
    variance = (cov[0, 0] / b**2 + a**2 * cov[1, 1] / b**4 - 2 * a * cov[0, 1] / b**3) / n
    spread = z * float(np.sqrt(max(variance, 0.0)))
    return [round(a / b - spread, 3), round(a / b + spread, 3)]


def paired_difference_margin(ours: np.ndarray, theirs: np.ndarray, z: float = 1.96) -> float | None:
    """z standard errors of mean(ours - theirs) over the same customers (None: fewer than 2)."""
    n = len(ours)
    if n < 2 or len(theirs) != n:
        return None
    differences = ours.astype(np.float64) - theirs.astype(np.float64)
    return z * float(np.std(differences, ddof=1)) / float(np.sqrt(n))


def _is_member(customer, item, set_customer, set_item, n_items) -> np.ndarray:
    keys = np.unique(set_customer.astype(np.int64) * n_items + set_item)
    return np.isin(customer.astype(np.int64) * n_items + item, keys)
