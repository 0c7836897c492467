"""Recommender core and offline evaluation: plain Python/numpy, no Dagster, no file paths."""
