-- Every clean purchase up to the partition day, one row per purchase line, from both sources:
-- the customers' purchase histories (JSON Lines) and the order lines (Online Retail layout).
-- A customer record sent again on a later day repeats its history: exact repeats count once.
WITH history AS (
    SELECT DISTINCT customer_id, product_id, amount, purchased_at
    FROM raw.customer_purchases
    WHERE partition_date <= $as_of
)
SELECT customer_id, product_id, amount, NULL::INTEGER AS quantity, purchased_at, 'customers' AS source
FROM history
UNION ALL
SELECT customer_id, product_id, amount, quantity, purchased_at, 'transactions' AS source
FROM analytics.stg_order_lines
