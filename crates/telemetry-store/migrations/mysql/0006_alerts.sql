-- `telemetry alert` (issue 9): where every rule stands for every device, so alerts fire and
-- resolve once across restarts, how far into its topics that state goes, and the alerts waiting to
-- reach Kafka and the webhook.

-- One row per rule and device with something to remember: a pending or firing alert, the time of
-- the device's latest event (silence rules), the latest rejections (DLQ-rate rules). The state is
-- the engine's, as JSON.
CREATE TABLE IF NOT EXISTS alert_states (
    rule VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    device_id VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    state JSON NOT NULL,
    updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (rule, device_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;

-- Alerts fired or resolved, written in the transaction that moved the states: produced to the
-- alerts topic (then `produced` = 1) and POSTed to the webhook (`webhook`: 0 waiting, 1 delivered,
-- 2 given up after the last attempt, 3 no webhook configured). Delivered rows are deleted after a
-- week.
CREATE TABLE IF NOT EXISTS alert_outbox (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    alert_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    status VARCHAR(16) NOT NULL,
    device_id VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    payload JSON NOT NULL,
    produced BOOLEAN NOT NULL DEFAULT FALSE,
    webhook TINYINT UNSIGNED NOT NULL DEFAULT 0,
    attempts INT UNSIGNED NOT NULL DEFAULT 0,
    next_attempt_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    -- An alert's firing or resolving is written once, however often its input is read again.
    UNIQUE KEY transition (alert_id, status),
    KEY unproduced (produced, id),
    KEY webhook_due (webhook, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;

-- The next offset of each partition of the alerter's topics that `alert_states` already reflects,
-- written in the same transaction as the states: a record redelivered after a crash (its Kafka
-- offset not committed yet) is skipped, not counted twice.
CREATE TABLE IF NOT EXISTS alert_offsets (
    group_id VARCHAR(255) NOT NULL,
    topic VARCHAR(249) NOT NULL,
    kafka_partition INT NOT NULL,
    next_offset BIGINT NOT NULL,
    PRIMARY KEY (group_id, topic, kafka_partition)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;
