-- `telemetry rollup` on the SQLite store (the MySQL schema's 0005 in SQLite's terms): per-device,
-- per-metric aggregates by minute and by hour of device time. Times are UTC milliseconds. The sum
-- is exact: `sum_value` holds it as the decimal text of DECIMAL(38, 9) (SQLite has no such type),
-- and the store adds to it in Rust, inside the batch's transaction.
CREATE TABLE IF NOT EXISTS rollup_1m (
    device_id TEXT NOT NULL,
    metric TEXT NOT NULL,
    bucket_start INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    min_value REAL NOT NULL,
    max_value REAL NOT NULL,
    sum_value TEXT NOT NULL,
    last_value REAL NOT NULL,
    last_ts INTEGER NOT NULL,
    last_seq_key INTEGER NOT NULL,
    PRIMARY KEY (device_id, metric, bucket_start)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS rollup_1h (
    device_id TEXT NOT NULL,
    metric TEXT NOT NULL,
    bucket_start INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    min_value REAL NOT NULL,
    max_value REAL NOT NULL,
    sum_value TEXT NOT NULL,
    last_value REAL NOT NULL,
    last_ts INTEGER NOT NULL,
    last_seq_key INTEGER NOT NULL,
    PRIMARY KEY (device_id, metric, bucket_start)
) WITHOUT ROWID;

-- Per device: the earliest device time rolled up and the latest (the watermark).
CREATE TABLE IF NOT EXISTS rollup_devices (
    device_id TEXT NOT NULL PRIMARY KEY,
    first_ts INTEGER NOT NULL,
    watermark_ts INTEGER NOT NULL
) WITHOUT ROWID;

-- Identities of the events folded in whose device time is still inside the late window.
CREATE TABLE IF NOT EXISTS rollup_seen (
    device_id TEXT NOT NULL,
    device_ts INTEGER NOT NULL,
    seq_key INTEGER NOT NULL,
    PRIMARY KEY (device_id, device_ts, seq_key)
) WITHOUT ROWID;
