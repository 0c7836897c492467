"""UCI Online Retail by-day CSVs -> clean purchases, with DuckDB.

The caller passes the directory (recsys holds no paths). Cleaning rules, in order; the SQL
models in sql/ mirror them:

1. Read every CSV with explicit types: InvoiceNo, StockCode, CustomerID as text (CustomerID is
   written as a float, '17850.0'); Quantity integer; UnitPrice double; InvoiceDate timestamp.
2. Exact duplicate lines (all 8 columns equal, as read) count once: they are double exports,
   not repeat purchases (about 1 % of lines).
3. Drop cancellations (InvoiceNo starting with 'C') and any line with Quantity <= 0 (the rest
   are stock adjustments: 'damaged', 'check', ...).
4. Drop a purchase line that a cancellation reverses: same CustomerID and StockCode, Quantity
   equal to minus the cancelled quantity, cancellation at or after the purchase (e.g. the
   74,215-unit order cancelled 16 minutes later). Every purchase line matching such a
   cancellation is dropped (no one-to-one pairing).
5. Drop lines without CustomerID: they cannot be attributed to a customer.
6. Drop UnitPrice <= 0 (free samples, write-offs, 'Adjust bad debt').
7. Drop non-product stock codes, compared after trim + upper case: POST, DOT, M, C2, D, S,
   BANK CHARGES, AMAZONFEE, CRUK, B (postage, manual, carriage, discount, samples, fees,
   commission, bad debt) and gift vouchers (codes starting with GIFT_). DCGS* and PADS are
   real products and stay.
8. Output columns: customer_id = the integer text of CustomerID ('17850'); product_id =
   upper(trim(StockCode)) (code case varies in the file: '85123a' and '85123A' are one
   product); amount = Quantity x UnitPrice (GBP); purchased_at = InvoiceDate (UK local time,
   kept naive).

Online Retail has no stock levels, so `catalog_before` treats every product sold before the
cut-off as in stock, priced at its latest unit price.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import duckdb
import pyarrow as pa

NON_PRODUCT_CODES = ("POST", "DOT", "M", "C2", "D", "S", "BANK CHARGES", "AMAZONFEE", "CRUK", "B")
GIFT_VOUCHER_PREFIX = "GIFT_"

_RAW_COLUMNS = (
    "{'InvoiceNo': 'VARCHAR', 'StockCode': 'VARCHAR', 'Description': 'VARCHAR', 'Quantity': 'BIGINT', "
    "'InvoiceDate': 'TIMESTAMP', 'UnitPrice': 'DOUBLE', 'CustomerID': 'VARCHAR', 'Country': 'VARCHAR'}"
)

CLEAN_PURCHASES_SQL = f"""
WITH raw AS (
    SELECT * FROM read_csv($csv_glob, header = true, columns = {_RAW_COLUMNS})
),
deduplicated AS (
    SELECT DISTINCT * FROM raw
),
cancellations AS (
    SELECT CustomerID, StockCode, -Quantity AS Quantity, InvoiceDate
    FROM deduplicated WHERE starts_with(InvoiceNo, 'C')
),
purchases AS (
    SELECT p.* FROM deduplicated p
    WHERE NOT starts_with(p.InvoiceNo, 'C')
      AND p.Quantity > 0
      AND p.CustomerID IS NOT NULL
      AND p.UnitPrice > 0
      AND upper(trim(p.StockCode)) NOT IN (SELECT unnest($non_product_codes))
      AND NOT starts_with(upper(trim(p.StockCode)), $gift_prefix)
      AND NOT EXISTS (
          SELECT 1 FROM cancellations c
          WHERE c.CustomerID = p.CustomerID AND c.StockCode = p.StockCode
            AND c.Quantity = p.Quantity AND c.InvoiceDate >= p.InvoiceDate
      )
)
SELECT
    CAST(CAST(CAST(CustomerID AS DOUBLE) AS BIGINT) AS VARCHAR) AS customer_id,
    upper(trim(StockCode)) AS product_id,
    Quantity * UnitPrice AS amount,
    InvoiceDate AS purchased_at,
    UnitPrice AS unit_price
FROM purchases
"""


def load_online_retail(con: duckdb.DuckDBPyConnection, by_day_dir: str | Path, table: str = "online_retail_purchases") -> int:
    """Create `table` in `con` with the clean purchases; returns its row count.

    `table` is an identifier chosen by code, never by data.
    """
    if not table.isidentifier():
        raise ValueError(f"not a plain identifier: {table!r}")
    csv_glob = str(Path(by_day_dir) / "*.csv")
    con.execute(
        f"CREATE OR REPLACE TABLE {table} AS {CLEAN_PURCHASES_SQL} ORDER BY customer_id, purchased_at, product_id",
        {"csv_glob": csv_glob, "non_product_codes": list(NON_PRODUCT_CODES), "gift_prefix": GIFT_VOUCHER_PREFIX},
    )
    return con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]


def purchases_source(con: duckdb.DuckDBPyConnection, table: str = "online_retail_purchases", batch_size: int = 50_000):
    """A re-readable purchases source over the loaded table, grouped by customer."""
    if not table.isidentifier():
        raise ValueError(f"not a plain identifier: {table!r}")
    query = f"SELECT customer_id, product_id, amount, purchased_at FROM {table} ORDER BY customer_id, purchased_at, product_id"
    return lambda: con.sql(query).to_arrow_reader(batch_size)


def catalog_before(con: duckdb.DuckDBPyConnection, cutoff: datetime, table: str = "online_retail_purchases") -> pa.Table:
    """Products sold before the cut-off, all in stock, at their latest unit price."""
    if not table.isidentifier():
        raise ValueError(f"not a plain identifier: {table!r}")
    return con.sql(
        f"""SELECT product_id, true AS in_stock, arg_max(unit_price, purchased_at) AS price
            FROM {table} WHERE purchased_at < $cutoff GROUP BY product_id ORDER BY product_id""",
        params={"cutoff": cutoff},
    ).to_arrow_table()
