"""The two ways recsys's per-chunk work is mapped: threads in this process, or Ray actors.

Lives in recsys (no Dagster import) because Ray workers import it: the actor class and the
mapped functions must be importable from the `recsys` package that travels to the workers.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

THREADS = "threads"
RAY = "ray"
IN_FLIGHT_PER_WORKER = 2

log = logging.getLogger(__name__)


def ordered_threads_map(function: Callable[[Any, Any], Any], items: Iterable[Any], shared: Any, threads: int
                        ) -> Iterator[tuple[Any, Any]]:
    from recsys.recommender import ordered_parallel_map

    yield from ordered_parallel_map(lambda item: (item, function(shared, item)), items, threads)


@contextlib.contextmanager
def ray_session(address: str | None, workers: int) -> Iterator[Any]:
    """A connection to the configured cluster, or a private local Ray started for the step."""
    import ray

    import recsys

    if ray.is_initialized():  # a caller (a test, a notebook) already holds one: use it, leave it
        yield ray
        return
    started = time.monotonic()
    options: dict[str, Any] = {
        "runtime_env": {"py_modules": [str(Path(recsys.__file__).parent)]},
        "log_to_driver": False,
        "configure_logging": False,
    }
    if address:
        ray.init(address=address, **options)
    else:
        ray.init(num_cpus=workers, include_dashboard=False, **options)
    log.info(f"ray ready in {time.monotonic() - started:.1f}s ({address or 'local'})")
    try:
        yield ray
    finally:
        ray.shutdown()


class RemoteWorker:
    """One Ray actor: holds the shared objects, applies the function to the items it is sent."""

    def __init__(self, function, shared) -> None:
        self.function, self.shared = function, shared

    def run(self, item):
        return self.function(self.shared, item)


def ray_ordered_map(function, items, shared, address: str | None, workers: int) -> Iterator[tuple[Any, Any]]:
    with ray_session(address, workers) as ray:
        worker_class = ray.remote(num_cpus=1)(RemoteWorker)
        shared_ref = ray.put(shared)
        actors = [worker_class.remote(function, shared_ref) for _ in range(workers)]
        in_flight: deque[tuple[Any, Any]] = deque()
        try:
            for number, item in enumerate(items):
                in_flight.append((item, actors[number % workers].run.remote(item)))
                if len(in_flight) >= IN_FLIGHT_PER_WORKER * workers:
                    done, ref = in_flight.popleft()
                    yield done, ray.get(ref)
            while in_flight:
                done, ref = in_flight.popleft()
                yield done, ray.get(ref)
        finally:
            for actor in actors:
                ray.kill(actor)
            del shared_ref


def run_sql_shard(shared: tuple[str, dict, dict[str, tuple[str, bool]], str, str], shard: int) -> int:
    """One shard of a keyed SQL model, in an in-memory DuckDB: each input table is a view over its
    files (the shard's files of a keyed input, every file of a lookup), the model's own SELECT runs
    as written, its rows go to `<out_dir>/shard-<n>.parquet`. Returns the rows written.

    `inputs` maps a table to (folder, keyed): `<folder>/shards/shard=<n>/*.parquet` for keyed
    inputs, `<folder>/all.parquet` for lookups; `<folder>/empty.parquet` always exists (the
    schema, no rows), so a shard without rows is an empty table, not an error."""
    import glob

    import duckdb

    sql, params, inputs, out_dir, memory_limit = shared
    # spills beside its output (an in-memory DuckDB would spill to .tmp in the working directory)
    config = {"threads": 1, "memory_limit": memory_limit, "temp_directory": f"{out_dir}/.spill-{shard}"}
    with duckdb.connect(config=config) as con:
        for table, (folder, keyed) in inputs.items():
            pattern = f"{folder}/shards/shard={shard}/*.parquet" if keyed else f"{folder}/all.parquet"
            files = sorted(glob.glob(pattern)) or [f"{folder}/empty.parquet"]
            schema, _, name = table.rpartition(".")
            con.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            listed = ", ".join("'" + path.replace("'", "''") + "'" for path in files)  # our own paths
            con.execute(f'CREATE VIEW "{schema}"."{name}" AS SELECT * FROM read_parquet([{listed}])')
        out = f"{out_dir}/shard-{shard}.parquet".replace("'", "''")
        con.execute(f"COPY ({sql}) TO '{out}' (FORMAT parquet)", params)
        return int(con.execute(f"SELECT count(*) FROM read_parquet('{out}')").fetchone()[0])
