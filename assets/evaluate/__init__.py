"""Evaluate: the recommender's offline quality against baselines."""

from assets.evaluate.quality import recommendation_quality

ASSETS = [recommendation_quality]
