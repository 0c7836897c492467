"""Steps with slack give the cores to the steps the day's outputs wait for.

A run executes two steps at a time on two cores (definitions.py). A day's longest path runs
through the warehouse writers, the catalog embedding and recommendations to the output rules. The
GX suites, customer segments and the quality evaluation have slack: no step on that path waits
for them. Yet beside it they took its CPU: on day 2 at 2M customers recommendations took 34.7 s
with segments beside it and 28.6 s once segments ran at a lower priority; with the suites lowered
too, the writers reached stg_purchases 4 s sooner and the day ended 8 s sooner (replays of the
same day; the sum of the work is unchanged, the steps with slack finish it in the gaps).

Such a step carries `BACKGROUND_TAGS` and lowers its process's CPU priority (nice) when it
starts, if it runs in a process of its own (the multiprocess executor). A step executed in its
caller's process (tests, the in-process executor) leaves it alone: a process cannot raise its
priority back.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

CPU_PRIORITY_TAG = "cpu_priority"
BACKGROUND = "background"
BACKGROUND_TAGS = {CPU_PRIORITY_TAG: BACKGROUND}
BACKGROUND_NICENESS = 10


def is_background(tags: dict[str, Any] | None) -> bool:
    return (tags or {}).get(CPU_PRIORITY_TAG) == BACKGROUND


def yield_cores_if_background(context: Any) -> bool:
    """Lower this step process's CPU priority when the step has slack; returns whether it did.
    `context`: an asset's or an asset check's execution context."""
    op_context = getattr(context, "op_execution_context", context)
    if not is_background(op_context.op_def.tags) or multiprocessing.parent_process() is None:
        return False
    current = os.nice(0)
    if current < BACKGROUND_NICENESS:
        os.nice(BACKGROUND_NICENESS - current)  # threads started from now on (DuckDB's, scoring) inherit it
    return True
