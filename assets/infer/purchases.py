"""The purchase stream the AI stages read: every clean purchase, customer by customer.

A full build of `analytics.stg_purchases` stores it sorted by customer (sql/stg_purchases.sql)
and DuckDB keeps insertion order on plain scans, so no pass sorts 20M rows again. An incremental
day replaces only the changed customers' rows (deleted, then appended in order): each customer is
still one run, but the customers are no longer in order, so until the next full build a full read
sorts (`all_purchases_sql`). recsys raises if the stream ever interleaves customers.
"""

from assets.common.current_state import read_state

PURCHASES_SQL = "SELECT customer_id, product_id, amount, purchased_at FROM analytics.stg_purchases"
PURCHASES_ORDER = "ORDER BY customer_id, purchased_at, product_id, amount, source"  # sql/stg_purchases.sql's


def stored_in_order(warehouse) -> bool:
    """Whether stg_purchases is stored in its model's order (its last build says so)."""
    with warehouse.connect(read_only=True) as con:
        stored = read_state(con, "stg_purchases")
    return stored is None or (stored.measurements.get("build") or {}).get("in_order", True)


def all_purchases_sql(warehouse, where: str = "") -> str:
    """PURCHASES_SQL (optionally filtered), customer by customer: sorted by the query only when
    the table is not stored in order (to Parquet at 2M customers: 10.2 s sorted, 2.7 s plain)."""
    return f"{PURCHASES_SQL} {where} {'' if stored_in_order(warehouse) else PURCHASES_ORDER}".strip()

# Per customer: a fingerprint of every purchase row (any added, removed or edited row changes it),
# the rows the recsys stages cannot use, and the last usable purchase. What an incremental day
# compares with the last build's to find the customers whose purchases changed. The fingerprint
# is the rows' 64-bit hashes summed modulo 2^64: a UBIGINT, which the stages' Parquet snapshots
# keep exactly (a HUGEINT sum came back as DOUBLE, which rounds away differences below its step).
CUSTOMER_STATE_SQL = """
SELECT customer_id,
       (sum(hash(product_id, amount, purchased_at)) % 18446744073709551616::HUGEINT)::UBIGINT AS history_hash,
       count(*) AS purchase_rows,
       count(*) FILTER (WHERE NOT usable) AS invalid_rows,
       max(purchased_at) FILTER (WHERE usable) AS last_purchase_at
FROM (SELECT customer_id, product_id, amount, purchased_at,
             coalesce(length(product_id) > 0 AND amount > 0 AND purchased_at IS NOT NULL, false) AS usable
      FROM analytics.stg_purchases)
GROUP BY customer_id
"""


# Recorded with a build's model ("purchase_state"); a stored state of another format is not
# compared with (the stage rebuilds every customer's state once instead).
PURCHASE_STATE_FORMAT = "history-hash-ubigint-1"


def outdated_state_reason(model_record: dict) -> str | None:
    """Why the customer state a build stored cannot be compared with (None: it can)."""
    if model_record.get("purchase_state") != PURCHASE_STATE_FORMAT:
        return "the stored purchase fingerprints are of an older format"
    return None


def purchases_of(customers: str) -> str:
    """PURCHASES_SQL for the customers of a table (a TEMP table of the same connection), in the
    order stg_purchases keeps: the same rows in the same order as a full read gives them."""
    return f"""SELECT customer_id, product_id, amount, purchased_at
               FROM analytics.stg_purchases SEMI JOIN {customers} USING (customer_id)
               {PURCHASES_ORDER}"""


def changed_customers_sql(previous: str) -> str:
    """UNION ALL parts (customer_id, priority, reason) of the customers of TEMP `now_state` who
    are new, or whose purchases differ, against the fingerprints a stage kept in `previous`."""
    return f"""SELECT n.customer_id, 1 AS priority, 'new customer' AS reason
    FROM now_state AS n ANTI JOIN {previous} AS p USING (customer_id)
    UNION ALL
    SELECT n.customer_id, 2, 'purchases changed'
    FROM now_state AS n JOIN {previous} AS p USING (customer_id)
    WHERE n.history_hash <> p.history_hash OR n.purchase_rows <> p.purchase_rows"""


def customers_to_redo(table: str, ctes: str) -> str:
    """CREATE TEMP `table` (customer_id, reason): the customers of `now_state` among the CTE
    `reasons` (customer_id, priority, reason), each once with their first reason."""
    return f"""CREATE TEMP TABLE {table} AS
WITH {ctes.strip()}
SELECT customer_id, arg_min(reason, priority) AS reason
FROM reasons SEMI JOIN now_state USING (customer_id)
GROUP BY customer_id"""
