-- One row per customer with purchases: recency, frequency and monetary value (RFM) as of the
-- partition day, breadth of purchases, and the category mix (share of spend per category).
-- Written for millions of customers in a bounded memory: each source is read once, distinct
-- counts are two GROUP BY levels, and no aggregate needs ordered state (those cannot spill).
WITH by_category AS (
    SELECT
        p.customer_id,
        coalesce(d.category, 'uncategorized') AS category,
        sum(p.amount) AS spend,
        count(*) AS lines,
        min(p.purchased_at) AS first_purchase_at,
        max(p.purchased_at) AS last_purchase_at
    FROM analytics.stg_purchases AS p
    LEFT JOIN analytics.dim_products AS d ON d.product_id = p.product_id
    GROUP BY ALL
),
purchase_days AS (
    SELECT customer_id, count(*) AS frequency
    FROM (SELECT DISTINCT customer_id, purchased_at::DATE FROM analytics.stg_purchases)
    GROUP BY customer_id
),
products_bought AS (
    SELECT customer_id, count(*) AS distinct_products
    FROM (SELECT DISTINCT customer_id, product_id FROM analytics.stg_purchases)
    GROUP BY customer_id
),
customers AS (
    SELECT
        customer_id,
        sum(spend) AS monetary,
        sum(lines) AS purchase_lines,
        min(first_purchase_at) AS first_purchase_at,
        max(last_purchase_at) AS last_purchase_at,
        arg_max(category, struct_pack(s := spend, c := category)) AS top_category,  -- ties: deterministic
        max(spend) AS top_category_spend,
        count(*) AS category_count,
        list(struct_pack(k := category, v := spend)) AS spend_by_category
    FROM by_category
    GROUP BY customer_id
)
SELECT
    c.customer_id,
    date_diff('day', c.last_purchase_at::DATE, $as_of::DATE) AS recency_days,
    d.frequency,
    c.monetary,
    c.purchase_lines,
    p.distinct_products,
    c.first_purchase_at,
    c.last_purchase_at,
    c.top_category,
    c.top_category_spend / nullif(c.monetary, 0) AS top_category_share,
    c.category_count,
    map_from_entries(list_transform(list_sort(c.spend_by_category),
        lambda e: struct_pack(k := e.k, v := round(e.v / nullif(c.monetary, 0), 4)))) AS category_mix
FROM customers AS c
JOIN purchase_days AS d ON d.customer_id = c.customer_id
JOIN products_bought AS p ON p.customer_id = c.customer_id
