-- The SQLite store's first schema (user_version 1): the audit service's tables and the API's.
-- Times are UTC milliseconds (INTEGER), JSON columns TEXT; see src/sqlite.rs. The MySQL schema's
-- 0001 to 0003 and 0007 in SQLite's terms (its TEXT compares every character: NO PAD already).
CREATE TABLE IF NOT EXISTS telemetry (
    device_id TEXT NOT NULL,
    device_ts INTEGER NOT NULL,
    seq INTEGER NULL,
    seq_key INTEGER NOT NULL CHECK (seq_key = IFNULL(seq, -1)),
    received_at INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    schema_version INTEGER NOT NULL DEFAULT 0,
    attributes TEXT NULL,
    quality TEXT NULL,
    source_topic TEXT NOT NULL,
    source_partition INTEGER NOT NULL,
    source_offset INTEGER NOT NULL,
    written_at INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000 AS INTEGER)),
    PRIMARY KEY (device_id, device_ts, seq_key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT NOT NULL PRIMARY KEY,
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    last_accepted INTEGER NULL,
    last_rejected INTEGER NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS device_minutes (
    device_id TEXT NOT NULL,
    minute INTEGER NOT NULL,
    accepted INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (device_id, minute)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS device_minutes_by_minute ON device_minutes (minute);
CREATE TABLE IF NOT EXISTS dlq_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source_topic TEXT NOT NULL,
    source_partition INTEGER NOT NULL,
    source_offset INTEGER NOT NULL,
    device_id TEXT NULL,
    received_at INTEGER NOT NULL,
    code TEXT NOT NULL,
    message TEXT NOT NULL,
    field TEXT NULL,
    rule TEXT NULL,
    contract_version INTEGER NOT NULL,
    payload BLOB NOT NULL,
    payload_bytes INTEGER NOT NULL,
    indexed_at INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000 AS INTEGER)),
    UNIQUE (source_topic, source_partition, source_offset)
);
CREATE INDEX IF NOT EXISTS dlq_events_recent ON dlq_events (received_at);
CREATE INDEX IF NOT EXISTS dlq_events_by_device ON dlq_events (device_id, id);
CREATE INDEX IF NOT EXISTS dlq_events_by_code ON dlq_events (code, id);
