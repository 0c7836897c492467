"""Helpers for the ingestion tests: generated landing folders, resources, materializations."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import dagster as dg

from assets.ingest import build_ingestion_assets
from assets.validate import build_suite_checks
from generator import FaultRates, GeneratorConfig, generate
from resources.alerts import Alerts
from resources.compute_engine import ComputeEngine
from resources.landing import LandingZone
from resources.warehouse import DuckDBWarehouse, fetch_all

START = dt.date(2011, 9, 1)
RAW = {asset.key.to_user_string(): asset for asset in build_ingestion_assets()}
RAW_ASSETS = list(RAW.values())
SUITE_CHECKS = build_suite_checks()


def generate_landing(out: Path, customers: int = 300, days: int = 2, faults: FaultRates | None = None,
                     seed: int = 3, **options: Any) -> Path:
    generate(GeneratorConfig(out=out, customers=customers, days=days, start=START, seed=seed,
                             faults=faults or FaultRates(), **options))
    return out


def day(index: int) -> str:
    return (START + dt.timedelta(days=index)).isoformat()


def raw_resources(warehouse: DuckDBWarehouse, landing: LandingZone | Path | str,
                  webhook_url: str | None = None) -> dict[str, Any]:
    zone = landing if isinstance(landing, LandingZone) else LandingZone(root=str(landing))
    alerts = Alerts(warehouse=warehouse, webhook_url=webhook_url, webhook_attempts=2, webhook_backoff_seconds=0.01,
                    webhook_timeout_seconds=2)
    return {"warehouse": warehouse, "landing": zone, "alerts": alerts, "compute_engine": ComputeEngine()}


def materialize(resources: dict[str, Any], partition: str, assets: list | None = None, force: bool = False,
                with_suite_checks: bool = False, raise_on_error: bool = True) -> dg.ExecuteInProcessResult:
    selected = list(assets or RAW_ASSETS)
    if with_suite_checks:
        selected += SUITE_CHECKS
    run_config = None
    if force:
        run_config = {"ops": {a.key.to_user_string(): {"config": {"force": True}} for a in selected
                              if isinstance(a, dg.AssetsDefinition) and a.key.to_user_string().startswith("raw_")}}
    return dg.materialize(selected, partition_key=partition, resources=resources, run_config=run_config,
                          raise_on_error=raise_on_error)


def materialization(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, Any]:
    """The metadata values of an asset's materialization in a run."""
    for event in result.get_asset_materialization_events():
        if event.asset_key.to_user_string() == asset:
            return {k: v.value for k, v in event.materialization.metadata.items()}
    raise AssertionError(f"no materialization of {asset}")


def check_results(result: dg.ExecuteInProcessResult) -> dict[tuple[str, str], Any]:
    return {(e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()}


def snapshot(warehouse: DuckDBWarehouse) -> dict[str, list[tuple]]:
    """Every landed row, ordered, without the timestamps of when they landed."""
    queries = {
        "products": "SELECT * FROM raw.products ORDER BY ALL",
        "customers": "SELECT * FROM raw.customers ORDER BY ALL",
        "customer_purchases": "SELECT * FROM raw.customer_purchases ORDER BY ALL",
        "transactions": "SELECT * FROM raw.transactions ORDER BY ALL",
        "schema_errors": "SELECT * EXCLUDE (detected_at) FROM ops.schema_errors ORDER BY ALL",
        "fingerprints": "SELECT source, partition_date, fingerprint, input_records, valid_records,"
                        " quarantined_records FROM ops.batch_fingerprints ORDER BY ALL",
    }
    with warehouse.connect(read_only=True) as con:
        return {name: fetch_all(con, sql) for name, sql in queries.items()}
