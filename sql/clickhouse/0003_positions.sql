-- How far each projection has applied, per Kafka partition: the next offset
-- and the newest Watermark LSN seen there. Written by the same apply() as the
-- data, after it; the highest offset per partition wins (a replayed batch
-- writes a lower or equal one).

CREATE TABLE IF NOT EXISTS {db}.projection_positions
(
    projection_name LowCardinality(String),
    topic      LowCardinality(String),
    partition  UInt32,
    offset     UInt64,
    watermark  UInt64,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(offset)
ORDER BY (projection_name, topic, partition);
