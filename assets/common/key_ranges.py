"""Ranges of a key that cut a table stored in key order into about equal parts.

A statement over 20M rows whose join or aggregate does not fit the cache (or DuckDB's memory)
runs range by range instead: on tables stored in key order a range reads only its own row
groups, and each range's hash tables are a fraction of the whole (the output rules' already_bought
join, customer_features' aggregates). Each row is in exactly one range, a missing key in the first.
"""

from __future__ import annotations

from resources.warehouse import fetch_all

SAMPLE_ROWS = 100_000


def key_ranges(con, table: str, key: str, shards: int) -> list[tuple[str | None, str | None]]:
    """About equal ranges [low, high) of `table`'s `key` (None: unbounded), cut at the quantiles
    of a repeatable sample; one unbounded range when shards <= 1. `table` and `key` are names
    from code."""
    if shards <= 1:
        return [(None, None)]
    sample = [row[0] for row in fetch_all(
        con, f"SELECT {key} FROM (SELECT {key} FROM {table} WHERE {key} IS NOT NULL "
             f"USING SAMPLE reservoir({SAMPLE_ROWS} ROWS) REPEATABLE (7)) ORDER BY 1")]
    cuts = sorted({sample[len(sample) * i // shards] for i in range(1, shards)} if sample else set())
    bounds = [None, *cuts, None]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def range_params(low: str | None, high: str | None) -> dict[str, str]:
    """The parameters in_range's SQL takes."""
    return {name: value for name, value in (("low", low), ("high", high)) if value is not None}


def in_range(column: str, low: str | None, high: str | None) -> str:
    """SQL of a row in [low, high) by `column`, with range_params' $low / $high; the first range
    takes a missing key too, so that every row is in exactly one range."""
    if low is None and high is None:
        return "true"
    if low is None:
        return f"({column} < $high OR {column} IS NULL)"
    return f"{column} >= $low" + (f" AND {column} < $high" if high is not None else "")
