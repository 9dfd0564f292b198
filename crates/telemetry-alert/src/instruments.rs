//! The alerter's metrics, each declared once (see `telemetry_metrics`).

use telemetry_metrics::{
    Metric, DB_WRITE_DURATION, DB_WRITE_RETRIES, EVENTS_RECEIVED, RECORDS_PRODUCED,
};

/// The `service` label of everything the alerter records.
pub(crate) const SERVICE: &str = "alert";

/// Alerts fired, by rule.
pub const ALERTS_FIRED: Metric = Metric::counter("alerts_fired_total", &["service", "rule"]);
/// Alerts resolved, by rule.
pub const ALERTS_RESOLVED: Metric = Metric::counter("alerts_resolved_total", &["service", "rule"]);
/// Webhook POSTs, by result.
pub const WEBHOOK_ATTEMPTS: Metric =
    Metric::counter("alert_webhook_attempts_total", &["service", "result"]);
/// Records skipped as not usable.
pub const RECORDS_INVALID: Metric = Metric::counter("alert_records_invalid_total", &["service"]);
/// Records read again after a restart whose effect the stored state already has.
pub const RECORDS_SKIPPED: Metric = Metric::counter("alert_records_skipped_total", &["service"]);
/// Devices tracked (heard from within the forget window).
pub const DEVICES_TRACKED: Metric = Metric::gauge("alert_devices_tracked", &["service"]);
/// Rule states held.
pub const STATES_HELD: Metric = Metric::gauge("alert_states_held", &["service"]);
/// Devices forgotten after the forget window of silence.
pub const DEVICES_FORGOTTEN: Metric =
    Metric::counter("alert_devices_forgotten_total", &["service"]);
/// Rule states dropped with forgotten devices.
pub const STATES_FORGOTTEN: Metric = Metric::counter("alert_states_forgotten_total", &["service"]);

/// Everything the alerter records.
pub const ALL: &[Metric] = &[
    EVENTS_RECEIVED,
    RECORDS_PRODUCED,
    DB_WRITE_DURATION,
    DB_WRITE_RETRIES,
    ALERTS_FIRED,
    ALERTS_RESOLVED,
    WEBHOOK_ATTEMPTS,
    RECORDS_INVALID,
    RECORDS_SKIPPED,
    DEVICES_TRACKED,
    STATES_HELD,
    DEVICES_FORGOTTEN,
    STATES_FORGOTTEN,
];

/// The alerter's series of a counter labelled by the service alone.
pub(crate) fn counter(metric: &Metric) -> metrics::Counter {
    metric.counter_of(telemetry_metrics::series!(SERVICE))
}

/// The alerter's series of a gauge labelled by the service alone.
pub(crate) fn gauge(metric: &Metric) -> metrics::Gauge {
    metric.gauge_of(telemetry_metrics::series!(SERVICE))
}
