"""Run one asset (with its checks) for one partition in this process and print what it cost.

The scale benchmark starts one such process per stage, as Dagster's multiprocess executor
does, so the peak RSS it reports is that of the step's own process.

    python -m bench.stage ASSET PARTITION_KEY  ->  one JSON line on stdout
    python -m bench.stage all PARTITION_KEY    ->  the whole job as one run (one process)
    python -m bench.stage run PARTITION_KEY    ->  the whole job as the daemon runs it: its own
                                                   executor (a process per step), each step's
                                                   seconds and peak RSS
"""

from __future__ import annotations

import datetime as dt
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import dagster as dg
import psutil


def run_stage(asset_name: str, partition_key: str) -> dict:
    from definitions import defs

    started = time.perf_counter()
    job = defs.resolve_job_def(os.getenv("BENCH_JOB", "daily_pipeline"))  # lakehouse_pipeline: bench.lakehouse
    # Ray workers are other processes: their memory is sampled apart, and only when they exist.
    with EngineWorkers(enabled=os.getenv("COMPUTE_ENGINE") == "ray") as workers:
        result = job.execute_in_process(
            partition_key=partition_key,
            asset_selection=None if asset_name == "all" else [dg.AssetKey(asset_name)],
            instance=dg.DagsterInstance.ephemeral(),
            raise_on_error=False,
        )
    seconds = time.perf_counter() - started
    events = [{k: _plain(v.value) for k, v in e.materialization.metadata.items()}
              for e in result.get_asset_materialization_events()]
    metadata = events[-1] if events else {}
    if asset_name == "all":
        metadata = {
            "skipped": all(m.get("skipped", False) for m in events if "versus_best_baseline" not in m),
            "model_calls": sum(m.get("model_calls") or 0 for m in events),
        }
    failed_checks = [c.check_name for c in result.get_asset_check_evaluations() if not c.passed]
    errors = [f"{e.step_key}: {_root_cause(e.event_specific_data.error)[:1500]}"
              for e in result.all_events if e.is_step_failure]
    return {
        "stage": asset_name,
        "partition": partition_key,
        "success": result.success,
        "seconds": round(seconds, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "skipped": bool(metadata.get("skipped", False)),
        "rows": metadata.get("dagster/row_count"),
        "model_calls": metadata.get("model_calls", metadata.get("requests")),
        "failed_checks": failed_checks,
        **({"worker_peak_rss_mb": workers.peak_mb} if workers.peak_mb else {}),
        **({"error": "\n".join(errors)} if errors else {}),
    }


def daily_pipeline_job():
    """The daily job as the code location's module names it, so `dg.execute_job` runs it with its
    own executor (a forked process per step; `execute_in_process` would run it in this one)."""
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    return ReconstructableRepository.for_module("definitions", "defs", str(Path(__file__).resolve().parents[1])
                                                ).get_reconstructable_job("daily_pipeline")


def project_concurrency() -> dict:
    """The pools of the project's instance (.dagster_home/dagster.yaml): the warehouse writers
    share one slot there, and the executor runs two steps at a time."""
    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / ".dagster_home" / "dagster.yaml").read_text())
    return {"pools": config["concurrency"]["pools"]}


def write_event_log(records) -> None:
    """The run's whole event log to stderr, which the benchmark keeps as the run's log. The
    steps' own console lines reach stderr through Dagster's compute-log mirror, which can drop a
    step's last lines when its process ends under load (a run's log once lacked three
    STEP_SUCCESS lines); the event log has every event."""
    print("== the run's event log", file=sys.stderr)
    for record in records:
        event = record.dagster_event
        kind = event.event_type_value if event else "LOG"
        when = dt.datetime.fromtimestamp(record.timestamp, dt.UTC).strftime("%H:%M:%S.%f")[:-3]
        print(f"{when} - {record.step_key or 'run'} - {kind} - {record.user_message}", file=sys.stderr)


def run_job(partition_key: str) -> dict:
    """The daily job launched as the daemon launches it: from the code location's module, with the
    job's own executor (a forked process per step) on a local instance with the project's pools.
    Each step's seconds come from the event log (and when it started and ended, from the run's
    start: steps may overlap); its peak RSS is its process's high-water mark (VmHWM)."""
    job = daily_pipeline_job()
    with tempfile.TemporaryDirectory(prefix="bench-instance-") as home, \
            dg.DagsterInstance.local_temp(home, overrides={"concurrency": project_concurrency()}) as instance, \
            StepProcesses() as processes:
        started, wall_started = time.perf_counter(), time.time()
        result = dg.execute_job(job, instance=instance, tags={"dagster/partition": partition_key}, raise_on_error=False)
        seconds = time.perf_counter() - started
        records = instance.all_logs(result.run_id)
    write_event_log(records)
    steps: dict[str, dict] = {}
    for record in records:
        event = record.dagster_event
        if event is None or not event.step_key:
            continue
        step = steps.setdefault(event.step_key, {"stage": event.step_key})
        if event.event_type == dg.DagsterEventType.STEP_START:
            step["started"], step["pid"] = record.timestamp, event.pid
        elif event.event_type in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
            step["seconds"] = round(record.timestamp - step.get("started", record.timestamp), 3)
            step["interval"] = [round(step.get("started", record.timestamp) - wall_started, 3),
                                round(record.timestamp - wall_started, 3)]
            step["success"] = event.event_type == dg.DagsterEventType.STEP_SUCCESS
            if not step["success"]:
                step["error"] = _root_cause(event.event_specific_data.error)[:1500]
        elif event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION and not event.event_specific_data.passed:
            step.setdefault("failed_checks", []).append(event.event_specific_data.check_name)
        elif event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
            metadata = {k: _plain(v.value) for k, v in event.materialization.metadata.items()}
            step.update(rows=metadata.get("dagster/row_count"), skipped=bool(metadata.get("skipped", False)),
                        model_calls=metadata.get("model_calls", metadata.get("requests")))
    steps = dict(sorted(steps.items(), key=lambda item: item[1].get("started", float("inf"))))  # as they ran
    for step in steps.values():
        step["peak_rss_mb"] = round(processes.peak_kib.get(step.pop("pid", None), 0) / 1024, 1)
        step.pop("started", None)
        step.setdefault("success", False)
    return {
        "stage": "run",
        "partition": partition_key,
        "success": result.success,
        "seconds": round(seconds, 3),
        "peak_rss_mb": max((s["peak_rss_mb"] for s in steps.values()), default=0.0),
        "skipped": all(s.get("skipped", True) for s in steps.values() if "rows" in s),
        "model_calls": sum(s.get("model_calls") or 0 for s in steps.values()),
        "failed_checks": [c for s in steps.values() for c in s.get("failed_checks", [])],
        "steps": list(steps.values()),
    }


class ProcessSampler:
    """A thread that calls `sample()` every `interval_s` while the `with` block runs (when enabled)."""

    def __init__(self, interval_s: float, enabled: bool = True):
        self.interval_s, self.enabled = interval_s, enabled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        raise NotImplementedError


class StepProcesses(ProcessSampler):
    """The peak RSS (VmHWM, KiB) of every process below this one, by pid, read every 0.2 s."""

    def __init__(self, interval_s: float = 0.2):
        super().__init__(interval_s)
        self.peak_kib: dict[int, int] = {}

    def sample(self) -> None:
        for child in psutil.Process().children(recursive=True):
            try:
                status = Path(f"/proc/{child.pid}/status").read_text()
            except OSError:
                continue  # it ended between the listing and the read
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_kib[child.pid] = max(self.peak_kib.get(child.pid, 0), int(line.split()[1]))


class EngineWorkers(ProcessSampler):
    """Samples the RSS of compute-engine worker processes (Ray actors, `ray::` in their title)
    every half second while the stage runs: the highest single worker is reported."""

    def __init__(self, enabled: bool, interval_s: float = 0.5):
        super().__init__(interval_s, enabled)
        self.peak_mb = 0.0

    def sample(self) -> None:
        for process in psutil.process_iter(["name", "cmdline", "memory_info"]):
            title = " ".join(process.info.get("cmdline") or []) or (process.info.get("name") or "")
            if title.startswith("ray::") and process.info.get("memory_info"):
                self.peak_mb = max(self.peak_mb, round(process.info["memory_info"].rss / 2**20, 1))


def _root_cause(error) -> str:
    """The innermost error of a step failure (the outer ones are Dagster's wrappers)."""
    while error.cause is not None:
        error = error.cause
    return error.message.strip()


def _plain(value):
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


if __name__ == "__main__":
    print(json.dumps(run_job(sys.argv[2]) if sys.argv[1] == "run" else run_stage(sys.argv[1], sys.argv[2])))
