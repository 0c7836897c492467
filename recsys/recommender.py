"""The recommender: fit a model on a purchases stream, then score customers chunk by chunk.

The model (`RecommenderConfig.model`): EASE (the default), item-kNN, global popularity or
popularity within RFM segments; recsys/selection.py picks one on a validation window.

    model = Recommender.fit(purchases, config=RecommenderConfig(), as_of=None)
    for part in model.recommend(purchases, catalog):   # RecommendationChunk, in stream order
        part.recommendations                            # pa.RecordBatch, RECOMMENDATION_SCHEMA

Fitting reads the purchases four times (never all at once):
1. item scan: product vocabulary, distinct buyers per product, customers, latest timestamp;
   the model items are the top `max_items` products by distinct buyers (at least
   `min_item_buyers`), sorted by product_id so column order is the tie-break order;
2. when calibrating, a Gram pass over the history before the validation cut-off
   (as_of - calibration_days), then a calibration pass: the validation model ranks a systematic
   sample of customers and the outcomes in [cut-off, as_of) calibrate confidence and predicted
   value; its matrix is freed before
3. the Gram pass of the full history (before as_of): Gram matrix, recent popularity and spend
   statistics; then the final model is solved.

Confidence = P(the customer buys this product within the next `calibration_days` days), estimated
by isotonic regression of the score on the validation outcomes, separately for the
collaborative and the popularity strategy and, within each, for 3 x 3 groups of the customer's
recency and frequency (recsys/calibration.py): rank separates a customer's recommendations, how
recently and often they buy separates customers. The validation population is every sampled customer
with history before the cut-off (churned ones included), so confidences are honest and low:
a hit rate among customers who did come back (the evaluation's population) is higher.

predicted_value (currency) = confidence x expected spend if bought, where expected spend =
spend per buyer of the product (total spend on it / distinct buyers, before as_of) x the
customer's spend index (their spend on their products / what typical buyers of those products
spend, clipped to `spend_index_bounds`) x a correction factor (realized / expected spend of the
validation hits, so the scale matches what customers really spent within the horizon).

The calibration summary also holds a held-out check of predicted_value: calibrated on one half
of the validation customers, predicted for the other half, and swapped (`held_out_value_check`).

Rules (applied here and by the evaluation's baselines alike): only products in the catalog with
in_stock true are recommended; a product the customer bought before as_of never is. Products
outside the model (fewer than `min_item_buyers` buyers, no co-purchases, or beyond the top
`max_items`) have no collaborative score; given product vectors, those whose nearest model item
by text is at least `text_neighbour_min_similarity` alike are scored through it (strategy
"text_neighbour", recsys/text_neighbours.py), and `Candidates` counts both.
"""

from __future__ import annotations

import os
import pickle
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.baselines import RfmSegmenter, customer_rfm
from recsys.calibration import GroupedCalibrator
from recsys.customer_vectors import ProductEmbeddings
from recsys.text_neighbours import STRATEGY as TEXT_NEIGHBOUR
from recsys.text_neighbours import TextNeighbours
from recsys.ease import (
    EaseScorer,
    GramAccumulator,
    Ranking,
    item_cosine_in_place,
    padded_width,
    solve_ease_in_place,
    to_column_blocks_in_place,
)
from recsys.purchases import (
    MICROS_PER_DAY,
    CustomerChunk,
    ItemIndex,
    PurchaseSource,
    customer_run_starts,
    distinct_pairs,
    from_micros,
    iter_customer_chunks,
    to_micros,
)

COLLABORATIVE = "collaborative"
POPULARITY = "popularity"

# The models `RecommenderConfig.model` can be (recsys/selection.py picks one on a validation window).
EASE = "ease"  # EASE item-item weights blended with recent popularity
ITEM_KNN = "item_knn"  # cosine item-item neighbours, blended the same way
GLOBAL_POPULARITY = "global_popularity"  # what sells (recently, per popularity_half_life_days)
SEGMENT_POPULARITY = "segment_popularity"  # what sells within the customer's RFM segment
MODELS = (EASE, ITEM_KNN, GLOBAL_POPULARITY, SEGMENT_POPULARITY)

RECOMMENDATION_SCHEMA = pa.schema(
    [
        ("customer_id", pa.string()),
        ("rank", pa.int16()),
        ("product_id", pa.string()),
        ("score", pa.float64()),
        ("confidence", pa.float64()),
        ("predicted_value", pa.float64()),
        ("strategy", pa.string()),
    ]
)
SKIPPED_SCHEMA = pa.schema([("customer_id", pa.string()), ("reason", pa.string())])
# Per scored customer: ranked by the model (or by popularity).
SCORED_SCHEMA = pa.schema([("customer_id", pa.string()), ("collaborative", pa.bool_())])
# Per customer, the blocked products that would enter their top-k as candidates (Ranking.hidden_*).
HIDDEN_SCHEMA = pa.schema([("customer_id", pa.string()), ("product_id", pa.string())])

REASON_NO_MODEL = "no model items: no product had min_item_buyers buyers before as_of"
REASON_NO_STOCK = "no in-stock candidate products"
REASON_ALL_BOUGHT = "customer already bought every in-stock candidate"


@dataclass(frozen=True)
class RecommenderConfig:
    """Every knob, with the default and why. Tuned values: see recsys/evaluation.py."""

    top_k: int = 10
    model: str = EASE  # one of MODELS
    # 8,192 items: G and B are 256 MiB float32 each; fit peaks near 3 of those. On a catalog of
    # 20,000 the top 8,192 cover most purchases (the fit report gives the share).
    max_items: int = 8_192
    min_item_buyers: int = 2  # a product bought by one customer has no co-purchase to learn from
    # The next four were picked by `recsys.evaluation.tune_on_validation` on Online Retail
    # (validation windows Mar-May and Apr-May 2011, before the test cut-off; 96 combinations).
    l2_regularization: float = 8.0  # lambda = this x mean(diag(G))
    gram_half_life_days: float | None = 30.0
    activity_exponent: float = 0.5
    popularity_blend: float = 0.2
    popularity_half_life_days: float | None = 30.0
    # Scoring: a bought item's weight halves with the age of its last purchase (None: all count
    # the same); what a customer bought lately says more about what they buy next.
    history_half_life_days: float | None = None
    # Cold start (recsys/text_neighbours.py): an in-stock product outside the model is scored
    # through its nearest model item by text when at least this alike (None: never).
    text_neighbour_min_similarity: float | None = 0.9
    calibration_days: int = 90  # the horizon confidence refers to; 0 disables calibration
    calibration_customers: int = 20_000  # systematic sample size for calibration
    spend_index_bounds: tuple[float, float] = (0.25, 4.0)
    fit_chunk_customers: int = 20_000
    score_chunk_customers: int = 1_024
    workers: int = 2  # scoring threads (numpy and scipy release the GIL in the heavy parts)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, not {self.model!r}")
        if self.top_k < 1 or self.max_items < 1 or self.min_item_buyers < 1:
            raise ValueError("top_k, max_items and min_item_buyers must be at least 1")
        if self.l2_regularization <= 0:
            raise ValueError("l2_regularization must be positive (EASE needs G + lambda I invertible)")
        if self.fit_chunk_customers < 1 or self.score_chunk_customers < 1 or self.workers < 1:
            raise ValueError("chunk sizes and workers must be at least 1")


@dataclass
class FitReport:
    as_of: str
    model: str = EASE
    customers: int = 0
    customers_with_history: int = 0
    valid_rows: int = 0
    invalid_rows: int = 0
    products_seen: int = 0
    model_items: int = 0
    products_below_min_buyers: int = 0
    products_beyond_max_items: int = 0
    purchase_pairs_covered_by_model: float = 0.0
    l2_lambda: float = 0.0
    validation_cutoff: str | None = None
    cold_start: dict = field(default_factory=dict)  # the text-neighbour candidates (see candidates())
    calibration: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Candidates:
    """Which model columns may be recommended under a given catalog."""

    blocked: np.ndarray  # per padded model column
    in_stock_model_items: int
    catalog_products: int
    catalog_products_in_stock: int
    catalog_products_not_in_model: int  # in stock, but the model cannot rank them (no CF signal)
    column_product_ids: pa.Array  # product_id per ranking column (model, padding, then cold products)
    text_neighbours: TextNeighbours | None = None  # cold products scored through their text

    @property
    def cold_start_products(self) -> int:
        return len(self.text_neighbours) if self.text_neighbours is not None else 0


@dataclass(frozen=True)
class RecommendationChunk:
    recommendations: pa.RecordBatch  # RECOMMENDATION_SCHEMA
    skipped: pa.RecordBatch  # SKIPPED_SCHEMA: customers with no recommendation and why
    customers: int
    collaborative: int  # customers ranked by the model
    popularity: int  # customers with no usable history, given popularity
    without_valid_purchases: int  # subset of popularity: no valid row at all
    invalid_rows: int
    text_neighbour_recommendations: int = 0  # cold products recommended through their text
    scored: pa.RecordBatch | None = None  # SCORED_SCHEMA
    hidden: pa.RecordBatch | None = None  # HIDDEN_SCHEMA, when tracked; None: not tracked

    def counts(self) -> dict:
        return {
            "customers": self.customers,
            "collaborative": self.collaborative,
            "popularity": self.popularity,
            "without_valid_purchases": self.without_valid_purchases,
            "skipped": self.skipped.num_rows,
            "recommendations": self.recommendations.num_rows,
            "invalid_rows": self.invalid_rows,
            "text_neighbour_recommendations": self.text_neighbour_recommendations,
        }


@dataclass(frozen=True)
class SpendModel:
    """Expected spend on a product if bought, for a given customer."""

    vocabulary: ItemIndex
    spend_per_buyer: np.ndarray  # per vocabulary product
    bounds: tuple[float, float]
    correction: float = 1.0
    buyers: np.ndarray | None = None  # distinct buyers per vocabulary product

    def customer_index(self, history: CustomerChunk) -> np.ndarray:
        """Per chunk customer: own spend / typical spend of buyers of the same products."""
        position = self.vocabulary.positions(history.product_ids)
        known = position >= 0
        actual = np.bincount(history.row_customer[known], weights=history.amount[known], minlength=history.n_customers)
        customer, item, _ = distinct_pairs(history.row_customer, position, max(len(self.vocabulary), 1))
        typical = np.bincount(customer, weights=self.spend_per_buyer[item], minlength=history.n_customers)
        index = np.ones(history.n_customers)
        has = typical > 0
        index[has] = np.clip(actual[has] / typical[has], *self.bounds)
        return index


class Recommender:
    """A fitted model. Build it with `Recommender.fit`."""

    def __init__(
        self,
        config: RecommenderConfig,
        scorer: EaseScorer,
        spend: SpendModel,
        model_spend_per_buyer: np.ndarray,
        calibrators: dict[str, GroupedCalibrator | None],
        report: FitReport,
    ):
        self.config = config
        self.scorer = scorer
        self.spend = spend
        self.model_spend_per_buyer = model_spend_per_buyer  # per padded model column
        self.calibrators = calibrators  # per strategy; None: no calibration data, confidence 0
        self.report = report

    # ---- fitting -------------------------------------------------------------------------

    @classmethod
    def fit(
        cls, purchases: PurchaseSource, config: RecommenderConfig | None = None, as_of: datetime | None = None,
        shared: SharedWeights | None = None,
    ) -> Recommender:
        """Fit on the purchases before `as_of` (default: just after the latest purchase).

        `shared`: item-item weights already fitted on the same purchases and cut-off by a config
        that differs only in how it scores (model selection's candidates) are re-used from it."""
        config = config or RecommenderConfig()
        clock = time.perf_counter()
        scan = _scan_items(purchases, None if as_of is None else to_micros(as_of), config.fit_chunk_customers)
        as_of_us = to_micros(as_of) if as_of is not None else scan.latest_us + 1
        report = FitReport(as_of=str(from_micros(as_of_us)), customers=scan.customers, invalid_rows=scan.invalid_rows)
        report.valid_rows, report.products_seen = scan.valid_rows, len(scan.vocabulary)
        model_items = _select_model_items(scan, config, report)
        report.seconds["item_scan"] = round(time.perf_counter() - clock, 3)

        report.model = config.model
        calibrators, correction = {COLLABORATIVE: None, POPULARITY: None}, 1.0
        if config.calibration_days:
            # Calibration first, on a Gram pass of its own: one M x M matrix in memory at a time,
            # not two (256 MiB less at M = 8,192, for one more read of the purchases).
            clock = time.perf_counter()
            validation_cut_us = as_of_us - config.calibration_days * MICROS_PER_DAY
            [validation] = _accumulate(purchases, [validation_cut_us], model_items, scan.vocabulary, config,
                                       with_gram=config.model in (EASE, ITEM_KNN))
            report.seconds["validation_gram_pass"] = round(time.perf_counter() - clock, 3)
            report.validation_cutoff = str(from_micros(validation_cut_us))
            calibrators, correction, report.calibration = _calibrate(
                purchases, validation, model_items, scan, as_of_us, config, report
            )
            del validation
        else:
            report.calibration = {"status": "disabled (calibration_days = 0): confidence is 0"}

        clock = time.perf_counter()
        reuse = shared is not None and shared.holds(as_of_us, model_items, config)
        if shared is not None and not reuse:
            shared.clear()  # the kept weights go before this fit's Gram matrix is built: one M x M at a time
        with_gram = config.model in (EASE, ITEM_KNN) and not reuse
        [full] = _accumulate(purchases, [as_of_us], model_items, scan.vocabulary, config, with_gram)
        report.customers_with_history = full.customers_with_history
        report.purchase_pairs_covered_by_model = round(full.pairs_in_model / max(full.pairs_total, 1), 4)
        report.seconds["gram_pass"] = round(time.perf_counter() - clock, 3)

        clock = time.perf_counter()
        scorer, strength = _scorer(full, model_items, config, shared)
        report.l2_lambda = round(strength, 6)
        spend = _spend_model(full, scan.vocabulary, config, correction)
        report.seconds["solve"] = round(time.perf_counter() - clock, 3)
        return cls(config, scorer, spend, _model_spend(spend, model_items), calibrators, report)

    # ---- keeping a fitted model ------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write the fitted model (weights, popularity, calibration, report) to `path` atomically.

        Pickle: the file is the pipeline's own artifact, written and read only by this code
        beside the warehouse; never load one from elsewhere."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        with open(partial, "wb") as out:
            pickle.dump(self, out, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(partial, path)

    @staticmethod
    def load(path: Path) -> Recommender:
        with open(path, "rb") as stored:
            model = pickle.load(stored)  # noqa: S301 (our own artifact, see save)
        if not isinstance(model, Recommender):
            raise TypeError(f"{path} does not hold a Recommender")
        weights = model.scorer.weights
        if weights is not None and weights.ndim == 2:  # saved before scoring read column blocks
            model.scorer = replace(model.scorer, weights=to_column_blocks_in_place(weights))
        return model

    # ---- scoring -------------------------------------------------------------------------

    def candidates(self, catalog: pa.Table, product_vectors: ProductEmbeddings | None = None) -> Candidates:
        """Model columns that are in the catalog and in stock; everything else is blocked.

        With `product_vectors`, in-stock products outside the model whose
        nearest model item by text is alike enough are candidates too (cold start)."""
        for name in ("product_id", "in_stock"):
            if name not in catalog.schema.names:
                raise ValueError(f"catalog lacks column {name!r}")
        in_stock = catalog.filter(pc.fill_null(catalog["in_stock"], False))
        stock_ids = pc.unique(pc.cast(in_stock["product_id"], pa.string()).combine_chunks()).drop_null()
        blocked = np.ones(self.scorer.width, dtype=bool)
        if len(self.scorer.items):
            model_position = self.scorer.items.positions(stock_ids)
            blocked[model_position[model_position >= 0]] = False
            not_in_model = int(np.count_nonzero(model_position < 0))
        else:
            not_in_model = len(stock_ids)
        neighbours = self._text_neighbours(stock_ids, product_vectors)
        return Candidates(
            blocked=blocked,
            in_stock_model_items=int(np.count_nonzero(~blocked)),
            catalog_products=pc.count_distinct(catalog["product_id"]).as_py(),
            catalog_products_in_stock=len(stock_ids),
            catalog_products_not_in_model=not_in_model,
            text_neighbours=neighbours,
            column_product_ids=pa.concat_arrays([
                self.scorer.items.product_ids, pa.nulls(self.scorer.width - len(self.scorer.items), pa.string()),
                *([neighbours.products.product_ids] if neighbours is not None else [])]),
        )

    def _buyers(self, product_ids: pa.Array) -> np.ndarray:
        """Distinct buyers before as-of per product (0 for a product nobody bought)."""
        if self.spend.buyers is None:
            return np.zeros(len(product_ids))
        position = self.spend.vocabulary.positions(product_ids)
        return np.where(position >= 0, self.spend.buyers[np.maximum(position, 0)], 0)

    def _text_neighbours(self, stock_ids: pa.Array, product_vectors: ProductEmbeddings | None) -> TextNeighbours | None:
        """None when cold start is off, there are no vectors, or the model is a popularity model."""
        threshold = self.config.text_neighbour_min_similarity
        if threshold is None or product_vectors is None or self.scorer.weights is None or not len(self.scorer.items):
            return None
        outside = stock_ids.filter(pa.array(self.scorer.items.positions(stock_ids) < 0))
        clock = time.perf_counter()
        neighbours = TextNeighbours.build(self.scorer.items, product_vectors, outside, threshold)
        neighbours = neighbours.discounted_by_sales(self._buyers(neighbours.products.product_ids),
                                                    self._buyers(self.scorer.items.product_ids)[neighbours.neighbour])
        self.report.seconds["text_neighbours"] = round(time.perf_counter() - clock, 3)
        self.report.cold_start = {**neighbours.to_dict(), "in_stock_outside_model": len(outside)}
        return neighbours

    def recommend(
        self,
        purchases: PurchaseSource,
        catalog: pa.Table,
        chunk_customers: int | None = None,
        workers: int | None = None,
        product_vectors: ProductEmbeddings | None = None,
    ) -> Iterator[RecommendationChunk]:
        """Top-K for every customer of the stream, one RecommendationChunk per customer chunk.

        Chunks come back in stream order; `workers` threads score ahead. For per-chunk error
        handling (dead-letter a failed chunk, continue), drive `iter_customer_chunks` and
        `score_chunk` yourself.
        """
        candidates = self.candidates(catalog, product_vectors)
        chunks = iter_customer_chunks(purchases, chunk_customers or self.config.score_chunk_customers)
        yield from ordered_parallel_map(
            lambda chunk: self.score_chunk(chunk, candidates), chunks, workers or self.config.workers
        )

    def scoring_as_of(self, as_of: datetime) -> Recommender:
        """The same fitted model scoring history before a later `as_of` (an incremental day):
        new purchases count as history and are never recommended; the weights, popularity and
        calibration stay those of the fit."""
        scorer = replace(self.scorer, as_of_us=to_micros(as_of))
        return Recommender(self.config, scorer, self.spend, self.model_spend_per_buyer, self.calibrators, self.report)

    @property
    def as_of(self) -> datetime:
        """Purchases before this count as history when scoring."""
        return from_micros(self.scorer.as_of_us)

    def score_chunk(self, chunk: CustomerChunk, candidates: Candidates, track_hidden: bool = False,
                    kept: Ranking | None = None) -> RecommendationChunk:
        """Top-k of a chunk's customers; `track_hidden` also lists, per customer, the blocked
        products that would enter their top-k were they candidates (RecommendationChunk.hidden).
        `kept`: the ranking these customers already have (KeptTopK): only confidence and
        predicted value are computed again."""
        neighbours = candidates.text_neighbours
        if kept is not None and not track_hidden:  # hidden products as ranking would give them: none
            kept = replace(kept, hidden_row=None, hidden_column=None)
        ranking = kept if kept is not None else self.scorer.rank(
            chunk, candidates.blocked, self.config.top_k, text_neighbours=neighbours, track_hidden=track_hidden)
        history = chunk.before(self.scorer.as_of_us)
        strategy = np.where(ranking.has_signal, COLLABORATIVE, POPULARITY).astype(object)[ranking.row]
        # a cold product: the collaborative calibration of its discounted score, its neighbour's spend
        cold = ranking.column >= self.scorer.width
        model_column = ranking.column.copy()
        if cold.any():
            model_column[cold] = neighbours.neighbour[ranking.column[cold] - self.scorer.width]
            strategy[cold] = TEXT_NEIGHBOUR
        activity = customer_rfm(history, self.scorer.as_of_us, keep_empty=True)[ranking.row]
        confidence = self._confidence(ranking.score, ranking.has_signal[ranking.row], activity)
        expected_spend = self.model_spend_per_buyer[model_column] * self.spend.customer_index(history)[ranking.row]
        predicted_value = confidence * self.spend.correction * expected_spend
        recommendations = pa.RecordBatch.from_arrays(
            [
                chunk.customer_ids.take(pa.array(ranking.row)),
                pa.array(ranking.rank.astype(np.int16)),
                candidates.column_product_ids.take(pa.array(ranking.column)),
                pa.array(ranking.score.astype(np.float64)),
                pa.array(confidence),
                pa.array(predicted_value),
                pa.array(strategy, type=pa.string()),
            ],
            schema=RECOMMENDATION_SCHEMA,
        )
        valid_customers = chunk.customers_with_rows()
        return RecommendationChunk(
            recommendations=recommendations,
            skipped=self._skipped(chunk, ranking, candidates),
            customers=chunk.n_customers,
            collaborative=int(np.count_nonzero(ranking.has_signal)),
            popularity=int(np.count_nonzero(~ranking.has_signal)),
            without_valid_purchases=int(np.count_nonzero(~valid_customers)),
            invalid_rows=chunk.invalid_rows,
            text_neighbour_recommendations=int(np.count_nonzero(cold)),
            scored=pa.RecordBatch.from_arrays([chunk.customer_ids, pa.array(ranking.has_signal)], schema=SCORED_SCHEMA),
            hidden=None if ranking.hidden_row is None else pa.RecordBatch.from_arrays(
                [chunk.customer_ids.take(pa.array(ranking.hidden_row)),
                 self.scorer.items.product_ids.take(pa.array(ranking.hidden_column))], schema=HIDDEN_SCHEMA),
        )

    def _confidence(self, score: np.ndarray, collaborative: np.ndarray, activity: np.ndarray) -> np.ndarray:
        """Per recommendation; activity: the customer's (recency days, orders, spend) at as_of."""
        confidence = np.zeros(len(score))
        for name, rows in ((COLLABORATIVE, collaborative), (POPULARITY, ~collaborative)):
            calibrator = self.calibrators.get(name)
            if calibrator is not None and rows.any():
                confidence[rows] = calibrator(score[rows], activity[rows, 0], activity[rows, 1])
        return confidence

    def _skipped(self, chunk: CustomerChunk, ranking: Ranking, candidates: Candidates) -> pa.RecordBatch:
        served = np.zeros(chunk.n_customers, dtype=bool)
        served[ranking.row] = True
        if len(self.scorer.items) == 0:
            reason = REASON_NO_MODEL
        elif candidates.in_stock_model_items == 0:
            reason = REASON_NO_STOCK
        else:
            reason = REASON_ALL_BOUGHT
        missing = np.flatnonzero(~served)
        return pa.RecordBatch.from_arrays(
            [chunk.customer_ids.take(pa.array(missing)), pa.array([reason] * len(missing), type=pa.string())],
            schema=SKIPPED_SCHEMA,
        )


# ---- fitting passes ------------------------------------------------------------------------


@dataclass
class _ItemScan:
    vocabulary: ItemIndex
    buyers: np.ndarray
    customers: int
    valid_rows: int
    invalid_rows: int
    latest_us: int


def _scan_items(purchases: PurchaseSource, as_of_us: int | None, chunk_customers: int) -> _ItemScan:
    """Pass 1: product vocabulary and distinct buyers per product (purchases before as_of)."""
    vocabulary, buyers = _GrowingVocabulary(), np.zeros(0, dtype=np.int64)
    customers = valid_rows = invalid_rows = 0
    latest_us = np.iinfo(np.int64).min
    for chunk in iter_customer_chunks(purchases, chunk_customers):
        customers, invalid_rows = customers + chunk.n_customers, invalid_rows + chunk.invalid_rows
        if as_of_us is not None:
            chunk = chunk.before(as_of_us)
        if len(chunk.amount) == 0:
            continue
        valid_rows += len(chunk.amount)
        latest_us = max(latest_us, int(chunk.purchased_at.max()))
        position = vocabulary.positions_adding(chunk.product_ids)
        _, item, _ = distinct_pairs(chunk.row_customer, position, len(vocabulary))
        buyers = np.pad(buyers, (0, len(vocabulary) - len(buyers)))
        buyers += np.bincount(item, minlength=len(vocabulary))
    if valid_rows == 0:
        latest_us = 0
    return _ItemScan(vocabulary.freeze(), buyers, customers, valid_rows, invalid_rows, latest_us)


class _GrowingVocabulary:
    """Product ids in order of first appearance."""

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._index = ItemIndex([])

    def __len__(self) -> int:
        return len(self._ids)

    def positions_adding(self, product_ids: pa.Array) -> np.ndarray:
        position = self._index.positions(product_ids)
        if (position < 0).any():
            unseen = pc.unique(product_ids.filter(pa.array(position < 0)))
            self._ids.extend(unseen.to_pylist())
            self._index = ItemIndex(self._ids)
            position = self._index.positions(product_ids)
        return position

    def freeze(self) -> ItemIndex:
        return self._index


def _select_model_items(scan: _ItemScan, config: RecommenderConfig, report: FitReport) -> ItemIndex:
    """Top `max_items` products by distinct buyers (ties: product_id), then sorted by product_id."""
    ids = np.asarray(scan.vocabulary.product_ids.to_pylist(), dtype=object)
    eligible = np.flatnonzero(scan.buyers >= config.min_item_buyers)
    report.products_below_min_buyers = len(ids) - len(eligible)
    by_popularity = eligible[np.lexsort((ids[eligible].astype(str), -scan.buyers[eligible]))]
    chosen = by_popularity[: config.max_items]
    report.products_beyond_max_items = len(eligible) - len(chosen)
    report.model_items = len(chosen)
    return ItemIndex(sorted(ids[chosen].tolist()))


def _accumulate(
    purchases: PurchaseSource,
    cutoffs: list[int],
    model_items: ItemIndex,
    vocabulary: ItemIndex,
    config: RecommenderConfig,
    with_gram: bool = True,
) -> list[GramAccumulator]:
    """Pass 2: one Gram accumulator per cutoff (full history, and the validation history)."""
    accumulators = [
        GramAccumulator(
            cutoff_us=cutoff,
            model_items=model_items,
            n_vocabulary=len(vocabulary),
            gram_half_life_days=config.gram_half_life_days,
            activity_exponent=config.activity_exponent,
            popularity_half_life_days=config.popularity_half_life_days,
            with_gram=with_gram,
            # segments as of each cut-off, from the history before it (no peeking)
            segment_of=(RfmSegmenter.fit(purchases, cutoff, config.fit_chunk_customers)
                        if config.model == SEGMENT_POPULARITY else None),
        )
        for cutoff in cutoffs
    ]
    for chunk in iter_customer_chunks(purchases, config.fit_chunk_customers):
        chunk = chunk.before(cutoffs[0])
        vocabulary_position = vocabulary.positions(chunk.product_ids) if len(vocabulary) else np.full(len(chunk.amount), -1)
        model_position = model_items.positions(chunk.product_ids) if len(model_items) else np.full(len(chunk.amount), -1)
        for accumulator in accumulators:
            accumulator.add(chunk, vocabulary_position, model_position)
    for accumulator in accumulators:
        accumulator.finish()
    return accumulators


# The config fields item-item weights depend on (with the purchases, the cut-off and the model items).
WEIGHT_FIELDS = ("model", "max_items", "min_item_buyers", "l2_regularization", "gram_half_life_days",
                 "activity_exponent", "fit_chunk_customers")


@dataclass
class SharedWeights:
    """Item-item weights fitted once and handed to the next fit of the same purchases and cut-off
    whose config differs only in how it scores (popularity blend, history recency, text
    neighbours): model selection's EASE candidates then share one solve (M = 8,192: seconds each).
    One set is kept (M x M float32, 256 MiB at M = 8,192): a fit with other weights replaces it.
    Only for fits of the same purchases; scorers read the weights and never change them."""

    key: tuple | None = None
    items: pa.Array | None = None
    kept: tuple[np.ndarray, float] | None = None
    computed: int = 0
    reused: int = 0

    def holds(self, cutoff_us: int, model_items: ItemIndex, config: RecommenderConfig) -> bool:
        return (self.kept is not None and self.key == _weights_key(cutoff_us, config)
                and self.items.equals(model_items.product_ids))

    def clear(self) -> None:
        self.key = self.items = self.kept = None

    def weights(self, cutoff_us: int, model_items: ItemIndex, config: RecommenderConfig,
                compute: Callable[[], tuple[np.ndarray, float]]) -> tuple[np.ndarray, float]:
        if self.holds(cutoff_us, model_items, config):
            self.reused += 1
            return self.kept
        self.clear()
        self.kept = compute()
        self.key, self.items = _weights_key(cutoff_us, config), model_items.product_ids
        self.computed += 1
        return self.kept


def _weights_key(cutoff_us: int, config: RecommenderConfig) -> tuple:
    return (cutoff_us, *(getattr(config, name) for name in WEIGHT_FIELDS))


def _scorer(accumulator: GramAccumulator, model_items: ItemIndex, config: RecommenderConfig,
            shared: SharedWeights | None = None) -> tuple[EaseScorer, float]:
    """The configured model from an accumulator (its Gram buffer becomes the weights): the
    scorer and the EASE regularization strength (0 for the other models)."""
    weights, strength, segments = None, 0.0, None
    if config.model in (EASE, ITEM_KNN):
        def compute() -> tuple[np.ndarray, float]:
            if config.model == EASE:
                solved, strength = solve_ease_in_place(accumulator.gram, len(model_items), config.l2_regularization)
            else:
                solved, strength = item_cosine_in_place(accumulator.gram), 0.0
            return to_column_blocks_in_place(solved), strength  # before SharedWeights keeps them

        weights, strength = (shared.weights(accumulator.cutoff_us, model_items, config, compute) if shared
                             else compute())
    elif config.model == SEGMENT_POPULARITY:
        segments = accumulator.popularity_within_segments()
    if weights is None:
        accumulator.gram = np.zeros((0, 0), dtype=np.float32)  # a popularity model has no item-item weights
    scorer = EaseScorer(model_items, weights, accumulator.normalized_popularity(), accumulator.cutoff_us,
                        config.popularity_blend, segments, config.history_half_life_days)
    return scorer, strength


def _spend_model(accumulator: GramAccumulator, vocabulary: ItemIndex, config, correction: float) -> SpendModel:
    buyers = np.maximum(accumulator.vocabulary_buyers, 1)
    return SpendModel(vocabulary, accumulator.vocabulary_spend / buyers, config.spend_index_bounds, correction,
                      accumulator.vocabulary_buyers)


def _model_spend(spend: SpendModel, model_items: ItemIndex) -> np.ndarray:
    per_column = np.zeros(padded_width(len(model_items)))
    if len(model_items):
        per_column[: len(model_items)] = spend.spend_per_buyer[spend.vocabulary.positions(model_items.product_ids)]
    return per_column


def _calibrate(purchases, validation: GramAccumulator, model_items, scan, as_of_us, config, report):
    """Pass 3: rank a sample of customers as of the validation cut-off; learn score -> P(hit)."""
    clock = time.perf_counter()
    scorer, _ = _scorer(validation, model_items, config)
    spend = _spend_model(validation, scan.vocabulary, config, 1.0)
    model_spend = _model_spend(spend, model_items)
    blocked = np.ones(scorer.width, dtype=bool)
    blocked[: len(model_items)] = False  # past stock levels are unknown: every model item counts
    sample_every = max(1, scan.customers // max(config.calibration_customers, 1))
    outcomes = _CalibrationOutcomes()
    first_customer = 0
    for chunk in iter_customer_chunks(purchases, config.fit_chunk_customers):
        sampled = (np.arange(first_customer, first_customer + chunk.n_customers) % sample_every) == 0
        first_customer += chunk.n_customers
        chunk = chunk.before(as_of_us).select_customers(sampled)
        for part in chunk.slices(config.score_chunk_customers):
            outcomes.add(part, scorer, spend, model_spend, blocked, config.top_k)
    del scorer
    calibrators = {
        COLLABORATIVE: GroupedCalibrator.fit(*outcomes.arrays(COLLABORATIVE)),
        POPULARITY: GroupedCalibrator.fit(*outcomes.arrays(POPULARITY)),
    }
    correction = outcomes.value_correction()
    summary = {
        "status": "calibrated" if calibrators[COLLABORATIVE] else "no validation customers: confidence is 0",
        "horizon_days": config.calibration_days,
        "sampled_customers": outcomes.customers,
        "value_correction": round(correction, 4),
        "held_out_value_check": outcomes.held_out_value_check(),
        **{name: (c.to_dict() if c else None) for name, c in calibrators.items()},
        **outcomes.hit_rates(),
    }
    report.seconds["calibration"] = round(time.perf_counter() - clock, 3)
    return calibrators, correction, summary


class _CalibrationOutcomes:
    """(score, hit) of validation recommendations, and spend of the hits."""

    def __init__(self) -> None:
        self.scores = {COLLABORATIVE: [], POPULARITY: []}
        self.hits = {COLLABORATIVE: [], POPULARITY: []}
        self.activity = {COLLABORATIVE: [], POPULARITY: []}  # (recency days, orders) at the cut-off
        # per collaborative recommendation: expected spend if bought, realized spend, customer fold
        self.expected = []
        self.realized = []
        self.fold = []
        self.customers = 0

    def add(self, chunk: CustomerChunk, scorer: EaseScorer, spend: SpendModel, model_spend, blocked, k) -> None:
        history = chunk.before(scorer.as_of_us)
        existing = history.customers_with_rows()  # customers known at the cut-off
        fold = (self.customers + np.cumsum(existing)) % 2  # alternate customers: two held-out halves
        self.customers += int(existing.sum())
        activity = customer_rfm(history, scorer.as_of_us, keep_empty=True)[:, :2]
        future = chunk.rows_where(chunk.purchased_at >= scorer.as_of_us)
        future_column = scorer.items.positions(future.product_ids)
        for name, popularity_only in ((COLLABORATIVE, False), (POPULARITY, True)):
            ranking = scorer.rank(history, blocked, k, popularity_only=popularity_only)
            keep = existing[ranking.row] & (ranking.has_signal[ranking.row] != popularity_only)
            row, column, score = ranking.row[keep], ranking.column[keep], ranking.score[keep]
            hit, realized = _outcomes(row, column, future.row_customer, future_column, future.amount, scorer.width)
            self.scores[name].append(score)
            self.hits[name].append(hit)
            self.activity[name].append(activity[row])
            if name == COLLABORATIVE:
                self.expected.append(model_spend[column] * spend.customer_index(history)[row])
                self.realized.append(realized)
                self.fold.append(fold[row])

    def arrays(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(score, hit, recency days, orders) per validation recommendation."""
        scores = np.concatenate(self.scores[name]) if self.scores[name] else np.zeros(0)
        hits = np.concatenate(self.hits[name]) if self.hits[name] else np.zeros(0, dtype=bool)
        activity = np.concatenate(self.activity[name]) if self.activity[name] else np.zeros((0, 2))
        return scores, hits, activity[:, 0], activity[:, 1]

    def value_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(expected spend if bought, realized spend, customer fold) per collaborative recommendation."""
        if not self.expected:
            return np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64)
        return np.concatenate(self.expected), np.concatenate(self.realized), np.concatenate(self.fold)

    def value_correction(self, rows: np.ndarray | slice = slice(None)) -> float:
        """Realized / expected spend of the hits: the scale of what customers really spent."""
        _, hits, _, _ = self.arrays(COLLABORATIVE)
        expected, realized, _ = self.value_arrays()
        expected_of_hits = float(expected[rows][hits[rows]].sum())
        return float(realized[rows][hits[rows]].sum()) / expected_of_hits if expected_of_hits > 0 else 1.0

    def held_out_value_check(self) -> dict:
        """predicted_value against realized spend on validation customers the calibration did
        not see: fit confidence and the value correction on one half, predict the other, swap."""
        scores, hits, recency, orders = self.arrays(COLLABORATIVE)
        expected, realized, fold = self.value_arrays()
        predicted_total = realized_total = 0.0
        for held_out in (0, 1):
            train, test = fold != held_out, fold == held_out
            calibrator = GroupedCalibrator.fit(scores[train], hits[train], recency[train], orders[train])
            if calibrator is None or not test.any():
                return {"status": "too few validation customers for a held-out check"}
            confidence = calibrator(scores[test], recency[test], orders[test])
            predicted_total += float((confidence * self.value_correction(train) * expected[test]).sum())
            realized_total += float(realized[test].sum())
        return {
            "status": "measured on held-out halves of the validation customers",
            "predicted_value_total": round(predicted_total, 2),
            "realized_value_total": round(realized_total, 2),
            "predicted_over_realized_value": round(predicted_total / realized_total, 3) if realized_total else None,
        }

    def hit_rates(self) -> dict:
        """Share of validation recommendations that were bought, per strategy."""
        rates = {}
        for name in self.scores:
            hits = self.arrays(name)[1]
            rates[f"{name}_validation_precision"] = round(float(hits.mean()), 5) if len(hits) else None
        return rates


def _outcomes(row, column, future_customer, future_column, future_amount, width):
    """Hit flag and realized spend of each (customer, column) recommendation."""
    known = future_column >= 0
    future_keys = future_customer[known] * width + future_column[known]
    spent_keys, inverse = np.unique(future_keys, return_inverse=True)
    spent = np.bincount(inverse, weights=future_amount[known], minlength=len(spent_keys))
    keys = row * width + column
    where = np.searchsorted(spent_keys, keys)
    where = np.minimum(where, max(len(spent_keys) - 1, 0))
    hit = (spent_keys[where] == keys) if len(spent_keys) else np.zeros(len(keys), dtype=bool)
    realized = np.where(hit, spent[where] if len(spent_keys) else 0.0, 0.0)
    return hit, realized


@dataclass(frozen=True)
class KeptChunk:
    """Customers whose kept top-k stands (KeptTopK), with the ranking it holds."""

    chunk: CustomerChunk
    ranking: Ranking

    @property
    def customer_ids(self) -> pa.Array:
        return self.chunk.customer_ids

    @property
    def n_customers(self) -> int:
        return self.chunk.n_customers


class KeptTopK:
    """The stored top-k of customers an incremental day recalibrates only: their history, the
    model and the candidates that could enter their top-k are those it was ranked with, but their
    recency crossed a calibration edge, which changes confidence and predicted value and nothing
    else. Ranking them again would give this ranking back (the matrix product is most of the
    scoring time), so chunks of their purchases get it from the stored rows instead.

    `recommended` (customer_id, rank, product_id, score) and `hidden` (customer_id, product_id):
    their rows of the stage's tables, in any order; `collaborative` (customer_id, collaborative):
    whether the model ranked them (the ranking's `has_signal`)."""

    def __init__(self, model: Recommender, recommended: pa.Table, hidden: pa.Table, collaborative: pa.Table):
        items = model.scorer.items
        column = items.positions(recommended["product_id"].combine_chunks()).astype(np.int64)
        hidden_column = items.positions(hidden["product_id"].combine_chunks()).astype(np.int64)
        if (column < 0).any() or (hidden_column < 0).any():
            raise ValueError("a kept product is not a model item: these customers need ranking again")
        rank = recommended["rank"].to_numpy().astype(np.int64)
        # customer by customer; within one, by rank (recommended) or by column (hidden), as ranked
        order = np.lexsort((rank, _codes(recommended["customer_id"])))
        self.column, self.rank = column[order].astype(np.int32), rank[order].astype(np.int32)
        self.score = recommended["score"].to_numpy()[order].astype(np.float32)  # stored float64 of a float32: exact
        self.recommended = _runs_by_customer(recommended["customer_id"].take(pa.array(order)))
        order = np.lexsort((hidden_column, _codes(hidden["customer_id"])))
        self.hidden_column = hidden_column[order].astype(np.int32)
        self.hidden = _runs_by_customer(hidden["customer_id"].take(pa.array(order)))
        self.collaborative = dict(zip(collaborative["customer_id"].to_pylist(), collaborative["collaborative"].to_pylist()))

    def ranking(self, chunk: CustomerChunk) -> Ranking:
        """The kept ranking of a chunk's customers, in the order `EaseScorer.rank` gives it."""
        ids = chunk.customer_ids.to_pylist()
        row, take = _gather(ids, self.recommended)
        hidden_row, hidden_take = _gather(ids, self.hidden)
        return Ranking(row=row, column=self.column[take].astype(np.int64), score=self.score[take],
                       rank=self.rank[take].astype(np.int64),
                       has_signal=np.array([bool(self.collaborative.get(i)) for i in ids], dtype=bool),
                       hidden_row=hidden_row, hidden_column=self.hidden_column[hidden_take].astype(np.int64))


def _codes(customer_ids: pa.ChunkedArray) -> np.ndarray:
    """An integer per customer (equal ids, equal codes): sorting by it groups each customer's rows."""
    return customer_ids.combine_chunks().dictionary_encode().indices.to_numpy()


def _runs_by_customer(customer_ids: pa.ChunkedArray | pa.Array) -> dict[str, tuple[int, int]]:
    """customer -> (start, stop) of their run in rows grouped by customer."""
    starts = customer_run_starts(customer_ids)
    stops = np.append(starts[1:], len(customer_ids))
    return dict(zip(customer_ids.take(pa.array(starts)).to_pylist(), zip(starts.tolist(), stops.tolist())))


def _gather(customer_ids: list[str], runs: dict[str, tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(chunk row, stored row) of the stored rows of each chunk customer, customer by customer."""
    rows, takes = [], []
    for row, customer in enumerate(customer_ids):
        if customer in runs:
            start, stop = runs[customer]
            rows.append(np.full(stop - start, row, dtype=np.int64))
            takes.append(np.arange(start, stop, dtype=np.int64))
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(rows), np.concatenate(takes)


def score_chunk_safely(shared: tuple[Recommender, Candidates, bool], chunk: CustomerChunk | KeptChunk
                       ) -> tuple[RecommendationChunk | None, Exception | None]:
    """(result, None) or (None, error) for one chunk, so that a bad chunk is dead-lettered and the
    others go on. `shared` = (model, candidates, track_hidden): what a compute engine sends to
    each worker once (recsys/engines.py). A KeptChunk keeps its ranking."""
    model, candidates, track_hidden = shared
    try:
        if isinstance(chunk, KeptChunk):
            return model.score_chunk(chunk.chunk, candidates, track_hidden=track_hidden, kept=chunk.ranking), None
        return model.score_chunk(chunk, candidates, track_hidden=track_hidden), None
    except Exception as error:  # noqa: BLE001 - returned, logged and dead-lettered by the caller
        return None, error


# ---- ordered parallel map --------------------------------------------------------------------


def ordered_parallel_map(function: Callable, items: Iterable, workers: int) -> Iterator:
    """map(function, items) on `workers` threads, results in input order, bounded look-ahead.

    At most workers + 1 items are in flight, so memory stays at a few chunks.
    """
    if workers <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        in_flight: deque[Future] = deque()
        for item in items:
            in_flight.append(pool.submit(function, item))
            if len(in_flight) > workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()

