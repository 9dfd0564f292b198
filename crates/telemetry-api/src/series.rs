//! Where a series is read from: the `telemetry` rows, or the rollup tables `telemetry rollup`
//! keeps, when its buckets are a minute or wider and the rollup covers the range.
//!
//! A rollup covers a device from the bucket after the one its first event fell in (when the
//! table has older rows than the rollup saw, e.g. the cleaned topic's retention dropped them) up
//! to the bucket its watermark (latest device time) is in, which may still be filling: those
//! buckets come from the rollup and the rest of the range from the rows, split on the series'
//! own bucket boundaries so no bucket mixes the two.

use chrono::{DateTime, Utc};
use telemetry_store::{Bucket, Resolution, RollupCoverage, SeriesQuery, TelemetryStore};

/// Which table most of a series' buckets came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The `telemetry` rows.
    Raw,
    /// A rollup table.
    Rollup(Resolution),
}

impl Source {
    /// The name the API reports: `raw`, `rollup_1m` or `rollup_1h`.
    pub fn name(self) -> &'static str {
        match self {
            Source::Raw => "raw",
            Source::Rollup(resolution) => resolution.table(),
        }
    }
}

/// A series read: its buckets and how they were cut.
pub struct Series {
    /// First bucket start (the requested `from`, or the rollup boundary before it).
    pub from: i64,
    /// End of the last bucket.
    pub to: i64,
    /// Bucket width.
    pub bucket_ms: i64,
    /// Where most buckets came from.
    pub source: Source,
    /// Buckets with readings, in time order.
    pub buckets: Vec<Bucket>,
}

/// Reads `metric` of `device_id` over `[from, to)` in at most `max_points` buckets.
pub async fn read(
    store: &dyn TelemetryStore,
    device_id: &str,
    metric: &str,
    from: i64,
    to: i64,
    max_points: u32,
) -> telemetry_store::Result<Series> {
    let max_points = i64::from(max_points.max(1));
    let bucket_ms = div_ceil(to - from, max_points).max(1);
    let Some(resolution) = resolution_for(bucket_ms) else {
        return raw_only(store, device_id, metric, from, to, bucket_ms).await;
    };
    let Some(coverage) = store.rollup_coverage(device_id).await? else {
        return raw_only(store, device_id, metric, from, to, bucket_ms).await;
    };
    let raw_first = store.first_event_ts(device_id).await?;
    let now = chrono::Utc::now().timestamp_millis();
    let plan = Plan::new(resolution, from, to, max_points, coverage, raw_first, now);
    if plan.rollup.0 >= plan.rollup.1 {
        return raw_only(store, device_id, metric, from, to, bucket_ms).await;
    }
    let before = raw(
        store,
        device_id,
        metric,
        plan.from,
        plan.rollup.0,
        plan.bucket_ms,
    );
    let middle = store.rollup_series(
        resolution,
        device_id,
        metric,
        time(plan.rollup.0),
        time(plan.rollup.1),
        plan.bucket_ms,
    );
    let after = raw(
        store,
        device_id,
        metric,
        plan.rollup.1,
        plan.to,
        plan.bucket_ms,
    );
    let (before, middle, after) = tokio::try_join!(before, middle, after)?;
    let mut buckets = before;
    buckets.extend(middle);
    buckets.extend(after);
    Ok(Series {
        from: plan.from,
        to: plan.to,
        bucket_ms: plan.bucket_ms,
        source: Source::Rollup(resolution),
        buckets,
    })
}

/// The rollup table to read for buckets of `bucket_ms`: the coarsest whose width fits in one.
fn resolution_for(bucket_ms: i64) -> Option<Resolution> {
    Resolution::ALL
        .into_iter()
        .rev()
        .find(|resolution| bucket_ms >= resolution.millis())
}

/// How a rollup read is cut: the range snapped to the rollup's buckets, and the part of it the
/// rollup covers, both on the series' bucket boundaries.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    from: i64,
    to: i64,
    bucket_ms: i64,
    /// `[start, end)` read from the rollup; empty when `start >= end`.
    rollup: (i64, i64),
}

impl Plan {
    /// `now`: the clock; a watermark beyond it (a device clock running ahead) does not make the
    /// rollup cover the future.
    fn new(
        resolution: Resolution,
        from: i64,
        to: i64,
        max_points: i64,
        coverage: RollupCoverage,
        raw_first: Option<i64>,
        now: i64,
    ) -> Self {
        let width = resolution.millis();
        let from = from.div_euclid(width) * width;
        // Whole rollup buckets, still at most `max_points` over the widened range.
        let bucket_ms = div_ceil(div_ceil(to - from, max_points), width) * width;
        let to = from + div_ceil(to - from, bucket_ms) * bucket_ms;
        // Series boundaries at or after / at or before `at`, within the range.
        let ceil = |at: i64| (from + div_ceil((at - from).max(0), bucket_ms) * bucket_ms).min(to);
        let floor = |at: i64| (from + (at - from).max(0).div_euclid(bucket_ms) * bucket_ms).min(to);
        let first_bucket = coverage.first_ts.div_euclid(width) * width;
        let start = if raw_first.is_some_and(|first| first < coverage.first_ts) {
            ceil(first_bucket + width)
        } else {
            from
        };
        let end = floor(coverage.watermark_ts.min(now).div_euclid(width) * width);
        Plan {
            from,
            to,
            bucket_ms,
            rollup: (start, end),
        }
    }
}

/// `numerator / denominator` rounded up, for a positive denominator.
fn div_ceil(numerator: i64, denominator: i64) -> i64 {
    -(-numerator).div_euclid(denominator)
}

async fn raw_only(
    store: &dyn TelemetryStore,
    device_id: &str,
    metric: &str,
    from: i64,
    to: i64,
    bucket_ms: i64,
) -> telemetry_store::Result<Series> {
    Ok(Series {
        from,
        to,
        bucket_ms,
        source: Source::Raw,
        buckets: raw(store, device_id, metric, from, to, bucket_ms).await?,
    })
}

async fn raw(
    store: &dyn TelemetryStore,
    device_id: &str,
    metric: &str,
    from: i64,
    to: i64,
    bucket_ms: i64,
) -> telemetry_store::Result<Vec<Bucket>> {
    if from >= to {
        return Ok(Vec::new());
    }
    store
        .series(&SeriesQuery {
            device_id,
            metric,
            from: time(from),
            to: time(to),
            bucket: chrono::Duration::milliseconds(bucket_ms),
        })
        .await
}

fn time(millis: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(millis).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: i64 = 60_000;
    const HOUR: i64 = 3_600_000;

    fn coverage(first_ts: i64, watermark_ts: i64) -> RollupCoverage {
        RollupCoverage {
            first_ts,
            watermark_ts,
        }
    }

    #[test]
    fn buckets_of_a_minute_or_more_read_the_coarsest_rollup_that_fits() {
        assert_eq!(resolution_for(59_999), None);
        assert_eq!(resolution_for(MINUTE), Some(Resolution::Minute));
        assert_eq!(resolution_for(HOUR - 1), Some(Resolution::Minute));
        assert_eq!(resolution_for(7 * HOUR), Some(Resolution::Hour));
    }

    #[test]
    fn the_range_snaps_to_the_rollup_and_the_filling_bucket_is_read_from_rows() {
        // A day in 500 buckets (172.8 s → 3 min), rollup covering all but the last minutes.
        let from = 10 * HOUR + 7_000;
        let to = from + 24 * HOUR;
        let plan = Plan::new(
            Resolution::Minute,
            from,
            to,
            500,
            coverage(0, to - 4 * MINUTE - 5_000),
            Some(0),
            to,
        );
        assert_eq!(plan.bucket_ms, 3 * MINUTE);
        assert_eq!(plan.from, 10 * HOUR);
        assert_eq!(plan.to, 10 * HOUR + 24 * HOUR + 3 * MINUTE);
        assert!((plan.to - plan.from) / plan.bucket_ms <= 500);
        assert_eq!(plan.rollup.0, plan.from);
        // The watermark's minute (to - 5 min) is still filling; the series bucket holding it
        // starts at to - 6 min.
        assert_eq!(plan.rollup.1, 10 * HOUR + 24 * HOUR - 6 * MINUTE);
        assert_eq!((plan.rollup.1 - plan.from) % plan.bucket_ms, 0);
    }

    #[test]
    fn rows_older_than_the_rollup_are_read_from_the_table() {
        // The rollup started at 12:30:20; the table has rows from 09:00.
        let plan = Plan::new(
            Resolution::Minute,
            9 * HOUR,
            15 * HOUR,
            36,
            coverage(12 * HOUR + 30 * MINUTE + 20_000, 20 * HOUR),
            Some(9 * HOUR),
            20 * HOUR,
        );
        // Its first minute may be partial: rollup from the series bucket after 12:31.
        assert_eq!(plan.rollup, (12 * HOUR + 40 * MINUTE, 15 * HOUR));
    }

    #[test]
    fn a_rollup_behind_the_range_reads_only_rows() {
        let plan = Plan::new(
            Resolution::Hour,
            48 * HOUR,
            72 * HOUR,
            24,
            coverage(0, 30 * HOUR),
            Some(0),
            72 * HOUR,
        );
        assert!(plan.rollup.0 >= plan.rollup.1);
    }

    #[test]
    fn widening_the_range_to_the_rollup_never_adds_a_bucket() {
        // Three hours from 90 s past the hour in 3 buckets: 1 h buckets would need 4.
        let plan = Plan::new(
            Resolution::Hour,
            90_000,
            3 * HOUR + 90_000,
            3,
            coverage(0, 10 * HOUR),
            Some(0),
            10 * HOUR,
        );
        assert_eq!(
            (plan.from, plan.bucket_ms, plan.to),
            (0, 2 * HOUR, 4 * HOUR)
        );
    }

    #[test]
    fn a_watermark_ahead_of_the_clock_covers_only_up_to_now() {
        let plan = Plan::new(
            Resolution::Minute,
            0,
            2 * HOUR,
            120,
            coverage(0, 50 * HOUR),
            Some(0),
            HOUR + 30_000,
        );
        assert_eq!(plan.rollup, (0, HOUR));
    }
}
