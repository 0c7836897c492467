"""The yardstick of `raw_customers`: the same file, rules and writes as one bare DuckDB script.

    python -m bench.bare_duckdb_ingest CUSTOMERS.jsonl CATALOG.csv OUT.duckdb  ->  one JSON line

`read_json` reads the JSON Lines file (malformed lines skipped, as `ignore_errors` does), the
rules of expectations/customers.json and customer_purchases.json are computed as boolean masks
(one pass per table; the SQL of each cast is the pipeline's own, `rules.typed`), and the valid
customers, their valid purchase items and one error row per (record, broken rule) are written to
a DuckDB file with the warehouse's settings (1 GB memory limit, 2 threads). What it does not do,
and `raw_customers` does: line numbers and raw text of quarantined lines, line endings, BOM and
gzip, accounting, fingerprints, partition replacement, metadata and checks.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import duckdb

from assets.validate.rules import load_suite, typed

UUID = next(e["kwargs"]["regex"] for e in load_suite("customers").expectations
            if e["meta"]["rule"] == "customer_id_not_a_uuid")
EMAIL = next(e["kwargs"]["regex"] for e in load_suite("customers").expectations if e["meta"]["rule"] == "email_invalid")
JSON_COLUMNS = {"id": "VARCHAR", "email": "VARCHAR", "createdAt": "VARCHAR",
                "purchaseHistory": "STRUCT(productId VARCHAR, amount JSON, date VARCHAR)[]"}

CUSTOMER_RULES = {  # rule -> TRUE when a customer breaks it
    "customer_id_missing": "id IS NULL",
    "customer_id_not_a_uuid": "NOT regexp_full_match(id, $uuid)",
    "customer_id_duplicate": "id IS NOT NULL AND row_number() OVER (PARTITION BY lower(id) ORDER BY rid) > 1",
    "email_missing": "email IS NULL",
    "email_invalid": "NOT regexp_matches(email, $email)",
    "email_too_long": "regexp_matches(email, '^[^@]{65,}@') OR length(email) > 254",
    "created_at_missing": "createdAt IS NULL",
    "created_at_not_a_timestamp": f"{typed('createdAt', 'TIMESTAMP')} IS NULL AND createdAt IS NOT NULL",
    "purchase_history_missing": "purchaseHistory IS NULL",
}
ITEM_RULES = {
    "product_id_missing": "product_id IS NULL",
    "product_id_unknown": "product_id NOT IN (SELECT product_id FROM catalog)",
    "amount_missing": "amount IS NULL",
    "amount_not_a_number": f"amount IS NOT NULL AND {typed('amount', 'DOUBLE')} IS NULL",
    "amount_negative": f"{typed('amount', 'DOUBLE')} < 0",
    "purchased_at_missing": "purchased_at IS NULL",
    "purchased_at_not_a_timestamp": f"purchased_at IS NOT NULL AND {typed('purchased_at', 'TIMESTAMP')} IS NULL",
}


def masks(rules: dict[str, str]) -> str:
    """One list of booleans per row, in the order of the rules (NULL counts as not broken)."""
    return "[" + ", ".join(f"coalesce({sql}, false)" for sql in rules.values()) + "]"


def run(customers: Path, catalog: Path, out: Path) -> dict:
    out.unlink(missing_ok=True)
    started = time.perf_counter()
    con = duckdb.connect(str(out), config={"memory_limit": "1GB", "threads": 2, "preserve_insertion_order": True})
    con.execute("CREATE TEMP TABLE catalog AS SELECT DISTINCT product_id FROM read_csv(?, header = true, all_varchar = true, ignore_errors = true)",
                [str(catalog)])
    con.execute(f"""CREATE TEMP TABLE c AS SELECT row_number() OVER () AS rid, *
        FROM read_json(?, format = 'newline_delimited', columns = {json.dumps(JSON_COLUMNS)}, ignore_errors = true)""",
                [str(customers)])
    con.execute(f"""CREATE TEMP TABLE c_masks AS SELECT rid, id, email, createdAt, len(purchaseHistory) AS n,
        {masks(CUSTOMER_RULES)} AS broken FROM c""", {"uuid": UUID, "email": EMAIL})
    con.execute(f"""CREATE TABLE customers AS SELECT lower(id) AS customer_id, email,
        {typed('createdAt', 'TIMESTAMP')} AS created_at, n AS purchase_count FROM c_masks WHERE NOT list_bool_or(broken)""")
    con.execute(f"""CREATE TEMP TABLE i_masks AS SELECT *, {masks(ITEM_RULES)} AS broken FROM (
        SELECT c.rid, lower(c.id) AS customer_id, pos - 1 AS item_no, item.productId AS product_id,
               item.amount::VARCHAR AS amount, item.date AS purchased_at
        FROM (SELECT rid, id, unnest(purchaseHistory) AS item, generate_subscripts(purchaseHistory, 1) AS pos
              FROM c WHERE rid IN (SELECT rid FROM c_masks WHERE NOT list_bool_or(broken))) AS c)""")
    con.execute(f"""CREATE TABLE customer_purchases AS SELECT item_no, customer_id, product_id,
        {typed('amount', 'DOUBLE')} AS amount, {typed('purchased_at', 'TIMESTAMP')} AS purchased_at
        FROM i_masks WHERE NOT list_bool_or(broken)""")
    con.execute("CREATE TABLE errors (rid BIGINT, record_key VARCHAR, table_name VARCHAR, rule VARCHAR)")
    for table, source, key, rules in (("customers", "c_masks", "id", CUSTOMER_RULES),
                                      ("customer_purchases", "i_masks", "customer_id || '#' || item_no", ITEM_RULES)):
        con.execute(f"""INSERT INTO errors SELECT rid, record_key, '{table}', ($rules)[i]
            FROM (SELECT rid, {key} AS record_key, broken, generate_subscripts(broken, 1) AS i FROM {source}
                  WHERE list_bool_or(broken))
            WHERE broken[i]""", {"rules": list(rules)})
    counts = {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]
              for t in ("customers", "customer_purchases", "errors")}
    con.close()
    return {"seconds": round(time.perf_counter() - started, 3), **counts}


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))))
