"""Model selection on a validation window before the as-of day: the best candidate is deployed.

    selection = select_model(purchases, as_of, RecommenderConfig())
    model = Recommender.fit(purchases, selection.config, as_of=as_of)

Protocol (no peeking): every candidate is fitted on the purchases before `as_of - window_days`
and judged on what customers bought in [as_of - window_days, as_of), the same way the offline
evaluation judges (recsys/evaluation.py): hit rate @K over customers with history who bought a
product new to them; products that anyone bought before the window cut-off are the candidates
(past stock levels are unknown). Nothing on or after `as_of` is read.

Candidates: the tuned EASE blend, the same scoring recent history more, the same with this
week's popularity (`ease_trending`, picked on two Online Retail validation windows), item-kNN
(cosine, same blend), global popularity (all-time distinct buyers: the baseline the evaluation
compares with), recent popularity (30-day half life) and popularity within RFM segments. The
winner has the highest hit rate; ties go to the earlier candidate in that order, so the choice
is deterministic for the same data. Baselines are candidates, so the deployed model is never
worse than the best baseline on the window.

Cold start (recsys/text_neighbours.py): given product vectors, a collaborative winner is judged
once more with products outside its model scored through their text ("<winner> + text
neighbours"); that variant is deployed only when its hit rate is strictly higher, so products are
reached through their text only where that has paid off on the window.

Scale: above `max_customers`, a stable hash sample of customers (crc32 of the id) is fitted and
judged, held in memory as one Arrow table (50,000 customers: about 500k rows).
"""

from __future__ import annotations

import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.customer_vectors import ProductEmbeddings
from recsys.evaluation import candidate_items, markdown_table, recommendations_as_positions, relevant_items
from recsys.metrics import RankingMetrics
from recsys.purchases import PurchaseSource, conform_batch, iter_customer_chunks, open_batches, to_micros
from recsys.recommender import (
    EASE,
    GLOBAL_POPULARITY,
    ITEM_KNN,
    SEGMENT_POPULARITY,
    Recommender,
    RecommenderConfig,
    SharedWeights,
)

# name -> overrides of the deployed config; order = tie-break preference
CANDIDATES: dict[str, dict] = {
    "ease": {"model": EASE},
    "ease_recent_history": {"model": EASE, "history_half_life_days": 60.0},
    # what sells this week (7-day half-life) over the customer's last year: fast-moving seasonal ranges
    "ease_trending": {"model": EASE, "history_half_life_days": 120.0, "popularity_half_life_days": 7.0},
    "item_knn": {"model": ITEM_KNN},
    "global_popularity": {"model": GLOBAL_POPULARITY, "popularity_half_life_days": None},
    "recent_popularity": {"model": GLOBAL_POPULARITY, "popularity_half_life_days": 30.0},
    "segment_popularity": {"model": SEGMENT_POPULARITY, "popularity_half_life_days": None},
}
BASELINES = ("global_popularity", "recent_popularity", "segment_popularity")
COLLABORATIVE_MODELS = (EASE, ITEM_KNN)


@dataclass
class Selection:
    """The candidates' table, the choice and why; `config` is what to deploy."""

    config: RecommenderConfig
    chosen: str
    reason: str
    window: tuple[str, str]
    customers_sampled: int
    evaluated_customers: int
    table: list[dict] = field(default_factory=list)  # one row per candidate, best first
    weights: dict[str, int] = field(default_factory=dict)  # item-item weights computed and re-used
    seconds: float = 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["config"] = {"model": self.config.model, "popularity_half_life_days": self.config.popularity_half_life_days,
                          "text_neighbour_min_similarity": self.config.text_neighbour_min_similarity}
        return data

    def to_markdown(self) -> str:
        return markdown_table(self.table, ["candidate", "hit_rate", "ndcg", "vs_best_baseline", "deployed"])


def select_model(
    purchases: PurchaseSource,
    as_of: datetime,
    base: RecommenderConfig | None = None,
    window_days: int = 60,
    max_customers: int = 50_000,
    candidates: dict[str, dict] | None = None,
    product_vectors: ProductEmbeddings | None = None,
    customers: int | None = None,
) -> Selection:
    """Judge every candidate on [as_of - window_days, as_of); return the winner's config.
    `customers`: how many customers the purchases hold, when the caller knows (customer_sample)."""
    clock = time.perf_counter()
    base = base or RecommenderConfig()
    candidates = candidates or CANDIDATES
    cutoff = as_of - timedelta(days=window_days)
    sample, sampled = customer_sample(purchases, to_micros(as_of), max_customers, customers)
    k = base.top_k
    evaluated = 0
    # calibration does not change the ranking; text neighbours are judged apart, below
    plain = replace(base, calibration_days=0, text_neighbour_min_similarity=None)
    configs = {name: replace(plain, **overrides) for name, overrides in candidates.items()}
    # The EASE candidates differ only in how they score: they share one solve, judged last and
    # together so that the kept weights are theirs when the winner is judged with text neighbours.
    shared, rows = SharedWeights(), {}
    for name in sorted(configs, key=lambda name: configs[name].model == EASE):
        rows[name] = _judge_row(name, sample, cutoff, as_of, configs[name], shared=shared)
        evaluated = rows[name].pop("customers", evaluated)
    table = [rows[name] for name in configs]  # in candidate order: ties go to the earlier
    window = (str(cutoff), str(as_of))
    judged = [row for row in table if row["hit_rate"] is not None]
    if not judged:
        chosen, reason = "ease", "no candidate could be judged (see the table's errors): the default model"
    else:
        best = max(judged, key=lambda row: row["hit_rate"])  # max keeps the first of equals
        chosen = best["candidate"]
        reason = f"highest hit rate@{k} on the validation window ({best['hit_rate']:.4f})"
        if (product_vectors is not None and base.text_neighbour_min_similarity is not None
                and configs[chosen].model in COLLABORATIVE_MODELS):
            name = f"{chosen} + text neighbours"
            configs[name] = replace(configs[chosen], text_neighbour_min_similarity=base.text_neighbour_min_similarity)
            row = _judge_row(name, sample, cutoff, as_of, configs[name], product_vectors, shared)
            row.pop("customers", None)
            table.append(row)
            if row["hit_rate"] is not None and row["hit_rate"] > best["hit_rate"]:
                chosen, reason = name, (f"highest hit rate@{k} on the validation window ({row['hit_rate']:.4f}; "
                                        f"{best['hit_rate']:.4f} without text neighbours)")
    best_baseline = max((row["hit_rate"] for row in judged if row["candidate"] in BASELINES), default=0.0)
    for row in table:
        row["vs_best_baseline"] = (round(row["hit_rate"] / best_baseline, 3)
                                   if best_baseline and row["hit_rate"] is not None else None)
        row["deployed"] = row["candidate"] == chosen
    weights = {"computed": shared.computed, "reused": shared.reused}
    del shared  # the kept weights (M x M) are freed before the deployed model is fitted
    table.sort(key=lambda row: -(row["hit_rate"] if row["hit_rate"] is not None else -1.0))
    deployed = replace(configs[chosen], calibration_days=base.calibration_days) if chosen in configs \
        else replace(base, text_neighbour_min_similarity=None)
    return Selection(
        config=deployed,
        chosen=chosen, reason=reason, window=window, customers_sampled=sampled, evaluated_customers=evaluated,
        table=table, weights=weights, seconds=round(time.perf_counter() - clock, 3),
    )


def _judge_row(name, sample, cutoff, end, config, product_vectors=None, shared: SharedWeights | None = None) -> dict:
    """A table row: the candidate's hit rate and NDCG, or the error that kept it out of the race."""
    try:
        metrics = _judge(sample, cutoff, end, config, product_vectors, shared)
    except Exception as error:  # a candidate that cannot be judged is out of the race, said so
        return {"candidate": name, "hit_rate": None, "ndcg": None, "error": f"{type(error).__name__}: {error}"[:300]}
    if not metrics.customers:  # a hit rate of 0 would say the candidate lost
        return {"candidate": name, "hit_rate": None, "ndcg": None, "customers": 0,
                "error": "no customer to judge: none bought a product new to them in the validation window"}
    summary = metrics.summary()
    return {"candidate": name, "hit_rate": summary[f"hit_rate@{config.top_k}"],
            "ndcg": summary[f"ndcg@{config.top_k}"], "customers": metrics.customers}


def _judge(sample: pa.Table, cutoff: datetime, end: datetime, config: RecommenderConfig,
           product_vectors: ProductEmbeddings | None = None, shared: SharedWeights | None = None) -> RankingMetrics:
    """Hit rate of one candidate fitted before `cutoff`, on the new products bought in [cutoff, end)."""
    cutoff_us, end_us = to_micros(cutoff), to_micros(end)
    model = Recommender.fit(sample, config=config, as_of=cutoff, shared=shared)
    items = candidate_items(sample, cutoff_us, None, config.score_chunk_customers)
    candidates = model.candidates(pa.table({"product_id": items.product_ids,
                                            "in_stock": pa.array([True] * len(items), pa.bool_())}), product_vectors)
    metrics = RankingMetrics(config.top_k, len(items))
    for chunk in iter_customer_chunks(sample, config.score_chunk_customers):
        _, truth_customer, truth_item, evaluated = relevant_items(chunk, items, cutoff_us, end_us)
        if not evaluated.any():
            continue
        # Only the judged customers are scored (a ranking depends on the customer's own history
        # alone): at 2M, 40-45 % of the sample bought nothing new in the window.
        judged = chunk.select_customers(evaluated)
        scored = model.score_chunk(judged, candidates)
        everyone = np.ones(judged.n_customers, dtype=bool)
        ours = recommendations_as_positions(scored.recommendations, judged, items, everyone, np.arange(judged.n_customers))
        keep = evaluated[truth_customer]
        renumber = np.cumsum(evaluated) - 1
        metrics.add(judged.n_customers, *ours, renumber[truth_customer[keep]], truth_item[keep])
    return metrics


def customer_sample(purchases: PurchaseSource, before_us: int, max_customers: int,
                    customers: int | None = None) -> tuple[pa.Table, int]:
    """The purchases before `before_us` of a stable sample of about `max_customers` customers
    (all of them when there are fewer), in stream order; and how many customers it holds.
    `customers`: how many the stream holds, when the caller knows (a snapshot's table of one row
    per customer): the purchases are then read once instead of twice (20M rows: about 2.5 s)."""
    columns = ["customer_id", "product_id", "amount", "purchased_at"]
    if customers is None:
        customers = sum(pc.count_distinct(batch["customer_id"]).as_py() for batch in open_batches(purchases))
    share = min(1.0, max_customers / max(customers, 1))
    threshold = int(share * 2**32)
    parts = []
    for batch in open_batches(purchases):
        batch = batch.select(columns)
        ids = pc.unique(batch["customer_id"])
        if share < 1.0:
            kept = [c for c in ids.to_pylist() if c is not None and zlib.crc32(c.encode()) < threshold]
            batch = batch.filter(pc.is_in(batch["customer_id"], pa.array(kept, pa.string())))
        micros = conform_batch(batch).column("purchased_at")  # int64 microseconds, UTC
        parts.append(batch.filter(pc.fill_null(pc.less(micros, before_us), True)))  # null: a customer without rows
    table = pa.Table.from_batches(parts) if parts else pa.table({c: [] for c in columns})
    return table, pc.count_distinct(table["customer_id"]).as_py() if table.num_rows else 0
