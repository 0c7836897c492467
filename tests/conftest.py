"""Shared fixtures and helpers: real DuckDB files in tmp dirs, the shared Online Retail data, ports."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The tests use Online Retail days (from 2010-12-01) and generated ones (from 2011-09-01).
os.environ.setdefault("PIPELINE_FIRST_DAY", "2010-12-01")

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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the moment of asking)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def skip_or_fail(reason: str) -> None:
    """Skip when a machine lacks a tool a slow test needs; under CI (`CI=true`) fail instead, so
    a missing browser or database server never passes as a quiet skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI must run this test)")
    pytest.skip(reason)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with slow tests first: with xdist workers (`tasks.py test`), the long waits on daemons,
    browsers and cron minutes start early and the quick files fill in around them."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
