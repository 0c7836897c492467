"""Idempotent, atomic daily ingestion: real DuckDB files in tmp dirs, real Dagster materializations."""

from __future__ import annotations

import collections
import shutil
from pathlib import Path

import dagster as dg
import pytest

from resources.landing import LandingFileError, LandingZone
from resources.warehouse import fetch_all, fetch_scalar
from assets.common.sources import CUSTOMERS, PRODUCTS, TRANSACTIONS
from assets.ingest import accounting, landing_files, raw_assets
from tests.ingestion_support import (
    RAW, check_results, day, generate_landing, materialization, materialize, raw_resources, snapshot,
)

ONLINE_RETAIL_DAYS = ["2010-12-01", "2010-12-20", "2011-08-12"]


@pytest.fixture(scope="module")
def landing(tmp_path_factory) -> Path:
    return generate_landing(tmp_path_factory.mktemp("landing"), customers=300, days=2)


@pytest.fixture
def own_landing(landing: Path, tmp_path: Path) -> Path:
    """A private copy, for tests that change files."""
    return Path(shutil.copytree(landing, tmp_path / "landing"))


def test_second_materialization_is_a_skip_and_tables_stay_identical(warehouse, landing):
    resources = raw_resources(warehouse, landing)
    first = materialize(resources, day(0))
    before = snapshot(warehouse)
    second = materialize(resources, day(0))
    assert snapshot(warehouse) == before
    for asset in ("raw_products", "raw_customers", "raw_transactions"):
        assert materialization(first, asset)["skipped"] is False
        assert materialization(second, asset)["skipped"] is True
        assert materialization(second, asset)["fingerprint"] == materialization(first, asset)["fingerprint"]
    assert all(e.passed for e in check_results(second).values())
    assert before["customers"] and before["customer_purchases"] and before["transactions"] and before["products"]


def test_force_rewrites_the_same_rows(warehouse, landing):
    resources = raw_resources(warehouse, landing)
    materialize(resources, day(0))
    before = snapshot(warehouse)
    forced = materialize(resources, day(0), force=True)
    assert materialization(forced, "raw_customers")["skipped"] is False
    assert snapshot(warehouse) == before


def test_a_changed_file_replaces_only_its_partition(warehouse, own_landing):
    resources = raw_resources(warehouse, own_landing)
    materialize(resources, day(0))
    materialize(resources, day(1))
    before = snapshot(warehouse)
    path = own_landing / "transactions" / f"{day(1)}.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:11]))  # the header and the first 10 order lines

    result = materialize(resources, day(1), assets=[RAW["raw_transactions"]])

    assert materialization(result, "raw_transactions")["input_records"] == 10
    after = snapshot(warehouse)
    with warehouse.connect(read_only=True) as con:
        per_day = dict(fetch_all(con, "SELECT partition_date::VARCHAR, count(*) FROM raw.transactions GROUP BY 1"))
    assert per_day[day(1)] == 10
    assert [r for r in after["transactions"] if str(r[0]) == day(0)] == \
           [r for r in before["transactions"] if str(r[0]) == day(0)]
    for table in ("customers", "customer_purchases", "products"):
        assert after[table] == before[table]


def test_an_error_between_delete_and_insert_leaves_the_old_rows(warehouse, own_landing, monkeypatch):
    resources = raw_resources(warehouse, own_landing)
    materialize(resources, day(0))
    before = snapshot(warehouse)
    path = own_landing / "customers" / f"{day(0)}.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:5]))

    def crash(*args, **kwargs):
        raise RuntimeError("disk full (injected between the delete and the insert)")

    monkeypatch.setattr(raw_assets, "insert_partition", crash)
    result = materialize(resources, day(0), assets=[RAW["raw_customers"]], raise_on_error=False)

    assert not result.success
    assert snapshot(warehouse) == before


@pytest.mark.parametrize("problem", ["missing", "empty", "unreadable"])
def test_a_missing_empty_or_unreadable_file_fails_naming_path_and_cause(warehouse, own_landing, problem):
    path = own_landing / "transactions" / f"{day(0)}.csv"
    path.unlink()
    if problem == "empty":
        path.write_bytes(b"")
    if problem == "unreadable":
        path.mkdir()  # a directory where the file should be (the tests run as root: chmod would not stop a read)
    result = materialize(raw_resources(warehouse, own_landing), day(0), assets=[RAW["raw_transactions"]],
                         raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    message = failure.step_failure_data.error.message
    cause = {"missing": "missing", "empty": "empty", "unreadable": "not a regular file"}[problem]
    assert str(path) in message and cause in message


def test_customers_wait_for_earlier_catalog_days_and_follow_catalog_changes(warehouse, own_landing):
    resources = raw_resources(warehouse, own_landing)
    early = dg.materialize([RAW["raw_customers"]], partition_key=day(1), resources=resources, raise_on_error=False,
                           run_config={"ops": {"raw_customers": {"config": {"catalog_wait_seconds": 0.5}}}})
    (failure,) = [e for e in early.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert "catalog" in failure.step_failure_data.error.message and day(0) in failure.step_failure_data.error.message
    retries = [e for e in early.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]
    assert len(retries) == 4  # it waited by step retries (0.5 s / 4 apart), never by sleeping in the step

    materialize(resources, day(0))
    first = materialize(resources, day(1))
    path = own_landing / "products" / f"{day(0)}.csv"
    path.write_text(path.read_text() + "99999,Late Lamp,\"A lamp, late\",Lighting,9.5,true\n")
    materialize(resources, day(0), assets=[RAW["raw_products"]])
    again = materialize(resources, day(1), assets=[RAW["raw_customers"]])
    assert materialization(first, "raw_customers")["skipped"] is False
    assert materialization(again, "raw_customers")["skipped"] is False  # the catalog up to the day changed


def test_customers_do_not_wait_for_catalog_files_of_days_before_the_first_partition(warehouse, own_landing):
    """A landing folder with history older than PIPELINE_FIRST_DAY (2010-12-01 in the tests): those days are no partition
    and never land, so waiting for them only ended in a failure after catalog_wait_seconds."""
    shutil.copy(own_landing / "products" / f"{day(0)}.csv", own_landing / "products" / "2010-11-30.csv")
    resources = raw_resources(warehouse, own_landing)
    materialize(resources, day(0), assets=[RAW["raw_products"]])
    result = dg.materialize([RAW["raw_customers"]], partition_key=day(0), resources=resources, raise_on_error=False,
                            run_config={"ops": {"raw_customers": {"config": {"catalog_wait_seconds": 0.5}}}})
    assert result.success
    assert not [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]


@pytest.mark.parametrize("asset", ["raw_customers", "raw_transactions"])
def test_an_alert_row_is_written_while_a_file_is_read_and_judged(warehouse, landing, monkeypatch, asset):
    """A file is parsed and judged with the warehouse detached (20M customers: 13 minutes); the
    exclusive lock is taken only to write the partition, so an alert is not queued behind it."""
    import dataclasses

    from tests.lock_support import Pause, alert_written_while

    resources = raw_resources(warehouse, landing)
    materialize(resources, day(0), assets=[RAW["raw_products"]])
    pause = Pause()
    readers = {name: dataclasses.replace(reader, stage=pause.before(reader.stage))
               for name, reader in landing_files.READERS.items()}
    monkeypatch.setattr(landing_files, "READERS", readers)
    result = alert_written_while(
        warehouse, lambda: materialize(resources, day(0), assets=[RAW[asset]], raise_on_error=False), pause,
        f"{asset} reads its file")
    assert result.success and materialization(result, asset)["valid_records"] > 0


def test_landing_zone_patterns_and_errors(tmp_path):
    zone = LandingZone(root=str(tmp_path), patterns={"transactions": "/elsewhere/by-day/{date}.csv"})
    assert zone.path("customers", "2011-09-01", CUSTOMERS.landing_pattern) == tmp_path / "customers" / "2011-09-01.jsonl"
    assert zone.path("transactions", "2011-09-01", TRANSACTIONS.landing_pattern) == Path("/elsewhere/by-day/2011-09-01.csv")
    with pytest.raises(LandingFileError, match="missing"):
        zone.require("products", "2011-09-01", PRODUCTS.landing_pattern)
    (tmp_path / "products").mkdir()
    for name in ("2011-09-02.csv", "2011-09-01.csv", "2011-09-03.csv", "notes.csv", "2011-09-01.csv.partial"):
        (tmp_path / "products" / name).write_text("x")
    assert zone.days_available("products", "2011-09-02", PRODUCTS.landing_pattern) == ["2011-09-01", "2011-09-02"]
    assert zone.days_available("products", None, PRODUCTS.landing_pattern, since="2011-09-02") == ["2011-09-02",
                                                                                                  "2011-09-03"]


def test_closed_days_are_configured_by_weekday_names_or_numbers_and_listed_days():
    from resources.landing import parse_days, parse_weekdays

    assert parse_weekdays("Sat") == parse_weekdays("saturday") == parse_weekdays("5") == [5]
    assert parse_weekdays(" sun, Sat ,") == [5, 6] and parse_weekdays("") == []
    for wrong in ("Sa", "Saturdays", "7", "weekend"):
        with pytest.raises(ValueError, match="not a day of the week"):
            parse_weekdays(wrong)
    assert parse_days("2011-12-26, 2011-12-25") == ["2011-12-25", "2011-12-26"]
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        parse_days("2011-12-25,25/12/2011")
    zone = LandingZone(closed_weekdays=[5], closed_days=["2011-12-26"])
    assert [zone.is_closed(day) for day in ("2011-09-02", "2011-09-03", "2011-12-26")] == [False, True, True]


def test_the_landing_last_day_sees_a_source_pointed_elsewhere(tmp_path, monkeypatch):
    """PIPELINE_LAST_DAY=landing (what `tasks.py ui` sets) with Online Retail's folder as the
    transactions pattern: the partitions end on its last file, not yesterday (years of empty,
    late partitions)."""
    from assets.common.partitions import last_day

    elsewhere = tmp_path / "by-day"
    elsewhere.mkdir()
    for name in ("2011-05-30.csv", "2011-05-31.csv", "notes.txt"):
        (elsewhere / name).write_text("x")
    monkeypatch.setenv("LANDING_DIR", str(tmp_path / "landing"))
    monkeypatch.setenv("LANDING_TRANSACTIONS_PATTERN", str(elsewhere / "{date}.csv"))
    assert last_day("landing") == "2011-05-31"
    (tmp_path / "landing" / "products").mkdir(parents=True)
    (tmp_path / "landing" / "products" / "2011-06-02.csv").write_text("x")
    assert last_day("landing") == "2011-06-02"
    (tmp_path / "landing" / "products" / "2011-06-09.csv.bak").write_text("x")  # no file ingestion reads
    assert last_day("landing") == "2011-06-02"


def test_line_numbers_count_blank_and_undecodable_lines(warehouse, tmp_path):
    """Quarantine line numbers are physical lines of the file, whatever comes before them."""
    (tmp_path / "customers").mkdir()
    (tmp_path / "customers" / "2011-09-01.jsonl").write_bytes(
        b'{"id":"6f1c2c1e-9a3b-4c1d-8e2f-0a1b2c3d4e5f","email":"a@b.com","purchaseHistory":[],'
        b'"createdAt":"2011-01-01T00:00:00.000Z"}\n'
        b"\n"
        b'{"id":"not-a-uuid","email":"x@y.com","purchaseHistory":[],"createdAt":"2011-01-01T00:00:00.000Z"}\n'
        b'{"id":"caf\xe9"}\n'
        b"   \n"
        b'{"id": oops}\n'
    )
    (tmp_path / "transactions").mkdir()
    (tmp_path / "transactions" / "2011-09-01.csv").write_bytes(
        b"InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
        b'536365,85123A,"HEART, WHITE",6,2011-09-01 08:26:00,2.55,17850.0,United Kingdom\n'
        b"\n"
        b"536366,22633,CAF\xe9 MUG,6,2011-09-01 08:28:00,1.85,,United Kingdom\n"
        b"536367,22634,MUG,six,2011-09-01 08:28:00,1.85,,United Kingdom\n"
        b"536368,22635,MUG,6,2011-09-01 08:28:00,1.85,,United Kingdom,extra\n"
        b"536369,22636,MUG,1,2011-09-01 08:29:00,0.0,12346.0,France\n"
    )
    resources = raw_resources(warehouse, tmp_path)
    materialize(resources, "2011-09-01", assets=[RAW["raw_customers"], RAW["raw_transactions"]])
    with warehouse.connect(read_only=True) as con:
        errors = fetch_all(con, "SELECT source, line_no, rule FROM ops.schema_errors ORDER BY source, line_no, rule")
        landed = fetch_all(con, "SELECT line_no, description, customer_id FROM raw.transactions ORDER BY line_no")
    assert errors == [
        ("customers", 3, "customer_id_not_a_uuid"),
        ("customers", 4, "bad_encoding"),
        ("customers", 6, "malformed_json"),
        ("transactions", 4, "bad_encoding"),
        ("transactions", 5, "quantity_not_an_integer"),
        ("transactions", 6, "wrong_column_count"),
    ]
    assert landed == [(2, "HEART, WHITE", "17850"), (7, "MUG", "12346")]


def test_online_retail_days_ingest_with_their_quirks(warehouse, online_retail_dir):
    zone = LandingZone(root=str(online_retail_dir), patterns={"transactions": "{date}.csv"})
    resources = raw_resources(warehouse, zone)
    for partition in ONLINE_RETAIL_DAYS:
        result = materialize(resources, partition, assets=[RAW["raw_transactions"]])
        checks = check_results(result)
        assert checks[("raw_transactions", "record_accounting")].passed
        meta = materialization(result, "raw_transactions")
        lines = (online_retail_dir / f"{partition}.csv").read_text().splitlines()[1:]
        copies = sum(n - 1 for n in collections.Counter(lines).values())
        assert meta["input_records"] == len(lines)
        assert meta["quarantined_by_rule"].get("duplicate_line", 0) == copies
    with warehouse.connect(read_only=True) as con:
        count = lambda sql: fetch_scalar(con, sql)  # noqa: E731
        assert count("SELECT count(*) FROM raw.transactions WHERE invoice_no LIKE 'C%' AND quantity < 0") > 0
        assert count("SELECT count(*) FROM raw.transactions WHERE customer_id IS NULL") > 0
        assert count("SELECT count(*) FROM raw.transactions WHERE unit_price = 0") > 0
        assert count("SELECT count(*) FROM raw.transactions WHERE stock_code IN ('POST', 'DOT', 'M', 'C2')") > 0
        assert count("SELECT count(*) FROM raw.transactions WHERE description LIKE '%£%'") > 0
        assert count("SELECT count(*) FROM raw.transactions WHERE customer_id LIKE '%.%'") == 0
        bad_debt = fetch_all(con, """SELECT e.value FROM ops.schema_errors AS e
            WHERE e.rule = 'unit_price_negative' AND e.raw_record LIKE 'A%Adjust bad debt%' ORDER BY 1""")
        kept_adjustment = count("SELECT count(*) FROM raw.transactions WHERE invoice_no = 'A563185'")
        others = count("""SELECT count(*) FROM ops.schema_errors
            WHERE rule NOT IN ('duplicate_line', 'unit_price_negative')""")
    assert bad_debt == [("-11062.06",), ("-11062.06",)] and kept_adjustment == 1
    assert others == 0


def land_transactions(warehouse, zone: LandingZone, partition: str) -> tuple[dg.ExecuteInProcessResult, dict]:
    """A run of raw_transactions for the day, and its materialization's metadata."""
    run = materialize(raw_resources(warehouse, zone), partition, assets=[RAW["raw_transactions"]])
    return run, materialization(run, "raw_transactions")


def zone_from_environment(monkeypatch, root: Path, **variables: str) -> LandingZone:
    """The landing zone the code location builds from LANDING_DIR and the given variables."""
    from resources import landing_zone

    monkeypatch.setenv("LANDING_DIR", str(root))
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return landing_zone(("transactions",))


def test_a_file_writing_us_dates_lands_with_the_timestamp_format_its_landing_zone_sets(
        warehouse, online_retail_dir, tmp_path, monkeypatch):
    """The Kaggle copy of Online Retail (and a CSV Excel saves from the UCI .xlsx) writes
    InvoiceDate as 6/1/2011 7:37. ISO 8601 only: every record is quarantined, said per record.
    LANDING_TRANSACTIONS_TIMESTAMP_FORMAT=%m/%d/%Y %H:%M: the same values as the ISO file, and a
    changed format lands the day again. A wrong one that still parses (day and month swapped)
    reads 2011-01-06: every line is quarantined as off its batch day, none lands on a wrong day."""
    import csv
    import datetime as dt

    partition = "2011-06-01"
    us_dates = tmp_path / "us" / "transactions" / f"{partition}.csv"
    us_dates.parent.mkdir(parents=True)
    with open(online_retail_dir / f"{partition}.csv", newline="", encoding="utf-8") as iso, \
            open(us_dates, "w", newline="", encoding="utf-8") as us:
        rows, writer = csv.reader(iso), csv.writer(us)
        writer.writerow(next(rows))
        for row in rows:
            when = dt.datetime.fromisoformat(row[4])
            writer.writerow([*row[:4], f"{when.month}/{when.day}/{when.year} {when.hour}:{when.minute:02d}", *row[5:]])
    iso_run, iso_only = land_transactions(warehouse, LandingZone(root=str(tmp_path / "us")), partition)
    assert iso_only["valid_records"] == 0 and set(iso_only["quarantined_by_rule"]) >= {"invoice_date_not_a_timestamp"}
    error_rate = check_results(iso_run)[("raw_transactions", "error_rate")]  # what to set, said where it fails
    assert not error_rate.passed and "most: invoice_date_not_a_timestamp (1456): timestamps that are not ISO 8601: " \
        "set LANDING_TRANSACTIONS_TIMESTAMP_FORMAT" in error_rate.description

    zone = zone_from_environment(monkeypatch, tmp_path / "us", LANDING_TRANSACTIONS_TIMESTAMP_FORMAT="%m/%d/%Y %H:%M")
    assert zone.timestamp_formats == {"transactions": "%m/%d/%Y %H:%M"}
    _, read = land_transactions(warehouse, zone, partition)
    assert not read["skipped"] and "invoice_date_not_a_timestamp" not in read["quarantined_by_rule"]
    assert read["valid_records"] > 0.99 * read["input_records"]
    with warehouse.connect(read_only=True) as con:
        landed = fetch_all(con, "SELECT invoice_no, stock_code, invoice_date FROM raw.transactions ORDER BY ALL")
    iso_warehouse = type(warehouse)(path=str(tmp_path / "iso.duckdb"), memory_limit="512MB")
    iso_zone = LandingZone(root=str(online_retail_dir), patterns={"transactions": "{date}.csv"})
    materialize(raw_resources(iso_warehouse, iso_zone), partition, assets=[RAW["raw_transactions"]])
    with iso_warehouse.connect(read_only=True) as con:
        assert landed == fetch_all(con, "SELECT invoice_no, stock_code, invoice_date FROM raw.transactions ORDER BY ALL")

    swapped = zone_from_environment(monkeypatch, tmp_path / "us", LANDING_TRANSACTIONS_TIMESTAMP_FORMAT="%d/%m/%Y %H:%M")
    misread_run, misread = land_transactions(warehouse, swapped, partition)
    assert "most: invoice_date_off_the_batch_day (1456): dates far from the file's day: is LANDING_TRANSACTIONS_" \
        "TIMESTAMP_FORMAT right" in check_results(misread_run)[("raw_transactions", "error_rate")].description
    assert not misread["skipped"] and misread["valid_records"] == 0  # a changed format lands the day again
    assert misread["quarantined_by_rule"]["invoice_date_off_the_batch_day"] == misread["input_records"]
    with warehouse.connect(read_only=True) as con:
        assert fetch_scalar(con, "SELECT count(*) FROM raw.transactions") == 0
        said = fetch_all(con, """SELECT column_name, value FROM ops.schema_errors
                                 WHERE rule = 'invoice_date_off_the_batch_day' ORDER BY line_no LIMIT 1""")
        assert said == [("invoice_date", "6/1/2011 7:37")]  # the value as the file wrote it
    for wrong in ("%m/%d/%Y'; DROP TABLE raw.transactions; --", "06/01/2011"):
        with pytest.raises(ValueError, match="not a strftime format"):
            zone_from_environment(monkeypatch, tmp_path / "us", LANDING_TRANSACTIONS_TIMESTAMP_FORMAT=wrong)


def test_a_latin_1_file_lands_as_its_utf8_copy_with_the_encoding_its_landing_zone_sets(
        warehouse, online_retail_dir, tmp_path, monkeypatch):
    """The Kaggle copy of Online Retail is Latin-1: read as UTF-8, its "£" lines are quarantined
    as bad_encoding (said per line, nothing lost). LANDING_TRANSACTIONS_ENCODING=latin-1: the day
    lands again (the encoding is in the fingerprint) with the rows of the UTF-8 file, "£" included."""
    partition = "2011-01-05"
    latin_1 = tmp_path / "latin-1" / "transactions" / f"{partition}.csv"
    latin_1.parent.mkdir(parents=True)
    latin_1.write_text((online_retail_dir / f"{partition}.csv").read_text(encoding="utf-8"), encoding="latin-1")
    _, as_utf8 = land_transactions(warehouse, LandingZone(root=str(tmp_path / "latin-1")), partition)
    assert as_utf8["quarantined_by_rule"]["bad_encoding"] == 2

    zone = zone_from_environment(monkeypatch, tmp_path / "latin-1", LANDING_TRANSACTIONS_ENCODING="latin-1")
    assert zone.encodings == {"transactions": "iso8859-1"}
    _, read = land_transactions(warehouse, zone, partition)
    assert not read["skipped"] and "bad_encoding" not in read["quarantined_by_rule"]
    assert read["valid_records"] == as_utf8["valid_records"] + 2
    rows = "SELECT * EXCLUDE (partition_date) FROM raw.transactions ORDER BY line_no"
    with warehouse.connect(read_only=True) as con:
        landed = fetch_all(con, rows)
    utf8_warehouse = type(warehouse)(path=str(tmp_path / "utf8.duckdb"), memory_limit="512MB")
    utf8_zone = LandingZone(root=str(online_retail_dir), patterns={"transactions": "{date}.csv"})
    materialize(raw_resources(utf8_warehouse, utf8_zone), partition, assets=[RAW["raw_transactions"]])
    with utf8_warehouse.connect(read_only=True) as con:
        assert landed == fetch_all(con, rows) and sum("£" in str(row) for row in landed) == 2
    for wrong in ("utf-16", "no-such-codec"):
        with pytest.raises(ValueError, match="encoding"):
            zone_from_environment(monkeypatch, tmp_path / "latin-1", LANDING_TRANSACTIONS_ENCODING=wrong)


def test_a_failed_error_rate_names_the_rule_that_took_the_most_records_and_what_to_set():
    """A whole file written another way than expected breaks one rule in most records: the failed
    check names it, and for the encoding and timestamp rules the setting to look at."""
    from assets.ingest.accounting import BatchCounts, TableCounts

    def error_rate(by_rule: dict[str, int], bad: int) -> dg.AssetCheckResult:
        counts = BatchCounts({"transactions": TableCounts(100, 100 - bad, bad, by_rule)}, bad)
        return next(r for r in accounting.check_results(TRANSACTIONS, counts, 0.05) if r.check_name == "error_rate")

    latin_1 = error_rate({"bad_encoding": 40, "duplicate_line": 2}, 42)
    assert not latin_1.passed and latin_1.description.endswith(
        "; most: bad_encoding (40): lines that are not UTF-8: if the files are Latin-1 or cp1252, "
        "set LANDING_TRANSACTIONS_ENCODING")
    assert error_rate({"unit_price_negative": 9}, 9).description.endswith("; most: unit_price_negative (9)")
    assert "most:" not in error_rate({"bad_encoding": 2}, 2).description  # within the rate: nothing to look at


def test_the_code_location_loads_the_ingestion_assets_checks_and_resources():
    from definitions import defs

    graph = defs.resolve_asset_graph()
    checks = {(key.asset_key.to_user_string(), key.name) for key in graph.asset_check_keys}
    for asset in ("raw_products", "raw_customers", "raw_transactions"):
        node = graph.get(dg.AssetKey(asset))
        assert node.partitions_def is not None and node.pools == {"duckdb"}
        assert {(asset, "record_accounting"), (asset, "error_rate")} <= checks
    assert {("raw_customers", "customers_expectation_suite"), ("raw_customers", "customer_purchases_expectation_suite"),
            ("raw_products", "products_expectation_suite"),
            ("raw_transactions", "transactions_expectation_suite")} <= checks
    assert {"warehouse", "landing", "alerts"} <= set(defs.resources)
