"""Shared fixtures: real DuckDB files in tmp dirs, the shared Online Retail data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from resources.warehouse import DuckDBWarehouse  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ONLINE_RETAIL_DIR = ROOT.parent / "shared" / "data" / "online-retail" / "by-day"


@pytest.fixture
def warehouse(tmp_path: Path) -> DuckDBWarehouse:
    return DuckDBWarehouse(path=str(tmp_path / "warehouse.duckdb"), memory_limit="512MB")


@pytest.fixture
def online_retail_dir() -> Path:
    if not ONLINE_RETAIL_DIR.is_dir():
        pytest.skip(f"Online Retail data not found at {ONLINE_RETAIL_DIR} (see README: fetch step)")
    return ONLINE_RETAIL_DIR
