-- Every clean purchase up to the partition day, one row per purchase line, from both sources:
-- the customers' purchase histories (JSON Lines) and the order lines (Online Retail layout).
-- A customer record sent again on a later day repeats its history: exact repeats count once.
-- Stored sorted by customer: the AI stages stream it customer by customer several times, and
-- one sort here replaces a sort of millions of rows on every pass.
WITH history AS (
    SELECT DISTINCT customer_id, product_id, amount, purchased_at
    FROM raw.customer_purchases
    WHERE partition_date <= $as_of
)
SELECT * FROM (
    SELECT customer_id, product_id, amount, NULL::INTEGER AS quantity, purchased_at, 'customers' AS source
    FROM history
    UNION ALL
    SELECT customer_id, product_id, amount, quantity, purchased_at, 'transactions' AS source
    FROM analytics.stg_order_lines
)
ORDER BY customer_id, purchased_at, product_id, amount, source
