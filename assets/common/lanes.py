"""Two lanes for the steps of a run on one machine.

The day's outputs wait on one chain of steps (ingestion, the SQL models, the catalog embedding,
recommendations, the output rules): the *foreground*, two steps at a time. The GX suites, the
segments and the offline evaluation wait on that chain, but nothing on it waits on them: the
*background*, up to two more steps beside the foreground at a lower CPU priority (nice 10). They
take the CPU the foreground leaves idle (at 2M customers the recommendations step selects and
fits on one core for about two minutes) and yield it when the foreground needs both cores; and a
suite can no longer take the place a step on the way to the outputs is about to need.

    @current_state_asset(..., lane=BACKGROUND)          # op tags; the build lowers its priority
    dg.asset_check(..., op_tags=lane_tags(BACKGROUND))  # then call run_in_background() in its body
"""

from __future__ import annotations

import multiprocessing
import os

LANE_TAG = "pipeline/lane"
FOREGROUND, BACKGROUND = "foreground", "background"
BACKGROUND_NICENESS = 10
# For the run's executor (definitions.py): every step of the daily job carries one lane tag.
LANE_LIMITS = [{"key": LANE_TAG, "value": FOREGROUND, "limit": 2},
               {"key": LANE_TAG, "value": BACKGROUND, "limit": 2}]


def lane_tags(lane: str) -> dict[str, str]:
    """Op tags of a step in `lane`; background steps also come last among steps ready at once."""
    if lane not in (FOREGROUND, BACKGROUND):
        raise ValueError(f"unknown lane {lane!r}")
    return {LANE_TAG: lane, **({"dagster/priority": "-1"} if lane == BACKGROUND else {})}


def run_in_background() -> int | None:
    """Lower this step's CPU priority to nice 10 when it runs in a process of its own (a child of
    the run's multiprocess executor); a step run in the caller's process (tests, in-process
    runs) shares it, so nothing changes there. Returns the niceness set, or None."""
    if multiprocessing.parent_process() is None:
        return None
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if current < BACKGROUND_NICENESS:
        os.nice(BACKGROUND_NICENESS - current)
    return os.getpriority(os.PRIO_PROCESS, 0)
