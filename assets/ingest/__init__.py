"""Ingest: each day's landing file of each registered source -> one partition of its raw tables."""

from assets.ingest.raw_assets import build_ingestion_assets

__all__ = ["build_ingestion_assets"]
