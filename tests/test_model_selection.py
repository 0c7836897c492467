"""Model selection on a validation window before as-of: deterministic, blind to anything on or
after as-of, and it deploys a baseline when a baseline is what wins."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.recommender import (
    COLLABORATIVE,
    GLOBAL_POPULARITY,
    POPULARITY,
    SEGMENT_POPULARITY,
    Recommender,
    RecommenderConfig,
)
from recsys.evaluation import candidate_items, recommendations_as_positions, relevant_items
from recsys.metrics import RankingMetrics
from recsys.purchases import iter_customer_chunks, to_micros
from recsys.selection import BASELINES, CANDIDATES, _judge_row, customer_sample, select_model
from recsys.customer_vectors import ProductEmbeddings
from recsys.synthetic import SyntheticRetail

STRUCTURED = SyntheticRetail(customers=1_500, products=300, topics=12, lines_per_customer=12, topic_affinity=0.9,
                             seed=11, batch_customers=500)
# no co-purchase structure at all: every customer buys from the whole catalog by popularity
STRUCTURELESS = replace(STRUCTURED, topic_affinity=0.0, seed=12)


def as_of(data: SyntheticRetail):
    return data.start + timedelta(days=300)


def test_the_same_data_gives_the_same_table_and_choice():
    first = select_model(STRUCTURED, as_of(STRUCTURED))
    second = select_model(STRUCTURED, as_of(STRUCTURED))
    assert first.table == second.table and first.chosen == second.chosen
    assert {row["candidate"] for row in first.table} == set(CANDIDATES)
    assert first.evaluated_customers > 100 and first.window[1] == str(as_of(STRUCTURED))


def test_nothing_on_or_after_as_of_is_looked_at():
    """Purchases after as-of (the days the deployed model will be judged on) are rewritten at
    random: the candidates' table and the choice stay the same."""
    cut = as_of(STRUCTURED)
    table = pa.Table.from_batches(list(STRUCTURED()))
    later = pc.greater_equal(table["purchased_at"], pa.scalar(cut, table["purchased_at"].type))
    rng = np.random.default_rng(0)
    products = STRUCTURED.product_ids().to_pylist()
    shuffled = pa.array(np.where(later.to_numpy(zero_copy_only=False),
                                 rng.choice(products, table.num_rows), table["product_id"].to_numpy(zero_copy_only=False)))
    rewritten = table.set_column(table.schema.get_field_index("product_id"), "product_id", shuffled)
    assert not rewritten.equals(table)
    assert select_model(table, cut).table == select_model(rewritten, cut).table


def test_collaborative_structure_deploys_a_collaborative_model():
    selection = select_model(STRUCTURED, as_of(STRUCTURED))
    assert CANDIDATES[selection.chosen]["model"] in ("ease", "item_knn"), selection.table
    best_baseline = max(row["hit_rate"] for row in selection.table if row["candidate"] in BASELINES)
    deployed = next(row for row in selection.table if row["deployed"])
    assert deployed["hit_rate"] >= best_baseline and deployed["vs_best_baseline"] >= 1.0


def test_where_popularity_wins_popularity_is_deployed():
    selection = select_model(STRUCTURELESS, as_of(STRUCTURELESS))
    assert selection.chosen in BASELINES, selection.to_markdown()
    assert selection.config.model in (GLOBAL_POPULARITY, SEGMENT_POPULARITY)
    model = Recommender.fit(STRUCTURELESS, selection.config, as_of=as_of(STRUCTURELESS))
    recommendations = pa.Table.from_batches(
        [part.recommendations for part in model.recommend(STRUCTURELESS, STRUCTURELESS.catalog())])
    strategies = set(recommendations["strategy"].to_pylist())
    assert strategies == {POPULARITY} and COLLABORATIVE not in strategies
    assert model.report.model == selection.config.model
    assert pc.min(recommendations["confidence"]).as_py() >= 0.0  # calibrated on the popularity scores


def test_a_sample_is_stable_and_smaller_than_the_customer_base():
    small = select_model(STRUCTURED, as_of(STRUCTURED), max_customers=400)
    again = select_model(STRUCTURED, as_of(STRUCTURED), max_customers=400)
    assert 250 < small.customers_sampled < 550 and small.table == again.table


def test_a_candidate_that_fails_is_out_of_the_race_and_said_so(monkeypatch):
    original = Recommender.fit

    def item_knn_breaks(purchases, config=None, as_of=None, **shared):
        if config is not None and config.model == "item_knn":
            raise MemoryError("injected")
        return original(purchases, config, as_of, **shared)

    monkeypatch.setattr(Recommender, "fit", staticmethod(item_knn_breaks))
    selection = select_model(STRUCTURED, as_of(STRUCTURED))
    broken = next(row for row in selection.table if row["candidate"] == "item_knn")
    assert broken["hit_rate"] is None and "MemoryError: injected" in broken["error"] and not broken["deployed"]
    judged = [row for row in selection.table if row["hit_rate"] is not None]
    assert len(judged) == len(CANDIDATES) - 1 and selection.chosen == max(judged, key=lambda r: r["hit_rate"])["candidate"]


def test_a_new_shop_whose_purchases_all_fall_in_the_window_gets_the_default_model_and_the_reason():
    """Nothing before the validation window (a shop's first days): no candidate can be judged,
    which the table says per row, instead of an Arrow error or a hit rate of 0 that would read
    as a loss."""
    day = STRUCTURED.start + timedelta(days=2)
    first_days = pa.table({"customer_id": ["A", "A", "B", "B"], "product_id": ["P1", "P2", "P3", "P4"],
                           "amount": [1.0, 2.0, 3.0, 4.0], "purchased_at": pa.array([day] * 4, pa.timestamp("us"))})
    selection = select_model(first_days, day + timedelta(days=1))
    assert selection.chosen == "ease" and selection.evaluated_customers == 0
    assert selection.reason.startswith("no candidate could be judged")
    assert all(row["hit_rate"] is None and row["error"].startswith("no customer to judge") for row in selection.table)


def tail_like_head_vectors() -> ProductEmbeddings:
    """Product vectors where each tail product reads like a head product."""
    rng = np.random.default_rng(3)
    products = STRUCTURED.product_ids().to_pylist()
    vectors = {p: rng.normal(size=32) for p in products}
    for index, product in enumerate(products[150:]):
        vectors[product] = vectors[products[index % 150]] + rng.normal(scale=0.05, size=32)
    return ProductEmbeddings.from_arrays(list(vectors), np.vstack(list(vectors.values())))


def test_text_neighbours_are_judged_apart_and_deployed_only_when_they_win():
    """With product vectors, the collaborative winner is judged again with products outside its
    model reached through their text; that variant is deployed only on a strictly higher hit rate."""
    base = replace(RecommenderConfig(), max_items=120)  # 300 products: most of the tail is outside the model
    table = tail_like_head_vectors()

    selection = select_model(STRUCTURED, as_of(STRUCTURED), base, product_vectors=table)
    plain = [row for row in selection.table if row["candidate"] in CANDIDATES]
    winner = max(plain, key=lambda row: (row["hit_rate"], -list(CANDIDATES).index(row["candidate"])))
    variant = next(row for row in selection.table if row["candidate"] == f"{winner['candidate']} + text neighbours")
    assert variant["hit_rate"] is not None
    won = variant["hit_rate"] > winner["hit_rate"]
    assert selection.chosen == (variant["candidate"] if won else winner["candidate"]), selection.to_markdown()
    assert (selection.config.text_neighbour_min_similarity is not None) == won
    assert select_model(STRUCTURED, as_of(STRUCTURED), base, product_vectors=table).table == selection.table


def test_candidates_that_differ_only_in_how_they_score_share_one_solve_and_score_as_if_fitted_alone():
    """The EASE candidates and the winner's text-neighbour variant share the weights of one EASE
    solve; every row of the table equals judging that candidate with a fit of its own."""
    base = replace(RecommenderConfig(), max_items=120)
    vectors = tail_like_head_vectors()
    end = as_of(STRUCTURED)
    selection = select_model(STRUCTURED, end, base, product_vectors=vectors)

    cutoff = end - timedelta(days=60)
    sample, _ = customer_sample(STRUCTURED, to_micros(end), 50_000)
    plain = replace(base, calibration_days=0, text_neighbour_min_similarity=None)
    for row in selection.table:
        name, text = row["candidate"].removesuffix(" + text neighbours"), row["candidate"].endswith("neighbours")
        config = replace(plain, **CANDIDATES[name],
                         text_neighbour_min_similarity=base.text_neighbour_min_similarity if text else None)
        alone = _judge_row(row["candidate"], sample, cutoff, end, config, vectors if text else None)
        assert (alone["hit_rate"], alone["ndcg"]) == (row["hit_rate"], row["ndcg"]), row["candidate"]

    variant = next(row["candidate"] for row in selection.table if row["candidate"].endswith(" + text neighbours"))
    if CANDIDATES[variant.removesuffix(" + text neighbours")]["model"] == "ease":
        assert selection.weights == {"computed": 2, "reused": 3}  # one EASE solve for four fits, one item-kNN
    else:  # item-kNN won: its weights (a cosine of the Gram, no solve) are made again for the variant
        assert selection.weights == {"computed": 3, "reused": 2}  # one EASE solve for three fits


def test_a_candidate_is_scored_only_for_the_customers_it_is_judged_on_with_the_metrics_of_scoring_all(monkeypatch):
    """Customers who bought nothing new in the window (a third of this sample, 40-45 % at 2M) cannot
    change the metrics, so they are not scored. Every candidate's hit rate and NDCG equal scoring
    every customer."""
    end = as_of(STRUCTURED)
    cutoff, (sample, sampled) = end - timedelta(days=60), customer_sample(STRUCTURED, to_micros(end), 50_000)
    plain = replace(RecommenderConfig(), calibration_days=0, text_neighbour_min_similarity=None)
    scored_customers = []
    original = Recommender.score_chunk
    monkeypatch.setattr(Recommender, "score_chunk",
                        lambda self, chunk, *a, **kw: scored_customers.append(chunk.n_customers) or original(self, chunk, *a, **kw))
    for name, overrides in CANDIDATES.items():
        config = replace(plain, **overrides)
        scored_customers.clear()
        row = _judge_row(name, sample, cutoff, end, config)
        assert 0 < sum(scored_customers) == row["customers"] < sampled, name

        model = Recommender.fit(sample, config, as_of=cutoff)  # everyone scored, then the judged kept
        items = candidate_items(sample, to_micros(cutoff), None, config.score_chunk_customers)
        candidates = model.candidates(pa.table({"product_id": items.product_ids, "in_stock": [True] * len(items)}))
        everyone = RankingMetrics(config.top_k, len(items))
        for chunk in iter_customer_chunks(sample, config.score_chunk_customers):
            recommendations = original(model, chunk, candidates).recommendations
            _, truth_customer, truth_item, evaluated = relevant_items(chunk, items, to_micros(cutoff), to_micros(end))
            renumber, keep = np.cumsum(evaluated) - 1, evaluated[truth_customer]
            everyone.add(int(evaluated.sum()), *recommendations_as_positions(recommendations, chunk, items, evaluated, renumber),
                         renumber[truth_customer[keep]], truth_item[keep])
        summary = everyone.summary()
        assert (row["hit_rate"], row["ndcg"]) == (summary["hit_rate@10"], summary["ndcg@10"]), name


def test_a_sample_reads_the_purchases_once_when_the_caller_knows_how_many_customers_they_hold():
    """The recommendations step knows the customer count from its snapshot: the sample is then
    taken in one read instead of two (a count pass first), and it is the same sample."""
    table = pa.Table.from_batches(list(STRUCTURED()))
    reads = []

    def source():
        reads.append(1)
        return iter(table.to_batches(max_chunksize=2_000))

    before = to_micros(as_of(STRUCTURED))
    counted = customer_sample(source, before, 400)
    assert len(reads) == 2
    reads.clear()
    # the count pass adds up each batch's customers (one split by a batch boundary counts twice)
    as_counted = sum(pc.count_distinct(batch["customer_id"]).as_py() for batch in source())
    reads.clear()
    given = customer_sample(source, before, 400, customers=as_counted)
    assert len(reads) == 1 and given[1] == counted[1] and given[0].equals(counted[0])
    exact = customer_sample(source, before, 400, customers=pc.count_distinct(table["customer_id"]).as_py())
    assert abs(exact[1] - counted[1]) <= 2 and 300 < exact[1] < 500
