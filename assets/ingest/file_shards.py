"""A large landing file (JSON Lines or CSV) read and judged in shards, on the compute engine's workers.

    ranges = shard_plan(source, path, shard_bytes)       # byte ranges of whole lines, or None
    staged = stage_in_shards(con, source, path, day, ranges, sharding, catalogs)

Each shard (a byte range that starts after a line feed and ends with one) is read, parsed and
judged by the rules that look at one record at a time, in a DuckDB of its own, on a worker of the
compute engine (threads in the step, or Ray workers); its staged rows, failures and unparseable
lines go to Parquet files. The step gathers them with each shard's line numbers (and row ids)
moved on by the shards before it, judges the rules across records (a duplicate id in the file)
over the whole file, and drops the purchase items of the customers that this pass quarantines.
The result is the file read whole, row for row (tests/test_file_shards.py).

CSV: a quoted field may hold line feeds, so a cut may fall inside a record. Every shard is staged
at once as if a record started at its cut, and reads its last record on past its end; then, in
file order, a shard whose first lines the shard before took (its last record ran on) is staged
again after them, in the step. Only the cuts inside a record cost a second read.

Only plain LF-terminated files are cut: a gzip stream cannot be entered in the middle, and a file
whose first block has no LF keeps the whole-file rules (a CR-only file). The first cut of a CSV
file comes after its header. On a cluster, the landing file and `work_dir` must be on storage
the workers see.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from assets.common.sources import RawTable, Source
from assets.ingest.landing_files import (
    NO_RECORDS,
    READ_BLOCK_BYTES,
    CsvHeader,
    CsvShard,
    Staged,
    offset_after_lines,
    open_text_bytes,
    read_csv_header,
    stage_and_judge,
)
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
COUNTED = "counted"  # a CSV row_id counts the file's well-formed records: moved by the shards' before


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
    header: CsvHeader | None = None  # a CSV file's, for the shards after the first


def shard_plan(source: Source, path: Path, shard_bytes: int) -> list[tuple[int, int]] | None:
    """Byte ranges of whole lines of about `shard_bytes` each, or None: read the file whole (a
    small, gzip or not LF-terminated file). A file that cannot be read (or a CSV header that
    cannot) raises here, as the whole-file read would."""
    if shard_bytes <= 0 or path.stat().st_size <= shard_bytes:
        return None
    with open_text_bytes(source.name, path, encoding=source.encoding) as (stream, notes):  # the start-of-file checks
        if notes["compression"] or b"\n" not in stream.read(READ_BLOCK_BYTES):
            return None
    # the shard at 0 holds a CSV file's header
    first_cut = offset_after_lines(path, 0, read_csv_header(source, path)[1]) if source.reader == "csv" else 0
    size, cuts = path.stat().st_size, [0]
    for target in range(shard_bytes, size, shard_bytes):
        if target > cuts[-1]:
            end = offset_after_lines(path, max(target, first_cut) - 1, 1)  # after the first LF from there
            if end >= size:
                break
            cuts.append(end)
    cuts.append(size)
    return list(itertools.pairwise(cuts)) if len(cuts) > 2 else None


def stage_shard(job: ShardJob, shard: tuple[int, ...]) -> dict[str, Any]:
    """One shard (number, start, end[, lines to skip]) on a worker: staged, judged by the rules of
    one record, written to Parquet. Returns its counts; the rows are in
    `<work_dir>/shard-<n>/<table>.parquet`."""
    number, start, end, *skip = shard
    skip = skip[0] if skip else 0
    out = Path(job.work_dir) / f"shard-{number}"
    out.mkdir(parents=True, exist_ok=True)
    config = {"threads": 1, "memory_limit": job.memory_limit, "temp_directory": str(out / ".spill")}
    first = job.source.tables[0]
    with duckdb.connect(config=config) as con:
        for table, file in job.catalogs.items():
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {table.split('.')[0]}")
            con.execute(f"CREATE TABLE {table} AS SELECT * FROM read_parquet($file)", {"file": file})
        piece = (start, end) if job.source.reader == "customer_jsonl" else \
            CsvShard(start, end, skip, job.header if start > 0 else None)
        staged = stage_and_judge(con, job.source, job.day, Path(job.path), piece, across_rows=False)
        for table in moved_tables(job.source):
            con.execute(f"COPY {table} TO '{out / table}.parquet' (FORMAT parquet)")  # our own path
        rows = fetch_scalar(con, f"SELECT count(*) FROM stg_{first.name}")
    lines = staged.notes.get("range_lines", staged.notes["physical_lines"])
    return {"lines": lines, "skip": skip, "end_line": staged.notes.get("end_line", lines),
            "records": staged.inputs[first.name], "rows": int(rows), "blank_lines": staged.notes["blank_lines"]}


def moved_tables(source: Source) -> dict[str, int | str | None]:
    """The tables a shard leaves, each with how its row_id moves: the bits below the line number
    (JSON Lines), COUNTED (CSV) or None (no row_id)."""
    if source.reader == "customer_jsonl":
        return LINE_NUMBERED
    return {f"stg_{source.tables[0].name}": COUNTED, f"failures_{source.tables[0].name}": COUNTED, "unparseable": None}


def stage_in_shards(con: duckdb.DuckDBPyConnection, source: Source, path: Path, day: str,
                    ranges: list[tuple[int, int]], sharding: Sharding, catalogs: list[str]) -> Staged:
    """The file's shards staged on the engine, gathered into `con`'s temp tables as the whole
    file's staging and validations would leave them; then the rules across records over the whole
    file. `catalogs`: the tables the rules look up, staged in `con` (copy_catalogs)."""
    work_dir = sharding.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    header = read_csv_header(source, path)[0] if source.reader == "csv" else None
    job = ShardJob(str(path), source, day, _export_catalogs(con, catalogs, work_dir), str(work_dir),
                   sharding.memory_limit, header)
    shards = [(number, start, end) for number, (start, end) in enumerate(ranges)]
    counts = [result for _, result in sharding.engine.ordered_map(stage_shard, shards, shared=job)]
    counts, staged_again = _aligned(job, shards, counts)
    if source.reader == "customer_jsonl" and sum(c["records"] for c in counts) == 0:
        raise LandingFileError(source.name, path, NO_RECORDS)  # a CSV file with a header may hold none
    _gather(con, source, work_dir, counts)
    first, *parts = source.tables
    for table in (t for t in source.tables if "line_no" in t.record_key):
        _rename_failures(con, table)
    validate_staged(con, first, day, source.naive_timezone, across_rows=True, timestamp_format=source.timestamp_format)
    for part in parts:  # parts are staged only for records that pass every rule: those failing across the file go
        for table in (f"stg_{part.name}", f"failures_{part.name}"):
            con.execute(f"DELETE FROM {table} WHERE line_no IN (SELECT line_no FROM failures_{first.name})")
        validate_staged(con, part, day, source.naive_timezone, across_rows=True, timestamp_format=source.timestamp_format)
    with open_text_bytes(source.name, path, encoding=source.encoding) as (stream, notes):
        line_ending = "CRLF" if b"\r\n" in stream.read(READ_BLOCK_BYTES) else "LF"
    notes.update(line_ending=line_ending, physical_lines=sum(c["lines"] for c in counts), shards=len(ranges),
                 shards_engine=sharding.engine.describe()["engine"],
                 blank_lines=sum(c["blank_lines"] for c in counts))
    if header is not None:
        notes.update(delimiter=header.delimiter, ignored_columns=header.ignored or None, shards_staged_again=staged_again)
    inputs = {first.name: sum(c["records"] for c in counts)}
    for part in parts:
        inputs[part.name] = int(fetch_scalar(con, f"SELECT count(*) FROM stg_{part.name}"))
    return Staged(inputs, notes)


def _aligned(job: ShardJob, shards: list[tuple[int, int, int]], counts: list[dict[str, Any]]
             ) -> tuple[list[dict[str, Any]], int]:
    """Each shard's records start where the shard before ended: a shard staged from its cut whose
    first lines the record before took (a quoted field across the cut: CSV only) is staged again
    after them, here in the step. Returns the counts and how many shards were staged again."""
    taken, again = 0, 0  # lines at the start of this shard that the shards before took
    for index, shard in enumerate(shards):
        if counts[index]["skip"] != taken:
            counts[index], again = stage_shard(job, (*shard, taken)), again + 1
        taken = counts[index]["end_line"] - counts[index]["lines"]
    return counts, again


def _gather(con: duckdb.DuckDBPyConnection, source: Source, work_dir: Path, counts: list[dict[str, Any]]) -> None:
    """The shards' tables into `con`'s temp tables, line numbers and row ids moved on by the shards
    before each."""
    lines_before = list(itertools.accumulate((c["lines"] for c in counts), initial=0))
    rows_before = list(itertools.accumulate((c["rows"] for c in counts), initial=0))
    for table, shift in moved_tables(source).items():
        # Shard after shard, not one sort of the union: the shards are consecutive line ranges, so
        # appending them keeps the file's order, and a sort of 20M purchase items ran out of a
        # 439 MiB limit at 2M customers.
        for number, (lines, rows) in enumerate(zip(lines_before, rows_before[:-1])):
            row_id = "" if shift is None else f", row_id + {rows if shift == COUNTED else lines << shift}::BIGINT AS row_id"
            moved = (f"SELECT * REPLACE (line_no + {lines} AS line_no{row_id}) "
                     f"FROM read_parquet('{work_dir / f'shard-{number}' / table}.parquet')")  # our own paths
            con.execute(f"CREATE OR REPLACE TEMP TABLE {table} AS {moved}" if number == 0
                        else f"INSERT INTO {table} {moved}")


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
