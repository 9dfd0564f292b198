-- `telemetry dlq replay` (issue 6): which DLQ records have been replayed into the table, and
-- whether their cleaned record has reached the cleaned topic. Written in the same transaction as
-- the row, so a DLQ record is replayed once however often the command runs; a cleaned record not
-- yet acknowledged by Kafka (the command stopped in between) is produced on the next run.
CREATE TABLE IF NOT EXISTS dlq_replays (
    dlq_topic VARCHAR(249) NOT NULL,
    dlq_partition INT NOT NULL,
    dlq_offset BIGINT NOT NULL,
    device_id VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    -- The cleaned record to produce, as JSON; NULL once there is nothing left to produce.
    cleaned MEDIUMTEXT NULL,
    -- 0 while the cleaned record waits for Kafka's acknowledgement; 1 once produced, or when the
    -- event was in the table already (its cleaned record was produced when it was first stored).
    produced BOOLEAN NOT NULL DEFAULT FALSE,
    replayed_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (dlq_topic, dlq_partition, dlq_offset),
    KEY pending (produced)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;
