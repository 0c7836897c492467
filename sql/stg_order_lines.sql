-- Order lines (Online Retail layout) a recommender can learn from, as of the partition day.
-- Kept out: lines with no customer, cancellation invoices (C...) and negative quantities,
-- zero or negative prices, non-product codes (POST, DOT, M, C2, D, S, BANK CHARGES, AMAZONFEE,
-- CRUK, B and GIFT_* vouchers; DCGS* and PADS are real products), and orders that a
-- cancellation of the same customer, product and quantity reversed later. Exact duplicate
-- lines never get here: ingestion quarantines them. recsys/online_retail.py applies the same
-- rules to the raw CSVs for the offline evaluation.
WITH lines AS (
    SELECT
        customer_id,
        upper(trim(stock_code)) AS product_id,
        trim(description) AS description,
        invoice_no,
        quantity,
        unit_price,
        invoice_date
    FROM raw.transactions
    WHERE partition_date <= $as_of
),
cancellations AS (
    SELECT customer_id, product_id, -quantity AS quantity, invoice_date
    FROM lines
    WHERE invoice_no LIKE 'C%' AND customer_id IS NOT NULL
)
SELECT
    l.customer_id,
    l.product_id,
    l.description,
    l.invoice_no,
    l.quantity,
    l.unit_price,
    l.quantity * l.unit_price AS amount,
    l.invoice_date AS purchased_at
FROM lines AS l
WHERE l.customer_id IS NOT NULL
  AND l.invoice_no NOT LIKE 'C%'
  AND l.quantity > 0
  AND l.unit_price > 0
  AND l.product_id NOT IN ('POST', 'DOT', 'M', 'C2', 'D', 'S', 'BANK CHARGES', 'AMAZONFEE', 'CRUK', 'B')
  AND NOT starts_with(l.product_id, 'GIFT_')
  AND NOT EXISTS (
      SELECT 1 FROM cancellations AS c
      WHERE c.customer_id = l.customer_id
        AND c.product_id = l.product_id
        AND c.quantity = l.quantity
        AND c.invoice_date >= l.invoice_date
  )
