"""The dbt-style SQL models: dependencies from the SQL itself, partition day as a parameter,
rebuilt only when inputs change, Online Retail quirks handled as documented."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import dagster as dg
import pytest

from assets.transform.sql_models import SqlModel, build_sql_assets, load_models, upstream_assets
from resources.compute_engine import ComputeEngine
from resources.warehouse import fetch_all, fetch_scalar

DAY = "2011-01-10"


def seed_raw_tables(warehouse, transactions, purchases=(), products=()):
    """Raw tables as ingestion lands them, with one batch fingerprint per source and day."""
    with warehouse.transaction() as con:
        con.execute("CREATE SCHEMA IF NOT EXISTS raw; CREATE SCHEMA IF NOT EXISTS ops")
        con.execute(
            """CREATE TABLE raw.transactions (partition_date DATE, line_no BIGINT, invoice_no VARCHAR,
               stock_code VARCHAR, description VARCHAR, quantity INTEGER, invoice_date TIMESTAMP,
               unit_price DOUBLE, customer_id VARCHAR, country VARCHAR)"""
        )
        con.execute(
            """CREATE TABLE raw.customer_purchases (partition_date DATE, line_no BIGINT, item_no INTEGER,
               customer_id VARCHAR, product_id VARCHAR, amount DOUBLE, purchased_at TIMESTAMP)"""
        )
        con.execute(
            """CREATE TABLE raw.products (partition_date DATE, line_no BIGINT, product_id VARCHAR, name VARCHAR,
               description VARCHAR, category VARCHAR, price DOUBLE, in_stock BOOLEAN)"""
        )
        con.execute("CREATE TABLE ops.batch_fingerprints (source VARCHAR, partition_date DATE, fingerprint VARCHAR)")
        if transactions:
            con.executemany("INSERT INTO raw.transactions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", list(transactions))
        if purchases:
            con.executemany("INSERT INTO raw.customer_purchases VALUES (?, ?, ?, ?, ?, ?, ?)", list(purchases))
        if products:
            con.executemany("INSERT INTO raw.products VALUES (?, ?, ?, ?, ?, ?, ?, ?)", list(products))
        for source in ("transactions", "customers", "products"):
            con.execute("INSERT INTO ops.batch_fingerprints VALUES (?, ?, 'v1')", [source, DAY])


def line(no, invoice, code, qty, price, customer, when="2011-01-10 10:00:00", desc="RED MUG"):
    return (DAY, no, invoice, code, desc, qty, when, price, customer, "United Kingdom")


QUIRKY_LINES = [
    line(1, "536365", "85123A", 6, 2.55, "17850"),  # kept
    line(2, "536366", "85123a ", 2, 2.55, "17850"),  # code case and whitespace normalized
    line(3, "536367", "22633", 4, 1.85, None),  # no customer
    line(4, "536368", "POST", 1, 18.0, "17850"),  # postage, not a product
    line(5, "536369", "22750", 10, 0.0, "13047"),  # free item
    line(6, "536370", "23166", 74215, 1.04, "12346", when="2011-01-10 10:01:00"),  # huge order...
    line(7, "C536371", "23166", -74215, 1.04, "12346", when="2011-01-10 10:05:00"),  # ...reversed
    line(8, "536372", "22960", 3, 4.25, "13047"),  # kept
    line(9, "C536373", "22960", -1, 4.25, "13047"),  # a partial return: the order stays
    line(10, "A563185", "B", 1, -11062.06, None),  # bad-debt adjustment
]


def materialize_models(warehouse, day=DAY, force=False):
    assets = build_sql_assets()
    config = {"ops": {a.key.to_user_string(): {"config": {"force": force}} for a in assets}} if force else None
    return dg.materialize(assets, partition_key=day, resources={"warehouse": warehouse, "compute_engine": ComputeEngine()},
                          run_config=config)


def test_dependencies_come_from_the_sql():
    models = {m.name: m for m in load_models()}
    names = set(models)
    assert upstream_assets(models["stg_customer_history"], names) == ["raw_customers"]
    assert upstream_assets(models["stg_purchases"], names) == ["stg_customer_history", "stg_order_lines"]
    assert upstream_assets(models["customer_features"], names) == ["dim_products", "stg_purchases"]
    assert upstream_assets(models["stg_order_lines"], names) == ["raw_transactions"]


def test_the_purchase_readers_sort_in_the_order_a_full_build_stores():
    from assets.infer.purchases import PURCHASES_ORDER

    models = {m.name: m for m in load_models()}
    assert models["stg_purchases"].order_by == PURCHASES_ORDER
    assert models["customer_features"].order_by == ""


def test_a_table_that_no_asset_writes_is_an_error():
    model = SqlModel("bad", "WITH x AS (SELECT 1) SELECT * FROM x JOIN somewhere.else_table USING (a)")
    with pytest.raises(ValueError, match="somewhere.else_table"):
        upstream_assets(model, set())


def test_online_retail_quirks_are_handled_as_documented(warehouse):
    seed_raw_tables(warehouse, QUIRKY_LINES)
    assert materialize_models(warehouse).success
    with warehouse.connect(read_only=True) as con:
        kept = fetch_all(con, "SELECT customer_id, product_id, quantity FROM analytics.stg_order_lines ORDER BY ALL")
        products = fetch_all(con, "SELECT product_id, price, in_stock, source FROM analytics.dim_products ORDER BY 1")
        features = fetch_all(
            con, "SELECT customer_id, recency_days, frequency, monetary FROM analytics.customer_features ORDER BY 1"
        )
    assert kept == [("13047", "22960", 3), ("17850", "85123A", 2), ("17850", "85123A", 6)]
    assert [p[0] for p in products] == ["22960", "85123A"]
    assert all(p[2] and p[3] == "order_lines" for p in products)
    assert features == [("13047", 0, 1, pytest.approx(12.75)), ("17850", 0, 1, pytest.approx(20.4))]


def test_unchanged_inputs_skip_and_changed_inputs_rebuild(warehouse):
    seed_raw_tables(warehouse, QUIRKY_LINES)
    first = materialize_models(warehouse)
    for event in first.get_asset_materialization_events():  # the catalog's table name and columns, as built
        metadata = event.materialization.metadata
        assert metadata["dagster/table_name"].value == f"analytics.{event.asset_key.path[-1]}"
        assert "customer_id" in {c.name for c in metadata["dagster/column_schema"].schema.columns} or \
            event.asset_key.path[-1] == "dim_products"
    second = materialize_models(warehouse)
    skipped = [e.materialization.metadata["skipped"].value for e in second.get_asset_materialization_events()]
    assert first.success and second.success and all(skipped) and len(skipped) == 5
    with warehouse.transaction() as con:
        con.execute("UPDATE ops.batch_fingerprints SET fingerprint = 'v2' WHERE source = 'transactions'")
    third = materialize_models(warehouse)
    rebuilt = {e.asset_key.path[-1]: e.materialization.metadata["skipped"].value for e in third.get_asset_materialization_events()}
    # the customers' history did not change: only what reads the order lines is rebuilt
    assert rebuilt == {"stg_customer_history": True, "stg_order_lines": False, "stg_purchases": False,
                       "dim_products": False, "customer_features": False}


def test_an_older_day_does_not_overwrite_a_newer_state_unless_forced(warehouse):
    seed_raw_tables(warehouse, QUIRKY_LINES)
    materialize_models(warehouse)
    older = materialize_models(warehouse, day="2011-01-09")
    assert older.success
    assert all(e.materialization.metadata["skipped"].value for e in older.get_asset_materialization_events())
    with warehouse.connect(read_only=True) as con:
        assert fetch_all(con, "SELECT DISTINCT as_of FROM ops.asset_state") == [(dt.date(2011, 1, 10),)]
    forced = materialize_models(warehouse, day="2011-01-09", force=True)
    assert forced.success
    with warehouse.connect(read_only=True) as con:
        assert fetch_all(con, "SELECT DISTINCT as_of FROM ops.asset_state") == [(dt.date(2011, 1, 9),)]


def test_catalog_rows_win_over_order_lines_and_history_repeats_count_once(warehouse):
    purchases = [
        (DAY, 1, 0, "c-1", "P1", 10.0, "2011-01-01 00:00:00"),
        ("2011-01-09", 1, 0, "c-1", "P1", 10.0, "2011-01-01 00:00:00"),  # the same history sent again
        (DAY, 1, 1, "c-1", "P2", 5.0, "2011-01-05 00:00:00"),
    ]
    products = [
        ("2011-01-09", 1, "P1", "Mug", "A red mug", "kitchen", 9.0, True),
        (DAY, 1, "P1", "Mug", "A red mug", "kitchen", 10.0, False),
        (DAY, 2, "P2", "Lamp", "A desk lamp", "home", 5.0, True),
    ]
    seed_raw_tables(warehouse, [], purchases, products)
    assert materialize_models(warehouse).success
    with warehouse.connect(read_only=True) as con:
        assert fetch_scalar(con, "SELECT count(*) FROM analytics.stg_purchases") == 2
        assert fetch_all(con, "SELECT price, in_stock FROM analytics.dim_products WHERE product_id = 'P1'") == [(10.0, False)]
        mix = fetch_all(con, "SELECT top_category, category_mix FROM analytics.customer_features")
    assert mix[0][0] == "kitchen" and mix[0][1] == {"kitchen": pytest.approx(0.6667), "home": pytest.approx(0.3333)}


def test_the_dbt_style_tests_next_to_the_sql_are_blocking_checks(warehouse, tmp_path):
    """sql/schema.yml: a model that breaks a declared test is red, with the count of rows that
    break it, and what builds on it does not run."""
    import shutil

    models = tmp_path / "sql"
    shutil.copytree(Path(__file__).resolve().parents[1] / "sql", models)
    (models / "schema.yml").write_text(
        "models:\n  stg_order_lines:\n    not_null: [customer_id]\n    unique: [product_id]\n"
        "    accepted_values: {description: [RED MUG]}\n")
    seed_raw_tables(warehouse, QUIRKY_LINES)
    assets = {a.key.to_user_string(): a for a in build_sql_assets(models)}
    result = dg.materialize([assets["stg_order_lines"], assets["dim_products"]], partition_key=DAY,
                            resources={"warehouse": warehouse, "compute_engine": ComputeEngine()}, raise_on_error=False)
    assert not result.success
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["not_null__customer_id"].passed and checks["accepted_values__description"].passed
    unique = checks["unique__product_id"]  # 85123A twice: once as '85123a ' before normalization
    assert not unique.passed and unique.metadata["violations"].value >= 1 and "rows break" in unique.description
    assert "dim_products" not in {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}


def test_a_model_listed_to_run_first_gets_the_step_priority_and_an_unknown_one_is_refused(tmp_path):
    import shutil

    models = tmp_path / "sql"
    shutil.copytree(Path(__file__).resolve().parents[1] / "sql", models)
    (models / "schema.yml").write_text("run_first: [stg_order_lines]\n")
    priorities = {a.key.to_user_string(): a.op.tags.get("dagster/priority") for a in build_sql_assets(models)}
    assert priorities.pop("stg_order_lines") == "1" and set(priorities.values()) == {None}
    (models / "schema.yml").write_text("run_first: [dim_product]\n")
    with pytest.raises(ValueError, match="dim_product"):
        build_sql_assets(models)


def test_an_incremental_update_reads_only_the_changed_keys_rows_and_gives_their_full_rows():
    """By the incremental contract a key's rows depend only on its own input rows: the update
    runs the model's SQL over the changed keys' input rows (every reference of a keyed input is
    restricted, lookups stay whole) and gets exactly the rows a full run gives them."""
    import duckdb

    from assets.transform.incremental import Incremental, Lookup, restricted_to_changed_keys

    model = {m.name: m for m in load_models()}["customer_features"]
    spec = Incremental("customer_features", "customer_id", (Lookup("analytics.dim_products", "product_id", ("category",)),),
                       ("recency_days",), keyed_inputs=("analytics.stg_purchases",))
    restricted = restricted_to_changed_keys(model.sql, spec)
    assert restricted.count("analytics.stg_purchases WHERE customer_id::VARCHAR IN (SELECT key FROM changed_keys)") == 3
    assert model.sql.count("analytics.stg_purchases") == 3
    assert "analytics.dim_products AS d" in restricted  # a lookup is read whole

    con = duckdb.connect()
    con.execute("CREATE SCHEMA analytics")
    con.execute("""CREATE TABLE analytics.stg_purchases AS
                   SELECT 'c' || (i % 50) AS customer_id, 'p' || (i % 7) AS product_id, 1.0 + i % 13 AS amount,
                          TIMESTAMP '2011-01-01' + INTERVAL (i % 40) DAY AS purchased_at, 'customers' AS source
                   FROM range(2000) AS t(i)""")
    con.execute("CREATE TABLE analytics.dim_products AS SELECT 'p' || i AS product_id, 'cat' || (i % 3) AS category FROM range(7) AS t(i)")
    con.execute("CREATE TEMP TABLE changed_keys AS SELECT 'c' || i AS key FROM range(0, 50, 7) AS t(i)")
    params = {"as_of": dt.date(2011, 3, 1)}
    full = con.execute(f"SELECT * FROM ({model.sql}) WHERE customer_id IN (SELECT key FROM changed_keys) ORDER BY ALL",
                       params).fetchall()
    assert len(full) == 8
    assert con.execute(f"SELECT * FROM ({restricted}) ORDER BY ALL", params).fetchall() == full
    # a reference it cannot place (quoted): none (the caller filters the whole model's output)
    quoted = model.sql.replace("analytics.stg_purchases AS p", '"analytics"."stg_purchases" AS p')
    assert restricted_to_changed_keys(quoted, spec) is None


def test_a_relationships_test_counts_orphans_even_when_the_other_model_has_a_null():
    """dbt's relationships: every non-null value is among the other model's values. A NULL on
    the other side must not hide the orphans (NOT IN with a NULL is never true)."""
    import duckdb

    from assets.transform.model_tests import ModelTest

    con = duckdb.connect()
    con.execute("CREATE SCHEMA analytics")
    con.execute("CREATE TABLE analytics.parent AS SELECT * FROM (VALUES ('a'), ('b'), (NULL)) AS t(customer_id)")
    con.execute("CREATE TABLE analytics.child AS SELECT * FROM (VALUES ('a'), ('a'), ('x'), ('y'), (NULL)) AS t(customer_id)")
    test = ModelTest("relationships", "customer_id", "parent.customer_id")
    sql, params = test.violations_sql("analytics.child", "analytics")
    assert con.execute(sql, params).fetchone()[0] == 2  # 'x' and 'y'; the child's NULL is not_null's business


def test_an_upstream_incremental_model_s_kept_fingerprints_stand_for_its_rows():
    """stg_purchases reads stg_customer_history by the same key: the fingerprints the upstream
    stored with its table (and the code version that table was built by) stand for its rows,
    so a key changes exactly when the upstream's inputs for it or its SQL changed."""
    import duckdb

    from assets.transform.incremental import KEYS_TABLE, Incremental, Lookup, fingerprint_now, kept_upstream

    con = duckdb.connect()
    con.execute("CREATE SCHEMA ops; CREATE SCHEMA analytics")
    con.execute(f"CREATE TABLE {KEYS_TABLE} (model VARCHAR, input VARCHAR, key VARCHAR, fingerprint HUGEINT)")
    con.execute(f"INSERT INTO {KEYS_TABLE} VALUES ('up', 'raw.a', 'c1', 10), ('up', 'raw.b', 'c1', 5), ('up', 'raw.a', 'c2', 20)")
    con.execute("CREATE TABLE analytics.up AS SELECT 'c1' AS customer_id UNION ALL SELECT 'c2'")
    up = Incremental("up", "customer_id")
    spec = Incremental("down", "customer_id").bind(con, ("analytics.up",))

    def keys(code: str) -> dict[str, int]:
        fingerprint_now(con, spec, None, kept_upstream(con, spec, {"analytics.up": up}, {"up": code}))
        return dict(con.execute("SELECT key, fingerprint FROM keys_now").fetchall())

    before = keys("v1")
    assert set(before) == {"c1", "c2"} and keys("v1") == before
    con.execute(f"UPDATE {KEYS_TABLE} SET fingerprint = 11 WHERE key = 'c1' AND input = 'raw.a'")
    after = keys("v1")
    assert after["c1"] != before["c1"] and after["c2"] == before["c2"]
    assert all(keys("v2")[k] != after[k] for k in after)  # the upstream's SQL changed: every key
    # not kept: no recorded code, another key, or rows that depend on more than the keyed inputs
    for model, built_with in ((up, {}), (Incremental("up", "product_id"), {"up": "v1"}),
                              (Incremental("up", "customer_id", refresh=("recency_days",)), {"up": "v1"}),
                              (Incremental("up", "customer_id", (Lookup("analytics.p", "product_id", ("c",)),)), {"up": "v1"})):
        assert kept_upstream(con, spec, {"analytics.up": model}, built_with) == {}


def test_a_full_build_in_key_ranges_gives_the_rows_of_one_statement():
    """customer_features' full build runs range by range of customers (sql/schema.yml): the
    rows are those of the whole query (purchases without a customer id are read by the first
    range); a model whose order does not start with the key, or a reference that cannot be
    placed, is built whole."""
    import duckdb

    from assets.transform.incremental import Incremental, Lookup, build_in_key_ranges, load_incremental

    model = {m.name: m for m in load_models()}["customer_features"]
    assert load_incremental(Path(__file__).resolve().parents[1] / "sql")["customer_features"].full_build_rows_per_range
    spec = Incremental("customer_features", "customer_id", (Lookup("analytics.dim_products", "product_id", ("category",)),),
                       ("recency_days",), keyed_inputs=("analytics.stg_purchases",), full_build_rows_per_range=300)
    con = duckdb.connect()
    con.execute("CREATE SCHEMA analytics")
    con.execute("""CREATE TABLE analytics.stg_purchases AS
                   SELECT CASE WHEN i % 97 = 0 THEN NULL ELSE 'c' || (i % 50) END AS customer_id, 'p' || (i % 7) AS product_id,
                          1.0 + i % 13 AS amount, TIMESTAMP '2011-01-01' + INTERVAL (i % 40) DAY AS purchased_at
                   FROM range(2000) AS t(i) ORDER BY customer_id""")
    con.execute("CREATE TABLE analytics.dim_products AS SELECT 'p' || i AS product_id, 'cat' || (i % 3) AS category FROM range(7) AS t(i)")
    params = {"as_of": dt.date(2011, 3, 1)}
    whole = con.execute(f"SELECT * FROM ({model.sql}) ORDER BY ALL", params).fetchall()
    assert build_in_key_ranges(con, spec, "ranged", model.sql, params) == 7
    assert con.execute("SELECT * FROM ranged ORDER BY ALL").fetchall() == whole and len(whole) == 50
    assert build_in_key_ranges(con, spec, "other", model.sql, params, keeps_order=False) == 0
    models = {m.name: m for m in load_models()}
    assert models["stg_purchases"].sorted_first_by("customer_id") and model.sorted_first_by("customer_id")
    assert not models["stg_purchases"].sorted_first_by("purchased_at")
    descending = SqlModel("descending", models["stg_purchases"].sql.replace("ORDER BY customer_id,", "ORDER BY customer_id DESC,"))
    assert not descending.sorted_first_by("customer_id")
    by_expression = SqlModel("by_expression", models["stg_purchases"].sql.replace("ORDER BY customer_id,", "ORDER BY lower(customer_id),"))
    assert not by_expression.sorted_first_by("customer_id")
    quoted = model.sql.replace("analytics.stg_purchases AS p", '"analytics"."stg_purchases" AS p')
    assert build_in_key_ranges(con, spec, "other", quoted, params) == 0
