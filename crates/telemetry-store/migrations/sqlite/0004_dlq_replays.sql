-- `telemetry dlq replay` on the SQLite store (user_version 4): the MySQL schema's 0004 in SQLite's
-- terms. Which DLQ records have been replayed into the table, and whether their cleaned record has
-- reached the cleaned topic; written in the same transaction as the row, so a DLQ record is
-- replayed once however often the command runs.
CREATE TABLE IF NOT EXISTS dlq_replays (
    dlq_topic TEXT NOT NULL,
    dlq_partition INTEGER NOT NULL,
    dlq_offset INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    -- The cleaned record to produce, as JSON; NULL once there is nothing left to produce.
    cleaned TEXT NULL,
    -- 0 while the cleaned record waits for Kafka's acknowledgement; 1 once produced, or when the
    -- event was in the table already.
    produced INTEGER NOT NULL DEFAULT 0,
    replayed_at INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000 AS INTEGER)),
    PRIMARY KEY (dlq_topic, dlq_partition, dlq_offset)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dlq_replays_pending ON dlq_replays (produced, replayed_at);
