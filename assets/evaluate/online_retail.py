"""The UCI Online Retail reference data, cleaned by the pipeline's own rules.

No second copy of a rule: every by-day CSV lands through ingestion (`land_file`: the
transactions suite's quarantine, e.g. exact duplicate lines and bad-debt adjustments) into a
scratch in-memory DuckDB, and `sql/stg_order_lines.sql` (the model the pipeline runs) turns the
order lines into clean purchases. Online Retail has no stock levels, so `catalog_before` treats
every product sold before the cut-off as in stock, priced at its latest unit price.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import duckdb
import pyarrow as pa

from assets.common.sources import SOURCES, TRANSACTIONS
from assets.ingest.raw_assets import land_file
from assets.transform.sql_models import SQL_DIR

PURCHASES = "analytics.stg_order_lines"


def load_online_retail(con: duckdb.DuckDBPyConnection, by_day_dir: str | Path) -> int:
    """Land every `<day>.csv` of the folder as a transactions partition, then build
    analytics.stg_order_lines as of the last day; returns its row count."""
    days = sorted(Path(by_day_dir).glob("*.csv"))
    if not days:
        raise FileNotFoundError(f"no <day>.csv files in {by_day_dir}")
    for path in days:
        land_file(con, TRANSACTIONS, SOURCES, path.stem, path)
    model = (SQL_DIR / "stg_order_lines.sql").read_text()
    con.execute("CREATE SCHEMA IF NOT EXISTS analytics")
    con.execute(f"CREATE OR REPLACE TABLE {PURCHASES} AS {model}", {"as_of": dt.date.fromisoformat(days[-1].stem)})
    return con.execute(f"SELECT count(*) FROM {PURCHASES}").fetchall()[0][0]


def purchases_source(con: duckdb.DuckDBPyConnection, batch_size: int = 50_000):
    """A re-readable purchases source over the loaded order lines, grouped by customer."""
    query = (f"SELECT customer_id, product_id, amount, purchased_at FROM {PURCHASES}"
             " ORDER BY customer_id, purchased_at, product_id")
    return lambda: con.sql(query).to_arrow_reader(batch_size)


def catalog_before(con: duckdb.DuckDBPyConnection, cutoff: dt.datetime) -> pa.Table:
    """Products sold before the cut-off, all in stock, at their latest unit price."""
    return con.sql(
        f"""SELECT product_id, true AS in_stock, arg_max(unit_price, purchased_at) AS price
            FROM {PURCHASES} WHERE purchased_at < $cutoff GROUP BY product_id ORDER BY product_id""",
        params={"cutoff": cutoff},
    ).to_arrow_table()


def product_texts_before(con: duckdb.DuckDBPyConnection, cutoff: dt.datetime) -> pa.Table:
    """product_id and its latest description among the order lines before the cut-off."""
    return con.sql(
        f"""SELECT product_id, arg_max(description, purchased_at) AS text
            FROM {PURCHASES} WHERE purchased_at < $cutoff AND nullif(description, '') IS NOT NULL
            GROUP BY product_id ORDER BY product_id""",
        params={"cutoff": cutoff},
    ).to_arrow_table()
