//! The rollup's metrics, each declared once (see `telemetry_metrics`).

use telemetry_metrics::{Metric, DB_WRITE_DURATION, DB_WRITE_RETRIES, EVENTS_RECEIVED};

/// The `service` label of everything the rollup records.
pub(crate) const SERVICE: &str = "rollup";

/// Events folded into the rollups.
pub const EVENTS_FOLDED: Metric = Metric::counter("rollup_events_folded_total", &["service"]);
/// Events left out as folded before.
pub const EVENTS_DUPLICATE: Metric = Metric::counter("rollup_events_duplicate_total", &["service"]);
/// Events left out as older than the late window.
pub const EVENTS_TOO_LATE: Metric = Metric::counter("rollup_events_too_late_total", &["service"]);
/// Cleaned records that are not events, or that the database refused.
pub const RECORDS_INVALID: Metric = Metric::counter("rollup_records_invalid_total", &["service"]);
/// Readings with a name over 128 characters or a value beyond ±10^15.
pub const READINGS_SKIPPED: Metric = Metric::counter("rollup_readings_skipped_total", &["service"]);

/// Everything the rollup records.
pub const ALL: &[Metric] = &[
    EVENTS_RECEIVED,
    DB_WRITE_DURATION,
    DB_WRITE_RETRIES,
    EVENTS_FOLDED,
    EVENTS_DUPLICATE,
    EVENTS_TOO_LATE,
    RECORDS_INVALID,
    READINGS_SKIPPED,
];

/// The rollup's series of a counter labelled by the service alone.
pub(crate) fn counter(metric: &Metric) -> metrics::Counter {
    metric.counter_of(telemetry_metrics::series!(SERVICE))
}
