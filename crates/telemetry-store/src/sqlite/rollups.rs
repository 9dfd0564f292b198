//! The rollup tables in the SQLite store (`migrations/sqlite/0002_rollups.sql`): the same folding
//! as the MySQL store's (`crate::rollups`, which decides what a batch folds in), written in
//! SQLite's terms. SQLite has no DECIMAL(38, 9), so a bucket's exact sum is stored as its decimal
//! text and added to in Rust: each stored bucket the batch touches is read, merged with the
//! batch's aggregate ([`Aggregate::merge`]) and written back, inside one IMMEDIATE transaction
//! (no other writer between the read and the write).

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use libsql::Value;
use telemetry_core::Event;

use super::{integer, read_all, read_prepared, real, string, text, SqliteStore};
use crate::rollups::{bucket_readings, by_device, candidates, decimal, parse_decimal};
use crate::{
    Aggregate, Bucket, Error, Resolution, Result, RollupCoverage, RollupOutcome, RollupRow, NO_SEQ,
};

/// An event's identity as `rollup_seen` stores it.
fn identity(event: &Event) -> Vec<Value> {
    vec![
        text(&event.device_id),
        Value::Integer(event.device_ts),
        Value::Integer(event.seq.unwrap_or(NO_SEQ)),
    ]
}

/// The aggregate in columns 0 to 6: samples, min, max, sum (decimal text), last, last_ts,
/// last_seq_key.
fn aggregate(row: &super::Row, first: usize) -> Result<Aggregate> {
    let sum = string(row, first + 3)?;
    Ok(Aggregate {
        samples: u32::try_from(integer(row, first)?).unwrap_or(u32::MAX),
        min: real(row, first + 1)?,
        max: real(row, first + 2)?,
        sum_nanos: parse_decimal(&sum).ok_or_else(|| {
            Error::Sqlite(format!("sum_value `{sum}` is not a decimal with 9 places"))
        })?,
        last: real(row, first + 4)?,
        last_ts: integer(row, first + 5)?,
        last_seq_key: integer(row, first + 6)?,
    })
}

impl SqliteStore {
    /// See [`crate::Store::roll_up`]: the same outcome for the same stream.
    pub(super) async fn fold(
        &self,
        events: &[Event],
        late_window_ms: i64,
    ) -> Result<RollupOutcome> {
        let mut outcome = RollupOutcome::default();
        if events.is_empty() {
            return Ok(outcome);
        }
        // The MySQL store's range of times, so both refuse the same events.
        for event in events {
            crate::utc_datetime(event.device_ts)?;
        }
        let by_device = by_device(events);
        let connection = self.writer.lock().await;
        let transaction = connection
            .transaction_with_behavior(libsql::TransactionBehavior::Immediate)
            .await?;
        let mut coverage = HashMap::with_capacity(by_device.len());
        for device in by_device.keys() {
            let rows = read_all(
                &transaction,
                "SELECT first_ts, watermark_ts FROM rollup_devices WHERE device_id = ?1",
                vec![text(device)],
            )
            .await?;
            if let Some(row) = rows.first() {
                coverage.insert(
                    *device,
                    RollupCoverage {
                        first_ts: integer(row, 0)?,
                        watermark_ts: integer(row, 1)?,
                    },
                );
            }
        }
        let candidates = candidates(&by_device, &mut coverage, late_window_ms, &mut outcome);
        // The identities folded before, one range read per device (not one query per event).
        let mut range: HashMap<&str, (i64, i64)> = HashMap::new();
        for event in &candidates {
            range
                .entry(event.device_id.as_str())
                .and_modify(|(low, high)| {
                    *low = (*low).min(event.device_ts);
                    *high = (*high).max(event.device_ts);
                })
                .or_insert((event.device_ts, event.device_ts));
        }
        let seen_in_range = transaction
            .prepare(
                "SELECT device_ts, seq_key FROM rollup_seen \
                 WHERE device_id = ?1 AND device_ts BETWEEN ?2 AND ?3",
            )
            .await?;
        let mut seen: HashSet<(&str, i64, i64)> = HashSet::new();
        for (device_id, (low, high)) in &range {
            let rows = read_prepared(
                &seen_in_range,
                vec![text(device_id), Value::Integer(*low), Value::Integer(*high)],
            )
            .await?;
            for row in &rows {
                seen.insert((*device_id, integer(row, 0)?, integer(row, 1)?));
            }
        }
        drop(seen_in_range);
        let mut fresh = Vec::with_capacity(candidates.len());
        for event in candidates {
            let identity = (
                event.device_id.as_str(),
                event.device_ts,
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
            let table = resolution.table();
            let stored = transaction
                .prepare(&format!(
                    "SELECT samples, min_value, max_value, sum_value, last_value, last_ts, \
                            last_seq_key \
                     FROM {table} WHERE device_id = ?1 AND metric = ?2 AND bucket_start = ?3"
                ))
                .await?;
            let write = transaction
                .prepare(&format!(
                    "INSERT OR REPLACE INTO {table} (device_id, metric, bucket_start, samples, \
                     min_value, max_value, sum_value, last_value, last_ts, last_seq_key) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
                ))
                .await?;
            for ((device_id, metric, start), batch) in buckets {
                let key = vec![text(device_id), text(metric), Value::Integer(*start)];
                let merged = match read_prepared(&stored, key.clone()).await?.first() {
                    Some(row) => {
                        let mut merged = aggregate(row, 0)?;
                        merged.merge(batch);
                        merged
                    }
                    None => *batch,
                };
                let mut values = key;
                values.extend([
                    Value::Integer(i64::from(merged.samples)),
                    Value::Real(merged.min),
                    Value::Real(merged.max),
                    Value::Text(decimal(merged.sum_nanos)),
                    Value::Real(merged.last),
                    Value::Integer(merged.last_ts),
                    Value::Integer(merged.last_seq_key),
                ]);
                write.execute(values).await?;
                write.reset();
            }
        }
        let remember = transaction
            .prepare(
                "INSERT INTO rollup_seen (device_id, device_ts, seq_key) VALUES (?1, ?2, ?3) \
                 ON CONFLICT DO NOTHING",
            )
            .await?;
        for event in &fresh {
            remember.execute(identity(event)).await?;
            remember.reset();
        }
        drop(remember);
        for (device_id, device) in &coverage {
            transaction
                .execute(
                    "INSERT INTO rollup_devices (device_id, first_ts, watermark_ts) \
                     VALUES (?1, ?2, ?3) \
                     ON CONFLICT (device_id) DO UPDATE SET \
                       first_ts = MIN(first_ts, excluded.first_ts), \
                       watermark_ts = MAX(watermark_ts, excluded.watermark_ts)",
                    vec![
                        text(device_id),
                        Value::Integer(device.first_ts),
                        Value::Integer(device.watermark_ts),
                    ],
                )
                .await?;
            // The identities that fell out of the window: as the MySQL store, whose DATETIME
            // starts at 1970.
            let horizon = device.watermark_ts.saturating_sub(late_window_ms).max(0);
            transaction
                .execute(
                    "DELETE FROM rollup_seen WHERE device_id = ?1 AND device_ts < ?2",
                    vec![text(device_id), Value::Integer(horizon)],
                )
                .await?;
        }
        transaction.commit().await?;
        Ok(outcome)
    }

    /// See [`crate::Store::rollup_coverage`].
    pub(super) async fn coverage(&self, device_id: &str) -> Result<Option<RollupCoverage>> {
        let rows = self
            .query_rows(
                "SELECT first_ts, watermark_ts FROM rollup_devices WHERE device_id = ?1",
                vec![text(device_id)],
            )
            .await?;
        rows.first()
            .map(|row| {
                Ok(RollupCoverage {
                    first_ts: integer(row, 0)?,
                    watermark_ts: integer(row, 1)?,
                })
            })
            .transpose()
    }

    /// See [`crate::Store::rollup_series`]: the stored buckets in the range, added up per bucket
    /// of `bucket_ms` (whole seconds) in Rust, where the sum stays exact.
    pub(super) async fn rolled_up_series(
        &self,
        resolution: Resolution,
        device_id: &str,
        metric: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        bucket_ms: i64,
    ) -> Result<Vec<Bucket>> {
        let table = resolution.table();
        let width = (bucket_ms / 1_000).max(1) * 1_000;
        let origin = from.timestamp_millis();
        let rows = self
            .query_rows(
                &format!(
                    "SELECT bucket_start, samples, min_value, max_value, sum_value \
                     FROM {table} \
                     WHERE device_id = ?1 AND metric = ?2 AND bucket_start >= ?3 \
                       AND bucket_start < ?4 \
                     ORDER BY bucket_start"
                ),
                vec![
                    text(device_id),
                    text(metric),
                    Value::Integer(origin),
                    Value::Integer(to.timestamp_millis()),
                ],
            )
            .await?;
        // Per bucket: samples, min, max, exact sum.
        let mut buckets: BTreeMap<i64, (u64, f64, f64, i128)> = BTreeMap::new();
        for row in &rows {
            let index = (integer(row, 0)? - origin).div_euclid(width);
            let samples = u64::try_from(integer(row, 1)?).unwrap_or(0);
            let (min, max) = (real(row, 2)?, real(row, 3)?);
            let sum = string(row, 4)?;
            let sum = parse_decimal(&sum).ok_or_else(|| {
                Error::Sqlite(format!("sum_value `{sum}` is not a decimal with 9 places"))
            })?;
            let bucket = buckets.entry(index).or_insert((0, min, max, 0));
            bucket.0 += samples;
            bucket.1 = bucket.1.min(min);
            bucket.2 = bucket.2.max(max);
            bucket.3 += sum;
        }
        Ok(buckets
            .into_iter()
            .map(|(index, (count, min, max, sum))| {
                #[allow(clippy::cast_precision_loss)]
                let avg = sum as f64 / 1e9 / (count.max(1) as f64);
                Bucket {
                    start: origin.saturating_add(index.saturating_mul(width)),
                    count,
                    min,
                    avg,
                    max,
                }
            })
            .collect())
    }

    /// See [`crate::Store::rollup_rows`].
    pub(super) async fn rows_of(
        &self,
        resolution: Resolution,
        devices: &[&str],
    ) -> Result<Vec<RollupRow>> {
        let mut sql = format!(
            "SELECT device_id, metric, bucket_start, samples, min_value, max_value, sum_value, \
                    last_value, last_ts, last_seq_key \
             FROM {}",
            resolution.table()
        );
        if !devices.is_empty() {
            let placeholders = (1..=devices.len())
                .map(|index| format!("?{index}"))
                .collect::<Vec<_>>()
                .join(", ");
            sql.push_str(&format!(" WHERE device_id IN ({placeholders})"));
        }
        sql.push_str(" ORDER BY device_id, metric, bucket_start");
        let rows = self
            .query_rows(&sql, devices.iter().map(|device| text(device)).collect())
            .await?;
        rows.iter()
            .map(|row| {
                Ok(RollupRow {
                    device_id: string(row, 0)?,
                    metric: string(row, 1)?,
                    bucket_start: integer(row, 2)?,
                    aggregate: aggregate(row, 3)?,
                })
            })
            .collect()
    }
}
