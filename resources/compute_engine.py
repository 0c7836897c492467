"""Where the heavy per-customer work runs: threads in the step's own process (the default) or
the workers of a Ray cluster, chosen by configuration.

    for item, result in compute_engine.ordered_map(function, items, shared=model_and_candidates):

`function(shared, item)` is a plain module-level function of `recsys` (no Dagster, no warehouse);
`shared` (the fitted model, the candidates) is sent once: on Ray it goes to the object store and
each worker process gets it when it starts, not with every item. Results come back in input
order with a bounded number of items in flight (two per worker), so the step's memory holds a
few chunks whatever the number of customers. The step keeps reading its snapshot and writing
its staged outputs: only the computation moves.

Ray: `address` names an existing cluster (`ray://head:10001`, or `auto` on a cluster node); with
none, the step starts a private local Ray with `workers` CPUs and stops it at the end. The
`recsys` package travels to the workers as a `py_modules` runtime environment, so a remote
cluster needs only the same Python packages, not this repository.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import dagster as dg
from pydantic import Field

from recsys.engines import RAY, THREADS, ordered_threads_map, ray_ordered_map, ray_session


class ComputeEngine(dg.ConfigurableResource):
    """Threads in the step (default) or a Ray cluster, for the per-customer scoring loops."""

    kind: Literal["threads", "ray"] = Field(default=THREADS, description="threads (in the step) or ray.")
    address: str | None = Field(
        default=None, description="ray: the cluster (ray://host:10001, auto); unset: a private local Ray.")
    workers: int = Field(default=2, ge=1, description="ray: worker processes (actors), one CPU each.")
    sql_shards: int = Field(default=0, ge=0, description=(
        "Hash shards of a keyed SQL model's full build; more shards, less memory each. ray: 0 = two per "
        "worker. threads: 0 = one query in the warehouse; N = N shards one after another in the step, "
        "each in its own DuckDB (for a model whose one query does not fit in memory_limit)."))
    ingest_shard_mb: int = Field(default=0, ge=0, description=(
        "A plain JSON Lines or CSV landing file larger than this many MiB is read and judged in shards of about "
        "this size, each on a worker (threads: two at a time in the step); 0: every file is read whole."))

    @property
    def distributed(self) -> bool:
        return self.kind == RAY

    def builds_in_shards(self, keyed: bool) -> bool:
        """Whether a SQL model's full build runs through sharded.py: every model on Ray (one
        without a key as one shard), a keyed one in the step when sql_shards is set."""
        return self.distributed or (keyed and self.sql_shards > 0)

    def describe(self) -> dict[str, Any]:
        """For materialization metadata: where the work ran."""
        if self.kind == THREADS:
            return {"engine": THREADS}
        return {"engine": RAY, "engine_workers": self.workers, "engine_address": self.address or "local"}

    def session(self) -> contextlib.AbstractContextManager:
        """Hold one Ray connection (or private local Ray) across several maps of a step."""
        if self.kind == THREADS:
            return contextlib.nullcontext()
        return ray_session(self.address, self.workers)

    def ordered_map(self, function: Callable[[Any, Any], Any], items: Iterable[Any], *, shared: Any,
                    threads: int = 2) -> Iterator[tuple[Any, Any]]:
        """(item, function(shared, item)) for every item, in input order."""
        if self.kind == THREADS:
            yield from ordered_threads_map(function, items, shared, threads)
        else:
            yield from ray_ordered_map(function, items, shared, self.address, self.workers)
