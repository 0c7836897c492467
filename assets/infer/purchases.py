"""The purchase stream the AI stages read: every clean purchase, customer by customer.

`analytics.stg_purchases` is stored sorted by customer (sql/stg_purchases.sql) and DuckDB keeps
insertion order on plain scans, so no pass sorts 20M rows again; recsys raises if the stream ever
interleaves customers.
"""

PURCHASES_SQL = "SELECT customer_id, product_id, amount, purchased_at FROM analytics.stg_purchases"
