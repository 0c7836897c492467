"""Recommender core and offline evaluation: plain Python/numpy, no Dagster, no file paths.

    from recsys.recommender import Recommender, RecommenderConfig
    model = Recommender.fit(purchases, RecommenderConfig(), as_of=None)
    for part in model.recommend(purchases, catalog): ...

    from recsys.evaluation import evaluate_split
    report = evaluate_split(purchases, cutoff, test_end, catalog=None)

Modules: purchases (streaming input, customer chunks), ease (Gram accumulation, solve, top-K),
recommender (fit/score orchestration, confidence, predicted value), calibration (isotonic),
baselines (global/segment popularity, RFM segments), metrics, evaluation, online_retail (the
UCI data set via DuckDB), synthetic (seeded benchmark data).
"""
