"""The raw layer and the SQL models on the lakehouse (Iceberg, SQL catalog on a real PostgreSQL):
five processes land five days of each source at once, without a lock, and the tables hold row for
row what the warehouse's assets land from the same files; the sql/ models over them equal the
warehouse's; a re-run is a skip, a changed file replaces its day exactly, and a writer that dies
before its batch marker leaves a day that the next run writes again."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import duckdb
import pytest

from assets.common.sources import SOURCES
from assets.ingest.lakehouse_landing import MARKER_TABLE, land_on_lakehouse
from assets.ingest.raw_assets import ensure_tables
from generator import FaultRates
from resources.lakehouse import PARTITION_COLUMN, Lakehouse
from resources.warehouse import DuckDBWarehouse
from tests.ingestion_support import day, generate_landing, materialize, raw_resources, snapshot
from tests.postgres_support import PostgresServer, postgres_fixture  # noqa: F401 (`postgres`)

pytestmark = pytest.mark.slow  # a PostgreSQL server

DAYS = 5  # more writers than cores; ten took twice as long in CI for nothing more
SOURCE_ORDER = ("products", "customers", "transactions")  # a catalog's day before the sources judged against it


def lakehouse_options(server: PostgresServer, folder: Path, name: str) -> dict:
    url = f"postgresql+psycopg2://{server.user}:{server.password}@{server.host}:{server.port}/{server.db_name}"
    return {"catalog_uri": url, "location": str(folder / "lake"), "catalog_name": name}  # a catalog per test


def land_one(arguments: tuple[dict, str, str, str]) -> tuple[str, str, bool, int]:
    """In its own process: one source's file of one day."""
    options, source_name, partition, path = arguments
    source = next(s for s in SOURCES if s.name == source_name)
    batch = land_on_lakehouse(Lakehouse(**options), source, partition, Path(path))
    return batch.source, batch.day, batch.skipped, batch.commit_attempts


def lake_snapshot(lakehouse: Lakehouse, tmp_path: Path) -> dict[str, list[tuple]]:
    """The lakehouse's raw layer read into a DuckDB with the warehouse's tables, then the same
    queries as the warehouse's snapshot."""
    catalog = lakehouse.catalog()
    path = tmp_path / f"lake-{len(list(tmp_path.glob('lake-*')))}.duckdb"
    with duckdb.connect(str(path)) as con:
        ensure_tables(con, SOURCES)
        for table in [t.qualified for s in SOURCES for t in s.tables] + ["ops.schema_errors", MARKER_TABLE]:
            if catalog.table_exists(table):
                con.register("rows", catalog.load_table(table).scan().to_arrow().drop_columns([PARTITION_COLUMN]))
                con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM rows")
                con.unregister("rows")
    return snapshot(DuckDBWarehouse(path=str(path)))


@pytest.fixture(scope="module")
def landed_days(tmp_path_factory) -> tuple[Path, dict, DuckDBWarehouse]:
    """Five days of generated files with every fault, and what the warehouse's assets land from them."""
    root = tmp_path_factory.mktemp("lake-landing")
    landing = generate_landing(root / "landing", customers=150, days=DAYS, faults=FaultRates.uniform(0.03), seed=11,
                               returning_share=0.3)
    warehouse = DuckDBWarehouse(path=str(root / "warehouse.duckdb"), memory_limit="512MB")
    for index in range(DAYS):
        assert materialize(raw_resources(warehouse, landing), day(index)).success
    return landing, snapshot(warehouse), warehouse


@pytest.fixture(scope="module")
def landed_lake(postgres, tmp_path_factory, landed_days) -> tuple[dict, dict[str, list], list]:
    """The five days landed on the lakehouse by five processes at once, source after source (then
    the customers again); what each writer returned."""
    landing = landed_days[0]
    options = lakehouse_options(postgres, tmp_path_factory.mktemp("lake"), "landed_days")

    def files_of(source: str) -> list[tuple]:
        suffix = "jsonl" if source == "customers" else "csv"
        return [(options, source, day(i), str(landing / source / f"{day(i)}.{suffix}")) for i in range(DAYS)]

    pool = multiprocessing.get_context("spawn").Pool(DAYS)
    try:
        landed = {source: pool.map(land_one, files_of(source)) for source in SOURCE_ORDER}
        again = pool.map(land_one, files_of("customers"))
    finally:  # close and join (see tests/test_lakehouse.py)
        pool.close()
        pool.join()
    return options, landed, again


def test_five_processes_land_five_days_at_once_and_the_raw_layer_equals_the_warehouses(landed_lake, tmp_path, landed_days):
    _, expected, _ = landed_days
    options, landed, again = landed_lake
    for source, batches in landed.items():
        assert sorted(d for s, d, skipped, _ in batches if not skipped) == [day(i) for i in range(DAYS)], source
        print(source, "commit attempts per writer:", sorted(a for *_, a in batches))
    assert all(skipped for _, _, skipped, _ in again)  # each day's marker holds its file's fingerprint
    got = lake_snapshot(Lakehouse(**options), tmp_path)
    assert set(got) == set(expected)
    for table, rows in expected.items():
        assert len(rows) > 0, table
        assert got[table] == rows, table  # every row once, and the same rows


MODELS = {  # doubles summed in another order may differ in the last bits
    "stg_order_lines": "SELECT * FROM analytics.stg_order_lines ORDER BY ALL",
    "dim_products": "SELECT * FROM analytics.dim_products ORDER BY ALL",
    "stg_customer_history": "SELECT * FROM analytics.stg_customer_history ORDER BY ALL",
    "stg_purchases": "SELECT * FROM analytics.stg_purchases ORDER BY ALL",
    "customer_features": "SELECT * REPLACE (round(monetary, 9) AS monetary, round(top_category_share, 9) AS "
                         "top_category_share) FROM analytics.customer_features ORDER BY ALL",
}


def test_the_sql_models_on_the_lakehouse_equal_the_warehouses_as_of_a_day(landed_lake, landed_days, tmp_path):
    """sql/ over the raw layer on the lakehouse, as of the last day and an earlier one: the last
    day's tables equal the warehouse's models built from the same files, row for row; a re-run
    is a skip; the earlier day's partition holds only what had landed by then."""
    from assets.transform.lakehouse_models import build_models_on_lakehouse
    from tests.test_sql_models import materialize_models

    options, _, _ = landed_lake
    _, _, warehouse = landed_days
    lakehouse = Lakehouse(**options)
    last, earlier = day(DAYS - 1), day(2)
    built = build_models_on_lakehouse(lakehouse, last)
    assert not built.skipped and all(w.rows > 0 for w in built.written.values())
    assert materialize_models(warehouse, last).success
    with duckdb.connect() as con:
        con.execute(f"ATTACH '{warehouse.file}' AS wh (READ_ONLY)")
        expected = {name: con.execute(sql.replace("analytics.", "wh.analytics.")).fetchall() for name, sql in MODELS.items()}
        con.execute("CREATE SCHEMA analytics")
        for name in MODELS:
            con.execute(f"CREATE TABLE analytics.{name} AS SELECT * FROM wh.analytics.{name} LIMIT 0")
            con.register("lake_rows", lakehouse.read_day(f"analytics.{name}", last).drop_columns([PARTITION_COLUMN]))
            con.execute(f"INSERT INTO analytics.{name} BY NAME SELECT * FROM lake_rows")
            con.unregister("lake_rows")
        got = {name: con.execute(sql).fetchall() for name, sql in MODELS.items()}
    for name, rows in expected.items():
        assert len(rows) > 0 and got[name] == rows, name
    assert build_models_on_lakehouse(lakehouse, last).skipped
    build_models_on_lakehouse(lakehouse, earlier)
    lines = {d: lakehouse.read_day("analytics.stg_order_lines", d).num_rows for d in (earlier, last)}
    assert 0 < lines[earlier] < lines[last] == len(expected["stg_order_lines"])


def test_a_changed_file_replaces_its_day_and_a_batch_without_its_marker_is_written_again(
        postgres, tmp_path, landed_days, monkeypatch):
    landing = landed_days[0]
    lakehouse = Lakehouse(**lakehouse_options(postgres, tmp_path, "replace"))
    products = next(s for s in SOURCES if s.name == "products")
    transactions = next(s for s in SOURCES if s.name == "transactions")
    for index in (0, 1):
        land_on_lakehouse(lakehouse, products, day(index), landing / "products" / f"{day(index)}.csv")
        land_on_lakehouse(lakehouse, transactions, day(index), landing / "transactions" / f"{day(index)}.csv")
    before = lake_snapshot(lakehouse, tmp_path)

    # the writer dies after the raw tables and the errors, before the marker
    real_replace = Lakehouse._replace_day

    def dies_at_the_marker(self, table, *args, **kwargs):
        if table == MARKER_TABLE:
            raise RuntimeError("killed before the marker")
        return real_replace(self, table, *args, **kwargs)

    changed = tmp_path / "transactions.csv"
    lines = (landing / "transactions" / f"{day(1)}.csv").read_bytes().splitlines()
    changed.write_bytes(b"\n".join(lines[:10] + lines[15:]) + b"\n")  # five order lines fewer
    monkeypatch.setattr(Lakehouse, "_replace_day", dies_at_the_marker)
    with pytest.raises(RuntimeError, match="before the marker"):
        land_on_lakehouse(lakehouse, transactions, day(1), changed)
    monkeypatch.undo()
    batch = land_on_lakehouse(lakehouse, transactions, day(1), changed)
    assert not batch.skipped  # no marker for this file: written again, whole
    after = lake_snapshot(lakehouse, tmp_path)
    assert after["products"] == before["products"]
    day0 = [r for r in after["transactions"] if str(r[0]) == day(0)]
    assert day0 == [r for r in before["transactions"] if str(r[0]) == day(0)]  # the other day is untouched
    day1_before = [r[:1] + r[2:] for r in before["transactions"] if str(r[0]) == day(1)]  # lines moved: no line_no
    day1_after = [r[:1] + r[2:] for r in after["transactions"] if str(r[0]) == day(1)]
    assert 0 < len(day1_before) - len(day1_after) <= 5 and set(day1_after) <= set(day1_before)
    fingerprints = [r for r in after["fingerprints"] if r[0] == "transactions"]
    assert len(fingerprints) == 2 and len(set(r[1] for r in fingerprints)) == 2  # one row a day
    assert land_on_lakehouse(lakehouse, transactions, day(1), changed).skipped
    # the errors of another source on the same days were not replaced with the order lines' ones
    assert [r for r in after["schema_errors"] if r[1] == "products"] == \
        [r for r in before["schema_errors"] if r[1] == "products"] != []


def test_the_lake_assets_land_a_day_skip_it_again_and_wait_for_their_catalog(postgres, tmp_path, landed_days, monkeypatch):
    """lake_raw_* through Dagster: a day's three files land (metadata: rows, counts, skipped) with
    the warehouse's record_accounting and error_rate checks, a re-run is a skip that reports the
    same verdicts (a failed error_rate stays failed); customers of a day whose products have not
    landed on the lakehouse are refused with the days missing (catalog_wait_seconds 0: no retry)."""
    import dagster as dg

    from assets.ingest.lakehouse_landing import build_lakehouse_ingestion_assets
    from resources.landing import LandingZone

    landing = landed_days[0]
    assets = build_lakehouse_ingestion_assets()
    resources = {"lakehouse": Lakehouse(**lakehouse_options(postgres, tmp_path, "assets")),
                 "landing": LandingZone(root=str(landing))}
    no_wait = {"ops": {"lake_raw_customers": {"config": {"catalog_wait_seconds": 0}}}}
    refused = dg.materialize([a for a in assets if a.key.to_user_string() == "lake_raw_customers"],
                             partition_key=day(1), resources=resources, run_config=no_wait, raise_on_error=False)
    assert not refused.success
    [failure] = [e for e in refused.all_events if e.is_step_failure]
    assert "products of ['2011-09-01', '2011-09-02'] has not landed" in str(failure.event_specific_data.error.message)

    strict = {"ops": {"lake_raw_customers": {"config": {"max_error_rate": 0.0}}}}  # any bad record fails it
    first = dg.materialize(assets, partition_key=day(0), resources=resources, run_config=strict)
    metadata = {e.asset_key.to_user_string(): {k: v.value for k, v in e.materialization.metadata.items()}
                for e in first.get_asset_materialization_events()}
    assert set(metadata) == {"lake_raw_products", "lake_raw_customers", "lake_raw_transactions"}
    assert not metadata["lake_raw_customers"]["skipped"] and metadata["lake_raw_customers"]["rows"]["raw.customers"] > 100
    again = dg.materialize(assets, partition_key=day(0), resources=resources, run_config=strict)
    assert all(e.materialization.metadata["skipped"].value for e in again.get_asset_materialization_events())

    # the warehouse's checks on the lake assets; a skip gives the verdicts of what landed, not a pass
    def verdicts(result) -> dict:
        return {(e.asset_key.to_user_string(), e.check_name): (e.passed, e.description)
                for e in result.get_asset_check_evaluations()}

    assert verdicts(again) == verdicts(first) and len(verdicts(first)) == 6
    assert all(passed for (_, check), (passed, _) in verdicts(first).items() if check == "record_accounting")
    assert not verdicts(first)[("lake_raw_customers", "error_rate")][0]  # the generator's faults, over 0 %
    assert metadata["lake_raw_customers"]["input_records"] == (
        metadata["lake_raw_customers"]["valid_records"] + metadata["lake_raw_customers"]["quarantined_records"])


def test_the_lake_assets_are_defined_when_a_lakehouse_is_configured_and_stay_out_of_the_daily_run(monkeypatch, tmp_path):
    from assets.monitor.settings import settings_for
    from definitions import build_definitions

    monkeypatch.delenv("LAKEHOUSE_REST_URI", raising=False)
    monkeypatch.delenv("LAKEHOUSE_CATALOG_URI", raising=False)
    plain = build_definitions()
    assert not {"lakehouse_pipeline", "prune_lakehouse_builds"} & {job.name for job in plain.resolve_all_job_defs()}
    assert "lakehouse" not in plain.resolve_job_def("purge_quarantined_raw_text").required_resource_keys
    monkeypatch.setenv("LAKEHOUSE_CATALOG_URI", f"sqlite:///{tmp_path}/catalog.db")
    defs = build_definitions()
    # the lake's retention: its builds pruned, and its quarantined raw text purged with the warehouse's
    assert defs.resolve_schedule_def("prune_lakehouse_builds_schedule").job_name == "prune_lakehouse_builds"
    assert "lakehouse" in defs.resolve_job_def("purge_quarantined_raw_text").required_resource_keys
    lake_job = defs.resolve_job_def("lakehouse_pipeline")
    daily = defs.resolve_job_def("daily_pipeline")
    lake_assets = {k.to_user_string() for k in lake_job.asset_layer.executable_asset_keys}
    # a trial on the warehouse backend: every lake stage but the one that serves, which would refuse
    assert lake_assets == {"lake_raw_products", "lake_raw_customers", "lake_raw_transactions", "lake_sql_models",
                           "lake_product_embeddings", "lake_customer_segments", "lake_recommendations",
                           "lake_recommendation_quality"}
    assert "lake_validated_recommendations" in {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert not lake_assets & {k.to_user_string() for k in daily.asset_layer.executable_asset_keys}
    assert "raw_customers" in {k.to_user_string() for k in daily.asset_layer.executable_asset_keys}
    assert defs.resolve_sensor_def("landing_sensor").job_name == "daily_pipeline"  # the default backend
    assert "published_recommendations" in {k.to_user_string() for k in daily.asset_layer.executable_asset_keys}
    monkeypatch.setenv("PIPELINE_BACKEND", "lakehouse")  # the switch: the daily triggers run the lake's job
    defs = build_definitions()
    assert defs.resolve_sensor_def("landing_sensor").job_name == "lakehouse_pipeline"
    assert defs.resolve_schedule_def("daily_pipeline_schedule").job_name == "lakehouse_pipeline"
    serving = {k.to_user_string() for k in defs.resolve_job_def("lakehouse_pipeline").asset_layer.executable_asset_keys}
    assert serving == lake_assets | {"lake_validated_recommendations"}
    published = {k.to_user_string() for job in defs.resolve_all_job_defs() for k in job.asset_layer.executable_asset_keys}
    assert "published_recommendations" not in published  # lake_validated_recommendations writes its table
    watching = settings_for()  # the alerting sensors watch what the triggers run
    assert watching.freshness_assets == ["lake_raw_products", "lake_raw_customers", "lake_raw_transactions"]
    assert watching.rule_assets["confidence_drop"] == ["lake_recommendations"]
    monkeypatch.setenv("PIPELINE_SOURCES", "transactions")  # an order-lines shop: the others never arrive
    received = {k.to_user_string() for k in build_definitions().resolve_job_def(
        "lakehouse_pipeline").asset_layer.executable_asset_keys}
    assert received == serving - {"lake_raw_products", "lake_raw_customers"}
    monkeypatch.delenv("PIPELINE_SOURCES")
    monkeypatch.delenv("LAKEHOUSE_CATALOG_URI")
    with pytest.raises(ValueError, match="PIPELINE_BACKEND=lakehouse needs"):
        build_definitions()


def test_the_arrow_route_for_object_stores_lands_the_same_rows(postgres, tmp_path, landed_days, monkeypatch):
    """On a local location DuckDB writes the Parquet files and pyiceberg adds them; on S3 the rows
    go through Arrow chunks (writes_local_files is False there). Both land the same tables."""
    landing = landed_days[0]
    customers = next(s for s in SOURCES if s.name == "customers")
    products = next(s for s in SOURCES if s.name == "products")
    lakes = {}
    for route in ("files", "arrow"):
        if route == "arrow":
            monkeypatch.setattr(Lakehouse, "writes_local_files", property(lambda self: False))
        lake = Lakehouse(**lakehouse_options(postgres, tmp_path / route, f"route_{route}"))
        land_on_lakehouse(lake, products, day(0), landing / "products" / f"{day(0)}.csv")
        land_on_lakehouse(lake, customers, day(0), landing / "customers" / f"{day(0)}.jsonl")
        lakes[route] = lake_snapshot(lake, tmp_path)
    assert lakes["files"] == lakes["arrow"] and len(lakes["files"]["customer_purchases"]) > 100
