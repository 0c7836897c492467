"""Files as the world writes them (issue 11): one test per shape, with exact counts.

Small fixtures written to tmp dirs, real DuckDB files, real Dagster runs. Every run also checks
that input = valid + quarantined (the `record_accounting` check).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
import json
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from assets.common.sources import CUSTOMERS, PRODUCTS, TRANSACTIONS
from assets.ingest import build_ingestion_assets
from resources.landing import LandingZone
from resources.warehouse import fetch_all
from tests.ingestion_support import RAW, SUITE_CHECKS, check_results, materialization, raw_resources

DAY = "2011-09-01"
PRODUCTS_HEADER = "product_id,name,description,category,price,in_stock"
TRANSACTIONS_HEADER = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country"
CATALOG = (PRODUCTS_HEADER + "\nP1,Mug,A mug,Kitchen,2.5,true\nP2,Jar,A jar,Kitchen,3.0,true\n"
           "P3,Lamp,A lamp,Lighting,9.5,false\n").encode()


def uuid(i: int, upper: bool = False) -> str:
    text = f"{i:08x}-aaaa-4bbb-8ccc-ddddeeeeffff"
    return text.upper() if upper else text


def item(product: str = "P1", amount: Any = 10.0, date: str = "2011-08-01T10:00:00Z") -> dict:
    return {"productId": product, "amount": amount, "date": date}


def customer(i: int, email: str | None = None, items: list | None = None,
             created: str = "2011-01-01T00:00:00Z", **override: Any) -> dict:
    record = {"id": uuid(i), "email": email or f"user{i}@example.com",
              "purchaseHistory": [item()] if items is None else items, "createdAt": created}
    return {**record, **override}


def line_of(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def jsonl(records: list[dict], ending: str = "\n") -> bytes:
    return "".join(line_of(r) + ending for r in records).encode()


def order_line(invoice: str, code: str = "85123A", description: str = "MUG", quantity: str = "6",
               date: str = "2011-09-01 08:26:00", price: str = "2.55", customer_id: str = "17850.0",
               country: str = "United Kingdom") -> str:
    return ",".join([invoice, code, description, quantity, date, price, customer_id, country])


def write(root: Path, source: str, content: bytes, name: str | None = None) -> Path:
    extension = {"products": "csv", "customers": "jsonl", "transactions": "csv"}[source]
    path = root / source / (name or f"{DAY}.{extension}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def land(warehouse, root: Path, assets: list[str], patterns: dict[str, str] | None = None,
         asset_defs: list | None = None, suite_checks: bool = False, day: str = DAY) -> dg.ExecuteInProcessResult:
    run_config = None
    if "raw_customers" in assets:
        if not any((root / "products").glob(f"{DAY}.csv*")):
            write(root, "products", CATALOG)
        assets = list(dict.fromkeys(["raw_products", *assets]))
        run_config = {"ops": {"raw_customers": {"config": {"catalog_wait_seconds": 1.0}}}}
    selected = asset_defs or [RAW[a] for a in assets]
    selected = [*selected, *(SUITE_CHECKS if suite_checks else [])]
    zone = LandingZone(root=str(root), patterns=patterns or {})
    return dg.materialize(selected, partition_key=day, resources=raw_resources(warehouse, zone), raise_on_error=False,
                          run_config=run_config)


def counts(result: dg.ExecuteInProcessResult, asset: str, table: str | None = None) -> tuple[int, int, int]:
    """(input, valid, quarantined) of an asset's batch (or of a part table), and accounting holds."""
    assert check_results(result)[(asset, "record_accounting")].passed
    meta = materialization(result, asset)
    prefix = f"{table}." if table else ""
    return meta[f"{prefix}input_records"], meta[f"{prefix}valid_records"], meta[f"{prefix}quarantined_records"]


def errors(warehouse, source: str | None = None) -> list[tuple]:
    with warehouse.connect(read_only=True) as con:
        return fetch_all(con, "SELECT source, table_name, line_no, rule FROM ops.schema_errors"
                              " WHERE source = coalesce(?, source) ORDER BY ALL", [source])


def query(warehouse, sql: str, params: list | None = None) -> list[tuple]:
    with warehouse.connect(read_only=True) as con:
        return fetch_all(con, sql, params)


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    return failure.step_failure_data.error.message


# -- line endings --------------------------------------------------------------------------------

@pytest.mark.parametrize("ending", ["\r\n", "\r"], ids=["crlf", "lone_cr"])
def test_crlf_and_cr_files_of_each_source_land_like_lf_files(warehouse, tmp_path, ending):
    write(tmp_path, "products", CATALOG.decode().replace("\n", ending).encode())
    write(tmp_path, "customers", jsonl([customer(1), customer(2, items=[item(), item("P2")]), customer(3)], ending))
    lines = [TRANSACTIONS_HEADER, order_line("536365"), order_line("536366"), order_line("536367", country="France")]
    write(tmp_path, "transactions", (ending.join(lines) + ending).encode())

    result = land(warehouse, tmp_path, ["raw_customers", "raw_transactions"])

    assert result.success
    assert counts(result, "raw_products") == (3, 3, 0)
    assert counts(result, "raw_customers") == (3, 3, 0)
    assert counts(result, "raw_customers", "customer_purchases") == (4, 4, 0)
    assert counts(result, "raw_transactions") == (3, 3, 0)
    assert errors(warehouse) == []
    assert query(warehouse, "SELECT line_no, in_stock FROM raw.products ORDER BY 1") == [(2, True), (3, True), (4, False)]
    assert query(warehouse, "SELECT line_no, country FROM raw.transactions ORDER BY 1") == [
        (2, "United Kingdom"), (3, "United Kingdom"), (4, "France")]
    assert query(warehouse, "SELECT line_no FROM raw.customers ORDER BY 1") == [(1,), (2,), (3,)]
    assert materialization(result, "raw_transactions")["read_as"]["line_ending"] == ("CRLF" if ending == "\r\n" else "CR")


def test_a_cr_inside_a_field_is_data(warehouse, tmp_path):
    write(tmp_path, "transactions", "\n".join([
        TRANSACTIONS_HEADER, order_line("536365", description='"WHITE\rMUG"'), order_line("536366", description="RED\rMUG"),
        order_line("536367")]).encode() + b"\n")
    write(tmp_path, "customers", (line_of(customer(1)).replace(',"email"', ',\r"email"') + "\n"  # JSON whitespace
                                  + line_of(customer(2)).replace("user2@", "user\r2@") + "\n"  # not JSON: a raw CR in a string
                                  + line_of(customer(3)) + "\n").encode())

    result = land(warehouse, tmp_path, ["raw_customers", "raw_transactions"])

    assert counts(result, "raw_transactions") == (3, 3, 0)
    assert query(warehouse, "SELECT line_no, description FROM raw.transactions ORDER BY 1") == [
        (2, "WHITE\rMUG"), (3, "RED\rMUG"), (4, "MUG")]
    assert counts(result, "raw_customers") == (3, 2, 1)
    assert errors(warehouse, "customers") == [("customers", "customers", 2, "malformed_json")]


# -- records ---------------------------------------------------------------------------------------

def test_a_quoted_field_spanning_lines_is_one_record_at_its_first_line(warehouse, tmp_path):
    write(tmp_path, "transactions", "\n".join([
        TRANSACTIONS_HEADER,
        order_line("536365"),
        order_line("536366", description='"HEART, WHITE\nHOLDER ""LARGE"""'),
        order_line("536367"),
        order_line("536368", quantity="six"),
    ]).encode() + b"\n")

    result = land(warehouse, tmp_path, ["raw_transactions"])

    assert counts(result, "raw_transactions") == (4, 3, 1)
    assert query(warehouse, "SELECT line_no, description FROM raw.transactions ORDER BY 1") == [
        (2, "MUG"), (3, 'HEART, WHITE\nHOLDER "LARGE"'), (5, "MUG")]
    assert errors(warehouse) == [("transactions", "transactions", 6, "quantity_not_an_integer")]


@pytest.mark.parametrize("block_bytes", [150, 1_000, None])  # None: the default READ_BLOCK_BYTES
def test_a_stray_quote_refuses_its_own_line_and_the_lines_it_swallowed_are_read_as_records(
        tmp_path, monkeypatch, block_bytes):
    """An opening quote that is never closed, or closed by a stray one lines later, made one record
    of every line up to it: 90 of 101 lines disappeared into one quarantined record (or into one
    description, when the fields happened to add up), and the error rate counted one bad record
    (found by an outside-in probe). Now its own line is `unbalanced_quote` and the others land;
    a real quoted line end still makes one record."""
    import duckdb

    import assets.ingest.landing_files as landing_files
    from assets.ingest.landing_files import stage_csv

    if block_bytes is not None:
        monkeypatch.setattr(landing_files, "READ_BLOCK_BYTES", block_bytes)
    rows = [TRANSACTIONS_HEADER] + [order_line(str(536400 + n)) for n in range(2, 41)]  # lines 2..40
    rows[4] = order_line("536404", description='"HEART')  # opened, closed by the stray quote on line 12
    rows[11] = order_line("536411", description='MUG 7"')  # a literal quote, alone
    rows[19] = order_line("536419", description='"TRAY, BREAKFAST\nIN BED"')  # a real line end: lines 20-21
    rows[29] = order_line("536429", description='"LANTERN')  # never closed: runs to the end of the file
    path = tmp_path / "orders.csv"
    path.write_bytes("\n".join(rows).encode() + b"\n")  # 41 physical lines
    with duckdb.connect() as con:
        staged = stage_csv(con, path, TRANSACTIONS)
        refused = con.execute("SELECT line_no, rule FROM unparseable ORDER BY 1").fetchall()
        kept = dict(con.execute("SELECT line_no, description FROM stg_transactions ORDER BY 1").fetchall())
    assert refused == [(5, "unbalanced_quote"), (31, "unbalanced_quote")]
    assert sorted(kept) == [n for n in range(2, 42) if n not in (5, 21, 31)]  # 21: the end of line 20's record
    assert kept[12] == 'MUG 7"' and kept[20] == "TRAY, BREAKFAST\nIN BED" and kept[32] == "MUG"
    assert staged.inputs["transactions"] == len(kept) + len(refused) == 39


def test_lines_that_land_as_the_same_values_are_duplicates_and_the_suite_check_agrees(warehouse, tmp_path):
    """The quarantine judged `duplicate_line` on the text as written, so `17850.0` and `17850`,
    `6` and `6.0`, `08:26:00` and `T08:26:00` landed twice, and the GX check on the landed rows
    then failed at ERROR on a batch nothing could fix (found by an outside-in probe). Values that
    do not land (two different bad quantities) stay two values."""
    lines = [order_line("536365"), order_line("536365", customer_id="17850"),
             order_line("536366"), order_line("536366", quantity="6.0", price="2.550"),
             order_line("536367"), order_line("536367", description='"MUG"', date="2011-09-01T08:26:00"),
             order_line("536368", quantity="six"), order_line("536368", quantity="seven")]
    lines += [order_line(str(539900 + n), code=f"22{n:03d}") for n in range(120)]  # an error rate under 5 %
    write(tmp_path, "transactions", "\n".join([TRANSACTIONS_HEADER, *lines]).encode() + b"\n")

    result = land(warehouse, tmp_path, ["raw_transactions"], suite_checks=True)

    assert counts(result, "raw_transactions") == (128, 123, 5)
    assert errors(warehouse) == [("transactions", "transactions", n, rule) for n, rule in [
        (3, "duplicate_line"), (5, "duplicate_line"), (7, "duplicate_line"),
        (8, "quantity_not_an_integer"), (9, "quantity_not_an_integer")]]
    assert query(warehouse, "SELECT count(*) FROM (SELECT DISTINCT * EXCLUDE (line_no) FROM raw.transactions)") == [(123,)]
    assert check_results(result)[("raw_transactions", "transactions_expectation_suite")].passed


def test_blank_and_whitespace_only_lines_are_not_records(warehouse, tmp_path):
    write(tmp_path, "transactions", "\n".join([
        "", TRANSACTIONS_HEADER, order_line("536365"), "", "   ", order_line("536366"), "\t", order_line("536367"),
        "", " "]).encode() + b"\n")
    write(tmp_path, "customers", b"\n" + jsonl([customer(1)]) + b"  \n\n" + jsonl([customer(2), customer(3)]) + b"\t\n")

    result = land(warehouse, tmp_path, ["raw_customers", "raw_transactions"])

    assert counts(result, "raw_transactions") == (3, 3, 0)
    assert counts(result, "raw_customers") == (3, 3, 0)
    assert errors(warehouse) == []
    assert query(warehouse, "SELECT line_no FROM raw.transactions ORDER BY 1") == [(3,), (6,), (8,)]
    assert query(warehouse, "SELECT line_no FROM raw.customers ORDER BY 1") == [(2,), (5,), (6,)]
    assert materialization(result, "raw_transactions")["read_as"]["blank_lines"] == 6


def test_columns_are_matched_by_name_in_any_order_and_extra_ones_are_noted(warehouse, tmp_path):
    header = "Country,CustomerID,UnitPrice,InvoiceDate,Quantity,Description,StockCode,InvoiceNo,Notes"
    write(tmp_path, "transactions", "\n".join([
        header,
        "France,12346.0,1.85,2011-09-01 08:28:00,4,MUG,22633,536366,gift wrap",
        "France,12346.0,1.85,2011-09-01 08:28:00,four,JAR,22634,536367,fragile",
    ]).encode() + b"\n")

    result = land(warehouse, tmp_path, ["raw_transactions"])

    assert counts(result, "raw_transactions") == (2, 1, 1)
    assert query(warehouse, "SELECT invoice_no, stock_code, description, quantity, unit_price, customer_id, country"
                            " FROM raw.transactions") == [("536366", "22633", "MUG", 4, 1.85, "12346", "France")]
    assert materialization(result, "raw_transactions")["read_as"]["ignored_columns"] == ["Notes"]
    assert query(warehouse, "SELECT raw_record FROM ops.schema_errors") == [
        ("France,12346.0,1.85,2011-09-01 08:28:00,four,JAR,22634,536367,fragile",)]


def test_a_missing_column_fails_the_partition_naming_it(warehouse, tmp_path):
    path = write(tmp_path, "transactions", b"InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID\n"
                                           b"536365,85123A,MUG,6,2011-09-01 08:26:00,2.55,17850.0\n")
    message = failure_message(land(warehouse, tmp_path, ["raw_transactions"]))
    assert str(path) in message and "missing column(s) Country" in message


def test_a_quoted_header_with_stray_whitespace_is_read(warehouse, tmp_path):
    header = ' "InvoiceNo", "StockCode" ,Description , "Quantity",InvoiceDate,UnitPrice,  CustomerID,"Country" '
    write(tmp_path, "transactions", f"{header}\n{order_line('536365')}\n{order_line('536366')}\n".encode())
    result = land(warehouse, tmp_path, ["raw_transactions"])
    assert counts(result, "raw_transactions") == (2, 2, 0)


def test_a_semicolon_delimited_file_is_read(warehouse, tmp_path):
    write(tmp_path, "transactions", (TRANSACTIONS_HEADER.replace(",", ";") + "\n"
                                     + order_line("536365").replace(",", ";") + "\n").encode())
    result = land(warehouse, tmp_path, ["raw_transactions"])
    assert counts(result, "raw_transactions") == (1, 1, 0)


def test_a_utf8_bom_is_not_part_of_the_first_field(warehouse, tmp_path):
    write(tmp_path, "products", b"\xef\xbb\xbf" + CATALOG)
    write(tmp_path, "customers", b"\xef\xbb\xbf" + jsonl([customer(1), customer(2)]))
    result = land(warehouse, tmp_path, ["raw_customers"])
    assert counts(result, "raw_products") == (3, 3, 0)
    assert counts(result, "raw_customers") == (2, 2, 0)
    assert materialization(result, "raw_customers")["read_as"]["bom"] is True


# -- compression -----------------------------------------------------------------------------------

def test_gzip_input_is_read_when_the_name_says_so(warehouse, tmp_path):
    write(tmp_path, "products", gzip.compress(CATALOG), name=f"{DAY}.csv.gz")
    write(tmp_path, "customers", gzip.compress(jsonl([customer(1), customer(2, email="bad")])), name=f"{DAY}.jsonl.gz")
    patterns = {"products": "products/{date}.csv.gz", "customers": "customers/{date}.jsonl.gz"}
    result = land(warehouse, tmp_path, ["raw_products", "raw_customers"], patterns=patterns)
    assert counts(result, "raw_products") == (3, 3, 0)
    assert counts(result, "raw_customers") == (2, 1, 1)
    assert query(warehouse, "SELECT line_no, raw_record FROM ops.schema_errors") == [(2, line_of(customer(2, email="bad")))]
    assert materialization(result, "raw_customers")["read_as"]["compression"] == "gzip"


@pytest.mark.parametrize("name, content, cause", [
    (f"{DAY}.csv.gz", CATALOG, "named .gz but not gzip-compressed"),
    (f"{DAY}.csv", gzip.compress(CATALOG), "gzip-compressed, but its name does not end in .gz"),
    (f"{DAY}.csv.gz", gzip.compress(CATALOG)[:40], "corrupt or truncated gzip data"),
], ids=["fake_gzip", "unnamed_gzip", "truncated_gzip"])
def test_bytes_that_are_not_what_the_name_says_fail_with_path_and_cause(warehouse, tmp_path, name, content, cause):
    path = write(tmp_path, "products", content, name=name)
    message = failure_message(land(warehouse, tmp_path, ["raw_products"], patterns={"products": f"products/{name}"}))
    assert str(path) in message and cause in message


@pytest.mark.parametrize("content, cause", [
    (b"  \n\t\n \r\n", "only whitespace"),
    ("product_id,name\n".encode("utf-16"), "UTF-16"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "PNG image"),
    (b"PK\x03\x04\x14\x00\x06\x00", "ZIP archive"),
], ids=["whitespace_only", "utf16", "png", "xlsx"])
def test_a_file_that_is_not_a_utf8_table_fails_with_path_and_cause(warehouse, tmp_path, content, cause):
    path = write(tmp_path, "products", content)
    message = failure_message(land(warehouse, tmp_path, ["raw_products"]))
    assert any(str(path) in line and cause in line for line in message.splitlines())  # path and cause in one line


def test_binary_junk_lines_are_quarantined_and_the_batch_lands(warehouse, tmp_path):
    write(tmp_path, "customers", jsonl([customer(1)]) + b"\x00\x01\xff\xfe garbage \x80\x81\n"
          + b"\x1f\x8b\x08\x00 gzip-looking junk\n" + jsonl([customer(2)]) + b"\x00\x00\x00\n")
    result = land(warehouse, tmp_path, ["raw_customers"])
    assert counts(result, "raw_customers") == (5, 2, 3)
    assert errors(warehouse, "customers") == [("customers", "customers", 2, "bad_encoding"),
                                              ("customers", "customers", 3, "bad_encoding"),
                                              ("customers", "customers", 5, "malformed_json")]


# -- types -----------------------------------------------------------------------------------------

def test_amounts_must_be_json_numbers(warehouse, tmp_path):
    items = [item(amount=12.5), item(amount="12.5"), item(amount=True), item(amount="1e2"), item(amount=1e2),
             item(amount=-3), item(amount=None)]
    write(tmp_path, "customers", jsonl([customer(1, items=items)]))
    result = land(warehouse, tmp_path, ["raw_customers"])
    assert counts(result, "raw_customers", "customer_purchases") == (7, 2, 5)
    assert query(warehouse, "SELECT item_no, amount FROM raw.customer_purchases ORDER BY 1") == [(0, 12.5), (4, 100.0)]
    assert query(warehouse, "SELECT record_key, rule, value FROM ops.schema_errors ORDER BY 1") == [
        (f"{uuid(1)}#1", "amount_not_a_number", '"12.5"'), (f"{uuid(1)}#2", "amount_not_a_number", "true"),
        (f"{uuid(1)}#3", "amount_not_a_number", '"1e2"'), (f"{uuid(1)}#5", "amount_negative", "-3"),
        (f"{uuid(1)}#6", "amount_missing", None)]


def test_a_source_may_allow_numeric_strings(warehouse, tmp_path):
    lenient = dataclasses.replace(CUSTOMERS, numeric_strings=True)
    assets = {a.key.to_user_string(): a for a in build_ingestion_assets((PRODUCTS, lenient, TRANSACTIONS))}
    write(tmp_path, "customers", jsonl([customer(1, items=[item(amount="12.5"), item(amount="abc"), item(amount=True),
                                                           item(amount=" 7 ")])]))
    write(tmp_path, "products", CATALOG)
    result = land(warehouse, tmp_path, ["raw_products", "raw_customers"],
                  asset_defs=[assets["raw_products"], assets["raw_customers"]])
    assert counts(result, "raw_customers", "customer_purchases") == (4, 2, 2)
    assert query(warehouse, "SELECT item_no, amount FROM raw.customer_purchases ORDER BY 1") == [(0, 12.5), (3, 7.0)]


def test_timestamps_with_offsets_land_as_the_same_instant_in_utc(warehouse, tmp_path):
    created = ["2011-01-01T10:00:00+05:30", "2011-01-01T10:00:00-08:00", "2011-01-01T10:00:00Z",
               "2011-01-01T10:00:00.250+0530", "2011-01-01 10:00:00", "2011-01-01T10:00:00+05"]
    dates = ["2011-08-01T23:30:00-01:00", "2011-08-01T00:15:00+02:00"]
    write(tmp_path, "customers", jsonl([customer(i, created=c, items=[item(date=d) for d in dates])
                                        for i, c in enumerate(created, start=1)]))
    result = land(warehouse, tmp_path, ["raw_customers"])
    assert counts(result, "raw_customers") == (6, 6, 0)
    assert [r[0] for r in query(warehouse, "SELECT created_at FROM raw.customers ORDER BY line_no")] == [
        dt.datetime(2011, 1, 1, 4, 30), dt.datetime(2011, 1, 1, 18, 0), dt.datetime(2011, 1, 1, 10, 0),
        dt.datetime(2011, 1, 1, 4, 30, 0, 250000), dt.datetime(2011, 1, 1, 10, 0), dt.datetime(2011, 1, 1, 5, 0)]
    assert query(warehouse, "SELECT DISTINCT purchased_at FROM raw.customer_purchases ORDER BY 1") == [
        (dt.datetime(2011, 7, 31, 22, 15),), (dt.datetime(2011, 8, 2, 0, 30),)]


def test_an_account_or_purchase_after_the_files_day_is_quarantined(warehouse, tmp_path):
    """The customers of 2011-09-01 cannot hold an account or a purchase of 2011-09-04 (a wrong
    clock or a misread date); up to two days after, in UTC, they can (time zones, late files)."""
    write(tmp_path, "customers", jsonl([
        customer(1, created="2011-09-02T23:00:00-10:00", items=[item(date="2011-09-03T12:00:00+14:00")]),
        customer(2, created="2011-09-04T00:00:00Z"),
        customer(3, items=[item(date="2011-09-01T10:00:00Z"), item(date="2012-09-01T10:00:00Z")]),
    ]))
    result = land(warehouse, tmp_path, ["raw_customers"])
    # customer 2 is quarantined with its purchase; customer 3 stays, without its purchase of 2012
    assert counts(result, "raw_customers") == (3, 2, 1)
    assert counts(result, "raw_customers", "customer_purchases") == (3, 2, 1)
    assert sorted(r[1:] for r in errors(warehouse, "customers")) == [
        ("customer_purchases", 3, "purchased_at_after_the_batch_day"), ("customers", 2, "created_at_after_the_batch_day")]


def test_invalid_clock_values_are_quarantined(warehouse, tmp_path):
    bad = ["2011-01-01T24:00:00Z", "2011-01-01T10:00:00+25:00", "2011-01-01T10:00:00 Z", "2011-02-30T10:00:00Z",
           "2011-01-01T10:60:00Z", "01/01/2011 10:00", "2011-01-01T10:00:00+05:30:00"]
    write(tmp_path, "customers", jsonl([customer(i, created=c) for i, c in enumerate(bad, start=1)] + [customer(99)]))
    result = land(warehouse, tmp_path, ["raw_customers"])
    assert counts(result, "raw_customers") == (8, 1, 7)
    assert {r[3] for r in errors(warehouse, "customers")} == {"created_at_not_a_timestamp"}


def test_naive_timestamps_take_the_source_timezone(warehouse, tmp_path):
    london = dataclasses.replace(TRANSACTIONS, naive_timezone="Europe/London")
    (asset,) = [a for a in build_ingestion_assets((PRODUCTS, CUSTOMERS, london)) if a.key.to_user_string() == "raw_transactions"]
    """Summer time on a July day, Greenwich time on a January day; an offset is kept."""
    for day, lines in (("2011-07-01", [order_line("536365", date="2011-07-01 10:00:00"),
                                       order_line("536367", date="2011-07-01T10:00:00Z")]),
                       ("2011-01-10", [order_line("536366", date="2011-01-10 10:00:00")])):
        write(tmp_path, "transactions", "\n".join([TRANSACTIONS_HEADER, *lines]).encode(), name=f"{day}.csv")
        result = land(warehouse, tmp_path, ["raw_transactions"], asset_defs=[asset], day=day)
        assert counts(result, "raw_transactions") == (len(lines), len(lines), 0)
    assert query(warehouse, "SELECT invoice_date FROM raw.transactions ORDER BY invoice_no") == [
        (dt.datetime(2011, 7, 1, 9, 0),), (dt.datetime(2011, 1, 10, 10, 0),), (dt.datetime(2011, 7, 1, 10, 0),)]


VALID_EMAILS = ["o'brien@example.com", "a.b+c@sub.example.co.uk", "user@bücher.de", "user@xn--bcher-kva.de",
                "UPPER@EXAMPLE.COM", "x@a-b.io", "l" * 64 + "@example.com"]
INVALID_EMAILS = {".user@example.com": "email_invalid", "user.@example.com": "email_invalid",
                  "us..er@example.com": "email_invalid", "user@-example.com": "email_invalid",
                  "user@example-.com": "email_invalid", "user@example": "email_invalid",
                  "user @example.com": "email_invalid", "user@@example.com": "email_invalid",
                  "l" * 65 + "@example.com": "email_too_long",
                  "user@" + ".".join(c * 62 for c in "defg") + ".com": "email_too_long",  # 260 characters
                  "m" * 1_000_000 + "@example.com": "email_too_long"}


def test_emails_follow_the_documented_practical_rule(warehouse, tmp_path):
    emails = VALID_EMAILS + list(INVALID_EMAILS)
    write(tmp_path, "customers", jsonl([customer(i, email=e) for i, e in enumerate(emails, start=1)]))
    result = land(warehouse, tmp_path, ["raw_customers"])
    assert counts(result, "raw_customers") == (len(emails), len(VALID_EMAILS), len(INVALID_EMAILS))
    assert sorted(r[0] for r in query(warehouse, "SELECT email FROM raw.customers")) == sorted(VALID_EMAILS)
    found = query(warehouse, "SELECT line_no, list(DISTINCT rule) FROM ops.schema_errors GROUP BY 1")
    assert {emails[line - 1]: rules for line, rules in found} == {e: [rule] for e, rule in INVALID_EMAILS.items()}


def test_uuid_uniqueness_ignores_case(warehouse, tmp_path):
    write(tmp_path, "customers", jsonl([customer(1, id=uuid(7, upper=True)), customer(2, id=uuid(7)), customer(3)]))
    result = land(warehouse, tmp_path, ["raw_customers"])
    assert counts(result, "raw_customers") == (3, 2, 1)
    assert query(warehouse, "SELECT line_no, customer_id FROM raw.customers ORDER BY 1") == [(1, uuid(7)), (3, uuid(3))]
    assert [r[3] for r in errors(warehouse, "customers")] == ["customer_id_duplicate"]


def test_an_empty_or_whitespace_customer_id_is_a_missing_one(warehouse, tmp_path):
    write(tmp_path, "transactions", "\n".join([TRANSACTIONS_HEADER, order_line("536365", customer_id=""),
                                               order_line("536366", customer_id="   "), order_line("536367"),
                                               order_line("536368", customer_id="17850.5")]).encode())
    result = land(warehouse, tmp_path, ["raw_transactions"])
    assert counts(result, "raw_transactions") == (4, 3, 1)
    assert query(warehouse, "SELECT line_no, customer_id FROM raw.transactions ORDER BY 1") == [
        (2, None), (3, None), (4, "17850")]


# -- error rate --------------------------------------------------------------------------------------

def bad_batch(bad_emails: int, bad_items: int, customers: int = 200) -> bytes:
    """`customers` records of 5 items; the first `bad_emails` have an invalid email, the next
    `bad_items` one negative amount each."""
    records = []
    for i in range(1, customers + 1):
        items = [item(amount=-1 if (bad_emails < i <= bad_emails + bad_items and k == 0) else 5.0) for k in range(5)]
        records.append(customer(i, email="broken" if i <= bad_emails else None, items=items))
    return jsonl(records)


def test_a_json_batch_with_5_5_percent_bad_records_fails_the_error_rate_check(warehouse, tmp_path):
    write(tmp_path, "customers", bad_batch(bad_emails=5, bad_items=6))
    result = land(warehouse, tmp_path, ["raw_customers"])
    assert counts(result, "raw_customers") == (200, 195, 5)
    assert counts(result, "raw_customers", "customer_purchases") == (975, 969, 6)
    meta = materialization(result, "raw_customers")
    assert meta["bad_records"] == 11 and meta["error_rate"] == 0.055
    assert meta["customer_purchases.error_rate"] == round(6 / 975, 6)
    check = check_results(result)[("raw_customers", "error_rate")]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    assert check.metadata["error_rate"] == dg.MetadataValue.float(0.055)  # a plain float: the UI plots it


def test_the_suite_checks_of_a_bad_batch_are_not_all_green(warehouse, tmp_path):
    write(tmp_path, "customers", bad_batch(bad_emails=35, bad_items=0))  # 17.5 % of the records quarantined
    result = land(warehouse, tmp_path, ["raw_customers"], suite_checks=True)
    check = check_results(result)[("raw_customers", "customers_expectation_suite")]
    assert not check.passed
    assert check.metadata["rejected_share"] == dg.MetadataValue.float(0.175)
    assert "17.5% of the batch as it arrived" in check.description
    assert check_results(result)[("raw_customers", "customer_purchases_expectation_suite")].passed


# -- blocks of simple lines are split in Arrow, the rest by the csv module: the same records ----

def parsed(path: Path, simple_blocks: bool) -> tuple[list[dict], list[tuple], int]:
    from assets.ingest.landing_files import CsvRecords, LineReader, _parse_csv, open_text_bytes, sniff_delimiter

    with open_text_bytes(TRANSACTIONS.name, path) as (stream, _):
        records = CsvRecords(LineReader(TRANSACTIONS.name, path, stream), sniff_delimiter(stream.peek(1 << 16), TRANSACTIONS),
                             simple_blocks=simple_blocks)
        table, problems, _ = _parse_csv(TRANSACTIONS, path, records)
    return table.to_pylist(), sorted(problems), records.blank_lines


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
@pytest.mark.parametrize("block_bytes", [64, 200, None])  # None: the default READ_BLOCK_BYTES
def test_simple_lines_read_in_arrow_give_the_csv_modules_records(tmp_path, monkeypatch, ending, block_bytes):
    """Blocks without quotes or stray CRs are split at the delimiter in Arrow (4x faster on a 405k-line
    day); every other block goes through the csv module, which reads on into the next block when a
    quoted field spans it. Small blocks put every shape at a block's edge: the records, the refused
    lines and the blank lines are those of the csv module alone."""
    import assets.ingest.landing_files as landing_files

    if block_bytes is not None:
        monkeypatch.setattr(landing_files, "READ_BLOCK_BYTES", block_bytes)
    header = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country"
    lines = ["", "  ", header, "",
             order_line("536365"), order_line("536366", description="  "),  # a whitespace-only field is missing
             order_line("536367", description="\u00a0\u2003"),  # so is one of Unicode spaces (as str.strip() says)
             order_line("536368", description="\u00a0MUG\u00a0"),  # kept as written
             "536369,85123A,MUG,6", "\t", "536370,,,,,,,",  # too few columns; blank; every field missing
             order_line("536371", description='"A ""QUOTED"" MUG, RED"'),
             order_line("536372", description='"TWO\nLINES, ACROSS A BLOCK\nEDGE PERHAPS"'),
             order_line("536373", description="CAF\u00c9 \u00a3 MUG"), "x" * 150,
             order_line("536374", description="A\rCR INSIDE"), order_line("536375"), " , "]
    path = tmp_path / "mixed.csv"
    path.write_bytes((ending.join(lines) + ending).encode() + b"536376,85123A,M\xffUG,6,2011-08-01 10:00,2.5,17850,UK\n"
                     + "\n".join(order_line(str(536400 + i)) for i in range(40)).encode())
    simple = []
    monkeypatch.setattr(landing_files, "simple_lines",
                        lambda *a, real=landing_files.simple_lines: simple.append(real(*a)) or simple[-1])
    fast, slow = parsed(path, True), parsed(path, False)
    assert fast == slow
    assert any(s is not None for s in simple) and (block_bytes is None or any(s is None for s in simple))
    records, problems, blank_lines = fast
    assert blank_lines == 4 and [rule for _, rule, _ in problems] == ["wrong_column_count", "wrong_column_count",
                                                                       "wrong_column_count", "bad_encoding"]
    by_invoice = {r["invoice_no"]: r for r in records}
    assert by_invoice["536366"]["description"] is None and by_invoice["536367"]["description"] is None
    assert by_invoice["536368"]["description"] == "\u00a0MUG\u00a0" and by_invoice["536371"]["description"] == 'A "QUOTED" MUG, RED'
    assert by_invoice["536372"]["description"] == "TWO\nLINES, ACROSS A BLOCK\nEDGE PERHAPS"
    assert by_invoice["536374"]["description"] == "A\rCR INSIDE" and len(records) == 50
    (tmp_path / "bad_header.csv").write_bytes(b"\n  \nInvoice\xffNo,StockCode\n" + order_line("536365").encode() + b"\n")
    for simple_blocks in (True, False):
        with pytest.raises(Exception, match=r"unreadable header on line 3 \(bad_encoding\)"):
            parsed(tmp_path / "bad_header.csv", simple_blocks)


def test_every_online_retail_day_reads_the_same_through_arrow_and_the_csv_module():
    """The real files (a few quoted descriptions a day): the same records, refusals and blank lines
    whichever way each block is read (219 days, about 4 s)."""
    from tests.conftest import ONLINE_RETAIL_DIR

    files = sorted(ONLINE_RETAIL_DIR.glob("*.csv"))
    assert len(files) > 200
    for path in files:
        assert parsed(path, True) == parsed(path, False), path.name


@pytest.mark.parametrize("piece_bytes", [None, 7, 100])  # None: the default DECODE_PIECE_BYTES
def test_undecodable_lines_are_found_whatever_the_decode_pieces(monkeypatch, piece_bytes):
    """Bad bytes anywhere in a line, a sequence cut by the line's end, characters of several bytes
    at the pieces' edges: the lines set aside are exactly those a line-by-line decode refuses."""
    import numpy as np

    import assets.ingest.landing_files as landing_files
    from assets.ingest.landing_files import LineBlock, decodable_lines

    if piece_bytes is not None:
        monkeypatch.setattr(landing_files, "DECODE_PIECE_BYTES", piece_bytes)
    lines = []
    for i in range(3000):
        line = f"line {i} caf\u00e9 \u20ac".encode()
        if i % 97 == 0:
            line = line[:3] + b"\xff" + line[3:]
        if i % 199 == 0:
            line += "\u00e9".encode()[:1]
        lines.append(line + b"\n")
    block = LineBlock(1, b"".join(lines), np.cumsum([len(line) for line in lines]))
    undecodable = []
    numbers, text = decodable_lines(block, b"\n", undecodable)
    refused = [i + 1 for i, line in enumerate(lines) if not _decodes(line)]
    assert [n for n, _ in undecodable] == refused and len(refused) > 40
    assert numbers.tolist() == [n for n in range(1, 3001) if n not in set(refused)] and len(text) == 3000 - len(refused)


def _decodes(line: bytes) -> bool:
    try:
        line.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
def test_the_second_pass_for_quarantined_lines_finds_them_whatever_its_blocks(tmp_path, monkeypatch, ending):
    """The raw text of quarantined lines is read again in small blocks (memory: the staged tables
    are in DuckDB meanwhile): lines across block edges, an over-long line skipped in the count,
    a blank line and the last line without a terminator give the same numbers and texts as the
    first pass's blocks."""
    import numpy as np

    import assets.ingest.landing_files as landing_files
    from assets.ingest.landing_files import line_texts

    monkeypatch.setattr(landing_files, "MAX_LINE_BYTES", 300)
    lines = [line_of(customer(i, email=f"c{i}@caf\u00e9.example")) for i in range(1, 41)]
    lines[9], lines[20] = "x" * 1000, ""  # line 10 is over-long (not kept), line 21 blank
    path = write(tmp_path, "customers", ending.join(lines).encode())
    wanted = np.array([1, 2, 9, 11, 21, 22, 39, 40], dtype=np.int64)
    expected = [(n, lines[n - 1]) for n in wanted.tolist()]
    assert line_texts(CUSTOMERS, path, wanted, block_bytes=None) == expected  # the first pass's 16 MiB
    for block_bytes in (7, 64, 333, landing_files.RESCAN_BLOCK_BYTES):
        assert line_texts(CUSTOMERS, path, wanted, block_bytes=block_bytes) == expected, block_bytes


@pytest.mark.parametrize("block_bytes", [97, 1_500, None])  # None: the default READ_BLOCK_BYTES
def test_an_over_long_line_is_refused_wherever_it_falls(tmp_path, monkeypatch, block_bytes):
    """A line over MAX_LINE_BYTES is quarantined as line_too_long whether it lies inside a read
    block or across a block's end (before, only across an end: a 9 MiB line inside a 16 MiB block
    was parsed), in JSON Lines and CSV; the lines around it keep their numbers."""
    import duckdb

    import assets.ingest.landing_files as landing_files
    from assets.ingest.landing_files import stage_csv, stage_customers

    monkeypatch.setattr(landing_files, "MAX_LINE_BYTES", 300)
    if block_bytes is not None:
        monkeypatch.setattr(landing_files, "READ_BLOCK_BYTES", block_bytes)
        monkeypatch.setattr(landing_files, "JSON_BLOCK_BYTES", block_bytes)
    lines = [line_of(customer(i)) for i in range(1, 31)]
    lines[0] = line_of(customer(1, email="a" * 290 + "@x.example"))  # over 300 bytes: first in its block
    lines[9] = line_of(customer(10, email="b" * 400 + "@x.example"))
    lines[10] = line_of(customer(11, email="c" * 400 + "@x.example"))  # two in a row
    path = write(tmp_path, "customers", "\n".join(lines).encode() + b"\n")
    with duckdb.connect() as con:
        staged = stage_customers(con, path, CUSTOMERS)
        refused = con.execute("SELECT line_no, rule FROM unparseable ORDER BY line_no").fetchall()
        kept = [n for (n,) in con.execute("SELECT line_no FROM stg_customers ORDER BY line_no").fetchall()]
    assert refused == [(1, "line_too_long"), (10, "line_too_long"), (11, "line_too_long")]
    assert kept == [n for n in range(2, 31) if n not in (10, 11)] and staged.inputs["customers"] == 30

    header = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country"
    rows = [header] + [order_line(str(536400 + i)) for i in range(30)]
    rows[12] = order_line("536411", description="M" * 400)
    csv_path = tmp_path / "orders.csv"
    csv_path.write_bytes("\n".join(rows).encode() + b"\n")
    with duckdb.connect() as con:
        stage_csv(con, csv_path, TRANSACTIONS)
        refused = con.execute("SELECT line_no, rule FROM unparseable").fetchall()
        kept = con.execute("SELECT count(*), max(line_no) FROM stg_transactions").fetchone()
    assert refused == [(13, "line_too_long")] and kept == (29, 31)


def test_a_9_mib_line_inside_a_default_read_block_is_refused(tmp_path):
    """The same at the defaults (MAX_LINE_BYTES 8 MiB, 16 MiB read blocks for CSV): a 9 MiB line
    that starts and ends inside the first read block, which the reader used to pass on."""
    import duckdb

    from assets.ingest.landing_files import MAX_LINE_BYTES, READ_BLOCK_BYTES, stage_csv

    header = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country"
    rows = [header] + [order_line(str(536400 + i)) for i in range(5)]
    rows[3] = order_line("536402", description="M" * (9 << 20))
    content = "\n".join(rows).encode() + b"\n"
    assert MAX_LINE_BYTES < len(rows[3]) and len(content) < READ_BLOCK_BYTES
    path = tmp_path / "orders.csv"
    path.write_bytes(content)
    with duckdb.connect() as con:
        stage_csv(con, path, TRANSACTIONS)
        refused = con.execute("SELECT line_no, rule FROM unparseable").fetchall()
        kept = [n for (n,) in con.execute("SELECT line_no FROM stg_transactions ORDER BY 1").fetchall()]
    assert refused == [(4, "line_too_long")] and kept == [2, 3, 5, 6]
