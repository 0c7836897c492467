"""A run that ends while one of its steps holds the `duckdb` pool's only slot must not keep it.

The worker is killed mid-step (as an OOM kill would), the operator cancels the stuck run, and the
real monitoring daemon, configured as in the shipped dagster.yaml files, gives the slot back.
Without `run_monitoring.free_slots_after_run_end_seconds` the slot stays claimed for ever and
every later warehouse step waits.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

POOL = "duckdb"
SHIPPED_CONFIGS = [ROOT / ".dagster_home" / "dagster.yaml", ROOT / "deploy" / "dagster.postgres.yaml"]


@dg.asset(pool=POOL)
def holds_the_warehouse() -> None:
    time.sleep(300)  # killed long before


def run_holding_the_slot(dagster_home: str) -> None:
    with dg.DagsterInstance.from_config(dagster_home) as instance:
        dg.materialize([holds_the_warehouse], instance=instance)


def claimed_slots(instance: dg.DagsterInstance) -> int:
    return len(instance.event_log_storage.get_concurrency_info(POOL).claimed_slots)


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {seconds:.0f}s waiting for {what}"
        time.sleep(0.2)


@pytest.mark.parametrize("shipped", SHIPPED_CONFIGS, ids=lambda path: path.parent.name)
def test_shipped_instances_free_the_slots_of_ended_runs(shipped: Path):
    monitoring = yaml.safe_load(shipped.read_text())["run_monitoring"]
    assert monitoring["enabled"] is True and monitoring["free_slots_after_run_end_seconds"] > 0


def test_the_slot_of_a_killed_and_cancelled_run_is_given_back(tmp_path: Path):
    config = yaml.safe_load(SHIPPED_CONFIGS[0].read_text())
    config["run_monitoring"].update(free_slots_after_run_end_seconds=1, poll_interval_seconds=1)  # a test's patience
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))

    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.event_log_storage.set_concurrency_slots(POOL, 1)
        worker = mp.get_context("spawn").Process(target=run_holding_the_slot, args=(str(home),))
        worker.start()
        wait_until(lambda: claimed_slots(instance) == 1, 60, "the step to claim the slot")
        os.kill(worker.pid, signal.SIGKILL)  # the worker dies holding the slot
        worker.join(10)

        (run,) = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.STARTED  # nothing noticed the death
        instance.report_run_canceled(run)  # what the UI's "terminate" does for a dead worker
        time.sleep(2)
        assert claimed_slots(instance) == 1  # cancelled, still holding it: only the daemon frees it

        env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(ROOT)}
        daemon = subprocess.Popen([sys.executable, "-m", "dagster._daemon", "run", "--empty-workspace"], cwd=ROOT,
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: claimed_slots(instance) == 0, 90, "the monitoring daemon to free the slot")
        finally:
            os.killpg(daemon.pid, signal.SIGTERM)
            daemon.wait(30)
