-- `telemetry rollup` (issue 9): per-device, per-metric aggregates of the cleaned topic by minute
-- and by hour of device time, written only by the rollup service. Each event is folded in once
-- (`rollup_seen` remembers the identities inside the late window), so redelivery and replay
-- change nothing; the API reads these for long ranges. Every column is order-independent (the sum
-- is exact, in fixed point), so however the stream is cut into batches the tables come out the
-- same.

-- One row per device, metric and minute of device time (UTC). `avg_value` is computed.
CREATE TABLE IF NOT EXISTS rollup_1m (
    device_id VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    metric VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    bucket_start DATETIME NOT NULL,
    samples INT UNSIGNED NOT NULL,
    min_value DOUBLE NOT NULL,
    max_value DOUBLE NOT NULL,
    -- Exact: readings are rounded to 1e-9 and added as decimals.
    sum_value DECIMAL(38, 9) NOT NULL,
    avg_value DOUBLE AS (sum_value / samples) VIRTUAL,
    -- The reading with the latest device time (ties: the highest seq) and that time.
    last_value DOUBLE NOT NULL,
    last_ts DATETIME(3) NOT NULL,
    last_seq_key BIGINT NOT NULL,
    PRIMARY KEY (device_id, metric, bucket_start)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;

-- The same by hour.
CREATE TABLE IF NOT EXISTS rollup_1h LIKE rollup_1m;

-- Per device: the latest device time rolled up (the watermark: events older than it by more than
-- the late window are not folded in) and the earliest.
CREATE TABLE IF NOT EXISTS rollup_devices (
    device_id VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    first_ts DATETIME(3) NOT NULL,
    watermark_ts DATETIME(3) NOT NULL,
    PRIMARY KEY (device_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;

-- Identities of the events folded in whose device time is still inside the late window; older
-- ones are deleted as the watermark moves (an event that old is not folded in anyway).
CREATE TABLE IF NOT EXISTS rollup_seen (
    device_id VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    device_ts DATETIME(3) NOT NULL,
    seq_key BIGINT NOT NULL,
    PRIMARY KEY (device_id, device_ts, seq_key)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;
