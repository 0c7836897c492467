"""Offline quality: a time split, our recommender vs popularity baselines, same rules for all.

Protocol (`evaluate_split`):
- train = valid purchases before `cutoff`; test = purchases in [cutoff, test_end);
- candidate products = products bought by someone before the cut-off that are in stock in the
  catalog (no catalog: all of them, as for Online Retail, which has no stock levels), plus, with
  product vectors, the in-stock products nobody bought yet that the recommender can reach
  through their text (recsys/text_neighbours.py);
- a customer is evaluated when they have train history and bought in the test window at least
  one candidate product they had not bought before the cut-off; those products are the
  relevant set (re-buys are excluded because the rules forbid recommending bought items);
- every method recommends K candidates per evaluated customer, never an item bought in train;
- metrics: see recsys/metrics.py.

It streams customer chunks like the recommender, so it runs on generated data at scale too.
`tune_on_validation` picks hyper-parameters on validation windows that end at the cut-off, so
the test window is never looked at while tuning.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.baselines import (
    MappingSegmenter,
    PopularityBaseline,
    RfmSegmenter,
    SegmentPopularityBaseline,
    count_buyers,
)
from recsys.metrics import RankingMetrics, paired_ratio_interval
from recsys.purchases import CustomerChunk, ItemIndex, PurchaseSource, distinct_pairs, iter_customer_chunks, to_micros
from recsys.customer_vectors import ProductEmbeddings
from recsys.recommender import COLLABORATIVE, TEXT_NEIGHBOUR, Recommender, RecommenderConfig

OURS = "ours (deployed model)"


@dataclass
class EvaluationReport:
    cutoff: str
    test_end: str
    k: int
    evaluated_customers: int
    candidate_products: int
    segmentation: str
    table: list[dict]  # one row per method, suitable for metadata and a README table
    calibration_check: dict = field(default_factory=dict)
    fit_report: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    selection: dict = field(default_factory=dict)  # what model selection chose at the cut-off, when it ran
    # per method: whether each evaluated customer (same order for every method) got a hit in the top K
    hit_vectors: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def row(self, method: str) -> dict:
        return next(row for row in self.table if row["method"] == method)

    def to_markdown(self) -> str:
        return markdown_table(self.table, list(self.table[0]))


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """Rows as a Markdown table (materialization metadata, README figures)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def evaluate_split(
    purchases: PurchaseSource,
    cutoff: datetime,
    test_end: datetime,
    catalog: pa.Table | None = None,
    config: RecommenderConfig | None = None,
    segments: Mapping[str, Hashable] | None = None,
    k: int = 10,
    chunk_customers: int = 2_048,
    product_vectors: ProductEmbeddings | None = None,
) -> EvaluationReport:
    """Fit everything on the purchases before `cutoff`; measure on [cutoff, test_end).
    `product_vectors`: products outside the model may be recommended
    through their text (recsys/text_neighbours.py), as the pipeline does."""
    config = replace(config or RecommenderConfig(), top_k=k)
    cutoff_us, end_us = to_micros(cutoff), to_micros(test_end)
    seconds = {}
    clock = time.perf_counter()
    model = Recommender.fit(purchases, config=config, as_of=cutoff)
    seconds["fit_recommender"] = round(time.perf_counter() - clock, 3)

    clock = time.perf_counter()
    items = candidate_items(purchases, cutoff_us, catalog, chunk_customers)
    candidates = model.candidates(catalog if catalog is not None else _all_in_stock(items), product_vectors)
    if candidates.cold_start_products:  # in-stock products nobody bought yet can be recommended through text
        cold_ids = candidates.text_neighbours.products.product_ids.to_pylist()
        items = ItemIndex(sorted(set(items.product_ids.to_pylist()) | set(cold_ids)))
    if segments is not None:
        segmenter = MappingSegmenter(segments)
    else:
        segmenter = RfmSegmenter.fit(purchases, cutoff_us, chunk_customers)
    buyers, by_segment = count_buyers(purchases, items, cutoff_us, chunk_customers, segment_of=segmenter)
    baselines = [PopularityBaseline(items, buyers), SegmentPopularityBaseline(items, buyers, by_segment, segmenter)]
    seconds["fit_baselines"] = round(time.perf_counter() - clock, 3)

    clock = time.perf_counter()
    metrics = {name: RankingMetrics(k, len(items)) for name in [OURS] + [b.name for b in baselines]}
    check = _CalibrationCheck()
    for chunk in iter_customer_chunks(purchases, chunk_customers):
        chunk = chunk.before(end_us)
        scored = model.score_chunk(chunk, candidates)
        history, truth_customer, truth_item, evaluated = relevant_items(chunk, items, cutoff_us, end_us)
        check.add(scored.recommendations, chunk, history, cutoff_us, end_us)
        if not evaluated.any():
            continue
        renumber = np.cumsum(evaluated) - 1
        keep_truth = evaluated[truth_customer]
        truth_customer, truth_item = renumber[truth_customer[keep_truth]], truth_item[keep_truth]
        n = int(evaluated.sum())
        ours = recommendations_as_positions(scored.recommendations, chunk, items, evaluated, renumber)
        metrics[OURS].add(n, *ours, truth_customer, truth_item)
        evaluated_history = history.select_customers(evaluated)
        for baseline in baselines:
            top = baseline.rank(evaluated_history, k)
            metrics[baseline.name].add(n, top.row, top.item, top.rank, truth_customer, truth_item)
    seconds["score_and_measure"] = round(time.perf_counter() - clock, 3)

    table = _table(metrics, k)
    return EvaluationReport(
        cutoff=str(cutoff),
        test_end=str(test_end),
        k=k,
        evaluated_customers=metrics[OURS].customers,
        candidate_products=len(items),
        segmentation=segmenter.description,
        table=table,
        calibration_check=check.summary(),
        fit_report=model.report.to_dict(),
        seconds=seconds,
        hit_vectors={name: accumulator.hit_vector() for name, accumulator in metrics.items()},
    )


def candidate_items(purchases, cutoff_us, catalog, chunk_customers) -> ItemIndex:
    """Products bought before the cut-off (and in stock, when a catalog is given), sorted."""
    seen: set[str] = set()
    for chunk in iter_customer_chunks(purchases, chunk_customers):
        seen.update(pc.unique(chunk.before(cutoff_us).product_ids).to_pylist())
    if catalog is not None:
        in_stock = catalog.filter(pc.fill_null(catalog["in_stock"], False))
        seen &= set(pc.cast(in_stock["product_id"], pa.string()).to_pylist())
    return ItemIndex(sorted(seen))


def _all_in_stock(items: ItemIndex) -> pa.Table:
    return pa.table({"product_id": items.product_ids, "in_stock": pa.array([True] * len(items))})


def relevant_items(chunk: CustomerChunk, items: ItemIndex, cutoff_us: int, end_us: int):
    """Relevant (customer, item) pairs: bought in the test window, candidate, new to the customer."""
    history = chunk.before(cutoff_us)
    test = chunk.between(cutoff_us, end_us)
    n_items = max(len(items), 1)
    bought_customer, bought_item, _ = distinct_pairs(history.row_customer, items.positions(history.product_ids), n_items)
    test_customer, test_item, _ = distinct_pairs(test.row_customer, items.positions(test.product_ids), n_items)
    new = ~np.isin(test_customer * n_items + test_item, bought_customer * n_items + bought_item)
    truth_customer, truth_item = test_customer[new], test_item[new]
    evaluated = history.customers_with_rows()
    has_truth = np.zeros(chunk.n_customers, dtype=bool)
    has_truth[truth_customer] = True
    return history, truth_customer, truth_item, evaluated & has_truth


def recommendations_as_positions(recommendations: pa.RecordBatch, chunk, items, evaluated, renumber):
    customer = pc.index_in(recommendations["customer_id"], value_set=chunk.customer_ids).to_numpy(zero_copy_only=False)
    keep = evaluated[customer]
    item = items.positions(recommendations["product_id"])
    if (item[keep] < 0).any():
        raise AssertionError("the recommender proposed a product outside the candidate catalog")
    rank = recommendations["rank"].to_numpy().astype(np.int64)
    return renumber[customer[keep]], item[keep], rank[keep]


def _table(metrics: dict[str, RankingMetrics], k: int) -> list[dict]:
    popularity = metrics[PopularityBaseline.name]
    popularity_hit_rate = popularity.summary()[f"hit_rate@{k}"]
    table = []
    for name, accumulator in metrics.items():
        row = {"method": name, **accumulator.summary()}
        hit_rate = row[f"hit_rate@{k}"]
        row["hr_vs_popularity"] = round(hit_rate / popularity_hit_rate, 3) if popularity_hit_rate else None
        row["hr_vs_popularity_ci95"] = paired_ratio_interval(accumulator.hit_vector(), popularity.hit_vector())
        table.append(row)
    return table


class _CalibrationCheck:
    """Does confidence mean what it says? Over every customer with train history (the population
    confidence is calibrated on): mean confidence vs share of recommendations bought in the test
    window, predicted value vs spend realized on the recommended products, and the reliability
    curve: recommendations in deciles of confidence, each decile's mean confidence against the
    share bought, and its expected calibration error (ECE, the count-weighted mean gap)."""

    BINS = 10

    def __init__(self) -> None:
        self.confidence: list[np.ndarray] = []
        self.bought: list[np.ndarray] = []
        self.collaborative: list[np.ndarray] = []
        self.text_neighbour: list[np.ndarray] = []
        self.text_neighbour_products: set[str] = set()
        self.predicted_value = 0.0
        self.realized_value = 0.0

    def add(self, recommendations: pa.RecordBatch, chunk: CustomerChunk, history: CustomerChunk, cutoff_us, end_us):
        customer = pc.index_in(recommendations["customer_id"], value_set=chunk.customer_ids).to_numpy(zero_copy_only=False)
        test = chunk.between(cutoff_us, end_us)
        products = ItemIndex(pc.unique(test.product_ids)) if len(test.amount) else ItemIndex([])
        width = max(len(products), 1)
        test_keys = test.row_customer * width + products.positions(test.product_ids)
        unique_keys, inverse = np.unique(test_keys, return_inverse=True)
        spent = np.bincount(inverse, weights=test.amount, minlength=len(unique_keys))
        rec_item = products.positions(recommendations["product_id"])
        rec_keys = np.where(rec_item >= 0, customer * width + rec_item, -1)
        where = np.clip(np.searchsorted(unique_keys, rec_keys), 0, max(len(unique_keys) - 1, 0))
        bought = (unique_keys[where] == rec_keys) if len(unique_keys) else np.zeros(len(rec_keys), dtype=bool)
        collaborative = pc.equal(recommendations["strategy"], COLLABORATIVE).to_numpy(zero_copy_only=False)
        self.confidence.append(recommendations["confidence"].to_numpy(zero_copy_only=False).astype(np.float32))
        self.bought.append(bought)
        self.collaborative.append(collaborative)
        cold = pc.equal(recommendations["strategy"], TEXT_NEIGHBOUR).to_numpy(zero_copy_only=False)
        self.text_neighbour.append(cold)
        self.text_neighbour_products.update(recommendations["product_id"].filter(pa.array(cold)).to_pylist())
        predicted = recommendations["predicted_value"].to_numpy(zero_copy_only=False)
        self.predicted_value += float(predicted[collaborative].sum())
        self.realized_value += float(spent[where][bought & collaborative].sum()) if len(unique_keys) else 0.0

    def summary(self) -> dict:
        confidence = np.concatenate(self.confidence) if self.confidence else np.zeros(0, dtype=np.float32)
        bought = np.concatenate(self.bought) if self.bought else np.zeros(0, dtype=bool)
        collaborative = np.concatenate(self.collaborative) if self.collaborative else np.zeros(0, dtype=bool)
        cold = np.concatenate(self.text_neighbour) if self.text_neighbour else np.zeros(0, dtype=bool)
        n = max(int(collaborative.sum()), 1)
        curve = reliability_curve(confidence, bought, self.BINS)
        return {
            "collaborative_recommendations": int(collaborative.sum()),
            "mean_confidence": round(float(confidence[collaborative].sum()) / n, 5),
            "share_bought_in_test_window": round(float(bought[collaborative].sum()) / n, 5),
            "predicted_value_total": round(self.predicted_value, 2),
            "realized_value_total": round(self.realized_value, 2),
            "predicted_over_realized_value": round(self.predicted_value / self.realized_value, 3)
            if self.realized_value else None,
            "recommendations": len(confidence),
            "reliability": curve,
            "top_decile_bought": curve[-1]["share_bought"] if curve else None,
            "bottom_decile_bought": curve[0]["share_bought"] if curve else None,
            "ece": round(sum(b["n"] * abs(b["mean_confidence"] - b["share_bought"]) for b in curve)
                         / max(len(confidence), 1), 5),
            "text_neighbour": {
                "recommendations": int(cold.sum()),
                "products": len(self.text_neighbour_products),
                "share_bought_in_test_window": round(float(bought[cold].mean()), 5) if cold.any() else None,
                "mean_confidence": round(float(confidence[cold].mean()), 5) if cold.any() else None,
            },
        }


def reliability_curve(confidence: np.ndarray, bought: np.ndarray, bins: int) -> list[dict]:
    """Recommendations sorted by confidence, cut into `bins` equal-count groups (ties split by
    order, so a flat confidence still gives bins): mean confidence vs share bought per group."""
    if len(confidence) == 0:
        return []
    order = np.argsort(confidence, kind="stable")
    curve = []
    for part in np.array_split(order, bins):
        if len(part):
            curve.append({"n": len(part), "mean_confidence": round(float(confidence[part].mean()), 5),
                          "share_bought": round(float(bought[part].mean()), 5)})
    return curve


# ---- tuning ------------------------------------------------------------------------------------


def validation_splits(cutoff: datetime, window_days: Iterable[int] = (92, 61)) -> list[tuple[datetime, datetime]]:
    """Validation windows that end at the cut-off, carved from the training period."""
    return [(cutoff - timedelta(days=days), cutoff) for days in window_days]


def tune_on_validation(
    purchases: PurchaseSource,
    cutoff: datetime,
    grid: Mapping[str, Iterable],
    base: RecommenderConfig | None = None,
    window_days: Iterable[int] = (92, 61),
    k: int = 10,
) -> list[dict]:
    """Every combination of `grid` (config field -> values), scored by our hit rate over
    popularity's, averaged over the validation splits; best first. Calibration is off while
    tuning (it does not change the ranking)."""
    base = replace(base or RecommenderConfig(), calibration_days=0)
    names = sorted(grid)
    splits = validation_splits(cutoff, window_days)
    results = []
    for values in itertools.product(*(list(grid[name]) for name in names)):
        config = replace(base, **dict(zip(names, values)))
        ratios = []
        for split_cutoff, split_end in splits:
            report = evaluate_split(purchases, split_cutoff, split_end, config=config, k=k)
            ratios.append(report.row(OURS)["hr_vs_popularity"])
        mean_ratio = round(float(np.mean(ratios)), 4)
        results.append({**dict(zip(names, values)), "mean_hr_vs_popularity": mean_ratio, "per_split": ratios})
    return sorted(results, key=lambda row: -row["mean_hr_vs_popularity"])
