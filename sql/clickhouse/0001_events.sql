-- Every domain event, as published (data and changes as JSON text).
-- {db} is replaced by the sink's database name (a checked identifier).
--
-- ReplacingMergeTree keyed on the event id: a redelivered event is a second
-- row with the same sorting key, merged away in the background and hidden by
-- FINAL (views below). The sink also sets insert_deduplication_token, so a
-- retried batch is usually not even written twice. occurred_at is part of the
-- event, so both copies land in the same monthly partition.

CREATE DATABASE IF NOT EXISTS {db};

CREATE TABLE IF NOT EXISTS {db}.events
(
    event_id       String,
    event_type     LowCardinality(String),
    event_version  UInt16,
    aggregate_type LowCardinality(String),
    aggregate_id   String,
    -- (commit_lsn << 16) | k: up to 80 bits in theory, so UInt128.
    version        UInt128,
    commit_lsn     UInt64,
    occurred_at    DateTime64(3, 'UTC'),
    data           String,
    changes        String
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (aggregate_type, aggregate_id, event_id)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE OR REPLACE VIEW {db}.events_v AS
SELECT * FROM {db}.events FINAL;
