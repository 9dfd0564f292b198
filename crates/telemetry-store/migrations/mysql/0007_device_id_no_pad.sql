-- Device ids compared exactly (issue 19). `utf8mb4_bin` is a PAD SPACE collation: trailing spaces
-- are ignored in comparisons, so `pico-7 ` (a device id taken from an MQTT topic) and `pico-7`
-- were one row of `devices`, one row per minute of `device_minutes`, one alert state, and `=`
-- matched both. These columns move to a NO PAD binary collation, which compares every character
-- (code point order, as before).
--
-- Only the columns that can hold a device id taken from an MQTT topic (a rejected record's key):
-- `telemetry`, `dlq_replays` and the rollup tables hold validated ids only, whose characters the
-- contract limits (no spaces), so they keep `utf8mb4_bin`. A comparison between columns of both
-- kinds (a join of `devices` with `telemetry`, say) is an "Illegal mix of collations" error:
-- name a collation in such a query (`... = t.device_id COLLATE utf8mb4_nopad_bin`).
--
-- MariaDB (10.2.2 and later) runs the `/*M! */` part: `utf8mb4_nopad_bin`. MySQL skips it and
-- runs the `/*!80017 */` part (MariaDB skips MySQL-only version comments from 5.7 up):
-- `utf8mb4_0900_bin`, NO PAD, from MySQL 8.0.17. Older MySQL has no NO PAD binary collation for
-- utf8mb4; there this migration fails and the services do not start.
--
-- Existing rows stay as they are (a row that merged two ids keeps the first one's spelling); each
-- ALTER rebuilds its table, which is small: the devices, two days of minutes, the bounded DLQ
-- index and the alerter's states and recent alerts.

ALTER TABLE devices
    MODIFY device_id VARCHAR(128) CHARACTER SET utf8mb4
        COLLATE /*M! utf8mb4_nopad_bin */ /*!80017 utf8mb4_0900_bin */ NOT NULL;

ALTER TABLE device_minutes
    MODIFY device_id VARCHAR(128) CHARACTER SET utf8mb4
        COLLATE /*M! utf8mb4_nopad_bin */ /*!80017 utf8mb4_0900_bin */ NOT NULL;

ALTER TABLE dlq_events
    MODIFY device_id VARCHAR(128) CHARACTER SET utf8mb4
        COLLATE /*M! utf8mb4_nopad_bin */ /*!80017 utf8mb4_0900_bin */ NULL;

ALTER TABLE alert_states
    MODIFY device_id VARCHAR(128) CHARACTER SET utf8mb4
        COLLATE /*M! utf8mb4_nopad_bin */ /*!80017 utf8mb4_0900_bin */ NOT NULL;

ALTER TABLE alert_outbox
    MODIFY device_id VARCHAR(128) CHARACTER SET utf8mb4
        COLLATE /*M! utf8mb4_nopad_bin */ /*!80017 utf8mb4_0900_bin */ NOT NULL;
