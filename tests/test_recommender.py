"""The recommender core on small synthetic data: rules, determinism, chunking, bad input."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import scipy.sparse as sp

from recsys.calibration import GroupedCalibrator, IsotonicCalibrator
from recsys.ease import (GROUP_WIDTH, _group_max, column_block_width, solve_ease_in_place, times_column_blocks,
                         to_column_blocks_in_place, top_k_stable)
from recsys.purchases import PurchasesNotGrouped, iter_customer_chunks
from recsys.recommender import (
    COLLABORATIVE,
    POPULARITY,
    REASON_NO_MODEL,
    REASON_NO_STOCK,
    KeptChunk,
    KeptTopK,
    Recommender,
    RecommenderConfig,
    score_chunk_safely,
)
from recsys.customer_vectors import ProductEmbeddings
from recsys.synthetic import SyntheticRetail

DATA = SyntheticRetail(customers=800, products=400, topics=10, lines_per_customer=8, seed=3, batch_customers=300)
ROOT = Path(__file__).resolve().parents[1]
AS_OF = DATA.start + timedelta(days=300)
CONFIG = RecommenderConfig(top_k=5, fit_chunk_customers=128, score_chunk_customers=64, calibration_customers=400)


@pytest.fixture(scope="module")
def purchases() -> pa.Table:
    return pa.Table.from_batches(list(DATA.batches()))


@pytest.fixture(scope="module")
def model(purchases) -> Recommender:
    return Recommender.fit(purchases, config=CONFIG, as_of=AS_OF)


def recommend_all(model, purchases, catalog, **kwargs) -> tuple[pa.Table, list]:
    parts = list(model.recommend(purchases, catalog, **kwargs))
    table = pa.Table.from_batches([p.recommendations for p in parts], schema=parts[0].recommendations.schema)
    return table, parts


def test_fit_report_describes_the_model(model):
    report = model.report
    assert report.customers == DATA.customers
    assert 0 < report.model_items <= DATA.products
    assert 0.9 < report.purchase_pairs_covered_by_model <= 1.0
    assert report.calibration["status"] == "calibrated"
    assert report.calibration["sampled_customers"] > 100


def test_same_inputs_give_identical_outputs(purchases, model):
    again = Recommender.fit(purchases, config=CONFIG, as_of=AS_OF)
    first, _ = recommend_all(model, purchases, DATA.catalog())
    second, _ = recommend_all(again, purchases, DATA.catalog())
    assert first.num_rows > 0
    assert first.equals(second)


def test_chunk_size_threads_and_input_batching_do_not_change_results(purchases, model):
    one_chunk, _ = recommend_all(model, purchases, DATA.catalog(), chunk_customers=100_000, workers=1)
    small_chunks, _ = recommend_all(model, purchases, DATA.catalog(), chunk_customers=7, workers=2)
    # batches of 37 rows cut customers in the middle: the reader must carry them over
    rebatched = pa.Table.from_batches(purchases.to_batches(max_chunksize=37))
    odd_batches, _ = recommend_all(model, lambda: rebatched.to_batches(max_chunksize=37), DATA.catalog(), chunk_customers=50)
    assert one_chunk.equals(small_chunks)
    assert one_chunk.equals(odd_batches)


def test_never_recommends_bought_or_out_of_stock_items(purchases, model):
    catalog = DATA.catalog()
    recommended, _ = recommend_all(model, purchases, catalog)
    history = purchases.filter(pc.less(purchases["purchased_at"], pa.scalar(AS_OF, pa.timestamp("us"))))
    bought = set(zip(history["customer_id"].to_pylist(), history["product_id"].to_pylist()))
    pairs = set(zip(recommended["customer_id"].to_pylist(), recommended["product_id"].to_pylist()))
    in_stock = set(catalog.filter(catalog["in_stock"])["product_id"].to_pylist())
    out_of_stock = set(catalog["product_id"].to_pylist()) - in_stock
    assert out_of_stock, "the fixture must have out-of-stock products for this test to mean anything"
    assert not pairs & bought
    assert set(recommended["product_id"].to_pylist()) <= in_stock


def test_outputs_are_ranked_bounded_and_tie_broken_by_product_id(purchases, model):
    recommended, _ = recommend_all(model, purchases, DATA.catalog())
    frame = recommended.to_pandas()
    assert frame["confidence"].between(0, 1).all()
    assert (frame["predicted_value"] >= 0).all()
    assert frame["confidence"].max() > 0, "a calibrated model gives some positive confidence"
    assert set(frame["strategy"]) <= {COLLABORATIVE, POPULARITY}
    for _, rows in frame.groupby("customer_id"):
        assert list(rows["rank"]) == list(range(1, len(rows) + 1))
        assert len(rows) <= CONFIG.top_k
        expected = rows.sort_values(["score", "product_id"], ascending=[False, True])
        assert list(rows["product_id"]) == list(expected["product_id"])
    # confidence is a monotone map of the score within a strategy
    for _, rows in frame.groupby("strategy"):
        ordered = rows.sort_values("score")
        assert np.all(np.diff(ordered["confidence"].to_numpy()) >= -1e-12)


def test_customers_without_valid_purchases_get_popularity(purchases, model):
    strays = pa.table(
        {
            "customer_id": ["Z1", "Z2", "Z2", "Z3"],
            "product_id": [None, "P000001", "P000002", "P000003"],
            "amount": [None, -5.0, 0.0, 3.0],
            "purchased_at": pa.array([AS_OF - timedelta(days=1)] * 3 + [None], type=pa.timestamp("us")),
        }
    )
    table, parts = recommend_all(model, lambda: [strays.to_batches()[0]], DATA.catalog())
    assert sum(p.without_valid_purchases for p in parts) == 3
    assert sum(p.popularity for p in parts) == 3
    assert sum(p.invalid_rows for p in parts) == 4
    assert set(table["customer_id"].to_pylist()) == {"Z1", "Z2", "Z3"}
    assert set(table["strategy"].to_pylist()) == {POPULARITY}
    assert table.num_rows == 3 * CONFIG.top_k


def test_every_product_out_of_stock_gives_empty_recommendations_with_reason(purchases, model):
    catalog = DATA.catalog()
    sold_out = catalog.set_column(1, "in_stock", pa.array([False] * catalog.num_rows))
    table, parts = recommend_all(model, purchases, sold_out)
    skipped = pa.Table.from_batches([p.skipped for p in parts])
    assert table.num_rows == 0
    assert skipped.num_rows == DATA.customers
    assert set(skipped["reason"].to_pylist()) == {REASON_NO_STOCK}


def test_empty_input_fits_and_recommends_nothing():
    empty = pa.table(
        {
            "customer_id": pa.array([], pa.string()),
            "product_id": pa.array([], pa.string()),
            "amount": pa.array([], pa.float64()),
            "purchased_at": pa.array([], pa.timestamp("us")),
        }
    )
    model = Recommender.fit(empty, config=CONFIG)
    assert model.report.model_items == 0 and model.report.customers == 0
    assert list(model.recommend(empty, DATA.catalog())) == []
    newcomer = pa.table(
        {"customer_id": ["N1"], "product_id": ["P000001"], "amount": [1.0], "purchased_at": pa.array([DATA.start], pa.timestamp("us"))}
    )
    (part,) = model.recommend(newcomer, DATA.catalog())
    assert part.recommendations.num_rows == 0
    assert part.skipped["reason"].to_pylist() == [REASON_NO_MODEL]


def test_interleaved_customers_are_refused():
    interleaved = pa.table(
        {
            "customer_id": ["A", "B", "A"],
            "product_id": ["P1", "P2", "P3"],
            "amount": [1.0, 1.0, 1.0],
            "purchased_at": pa.array([DATA.start] * 3, pa.timestamp("us")),
        }
    )
    with pytest.raises(PurchasesNotGrouped):
        list(iter_customer_chunks(interleaved, 10))


def test_small_batches_are_cut_into_the_same_chunks_and_scanned_once_a_chunk(purchases, monkeypatch):
    """A source of small batches (a filtered sample) gives the chunks one big batch gives, and its
    rows are not put together and scanned again for every batch that arrives (that made a
    selection's passes over a 50,000-customer sample quadratic: 17.8 of its 46 s at 2M)."""
    import recsys.purchases as module

    small = [b for batch in purchases.to_batches() for b in pa.Table.from_batches([batch]).to_batches(max_chunksize=7)]
    assert len(small) > 500  # 7 rows each: customers continue across batches
    scans = []
    original = module.customer_run_starts
    monkeypatch.setattr(module, "customer_run_starts", lambda ids: scans.append(len(ids)) or original(ids))
    for customers in (1, 64, 250, 5_000):
        whole = list(iter_customer_chunks(purchases.combine_chunks(), customers))
        scans.clear()
        pieces = list(iter_customer_chunks(lambda: iter(small), customers))
        assert len(pieces) == len(whole), customers
        assert len(scans) <= len(whole) + 1, (customers, len(scans), len(small))
        for piece, chunk in zip(pieces, whole, strict=True):
            assert piece.customer_ids.equals(chunk.customer_ids) and piece.product_ids.equals(chunk.product_ids)
            for field in ("row_customer", "amount", "purchased_at"):
                assert np.array_equal(getattr(piece, field), getattr(chunk, field)), field
            assert piece.invalid_rows == chunk.invalid_rows


def test_max_items_bounds_the_model_and_what_it_recommends(purchases):
    small = Recommender.fit(purchases, config=replace(CONFIG, max_items=50, calibration_days=0), as_of=AS_OF)
    table, _ = recommend_all(small, purchases, DATA.catalog())
    assert small.report.model_items == 50
    assert small.report.products_beyond_max_items > 0
    assert small.candidates(DATA.catalog()).catalog_products_not_in_model > 0  # reported, not silent
    assert set(table["product_id"].to_pylist()) <= set(small.scorer.items.product_ids.to_pylist())
    assert small.report.calibration["status"].startswith("disabled")
    assert (table["confidence"].to_numpy() == 0).all()


@pytest.mark.parametrize("n_columns", [GROUP_WIDTH * 8, GROUP_WIDTH * 8 + 37, 100])  # pre-filtered, + tail, plain
def test_top_k_stable_equals_a_full_sort(n_columns):
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=(40, n_columns)).astype(np.float32)  # many ties
    scores[rng.random(scores.shape) < 0.3] = -np.inf
    scores[0, :] = -np.inf  # a row with nothing to recommend
    scores[1, :-3] = -np.inf  # a row with fewer than k candidates
    row, column, score, rank = top_k_stable(scores, 4)
    for r in range(scores.shape[0]):
        finite = np.flatnonzero(np.isfinite(scores[r]))
        expected = finite[np.lexsort((finite, -scores[r, finite]))][:4]
        assert column[row == r].tolist() == expected.tolist()
        assert rank[row == r].tolist() == list(range(1, len(expected) + 1))
        assert np.array_equal(score[row == r], scores[r, expected])


def test_group_max_is_numpys_max_over_the_middle_axis():
    scores = np.random.default_rng(3).standard_normal((5, GROUP_WIDTH * 3)).astype(np.float32)
    scores[scores < -1] = -np.inf
    grouped = scores[:, : GROUP_WIDTH * 2].reshape(5, GROUP_WIDTH, 2)  # a view of a column slice, as scored
    assert np.array_equal(_group_max(grouped), grouped.max(axis=1))


def test_ease_solve_matches_the_closed_form():
    rng = np.random.default_rng(1)
    x = (rng.random((200, GROUP_WIDTH)) < 0.1).astype(np.float32)
    gram = x.T @ x
    lam = 2.0 * gram.diagonal().mean()
    p = np.linalg.inv(gram.astype(np.float64) + lam * np.eye(GROUP_WIDTH))
    expected = -p / np.diag(p)[None, :]
    np.fill_diagonal(expected, 0.0)
    weights, strength = solve_ease_in_place(gram.copy(), GROUP_WIDTH, 2.0)
    assert strength == pytest.approx(lam, rel=1e-6)
    assert np.allclose(weights, expected, atol=1e-5)


def test_isotonic_calibrator_is_monotone_and_bounded():
    rng = np.random.default_rng(2)
    scores = rng.random(5_000)
    hits = rng.random(5_000) < scores * 0.5  # true P(hit | score) = score / 2
    calibrator = IsotonicCalibrator.fit(scores, hits)
    grid = np.linspace(-1, 2, 301)
    probabilities = calibrator(grid)
    assert np.all(np.diff(probabilities) >= 0)
    assert probabilities.min() >= 0 and probabilities.max() <= 1
    assert calibrator(np.array([0.8]))[0] == pytest.approx(0.4, abs=0.06)
    assert IsotonicCalibrator.fit(np.zeros(0), np.zeros(0)) is None


@pytest.mark.parametrize("samples", [1, 3, 5_000])
def test_isotonic_calibrator_predicts_as_scikit_learn(samples):
    """The calibrator keeps only the knots; it maps scores exactly as IsotonicRegression would,
    ties, a single sample and scores outside the fitted range included."""
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(samples)
    scores = np.round(rng.random(samples), 2)  # rounded: tied scores are pooled
    hits = (rng.random(samples) < scores).astype(np.float64)
    reference = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(scores, hits)
    grid = np.concatenate([np.linspace(-1, 2, 601), scores])
    assert np.allclose(IsotonicCalibrator.fit(scores, hits)(grid), reference.predict(grid), rtol=0, atol=1e-12)


def test_a_stored_model_loads_without_scikit_learn(model, tmp_path):
    """Neither the definitions nor a kept model need scikit-learn (its import cost every process of a run 0.6 s)."""
    assert any(c is not None for c in model.calibrators.values()), "the model under test is calibrated"
    model.save(tmp_path / "model.pkl")
    probe = ("import sys, pickle; sys.path.insert(0, {root!r}); "
             "pickle.load(open({path!r}, 'rb')); import definitions; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn'))")
    found = subprocess.run([sys.executable, "-c", probe.format(root=str(ROOT), path=str(tmp_path / "model.pkl"))],
                           capture_output=True, text=True, check=True, cwd=ROOT,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"}).stdout.strip()
    assert found == "[]"


def test_benchmark_smoke_run(tmp_path):
    """The scale benchmark at toy size, so it cannot rot (its figures are not checked)."""
    from bench.recommender import main

    out = tmp_path / "bench.json"
    assert main(["--customers", "3000", "--products", "600", "--max-items", "256", "--json-out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["customers_scored"] == 3000
    assert figures["recommendations"] + figures["customers_skipped"] > 0
    assert [stage["stage"] for stage in figures["stages"]] == ["item_scan", "validation_gram_pass", "calibration", "gram_pass", "solve",
                                                                 "score"]
    assert figures["fit_report"]["model_items"] == 256


def twin_vectors(model: Recommender, purchases: pa.Table, seed: int = 0) -> tuple[pa.Table, set, set]:
    """Random vectors for every product; half the products outside the model get a near copy of
    a model item's vector (a "twin", cosine ~0.99), the other half stay unlike anything."""
    rng = np.random.default_rng(seed)
    model_ids = model.scorer.items.product_ids.to_pylist()
    outside = sorted(set(pc.unique(purchases["product_id"]).to_pylist()) - set(model_ids))
    vectors = {pid: rng.normal(size=64) for pid in model_ids + outside}
    twins = set(outside[::2])
    for index, pid in enumerate(sorted(twins)):
        vectors[pid] = vectors[model_ids[index % len(model_ids)]] + rng.normal(scale=0.05, size=64)
    table = ProductEmbeddings.from_arrays(list(vectors), np.vstack(list(vectors.values())))
    return table, twins, set(outside) - twins


def test_products_outside_the_model_are_recommended_through_a_text_twin(purchases):
    model = Recommender.fit(purchases, config=replace(CONFIG, max_items=150), as_of=AS_OF)
    vectors, twins, unlike = twin_vectors(model, purchases)
    catalog = DATA.catalog()
    candidates = model.candidates(catalog, vectors)
    in_stock = set(pc.filter(catalog["product_id"], catalog["in_stock"]).to_pylist())
    assert candidates.cold_start_products == len(twins & in_stock) > 0
    assert model.report.cold_start["in_stock_outside_model"] == candidates.catalog_products_not_in_model

    table, parts = recommend_all(model, purchases, catalog, product_vectors=vectors)
    cold = table.filter(pc.equal(table["strategy"], "text_neighbour"))
    recommended = set(cold["product_id"].to_pylist())
    assert recommended and recommended <= twins & in_stock, "only in-stock twins, never an unlike product"
    assert sum(p.text_neighbour_recommendations for p in parts) == cold.num_rows
    # never a product the customer bought, and only for customers the model ranks (not popularity)
    bought = set(zip(*pc.filter(purchases.select(["customer_id", "product_id"]),
                                pc.less(purchases["purchased_at"], pa.scalar(AS_OF))).to_pydict().values()))
    assert not bought & set(zip(cold["customer_id"].to_pylist(), cold["product_id"].to_pylist()))
    popularity_customers = set(table.filter(pc.equal(table["strategy"], POPULARITY))["customer_id"].to_pylist())
    assert not popularity_customers & set(cold["customer_id"].to_pylist())
    # ranks stay 1..k per customer, and confidence and value are filled in
    assert max(table["rank"].to_pylist()) <= CONFIG.top_k
    assert pc.min(cold["confidence"]).as_py() >= 0 and pc.min(cold["predicted_value"]).as_py() >= 0

    # off: exactly what the model gives without vectors
    off = Recommender(replace(model.config, text_neighbour_min_similarity=None), model.scorer, model.spend,
                      model.model_spend_per_buyer, model.calibrators, model.report)
    without, _ = recommend_all(off, purchases, catalog, product_vectors=vectors)
    plain, _ = recommend_all(model, purchases, catalog)
    assert without.equals(plain)
    assert "text_neighbour" not in plain["strategy"].to_pylist()


def test_text_neighbour_ranking_equals_a_brute_force_over_every_cold_product(purchases):
    """The floor pre-filter (expand only neighbours above the k-th model score) loses nothing."""
    model = Recommender.fit(purchases, config=replace(CONFIG, max_items=150), as_of=AS_OF)
    vectors, _, _ = twin_vectors(model, purchases, seed=1)
    candidates = model.candidates(DATA.catalog(), vectors)
    neighbours, scorer, k = candidates.text_neighbours, model.scorer, CONFIG.top_k
    cold_entries = 0
    for chunk in iter_customer_chunks(purchases, 97):
        fast = scorer.rank(chunk, candidates.blocked, k, text_neighbours=neighbours)
        history = scorer.history_matrix(chunk)
        scores = scorer._scores(chunk, history, fast.has_signal)
        cold = scores[:, neighbours.neighbour] * neighbours.factor[None, :]
        cold[~fast.has_signal] = -np.inf
        before = chunk.before(scorer.as_of_us)
        position = neighbours.products.positions(before.product_ids)
        cold[before.row_customer[position >= 0], position[position >= 0]] = -np.inf
        scores[:, candidates.blocked] = -np.inf
        rows = np.repeat(np.arange(history.shape[0]), np.diff(history.indptr))
        scores[rows, history.indices] = -np.inf
        both = np.hstack([scores, cold.astype(np.float32)])
        row, column, score, rank = top_k_stable(both, k)
        assert np.array_equal(fast.row, row) and np.array_equal(fast.column, column)
        assert np.allclose(fast.score, score) and np.array_equal(fast.rank, rank)
        cold_entries += int(np.count_nonzero(fast.column >= scorer.width))
    assert cold_entries > 0


def recommended_lists(parts) -> dict[str, list[str]]:
    lists: dict[str, list[str]] = {}
    for part in parts:
        batch = part.recommendations
        for customer, product in zip(batch["customer_id"].to_pylist(), batch["product_id"].to_pylist()):
            lists.setdefault(customer, []).append(product)
    return lists


def test_hidden_products_name_every_customer_a_product_back_in_stock_would_reach(purchases, model):
    """What lets an incremental day rescore only some customers: a product coming back in stock
    changes the top-k of exactly the customers for whom it was tracked as hidden, no others."""
    catalog = DATA.catalog()
    candidates = model.candidates(catalog)
    before = [model.score_chunk(chunk, candidates, track_hidden=True) for chunk in iter_customer_chunks(purchases, 64)]
    hidden = pa.Table.from_batches([part.hidden for part in before])
    out_of_stock = set(catalog.filter(pc.invert(catalog["in_stock"]))["product_id"].to_pylist())
    back = sorted(out_of_stock)[: len(out_of_stock) // 2]
    restocked = catalog.set_column(catalog.schema.get_field_index("in_stock"), "in_stock",
                                   pc.or_(catalog["in_stock"], pc.is_in(catalog["product_id"], pa.array(back))))
    after = [model.score_chunk(chunk, model.candidates(restocked)) for chunk in iter_customer_chunks(purchases, 64)]
    old, new = recommended_lists(before), recommended_lists(after)
    changed = {c for c in old.keys() | new.keys() if old.get(c) != new.get(c)}
    reached = {c for c, p in zip(hidden["customer_id"].to_pylist(), hidden["product_id"].to_pylist()) if p in back}
    assert changed, "the fixture must have customers a restocked product reaches"
    assert changed <= reached
    # the tracking is tight: most customers it names do change
    assert len(changed) >= 0.5 * len(reached)


def bought_before(purchases: pa.Table, moment) -> set[tuple[str, str]]:
    history = purchases.filter(pc.less(purchases["purchased_at"], pa.scalar(moment, pa.timestamp("us"))))
    return set(zip(history["customer_id"].to_pylist(), history["product_id"].to_pylist()))


def test_a_kept_model_scores_a_later_day_as_the_same_model(purchases, model, tmp_path):
    """A saved model loads to the same recommendations; scoring as of a later day counts the new
    purchases as history (never recommended again), with the fit's weights and calibration."""
    model.save(tmp_path / "model.pkl")
    kept = Recommender.load(tmp_path / "model.pkl")
    first, _ = recommend_all(model, purchases, DATA.catalog())
    again, _ = recommend_all(kept, purchases, DATA.catalog())
    assert first.equals(again)
    later = AS_OF + timedelta(days=30)
    recommended, _ = recommend_all(kept.scoring_as_of(later), purchases, DATA.catalog())
    pairs = set(zip(recommended["customer_id"].to_pylist(), recommended["product_id"].to_pylist()))
    assert bought_before(purchases, later) - bought_before(purchases, AS_OF), "the fixture must buy after the fit"
    assert not pairs & bought_before(purchases, later)
    assert kept.scoring_as_of(later).report is kept.report


def test_a_kept_ranking_recalibrated_later_equals_ranking_again(purchases, model):
    """What lets an incremental day skip ranking the customers who only crossed a recency group:
    with the same history, model and candidates, ranking them again later gives back the ranking
    they have, and recalibrating the stored ranking gives the same rows, confidences, predicted
    values, hidden products and skips as scoring them again."""
    model = with_recency_calibration(model)
    candidates = model.candidates(DATA.catalog())
    chunks = [chunk.before(model.scorer.as_of_us) for chunk in iter_customer_chunks(purchases, 64)]
    before = [model.score_chunk(chunk, candidates, track_hidden=True) for chunk in chunks]
    stored = {name: pa.Table.from_batches([getattr(part, name) for part in before])
              for name in ("recommendations", "hidden", "scored")}
    # stored in another order than ranked: the kept ranking does not rely on it
    shuffled = stored["recommendations"].take(np.random.default_rng(0).permutation(stored["recommendations"].num_rows))
    kept = KeptTopK(model, shuffled.select(["customer_id", "rank", "product_id", "score"]),
                    stored["hidden"].take(np.arange(stored["hidden"].num_rows)[::-1]), stored["scored"])
    later = model.scoring_as_of(model.as_of + timedelta(days=45))
    shared = (later, candidates, True)
    for chunk, old in zip(chunks, before):
        again = later.score_chunk(chunk, candidates, track_hidden=True)
        recalibrated, error = score_chunk_safely(shared, KeptChunk(chunk, kept.ranking(chunk)))
        assert error is None
        for name in ("recommendations", "hidden", "scored", "skipped"):
            assert getattr(recalibrated, name).equals(getattr(again, name)), name
        assert again.recommendations["product_id"].equals(old.recommendations["product_id"])
        # untracked hidden products stay untracked, as ranking gives them
        untracked, _ = score_chunk_safely((later, candidates, False), KeptChunk(chunk, kept.ranking(chunk)))
        assert untracked.hidden is None and untracked.recommendations.equals(again.recommendations)
    moved = sum(pc.sum(pc.not_equal(later.score_chunk(chunk, candidates).recommendations["confidence"],
                                    old.recommendations["confidence"])).as_py() for chunk, old in zip(chunks, before))
    assert moved > 0, "45 days later some customers must have crossed a recency group"
    assert stored["hidden"].num_rows > 0


def with_recency_calibration(model: Recommender) -> Recommender:
    """The model with a confidence calibration whose recency groups have calibrators of their own
    (the fixture's few validation customers share one)."""
    rng = np.random.default_rng(1)
    scores, recency, orders = rng.random(40_000), rng.uniform(0, 400, 40_000), rng.integers(1, 10, 40_000)
    hits = rng.random(40_000) < scores * np.where(recency < 60, 0.5, 0.05)
    calibrator = GroupedCalibrator.fit(scores, hits, recency, orders)
    assert calibrator.to_dict()["groups_with_own_calibrator"] > 1
    return Recommender(model.config, model.scorer, model.spend, model.model_spend_per_buyer,
                       {COLLABORATIVE: calibrator, POPULARITY: calibrator}, model.report)


def test_the_gram_matrix_from_its_lower_triangle_gives_the_weights_of_the_full_matrix_bit_for_bit(purchases, monkeypatch):
    """Only the lower triangle is scattered while accumulating (half the writes) and mirrored
    once: the EASE and item-kNN weights equal those of scattering every entry, bit for bit."""
    import scipy.sparse as sp

    import recsys.recommender as module
    from recsys.ease import GramAccumulator

    class EveryEntry(GramAccumulator):  # the scatter as it was
        def _add_gram(self, customer, column, weight, n_customers):
            if len(column) and self.with_gram:
                x = sp.csr_matrix((weight, (customer, column)), shape=(n_customers, self.width), dtype=np.float32)
                co_purchases = (x.T @ x).tocoo()
                self.gram[co_purchases.row, co_purchases.col] += co_purchases.data

        def finish(self):
            pass

    for model in ("ease", "item_knn"):
        config = replace(CONFIG, model=model, calibration_days=0)
        lower = Recommender.fit(purchases, config, as_of=AS_OF).scorer.weights
        with monkeypatch.context() as patch:
            patch.setattr(module, "GramAccumulator", EveryEntry)
            every = Recommender.fit(purchases, config, as_of=AS_OF).scorer.weights
        assert lower.shape == every.shape and lower.size and np.array_equal(lower, every), model


def from_column_blocks(blocks: np.ndarray) -> np.ndarray:
    n_blocks, rows, width = blocks.shape
    return np.ascontiguousarray(blocks.transpose(1, 0, 2)).reshape(rows, n_blocks * width)


@pytest.mark.parametrize("rows, columns, width", [(6, 12, 4), (384, 384, 64), (384, 384, 128), (384, 384, 192),
                                                  (130, 256, 64), (7, 5, 5)])
def test_column_blocks_are_the_matrix_column_slices_in_its_own_buffer(rows, columns, width):
    matrix = np.random.default_rng(rows).random((rows, columns), dtype=np.float32)
    original = matrix.copy()
    blocks = to_column_blocks_in_place(matrix, width)
    assert np.shares_memory(blocks, matrix) and blocks.flags.c_contiguous
    assert blocks.shape == (columns // width, rows, width)
    for j in range(columns // width):
        assert np.array_equal(blocks[j], original[:, j * width:(j + 1) * width])
    assert np.array_equal(from_column_blocks(blocks), original)


def test_column_block_widths():
    assert [column_block_width(w) for w in (64, 2048, 8192, 4096, 3520, 2112, 3008, 2240)] == [
        64, 2048, 1024, 1024, 704, 704, 3008, 2240]  # 3008 = 47 x 64, 2240 = 35 x 64: no divisor of 512 or more


def test_scores_from_column_blocks_equal_the_whole_product_bit_for_bit():
    rng = np.random.default_rng(5)
    weights = rng.standard_normal((384, 384), dtype=np.float32)
    history = sp.random(300, 384, density=0.05, format="csr", dtype=np.float32, random_state=6)
    expected = np.asarray(history @ weights)
    assert np.array_equal(times_column_blocks(history, to_column_blocks_in_place(weights.copy(), 128)), expected)


def test_a_model_scored_by_column_blocks_recommends_as_with_one_block(purchases, model, monkeypatch, tmp_path):
    """The fixture's weights (448 columns) are one block by default; in 64-column blocks (seven)
    every recommendation and score is the same, and a model saved before the blocks (M x M)
    loads into blocks and recommends the same too."""
    import recsys.ease as ease

    catalog = DATA.catalog()
    one_block, _ = recommend_all(model, purchases, catalog)
    assert model.scorer.weights.shape[0] == 1
    monkeypatch.setattr(ease, "ONE_BLOCK_UP_TO", 0)
    monkeypatch.setattr(ease, "COLUMN_BLOCK_WIDTH", 64)
    blocked = Recommender.fit(purchases, config=CONFIG, as_of=AS_OF)
    assert blocked.scorer.weights.shape[0] == blocked.scorer.width // 64 > 1
    assert recommend_all(blocked, purchases, catalog)[0].equals(one_block)
    legacy = copy.copy(blocked)
    legacy.scorer = copy.copy(blocked.scorer)
    object.__setattr__(legacy.scorer, "weights", from_column_blocks(blocked.scorer.weights))  # as pickled before
    legacy.save(tmp_path / "model.pkl")
    loaded = Recommender.load(tmp_path / "model.pkl")
    assert loaded.scorer.weights.ndim == 3
    assert recommend_all(loaded, purchases, catalog)[0].equals(one_block)
