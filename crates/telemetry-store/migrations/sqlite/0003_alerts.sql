-- `telemetry alert` on the SQLite store (the MySQL schema's 0006 in SQLite's terms): the rules'
-- states, the alerts waiting for Kafka and the webhook, and the offsets the states reflect.
CREATE TABLE IF NOT EXISTS alert_states (
    rule TEXT NOT NULL,
    device_id TEXT NOT NULL,
    state TEXT NOT NULL,
    updated_at INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000 AS INTEGER)),
    PRIMARY KEY (rule, device_id)
) WITHOUT ROWID;

-- `webhook`: 0 waiting, 1 delivered, 2 given up, 3 no webhook configured. Times: UTC milliseconds.
CREATE TABLE IF NOT EXISTS alert_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    alert_id TEXT NOT NULL,
    status TEXT NOT NULL,
    device_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    produced INTEGER NOT NULL DEFAULT 0,
    webhook INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000 AS INTEGER)),
    created_at INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000 AS INTEGER)),
    -- An alert's firing or resolving is written once, however often its input is read again.
    UNIQUE (alert_id, status)
);
CREATE INDEX IF NOT EXISTS alert_outbox_unproduced ON alert_outbox (produced, id);
CREATE INDEX IF NOT EXISTS alert_outbox_webhook_due ON alert_outbox (webhook, id);
CREATE INDEX IF NOT EXISTS alert_outbox_by_device ON alert_outbox (device_id, id);

CREATE TABLE IF NOT EXISTS alert_offsets (
    group_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    kafka_partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (group_id, topic, kafka_partition)
) WITHOUT ROWID;
