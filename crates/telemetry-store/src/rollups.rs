//! The rollup tables (`rollup_1m`, `rollup_1h`): per-device, per-metric aggregates by minute and
//! by hour of device time, written only by `telemetry rollup` and read by the API for long ranges.
//!
//! Folding is exactly-once in effect over an at-least-once stream: every batch is one
//! transaction that folds in only events it has not folded before (`rollup_seen` holds the
//! identities inside the late window) and that are not older than their device's watermark by
//! more than the window. A batch's readings are aggregated per bucket in memory and added to the
//! stored rows by one upsert per table: count, min, max and last do not depend on the order, and
//! the sum is exact (fixed point, 1e-9), so however the stream is cut into batches, replaying the
//! topic gives the same tables, bit for bit.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::{MySql, MySqlConnection, QueryBuilder, Row as _};
use telemetry_core::Event;

use crate::queries::Bucket;
use crate::{utc_datetime, Result, Store, NO_SEQ, ROWS_PER_STATEMENT};

/// Longest metric name the rollup tables store (their `metric` column); longer names are left
/// out of the rollups, and counted.
pub const MAX_METRIC_NAME_CHARS: usize = 128;

/// A rollup table: its bucket width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resolution {
    /// `rollup_1m`: one bucket per minute.
    Minute,
    /// `rollup_1h`: one bucket per hour.
    Hour,
}

impl Resolution {
    /// Both tables, finest first.
    pub const ALL: [Resolution; 2] = [Resolution::Minute, Resolution::Hour];

    /// The table's name.
    pub fn table(self) -> &'static str {
        match self {
            Resolution::Minute => "rollup_1m",
            Resolution::Hour => "rollup_1h",
        }
    }

    /// Bucket width in milliseconds.
    pub fn millis(self) -> i64 {
        match self {
            Resolution::Minute => 60_000,
            Resolution::Hour => 3_600_000,
        }
    }

    /// Start of the bucket holding `millis`.
    pub(crate) fn bucket_of(self, millis: i64) -> i64 {
        millis.div_euclid(self.millis()) * self.millis()
    }
}

/// What one call of [`Store::roll_up`] did with its events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RollupOutcome {
    /// Events folded into the rollups.
    pub folded: u64,
    /// Events folded in before (redelivered, replayed, or sent twice): left out.
    pub duplicates: u64,
    /// Events older than their device's watermark by more than the late window: left out.
    pub too_late: u64,
    /// Metric readings left out because the name is longer than [`MAX_METRIC_NAME_CHARS`] or the
    /// value is not finite.
    pub skipped_readings: u64,
}

/// Readings are summed in units of 1e-9, exactly (`sum_value DECIMAL(38, 9)`).
const SUM_SCALE: f64 = 1e9;

/// Largest reading (in magnitude) the rollups take: its fixed-point sum over a bucket stays inside
/// `DECIMAL(38, 9)`. Larger readings are left out and counted.
pub const MAX_ROLLUP_READING: f64 = 1e15;

/// One bucket's aggregate of one metric.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aggregate {
    /// Readings folded in.
    pub samples: u32,
    /// Smallest reading.
    pub min: f64,
    /// Largest reading.
    pub max: f64,
    /// Sum of the readings, each rounded to 1e-9, in units of 1e-9: exact.
    pub sum_nanos: i128,
    /// The reading with the latest device time (ties: the highest `seq`).
    pub last: f64,
    /// Its device time, UTC milliseconds.
    pub last_ts: i64,
    /// Its `seq`, or -1 when it had none.
    pub last_seq_key: i64,
}

/// `value` in units of 1e-9, rounded; for readings within [`MAX_ROLLUP_READING`].
#[allow(clippy::cast_possible_truncation)]
fn nanos(value: f64) -> i128 {
    (value * SUM_SCALE).round() as i128
}

impl Aggregate {
    /// The aggregate of one reading.
    pub fn new(device_ts: i64, seq_key: i64, value: f64) -> Self {
        Aggregate {
            samples: 1,
            min: value,
            max: value,
            sum_nanos: nanos(value),
            last: value,
            last_ts: device_ts,
            last_seq_key: seq_key,
        }
    }

    /// Folds in one more reading.
    pub fn add(&mut self, device_ts: i64, seq_key: i64, value: f64) {
        self.merge(&Aggregate::new(device_ts, seq_key, value));
    }

    /// Folds in another aggregate: the same as folding in its readings, in any order.
    pub fn merge(&mut self, other: &Aggregate) {
        self.samples = self.samples.saturating_add(other.samples);
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sum_nanos += other.sum_nanos;
        if (other.last_ts, other.last_seq_key) > (self.last_ts, self.last_seq_key) {
            self.last = other.last;
            self.last_ts = other.last_ts;
            self.last_seq_key = other.last_seq_key;
        }
    }

    /// The sum of the readings.
    #[allow(clippy::cast_precision_loss)]
    pub fn sum(&self) -> f64 {
        self.sum_nanos as f64 / SUM_SCALE
    }

    /// The mean reading.
    pub fn avg(&self) -> f64 {
        self.sum() / f64::from(self.samples.max(1))
    }
}

/// `nanos` as the DECIMAL(38, 9) literal MariaDB parses exactly.
pub(crate) fn decimal(nanos: i128) -> String {
    let sign = if nanos < 0 { "-" } else { "" };
    let magnitude = nanos.unsigned_abs();
    format!(
        "{sign}{}.{:09}",
        magnitude / 1_000_000_000,
        magnitude % 1_000_000_000
    )
}

/// A DECIMAL(38, 9) as MariaDB prints it, in units of 1e-9.
pub(crate) fn parse_decimal(text: &str) -> Option<i128> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if fraction.len() > 9 || !fraction.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    let negative = whole.starts_with('-');
    let whole: i128 = whole.trim_start_matches('-').parse().ok()?;
    let fraction: i128 = format!("{fraction:0<9}").parse().ok()?;
    let magnitude = whole.checked_mul(1_000_000_000)?.checked_add(fraction)?;
    Some(if negative { -magnitude } else { magnitude })
}

/// A device's position in the stream: what the late window is measured from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RollupCoverage {
    /// Earliest device time folded in, UTC milliseconds.
    pub first_ts: i64,
    /// Latest device time folded in (the watermark), UTC milliseconds.
    pub watermark_ts: i64,
}

/// One stored rollup row, as [`Store::rollup_rows`] reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct RollupRow {
    /// The device.
    pub device_id: String,
    /// The metric.
    pub metric: String,
    /// Start of the bucket, UTC milliseconds.
    pub bucket_start: i64,
    /// The aggregate.
    pub aggregate: Aggregate,
}

/// (device, metric, bucket start in ms).
pub(crate) type BucketKey<'a> = (&'a str, &'a str, i64);
/// (device, device_ts, seq_key).
type Identity = (String, NaiveDateTime, i64);

impl Store {
    /// Folds `events` (in stream order) into the rollup tables in one transaction; see the module
    /// documentation. `late_window_ms`: how far behind its device's watermark (latest device time
    /// folded in) an event may be and still be folded in.
    pub async fn roll_up(&self, events: &[Event], late_window_ms: i64) -> Result<RollupOutcome> {
        let mut outcome = RollupOutcome::default();
        if events.is_empty() {
            return Ok(outcome);
        }
        let by_device = by_device(events);
        let devices: Vec<&str> = by_device.keys().copied().collect();
        let mut transaction = self.pool.begin().await?;
        let mut coverage = lock_coverage(&mut transaction, &devices).await?;
        let candidates = candidates(&by_device, &mut coverage, late_window_ms, &mut outcome);
        let seen = seen_before(&mut transaction, &candidates).await?;
        let mut fresh: Vec<&Event> = Vec::with_capacity(candidates.len());
        for event in candidates {
            let identity = (
                event.device_id.clone(),
                utc_datetime(event.device_ts)?,
                event.seq.unwrap_or(NO_SEQ),
            );
            if seen.contains(&identity) {
                outcome.duplicates += 1;
            } else {
                fresh.push(event);
            }
        }
        let tables = bucket_readings(&fresh, &mut outcome);
        for (resolution, buckets) in Resolution::ALL.iter().zip(&tables) {
            add_to_buckets(&mut transaction, *resolution, buckets).await?;
        }
        remember(&mut transaction, &fresh).await?;
        write_coverage(&mut transaction, &coverage, late_window_ms).await?;
        transaction.commit().await?;
        Ok(outcome)
    }

    /// The device's rollup coverage, or `None` when the rollup has not seen it.
    pub async fn rollup_coverage(&self, device_id: &str) -> Result<Option<RollupCoverage>> {
        let row =
            sqlx::query("SELECT first_ts, watermark_ts FROM rollup_devices WHERE device_id = ?")
                .bind(device_id)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|row| {
            Ok(RollupCoverage {
                first_ts: millis(row.try_get("first_ts")?),
                watermark_ts: millis(row.try_get("watermark_ts")?),
            })
        })
        .transpose()
    }

    /// One device's metric from a rollup table, aggregated into buckets of `bucket_ms` (a whole
    /// multiple of the table's width) counted from `from` (on a bucket boundary of the table);
    /// only buckets with readings, in time order.
    pub async fn rollup_series(
        &self,
        resolution: Resolution,
        device_id: &str,
        metric: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        bucket_ms: i64,
    ) -> Result<Vec<Bucket>> {
        let table = resolution.table();
        let bucket_seconds = (bucket_ms / 1_000).max(1);
        let rows = sqlx::query(&format!(
            "SELECT TIMESTAMPDIFF(SECOND, ?, bucket_start) DIV ? AS bucket, \
                    CAST(SUM(samples) AS UNSIGNED) AS readings, MIN(min_value) AS min, \
                    CAST(SUM(sum_value) / SUM(samples) AS DOUBLE) AS avg, MAX(max_value) AS max \
             FROM {table} \
             WHERE device_id = ? AND metric = ? AND bucket_start >= ? AND bucket_start < ? \
             GROUP BY bucket ORDER BY bucket"
        ))
        .bind(from.naive_utc())
        .bind(bucket_seconds)
        .bind(device_id)
        .bind(metric)
        .bind(from.naive_utc())
        .bind(to.naive_utc())
        .fetch_all(&self.pool)
        .await?;
        let origin = from.timestamp_millis();
        let mut buckets = Vec::with_capacity(rows.len());
        for row in rows {
            let index: i64 = row.try_get("bucket")?;
            let readings: u64 = row.try_get("readings")?;
            buckets.push(Bucket {
                start: origin.saturating_add(index.saturating_mul(bucket_seconds * 1_000)),
                count: readings,
                min: row.try_get("min")?,
                avg: row.try_get("avg")?,
                max: row.try_get("max")?,
            });
        }
        Ok(buckets)
    }

    /// Every row of a rollup table for the devices given (all devices when empty), in key order:
    /// for tools and tests that compare tables.
    pub async fn rollup_rows(
        &self,
        resolution: Resolution,
        devices: &[&str],
    ) -> Result<Vec<RollupRow>> {
        let mut query = QueryBuilder::<MySql>::new(format!(
            "SELECT CAST(device_id AS CHAR) AS device_id, CAST(metric AS CHAR) AS metric, \
                    bucket_start, samples, min_value, max_value, \
                    CAST(sum_value AS CHAR) AS sum_value, last_value, last_ts, last_seq_key \
             FROM {} ",
            resolution.table()
        ));
        if !devices.is_empty() {
            query.push("WHERE device_id IN (");
            let mut separated = query.separated(", ");
            for device in devices {
                separated.push_bind(*device);
            }
            query.push(") ");
        }
        query.push("ORDER BY device_id, metric, bucket_start");
        let rows = query.build().fetch_all(&self.pool).await?;
        rows.iter().map(rollup_row).collect()
    }
}

fn rollup_row(row: &sqlx::mysql::MySqlRow) -> Result<RollupRow> {
    Ok(RollupRow {
        device_id: row.try_get("device_id")?,
        metric: row.try_get("metric")?,
        bucket_start: millis(row.try_get("bucket_start")?),
        aggregate: aggregate(row)?,
    })
}

fn aggregate(row: &sqlx::mysql::MySqlRow) -> Result<Aggregate> {
    Ok(Aggregate {
        samples: row.try_get("samples")?,
        min: row.try_get("min_value")?,
        max: row.try_get("max_value")?,
        sum_nanos: {
            let text: String = row.try_get("sum_value")?;
            parse_decimal(&text).ok_or_else(|| {
                sqlx::Error::Decode(format!("sum_value `{text}` is not a DECIMAL(38, 9)").into())
            })?
        },
        last: row.try_get("last_value")?,
        last_ts: millis(row.try_get("last_ts")?),
        last_seq_key: row.try_get("last_seq_key")?,
    })
}

fn millis(time: NaiveDateTime) -> i64 {
    time.and_utc().timestamp_millis()
}

/// A batch's events by device, the devices sorted (so concurrent writers lock in the same order).
pub(crate) fn by_device(events: &[Event]) -> BTreeMap<&str, Vec<&Event>> {
    let mut by_device: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for event in events {
        by_device.entry(&event.device_id).or_default().push(event);
    }
    by_device
}

/// The events of a batch that may be folded in, before the check against the identities stored:
/// inside their device's late window, each identity once. Moves `coverage` on with them and
/// counts what it leaves out in `outcome`.
pub(crate) fn candidates<'a>(
    by_device: &BTreeMap<&'a str, Vec<&'a Event>>,
    coverage: &mut HashMap<&'a str, RollupCoverage>,
    late_window_ms: i64,
    outcome: &mut RollupOutcome,
) -> Vec<&'a Event> {
    let mut candidates: Vec<&Event> = Vec::new();
    let mut in_batch: HashSet<(&str, i64, i64)> = HashSet::new();
    for (device_id, device_events) in by_device {
        let mut device = coverage.get(*device_id).copied();
        for event in device_events {
            let seq_key = event.seq.unwrap_or(NO_SEQ);
            if let Some(device) = device {
                if event.device_ts < device.watermark_ts.saturating_sub(late_window_ms) {
                    outcome.too_late += 1;
                    continue;
                }
            }
            if !in_batch.insert((device_id, event.device_ts, seq_key)) {
                outcome.duplicates += 1;
                continue;
            }
            device = Some(match device {
                Some(device) => RollupCoverage {
                    first_ts: device.first_ts.min(event.device_ts),
                    watermark_ts: device.watermark_ts.max(event.device_ts),
                },
                None => RollupCoverage {
                    first_ts: event.device_ts,
                    watermark_ts: event.device_ts,
                },
            });
            candidates.push(event);
        }
        if let Some(device) = device {
            coverage.insert(device_id, device);
        }
    }
    candidates
}

/// The readings of the events to fold in, aggregated per bucket, for each table of
/// [`Resolution::ALL`]; counts them in `outcome` (folded events, readings left out).
pub(crate) fn bucket_readings<'a>(
    fresh: &[&'a Event],
    outcome: &mut RollupOutcome,
) -> [BTreeMap<BucketKey<'a>, Aggregate>; 2] {
    outcome.folded = fresh.len() as u64;
    let mut tables: [BTreeMap<BucketKey<'_>, Aggregate>; 2] = Default::default();
    for event in fresh {
        let seq_key = event.seq.unwrap_or(NO_SEQ);
        for (metric, value) in event.metrics.iter() {
            if metric.chars().count() > MAX_METRIC_NAME_CHARS
                || !value.is_finite()
                || value.abs() > MAX_ROLLUP_READING
            {
                outcome.skipped_readings += 1;
                continue;
            }
            for (resolution, buckets) in Resolution::ALL.iter().zip(tables.iter_mut()) {
                let key = (
                    event.device_id.as_str(),
                    metric,
                    resolution.bucket_of(event.device_ts),
                );
                buckets
                    .entry(key)
                    .and_modify(|aggregate| aggregate.add(event.device_ts, seq_key, value))
                    .or_insert_with(|| Aggregate::new(event.device_ts, seq_key, value));
            }
        }
    }
    tables
}

/// The coverage of `devices` that have one, locked for the transaction.
async fn lock_coverage<'a>(
    connection: &mut MySqlConnection,
    devices: &[&'a str],
) -> Result<HashMap<&'a str, RollupCoverage>> {
    let mut coverage = HashMap::with_capacity(devices.len());
    for chunk in devices.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::<MySql>::new(
            "SELECT CAST(device_id AS CHAR) AS device_id, first_ts, watermark_ts \
             FROM rollup_devices WHERE device_id IN (",
        );
        let mut separated = query.separated(", ");
        for device in chunk {
            separated.push_bind(*device);
        }
        query.push(") FOR UPDATE");
        let rows = query
            .build()
            .persistent(false)
            .fetch_all(&mut *connection)
            .await?;
        for row in rows {
            let device_id: String = row.try_get("device_id")?;
            // The stored id is one of ours: find our borrowed copy.
            if let Some(device) = chunk.iter().find(|device| **device == device_id) {
                coverage.insert(
                    *device,
                    RollupCoverage {
                        first_ts: millis(row.try_get("first_ts")?),
                        watermark_ts: millis(row.try_get("watermark_ts")?),
                    },
                );
            }
        }
    }
    Ok(coverage)
}

/// The identities of `events`, as bound in SQL.
fn identities<'a>(events: &[&'a Event]) -> Result<Vec<(&'a str, NaiveDateTime, i64)>> {
    events
        .iter()
        .map(|event| {
            Ok((
                event.device_id.as_str(),
                utc_datetime(event.device_ts)?,
                event.seq.unwrap_or(NO_SEQ),
            ))
        })
        .collect()
}

/// The identities among `events` folded in before.
async fn seen_before(
    connection: &mut MySqlConnection,
    events: &[&Event],
) -> Result<HashSet<Identity>> {
    let mut seen = HashSet::new();
    for chunk in events.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::<MySql>::new(
            "SELECT CAST(device_id AS CHAR), device_ts, seq_key FROM rollup_seen \
             WHERE (device_id, device_ts, seq_key) IN ",
        );
        let identities = identities(chunk)?;
        query.push_tuples(&identities, |mut tuple, (device_id, device_ts, seq_key)| {
            tuple
                .push_bind(*device_id)
                .push_bind(*device_ts)
                .push_bind(*seq_key);
        });
        let stored: Vec<Identity> = query
            .build_query_as()
            .persistent(false)
            .fetch_all(&mut *connection)
            .await?;
        seen.extend(stored);
    }
    Ok(seen)
}

/// Adds `buckets` to the stored rows (or inserts them). The `last` columns are set in an order
/// where each condition still sees the row's previous `last_ts` and `last_seq_key`.
async fn add_to_buckets(
    connection: &mut MySqlConnection,
    resolution: Resolution,
    buckets: &BTreeMap<BucketKey<'_>, Aggregate>,
) -> Result<()> {
    let mut rows = Vec::with_capacity(buckets.len());
    for ((device_id, metric, start), aggregate) in buckets {
        rows.push((
            *device_id,
            *metric,
            utc_datetime(*start)?,
            utc_datetime(aggregate.last_ts)?,
            decimal(aggregate.sum_nanos),
            aggregate,
        ));
    }
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut upsert = QueryBuilder::<MySql>::new(format!(
            "INSERT INTO {} (device_id, metric, bucket_start, samples, min_value, max_value, \
             sum_value, last_value, last_ts, last_seq_key) ",
            resolution.table()
        ));
        upsert.push_values(
            chunk,
            |mut values, (device_id, metric, start, last_ts, sum, aggregate)| {
                values
                    .push_bind(*device_id)
                    .push_bind(*metric)
                    .push_bind(*start)
                    .push_bind(aggregate.samples)
                    .push_bind(aggregate.min)
                    .push_bind(aggregate.max)
                    // A decimal literal: MariaDB stores it exactly.
                    .push_bind(sum.as_str())
                    .push_bind(aggregate.last)
                    .push_bind(*last_ts)
                    .push_bind(aggregate.last_seq_key);
            },
        );
        upsert.push(
            " ON DUPLICATE KEY UPDATE \
             samples = samples + VALUES(samples), \
             min_value = LEAST(min_value, VALUES(min_value)), \
             max_value = GREATEST(max_value, VALUES(max_value)), \
             sum_value = sum_value + VALUES(sum_value), \
             last_value = IF((VALUES(last_ts), VALUES(last_seq_key)) > (last_ts, last_seq_key), \
                 VALUES(last_value), last_value), \
             last_seq_key = IF((VALUES(last_ts), VALUES(last_seq_key)) > (last_ts, last_seq_key), \
                 VALUES(last_seq_key), last_seq_key), \
             last_ts = GREATEST(last_ts, VALUES(last_ts))",
        );
        upsert
            .build()
            .persistent(false)
            .execute(&mut *connection)
            .await?;
    }
    Ok(())
}

/// Remembers the identities of the events just folded in.
async fn remember(connection: &mut MySqlConnection, events: &[&Event]) -> Result<()> {
    for chunk in events.chunks(ROWS_PER_STATEMENT) {
        let rows = identities(chunk)?;
        let mut insert =
            QueryBuilder::<MySql>::new("INSERT INTO rollup_seen (device_id, device_ts, seq_key) ");
        insert.push_values(&rows, |mut values, (device_id, device_ts, seq_key)| {
            values
                .push_bind(*device_id)
                .push_bind(*device_ts)
                .push_bind(*seq_key);
        });
        insert
            .build()
            .persistent(false)
            .execute(&mut *connection)
            .await?;
    }
    Ok(())
}

/// Stores each device's coverage, and forgets the identities that fell out of its window.
async fn write_coverage(
    connection: &mut MySqlConnection,
    coverage: &HashMap<&str, RollupCoverage>,
    late_window_ms: i64,
) -> Result<()> {
    let mut rows = Vec::with_capacity(coverage.len());
    for (device_id, device) in coverage {
        rows.push((
            *device_id,
            utc_datetime(device.first_ts)?,
            utc_datetime(device.watermark_ts)?,
            utc_datetime(device.watermark_ts.saturating_sub(late_window_ms).max(0))?,
        ));
    }
    rows.sort_unstable_by_key(|row| row.0);
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut upsert = QueryBuilder::<MySql>::new(
            "INSERT INTO rollup_devices (device_id, first_ts, watermark_ts) ",
        );
        upsert.push_values(chunk, |mut values, (device_id, first, watermark, _)| {
            values
                .push_bind(*device_id)
                .push_bind(*first)
                .push_bind(*watermark);
        });
        upsert.push(
            " ON DUPLICATE KEY UPDATE first_ts = LEAST(first_ts, VALUES(first_ts)), \
             watermark_ts = GREATEST(watermark_ts, VALUES(watermark_ts))",
        );
        upsert
            .build()
            .persistent(false)
            .execute(&mut *connection)
            .await?;
        let mut forget = QueryBuilder::<MySql>::new("DELETE FROM rollup_seen WHERE ");
        let mut separated = forget.separated(" OR ");
        for (device_id, _, _, horizon) in chunk {
            separated.push("(device_id = ");
            separated.push_bind_unseparated(*device_id);
            separated.push_unseparated(" AND device_ts < ");
            separated.push_bind_unseparated(*horizon);
            separated.push_unseparated(")");
        }
        forget
            .build()
            .persistent(false)
            .execute(&mut *connection)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregates_do_not_depend_on_order() {
        let readings = [
            (1_000, 3, 2.5),
            (3_000, -1, -4.0),
            (2_000, 7, 9.25),
            (3_000, 2, 1.0),
        ];
        let fold = |order: &[usize]| {
            let (ts, seq, value) = readings[order[0]];
            let mut aggregate = Aggregate::new(ts, seq, value);
            for index in &order[1..] {
                let (ts, seq, value) = readings[*index];
                aggregate.add(ts, seq, value);
            }
            aggregate
        };
        let forward = fold(&[0, 1, 2, 3]);
        let backward = fold(&[3, 2, 1, 0]);
        for aggregate in [forward, backward] {
            assert_eq!(aggregate.samples, 4);
            assert_eq!(aggregate.min, -4.0);
            assert_eq!(aggregate.max, 9.25);
            assert_eq!(aggregate.sum_nanos, 8_750_000_000);
            assert_eq!(aggregate.avg(), 2.1875);
            // The latest device time wins; of two at the same time, the higher seq.
            assert_eq!(
                (aggregate.last_ts, aggregate.last_seq_key, aggregate.last),
                (3_000, 2, 1.0)
            );
        }
    }

    #[test]
    fn sums_are_exact_in_any_order_and_round_trip_as_decimals() {
        // 0.1 + 0.2 + 0.3 in floating point depends on the order; in fixed point it does not.
        let forward = [0.1, 0.2, 0.3]
            .iter()
            .fold(0, |sum, value| sum + nanos(*value));
        let backward = [0.3, 0.2, 0.1]
            .iter()
            .fold(0, |sum, value| sum + nanos(*value));
        assert_eq!((forward, backward), (600_000_000, 600_000_000));
        for value in [
            0,
            1,
            -1,
            999_999_999,
            -1_000_000_000,
            123_456_789_012_345_678_901,
        ] {
            assert_eq!(parse_decimal(&decimal(value)), Some(value));
        }
        assert_eq!(decimal(-500_000_000), "-0.500000000");
        assert_eq!(parse_decimal("12.5"), Some(12_500_000_000));
        assert_eq!(parse_decimal("1.2.3"), None);
    }

    #[test]
    fn buckets_start_on_whole_minutes_and_hours_also_before_1970() {
        assert_eq!(Resolution::Minute.bucket_of(125_000), 120_000);
        assert_eq!(Resolution::Hour.bucket_of(3_599_999), 0);
        assert_eq!(Resolution::Minute.bucket_of(-1), -60_000);
    }
}
