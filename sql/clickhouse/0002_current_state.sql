-- Current state of the write model's tables, projected from the row-change
-- envelopes of the events (`changes[].after` / `before`), one row per
-- (key, version). ReplacingMergeTree(version, is_deleted) keeps the row with
-- the highest version per key; a delete is a row with the key and
-- is_deleted = 1. Read through the *_v views, which apply FINAL and hide
-- deleted and truncated rows.
--
-- version is the event's version ((commit_lsn << 16) | k, UInt128: 80 bits in
-- theory). commit_lsn and seq are the change's own place in the WAL (commit
-- LSN of its transaction, position inside it), position the two as one
-- number: a TRUNCATE hides every row whose position is before the truncate's
-- (table `truncations`; one comparison per row in the views).
--
-- Large texts (customers.bio, products.description) are left out: analytics
-- has no use for them, and they are the columns that arrive as "unchanged
-- TOAST" (absent) in updates. Any other column that arrives absent is taken
-- from the previous state of the row (see docs/clickhouse.md).

CREATE TABLE IF NOT EXISTS {db}.orders
(
    id               Int64,
    customer_id      Int64,
    status           LowCardinality(String),
    currency         LowCardinality(String),
    subtotal         Decimal(12, 2),
    tax              Decimal(12, 2),
    shipping_fee     Decimal(12, 2),
    total            Decimal(12, 2),
    shipping_address String,
    placed_at        DateTime64(6, 'UTC'),
    paid_at          Nullable(DateTime64(6, 'UTC')),
    shipped_at       Nullable(DateTime64(6, 'UTC')),
    cancelled_at     Nullable(DateTime64(6, 'UTC')),
    refunded_at      Nullable(DateTime64(6, 'UTC')),
    updated_at       DateTime64(6, 'UTC'),
    version          UInt128,
    is_deleted       UInt8,
    commit_lsn       UInt64,
    seq              UInt32,
    position         UInt128 MATERIALIZED bitOr(bitShiftLeft(toUInt128(commit_lsn), 32), seq)
)
ENGINE = ReplacingMergeTree(version, is_deleted)
ORDER BY id
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS {db}.order_items
(
    order_id   Int64,
    line_no    Int32,
    product_id Int64,
    quantity   Int32,
    unit_price Decimal(12, 2),
    line_total Decimal(12, 2),
    version    UInt128,
    is_deleted UInt8,
    commit_lsn UInt64,
    seq        UInt32,
    position   UInt128 MATERIALIZED bitOr(bitShiftLeft(toUInt128(commit_lsn), 32), seq)
)
ENGINE = ReplacingMergeTree(version, is_deleted)
ORDER BY (order_id, line_no)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS {db}.customers
(
    id         Int64,
    email      String,
    full_name  String,
    phone      Nullable(String),
    profile    String,
    created_at DateTime64(6, 'UTC'),
    updated_at DateTime64(6, 'UTC'),
    version    UInt128,
    is_deleted UInt8,
    commit_lsn UInt64,
    seq        UInt32,
    position   UInt128 MATERIALIZED bitOr(bitShiftLeft(toUInt128(commit_lsn), 32), seq)
)
ENGINE = ReplacingMergeTree(version, is_deleted)
ORDER BY id
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS {db}.products
(
    id         Int64,
    sku        String,
    name       String,
    category   LowCardinality(String),
    price      Decimal(12, 2),
    stock      Int32,
    attributes String,
    active     Bool,
    created_at DateTime64(6, 'UTC'),
    updated_at DateTime64(6, 'UTC'),
    version    UInt128,
    is_deleted UInt8,
    commit_lsn UInt64,
    seq        UInt32,
    position   UInt128 MATERIALIZED bitOr(bitShiftLeft(toUInt128(commit_lsn), 32), seq)
)
ENGINE = ReplacingMergeTree(version, is_deleted)
ORDER BY id
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS {db}.payments
(
    id           Int64,
    order_id     Int64,
    kind         LowCardinality(String),
    amount       Decimal(12, 2),
    method       LowCardinality(String),
    provider_ref String,
    created_at   DateTime64(6, 'UTC'),
    version      UInt128,
    is_deleted   UInt8,
    commit_lsn   UInt64,
    seq          UInt32,
    position     UInt128 MATERIALIZED bitOr(bitShiftLeft(toUInt128(commit_lsn), 32), seq)
)
ENGINE = ReplacingMergeTree(version, is_deleted)
ORDER BY id
SETTINGS non_replicated_deduplication_window = 1000;

-- One row per TRUNCATE of a projected table: rows written before it (by
-- commit position) are hidden by the views.
CREATE TABLE IF NOT EXISTS {db}.truncations
(
    table_name LowCardinality(String),
    commit_lsn UInt64,
    seq        UInt32,
    event_id   String,
    position   UInt128 MATERIALIZED bitOr(bitShiftLeft(toUInt128(commit_lsn), 32), seq)
)
ENGINE = ReplacingMergeTree
ORDER BY (table_name, commit_lsn, seq);
