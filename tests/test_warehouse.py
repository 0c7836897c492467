import multiprocessing as mp

import pytest

from resources.memory import process_rss
from resources.warehouse import DuckDBWarehouse, fetch_all, fetch_scalar


def _append(path: str, worker: int) -> None:
    wh = DuckDBWarehouse(path=path, memory_limit="256MB")
    for i in range(5):
        with wh.transaction() as con:
            con.execute("CREATE TABLE IF NOT EXISTS t (worker INT, i INT)")
            con.execute("INSERT INTO t VALUES (?, ?)", [worker, i])


def test_processes_take_turns_instead_of_failing_on_the_lock(tmp_path):
    path = str(tmp_path / "w.duckdb")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append, args=(path, w)) for w in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 6
    with DuckDBWarehouse(path=path).connect(read_only=True) as con:
        assert fetch_scalar(con, "SELECT count(*) FROM t") == 30


def test_transaction_rolls_back_on_error(warehouse):
    with warehouse.transaction() as con:
        con.execute("CREATE TABLE t AS SELECT 1 AS x")
    with pytest.raises(ZeroDivisionError):
        with warehouse.transaction() as con:
            con.execute("DELETE FROM t")
            1 / 0
    with warehouse.connect(read_only=True) as con:
        assert fetch_all(con, "SELECT x FROM t") == [(1,)]


def test_nested_connection_is_refused(warehouse):
    with warehouse.connect():
        with pytest.raises(RuntimeError, match="already open"):
            with warehouse.connect():
                pass


def test_readers_in_two_threads_at_once_share_one_configuration(warehouse, monkeypatch):
    # The memory_limit follows the process's RSS, and DuckDB refuses a second connection with
    # another configuration ("Can't open a connection to same database file with a different
    # configuration"): a reader that opened while another thread read failed (seen in CI).
    import threading
    import time

    with warehouse.transaction() as con:
        con.execute("CREATE TABLE t AS SELECT 1 AS x")
    limits = iter(["300MiB", "310MiB", "320MiB"])
    monkeypatch.setattr(DuckDBWarehouse, "connection_memory_limit", lambda self: next(limits))
    errors, seen = [], []

    def read(hold_s: float) -> None:
        try:
            with warehouse.connect(read_only=True) as con:
                time.sleep(hold_s)
                seen.append(fetch_scalar(con, "SELECT current_setting('memory_limit')"))
        except Exception as error:  # noqa: BLE001 - the assertion below shows it
            errors.append(error)

    first = threading.Thread(target=read, args=(0.6,))
    first.start()
    time.sleep(0.2)
    read(0.0)
    first.join()
    assert errors == [] and len(seen) == 2 and seen[0] == seen[1]
    with warehouse.connect(read_only=True) as con:  # alone again: its own configuration
        assert fetch_scalar(con, "SELECT current_setting('memory_limit')") != seen[0]


def test_a_snapshot_keeps_order_holds_no_lock_while_used_and_is_deleted_after(warehouse):
    import duckdb

    from resources.warehouse import snapshot

    with warehouse.transaction() as con:
        con.execute("CREATE SCHEMA analytics")
        con.execute("CREATE TABLE analytics.t AS SELECT (9999 - i) AS x FROM range(10000) r(i)")  # stored descending
    with snapshot(warehouse, {"t": ("SELECT x FROM analytics.t WHERE x >= $low", {"low": 10})},
                  optional={"missing": "SELECT * FROM ml.not_built_yet"}) as taken:
        with warehouse.model_copy(update={"lock_timeout_seconds": 1.0}).transaction() as con:
            con.execute("INSERT INTO analytics.t VALUES (-1)")  # a writer goes on while the snapshot is used
        values = [v for batch in taken.batches("t", 1000) for v in batch.column("x").to_pylist()]
        assert values == list(range(9999, 9, -1)) and not taken.has("missing")
        folder = taken.folder
    assert not folder.exists()
    with pytest.raises(duckdb.CatalogException):
        with snapshot(warehouse, {"missing": "SELECT * FROM ml.not_built_yet"}):
            pass


def test_exact_quantiles_equal_duckdb_quantile_cont_without_holding_every_value():
    import duckdb

    from resources.warehouse import exact_quantiles

    con = duckdb.connect()
    con.execute("CREATE TABLE steps AS SELECT (i % 97) / 7.0 AS x FROM range(100001) r(i)")  # few distinct values
    con.execute("INSERT INTO steps VALUES (NULL), (NULL)")
    con.execute("CREATE TABLE spread AS SELECT hash(i) / 1e19 AS x FROM range(1001) r(i)")  # every value distinct
    con.execute("CREATE TABLE empty (x DOUBLE)")
    quantiles = [0.0, 0.1, 0.25, 0.5, 0.9, 0.999, 1.0]
    for table in ("steps", "spread", "empty"):
        expected = [fetch_scalar(con, f"SELECT quantile_cont(x, {q}) FROM {table}") for q in quantiles]
        assert exact_quantiles(con, table, "x", quantiles) == expected, table
    # quantile_cont keeps every value and cannot spill; the counted form fits in a small limit
    con.execute("SET memory_limit = '64MiB'")
    con.execute("CREATE TABLE many AS SELECT (i % 5000) / 5000.0 AS x FROM range(30000000) r(i)")
    with pytest.raises(duckdb.OutOfMemoryException):
        fetch_scalar(con, "SELECT quantile_cont(x, 0.5) FROM many")
    assert exact_quantiles(con, "many", "x", [0.5]) == [pytest.approx(0.49990, abs=1e-4)]


def test_a_step_memory_budget_gives_duckdb_what_the_process_leaves(tmp_path, monkeypatch):
    import numpy as np

    from resources import build_resources
    from resources.memory import budgeted_memory_limit, parse_size, process_rss, release_memory

    assert parse_size("1GB") == 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size("1.5GiB") == 3 * 2**29
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")
    assert budgeted_memory_limit("1GB", None, "256MiB") == "1GB"  # no budget: the cap
    before = parse_size(budgeted_memory_limit("8GB", "4GiB", "64MiB"))
    held = np.ones(300 * 2**20, dtype=np.uint8)  # 300 MiB, touched: resident
    after = parse_size(budgeted_memory_limit("8GB", "4GiB", "64MiB"))
    assert 250 * 2**20 < before - after < 350 * 2**20
    del held
    assert budgeted_memory_limit("8GB", "1MiB", "64MiB") == "64MiB"  # never below the floor
    assert parse_size(budgeted_memory_limit("100MB", "64GiB", "64MiB")) <= 100 * 10**6  # never above the cap
    # a budget 1 GiB above what this process holds (a test process may hold more than 1 GiB),
    # measured after what it freed went back (connect gives it back too)
    release_memory()
    budget = f"{(process_rss() + 2**30) // 2**20}MiB"
    wh = DuckDBWarehouse(path=str(tmp_path / "w.duckdb"), memory_limit="8GB", step_memory_budget=budget)
    with wh.connect() as con:
        limit = fetch_scalar(con, "SELECT current_setting('memory_limit')")
    assert limit.endswith("MiB") and abs(float(limit.split()[0]) - (1024 - 256)) < 64  # less the 256 MiB reserve
    monkeypatch.delenv("STEP_MEMORY_BUDGET", raising=False)
    assert build_resources()["warehouse"].step_memory_budget == "1GiB"  # the default
    monkeypatch.setenv("STEP_MEMORY_BUDGET", "none")
    assert build_resources()["warehouse"].step_memory_budget is None
    monkeypatch.setenv("STEP_MEMORY_BUDGET", "2GiB")
    assert build_resources()["warehouse"].step_memory_budget == "2GiB"


def test_parquet_batches_stream_every_row_group_in_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from resources.warehouse import parquet_batches

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"x": list(range(10_000))}), path, row_group_size=3_000)
    batches = list(parquet_batches(path, 1_000))
    assert pq.ParquetFile(path).num_row_groups == 4 and all(b.num_rows <= 1_000 for b in batches)
    assert [v for b in batches for v in b.column("x").to_pylist()] == list(range(10_000))


def test_an_open_connection_is_budgeted_again_from_what_the_process_holds_now(tmp_path):
    import duckdb
    import numpy as np

    from resources.memory import parse_size, release_memory
    from resources.warehouse import rebudget

    release_memory()
    budget = f"{(process_rss() + 2**30) // 2**20}MiB"  # 1 GiB above what this process holds now
    wh = DuckDBWarehouse(path=str(tmp_path / "w.duckdb"), memory_limit="8GB", step_memory_budget=budget)
    with wh.connect() as con:
        at_connect = parse_size(fetch_scalar(con, "SELECT current_setting('memory_limit')").replace(" ", ""))
        held = np.ones(300 * 2**20, dtype=np.uint8)  # the step's Python side grows by 300 MiB
        limit = rebudget(con)
        now = parse_size(fetch_scalar(con, "SELECT current_setting('memory_limit')").replace(" ", ""))
        del held
    assert parse_size(limit) == now and 250 * 2**20 < at_connect - now < 350 * 2**20
    with duckdb.connect() as scratch:  # a connection no warehouse opened is left alone
        assert rebudget(scratch) is None


def test_exact_quantiles_over_a_table_counted_by_value_equal_those_over_its_rows():
    import duckdb

    from resources.warehouse import exact_quantiles

    con = duckdb.connect()
    con.execute("CREATE TABLE rows AS SELECT CASE WHEN i % 101 = 0 THEN NULL ELSE (i * i % 89) / 13.0 END AS x "
                "FROM range(50000) r(i)")
    con.execute("CREATE TABLE counted AS SELECT x, count(*) AS n FROM rows GROUP BY x")
    quantiles = [0.0, 0.1, 0.5, 0.9, 0.999, 1.0]
    assert exact_quantiles(con, "counted", "x", quantiles, weight="n") == exact_quantiles(con, "rows", "x", quantiles)
