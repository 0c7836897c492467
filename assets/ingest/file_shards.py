"""A large JSON Lines landing file read and judged in shards, on the compute engine's workers.

    ranges = shard_plan(source, path, shard_bytes)       # byte ranges of whole lines, or None
    staged = stage_in_shards(con, source, path, day, ranges, sharding, catalogs)

Each shard (a byte range that starts after a line feed and ends with one) is read, parsed and
judged by the rules that look at one record at a time, in a DuckDB of its own, on a worker of the
compute engine (threads in the step, or Ray workers); its staged rows, failures and unparseable
lines go to Parquet files. The step gathers them with each shard's line numbers moved on by the
lines of the shards before it, judges the rules across records (a customer id twice in the file)
over the whole file, and drops the purchase items of the customers that this pass quarantines.
The result is the file read whole, row for row (tests/test_file_shards.py).

Only plain LF-terminated files are cut: a gzip stream cannot be entered in the middle, and a file
whose first block has no LF keeps the whole-file rules (a CR-only file). CSV files are read
whole: a quoted field may span lines, so a byte offset does not say where a record starts.
On a cluster, the landing file and `work_dir` must be on storage the workers see.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from assets.common.sources import RawTable, Source
from assets.ingest.landing_files import NO_RECORDS, READ_BLOCK_BYTES, Staged, open_text_bytes, stage_and_judge
from assets.validate.rules import validate_staged
from resources.landing import LandingFileError
from resources.warehouse import fetch_scalar

LINE_NUMBERED = {  # staged table -> the bits below the line number in its row_id (None: it has none)
    "stg_customers": 0,
    "stg_customer_purchases": 20,  # row_id packs (line, item position)
    "failures_customers": 0,
    "failures_customer_purchases": 20,
    "unparseable": None,
}
SEEK_BYTES = 1 << 20  # read at a time while looking for the line feed that ends a shard


@dataclass(frozen=True)
class Sharding:
    """How a step cuts its files: the engine that stages the shards, their size, where they go."""

    engine: Any  # resources.compute_engine.ComputeEngine
    shard_bytes: int
    work_dir: Path
    memory_limit: str  # DuckDB's, per shard


@dataclass(frozen=True)
class ShardJob:
    """What every shard's worker needs: the file, the source, the day and where rows go."""

    path: str
    source: Source
    day: str
    catalogs: dict[str, str]  # qualified table -> Parquet file: the rows the rules look up (known products)
    work_dir: str
    memory_limit: str


def shard_plan(source: Source, path: Path, shard_bytes: int) -> list[tuple[int, int]] | None:
    """Byte ranges of whole lines of about `shard_bytes` each, or None: read the file whole (a
    small, gzip or not LF-terminated file; CSV). A file that cannot be read raises here, as the
    whole-file read would."""
    if source.reader != "customer_jsonl" or shard_bytes <= 0 or path.stat().st_size <= shard_bytes:
        return None
    with open_text_bytes(source.name, path) as (stream, notes):  # the start-of-file checks
        if notes["compression"] or b"\n" not in stream.read(READ_BLOCK_BYTES):
            return None
    size, cuts = path.stat().st_size, [0]
    with open(path, "rb") as raw:
        for target in range(shard_bytes, size, shard_bytes):
            if target > cuts[-1]:
                end = _line_end_at_or_after(raw, target - 1, size)
                if end >= size:
                    break
                cuts.append(end)
    cuts.append(size)
    return list(itertools.pairwise(cuts)) if len(cuts) > 2 else None


def _line_end_at_or_after(raw, offset: int, size: int) -> int:
    """The offset just after the first LF at or after `offset` (size when there is none)."""
    raw.seek(offset)
    while offset < size:
        piece = raw.read(SEEK_BYTES)
        found = piece.find(b"\n")
        if found >= 0:
            return offset + found + 1
        offset += len(piece)
    return size


def stage_shard(job: ShardJob, shard: tuple[int, int, int]) -> dict[str, Any]:
    """One shard on a worker: staged, judged by the rules of one record, written to Parquet.
    Returns its line counts; the rows are in `<work_dir>/shard-<n>/<table>.parquet`."""
    number, start, end = shard
    out = Path(job.work_dir) / f"shard-{number}"
    out.mkdir(parents=True, exist_ok=True)
    config = {"threads": 1, "memory_limit": job.memory_limit, "temp_directory": str(out / ".spill")}
    customers = job.source.tables[0]
    with duckdb.connect(config=config) as con:
        for table, file in job.catalogs.items():
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {table.split('.')[0]}")
            con.execute(f"CREATE TABLE {table} AS SELECT * FROM read_parquet($file)", {"file": file})
        staged = stage_and_judge(con, job.source, job.day, Path(job.path), (start, end), across_rows=False)
        for table in LINE_NUMBERED:
            con.execute(f"COPY {table} TO '{out / table}.parquet' (FORMAT parquet)")  # our own path
    return {"lines": staged.notes["physical_lines"], "records": staged.inputs[customers.name],
            "blank_lines": staged.notes["blank_lines"]}


def stage_in_shards(con: duckdb.DuckDBPyConnection, source: Source, path: Path, day: str,
                    ranges: list[tuple[int, int]], sharding: Sharding, catalogs: list[str]) -> Staged:
    """The file's shards staged on the engine, gathered into `con`'s temp tables as stage_customers
    and both validations would leave them; then the rules across records over the whole file.
    `catalogs`: the tables the rules look up, staged in `con` (copy_catalogs)."""
    work_dir = sharding.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    job = ShardJob(str(path), source, day, _export_catalogs(con, catalogs, work_dir), str(work_dir),
                   sharding.memory_limit)
    shards = [(number, start, end) for number, (start, end) in enumerate(ranges)]
    counts = [result for _, result in sharding.engine.ordered_map(stage_shard, shards, shared=job)]
    if sum(c["records"] for c in counts) == 0:
        raise LandingFileError(source.name, path, NO_RECORDS)
    before = list(itertools.accumulate((c["lines"] for c in counts), initial=0))
    for table, shift in LINE_NUMBERED.items():
        # Shard after shard, not one sort of the union: the shards are consecutive line ranges, so
        # appending them keeps the file's order, and a sort of 20M purchase items ran out of a
        # 439 MiB limit at 2M customers.
        for number, lines in enumerate(before[:-1]):
            moved = (f"SELECT * REPLACE (line_no + {lines} AS line_no"
                     + (f", row_id + {lines << shift}::BIGINT AS row_id" if shift is not None else "")
                     + f") FROM read_parquet('{work_dir / f'shard-{number}' / table}.parquet')")  # our own paths
            con.execute(f"CREATE OR REPLACE TEMP TABLE {table} AS {moved}" if number == 0
                        else f"INSERT INTO {table} {moved}")
    customers, items = source.tables
    for table in (t for t in source.tables if "line_no" in t.record_key):
        _rename_failures(con, table)
    validate_staged(con, customers, day, source.naive_timezone, across_rows=True)
    # items are staged only for customers that pass every rule: those failing across the file go
    for table in ("stg_customer_purchases", "failures_customer_purchases"):
        con.execute(f"DELETE FROM {table} WHERE line_no IN (SELECT line_no FROM failures_customers)")
    validate_staged(con, items, day, source.naive_timezone, across_rows=True)
    with open_text_bytes(source.name, path) as (stream, notes):
        line_ending = "CRLF" if b"\r\n" in stream.read(READ_BLOCK_BYTES) else "LF"
    notes.update(line_ending=line_ending, physical_lines=before[-1], shards=len(ranges),
                 shards_engine=sharding.engine.describe()["engine"],
                 blank_lines=sum(c["blank_lines"] for c in counts))
    return Staged({customers.name: sum(c["records"] for c in counts),
                   items.name: int(fetch_scalar(con, "SELECT count(*) FROM stg_customer_purchases"))}, notes)


def _rename_failures(con: duckdb.DuckDBPyConnection, table: RawTable) -> None:
    """A failure's record key again, from the moved line numbers (a record without an id is
    named by its line)."""
    con.execute(f"""CREATE OR REPLACE TEMP TABLE failures_{table.name} AS
        SELECT f.row_id, f.line_no, coalesce(k.record_key, f.record_key) AS record_key, f.rule, f.column_name,
               f.value
        FROM failures_{table.name} AS f LEFT JOIN (  -- LEFT: a failure is never dropped here
            SELECT row_id, {table.record_key} AS record_key FROM stg_{table.name}
            WHERE row_id IN (SELECT row_id FROM failures_{table.name})) AS k USING (row_id)
        ORDER BY f.row_id""")


def _export_catalogs(con: duckdb.DuckDBPyConnection, catalogs: list[str], work_dir: Path) -> dict[str, str]:
    """The staged copies of the tables the rules look up as Parquet files the workers read."""
    files = {}
    for table in catalogs:
        file = str(work_dir / f"{table}.parquet")
        con.execute(f"COPY memory.{table} TO '{file}' (FORMAT parquet)")  # names and paths from code
        files[table] = file
    return files
