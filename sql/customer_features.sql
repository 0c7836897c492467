-- One row per customer with purchases: recency, frequency and monetary value (RFM) as of the
-- partition day, breadth of purchases, and the category mix (share of spend per category).
WITH purchases AS (
    SELECT p.customer_id, p.product_id, p.amount, p.purchased_at, coalesce(d.category, 'uncategorized') AS category
    FROM analytics.stg_purchases AS p
    LEFT JOIN analytics.dim_products AS d ON d.product_id = p.product_id
),
by_category AS (
    SELECT customer_id, category, sum(amount) AS spend
    FROM purchases
    GROUP BY customer_id, category
),
shares AS (
    SELECT customer_id, category, spend / nullif(sum(spend) OVER (PARTITION BY customer_id), 0) AS share
    FROM by_category
),
mix AS (
    SELECT
        customer_id,
        first(category ORDER BY share DESC, category) AS top_category,
        max(share) AS top_category_share,
        count(*) AS category_count,
        map_from_entries(list(struct_pack(k := category, v := round(share, 4)) ORDER BY share DESC, category)) AS category_mix
    FROM shares
    GROUP BY customer_id
)
SELECT
    p.customer_id,
    date_diff('day', max(p.purchased_at)::DATE, $as_of::DATE) AS recency_days,
    count(DISTINCT p.purchased_at::DATE) AS frequency,
    sum(p.amount) AS monetary,
    count(*) AS purchase_lines,
    count(DISTINCT p.product_id) AS distinct_products,
    min(p.purchased_at) AS first_purchase_at,
    max(p.purchased_at) AS last_purchase_at,
    any_value(m.top_category) AS top_category,
    any_value(m.top_category_share) AS top_category_share,
    any_value(m.category_count) AS category_count,
    any_value(m.category_mix) AS category_mix
FROM purchases AS p
JOIN mix AS m ON m.customer_id = p.customer_id
GROUP BY p.customer_id
