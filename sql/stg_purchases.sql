-- Every clean purchase up to the partition day, one row per purchase line, from both sources:
-- the customers' purchase histories and the order lines (Online Retail layout).
-- Stored sorted by customer: the AI stages stream it customer by customer several times, and
-- one sort here replaces a sort of millions of rows on every pass. Incremental by customer
-- (sql/schema.yml): a later day replaces only the changed customers' rows.
SELECT * FROM (
    SELECT customer_id, product_id, amount, NULL::INTEGER AS quantity, purchased_at, 'customers' AS source
    FROM analytics.stg_customer_history
    UNION ALL
    SELECT customer_id, product_id, amount, quantity, purchased_at, 'transactions' AS source
    FROM analytics.stg_order_lines
)
ORDER BY customer_id, purchased_at, product_id, amount, source
