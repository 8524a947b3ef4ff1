-- What analysts query: the current state, deduplicated (FINAL), without
-- deleted rows and without rows a TRUNCATE removed. The bookkeeping columns
-- (version, is_deleted, commit_lsn, seq) stay in the tables.

CREATE OR REPLACE VIEW {db}.orders_v AS
SELECT id, customer_id, status, currency, subtotal, tax, shipping_fee, total,
       shipping_address, placed_at, paid_at, shipped_at, cancelled_at, refunded_at, updated_at
FROM {db}.orders FINAL
WHERE is_deleted = 0
  AND position > (SELECT max(position) FROM {db}.truncations WHERE table_name = 'orders');

CREATE OR REPLACE VIEW {db}.order_items_v AS
SELECT order_id, line_no, product_id, quantity, unit_price, line_total
FROM {db}.order_items FINAL
WHERE is_deleted = 0
  AND position > (SELECT max(position) FROM {db}.truncations WHERE table_name = 'order_items');

CREATE OR REPLACE VIEW {db}.customers_v AS
SELECT id, email, full_name, phone, profile, created_at, updated_at
FROM {db}.customers FINAL
WHERE is_deleted = 0
  AND position > (SELECT max(position) FROM {db}.truncations WHERE table_name = 'customers');

CREATE OR REPLACE VIEW {db}.products_v AS
SELECT id, sku, name, category, price, stock, attributes, active, created_at, updated_at
FROM {db}.products FINAL
WHERE is_deleted = 0
  AND position > (SELECT max(position) FROM {db}.truncations WHERE table_name = 'products');

CREATE OR REPLACE VIEW {db}.payments_v AS
SELECT id, order_id, kind, amount, method, provider_ref, created_at
FROM {db}.payments FINAL
WHERE is_deleted = 0
  AND position > (SELECT max(position) FROM {db}.truncations WHERE table_name = 'payments');
