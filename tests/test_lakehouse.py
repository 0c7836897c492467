"""The lakehouse (Iceberg through pyiceberg, SQL catalog on a real PostgreSQL, and the same catalog
behind a REST catalog server on 127.0.0.1): a day is written as one idempotent partition overwrite
with its fingerprint as the commit marker, by as many processes at once as there are days, without
a lock; and the day's validated recommendations are published there."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest

from assets.outputs.business_rules import validated_recommendations
from assets.outputs.publish import PUBLISHED_TABLE, published_recommendations
from resources import lakehouse as lakehouse_from_environment
from resources.lakehouse import PARTITION_COLUMN, Lakehouse
from resources.warehouse import fetch_all
from tests.iceberg_rest_server import IcebergRestServer
from tests.lakehouse_support import files_left_behind, local_s3
from tests.postgres_support import PostgresServer, postgres_fixture  # noqa: F401 (`postgres`)
from tests.test_outputs import DAY, seed

pytestmark = pytest.mark.slow  # a PostgreSQL server

DAYS = [f"2011-09-{day:02d}" for day in range(1, 11)]
ROWS_PER_DAY = 2_000


def catalog_url(server: PostgresServer) -> str:
    return (f"postgresql+psycopg2://{server.user}:{server.password}@{server.host}:{server.port}/{server.db_name}")


def lakehouse_for(server: PostgresServer, folder: Path) -> Lakehouse:
    return Lakehouse(catalog_uri=catalog_url(server), location=str(folder / "lake"))


@pytest.fixture(params=["sql", "rest"])
def lake_options(request, postgres, tmp_path) -> Iterator[dict]:
    """Lakehouse options: the SQL catalog, or the same kind of catalog served through the REST protocol."""
    location = tmp_path / "lake"
    if request.param == "sql":
        yield {"catalog_uri": catalog_url(postgres), "location": str(location)}
        return
    with rest_catalog(postgres, location) as server:
        yield {"rest_uri": server.uri, "location": str(location)}


def rest_catalog(postgres: PostgresServer, location: Path, token: str | None = None) -> IcebergRestServer:
    return IcebergRestServer({"uri": catalog_url(postgres), "warehouse": location.resolve().as_uri()}, token=token)


def rows_of_day(day: str) -> pa.Table:
    number = int(day[-2:])
    return pa.table({"customer_id": [f"c{number:02d}-{i:05d}" for i in range(ROWS_PER_DAY)],
                     "score": pa.array([number + i / ROWS_PER_DAY for i in range(ROWS_PER_DAY)], pa.float64())})


def write_one_day(arguments: tuple[dict, str]) -> tuple[str, int, bool, int]:
    """In its own process: write one day (twice: the second write must be a skip)."""
    options, day = arguments
    lakehouse = Lakehouse(**options)
    first = lakehouse.write_day("raw.scores", day, rows_of_day(day), f"batch-{day}")
    again = lakehouse.write_day("raw.scores", day, rows_of_day(day), f"batch-{day}")
    assert again.skipped and again.rows == 0
    return day, first.rows, first.skipped, first.attempts


def test_ten_processes_write_ten_days_at_once_without_a_lock_and_every_row_lands_once(lake_options):
    """The table does not exist yet: the writers race to create it too."""
    lakehouse = Lakehouse(**lake_options)
    jobs = [(lake_options, day) for day in DAYS]
    pool = multiprocessing.get_context("spawn").Pool(len(DAYS))
    try:
        written = pool.map(write_one_day, jobs)
    finally:  # close and join: the `with` block's terminate() hung once on a worker blocked on the queue's lock
        pool.close()
        pool.join()
    assert sorted(day for day, rows, skipped, _ in written if rows == ROWS_PER_DAY and not skipped) == DAYS
    table = lakehouse.catalog().load_table("raw.scores").scan().to_arrow()
    assert table.num_rows == ROWS_PER_DAY * len(DAYS)
    assert len(set(table.column("customer_id").to_pylist())) == table.num_rows  # every row once
    for day in DAYS:
        assert lakehouse.day_fingerprint("raw.scores", day) == f"batch-{day}"
        assert lakehouse.read_day("raw.scores", day).num_rows == ROWS_PER_DAY
    print("commit attempts per writer:", sorted(attempts for *_, attempts in written))


def test_a_changed_day_is_replaced_exactly_and_the_other_days_are_untouched(lake_options):
    lakehouse = Lakehouse(**lake_options)
    for day in DAYS[:3]:
        lakehouse.write_day("raw.replaced", day, rows_of_day(day), f"v1-{day}")
    smaller = rows_of_day(DAYS[1]).slice(0, 10)
    written = lakehouse.write_day("raw.replaced", DAYS[1], smaller, f"v2-{DAYS[1]}")
    assert written.rows == 10 and not written.skipped
    assert lakehouse.read_day("raw.replaced", DAYS[1]).drop_columns([PARTITION_COLUMN]).equals(smaller)
    assert [lakehouse.read_day("raw.replaced", day).num_rows for day in (DAYS[0], DAYS[2])] == [ROWS_PER_DAY] * 2
    streamed = lakehouse.write_day("raw.replaced", DAYS[2], lambda: iter([smaller, smaller]), "v2-stream",
                                   schema=smaller.schema)
    assert streamed.rows == 20 and lakehouse.read_day("raw.replaced", DAYS[2]).num_rows == 20
    emptied = lakehouse.write_day("raw.replaced", DAYS[0], smaller.slice(0, 0), "v2-empty")
    assert emptied.rows == 0 and lakehouse.read_day("raw.replaced", DAYS[0]).num_rows == 0
    assert lakehouse.day_fingerprint("raw.replaced", DAYS[0]) == "v2-empty"


def test_the_days_validated_recommendations_are_published_and_a_rerun_is_a_skip(lake_options, warehouse):
    seed(warehouse)
    assert dg.materialize([validated_recommendations], partition_key=DAY, resources={"warehouse": warehouse}).success
    resources = {"warehouse": warehouse, "lakehouse": Lakehouse(**lake_options)}

    def publish() -> dict:
        result = dg.materialize([published_recommendations], partition_key=DAY, resources=resources)
        assert result.success
        return {k: v.value for k, v in result.get_asset_materialization_events()[0].materialization.metadata.items()}

    def published() -> list[tuple]:
        table = resources["lakehouse"].read_day(PUBLISHED_TABLE, DAY)
        return sorted(zip(table.column("customer_id").to_pylist(), table.column("product_id").to_pylist(), strict=True))

    def accepted() -> list[tuple]:
        with warehouse.connect(read_only=True) as con:
            return sorted(fetch_all(con, "SELECT customer_id, product_id FROM outputs.recommendations"))

    first = publish()
    assert not first["skipped"] and first["dagster/row_count"] == len(accepted()) == 1
    assert published() == accepted()
    assert publish()["skipped"]  # same outputs version: nothing written
    # The outputs are rebuilt with a lower confidence threshold: the day is replaced, exactly.
    config = {"ops": {"validated_recommendations": {"config": {"min_confidence": 0.0001, "force": True}}}}
    assert dg.materialize([validated_recommendations], partition_key=DAY, resources={"warehouse": warehouse},
                          run_config=config).success
    again = publish()
    assert not again["skipped"] and again["dagster/row_count"] == len(accepted()) == 2
    assert published() == accepted()


def test_a_day_the_outputs_do_not_hold_is_refused_with_a_clear_error(postgres, tmp_path, warehouse):
    seed(warehouse)
    assert dg.materialize([validated_recommendations], partition_key=DAY, resources={"warehouse": warehouse}).success
    result = dg.materialize([published_recommendations], partition_key="2011-03-02", raise_on_error=False,
                            resources={"warehouse": warehouse, "lakehouse": lakehouse_for(postgres, tmp_path)})
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert "holds day 2011-03-01, not 2011-03-02" in str(failure.event_specific_data.error)


def test_publishing_is_defined_only_when_a_lakehouse_is_configured(monkeypatch, tmp_path):
    from definitions import build_definitions

    def asset_names(defs: dg.Definitions) -> set[str]:
        return {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}

    monkeypatch.delenv("LAKEHOUSE_CATALOG_URI", raising=False)
    monkeypatch.delenv("LAKEHOUSE_REST_URI", raising=False)
    assert "published_recommendations" not in asset_names(build_definitions())
    monkeypatch.setenv("LAKEHOUSE_CATALOG_URI", f"sqlite:///{tmp_path}/catalog.db")
    configured = build_definitions()
    assert "published_recommendations" in asset_names(configured)
    assert "published_recommendations" in {
        key.to_user_string() for key in configured.resolve_job_def("daily_pipeline").asset_layer.asset_graph.get_all_asset_keys()}


def test_days_on_s3_are_written_replaced_and_read_through_a_local_s3_endpoint(postgres, tmp_path):
    """moto's S3 server on 127.0.0.1 stands in for S3: data and metadata files go there."""
    with local_s3() as s3:
        lakehouse = Lakehouse(catalog_uri=catalog_url(postgres), location="s3://lake/warehouse",
                              storage_options=s3.storage_options)
        assert "test-secret" not in repr(lakehouse)
        for day in DAYS[:2]:
            lakehouse.write_day("raw.on_s3", day, rows_of_day(day), f"v1-{day}")
        lakehouse.write_day("raw.on_s3", DAYS[0], rows_of_day(DAYS[0]).slice(0, 5), "v2")
        assert [lakehouse.read_day("raw.on_s3", day).num_rows for day in DAYS[:2]] == [5, ROWS_PER_DAY]
        stored = [o["Key"] for o in s3.client.list_objects_v2(Bucket="lake", Prefix="warehouse/raw/on_s3/")["Contents"]]
        assert any(key.endswith(".parquet") and f"{PARTITION_COLUMN}={DAYS[1]}" in key for key in stored)
        assert any(key.endswith(".metadata.json") for key in stored)

def test_a_rest_catalog_gets_its_token_and_a_commit_whose_answer_is_lost_is_reported_once(
        postgres, tmp_path, monkeypatch):
    """The REST catalog asks for a bearer token (configured through dg.EnvVar, never shown). A commit
    refused with 503 is committed again; a commit that landed but whose answer was lost (504) is
    found by its marker on reload: reported as written once, not written twice, not a skip."""
    from pyiceberg.exceptions import UnauthorizedError

    location = tmp_path / "lake"
    with rest_catalog(postgres, location, token="rest-secret-token") as server:
        with pytest.raises(UnauthorizedError):
            Lakehouse(rest_uri=server.uri, location=str(location)).write_day("raw.rest", DAYS[0], rows_of_day(DAYS[0]), "v1")
        monkeypatch.delenv("LAKEHOUSE_CATALOG_URI", raising=False)
        monkeypatch.setenv("LAKEHOUSE_REST_URI", server.uri)
        monkeypatch.setenv("LAKEHOUSE_REST_TOKEN", "rest-secret-token")
        monkeypatch.setenv("LAKEHOUSE_LOCATION", str(location))
        lakehouse = lakehouse_from_environment().process_config_and_initialize()  # as a run resolves dg.EnvVar
        assert "rest-secret-token" not in repr(lakehouse)
        assert not lakehouse.write_day("raw.rest", DAYS[0], rows_of_day(DAYS[0]), "v1").skipped
        server.commit_faults = ["refuse", "lose_answer"]
        smaller = rows_of_day(DAYS[0]).slice(0, 10)
        written = lakehouse.write_day("raw.rest", DAYS[0], smaller, "v2")
        assert (written.rows, written.skipped, written.attempts) == (10, False, 2)
        assert server.commit_faults == []
        assert lakehouse.read_day("raw.rest", DAYS[0]).drop_columns([PARTITION_COLUMN]).equals(smaller)
        assert lakehouse.day_fingerprint("raw.rest", DAYS[0]) == "v2"
        assert lakehouse.write_day("raw.rest", DAYS[0], smaller, "v2").skipped
        assert ("POST", "/v1/namespaces/raw/tables/rest") in server.requests  # the commits went through REST


def test_a_table_keeps_its_stored_order_through_the_lakehouse(tmp_path):
    """A model's stored order is part of its contract (the purchases sorted by customer, which the
    segments read in order): written by DuckDB and read back for a day, a sorted table of 3M rows
    keeps it. duckdb 2.0.1 writing with FILE_SIZE_BYTES moved row groups (1-3 places in 3M rows)."""
    import duckdb

    from assets.ingest.lakehouse_landing import insert_from_lakehouse, write_query

    lakehouse = Lakehouse(catalog_uri=f"sqlite:///{tmp_path}/catalog.db", location=str(tmp_path / "lake"))
    with duckdb.connect(config={"threads": 2, "memory_limit": "500MB"}) as con:
        con.execute("CREATE SCHEMA analytics")
        con.execute("CREATE TABLE analytics.sorted AS SELECT md5(range::VARCHAR) AS k, range AS v FROM range(3000000) "
                    "ORDER BY k")
        assert write_query(lakehouse, con, "analytics.sorted", "2011-09-01", "SELECT * FROM analytics.sorted", {},
                           "f1").rows == 3_000_000
        con.execute("CREATE TABLE analytics.read_back AS SELECT * FROM analytics.sorted LIMIT 0")
        con.execute("ALTER TABLE analytics.sorted RENAME TO kept")
        con.execute("ALTER TABLE analytics.read_back RENAME TO sorted")
        insert_from_lakehouse(con, lakehouse, "analytics.sorted", "2011-09-01", day_only=True)
        order = "SELECT count(*) FILTER (WHERE k < before), count(*) FROM (SELECT k, lag(k) OVER () AS before FROM {})"
        stored = con.execute(order.format("read_parquet($files)"),
                             {"files": lakehouse.local_files_through("analytics.sorted", "2011-09-01", True)}).fetchall()
        read_back = con.execute(order.format("analytics.sorted")).fetchall()
    assert stored == read_back == [(0, 3_000_000)]


def test_a_lake_stage_whose_inputs_have_no_build_fails_naming_them(tmp_path):
    """lake_recommendations on a lake where nothing was built: a failure that names the inputs and
    says what to run, not a build on empty tables."""
    from assets.common.lakehouse_stages import build_lakehouse_stage_assets
    from assets.transform.lakehouse_models import LAKE_MODELS_ASSET
    from assets.transform.sql_models import SQL_DIR, load_models
    from definitions import AI_ASSETS
    from resources.compute_engine import ComputeEngine

    stages = build_lakehouse_stage_assets(LAKE_MODELS_ASSET, [m.name for m in load_models(SQL_DIR)], AI_ASSETS)
    [recommendations] = [a for a in stages if a.key.to_user_string() == "lake_recommendations"]
    lake = Lakehouse(catalog_uri=f"sqlite:///{tmp_path}/catalog.db", location=str(tmp_path / "lake"))
    result = dg.materialize([recommendations], partition_key="2011-09-01", raise_on_error=False,
                            resources={"lakehouse": lake, "compute_engine": ComputeEngine()})
    [failure] = [e for e in result.all_events if e.is_step_failure]
    message = failure.event_specific_data.error.message
    assert "has no build on the lakehouse up to that day" in message
    assert all(name in message for name in ("stg_purchases", "dim_products", "product_embeddings"))


def test_pruning_keeps_every_build_a_run_within_the_retention_reads_and_deletes_the_rest(tmp_path):
    """Builds at days 1-5 (a stage that skipped day 4): with 2 days kept, days 4-5 and each
    asset's newest build before them stay, and runs as of days 3-5 read the same builds as before."""
    import datetime as dt

    import duckdb

    from assets.common.current_state import ensure_state_table, write_state
    from assets.common.lakehouse_retention import prune_builds
    from assets.common.lakehouse_stages import FAR_FUTURE, latest_states, publish_state, table_layouts
    from assets.ingest.lakehouse_landing import write_query

    lakehouse = Lakehouse(catalog_uri=f"sqlite:///{tmp_path}/catalog.db", location=str(tmp_path / "lake"),
                          history_grace_minutes=0)  # no reader to wait for
    days = [f"2011-09-0{n}" for n in range(1, 6)]
    builds = {"stg_purchases": ("analytics.stg_purchases", days),
              "customer_segments": ("ml.customer_segments", [d for d in days if d != "2011-09-04"])}
    model_files = {"2011-09-01": "models/a.bin", "2011-09-02": "models/a.bin", "2011-09-03": "models/b.bin",
                   "2011-09-05": "models/b.bin"}  # a refit on day 3
    (tmp_path / "model.bin").write_bytes(b"fitted")
    with duckdb.connect() as con:
        ensure_state_table(con)
        con.execute("CREATE SCHEMA analytics; CREATE SCHEMA ml")
        for asset, (table, built) in builds.items():
            for day in built:
                con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT range AS id, $day AS built FROM range(100)",
                            {"day": day})
                write_state(con, asset, dt.date.fromisoformat(day), f"fp-{day}", 100)
                write_query(lakehouse, con, table, day, f"SELECT * FROM {table}", {}, f"fp-{day}")
                kept = []
                if asset == "customer_segments":
                    lakehouse.write_day("ops.dead_letter", day, pa.table({"stage": [asset], "item_key": [day]}),
                                        f"fp-{day}", keys={"stage": asset})
                    kept = [model_files[day]]
                    if not lakehouse.has_file(f"{asset}/{kept[0]}"):
                        lakehouse.put_file(f"{asset}/{kept[0]}", tmp_path / "model.bin")
                publish_state(lakehouse, con, asset, day, table_layouts(con, [table]), f"fp-{day}:v1", kept)
        # a build that died before its state row, on a day before them all
        con.execute("CREATE OR REPLACE TABLE ml.customer_segments AS SELECT 1 AS id, 'orphan' AS built")
        write_query(lakehouse, con, "ml.customer_segments", "2011-08-31", "SELECT * FROM ml.customer_segments", {},
                    "dead-build")
    read_by_runs = {day: latest_states(lakehouse, day, builds) for day in days[2:]}

    report = prune_builds(lakehouse, keep_days=2)

    assert report.horizon == "2011-09-04"
    assert report.removed == {"stg_purchases": days[:2], "customer_segments": days[:2]}
    assert report.orphans == ["ml.customer_segments 2011-08-31"]
    assert {day: latest_states(lakehouse, day, builds) for day in days[2:]} == read_by_runs
    assert latest_states(lakehouse, days[1], builds) == {}

    def stored_days(table: str) -> list[str]:
        return sorted(set(lakehouse.read_through(table, FAR_FUTURE).read_all()[PARTITION_COLUMN].to_pylist()))

    assert stored_days("analytics.stg_purchases") == days[2:]
    assert stored_days("ml.customer_segments") == stored_days("ops.dead_letter") == ["2011-09-03", "2011-09-05"]
    assert report.kept_files_deleted == 1
    assert not lakehouse.has_file("customer_segments/models/a.bin") and lakehouse.has_file("customer_segments/models/b.bin")
    for table in ("analytics.stg_purchases", "ml.customer_segments", "ops.dead_letter", "ops.asset_state"):
        assert files_left_behind(lakehouse, table) == set(), table
    assert report.data_files_deleted > 0
    # the markers went with the rows: the same build of day 2 is written again, not skipped
    with duckdb.connect() as con:
        con.execute("CREATE SCHEMA analytics")
        con.execute("CREATE TABLE analytics.stg_purchases AS SELECT range AS id, '2011-09-02' AS built FROM range(100)")
        again = write_query(lakehouse, con, "analytics.stg_purchases", days[1], "SELECT * FROM analytics.stg_purchases",
                            {}, f"fp-{days[1]}")
    assert not again.skipped and again.rows == 100
    assert prune_builds(lakehouse, keep_days=2).removed == {}  # nothing more to remove


def test_pruning_keeps_the_served_days_for_their_own_retention(tmp_path):
    """outputs.recommendations is what consumers read per day, written by the lake's builds or by
    the warehouse backend's published_recommendations (days 1-4 here; a lake trial built days 1,
    3 and 5, and days 1 and 3 were published again after it). Pruning builds to 2 days removes
    the lake's build of day 1 and keeps every served day; a served retention of 2 days then
    removes days 1-2 and keeps day 3, which a kept build names."""
    import datetime as dt

    import duckdb

    from assets.common.current_state import ensure_state_table, write_state
    from assets.common.lakehouse_retention import prune_builds
    from assets.common.lakehouse_stages import latest_states, publish_state, table_layouts
    from assets.outputs.publish import PUBLISHED_MARKER_PREFIX
    from assets.ingest.lakehouse_landing import write_query

    lakehouse = Lakehouse(catalog_uri=f"sqlite:///{tmp_path}/catalog.db", location=str(tmp_path / "lake"),
                          history_grace_minutes=0)
    days = [f"2011-09-0{n}" for n in range(1, 6)]
    stage, table = "validated_recommendations", PUBLISHED_TABLE
    with duckdb.connect() as con:
        ensure_state_table(con)
        con.execute("CREATE SCHEMA outputs")
        for day in days:
            con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT range AS id, $day AS built FROM range(10)",
                        {"day": day})
            if day in days[::2]:  # the lake's trial builds
                write_state(con, stage, dt.date.fromisoformat(day), f"fp-{day}", 10)
                write_query(lakehouse, con, table, day, f"SELECT * FROM {table}", {}, f"fp-{day}:v1")
                publish_state(lakehouse, con, stage, day, table_layouts(con, [table]), f"fp-{day}:v1")
            if day != days[4]:  # the warehouse backend's publication of days 1-4
                write_query(lakehouse, con, table, day, f"SELECT * FROM {table}", {},
                            f"{PUBLISHED_MARKER_PREFIX}1:fp-{day}")

    report = prune_builds(lakehouse, keep_days=2)

    assert report.removed == {stage: [days[0]]} and report.orphans == []
    assert latest_states(lakehouse, days[0], {stage: (table, days)}) == {}  # the lake's day-1 build went
    assert report.served_days_kept == [days[0]] and report.served_days_removed == []
    assert lakehouse.partition_days(table) == days
    assert all(lakehouse.read_day(table, day).num_rows == 10 for day in days)
    assert [lakehouse.day_fingerprint(table, day).startswith(PUBLISHED_MARKER_PREFIX) for day in days] == [
        True] * 4 + [False]

    served = prune_builds(lakehouse, keep_days=2, keep_served_days=2)
    assert served.removed == {} and served.served_days_removed == days[:2]
    assert lakehouse.partition_days(table) == days[2:]
    assert files_left_behind(lakehouse, table) == set()


def test_pruning_drops_the_cached_vectors_no_item_map_names_once_old_enough(tmp_path):
    """The lake's model cache is each build's additions, a (day, stage) share: vectors no item map
    names go once cached over `cache_keep_days` ago (the shares rewritten without them, an empty
    share dropped); a vector still named, or cached lately, stays, and the cache reads as before."""
    import duckdb

    from assets.common.lakehouse_retention import prune_builds
    from assets.common.lakehouse_stages import CACHE_TABLE, FAR_FUTURE, ITEMS_TABLE, WRITER_COLUMN, hydrate_cache
    from assets.ingest.lakehouse_landing import write_query
    from resources.model_clients import store

    lakehouse = Lakehouse(catalog_uri=f"sqlite:///{tmp_path}/catalog.db", location=str(tmp_path / "lake"),
                          history_grace_minutes=0)
    stage, model = "product_embeddings", "local:test"
    shares = {("2011-08-31", "gone"), ("2011-09-01", "named"), ("2011-09-01", "left"), ("2011-09-01", "changed"),
              ("2011-09-02", "named too"), ("2011-09-02", "lately")}  # (day, text) a build cached
    with duckdb.connect() as con:
        store.ensure_tables_on(con)
        for day in sorted({day for day, _ in shares}):
            con.execute("DELETE FROM ops.embedding_cache")
            for _, text in sorted(t for t in shares if t[0] == day):
                age = "0 DAY" if text == "lately" else "40 DAY"
                con.execute(f"INSERT INTO ops.embedding_cache VALUES (?, 3, ?, [1, 2, 3], now()::TIMESTAMP - INTERVAL {age})",
                            [model, text])
            write_query(lakehouse, con, CACHE_TABLE, day, f"SELECT c.*, $stage AS {WRITER_COLUMN} FROM ops.embedding_cache c",
                        {"stage": stage}, f"build-{day}", {WRITER_COLUMN: stage})
        # the item map of the kept build: two of them are still the catalog's
        con.execute("INSERT INTO ops.embedding_items SELECT ?, '2011-09-02', text_hash, ?, 3, text_hash, false, now() "
                    "FROM (VALUES ('named'), ('named too')) AS t(text_hash)", [stage, model])
        write_query(lakehouse, con, ITEMS_TABLE, "2011-09-02", "SELECT * FROM ops.embedding_items WHERE stage = $stage",
                    {"stage": stage}, "build-2011-09-02", {"stage": stage})

    def cached() -> set[str]:
        return set(lakehouse.read_through(CACHE_TABLE, FAR_FUTURE).read_all()["text_hash"].to_pylist())

    assert prune_builds(lakehouse, keep_days=2).cached_vectors_pruned == 0  # cache_keep_days 0: for ever
    assert cached() == {text for _, text in shares}

    report = prune_builds(lakehouse, keep_days=2, cache_keep_days=30)
    assert report.cached_vectors_pruned == 3
    assert cached() == {"named", "named too", "lately"}
    assert lakehouse.partition_days(CACHE_TABLE) == ["2011-09-01", "2011-09-02"]  # the emptied share went
    assert files_left_behind(lakehouse, CACHE_TABLE) == set()
    with duckdb.connect() as con:  # a build reads the rewritten shares as it read the others
        hydrate_cache(con, lakehouse, stage, "2011-09-03")
        assert fetch_all(con, "SELECT text_hash, vector FROM ops.embedding_cache ORDER BY 1") == [
            ("lately", [1.0, 2.0, 3.0]), ("named", [1.0, 2.0, 3.0]), ("named too", [1.0, 2.0, 3.0])]
    from assets.common.lakehouse_retention import prune_lakehouse_builds

    again = prune_lakehouse_builds.execute_in_process(resources={"lakehouse": lakehouse})  # the daily job, defaults
    [output] = [e for e in again.all_events if e.event_type_value == "STEP_OUTPUT"]
    measured = {key: value.value for key, value in output.event_specific_data.metadata.items()}
    assert measured["cache_keep_days"] == 30 and measured["cached_vectors_pruned"] == 0
