-- The customers' purchase histories (JSON Lines) up to the partition day, one row per purchase.
-- A customer record sent again on a later day repeats its history: exact repeats count once.
-- (Its own model: deduplicating and sorting 20M rows in one statement ran out of memory.)
SELECT DISTINCT customer_id, product_id, amount, purchased_at
FROM raw.customer_purchases
WHERE partition_date <= $as_of
