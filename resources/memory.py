"""A step's memory: what the process holds, what it gives back, and what DuckDB may take.

A step is one process (Dagster's executor, the scale benchmark). Its peak is the Python side
(models, Arrow batches) plus DuckDB's buffers, so DuckDB's memory_limit is set per connection
from what the process already holds (`budgeted_memory_limit`), after freed memory is given back.
"""

from __future__ import annotations

import ctypes
import gc
import os
import re
import time

import pyarrow as pa

# DuckDB's RSS runs past memory_limit (allocations outside its buffer pool, Arrow scans,
# allocator slack): measured at 2M customers, a 412 MiB limit gave raw_customers 210 MiB more.
DUCKDB_OVERSHOOT_RESERVE = 256 * 2**20
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Bytes of a size as DuckDB writes it: "1GB" (10^9), "512MiB" (2^20 x 512), "1000"."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (for example 1GB, 512MiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def process_rss() -> int:
    """This process's resident memory now, in bytes (Linux; elsewhere 0: no budget to apply)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def budgeted_memory_limit(cap: str, budget: str | None, floor: str, held: int | None = None) -> str:
    """The DuckDB memory_limit that keeps this process near `budget`: what the budget leaves
    after the process's memory now (or `held` bytes: what it holds besides an open connection's
    buffers) and DuckDB's overshoot, between `floor` and `cap`."""
    if not budget:
        return cap
    room = parse_size(budget) - (process_rss() if held is None else held) - DUCKDB_OVERSHOOT_RESERVE
    limit = max(min(parse_size(cap), room), parse_size(floor))
    return f"{limit // 2**20}MiB"


def release_memory() -> None:
    """Give freed memory back to the system: Python's cycles, Arrow's pool, glibc's arenas."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


_last_release = 0.0


def release_memory_at_most_every(seconds: float) -> None:
    """`release_memory`, unless this process did it less than `seconds` ago (a full collection
    costs tens of milliseconds in a large process; a step connects a few times, a test suite
    thousands)."""
    global _last_release
    if time.monotonic() - _last_release >= seconds:
        release_memory()
        _last_release = time.monotonic()
