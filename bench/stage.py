"""Run one asset (with its checks) for one partition in this process and print what it cost.

The scale benchmark starts one such process per stage, as Dagster's multiprocess executor
does, so the peak RSS it reports is that of the step's own process.

    python -m bench.stage ASSET PARTITION_KEY  ->  one JSON line on stdout
    python -m bench.stage all PARTITION_KEY    ->  the whole job as one run (one process)
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time

import dagster as dg
import psutil


def run_stage(asset_name: str, partition_key: str) -> dict:
    from definitions import defs

    started = time.perf_counter()
    job = defs.resolve_job_def("daily_pipeline")
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


class EngineWorkers:
    """Samples the RSS of compute-engine worker processes (Ray actors, `ray::` in their title)
    every half second while the stage runs: the highest single worker is reported."""

    def __init__(self, enabled: bool, interval_s: float = 0.5):
        self.enabled, self.interval_s, self.peak_mb = enabled, interval_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "EngineWorkers":
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
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
    print(json.dumps(run_stage(sys.argv[1], sys.argv[2])))
