"""Customer segments: k choice, stable ids, empty segments, profiles, names."""

from __future__ import annotations

import datetime as dt
import json

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from recsys.clustering import SegmentingConfig, fit_segments
from recsys.customer_vectors import ProductEmbeddings
from recsys.customer_sample import CustomerSample, id_priorities
from recsys.segment_ids import SegmentModel, drop_empty_segments, match_segment_ids
from recsys.segment_names import fallback_names, naming_messages, parse_segment_names
from recsys.segment_profiles import RfmSummary, SegmentProfile, SegmentProfiler

DIMS = 48
CONFIG = SegmentingConfig(k_min=3, k_max=9, silhouette_sample=1500)


def unit(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def planted_centers(k: int, seed: int) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((k, DIMS)))


def planted_customers(centers: np.ndarray, n: int, seed: int, first_id: int = 0):
    """Customers scattered around the centers: (ids, unit vectors float32, true cluster)."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, len(centers), n)
    vectors = unit(centers[truth] + 0.1 * rng.standard_normal((n, DIMS))).astype(np.float32)
    ids = [f"c{first_id + i:07d}" for i in range(n)]
    return ids, vectors, truth


def fit(ids, vectors, previous=None, config=CONFIG, sample_size=3000):
    sample = CustomerSample(sample_size, seed=0)
    for start in range(0, len(ids), 1000):
        sample.add(pa.array(ids[start : start + 1000]), vectors[start : start + 1000])
    return fit_segments(sample.vectors, previous, config)


def perturbed(ids, vectors, seed: int, fraction: float = 0.02):
    """2 % of customers gone, 2 % new ones, every vector moved by 2 % of its length."""
    rng = np.random.default_rng(seed)
    keep = rng.random(len(ids)) >= fraction
    noise = unit(rng.standard_normal(vectors.shape)) * fraction
    moved = unit(vectors + noise).astype(np.float32)
    return [i for i, k in zip(ids, keep) if k], moved[keep]


def same_id_share(ids_a, labels_a, ids_b, labels_b) -> float:
    before = dict(zip(ids_a, labels_a.tolist()))
    common = [(before[i], label) for i, label in zip(ids_b, labels_b.tolist()) if i in before]
    return sum(a == b for a, b in common) / len(common)


def majority(labels: np.ndarray) -> int:
    values, counts = np.unique(labels, return_counts=True)
    return int(values[np.argmax(counts)])


def test_k_by_silhouette_finds_the_planted_segments():
    ids, vectors, truth = planted_customers(planted_centers(6, seed=1), 6000, seed=2)
    result = fit(ids, vectors)
    assert result.model.k == 6
    assert sorted(result.silhouette_by_k) == list(range(3, 10))
    assert max(result.silhouette_by_k, key=result.silhouette_by_k.get) == 6
    labels = result.model.assign(vectors)
    purity = sum((labels[truth == c] == majority(labels[truth == c])).mean() for c in range(6)) / 6
    assert purity > 0.98
    # Without a previous model, ids are 0..k-1 by decreasing size.
    sizes = np.bincount(labels)
    assert result.model.segment_ids.tolist() == list(range(6))
    assert (np.diff(sizes) <= len(ids) * 0.02).all()


@pytest.mark.parametrize("warm_start", [True, False])
def test_ids_survive_a_two_percent_perturbation(warm_start):
    ids, vectors, _ = planted_customers(planted_centers(7, seed=3), 6000, seed=4)
    first = fit(ids, vectors)
    labels_first = first.model.assign(vectors)
    new_ids, new_vectors, _ = planted_customers(planted_centers(7, seed=3), 120, seed=5, first_id=10**6)
    kept_ids, kept_vectors = perturbed(ids, vectors, seed=6)
    ids_second, vectors_second = kept_ids + new_ids, np.concatenate([kept_vectors, new_vectors])
    # Another k-means seed: without the warm start, only the Hungarian matching keeps the ids.
    config = SegmentingConfig(**{**CONFIG.__dict__, "warm_start": warm_start, "seed": 11})
    second = fit(ids_second, vectors_second, previous=first.model, config=config)
    assert second.kept_ids == first.model.segment_ids.tolist()
    assert second.new_ids == [] and second.retired_ids == []
    assert same_id_share(ids, labels_first, ids_second, second.model.assign(vectors_second)) >= 0.95


def test_ids_survive_a_two_percent_perturbation_of_pooled_purchases():
    """The harder case: pooled vectors of synthetic purchases, clusters that touch."""
    from bench.segments import AS_OF, iter_synthetic_purchases, synthetic_catalog
    from recsys.customer_vectors import iter_customer_vectors

    catalog = synthetic_catalog(n_products=3000, n_archetypes=8, seed=7)
    table = pa.Table.from_batches(list(iter_synthetic_purchases(catalog, 8000, 10, seed=8)))
    rng = np.random.default_rng(9)
    # 2 % of the purchase lines gone, every amount within +-2 %.
    changed = table.filter(pa.array(rng.random(table.num_rows) >= 0.02))
    amounts = changed.column("amount").to_numpy() * rng.uniform(0.98, 1.02, changed.num_rows)
    changed = changed.set_column(2, "amount", pa.array(amounts))
    runs = []
    previous = None
    for purchases in (table, changed):
        chunks = list(iter_customer_vectors(purchases.to_batches(50_000), catalog.products, as_of=AS_OF))
        ids = [i for c in chunks for i in c.customer_ids.to_pylist()]
        vectors = np.concatenate([c.vectors for c in chunks])
        config = SegmentingConfig(silhouette_sample=2000)
        result = fit(ids, vectors, previous=previous, config=config, sample_size=5000)
        runs.append((ids, result.model.assign(vectors)))
        previous = result.model
    assert same_id_share(*runs[0], *runs[1]) >= 0.95


def test_when_the_data_moves_the_centroids_follow_and_keep_their_ids():
    centers = planted_centers(5, seed=30)
    ids, vectors, truth = planted_customers(centers, 4000, seed=31)
    first = fit(ids, vectors)
    drifted = unit(centers + 0.35 * np.random.default_rng(32).standard_normal(centers.shape) / np.sqrt(DIMS))
    assert (np.sum(drifted * centers, axis=1) < 0.97).all()
    ids_second, vectors_second, truth_second = planted_customers(drifted, 4000, seed=33, first_id=10**6)
    second = fit(ids_second, vectors_second, previous=first.model)
    assert second.init == "refit from the previous centroids"
    assert second.kept_ids == first.model.segment_ids.tolist()
    labels_first, labels_second = first.model.assign(vectors), second.model.assign(vectors_second)
    for cluster in range(5):
        assert majority(labels_first[truth == cluster]) == majority(labels_second[truth_second == cluster])


def test_a_new_cluster_gets_a_fresh_id_and_the_others_keep_theirs():
    centers = planted_centers(6, seed=12)
    ids, vectors, _ = planted_customers(centers[:5], 5000, seed=13)
    first = fit(ids, vectors)
    assert first.model.k == 5
    newcomers, newcomer_vectors, _ = planted_customers(centers[5:], 900, seed=14, first_id=10**6)
    ids_second, vectors_second = ids + newcomers, np.concatenate([vectors, newcomer_vectors])
    second = fit(ids_second, vectors_second, previous=first.model)
    assert second.model.k == 6
    assert second.new_ids == [5] and second.retired_ids == []
    labels = second.model.assign(vectors_second)
    assert same_id_share(ids, first.model.assign(vectors), ids_second, labels) >= 0.95
    assert (labels[len(ids):] == 5).mean() >= 0.95


def test_a_vanished_cluster_retires_its_id():
    ids, vectors, truth = planted_customers(planted_centers(6, seed=15), 6000, seed=16)
    first = fit(ids, vectors)
    labels_first = first.model.assign(vectors)
    gone = majority(labels_first[truth == 2])
    stay = truth != 2
    ids_second, vectors_second = [i for i, s in zip(ids, stay) if s], vectors[stay]
    second = fit(ids_second, vectors_second, previous=first.model)
    assert second.model.k == 5
    assert second.retired_ids == [gone] and second.new_ids == []
    assert gone not in second.model.segment_ids.tolist()
    assert same_id_share(ids, labels_first, ids_second, second.model.assign(vectors_second)) >= 0.95


def test_a_segment_nobody_joins_is_dropped_and_reported():
    ids, vectors, _ = planted_customers(planted_centers(4, seed=17), 3000, seed=18)
    fitted = fit(ids, vectors).model
    away = -unit(vectors.mean(axis=0, keepdims=True))
    centroids = np.concatenate([fitted.centroids, away]).astype(np.float32)
    model = SegmentModel(np.append(fitted.segment_ids, 9), centroids)

    profiler = SegmentProfiler(model.segment_ids, pa.array(["p"]))
    labels = model.assign(vectors)
    profiler.add(labels)
    assert profiler.sizes[9] == 0
    kept, dropped = drop_empty_segments(model, profiler.sizes)
    assert dropped == [9] and kept.segment_ids.tolist() == fitted.segment_ids.tolist()
    ones = np.ones(len(labels))
    assert 9 not in [p.segment_id for p in profiler.profiles(*rfm_by_hand(labels, ones, ones, ones))]

    # In the fit: a previous centroid that no sampled customer is near is dropped too, not reseeded.
    config = SegmentingConfig(**{**CONFIG.__dict__, "k_min": 5, "k_max": 5, "warm_start_slack": 1.0})
    refit = fit(ids, vectors, previous=model, config=config)
    assert refit.init.startswith("previous centroids")
    assert refit.dropped_empty == 1 and refit.retired_ids == [9]
    assert refit.model.segment_ids.tolist() == fitted.segment_ids.tolist()


def test_fitting_is_deterministic():
    ids, vectors, _ = planted_customers(planted_centers(5, seed=19), 4000, seed=20)
    first, second = fit(ids, vectors), fit(ids, vectors)
    np.testing.assert_array_equal(first.model.centroids, second.model.centroids)
    np.testing.assert_array_equal(first.model.segment_ids, second.model.segment_ids)
    assert first.summary() == second.summary()


def test_the_sample_depends_neither_on_chunking_nor_on_order():
    ids, vectors, _ = planted_customers(planted_centers(3, seed=21), 5000, seed=22)
    forward = CustomerSample(700, seed=3)
    for start in range(0, len(ids), 100):
        forward.add(pa.array(ids[start : start + 100]), vectors[start : start + 100])
    backward = CustomerSample(700, seed=3)
    for stop in range(len(ids), 0, -333):
        start = max(stop - 333, 0)
        backward.add(pa.array(ids[start:stop]), vectors[start:stop])
    assert len(forward) == 700
    assert forward.customer_ids.to_pylist() == backward.customer_ids.to_pylist()
    np.testing.assert_array_equal(forward.vectors, backward.vectors)
    other_seed = CustomerSample(700, seed=4)
    other_seed.add(pa.array(ids), vectors)
    assert set(other_seed.customer_ids.to_pylist()) != set(forward.customer_ids.to_pylist())


def reference_priority(text: str, seed: int) -> int:
    """FNV-1a 64 then splitmix64, in plain Python."""
    mask = 2**64 - 1

    def splitmix(z: int) -> int:
        z = (z + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    h = 0xCBF29CE484222325
    for byte in text.encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) & mask
    return splitmix(h ^ splitmix(seed))


def test_id_priorities_match_a_plain_python_reference():
    texts = ["", "17850", "c0000001", "Zoë-Ø-客户", "x" * 70]
    array = pa.array(texts).slice(0)
    for seed in (0, 42):
        assert id_priorities(array, seed).tolist() == [reference_priority(t, seed) for t in texts]
    assert id_priorities(pa.array(texts[1:3]), 0).tolist() == id_priorities(array, 0)[1:3].tolist()
    assert id_priorities(array.slice(1, 2), 0).tolist() == id_priorities(array, 0)[1:3].tolist()


def test_hungarian_matching_follows_the_centroids_not_their_order():
    rng = np.random.default_rng(23)
    old = planted_centers(4, seed=24)
    previous = SegmentModel(np.array([3, 7, 11, 12]), old.astype(np.float32))
    nudged = unit(old + 0.05 * rng.standard_normal(old.shape))
    brand_new = planted_centers(1, seed=25)
    centroids = np.concatenate([nudged[[2, 0, 1]], brand_new])        # 12 has no successor
    sizes = np.array([5, 4, 3, 9])
    ids, kept, new, retired = match_segment_ids(centroids, sizes, previous, max_match_distance=0.3)
    assert ids.tolist() == [11, 3, 7, 13]
    assert kept == [3, 7, 11] and new == [13] and retired == [12]


def profiler_with_two_segments() -> tuple[SegmentProfiler, dict]:
    products = pa.array(["p0", "p1", "p2", "p3"])
    category_of = {"p0": "Home", "p1": "Home", "p2": "Garden"}     # p3: uncategorized
    labels = np.array([1, 1, 1, 4, 4, 4, 4])
    recency = np.array([2, 10, 4, 100, 90, 120, 80])
    frequency = np.array([5, 7, 6, 1, 1, 2, 1])
    monetary = np.array([500.0, 900.0, 700.0, 20.0, 30.0, 25.0, 35.0])
    spend = sp.csr_matrix(np.array([
        [300, 0, 0, 0], [500, 100, 0, 0], [400, 0, 0, 10],
        [0, 0, 20, 0], [0, 0, 30, 0], [5, 0, 20, 0], [0, 0, 35, 0],
    ], dtype=float))
    profiler = SegmentProfiler([4, 1], products)
    data = dict(labels=labels, recency=recency, frequency=frequency, monetary=monetary, spend=spend)
    return profiler, data | {"category_of": category_of}


def rfm_by_hand(labels, recency, frequency, monetary) -> tuple[dict[int, RfmSummary], RfmSummary]:
    """What segments.segment_rfm reads from analytics.customer_features, computed here by hand."""
    def summary(rows):
        return RfmSummary(*(float(f(column[rows])) for column in (recency, frequency, monetary)
                            for f in (np.mean, np.median)))
    everyone = summary(np.ones(len(labels), dtype=bool))
    return {int(label): summary(labels == label) for label in np.unique(labels)}, everyone


def test_profiles_from_chunks_by_hand():
    profiler, d = profiler_with_two_segments()
    profiler.add(d["labels"], d["spend"])
    home, garden = profiler.profiles(*rfm_by_hand(d["labels"], d["recency"], d["frequency"], d["monetary"]),
                                     d["category_of"])
    assert (home.segment_id, home.size, garden.segment_id, garden.size) == (1, 3, 4, 4)
    assert home.share == pytest.approx(3 / 7)
    assert (home.recency_days_mean, home.recency_days_median) == (pytest.approx(16 / 3), 4)
    assert (garden.recency_days_median, garden.frequency_median) == (95, 1)
    assert home.monetary_median == 700
    assert garden.monetary_median == 27.5
    assert garden.monetary_mean == pytest.approx(27.5)
    assert home.top_products == (("p0", 3), ("p1", 1), ("p3", 1))
    assert [c for c, _ in home.top_categories] == ["Home", "uncategorized"]
    assert home.top_categories[0][1] == pytest.approx(1300 / 1310)
    assert garden.top_categories == (("Garden", pytest.approx(105 / 110)), ("Home", pytest.approx(5 / 110)))
    # Everyone's medians: recency 80 days, frequency 2 days, monetary 35.
    assert home.name == "Home loyalists · high value"
    assert garden.name == "Garden regulars · mid value"   # 95 days < 2 x 80; 27.5 > 35 / 1.5


def test_profiles_are_the_same_whatever_the_chunking():
    whole, d = profiler_with_two_segments()
    whole.add(d["labels"], d["spend"])
    parts, _ = profiler_with_two_segments()
    for rows in (slice(0, 2), slice(2, 5), slice(5, 7)):
        parts.add(d["labels"][rows], d["spend"][rows])
    rfm = rfm_by_hand(d["labels"], d["recency"], d["frequency"], d["monetary"])
    assert whole.profiles(*rfm, d["category_of"]) == parts.profiles(*rfm, d["category_of"])


def profile(**values) -> SegmentProfile:
    base = dict(segment_id=0, size=10, share=0.5, recency_days_mean=20, recency_days_median=20,
                frequency_mean=3, frequency_median=3, monetary_mean=100, monetary_median=100,
                top_products=(), top_categories=(("Toys", 0.5), ("Garden", 0.3), ("Home", 0.04)), name="")
    return SegmentProfile(**(base | values))


@pytest.mark.parametrize(
    "values, name",
    [
        ({}, "Garden regulars · mid value"),   # Garden: 0.3 here vs 0.1 overall, the highest lift
        ({"recency_days_median": 61}, "Garden lapsed · mid value"),
        ({"recency_days_median": 59}, "Garden regulars · mid value"),
        ({"frequency_median": 4.5}, "Garden loyalists · mid value"),
        ({"frequency_median": 1, "recency_days_median": 10}, "Garden newcomers · mid value"),
        ({"monetary_median": 150}, "Garden regulars · high value"),
        ({"monetary_median": 66}, "Garden regulars · low value"),
        ({"top_categories": (("uncategorized", 0.9),)}, "Segment 0 regulars · mid value"),
    ],
)
def test_fallback_name_rules(values, name):
    medians = {"recency_days": 30, "frequency": 3, "monetary": 100}
    shares = {"Toys": 0.5, "Garden": 0.1, "Home": 0.01}     # Home: lift 4 but under 5 % of spend
    assert fallback_names([profile(**values)], medians, shares) == {0: name}


def test_fallback_names_are_unique_even_when_profiles_look_alike():
    profiler = SegmentProfiler([0, 1], pa.array(["p"]))
    labels = np.array([0, 1])
    profiler.add(labels, sp.csr_matrix(np.array([[1.0], [1.0]])))
    rfm = rfm_by_hand(labels, np.array([5, 5]), np.array([2, 2]), np.array([10.0, 10.0]))
    names = [p.name for p in profiler.profiles(*rfm, {"p": "Toys"})]
    assert names == ["Toys regulars · mid value #0", "Toys regulars · mid value #1"]


def test_profiler_refuses_labels_it_does_not_know():
    profiler = SegmentProfiler([0, 2], pa.array(["p"]))
    with pytest.raises(ValueError, match="segment labels"):
        profiler.add(np.array([1]))


def test_naming_prompt_carries_every_segment():
    profiler, d = profiler_with_two_segments()
    profiler.add(d["labels"], d["spend"])
    rfm = rfm_by_hand(d["labels"], d["recency"], d["frequency"], d["monetary"])
    messages = naming_messages(profiler.profiles(*rfm, d["category_of"]), {"p0": "Velvet cushion"})
    assert [m["role"] for m in messages] == ["system", "user"]
    facts = json.loads(messages[1]["content"].split("\n")[1])
    assert [f["segment_id"] for f in facts] == ["1", "4"]
    assert facts[0]["top_products"][0] == "Velvet cushion"


def test_a_well_formed_answer_gives_the_names():
    answer = '```json\n{"1": "Cosy home  lovers", "4": "Weekend gardeners"}\n```'
    assert parse_segment_names(answer, [1, 4]) == {1: "Cosy home lovers", 4: "Weekend gardeners"}


@pytest.mark.parametrize(
    "answer",
    [
        None,
        "",
        "Here are the names: Cosy home lovers, Weekend gardeners",
        '{"1": "Cosy home lovers"}',                                    # an id missing
        '{"1": "Cosy home lovers", "4": "Gardeners", "5": "Extra"}',   # an id too many
        '{"1": "Cosy home lovers", "04": "Gardeners"}',
        '{"1": "Cosy home lovers", "4": ""}',
        '{"1": "Cosy home lovers", "4": 7}',
        '{"1": "Cosy home lovers", "4": "' + "x" * 41 + '"}',
        '{"1": "Same", "4": "same"}',
        '{"1": "Cosy\\u0007home", "4": "Gardeners"}',
        '[["1", "Cosy"], ["4", "Gardeners"]]',
        '{"segments": {"1": "Cosy", "4": "Gardeners"}}',
    ],
)
def test_a_malformed_answer_gives_none(answer):
    assert parse_segment_names(answer, [1, 4]) is None


def test_the_model_round_trips_through_arrow():
    ids, vectors, _ = planted_customers(planted_centers(4, seed=26), 2000, seed=27)
    model = fit(ids, vectors).model
    shuffled = SegmentModel(model.segment_ids[::-1] + 10, model.centroids[::-1].copy())
    back = SegmentModel.from_arrow(shuffled.to_arrow())
    assert back.segment_ids.tolist() == sorted(shuffled.segment_ids.tolist())
    np.testing.assert_array_equal(back.assign(vectors), shuffled.assign(vectors))


def test_a_label_is_the_nearest_centroid_and_the_cosine_to_it():
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((500, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    model = SegmentModel(np.array([4, 9, 17]), rng.standard_normal((3, 16)).astype(np.float32) * [[1.0], [2.0], [0.5]])
    labels, similarity = model.label(vectors)
    nearest = np.argmin(((vectors[:, None, :] - model.centroids[None]) ** 2).sum(axis=2), axis=1)
    assert (labels == model.segment_ids[nearest]).all() and (labels == model.assign(vectors)).all()
    unit = model.centroids / np.linalg.norm(model.centroids, axis=1, keepdims=True)
    assert similarity.dtype == np.float32
    np.testing.assert_allclose(similarity, (vectors * unit[nearest]).sum(axis=1), atol=1e-6)


def test_a_customers_label_and_cosine_do_not_depend_on_who_is_labelled_with_them():
    """An incremental day labels a few customers, a full one everyone: each customer must get the
    same bits either way (a matrix product's rounding moves with the batch, up to 1e-6)."""
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((5_000, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    model = SegmentModel(np.arange(12), rng.standard_normal((12, 384)).astype(np.float32))
    labels, cosine = model.label(vectors)
    for size in (1, 7, 100, 1_001):
        some = np.sort(rng.choice(len(vectors), size, replace=False))
        some_labels, some_cosine = model.label(vectors[some])
        np.testing.assert_array_equal(some_labels, labels[some])
        np.testing.assert_array_equal(some_cosine, cosine[some])


def test_identical_customers_make_one_segment_and_the_rest_are_dropped_as_empty():
    same = np.tile(unit(np.ones((1, DIMS))), (200, 1)).astype(np.float32)
    result = fit_segments(same, config=CONFIG)
    assert result.model.k == 1 and result.dropped_empty == result.chosen_k - 1
    assert set(result.model.assign(same).tolist()) == {0}


def test_a_sample_smaller_than_k_min_still_gets_segments_and_fewer_than_3_customers_share_one():
    ids, vectors, _ = planted_customers(planted_centers(2, seed=28), 4, seed=29)
    assert fit_segments(vectors, config=CONFIG).chosen_k in (2, 3)
    two = fit_segments(vectors[:2], config=CONFIG)
    assert two.model.k == 1 and two.silhouette_by_k == {} and "too few customers" in two.k_reason
    np.testing.assert_allclose(two.model.centroids[0], vectors[:2].mean(axis=0), rtol=1e-6)
    assert fit_segments(vectors[:1], config=CONFIG).model.assign(vectors[:1]).tolist() == [two.model.segment_ids[0]]
    with pytest.raises(ValueError, match="at least one customer"):
        fit_segments(vectors[:0], config=CONFIG)


def test_the_benchmark_runs_at_small_scale(tmp_path):
    """The CI smoke run of bench/segments.py, so that it cannot rot."""
    from bench.segments import main

    out = tmp_path / "segments.json"
    arguments = ["--customers", "3000", "--products", "800", "--sample-size", "1500", "--json-out", str(out)]
    assert main(arguments) == 0
    result = json.loads(out.read_text())
    assert [s["stage"] for s in result["stages"]] == ["pooling", "fitting", "assigning"]
    assert result["stages"][0]["rows"] == result["pooling_report"]["lines_in"] > 3000
    assert result["stages"][2]["rows"] == sum(s["size"] for s in result["segments"]) == 3000
    assert all(stage["peak_rss_mib"] > 0 for stage in result["stages"])


def test_segment_checks_warn_when_one_segment_swallows_the_base_or_customers_switch():
    from assets.infer.segments import SegmentsConfig, kept_share, segment_verdicts
    from recsys.segment_ids import SegmentModel

    vectors = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]], dtype=np.float32)
    before = SegmentModel(np.array([1, 2]), np.array([[0.0, 0.0], [5.0, 5.0]], dtype=np.float32))
    swapped = SegmentModel(np.array([1, 2]), np.array([[5.0, 5.0], [0.0, 0.0]], dtype=np.float32))
    assert kept_share(None, before, vectors) is None
    assert kept_share(before, before, vectors) == 1.0 and kept_share(before, swapped, vectors) == 0.0

    config = SegmentsConfig()
    balanced = {c.check_name: c for c in segment_verdicts({"segment_sizes": {"1": 50, "2": 50}, "kept_segment_share": 0.9}, config)}
    assert all(c.passed for c in balanced.values())
    skewed = {c.check_name: c for c in segment_verdicts({"segment_sizes": {"1": 70, "2": 30}, "kept_segment_share": 0.5}, config)}
    assert not skewed["segment_size_balance"].passed and skewed["segment_size_balance"].metadata["largest_share"].value == 0.7
    assert not skewed["segment_stability"].passed and skewed["segment_stability"].severity == dg.AssetCheckSeverity.WARN
    first = {c.check_name: c for c in segment_verdicts({"segment_sizes": {"1": 5}}, config)}
    assert first["segment_stability"].passed and "nothing to compare" in first["segment_stability"].description


def test_segments_sharing_a_lead_category_are_told_apart_by_their_second():
    medians = {"recency_days": 30, "frequency": 3, "monetary": 100}
    shares = {"Kitchen": 0.1, "Garden": 0.1, "Toys": 0.1}
    first = profile(segment_id=1, top_categories=(("Kitchen", 0.6), ("Garden", 0.3)))
    second = profile(segment_id=2, top_categories=(("Kitchen", 0.6), ("Toys", 0.3)))
    assert fallback_names([first, second], medians, shares) == {
        1: "Kitchen & Garden regulars · mid value", 2: "Kitchen & Toys regulars · mid value"}


def test_a_catalog_without_categories_gets_topics_named_from_product_text():
    from recsys.product_topics import infer_topics

    rng = np.random.default_rng(3)
    kinds = {"mug": "ceramic tea mug", "bag": "jumbo shopping bag", "candle": "scented wax candle"}
    centres = {kind: rng.normal(size=16) for kind in kinds}
    ids, vectors, names = [], [], {}
    for kind, text in kinds.items():
        for i in range(30):
            pid = f"{kind}-{i:02d}"
            ids.append(pid)
            vectors.append(centres[kind] + 0.05 * rng.normal(size=16))
            names[pid] = f"{text} {['red', 'blue', 'spotty', 'large'][i % 4]}"
    topics = infer_topics(ids, np.array(vectors), names)
    by_kind = {kind: {topics[pid] for pid in ids if pid.startswith(kind)} for kind in kinds}
    assert all(len(labels) == 1 for labels in by_kind.values()), by_kind  # one topic per kind
    labels = {kind: next(iter(found)) for kind, found in by_kind.items()}
    assert len(set(labels.values())) == 3
    for kind, text in kinds.items():
        assert set(labels[kind].lower().split(" & ")) <= set(text.split()), labels  # named by its own words
    assert infer_topics(ids, np.array(vectors), names) == topics  # deterministic


def test_segment_rfm_fits_a_small_memory_limit_and_equals_sql(tmp_path):
    """The per-segment medians are the middle of sorted values (a window, which spills): DuckDB's
    median holds a group's values in memory and cannot (2M customers ran out of a 272 MiB limit)."""
    import duckdb

    from assets.infer.segments import ASSIGNMENTS_TABLE, segment_rfm

    path = str(tmp_path / "rfm.duckdb")
    with duckdb.connect(path) as con:
        con.execute("CREATE SCHEMA ml; CREATE SCHEMA analytics")
        con.execute(f"""CREATE TABLE {ASSIGNMENTS_TABLE} AS SELECT 'c' || i AS customer_id, i % 12 AS segment_id
                        FROM range(1000000) t(i)""")
        con.execute("""CREATE TABLE analytics.customer_features AS SELECT 'c' || i AS customer_id,
                          (hash(i) % 365)::BIGINT AS recency_days,
                          CASE WHEN i % 97 = 0 THEN NULL ELSE (hash(i + 1) % 40)::BIGINT + 1 END AS frequency,
                          (hash(i + 2) % 100000) / 100.0 AS monetary
                       FROM range(1000000) t(i)""")
        sql_columns = ("avg(recency_days), median(recency_days), avg(frequency), median(frequency), "
                       "avg(monetary), median(monetary)")
        joined = f"FROM {ASSIGNMENTS_TABLE} JOIN analytics.customer_features USING (customer_id)"
        expected = {int(row[0]): RfmSummary(*row[1:])
                    for row in con.execute(f"SELECT segment_id, {sql_columns} {joined} GROUP BY 1").fetchall()}
        expected_everyone = RfmSummary(*con.execute(f"SELECT {sql_columns} {joined}").fetchone())
    with duckdb.connect(path, read_only=True, config={"memory_limit": "32MiB", "threads": 2,
                                                  "temp_directory": str(tmp_path / "spill")}) as tight:
        with pytest.raises(duckdb.OutOfMemoryException):  # what the step ran before
            tight.execute(f"SELECT segment_id, {sql_columns} {joined} GROUP BY 1").fetchall()
        by_segment, everyone = segment_rfm(tight)
        only_segments, nobody = segment_rfm(tight, everyone=False)
    assert nobody is None and only_segments.keys() == by_segment.keys()
    for segment_id, summary in only_segments.items():  # a parallel avg may differ in its last bit
        assert list(vars(summary).values()) == pytest.approx(list(vars(by_segment[segment_id]).values()), rel=1e-12)
    assert by_segment.keys() == expected.keys()
    for segment_id, summary in expected.items():
        assert list(vars(by_segment[segment_id]).values()) == pytest.approx(list(vars(summary).values()), rel=1e-12)
    assert list(vars(everyone).values()) == pytest.approx(list(vars(expected_everyone).values()), rel=1e-12)


def sample_snapshot(tmp_path, customers: int, without_vector: set[int]):
    """A snapshot of purchases (customer by customer) and customer state; the customers in
    `without_vector` bought only a product without an embedding."""
    from resources.warehouse import Snapshot

    rng = np.random.default_rng(5)
    ids = [f"c{i:05d}" for i in range(customers)]
    rows = {"customer_id": [], "product_id": [], "amount": [], "purchased_at": []}
    for i, customer in enumerate(ids):
        for _ in range(1 + i % 3):
            rows["customer_id"].append(customer)
            rows["product_id"].append("p_none" if i in without_vector else f"p{rng.integers(40)}")
            rows["amount"].append(float(rng.integers(1, 50)))
            rows["purchased_at"].append(dt.datetime(2011, 8, 1) + dt.timedelta(days=int(rng.integers(30))))
    taken = Snapshot(tmp_path)
    pq.write_table(pa.table(rows), taken.path("purchases"))
    pq.write_table(pa.table({"customer_id": pa.array([*ids, None], pa.string())}), taken.path("customer_state"))
    products = ProductEmbeddings.from_arrays([f"p{j}" for j in range(40)], rng.standard_normal((40, 8)))
    return taken, products, ids


@pytest.mark.parametrize("without_vector_share", [0.0, 0.8])
def test_the_fit_pools_only_the_sample_candidates_and_gets_the_sample_of_everyone(tmp_path, without_vector_share):
    from assets.infer.segments import SegmentsConfig, pooled_sample, sample_candidates, sample_for_fit

    config = SegmentsConfig(sample_size=150, chunk_lines=97, read_batch_rows=64)
    lowest = np.argsort(id_priorities(pa.array([f"c{i:05d}" for i in range(3000)]), config.seed))
    # at 0.8, most of the 300 candidates have no vector: the sample needs everyone pooled
    without = {int(i) for i in lowest[: int(300 * without_vector_share)]}
    taken, products, ids = sample_snapshot(tmp_path, 3000, without)
    candidates = sample_candidates(taken, config)
    assert len(candidates) == 300 and set(candidates.to_pylist()) == {ids[i] for i in lowest[:300]}
    everyone = pooled_sample(taken, products, dt.date(2011, 9, 1), config, None, None)
    sample = sample_for_fit(taken, products, dt.date(2011, 9, 1), config)
    assert len(sample) == 150
    assert sample.customer_ids.to_pylist() == everyone.customer_ids.to_pylist()
    np.testing.assert_array_equal(sample.vectors, everyone.vectors)
    from_candidates = pooled_sample(taken, products, dt.date(2011, 9, 1), config, None, candidates)
    assert len(from_candidates) == (150 if not without else 60)
    # read 64 ids at a time, keeping the lowest so far: the same as from all of them at once
    whole = sample_candidates(taken, config.model_copy(update={"read_batch_rows": 10_000}))
    assert len(whole) == 300 and set(whole.to_pylist()) == set(candidates.to_pylist())
    assert sample_candidates(taken, config.model_copy(update={"sample_size": 1500})) is None  # 3,000: everyone


def test_an_incremental_merge_counts_who_moved_or_left_and_replaces_only_their_rows(tmp_path):
    """merge_assignments: the reassigned customers' rows and the rows of customers gone are
    replaced; moved = those of them whose segment changed, or who left."""
    import duckdb

    from assets.infer.segments import ASSIGNMENTS_TABLE, merge_assignments
    from resources.warehouse import Snapshot

    taken = Snapshot(tmp_path)
    old = {"a": 1, "b": 1, "c": 2, "d": 2, "gone": 3}
    pq.write_table(pa.table({"customer_id": ["a", "b", "new"]}), taken.path("reassign"))
    # a keeps its segment, b moves, new arrives; c and d keep theirs untouched; gone left
    pq.write_table(pa.table({"customer_id": ["a", "b", "new"], "segment_id": pa.array([1, 2, 3], pa.int64()),
                             "similarity": pa.array([0.9, 0.8, 0.7], pa.float32())}), taken.path("assignments"))
    state = {"customer_id": ["a", "b", "c", "d", "new"], "history_hash": pa.array([1, 2, 3, 4, 5], pa.uint64())}
    pq.write_table(pa.table(state), taken.path("customer_state"))
    pq.write_table(pa.table({"product_id": ["p"], "vector_hash": pa.array([7], pa.uint64())}),
                   taken.path("product_vector_state"))
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    con.execute("CREATE SCHEMA ml")
    con.execute(f"CREATE TABLE {ASSIGNMENTS_TABLE} (customer_id VARCHAR, segment_id BIGINT, similarity FLOAT)")
    con.executemany(f"INSERT INTO {ASSIGNMENTS_TABLE} VALUES (?, ?, 0.5)", list(old.items()))

    assert merge_assignments(con, taken) == 2  # b moved, gone left
    rows = dict(con.execute(f"SELECT customer_id, segment_id FROM {ASSIGNMENTS_TABLE}").fetchall())
    assert rows == {"a": 1, "b": 2, "c": 2, "d": 2, "new": 3}
    kept = con.execute(f"SELECT similarity FROM {ASSIGNMENTS_TABLE} WHERE customer_id IN ('c', 'd')").fetchall()
    assert kept == [(0.5,), (0.5,)]  # the others' rows are the stored ones
