//! The audit service's metrics, each declared once (see `telemetry_metrics`).

use telemetry_metrics::{
    Metric, AUDIT_BATCH_RECORDS, DB_WRITE_DURATION, DB_WRITE_RETRIES, EVENTS_RECEIVED,
    EVENTS_REJECTED, EVENTS_WRITTEN, KAFKA_RECORDS_REFUSED, PRODUCE_RETRIES, RECORDS_PRODUCED,
};

/// The `service` label of everything the audit service records.
pub(crate) const SERVICE: &str = "audit";

/// Payload fields the contract coerced from strings.
pub const FIELDS_COERCED: Metric = Metric::counter("fields_coerced_total", &["service"]);
/// Payload fields converted from other units.
pub const FIELDS_CONVERTED: Metric = Metric::counter("fields_converted_total", &["service"]);
/// Unknown payload fields dropped.
pub const FIELDS_DROPPED: Metric = Metric::counter("fields_dropped_total", &["service"]);
/// Accepted events whose device time is behind by more than `late_after_seconds`.
pub const EVENTS_LATE: Metric = Metric::counter("events_late_total", &["service"]);
/// `seq` gaps, per device.
pub const SEQ_GAPS: Metric = Metric::counter("seq_gaps_total", &["service"]);
/// The `seq` numbers the gaps skipped.
pub const SEQ_MISSING: Metric = Metric::counter("seq_missing_total", &["service"]);
/// `seq` counters going back.
pub const SEQ_REGRESSIONS: Metric = Metric::counter("seq_regressions_total", &["service"]);
/// `seq` numbers repeated.
pub const SEQ_REPEATS: Metric = Metric::counter("seq_repeats_total", &["service"]);

/// Everything the audit service records.
pub const ALL: &[Metric] = &[
    EVENTS_RECEIVED,
    EVENTS_REJECTED,
    EVENTS_WRITTEN,
    DB_WRITE_RETRIES,
    DB_WRITE_DURATION,
    AUDIT_BATCH_RECORDS,
    RECORDS_PRODUCED,
    PRODUCE_RETRIES,
    KAFKA_RECORDS_REFUSED,
    FIELDS_COERCED,
    FIELDS_CONVERTED,
    FIELDS_DROPPED,
    EVENTS_LATE,
    SEQ_GAPS,
    SEQ_MISSING,
    SEQ_REGRESSIONS,
    SEQ_REPEATS,
];

/// The audit service's series of a metric labelled by the service alone.
pub(crate) fn counter(metric: &Metric) -> metrics::Counter {
    metric.counter_of(telemetry_metrics::series!(SERVICE))
}
