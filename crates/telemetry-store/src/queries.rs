//! What the API reads: devices with their recent counts, downsampled time series and the DLQ index.
//! Every value from a request is a bound parameter.

use chrono::{DateTime, Duration, NaiveDateTime, Utc};
use sqlx::Row as _;

use crate::{Result, Store};

/// A device with what the API needs to judge its health.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSummary {
    /// The device id.
    pub device_id: String,
    /// When it was first seen (accepted or rejected).
    pub first_seen: DateTime<Utc>,
    /// When it was last seen (accepted or rejected).
    pub last_seen: DateTime<Utc>,
    /// When its latest accepted record was received.
    pub last_accepted: Option<DateTime<Utc>>,
    /// When its latest rejected record was received.
    pub last_rejected: Option<DateTime<Utc>>,
    /// Accepted events received in the hour before `now` (the 60 whole minutes after the one
    /// an hour ago, up to and including the current one).
    pub events_last_hour: u64,
    /// Accepted events received in the day before `now`, by the same whole minutes.
    pub events_last_day: u64,
    /// Rejected records received in the hour before `now`.
    pub dlq_last_hour: u64,
    /// Rejected records received in the day before `now`.
    pub dlq_last_day: u64,
    /// The metric names of its latest accepted event (by device time), sorted.
    pub metrics: Vec<String>,
}

/// Which devices to list: one page of them in device-id order, as the database orders ids (the
/// column's collation). Paging and the scope are applied in the query, so a token that sees few
/// devices still gets full pages.
#[derive(Debug, Clone)]
pub struct DevicePage<'a> {
    /// Only devices after this id (the last one of the previous page); `None`: from the first.
    pub after: Option<&'a str>,
    /// Only devices in this scope.
    pub scope: &'a telemetry_core::DeviceScope,
    /// At most this many.
    pub limit: u32,
}

/// One device's metric over a time range, cut into equal buckets.
#[derive(Debug, Clone)]
pub struct SeriesQuery<'a> {
    /// The device.
    pub device_id: &'a str,
    /// The metric's name, as stored (canonical).
    pub metric: &'a str,
    /// Start of the range (device time, inclusive).
    pub from: DateTime<Utc>,
    /// End of the range (device time, exclusive).
    pub to: DateTime<Utc>,
    /// Bucket width; at least one millisecond.
    pub bucket: Duration,
}

/// The readings of one bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    /// Start of the bucket, UTC milliseconds.
    pub start: i64,
    /// Readings in it.
    pub count: u64,
    /// Smallest reading.
    pub min: f64,
    /// Mean reading.
    pub avg: f64,
    /// Largest reading.
    pub max: f64,
}

/// Which rejected records to list.
#[derive(Debug, Clone)]
pub struct DeadLetterFilter<'a> {
    /// Only this device's.
    pub device_id: Option<&'a str>,
    /// Only those with this reason code.
    pub code: Option<&'a str>,
    /// Only devices in this scope (records without a device only with every device).
    pub scope: &'a telemetry_core::DeviceScope,
    /// At most this many, newest first.
    pub limit: u32,
    /// Each payload cut (by the query, so no more is read) to its first this many bytes; the
    /// entry's `payload_bytes` still says how long the original was.
    pub max_payload_bytes: u32,
}

/// One indexed rejected record.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterEntry {
    /// Its id in the index (increasing with indexing order).
    pub id: u64,
    /// When the bridge received it.
    pub received_at: DateTime<Utc>,
    /// The device it was published for, when known.
    pub device_id: Option<String>,
    /// The stable reason code.
    pub code: String,
    /// The human-readable reason.
    pub message: String,
    /// The payload field at fault.
    pub field: Option<String>,
    /// The contract rule that failed.
    pub rule: Option<String>,
    /// The contract version it was checked against.
    pub contract_version: u32,
    /// The raw topic it was read from.
    pub source_topic: String,
    /// Its partition there.
    pub source_partition: i32,
    /// Its offset there.
    pub source_offset: i64,
    /// The original bytes: at most the filter's `max_payload_bytes` of them (and the index keeps at
    /// most 64 KiB).
    pub payload: Vec<u8>,
    /// The original payload's full length.
    pub payload_bytes: u32,
}

impl Store {
    /// One page of the devices seen (see [`DevicePage`]), sorted by id, with their counts for
    /// the hour and day before `now`.
    pub async fn devices(
        &self,
        now: DateTime<Utc>,
        page: &DevicePage<'_>,
    ) -> Result<Vec<DeviceSummary>> {
        let hour_ago = minute_of(now - Duration::hours(1));
        let day_ago = minute_of(now - Duration::days(1));
        // The page is cut from `devices` first (its primary key, in order, from the cursor on);
        // only its devices' minutes are read. Counts come from `device_minutes` (one row per
        // device and minute), whole minutes: the hour is the 60 minutes up to the current one.
        // (Binary-collated ids are read as text through CAST.)
        let mut query = sqlx::QueryBuilder::<sqlx::MySql>::new(
            "SELECT CAST(d.device_id AS CHAR) AS device_id, d.first_seen, d.last_seen, \
                    d.last_accepted, d.last_rejected, \
                    CAST(COALESCE(SUM(IF(m.minute > ",
        );
        query
            .push_bind(hour_ago)
            .push(
                ", m.accepted, 0)), 0) AS UNSIGNED) AS events_last_hour, \
                 CAST(COALESCE(SUM(m.accepted), 0) AS UNSIGNED) AS events_last_day, \
                 CAST(COALESCE(SUM(IF(m.minute > ",
            )
            .push_bind(hour_ago)
            .push(
                ", m.rejected, 0)), 0) AS UNSIGNED) AS dlq_last_hour, \
                 CAST(COALESCE(SUM(m.rejected), 0) AS UNSIGNED) AS dlq_last_day \
                 FROM (SELECT device_id, first_seen, last_seen, last_accepted, last_rejected \
                       FROM devices WHERE 1 = 1",
            );
        if let Some(after) = page.after {
            query.push(" AND device_id > ").push_bind(after.to_string());
        }
        push_scope(&mut query, "device_id", page.scope);
        query
            .push(" ORDER BY device_id LIMIT ")
            .push_bind(page.limit)
            .push(
                ") d \
                 LEFT JOIN device_minutes m ON m.device_id = d.device_id AND m.minute > ",
            )
            .push_bind(day_ago)
            .push(
                " GROUP BY d.device_id, d.first_seen, d.last_seen, d.last_accepted, \
                 d.last_rejected \
                 ORDER BY d.device_id",
            );
        let rows = query.build().fetch_all(&self.pool).await?;
        let mut devices = Vec::with_capacity(rows.len());
        for row in rows {
            devices.push(DeviceSummary {
                device_id: row.try_get("device_id")?,
                first_seen: utc(row.try_get("first_seen")?),
                last_seen: utc(row.try_get("last_seen")?),
                last_accepted: row
                    .try_get::<Option<NaiveDateTime>, _>("last_accepted")?
                    .map(utc),
                last_rejected: row
                    .try_get::<Option<NaiveDateTime>, _>("last_rejected")?
                    .map(utc),
                events_last_hour: count(&row, "events_last_hour")?,
                events_last_day: count(&row, "events_last_day")?,
                dlq_last_hour: count(&row, "dlq_last_hour")?,
                dlq_last_day: count(&row, "dlq_last_day")?,
                metrics: Vec::new(),
            });
        }
        if devices.is_empty() {
            return Ok(devices);
        }
        // Each listed device's latest row by device time: the newest end of its primary-key
        // range.
        let mut latest = sqlx::QueryBuilder::<sqlx::MySql>::new(
            "SELECT CAST(t.device_id AS CHAR) AS device_id, \
                    CAST(JSON_KEYS(t.metrics) AS CHAR) AS names \
             FROM telemetry t \
             JOIN (SELECT device_id, MAX(device_ts) AS device_ts FROM telemetry \
                   WHERE device_id IN (",
        );
        let mut ids = latest.separated(", ");
        for device in &devices {
            ids.push_bind(device.device_id.clone());
        }
        latest.push(
            ") GROUP BY device_id) latest \
             ON latest.device_id = t.device_id AND latest.device_ts = t.device_ts",
        );
        let rows = latest.build().fetch_all(&self.pool).await?;
        let mut names = Vec::with_capacity(rows.len());
        for row in rows {
            let device_id: String = row.try_get("device_id")?;
            let listed: Option<String> = row.try_get("names")?;
            let listed: Vec<String> = listed
                .and_then(|listed| serde_json::from_str(&listed).ok())
                .unwrap_or_default();
            names.push((device_id, listed));
        }
        add_metric_names(&mut devices, names);
        Ok(devices)
    }

    /// Whether the device has been seen: exactly this id (`pico-7 ` is not `pico-7`).
    pub async fn device_exists(&self, device_id: &str) -> Result<bool> {
        let mut query = sqlx::QueryBuilder::<sqlx::MySql>::new("SELECT 1 FROM devices WHERE ");
        push_device_is(&mut query, "device_id", device_id);
        let found: Option<i32> = query
            .build_query_scalar()
            .fetch_optional(&self.pool)
            .await?;
        Ok(found.is_some())
    }

    /// The device time of the device's earliest stored event (one step along the primary key), or
    /// `None` when it has none.
    pub async fn first_event_ts(&self, device_id: &str) -> Result<Option<i64>> {
        let first: Option<NaiveDateTime> =
            sqlx::query_scalar("SELECT MIN(device_ts) FROM telemetry WHERE device_id = ?")
                .bind(device_id)
                .fetch_one(&self.pool)
                .await?;
        Ok(first.map(|first| first.and_utc().timestamp_millis()))
    }

    /// The metric's readings in the range, aggregated per bucket on the database side; only
    /// buckets with readings, in time order. A range read of the device's rows (the primary
    /// key); ranges longer than [`PARALLEL_FROM`] are read as [`PARALLEL_PARTS`] parts, split on
    /// bucket boundaries, on as many connections at once (the database reads each part on a core
    /// of its own).
    pub async fn series(&self, query: &SeriesQuery<'_>) -> Result<Vec<Bucket>> {
        let bucket = query.bucket.max(Duration::milliseconds(1));
        let span = query.to - query.from;
        let buckets =
            (span.num_milliseconds() + bucket.num_milliseconds() - 1) / bucket.num_milliseconds();
        let parts = if span > PARALLEL_FROM {
            PARALLEL_PARTS.min(buckets.max(1))
        } else {
            1
        };
        let reads = (0..parts).map(|part| {
            let first = buckets * part / parts;
            let last = buckets * (part + 1) / parts;
            let start = query.from + bucket * i32::try_from(first).unwrap_or(i32::MAX);
            let end = (query.from + bucket * i32::try_from(last).unwrap_or(i32::MAX)).min(query.to);
            self.series_part(
                query,
                bucket,
                start,
                if part + 1 == parts { query.to } else { end },
            )
        });
        let parts = futures::future::try_join_all(reads).await?;
        Ok(parts.into_iter().flatten().collect())
    }

    /// The buckets of `query` with readings in `[start, end)`. Each row's metric is read once:
    /// the inner query is materialized (the LIMIT keeps the optimizer from merging it, which
    /// would parse the JSON once per aggregate).
    async fn series_part(
        &self,
        query: &SeriesQuery<'_>,
        bucket: Duration,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Result<Vec<Bucket>> {
        let bucket_micros = bucket.num_microseconds().unwrap_or(i64::MAX).max(1);
        let bucket_millis = bucket.num_milliseconds().max(1);
        let rows = sqlx::query(
            "SELECT bucket, COUNT(reading) AS readings, MIN(reading) AS min, AVG(reading) AS avg, \
                    MAX(reading) AS max \
             FROM (SELECT TIMESTAMPDIFF(MICROSECOND, ?, device_ts) DIV ? AS bucket, \
                          CAST(JSON_VALUE(metrics, ?) AS DOUBLE) AS reading \
                   FROM telemetry \
                   WHERE device_id = ? AND device_ts >= ? AND device_ts < ? \
                   LIMIT 18446744073709551615) readings \
             WHERE reading IS NOT NULL \
             GROUP BY bucket ORDER BY bucket",
        )
        .bind(query.from.naive_utc())
        .bind(bucket_micros)
        .bind(json_path(query.metric))
        .bind(query.device_id)
        .bind(start.naive_utc())
        .bind(end.naive_utc())
        .fetch_all(&self.pool)
        .await?;
        let origin = query.from.timestamp_millis();
        let mut buckets = Vec::with_capacity(rows.len());
        for row in rows {
            let index: i64 = row.try_get("bucket")?;
            buckets.push(Bucket {
                start: origin.saturating_add(index.saturating_mul(bucket_millis)),
                count: count(&row, "readings")?,
                min: row.try_get("min")?,
                avg: row.try_get("avg")?,
                max: row.try_get("max")?,
            });
        }
        Ok(buckets)
    }

    /// The newest indexed rejected records matching `filter`, each payload cut to the filter's
    /// `max_payload_bytes` by the database.
    pub async fn dead_letters(
        &self,
        filter: &DeadLetterFilter<'_>,
    ) -> Result<Vec<DeadLetterEntry>> {
        // `payload` is a BLOB: SUBSTRING counts bytes.
        let mut query = sqlx::QueryBuilder::<sqlx::MySql>::new(
            "SELECT id, received_at, CAST(device_id AS CHAR) AS device_id, code, message, field, \
                    rule, contract_version, source_topic, source_partition, source_offset, \
                    SUBSTRING(payload, 1, ",
        );
        query.push_bind(filter.max_payload_bytes).push(
            ") AS payload, payload_bytes \
             FROM dlq_events WHERE 1 = 1",
        );
        if let Some(device_id) = filter.device_id {
            query.push(" AND ");
            push_device_is(&mut query, "device_id", device_id);
        }
        if let Some(code) = filter.code {
            query.push(" AND code = ").push_bind(code);
        }
        push_scope(&mut query, "device_id", filter.scope);
        query
            .push(" ORDER BY id DESC LIMIT ")
            .push_bind(filter.limit);
        let rows = query.build().fetch_all(&self.pool).await?;
        let mut entries = Vec::with_capacity(rows.len());
        for row in rows {
            entries.push(DeadLetterEntry {
                id: row.try_get("id")?,
                received_at: utc(row.try_get("received_at")?),
                device_id: row.try_get("device_id")?,
                code: row.try_get("code")?,
                message: row.try_get("message")?,
                field: row.try_get("field")?,
                rule: row.try_get("rule")?,
                contract_version: row.try_get("contract_version")?,
                source_topic: row.try_get("source_topic")?,
                source_partition: row.try_get("source_partition")?,
                source_offset: row.try_get("source_offset")?,
                payload: row.try_get("payload")?,
                payload_bytes: row.try_get("payload_bytes")?,
            });
        }
        Ok(entries)
    }
}

/// Adds the metric names of each device's latest event (`(device id, names)`) to its summary,
/// sorted and once each: two events may share the latest device time. Ids match exactly (the
/// database may have matched `pico-7 ` to `pico-7`).
pub(crate) fn add_metric_names(
    devices: &mut [DeviceSummary],
    names: impl IntoIterator<Item = (String, Vec<String>)>,
) {
    let index: std::collections::HashMap<String, usize> = devices
        .iter()
        .enumerate()
        .map(|(position, device)| (device.device_id.clone(), position))
        .collect();
    for (device_id, listed) in names {
        if let Some(&position) = index.get(&device_id) {
            let metrics = &mut devices[position].metrics;
            metrics.extend(listed);
            metrics.sort_unstable();
            metrics.dedup();
        }
    }
}

/// Ranges longer than this are read in parts at once.
const PARALLEL_FROM: Duration = Duration::hours(2);
/// Parts a long range is read in: the cores of a small database server.
const PARALLEL_PARTS: i64 = 2;

/// The JSON path of a top-level member, quoted so any name is read as a name.
pub(crate) fn json_path(name: &str) -> String {
    let mut path = String::with_capacity(name.len() + 4);
    path.push_str("$.\"");
    for character in name.chars() {
        if matches!(character, '"' | '\\') {
            path.push('\\');
        }
        path.push(character);
    }
    path.push('"');
    path
}

/// The start of the minute `time` is in.
pub(crate) fn minute_of(time: DateTime<Utc>) -> NaiveDateTime {
    let seconds = time.timestamp();
    DateTime::from_timestamp(seconds - seconds.rem_euclid(60), 0)
        .unwrap_or(time)
        .naive_utc()
}

fn utc(time: NaiveDateTime) -> DateTime<Utc> {
    time.and_utc()
}

/// A count column, whatever integer type the server gives it.
fn count(row: &sqlx::mysql::MySqlRow, column: &str) -> Result<u64> {
    Ok(match row.try_get::<u64, _>(column) {
        Ok(value) => value,
        Err(_) => u64::try_from(row.try_get::<i64, _>(column)?).unwrap_or(0),
    })
}

/// Appends ` AND (...)` restricting rows to `scope`'s devices; nothing for every device.
/// Patterns are bound, never spliced.
pub(crate) fn push_scope(
    query: &mut sqlx::QueryBuilder<'_, sqlx::MySql>,
    column: &'static str,
    scope: &telemetry_core::DeviceScope,
) {
    use telemetry_core::{DevicePattern, DeviceScope};
    let DeviceScope::Only(patterns) = scope else {
        return;
    };
    query.push(" AND (FALSE");
    for pattern in patterns {
        query.push(" OR ");
        match pattern {
            DevicePattern::Exact(id) => push_device_is(query, column, id),
            DevicePattern::Prefix(prefix) => {
                query
                    .push(column)
                    .push(" LIKE ")
                    .push_bind(like_pattern(prefix, "%"))
                    .push(" ESCAPE '!'");
            }
        }
    }
    query.push(")");
}

/// Appends `(<column> = ? AND <column> LIKE ?)`: exactly `device_id`. `=` alone is not exact:
/// MariaDB's `_bin` collations ignore trailing spaces (`'pico-7 ' = 'pico-7'`), and device ids
/// taken from MQTT topics may end in one; `LIKE` compares every character, and `=` keeps the
/// index in use.
pub(crate) fn push_device_is(
    query: &mut sqlx::QueryBuilder<'_, sqlx::MySql>,
    column: &'static str,
    device_id: &str,
) {
    query
        .push("(")
        .push(column)
        .push(" = ")
        .push_bind(device_id.to_string())
        .push(" AND ")
        .push(column)
        .push(" LIKE ")
        .push_bind(like_pattern(device_id, ""))
        .push(" ESCAPE '!')");
}

/// `text` as a `LIKE` pattern (escape character `!`, named in the query so the server's SQL mode
/// does not matter) matching itself, followed by `suffix`.
fn like_pattern(text: &str, suffix: &str) -> String {
    let mut like = String::with_capacity(text.len() + suffix.len() + 4);
    for character in text.chars() {
        if matches!(character, '%' | '_' | '!') {
            like.push('!');
        }
        like.push(character);
    }
    like.push_str(suffix);
    like
}

#[cfg(test)]
mod tests {
    use super::{json_path, like_pattern};

    #[test]
    fn like_patterns_match_themselves() {
        assert_eq!(like_pattern("a_b%c!d", "%"), "a!_b!%c!!d%");
        assert_eq!(like_pattern("pico-7", ""), "pico-7");
    }

    #[test]
    fn json_paths_quote_the_name() {
        assert_eq!(json_path("temperature_c"), r#"$."temperature_c""#);
        assert_eq!(json_path(r#"a"b\c"#), r#"$."a\"b\\c""#);
    }
}
