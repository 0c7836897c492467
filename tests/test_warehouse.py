import multiprocessing as mp

import pytest

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
