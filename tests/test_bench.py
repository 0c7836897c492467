"""The scale benchmark at a small scale, so it cannot rot (its figures are not asserted as timings)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def daily_pipeline_nodes():
    import definitions

    return definitions.defs.resolve_job_def("daily_pipeline").graph.node_defs


@pytest.mark.slow
def test_the_benchmark_runs_every_stage_and_a_rerun_makes_no_model_call(tmp_path):
    figures = tmp_path / "figures.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run_pipeline", "--customers", "3000", "--quick",
         "--workdir", str(tmp_path / "bench"), "--json", str(figures)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    totals = json.loads(figures.read_text())["totals"]
    assert totals["all_stages_succeeded"]
    assert totals["rerun_model_calls"] == 0
    assert totals["peak_rss_mb_max"] < 2048
    stages = [s["stage"] for s in json.loads(figures.read_text())["passes"][0]["stages"]]
    assert {"raw_customers", "product_embeddings", "recommendations", "validated_recommendations"} <= set(stages)
    # a day is one run with a process per step (as the daemon runs it), each step measured apart
    steps = json.loads(figures.read_text())["passes"][0]["stages"]
    assert len({s["stage"] for s in steps}) == len(steps) and all(s["peak_rss_mb"] > 0 for s in steps)
    # two steps at a time: the warehouse writers one after another (one `duckdb` pool slot), a GX
    # suite beside them
    pools = {node.name: node.pool for node in daily_pipeline_nodes()}
    writers = sorted((s["interval"] for s in steps if pools[s["stage"]] == "duckdb"))
    assert all(earlier[1] <= later[0] for earlier, later in zip(writers, writers[1:]))
    suites = [s["interval"] for s in steps if "_expectation_suite" in s["stage"]]
    assert any(a[0] < b[1] and b[0] < a[1] for a in suites for b in writers)
    # the checks' verdicts come with the run (the generated faults fail error_rate), not only step success
    assert "error_rate" in json.loads(figures.read_text())["passes"][0]["failed_checks"]
    # what else the machine was doing is part of the figures (the README's tables quote it)
    assert len(json.loads(figures.read_text())["passes"][0]["load_average_before"]) == 3
    assert "load average before" in proc.stdout
    # each run's log is kept beside the warehouse, so an outlier can be read afterwards
    log = tmp_path / "bench" / "logs" / "2011-09-01-day-1-first-run.log"
    assert "recommendations - STEP_SUCCESS" in log.read_text()
    # and the run says how much disk its workdir holds, and how to free it
    assert f"{tmp_path / 'bench'} holds " in proc.stdout and f"rm -r {tmp_path / 'bench'}" in proc.stdout


def test_model_work_is_left_out_of_a_day_only_where_nothing_else_ran():
    from bench.run_pipeline import seconds_alone

    model = ("product_embeddings",)
    serial = [{"stage": "a", "seconds": 3.0}, {"stage": "product_embeddings", "seconds": 5.0}]
    assert seconds_alone(serial, model) == 5.0  # stage by stage: its own seconds
    overlapping = [{"stage": "a", "interval": [0.0, 4.0]}, {"stage": "product_embeddings", "interval": [2.0, 9.0]},
                   {"stage": "b_check", "interval": [6.0, 7.0]}]
    assert seconds_alone(overlapping, model) == pytest.approx(4.0)  # 4-6 and 7-9 alone
    assert seconds_alone(overlapping, ("a",)) == pytest.approx(2.0)


def test_a_day_change_counts_the_customers_who_bought_on_the_day_against_those_before(tmp_path):
    import datetime as dt

    import duckdb

    from bench.run_pipeline import changed_customers

    warehouse = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(warehouse)) as con:
        con.execute("CREATE SCHEMA analytics")
        con.execute("CREATE TABLE analytics.stg_purchases (customer_id VARCHAR, purchased_at TIMESTAMP)")
        con.executemany("INSERT INTO analytics.stg_purchases VALUES (?, ?)", [
            ("old-quiet", "2011-08-01 10:00"), ("old-back", "2011-07-01 09:00"), ("old-back", "2011-09-02 23:59"),
            ("new", "2011-09-02 00:00"), ("new", "2011-09-02 08:00"), ("later", "2011-09-03 00:00"),
            ("old-yesterday", "2011-09-01 23:59")])
    assert changed_customers(warehouse, dt.date(2011, 9, 2)) == {
        "customers_before": 3, "bought_on_the_day": 2, "new": 1, "returning": 1, "share_of_customers_before": 0.6667}
