"""A JSON Lines landing file read and judged in shards gives what reading it whole gives: the same
staged rows, failures, unparseable lines and counts, whatever the shard size; and the same landed
partition through the asset, in the step's threads (Ray workers: tests/test_compute_engine.py)."""

from __future__ import annotations

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


def stage(warehouse: DuckDBWarehouse, path: Path, tmp_path: Path, shard_bytes: int) -> tuple[dict, dict, dict]:
    """Staged tables (sorted rows), inputs and notes of the file read whole (0) or in shards."""
    engine = ComputeEngine(ingest_shard_mb=1)  # the step's threads: two shards at a time
    sharding = Sharding(engine, shard_bytes, tmp_path / f"work-{shard_bytes}", "256MiB") if shard_bytes else None
    with duckdb.connect() as con:
        copy_catalogs(con, warehouse, CUSTOMERS, SOURCES, day(0))
        staged = stage_file(con, CUSTOMERS, day(0), path, sharding, catalog_tables(CUSTOMERS, SOURCES))
        tables = {t: fetch_all(con, f"SELECT * FROM {t} ORDER BY ALL") for t in STAGED_TABLES}
    return tables, staged.inputs, staged.notes


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
    """gzip, a CR-only file, a file smaller than a shard and CSV are read whole; a file that
    cannot be read fails as it does whole."""
    import gzip

    from resources.landing import LandingFileError

    _, landing = landed_catalog
    text = (landing / "customers" / f"{day(0)}.jsonl").read_bytes()
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(text))
    (tmp_path / "cr.jsonl").write_bytes(text.replace(b"\n", b"\r"))
    assert shard_plan(CUSTOMERS, tmp_path / "c.jsonl.gz", 1_000) is None
    assert shard_plan(CUSTOMERS, tmp_path / "cr.jsonl", 1_000) is None
    assert shard_plan(CUSTOMERS, landing / "customers" / f"{day(0)}.jsonl", 10 * len(text)) is None
    products = next(s for s in SOURCES if s.name == "products")
    assert shard_plan(products, landing / "products" / f"{day(0)}.csv", 100) is None
    (tmp_path / "utf16.jsonl").write_bytes(b"\xff\xfe" + text.decode().encode("utf-16-le"))
    with pytest.raises(LandingFileError, match="UTF-16"):
        shard_plan(CUSTOMERS, tmp_path / "utf16.jsonl", 1_000)


def test_the_asset_lands_the_same_partition_from_shards_and_says_so(tmp_path):
    """raw_customers with ingest_shard_mb=1 on a 3.5 MB file: the landed rows, quarantine and
    counts equal the whole-file landing; the metadata names the shards; the shards' files are gone."""
    landing = generate_landing(tmp_path / "landing", customers=4_000, days=1, faults=FaultRates.uniform(0.01))
    assert (landing / "customers" / f"{day(0)}.jsonl").stat().st_size > 3 << 20
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
