"""A JSON Lines or CSV landing file read and judged in shards gives what reading it whole gives: the
same staged rows, failures, unparseable lines and counts, whatever the shard size (CSV records
with line feeds in quoted fields across the cuts too); and the same landed partition through the
asset, in the step's threads (Ray workers: tests/test_compute_engine.py)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from assets.common.sources import SOURCES
from assets.ingest.file_shards import Sharding, shard_plan
from assets.ingest.raw_assets import catalog_tables, copy_catalogs, stage_file
from generator import FaultRates
from resources.compute_engine import ComputeEngine
from resources.warehouse import DuckDBWarehouse, fetch_all
from tests.ingestion_support import RAW, day, generate_landing, materialize, raw_resources, snapshot

CUSTOMERS = next(s for s in SOURCES if s.name == "customers")
TRANSACTIONS = next(s for s in SOURCES if s.name == "transactions")
PRODUCTS = next(s for s in SOURCES if s.name == "products")
STAGED_TABLES = ("stg_customers", "stg_customer_purchases", "failures_customers", "failures_customer_purchases",
                 "unparseable", "quarantined_lines")


@pytest.fixture(scope="module")
def landed_catalog(tmp_path_factory) -> tuple[DuckDBWarehouse, Path]:
    """Generated files with every fault, and a warehouse holding the day's product catalog."""
    root = tmp_path_factory.mktemp("shards")
    landing = generate_landing(root / "landing", customers=400, days=1, faults=FaultRates.uniform(0.02), seed=5)
    warehouse = DuckDBWarehouse(path=str(root / "warehouse.duckdb"), memory_limit="512MB")
    materialize(raw_resources(warehouse, landing), day(0), [RAW["raw_products"]])
    return warehouse, landing


def awkward_copy(landing: Path, out: Path) -> Path:
    """The generated customers file with CRLF endings, blank and whitespace lines, a line that is
    not JSON, one that is not UTF-8, and the first customer again near the end (a duplicate
    across shards), so that shard edges fall on every kind of line."""
    lines = (landing / "customers" / f"{day(0)}.jsonl").read_bytes().splitlines()
    lines[3:3] = [b"", b"   \t", b"{not json", b"\xff\xfe bad bytes", b"[1, 2]"]
    lines.insert(len(lines) - 2, lines[0])
    out.write_bytes(b"\r\n".join(lines) + b"\r\n")
    return out


def stage(warehouse: DuckDBWarehouse | None, path: Path, tmp_path: Path, shard_bytes: int,
          source=CUSTOMERS) -> tuple[dict, dict, dict]:
    """Staged tables (in file order), inputs and notes of the file read whole (0) or in shards."""
    engine = ComputeEngine(ingest_shard_mb=1)  # the step's threads: two shards at a time
    sharding = Sharding(engine, shard_bytes, tmp_path / f"work-{shard_bytes}", "256MiB") if shard_bytes else None
    tables = STAGED_TABLES if source is CUSTOMERS else \
        tuple(f"{kind}_{t.name}" for t in source.tables for kind in ("stg", "failures")) + ("unparseable",)
    with duckdb.connect() as con:
        if warehouse is not None:
            copy_catalogs(con, warehouse, source, SOURCES, day(0))
        staged = stage_file(con, source, day(0), path, sharding, catalog_tables(source, SOURCES))
        rows = {t: fetch_all(con, f"SELECT * FROM {t} ORDER BY ALL") for t in tables}
    return rows, staged.inputs, staged.notes


@pytest.mark.parametrize("shard_bytes", [200, 4_096, 50_000])
def test_a_file_in_shards_stages_and_judges_exactly_what_the_whole_file_gives(landed_catalog, tmp_path, shard_bytes):
    warehouse, landing = landed_catalog
    path = awkward_copy(landing, tmp_path / "customers.jsonl")
    ranges = shard_plan(CUSTOMERS, path, shard_bytes)
    assert ranges is not None and len(ranges) >= path.stat().st_size // (shard_bytes + 10_000)
    assert ranges[0][0] == 0 and ranges[-1][1] == path.stat().st_size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # no byte lost or read twice

    whole, whole_inputs, whole_notes = stage(warehouse, path, tmp_path, 0)
    sharded, inputs, notes = stage(warehouse, path, tmp_path, shard_bytes)
    for table in STAGED_TABLES:
        assert sharded[table] == whole[table], table
    assert inputs == whole_inputs
    assert {k: notes[k] for k in whole_notes} == whole_notes and notes["shards"] == len(ranges)
    assert whole_notes["line_ending"] == "CRLF"
    rules = {row[3] for row in whole["failures_customers"]}
    assert {"customer_id_duplicate", "email_invalid"} <= rules  # the duplicate was split from its twin
    assert {row[1] for row in whole["unparseable"]} >= {"malformed_json", "bad_encoding"}


@pytest.fixture(scope="module")
def csv_landing(tmp_path_factory) -> Path:
    """Generated CSV files with every fault: 200 products, about 1,300 order lines."""
    root = tmp_path_factory.mktemp("csv-shards")
    return generate_landing(root / "landing", customers=2_000, days=1, faults=FaultRates.uniform(0.02), seed=5,
                            returning_share=0.2)


def awkward_csv(landing: Path, source, out: Path, every: int = 5) -> Path:
    """A generated CSV file (with its faults) with CRLF endings, a record with line feeds, CRs,
    quotes and delimiters in a quoted field after every `every` lines (so that cuts fall inside
    records), one record longer than small shards, blank lines, a stray quote, an unterminated
    quote near the end, and no line ending at the end."""
    lines = (landing / source.name / f"{day(0)}.csv").read_bytes().splitlines()
    header, body = lines[0], lines[1:]
    for index in range(len(body) - 1, 0, -every):
        fields = next(csv.reader([body[index].decode("utf-8", "surrogateescape")]), [])
        if len(fields) > 2:
            fields[2] = 'line one\n\nline "three", with a comma\r\nand a CR\ralone'
            text = io.StringIO()
            csv.writer(text, lineterminator="").writerow(fields)
            body.insert(index, text.getvalue().encode("utf-8", "surrogateescape"))
        if index // every % 3 == 0:
            body.insert(index, b"")
    body.insert(len(body) // 2, b'1,2,"a field longer than a shard:' + b"\n,,,\r\n" * 200 + b'",4,5,6,7,8')
    body.insert(len(body) // 4, b'9,9,"a stray quote that swallows lines across cuts,9')
    body.insert(len(body) - 3, b'a,"never closed,' + b"x" * 50)
    out.write_bytes(b"\r\n".join([header, b"  ", *body]))
    return out


@pytest.mark.parametrize("source", [TRANSACTIONS, PRODUCTS], ids=lambda s: s.name)
@pytest.mark.parametrize("shard_bytes", [300, 4_096, 20_000])
def test_a_csv_file_in_shards_stages_exactly_what_the_whole_file_gives(csv_landing, tmp_path, source, shard_bytes):
    """Shards staged from their cut are staged again after the record the shard before ran on into."""
    path = awkward_csv(csv_landing, source, tmp_path / f"{source.name}.csv")
    ranges = shard_plan(source, path, shard_bytes)
    assert ranges is not None and ranges[0][0] == 0 and ranges[-1][1] == path.stat().st_size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert len(ranges) >= min(8, path.stat().st_size // (shard_bytes + 2_000))

    whole, whole_inputs, whole_notes = stage(None, path, tmp_path, 0, source)
    sharded, inputs, notes = stage(None, path, tmp_path, shard_bytes, source)
    for table in whole:
        assert sharded[table] == whole[table], table
    assert inputs == whole_inputs
    assert {k: notes[k] for k in whole_notes} == whole_notes and notes["shards"] == len(ranges)
    assert notes["shards_staged_again"] >= (1 if shard_bytes < 1_000 else 0)  # cuts fell inside records
    assert whole_notes["line_ending"] == "CRLF" and whole_notes["blank_lines"] > 2
    multi_line = [row for row in whole[f"stg_{source.name}"] if any("line one\n\nline" in str(v) for v in row)]
    assert len(multi_line) > 20
    assert {row[1] for row in whole["unparseable"]} >= {"wrong_column_count", "unbalanced_quote"}


@pytest.mark.parametrize("source", [TRANSACTIONS, PRODUCTS], ids=lambda s: s.name)
def test_a_csv_file_handed_to_duckdb_in_parts_stages_the_same(csv_landing, tmp_path, monkeypatch, source):
    """The parse hands its rows to DuckDB every SINK_ROWS (memory: a 137 MB file parsed whole
    peaked at 1.1-1.2 GB): in parts of 7 rows the staged tables, row ids and counts are the same."""
    import assets.ingest.landing_files as landing_files

    path = awkward_csv(csv_landing, source, tmp_path / f"{source.name}.csv")
    whole, inputs, notes = stage(None, path, tmp_path, 0, source)
    monkeypatch.setattr(landing_files, "SINK_ROWS", 7)
    parts, part_inputs, part_notes = stage(None, path, tmp_path, 0, source)
    assert parts == whole and part_inputs == inputs and part_notes == notes
    assert len(whole[f"stg_{source.name}"]) > 100


def test_a_real_online_retail_day_in_shards(tmp_path):
    """A real day of Online Retail (quoted descriptions with commas) in 8 KB shards."""
    from tests.conftest import ONLINE_RETAIL_DIR

    path = ONLINE_RETAIL_DIR / "2010-12-06.csv"
    if not path.exists():
        pytest.skip("the Online Retail copy in ../shared is not here")
    whole, whole_inputs, whole_notes = stage(None, path, tmp_path, 0, TRANSACTIONS)
    sharded, inputs, notes = stage(None, path, tmp_path, 8_192, TRANSACTIONS)
    assert sharded == whole and inputs == whole_inputs and notes["shards"] > 30
    assert {k: notes[k] for k in whole_notes} == whole_notes


def test_a_latin_1_file_whole_or_in_shards_stages_what_its_utf8_copy_stages(tmp_path):
    """A real day with "£" in gift-voucher descriptions, written in Latin-1 (as the Kaggle copy of
    Online Retail is): read as latin-1, whole and in 2 KB shards, it stages what the UTF-8 file
    stages; a cp1252 byte with no character (0x81) leaves its line undecodable, quarantined."""
    import dataclasses

    from tests.conftest import ONLINE_RETAIL_DIR

    original = ONLINE_RETAIL_DIR / "2011-01-05.csv"
    if not original.exists():
        pytest.skip("the Online Retail copy in ../shared is not here")
    text = original.read_text(encoding="utf-8")
    assert text.count("£") == 2
    utf8, latin_1 = tmp_path / "utf8.csv", tmp_path / "latin-1.csv"
    utf8.write_text(text, encoding="utf-8")
    latin_1.write_text(text, encoding="latin-1")
    expected, expected_inputs, _ = stage(None, utf8, tmp_path, 0, TRANSACTIONS)
    read_as_latin_1 = dataclasses.replace(TRANSACTIONS, encoding="iso8859-1")
    for shard_bytes in (0, 2_048):
        staged, inputs, notes = stage(None, latin_1, tmp_path, shard_bytes, read_as_latin_1)
        assert staged == expected and inputs == expected_inputs and notes.get("shards", 0) >= (20 if shard_bytes else 0)
    not_utf8, _, _ = stage(None, latin_1, tmp_path, 0, TRANSACTIONS)
    assert [row[1] for row in not_utf8["unparseable"]] == ["bad_encoding", "bad_encoding"]

    undefined = tmp_path / "cp1252.csv"
    undefined.write_bytes(latin_1.read_bytes().replace(b"\xa330.00", b"\x8130.00").replace(b"\xa3", b"\x80"))
    staged, _, _ = stage(None, undefined, tmp_path, 0, dataclasses.replace(TRANSACTIONS, encoding="cp1252"))
    assert [row[1] for row in staged["unparseable"]] == ["bad_encoding"] * text.count("£30.00")
    assert sum("€" in str(row) for row in staged["stg_transactions"]) == text.count("£") - text.count("£30.00")


@pytest.mark.parametrize("block_bytes", [97, 4_096])
def test_a_file_read_whole_stages_the_same_whatever_its_read_blocks(landed_catalog, tmp_path, monkeypatch,
                                                                      block_bytes):
    """JSON Lines are parsed as Arrow batches of one read block each (4 MiB: less memory than
    16 MiB at 2M customers): lines across block edges, blank, non-JSON and non-UTF-8 lines at
    every edge give the tables of one block."""
    import assets.ingest.landing_files as landing_files

    warehouse, landing = landed_catalog
    path = awkward_copy(landing, tmp_path / "customers.jsonl")
    one_block, inputs, notes = stage(warehouse, path, tmp_path, 0)
    assert path.stat().st_size < landing_files.JSON_BLOCK_BYTES  # the file is one block by default
    monkeypatch.setattr(landing_files, "JSON_BLOCK_BYTES", block_bytes)
    small_blocks, small_inputs, small_notes = stage(warehouse, path, tmp_path, 0)
    assert small_blocks == one_block and small_inputs == inputs and small_notes == notes


def test_what_is_not_cut(landed_catalog, tmp_path):
    """gzip, a CR-only file and a file smaller than a shard are read whole; a file that cannot be
    read fails as it does whole."""
    import gzip

    from resources.landing import LandingFileError

    _, landing = landed_catalog
    text = (landing / "customers" / f"{day(0)}.jsonl").read_bytes()
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(text))
    (tmp_path / "cr.jsonl").write_bytes(text.replace(b"\n", b"\r"))
    assert shard_plan(CUSTOMERS, tmp_path / "c.jsonl.gz", 1_000) is None
    assert shard_plan(CUSTOMERS, tmp_path / "cr.jsonl", 1_000) is None
    assert shard_plan(CUSTOMERS, landing / "customers" / f"{day(0)}.jsonl", 10 * len(text)) is None
    (tmp_path / "utf16.jsonl").write_bytes(b"\xff\xfe" + text.decode().encode("utf-16-le"))
    with pytest.raises(LandingFileError, match="UTF-16"):
        shard_plan(CUSTOMERS, tmp_path / "utf16.jsonl", 1_000)


def test_the_asset_lands_the_same_partition_from_shards_and_says_so(tmp_path):
    """ingest_shard_mb=1 on a 3.5 MB JSON Lines and a 2 MB CSV file: the landed rows, quarantine
    and counts equal the whole-file landing; the metadata names the shards; their files are gone."""
    landing = generate_landing(tmp_path / "landing", customers=4_000, days=1, faults=FaultRates.uniform(0.01),
                               returning_share=1.0, mean_daily_items=12)
    assert (landing / "customers" / f"{day(0)}.jsonl").stat().st_size > 3 << 20
    assert (landing / "transactions" / f"{day(0)}.csv").stat().st_size > 3 << 19
    whole = DuckDBWarehouse(path=str(tmp_path / "whole" / "warehouse.duckdb"), memory_limit="512MB")
    sharded = DuckDBWarehouse(path=str(tmp_path / "sharded" / "warehouse.duckdb"), memory_limit="512MB")
    assert materialize(raw_resources(whole, landing), day(0)).success
    resources = {**raw_resources(sharded, landing), "compute_engine": ComputeEngine(ingest_shard_mb=1)}
    result = materialize(resources, day(0))
    assert result.success
    assert snapshot(sharded) == snapshot(whole)
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey("raw_customers")]
    read_as = event.materialization.metadata["read_as"].value
    assert read_as["shards"] >= 3 and read_as["shards_engine"] == "threads"
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey("raw_transactions")]
    assert event.materialization.metadata["read_as"].value["shards"] >= 2
    assert not list((tmp_path / "sharded").glob(".shards-*"))


def test_gathering_the_shards_holds_little_memory(tmp_path):
    """The shards' rows are appended in file order, not sorted together: a sort of all the purchase
    items ran out of DuckDB's 439 MiB at 2M customers. Here 200k items in 17 MB of JSON Lines
    are gathered in a staging DuckDB of 32 MB (a sort of them failed at 32 MB, not at 48 MB)."""
    landing = generate_landing(tmp_path / "landing", customers=20_000, days=1, faults=FaultRates.uniform(0.001), seed=5)
    warehouse = DuckDBWarehouse(path=str(tmp_path / "warehouse.duckdb"), memory_limit="512MB")
    materialize(raw_resources(warehouse, landing), day(0), [RAW["raw_products"]])
    sharding = Sharding(ComputeEngine(ingest_shard_mb=1), 1 << 20, tmp_path / "work", "64MiB")
    with duckdb.connect(config={"memory_limit": "32MB", "temp_directory": str(tmp_path / "spill")}) as con:
        copy_catalogs(con, warehouse, CUSTOMERS, SOURCES, day(0))
        staged = stage_file(con, CUSTOMERS, day(0), landing / "customers" / f"{day(0)}.jsonl", sharding,
                            catalog_tables(CUSTOMERS, SOURCES))
        assert staged.notes["shards"] >= 16
        assert staged.inputs["customer_purchases"] > 190_000
        # appended in file order: a scan gives the row ids sorted, as the whole file's read does
        row_ids = [row_id for (row_id,) in fetch_all(con, "SELECT row_id FROM stg_customer_purchases")]
        assert row_ids == sorted(row_ids)
