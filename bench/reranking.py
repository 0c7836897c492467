"""Re-ordering the deployed model's top 50 on Online Retail's validation windows (a benchmark, not a test).

    python -m bench.reranking

Issue 13 asks for 1.7x global popularity's hit rate@10 on later months; on the validation
windows every EASE variant stops near 0.64. This measures four ways to re-order the model
selection's winner's top 50 per customer, each a different signal than the ones tuned before:
- a learned ranker (gradient-boosted trees on the score, rank, item trend and age, price and the
  customer's activity), trained on the two windows before the validation window;
- diversity (maximal marginal relevance with the items' co-purchase cosine): hit rate rewards
  covering more of what a customer might want;
- customer neighbours (user-kNN over co-purchase cosine) blended into the score;
- popularity among new adopters (customers buying the product for the first time, which is what
  the metric counts) instead of all buyers in the popularity blend.
And how often the top K holds a hit at all (what any re-ordering could reach).

Windows: the 60 days before 2011-05-01 and before 2011-06-01; the model is fitted before each
window. Nothing on or after 2011-06-01 is read (--online-retail, default
../shared/data/online-retail/by-day).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from assets.evaluate.online_retail import PURCHASES, catalog_before, load_online_retail, purchases_source
from recsys.purchases import iter_customer_chunks
from recsys.recommender import Recommender
from recsys.selection import select_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ONLINE_RETAIL = ROOT.parent / "shared" / "data" / "online-retail" / "by-day"
AS_OF = (datetime(2011, 5, 1), datetime(2011, 6, 1))
WINDOW_DAYS, DEPTH, K = 60, 50, 10
LEARNED_FEATURES = ["score", "rank", "score_share", "buyers", "buyers_7d", "buyers_30d", "trend", "item_age_days",
                    "item_idle_days", "price", "customer_items", "customer_days", "customer_recency_days", "price_ratio"]


class Window:
    """One judged window: the model's top DEPTH before `cutoff`, labelled by [cutoff, end)."""

    def __init__(self, con, purchases: pd.DataFrame, config, cutoff: datetime, end: datetime):
        self.purchases = purchases
        self.cutoff = pd.Timestamp(cutoff)
        self.history = purchases[purchases.purchased_at < self.cutoff]
        self.top = top_list(con, config, cutoff)
        later = purchases[(purchases.purchased_at >= self.cutoff) & (purchases.purchased_at < pd.Timestamp(end))]
        later = later[later.product_id.isin(set(self.history.product_id))
                      & later.customer_id.isin(set(self.history.customer_id))]
        bought = pd.MultiIndex.from_frame(self.history[["customer_id", "product_id"]])
        new = later[~pd.MultiIndex.from_frame(later[["customer_id", "product_id"]]).isin(bought)]
        truth = pd.MultiIndex.from_frame(new[["customer_id", "product_id"]].drop_duplicates())
        self.evaluated = set(new.customer_id)
        self.top["y"] = pd.MultiIndex.from_frame(self.top[["customer_id", "product_id"]]).isin(truth)

    def judged(self) -> pd.DataFrame:
        return self.top[self.top.customer_id.isin(self.evaluated)].copy()

    def hit_rate(self, frame: pd.DataFrame, column: str) -> float:
        order = frame.groupby("customer_id")[column].rank(ascending=False, method="first")
        return round(frame[(order <= K) & frame.y].customer_id.nunique() / len(self.evaluated), 4)


def top_list(con, config, cutoff: datetime) -> pd.DataFrame:
    model = Recommender.fit(purchases_source(con), config, as_of=cutoff)
    candidates = model.candidates(catalog_before(con, cutoff))
    parts = []
    for chunk in iter_customer_chunks(purchases_source(con), 2_048):
        ranking = model.scorer.rank(chunk, candidates.blocked, DEPTH)
        keep = ranking.has_signal[ranking.row]  # customers with history: the judged ones
        column = ranking.column[keep]
        parts.append(pd.DataFrame({
            "customer_id": chunk.customer_ids.take(pa.array(ranking.row[keep])).to_pandas(),
            "product_id": candidates.column_product_ids.take(pa.array(column)).to_pandas(),
            "score": ranking.score[keep], "rank": ranking.rank[keep],
            "popularity": model.scorer.popularity[column]}))
    return pd.concat(parts, ignore_index=True)


def with_features(window: Window) -> pd.DataFrame:
    history, cutoff = window.history, window.cutoff
    days = lambda stamps: (cutoff - stamps).dt.days  # noqa: E731
    items = history.groupby("product_id").agg(first=("purchased_at", "min"), last=("purchased_at", "max"),
                                               buyers=("customer_id", "nunique"), price=("amount", "median"))
    for span in (7, 30):
        recent = history[history.purchased_at >= cutoff - timedelta(days=span)]
        items[f"buyers_{span}d"] = recent.groupby("product_id").customer_id.nunique()
    items = items.fillna(0)
    items["item_age_days"], items["item_idle_days"] = days(items["first"]), days(items["last"])
    items["trend"] = (items.buyers_30d + 1) / (items.buyers * 30 / np.maximum(items.item_age_days, 30) + 1)
    customers = history.groupby("customer_id").agg(last=("purchased_at", "max"), customer_items=("product_id", "nunique"),
                                                   customer_days=("day", "nunique"), customer_price=("amount", "median"))
    customers["customer_recency_days"] = days(customers["last"])
    frame = window.top.join(items.drop(columns=["first", "last"]), on="product_id")
    frame = frame.join(customers.drop(columns=["last"]), on="customer_id")
    frame["price_ratio"] = np.log((frame.price + 1e-3) / (frame.customer_price + 1e-3))
    frame["score_share"] = frame.score / frame.groupby("customer_id").score.transform("max")
    return frame


def learned(training: list[Window], window: Window) -> float:
    from sklearn.ensemble import HistGradientBoostingClassifier

    train = pd.concat([with_features(w) for w in training], ignore_index=True)
    ranker = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, max_leaf_nodes=15,
                                            min_samples_leaf=50, random_state=0)
    ranker.fit(train[LEARNED_FEATURES], train.y)
    frame = with_features(window)
    frame = frame[frame.customer_id.isin(window.evaluated)]
    frame["learned"] = ranker.predict_proba(frame[LEARNED_FEATURES])[:, 1]
    return window.hit_rate(frame, "learned")


def co_purchase(history: pd.DataFrame, rows: str, columns: str):
    """Binary rows x columns matrix of who bought what, its L2-normalized rows, and both indexes."""
    pairs = history[[rows, columns]].drop_duplicates()
    row_index, column_index = pd.Index(sorted(pairs[rows].unique())), pd.Index(sorted(pairs[columns].unique()))
    matrix = sp.csr_matrix((np.ones(len(pairs), np.float32),
                            (row_index.get_indexer(pairs[rows]), column_index.get_indexer(pairs[columns]))),
                           shape=(len(row_index), len(column_index)))
    norms = np.sqrt(np.asarray(matrix.sum(axis=1)).ravel())
    return matrix, sp.diags(1 / np.maximum(norms, 1e-9)) @ matrix, row_index, column_index


def diversified(window: Window, weight: float, products) -> float:
    """Maximal marginal relevance: each next pick maximizes score - weight x its highest cosine to the picks."""
    _, normalized, items, _ = products  # co_purchase by product
    hits = 0
    for _, frame in window.judged().groupby("customer_id", sort=False):
        frame = frame.sort_values("rank")
        position = items.get_indexer(frame.product_id)
        similarity = (normalized[position] @ normalized[position].T).toarray()
        score = frame.score.to_numpy()
        score = (score - score.min()) / max(score.max() - score.min(), 1e-9)
        closest, free, picks = np.zeros(len(score)), np.ones(len(score), dtype=bool), []
        for _ in range(min(K, len(score))):
            pick = int(np.argmax(np.where(free, score - weight * closest, -np.inf)))
            picks.append(pick)
            free[pick] = False
            closest = np.maximum(closest, similarity[:, pick])
        hits += bool(frame.y.to_numpy()[picks].any())
    return round(hits / len(window.evaluated), 4)


def with_customer_neighbours(window: Window, neighbours: int) -> pd.DataFrame:
    """Adds `neighbours_score`: the bought-by-neighbours score of each listed product, max 1 per customer."""
    matrix, normalized, customers, items = co_purchase(window.history, "customer_id", "product_id")
    similarity = (normalized @ normalized.T).toarray()
    np.fill_diagonal(similarity, 0)
    floor = -np.partition(-similarity, neighbours, axis=1)[:, neighbours][:, None]
    similarity[similarity < floor] = 0
    scores = sp.csr_matrix(similarity) @ matrix
    frame = window.judged()
    row, column = customers.get_indexer(frame.customer_id), items.get_indexer(frame.product_id)
    frame["neighbours_score"] = np.asarray(scores[row, column]).ravel()
    top = frame.groupby("customer_id").neighbours_score.transform("max").replace(0, 1)
    frame["neighbours_score"] /= top
    frame["score_share"] = frame.score / frame.groupby("customer_id").score.transform("max")
    return frame


def with_new_adopters(window: Window, half_life_days: float) -> pd.Series:
    """Per listed product: customers who first bought it lately (decayed), max 1."""
    first = window.history.groupby(["customer_id", "product_id"]).purchased_at.min().reset_index()
    weight = 0.5 ** ((window.cutoff - first.purchased_at).dt.days / half_life_days)
    adopters = weight.groupby(first.product_id).sum()
    return (adopters / adopters.max()).reindex(window.top.product_id).fillna(0).to_numpy()


def measure(con, purchases: pd.DataFrame, as_of: datetime) -> dict:
    selection = select_model(purchases_source(con), as_of, window_days=WINDOW_DAYS)
    config = replace(selection.config, calibration_days=0)
    cutoff = as_of - timedelta(days=WINDOW_DAYS)
    window = Window(con, purchases, config, cutoff, as_of)
    frame = window.judged()
    row = {"validation window": f"{cutoff:%Y-%m-%d}..{as_of:%Y-%m-%d}", "customers": len(window.evaluated),
           "deployed": selection.chosen, "deployed order": window.hit_rate(frame.assign(order=-frame["rank"]), "order")}
    row.update({f"any hit in top {depth}": round(frame[(frame["rank"] <= depth) & frame.y].customer_id.nunique()
                                                 / len(window.evaluated), 4) for depth in (20, DEPTH)})
    training = [Window(con, purchases, config, cutoff - timedelta(days=days), cutoff) for days in (30, WINDOW_DAYS)]
    row["learned ranker"] = learned(training, window)
    products = co_purchase(window.history, "product_id", "customer_id")  # once for the three weights
    for weight in (0.1, 0.3, 0.5):
        row[f"diversity {weight}"] = diversified(window, weight, products)
    neighbours = with_customer_neighbours(window, 100)
    for blend in (0.1, 0.2, 0.3):
        neighbours["blend"] = (1 - blend) * neighbours.score_share + blend * neighbours.neighbours_score
        row[f"customer neighbours {blend}"] = window.hit_rate(neighbours, "blend")
    window.top["adopters"] = with_new_adopters(window, 7.0)
    frame = window.judged()
    collaborative = frame.score - config.popularity_blend * frame.popularity
    for share in (0.5, 1.0):
        frame["blend"] = collaborative + config.popularity_blend * ((1 - share) * frame.popularity + share * frame.adopters)
        row[f"new adopters {share}"] = window.hit_rate(frame, "blend")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--online-retail", default=str(DEFAULT_ONLINE_RETAIL))
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    con = duckdb.connect()
    load_online_retail(con, args.online_retail)
    con.execute(f"DELETE FROM {PURCHASES} WHERE purchased_at >= $end", {"end": AS_OF[-1]})  # no peeking
    purchases = con.sql(f"SELECT customer_id, product_id, amount, purchased_at, date_trunc('day', purchased_at) AS day"
                        f" FROM {PURCHASES}").df()
    rows = [measure(con, purchases, as_of) for as_of in AS_OF]
    for name in rows[0]:
        print(f"| {name} | " + " | ".join(str(row[name]) for row in rows) + " |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
