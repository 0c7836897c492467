"""The only doors to the outside world. `build_resources()` picks implementations from the
environment, so the same definitions run on embedded defaults or against real services."""

from __future__ import annotations

import os

import dagster as dg

from resources.warehouse import DEFAULT_WAREHOUSE_PATH, DuckDBWarehouse


def build_resources() -> dict[str, object]:
    """Resources for the code location, chosen by environment variables (see README)."""
    resources: dict[str, object] = {
        "warehouse": DuckDBWarehouse(
            path=os.getenv("WAREHOUSE_PATH", DEFAULT_WAREHOUSE_PATH),
            memory_limit=os.getenv("DUCKDB_MEMORY_LIMIT", "1GB"),
        ),
    }
    return resources
