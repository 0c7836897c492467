"""Adding a landing source is one registry entry, plus its suite and the SQL that reads it: the
ingestion asset, its checks, the GX check, the landing path, the SQL model's dependency, the job
and the monitoring watch lists all follow, and the new day lands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest

from assets.common.sources import SOURCES, RawTable, Source
from assets.transform.sql_models import SQL_DIR
from assets.validate import rules
from definitions import build_definitions
from resources.alerts import Alerts
from resources.compute_engine import ComputeEngine
from resources.landing import LandingZone
from resources.warehouse import fetch_all

DAY = "2011-09-01"

RETURNS = Source(
    name="returns",
    reader="csv",
    landing_pattern="returns/{date}.csv",
    fields={"ReturnId": "return_id", "StockCode": "product_id", "Quantity": "quantity"},
    tables=(RawTable("returns", {"return_id": "VARCHAR", "product_id": "VARCHAR", "quantity": "INTEGER"},
                     "coalesce(return_id, 'line ' || line_no)"),),
    description="The day's returned items -> raw.returns.",
)
RETURNS_SUITE = {"name": "returns", "expectations": [
    {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "return_id"}, "meta": {"rule": "return_id_missing"}},
    {"type": "expect_column_values_to_be_of_type", "kwargs": {"column": "quantity", "type_": "int32"},
     "meta": {"rule": "quantity_not_an_integer"}},
]}
RETURNS_SQL = "-- Returned quantity per product.\nSELECT product_id, sum(quantity) AS returned FROM raw.returns GROUP BY 1\n"


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """The shipped suites and models plus the new source's suite and model."""
    suites, models = tmp_path / "expectations", tmp_path / "sql"
    shutil.copytree(rules.EXPECTATIONS_DIR, suites)
    shutil.copytree(SQL_DIR, models)
    (suites / "returns.json").write_text(json.dumps(RETURNS_SUITE))
    (models / "returns_by_product.sql").write_text(RETURNS_SQL)
    monkeypatch.setattr(rules, "EXPECTATIONS_DIR", suites)
    rules.load_suite.cache_clear()
    yield (*SOURCES, RETURNS), models
    rules.load_suite.cache_clear()


def test_a_new_source_is_one_registry_entry(registry, tmp_path, warehouse):
    sources, models = registry
    defs = build_definitions(sources, models)
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.materializable_asset_keys}
    assert {"raw_returns", "returns_by_product"} <= keys
    assert {k.to_user_string() for k in graph.get(dg.AssetKey("returns_by_product")).parent_keys} == {"raw_returns"}
    checks = {(c.asset_key.to_user_string(), c.name) for c in graph.asset_check_keys}
    assert {("raw_returns", "record_accounting"), ("raw_returns", "error_rate"),
            ("raw_returns", "returns_expectation_suite")} <= checks
    job_keys = {k.to_user_string() for k in defs.resolve_job_def("daily_pipeline").asset_layer.selected_asset_keys}
    assert {"raw_returns", "returns_by_product"} <= job_keys
    monitoring = defs.resources["monitoring"]
    assert "raw_returns" in monitoring.freshness_assets

    landing = tmp_path / "landing"
    (landing / "returns").mkdir(parents=True)
    (landing / "returns" / f"{DAY}.csv").write_text("ReturnId,StockCode,Quantity\nr1,85123A,2\nr2,85123A,1\n,22000,1\n")
    selected = [defs.get_assets_def(dg.AssetKey(name)) for name in ("raw_returns", "returns_by_product")]
    result = dg.materialize(selected, partition_key=DAY, resources={
        "warehouse": warehouse, "landing": LandingZone(root=str(landing)), "alerts": Alerts(warehouse=warehouse),
        "compute_engine": ComputeEngine()})
    assert result.success
    with warehouse.connect(read_only=True) as con:
        assert fetch_all(con, "SELECT * FROM analytics.returns_by_product") == [("85123A", 3)]
        assert fetch_all(con, "SELECT rule FROM ops.schema_errors WHERE source = 'returns'") == [("return_id_missing",)]


def test_the_landing_path_of_a_new_source_can_be_pointed_elsewhere(registry, monkeypatch):
    monkeypatch.setenv("LANDING_RETURNS_PATTERN", "/mnt/returns/{date}.csv")
    defs = build_definitions(*registry)
    landing: LandingZone = defs.resources["landing"]
    assert landing.path("returns", DAY, RETURNS.landing_pattern) == Path(f"/mnt/returns/{DAY}.csv")
