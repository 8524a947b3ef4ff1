-- Aggregates, computed at query time from the deduplicated current state
-- (never insert-triggered materialized views: over a ReplacingMergeTree they
-- would count every new version and every redelivery again).
-- Exact definitions: docs/clickhouse.md, "Aggregates".

-- Orders that earned revenue: paid and not given back. A cancelled-after-
-- payment or refunded order was refunded in full by the writer, so it earns
-- nothing. Revenue is the goods value (line totals = subtotal, without tax and
-- shipping), per currency, on the UTC day of payment.
CREATE OR REPLACE VIEW {db}.revenue_orders_v AS
SELECT id AS order_id, customer_id, currency, subtotal, toDate(assumeNotNull(paid_at)) AS day
FROM {db}.orders_v
WHERE status IN ('paid', 'shipped');

CREATE OR REPLACE VIEW {db}.revenue_daily_v AS
SELECT day, currency, count() AS orders, sum(subtotal) AS revenue
FROM {db}.revenue_orders_v
GROUP BY day, currency;

CREATE OR REPLACE VIEW {db}.revenue_lines_v AS
SELECT o.day AS day, o.currency AS currency, o.order_id AS order_id,
       i.product_id AS product_id, i.quantity AS quantity, i.line_total AS line_total
FROM {db}.order_items_v AS i
INNER JOIN {db}.revenue_orders_v AS o ON o.order_id = i.order_id;

-- A product's current category and name (not the ones at the time of sale);
-- lines of a product missing from products_v fall under category ''.
CREATE OR REPLACE VIEW {db}.revenue_by_product_daily_v AS
SELECT l.day AS day, l.currency AS currency, l.product_id AS product_id,
       any(p.name) AS product_name, any(p.category) AS category,
       uniqExact(l.order_id) AS orders, sum(l.quantity) AS quantity, sum(l.line_total) AS revenue
FROM {db}.revenue_lines_v AS l
LEFT JOIN {db}.products_v AS p ON p.id = l.product_id
GROUP BY day, currency, product_id;

CREATE OR REPLACE VIEW {db}.revenue_by_category_daily_v AS
SELECT l.day AS day, l.currency AS currency, p.category AS category,
       uniqExact(l.order_id) AS orders, sum(l.quantity) AS quantity, sum(l.line_total) AS revenue
FROM {db}.revenue_lines_v AS l
LEFT JOIN {db}.products_v AS p ON p.id = l.product_id
GROUP BY day, currency, category;

-- Orders by their current status, on the UTC day they were placed.
CREATE OR REPLACE VIEW {db}.orders_by_status_daily_v AS
SELECT toDate(placed_at) AS day, status, count() AS orders
FROM {db}.orders_v
GROUP BY day, status;

-- Customer lifetime value: captured minus refunded payments, per currency.
CREATE OR REPLACE VIEW {db}.customer_ltv_v AS
SELECT o.customer_id AS customer_id, o.currency AS currency,
       sumIf(p.amount, p.kind = 'capture') AS paid,
       sumIf(p.amount, p.kind = 'refund') AS refunded,
       paid - refunded AS lifetime_value
FROM {db}.payments_v AS p
INNER JOIN {db}.orders_v AS o ON o.id = p.order_id
GROUP BY customer_id, currency;

-- One row per order for the placed -> paid -> shipped funnel. An order counts
-- as paid / shipped when it reached that step, whatever happened later.
CREATE OR REPLACE VIEW {db}.order_funnel_v AS
SELECT id AS order_id, toDate(placed_at) AS day, placed_at, paid_at, shipped_at,
       paid_at IS NOT NULL AS reached_paid,
       shipped_at IS NOT NULL AS reached_shipped,
       dateDiff('millisecond', placed_at, paid_at) / 1000 AS time_to_pay_s,
       dateDiff('millisecond', placed_at, shipped_at) / 1000 AS time_to_ship_s
FROM {db}.orders_v;

CREATE OR REPLACE VIEW {db}.funnel_daily_v AS
SELECT day,
       count() AS placed,
       countIf(reached_paid) AS paid,
       countIf(reached_shipped) AS shipped,
       avg(time_to_ship_s) AS time_to_ship_avg_s,
       quantileExact(0.5)(time_to_ship_s) AS time_to_ship_p50_s,
       quantileExact(0.9)(time_to_ship_s) AS time_to_ship_p90_s
FROM {db}.order_funnel_v
GROUP BY day;
