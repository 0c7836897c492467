"""Offline evaluation: metrics by hand, cleaning rules, baselines, and the Online Retail bar."""

from __future__ import annotations

from datetime import datetime, timedelta

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from recsys.baselines import NO_SEGMENT, MappingSegmenter, PopularityBaseline, RfmSegmenter, SegmentPopularityBaseline
from recsys.evaluation import OURS, EvaluationReport, evaluate_split
from recsys.metrics import RankingMetrics, paired_ratio_interval
from assets.evaluate.online_retail import catalog_before, load_online_retail, purchases_source
from recsys.purchases import ItemIndex, iter_customer_chunks, to_micros
from recsys.recommender import RecommenderConfig
from recsys.synthetic import SyntheticRetail

SMALL = SyntheticRetail(customers=1_500, products=300, topics=10, seed=5)
SMALL_CUTOFF = SMALL.start + timedelta(days=270)
FAST = RecommenderConfig(fit_chunk_customers=500, calibration_customers=500)


def test_metrics_match_a_hand_computed_example():
    metrics = RankingMetrics(k=3, n_candidates=10)
    # customer 0: relevant {1, 2}, recommended [1, 5, 2] -> hits at ranks 1 and 3
    # customer 1: relevant {7},    recommended [3, 4, 6] -> no hit
    metrics.add(
        2,
        rec_customer=np.array([0, 0, 0, 1, 1, 1]),
        rec_item=np.array([1, 5, 2, 3, 4, 6]),
        rec_rank=np.array([1, 2, 3, 1, 2, 3]),
        truth_customer=np.array([0, 0, 1]),
        truth_item=np.array([1, 2, 7]),
    )
    summary = metrics.summary()
    ndcg_0 = (1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3))
    assert summary["hit_rate@3"] == 0.5
    assert summary["precision@3"] == round((2 / 3) / 2, 4)
    assert summary["recall@3"] == round(1.0 / 2, 4)
    assert summary["ndcg@3"] == round(ndcg_0 / 2, 4)
    assert summary["coverage"] == 0.6
    assert metrics.hit_vector().tolist() == [True, False]



def test_the_interval_of_a_hit_rate_ratio_counts_that_the_customers_are_the_same():
    """The delta-method interval of mean(ours) / mean(theirs) matches a paired bootstrap, and is
    narrower than one that treats the two methods' customers as independent."""
    rng = np.random.default_rng(7)
    theirs = rng.random(1_500) < 0.39
    ours = np.where(theirs, rng.random(1_500) < 0.85, rng.random(1_500) < 0.48)  # hits often shared
    low, high = paired_ratio_interval(ours, theirs)
    draws = rng.integers(0, len(ours), size=(4_000, len(ours)))
    ratios = ours[draws].mean(axis=1) / theirs[draws].mean(axis=1)
    assert abs(low - np.quantile(ratios, 0.025)) < 0.02 and abs(high - np.quantile(ratios, 0.975)) < 0.02
    unpaired = ours[draws].mean(axis=1) / theirs[rng.integers(0, len(ours), size=(4_000, len(ours)))].mean(axis=1)
    assert high - low < 0.9 * (np.quantile(unpaired, 0.975) - np.quantile(unpaired, 0.025))
    assert paired_ratio_interval(ours, np.zeros_like(theirs)) is None


def test_a_loss_to_the_best_baseline_is_judged_on_the_same_customers():
    """40 of 2,000 customers lose their hit, none gains one: 0.38 against 0.40. Taken as two
    independent samples that is within noise (margin 0.030); on the same customers it is a loss."""
    from assets.evaluate.quality import versus_best_baseline

    theirs = np.zeros(2_000, dtype=bool)
    theirs[:800] = True
    ours = theirs.copy()
    ours[:40] = False

    def report(ours_hits):
        vectors = {OURS: ours_hits, "global popularity": theirs, "segment popularity": theirs[::-1].copy()}
        table = [{"method": name, "hit_rate@10": round(float(hits.mean()), 4)} for name, hits in vectors.items()]
        return EvaluationReport(cutoff="", test_end="", k=10, evaluated_customers=2_000, candidate_products=1,
                                segmentation="", table=table, hit_vectors=vectors)

    losing = versus_best_baseline(report(ours))
    assert losing["worse_beyond_noise"] and losing["best_baseline"] == "global popularity"
    assert 0.005 < losing["noise_margin"] < 0.007  # 1.96 * sd of the differences / sqrt(2,000)
    assert not versus_best_baseline(report(theirs.copy()))["worse_beyond_noise"]  # the same hits: no loss
    gaining = theirs.copy()
    gaining[1_000:1_040] = True
    assert not versus_best_baseline(report(gaining))["worse_beyond_noise"]
    # Worse beyond noise than a baseline that is not the best: the paired margin to each one.
    best = np.zeros(2_000, dtype=bool)
    best[1_200:2_000] = True  # 0.40, sharing none of our hits: a wide margin
    vectors = {OURS: ours, "global popularity": best, "segment popularity": theirs}  # 0.38 vs 0.40 and 0.40
    vectors["segment popularity"] = theirs.copy()
    vectors["segment popularity"][799] = False  # 0.3995: below the best, and still beats us beyond noise
    table = [{"method": name, "hit_rate@10": round(float(hits.mean()), 4)} for name, hits in vectors.items()]
    mixed = versus_best_baseline(EvaluationReport(cutoff="", test_end="", k=10, evaluated_customers=2_000,
                                                  candidate_products=1, segmentation="", table=table,
                                                  hit_vectors=vectors))
    assert mixed["best_baseline"] == "global popularity" and mixed["ours"] > mixed["baseline"] - mixed["noise_margin"]
    assert mixed["worse_beyond_noise"] and mixed["worse_beyond_noise_than"] == ["segment popularity"]

def test_rfm_segments_are_deterministic_and_in_range():
    cutoff_us = to_micros(SMALL_CUTOFF)
    segmenter = RfmSegmenter.fit(SMALL, cutoff_us, 400)
    again = RfmSegmenter.fit(SMALL, cutoff_us, 400)
    assert np.array_equal(segmenter.thresholds, again.thresholds)
    chunk = next(iter_customer_chunks(SMALL, 400)).before(cutoff_us)
    segments = segmenter(chunk)
    has_history = chunk.customers_with_rows()
    assert ((segments >= 0) & (segments < 27))[has_history].all()
    assert (segments[~has_history] == NO_SEGMENT).all()
    assert len(np.unique(segments[has_history])) > 5


def test_evaluation_on_synthetic_data_applies_the_rules_and_uses_given_segments():
    customers = [f"C{c:09d}" for c in range(SMALL.customers)]
    segments = {customer: index % 4 for index, customer in enumerate(customers)}
    report = evaluate_split(SMALL, SMALL_CUTOFF, SMALL.end, catalog=SMALL.catalog(), config=FAST, segments=segments)
    assert report.segmentation == "given mapping (4 segments)"
    assert {row["method"] for row in report.table} == {OURS, "global popularity", "segment popularity"}
    assert all(row["customers"] == report.evaluated_customers > 0 for row in report.table)
    in_stock = int(np.count_nonzero(SMALL.catalog()["in_stock"].to_numpy(zero_copy_only=False)))
    assert report.candidate_products <= in_stock
    ours = report.row(OURS)
    assert ours["hr_vs_popularity"] > 1.2, "the synthetic data has topic structure to find"
    check = report.calibration_check
    assert check["mean_confidence"] == pytest.approx(check["share_bought_in_test_window"], rel=0.5)
    # confidence separates: the top tenth of recommendations by confidence is bought far more often
    # than the bottom tenth, and the reliability curve stays close to the diagonal
    assert check["top_decile_bought"] > 2 * check["bottom_decile_bought"]
    assert len(check["reliability"]) == 10 and check["ece"] < 0.03
    # predicted_value matches realized spend on validation customers the calibration did not see
    value_check = report.fit_report["calibration"]["held_out_value_check"]
    assert value_check["predicted_over_realized_value"] == pytest.approx(1.0, abs=0.2), value_check


def write_csv(directory, rows: list[str]) -> None:
    header = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country"
    (directory / "2011-01-05.csv").write_text("\n".join([header, *rows]) + "\n")


def test_online_retail_is_cleaned_by_the_pipelines_own_rules(tmp_path):
    """Ingestion's quarantine (the exact duplicate) and sql/stg_order_lines.sql (the rest)."""
    write_csv(
        tmp_path,
        [
            "536100,85123A,HEART,6,2011-01-05 08:00:00,2.55,17850.0,United Kingdom",  # kept
            "536100,85123A,HEART,6,2011-01-05 08:00:00,2.55,17850.0,United Kingdom",  # exact duplicate
            "536101,85123a ,heart,2,2011-01-05 09:00:00,2.55,17850.0,United Kingdom",  # kept, code normalized
            "C536102,22000,MUG,-1,2011-01-05 09:30:00,1.25,17850.0,United Kingdom",  # cancellation
            "536103,22001,BOWL,-3,2011-01-05 09:40:00,0,,United Kingdom",  # negative quantity
            "536104,22002,PLATE,4,2011-01-05 10:00:00,1.00,,United Kingdom",  # no customer
            "536105,22003,FREE,4,2011-01-05 10:00:00,0,12000.0,France",  # zero price
            "536106,POST,POSTAGE,1,2011-01-05 10:00:00,18.0,12000.0,France",  # non-product
            "536107,gift_0001_20,VOUCHER,1,2011-01-05 10:00:00,17.02,12000.0,France",  # gift voucher
            "536108,23166,JAR,500,2011-01-05 10:01:00,1.04,12346.0,United Kingdom",  # reversed below
            "C536109,23166,JAR,-500,2011-01-05 10:17:00,1.04,12346.0,United Kingdom",
            "536110,DCGS0004,BAG,1,2011-01-05 11:00:00,16.63,12000.0,France",  # real product, kept
        ],
    )
    con = duckdb.connect()
    assert load_online_retail(con, tmp_path) == 3
    rows = con.sql("SELECT customer_id, product_id, amount FROM analytics.stg_order_lines ORDER BY product_id, amount").fetchall()
    assert [row[:2] for row in rows] == [("17850", "85123A"), ("17850", "85123A"), ("12000", "DCGS0004")]
    assert [row[2] for row in rows] == pytest.approx([2 * 2.55, 6 * 2.55, 16.63])


@pytest.fixture
def online_retail_con(online_retail_dir):
    con = duckdb.connect()
    load_online_retail(con, online_retail_dir)
    return con


def test_online_retail_split_meets_the_bar(online_retail_con):
    cutoff, test_end = datetime(2011, 6, 1), datetime(2011, 9, 1)
    report = evaluate_split(
        purchases_source(online_retail_con), cutoff, test_end, catalog=catalog_before(online_retail_con, cutoff)
    )
    assert report.evaluated_customers == 1271
    popularity = report.row("global popularity")["hit_rate@10"]
    assert 0.37 <= popularity <= 0.41  # the reference measured 0.39
    assert report.row(OURS)["hit_rate@10"] >= 1.4 * popularity
    assert report.row(OURS)["coverage"] > report.row("global popularity")["coverage"]


def test_popularity_baselines_skip_bought_items_and_break_ties_by_product_id():
    items = ItemIndex(["A", "B", "C", "D"])
    buyers = np.array([5, 9, 5, 1])
    history = next(
        iter_customer_chunks(
            pa.table(
                {
                    "customer_id": ["u1", "u2"],
                    "product_id": ["B", "A"],
                    "amount": [1.0, 1.0],
                    "purchased_at": pa.array([datetime(2011, 1, 1)] * 2, pa.timestamp("us")),
                }
            ),
            10,
        )
    )
    top = PopularityBaseline(items, buyers).rank(history, 3)
    names = np.array(["A", "B", "C", "D"])
    assert names[top.item[top.row == 0]].tolist() == ["A", "C", "D"]  # B bought; A before C (tie)
    assert names[top.item[top.row == 1]].tolist() == ["B", "C", "D"]
    segmenter = MappingSegmenter({"u1": "x", "u2": "y"})
    by_segment = {0: np.array([0, 0, 0, 3]), 1: np.array([1, 0, 2, 0])}  # codes: "x" -> 0, "y" -> 1
    top = SegmentPopularityBaseline(items, buyers, by_segment, segmenter).rank(history, 2)
    assert names[top.item[top.row == 0]].tolist() == ["D", "A"]  # segment first, then overall buyers
    assert names[top.item[top.row == 1]].tolist() == ["C", "B"]
