"""Evaluate: the recommender's offline quality against baselines."""

from assets.evaluate.recommendation_quality import recommendation_quality

ASSETS = [recommendation_quality]
