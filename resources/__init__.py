"""The only doors to the outside world. `build_resources()` picks implementations from the
environment, so the same definitions run on embedded defaults or against real services."""

from __future__ import annotations

import os

import dagster as dg

from resources.alerts import Alerts
from resources.landing import DEFAULT_LANDING_DIR, LandingZone
from resources.warehouse import DEFAULT_WAREHOUSE_PATH, DuckDBWarehouse


def build_resources() -> dict[str, object]:
    """Resources for the code location, chosen by environment variables (see README)."""
    resources: dict[str, object] = {
        "warehouse": DuckDBWarehouse(
            path=os.getenv("WAREHOUSE_PATH", DEFAULT_WAREHOUSE_PATH),
            memory_limit=os.getenv("DUCKDB_MEMORY_LIMIT", "1GB"),
        ),
    }
    resources["landing"] = landing_zone()
    resources["alerts"] = Alerts(
        warehouse=resources["warehouse"],
        # An unset variable means no webhook (dg.EnvVar would fail the load on a missing variable).
        webhook_url=dg.EnvVar("ALERT_WEBHOOK_URL") if os.getenv("ALERT_WEBHOOK_URL") else None,
    )
    return resources


def landing_zone() -> LandingZone:
    """LANDING_DIR, and LANDING_<SOURCE>_PATTERN to point one source elsewhere (e.g. Online Retail)."""
    patterns = {f"{source}_pattern": os.environ[f"LANDING_{source.upper()}_PATTERN"]
                for source in ("products", "customers", "transactions") if os.getenv(f"LANDING_{source.upper()}_PATTERN")}
    return LandingZone(root=os.getenv("LANDING_DIR", DEFAULT_LANDING_DIR), **patterns)
