-- The product catalog as of the partition day: the latest catalog row of each product, plus
-- products known only from order lines (their most common description, median price, and
-- "in stock" when sold in the 90 days before the day, since order lines carry no stock level).
WITH catalog AS (
    SELECT product_id, name, description, category, price, in_stock
    FROM raw.products
    WHERE partition_date <= $as_of
    QUALIFY row_number() OVER (PARTITION BY product_id ORDER BY partition_date DESC, line_no DESC) = 1
),
sold AS (
    SELECT
        product_id,
        mode(description) AS description,
        median(unit_price) AS price,
        max(purchased_at) AS last_sold_at
    FROM analytics.stg_order_lines
    GROUP BY product_id
)
SELECT
    coalesce(c.product_id, s.product_id) AS product_id,
    coalesce(c.name, s.description) AS name,
    coalesce(c.description, s.description) AS description,
    coalesce(c.category, 'uncategorized') AS category,
    coalesce(c.price, s.price) AS price,
    coalesce(c.in_stock, s.last_sold_at >= $as_of - INTERVAL 90 DAY) AS in_stock,
    CASE WHEN c.product_id IS NULL THEN 'order_lines' ELSE 'catalog' END AS source
FROM catalog AS c
FULL OUTER JOIN sold AS s ON c.product_id = s.product_id
