-- The telemetry table: one row per accepted event, written only by the audit service.
CREATE TABLE IF NOT EXISTS telemetry (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    -- Device ids are case-sensitive identifiers: `Pico-1` and `pico-1` are two devices.
    device_id VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    -- Device time, normalized to UTC.
    device_ts DATETIME(3) NOT NULL,
    -- The device's sequence number when it sends one.
    seq BIGINT NULL,
    -- NULLs are distinct in a unique key, so the identity uses -1 for "no sequence number".
    seq_key BIGINT AS (IFNULL(seq, -1)) PERSISTENT,
    -- When the bridge received the event, UTC.
    received_at DATETIME(3) NOT NULL,
    -- Numeric metrics by name, e.g. {"temperature": 21.5}.
    metrics JSON NOT NULL,
    -- Where the raw record is in Kafka, so every row can be traced and replayed.
    source_topic VARCHAR(249) NOT NULL,
    source_partition INT NOT NULL,
    source_offset BIGINT NOT NULL,
    written_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    -- The event's identity: a redelivered or replayed event never creates a second row.
    UNIQUE KEY event_identity (device_id, device_ts, seq_key)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;
