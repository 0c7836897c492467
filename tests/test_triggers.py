"""The daily loop runs itself: a day whose files have all landed is run once (again when a file
changes), an incomplete day waits; a real daemon launches the run the landing sensor asks for."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pytest

from assets.common.sources import SOURCES
from assets.ingest.triggers import build_daily_schedule, build_landing_sensor
from generator import FaultRates, GeneratorConfig, generate
from resources.landing import LandingZone
from tests.conftest import ROOT
from tests.fake_openai_server import FakeOpenAIServer
from tests.ui_support import code_location_env, write_dagster_home

DAYS = ("2011-09-01", "2011-09-02")
PARTITIONS = dg.DailyPartitionsDefinition(start_date=DAYS[0], end_date="2011-09-03")


def tick(sensor: dg.SensorDefinition, landing: Path, cursor: str | None, **zone) -> dg.SensorResult:
    with dg.build_sensor_context(cursor=cursor, resources={"landing": LandingZone(root=str(landing), **zone)}) as context:
        return sensor(context)


@pytest.fixture
def landing(tmp_path) -> Path:
    folder = tmp_path / "landing"
    generate(GeneratorConfig(out=folder, customers=50, days=2, seed=3, start=dt.date(2011, 9, 1),
                             faults=FaultRates.uniform(0.0)))
    return folder


def test_a_complete_day_is_requested_once_and_again_when_a_file_changes(landing):
    from definitions import defs

    sensor = build_landing_sensor(defs.resolve_job_def("daily_pipeline"), SOURCES, PARTITIONS)
    history = tick(sensor, landing, None)  # the first tick takes stock of what already landed
    assert history.run_requests == [] and "2 complete day(s) already landed" in history.skip_reason.skip_message

    (landing / "customers" / f"{DAYS[1]}.jsonl").unlink()
    (landing / "products" / f"{DAYS[0]}.csv").write_text((landing / "products" / f"{DAYS[0]}.csv").read_text() + "\n")
    first = tick(sensor, landing, history.cursor)
    assert [r.partition_key for r in first.run_requests] == [DAYS[0]]  # changed; day 2 is incomplete
    assert tick(sensor, landing, first.cursor).run_requests == []  # nothing new: nothing asked
    generate(GeneratorConfig(out=landing, customers=50, days=2, seed=3, start=dt.date(2011, 9, 1),
                             faults=FaultRates.uniform(0.0)))  # day 2 lands again, day 1 is written again
    later = tick(sensor, landing, first.cursor)
    assert sorted(r.partition_key for r in later.run_requests) == list(DAYS)
    assert len({r.run_key for r in [*first.run_requests, *later.run_requests]}) == 3


def test_a_corrected_earlier_day_is_run_and_then_the_latest_day_which_takes_it_into_the_current_tables(landing):
    """The current tables hold the latest day, so the corrected day's own run skips them: the latest
    day is asked again after it, once per correction."""
    from definitions import defs

    sensor = build_landing_sensor(defs.resolve_job_def("daily_pipeline"), SOURCES, PARTITIONS)
    history = tick(sensor, landing, None)
    corrected = landing / "transactions" / f"{DAYS[0]}.csv"
    corrected.write_text("".join(corrected.read_text().splitlines(keepends=True)[:-1]))  # a line taken back
    first = tick(sensor, landing, history.cursor)
    assert [r.partition_key for r in first.run_requests] == list(DAYS)  # in this order: runs go one at a time
    assert first.run_requests[1].tags["after_changed_days"] == DAYS[0]
    assert tick(sensor, landing, first.cursor).run_requests == []
    corrected.write_text(corrected.read_text() + corrected.read_text().splitlines(keepends=True)[-1])
    again = tick(sensor, landing, first.cursor)  # a second correction: both days once more, new run keys
    assert [r.partition_key for r in again.run_requests] == list(DAYS)
    assert not {r.run_key for r in again.run_requests} & {r.run_key for r in first.run_requests}


def test_a_corrected_catalog_day_asks_every_later_day_again_whose_records_were_judged_against_it(
        tmp_path, monkeypatch):
    """Customers' purchases are judged against the products up to their day: a corrected products
    file of day 1 changes the verdicts of days 2 and 3 as well (a product added: its purchases are
    no longer unknown). Only day 1 and the latest were asked, and day 2 kept its old verdicts,
    all green (found by an outside-in probe). Without a catalog source, the latest is enough."""
    from definitions import defs

    days = ("2011-09-01", "2011-09-02", "2011-09-03", "2011-09-04")
    folder = tmp_path / "landing"
    generate(GeneratorConfig(out=folder, customers=50, days=4, seed=3, start=dt.date(2011, 9, 1),
                             faults=FaultRates.uniform(0.0)))
    partitions = dg.DailyPartitionsDefinition(start_date=days[0], end_date="2011-09-05")
    sensor = build_landing_sensor(defs.resolve_job_def("daily_pipeline"), SOURCES, partitions)
    history = tick(sensor, folder, None)
    catalog = folder / "products" / f"{days[0]}.csv"
    catalog.write_text(catalog.read_text() + "99999,Added later,A product a correction added,Kitchen,1.50,true\n")
    asked = tick(sensor, folder, history.cursor).run_requests
    assert [r.partition_key for r in asked] == list(days)  # in day order: the latest last
    assert [r.tags.get("after_changed_days") for r in asked] == [None, days[0], days[0], days[0]]

    late = folder / "customers" / f"{days[2]}.jsonl"  # a file that comes after the later days ran
    held_back = late.read_bytes()
    late.unlink()
    before = tick(sensor, folder, None)
    late.write_bytes(held_back)
    asked = tick(sensor, folder, before.cursor).run_requests
    assert [(r.partition_key, r.tags.get("after_changed_days")) for r in asked] == [(days[2], None), (days[3], days[2])]

    # The latest day is closed (the schedule ran it, the tables hold it): it is asked after a correction.
    for source in ("products", "customers", "transactions"):
        for path in (folder / source).glob(f"{days[3]}.*"):
            path.unlink()
    history = tick(sensor, folder, None, closed_days=[days[3]])
    orders = folder / "transactions" / f"{days[2]}.csv"
    orders.write_text("".join(orders.read_text().splitlines(keepends=True)[:-1]))
    asked = tick(sensor, folder, history.cursor, closed_days=[days[3]]).run_requests
    assert [(r.partition_key, r.tags.get("after_changed_days")) for r in asked] == [(days[2], None), (days[3], days[2])]

    monkeypatch.setenv("PIPELINE_SOURCES", "transactions")  # nothing judged against a catalog
    sensor = build_landing_sensor(defs.resolve_job_def("daily_pipeline"), SOURCES, partitions)
    history = tick(sensor, folder, None)
    orders = folder / "transactions" / f"{days[1]}.csv"
    orders.write_text("".join(orders.read_text().splitlines(keepends=True)[:-1]))
    assert [r.partition_key for r in tick(sensor, folder, history.cursor, closed_days=[days[3]]).run_requests] == [
        days[1], days[3]]


def test_only_the_configured_sources_make_a_day_complete(landing, monkeypatch):
    from definitions import defs

    for source in ("products", "customers"):
        for path in (landing / source).glob("*"):
            path.unlink()
    monkeypatch.setenv("PIPELINE_SOURCES", "transactions")
    sensor = build_landing_sensor(defs.resolve_job_def("daily_pipeline"), SOURCES, PARTITIONS)
    assert "2 complete day(s)" in tick(sensor, landing, None).skip_reason.skip_message
    assert sorted(r.partition_key for r in tick(sensor, landing, "{}").run_requests) == list(DAYS)


def test_on_a_closed_day_the_files_that_came_make_the_day_complete(landing):
    """A closed day (LandingZone.closed_days) waits for no file (the shop sends none): the day is run
    once the files that do come have landed, and again if the order lines come after all. A closed
    day without any file is left to the daily schedule (nothing landed to run on)."""
    from definitions import defs

    sensor = build_landing_sensor(defs.resolve_job_def("daily_pipeline"), SOURCES, PARTITIONS)
    orders = landing / "transactions" / f"{DAYS[1]}.csv"
    kept = orders.read_bytes()
    orders.unlink()
    closed = {"closed_days": [DAYS[1]]}
    assert tick(sensor, landing, "{}").run_requests[0].partition_key == DAYS[0]  # day 2 waits: not closed
    first = tick(sensor, landing, "{}", **closed)
    assert [r.partition_key for r in first.run_requests] == list(DAYS)
    orders.write_bytes(kept)
    assert [r.partition_key for r in tick(sensor, landing, first.cursor, **closed).run_requests] == [DAYS[1]]
    for source, suffix in (("transactions", "csv"), ("products", "csv"), ("customers", "jsonl")):
        (landing / source / f"{DAYS[1]}.{suffix}").unlink()
    assert [r.partition_key for r in tick(sensor, landing, "{}", **closed).run_requests] == [DAYS[0]]


@pytest.mark.parametrize("setting, message", [
    ("transaction", "unknown sources ['transaction']"),  # a typo: no source to wait for, every day complete
    ("customers", "customers is judged against ['products']"),  # every item an unknown product
])
def test_a_sources_setting_that_cannot_work_stops_the_code_location_with_the_reason(monkeypatch, setting, message):
    from assets.common.sources import configured_sources
    from definitions import build_definitions

    monkeypatch.setenv("PIPELINE_SOURCES", setting)
    with pytest.raises(ValueError, match=re.escape(message)):
        build_definitions()
    monkeypatch.setenv("PIPELINE_SOURCES", "products, customers")
    assert [source.name for source in configured_sources()] == ["products", "customers"]


@pytest.mark.slow
def test_the_daemon_runs_a_landed_day_by_itself(tmp_path):
    """`dagster-daemon` with the project's workspace: the landing sensor (on by default) takes
    stock on its first tick, then asks for the day that lands, and the daemon's run succeeds.
    (Several days in one tick: the sensor tests above; one day here saves a run of CI time.)"""
    arriving = tmp_path / "arriving"
    generate(GeneratorConfig(out=arriving, customers=50, days=1, seed=3, start=dt.date(2011, 9, 1),
                             faults=FaultRates.uniform(0.0)))
    landing = tmp_path / "landing"
    landing.mkdir()
    with running_daemon(tmp_path, landing, PIPELINE_FIRST_DAY=DAYS[0], PIPELINE_LAST_DAY="2011-09-02",
                        LANDING_SENSOR_INTERVAL_SECONDS="3") as instance:
        wait_for_first_tick(instance, "landing_sensor", seconds=120)
        assert instance.get_runs() == []  # an empty landing zone: nothing to run
        for source in arriving.iterdir():  # the files land after the sensor took stock
            source.rename(landing / source.name)
        runs = wait_for_finished_runs(instance, 1, seconds=420)
        step_processes = [step_pids(instance, run.run_id) for run in runs]
    assert [run.tags.get("dagster/partition") for run in runs] == [DAYS[0]]
    assert all(run.tags.get("trigger") == "landing" for run in runs)
    assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs), [r.status for r in runs]
    # each step in a process of its own, so its memory is given back when it ends (definitions.py)
    for pids in step_processes:
        assert len(pids) > 10 and len(set(pids.values())) == len(pids), pids


def step_pids(instance: dg.DagsterInstance, run_id: str) -> dict[str, int]:
    """The process each step of a run started in."""
    return {record.dagster_event.step_key: record.dagster_event.pid
            for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)}


instance_logs: dict[int, Path] = {}  # id(instance) -> its daemon's log file


@contextmanager
def running_daemon(tmp_path: Path, landing: Path, **settings: str) -> Iterator[dg.DagsterInstance]:
    """`dagster-daemon` on the project's workspace with a fresh instance, a fake model server and
    these settings; yields the instance, and stops the daemon's process group on exit."""
    home = write_dagster_home(tmp_path / "dagster_home")
    with FakeOpenAIServer(default_dimensions=384) as server:
        env = code_location_env(home, tmp_path / "warehouse.duckdb", landing)
        env.update(MODEL_PROVIDER="openai", OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY="test-key",
                   EMBEDDING_MODEL="fake-embed", EMBEDDING_DIMENSIONS="384", ONLINE_RETAIL_DIR="", **settings)
        with dg.DagsterInstance.from_config(str(home)) as instance:  # its files exist (write_dagster_home)
            # The daemon's own log goes to a file: a test that times out shows its tail.
            log = (tmp_path / "daemon.log").open("wb")
            daemon = subprocess.Popen([sys.executable, "-m", "dagster._daemon", "run", "-w", str(ROOT / "workspace.yaml")],
                                      cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
            try:
                instance_logs[id(instance)] = tmp_path / "daemon.log"
                yield instance
            finally:
                log.close()
                os.killpg(daemon.pid, signal.SIGTERM)
                daemon.wait(60)


def wait_for_first_tick(instance: dg.DagsterInstance, sensor_name: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for state in instance.all_instigator_state():
            if state.name == sensor_name and state.instigator_data and state.instigator_data.cursor is not None:
                return
        time.sleep(1)
    raise AssertionError(f"{sensor_name} did not tick within {seconds}s")


def wait_for_finished_runs(instance: dg.DagsterInstance, count: int, seconds: float) -> list[dg.DagsterRun]:
    deadline = time.monotonic() + seconds
    finished = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
    while time.monotonic() < deadline:
        runs = instance.get_runs()
        if len(runs) >= count and all(run.status in finished for run in runs):
            return runs
        time.sleep(2)
    log = instance_logs.get(id(instance))
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else "(no daemon log)"
    raise AssertionError(f"timed out: runs {[(r.tags.get('dagster/partition'), r.status) for r in instance.get_runs()]}"
                         f"\ndaemon log tail:\n{tail}")


def test_the_schedule_asks_for_yesterday_every_morning():
    from definitions import defs

    schedule = defs.get_schedule_def("daily_pipeline_schedule")
    assert schedule.cron_schedule == "0 6 * * *" and schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    morning = dt.datetime(2011, 9, 3, 6, 0, tzinfo=dt.UTC)
    with dg.instance_for_test() as instance, dg.build_schedule_context(
            instance=instance, scheduled_execution_time=morning, repository_def=defs.get_repository_def()) as context:
        (request,) = schedule.evaluate_tick(context).run_requests
    assert request.partition_key == "2011-09-02" and request.tags["trigger"] == "schedule"


def test_the_schedule_asks_for_a_day_once_though_its_ticks_keep_naming_it():
    """Partitions that end on a set day (PIPELINE_LAST_DAY), or ticks caught up after the daemon
    was down, name the same last complete day again. Dagster's run key only dedupes within one
    tick, so the schedule itself skips a day it already asked for (a run per cron minute under
    a slow CI run: two runs of one day), unless that run failed."""
    from dagster._core.test_utils import create_run_for_test

    from definitions import defs

    schedule = build_daily_schedule(defs.resolve_job_def("daily_pipeline"), PARTITIONS)  # its last day: 2011-09-02
    with dg.instance_for_test() as instance:
        def tick(morning: dt.datetime) -> dg.ScheduleExecutionData:
            with dg.build_schedule_context(instance=instance, scheduled_execution_time=morning,
                                           repository_def=defs.get_repository_def()) as context:
                return schedule.evaluate_tick(context)

        (request,) = tick(dt.datetime(2011, 9, 3, 6, 0, tzinfo=dt.UTC)).run_requests
        run = create_run_for_test(instance, job_name=schedule.job_name, status=dg.DagsterRunStatus.STARTED,
                                  tags={**request.tags, "dagster/partition": request.partition_key})
        later = tick(dt.datetime(2011, 9, 4, 6, 0, tzinfo=dt.UTC))
        assert later.run_requests == [] and "2011-09-02" in later.skip_message
        instance.report_run_failed(run)  # a failed ask is asked again
        (again,) = tick(dt.datetime(2011, 9, 5, 6, 0, tzinfo=dt.UTC)).run_requests
        assert again.partition_key == "2011-09-02"


@pytest.mark.slow
def test_the_daemon_runs_the_schedule_for_the_last_complete_day(tmp_path):
    """The fallback through a real daemon (its cron set to every minute): the landing sensor took
    stock of the landed day and asked for nothing; the schedule runs it, and the run succeeds."""
    landing = tmp_path / "landing"
    generate(GeneratorConfig(out=landing, customers=50, days=1, seed=3, start=dt.date(2011, 9, 2),
                             faults=FaultRates.uniform(0.0)))
    with running_daemon(tmp_path, landing, PIPELINE_FIRST_DAY="2011-09-02", PIPELINE_LAST_DAY="2011-09-02",
                        DAILY_SCHEDULE_CRON="* * * * *") as instance:
        # 52 s alone; once (2026-12-04) no run within 240 s late in a slow CI run: more room, and the log
        (run,) = wait_for_finished_runs(instance, 1, seconds=420)
    assert run.tags.get("trigger") == "schedule" and run.tags.get("dagster/partition") == "2011-09-02"
    assert run.status == dg.DagsterRunStatus.SUCCESS
