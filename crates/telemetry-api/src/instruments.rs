//! The API's metrics, each declared once (see `telemetry_metrics`).

use telemetry_metrics::Metric;

/// The `service` label of everything the API records.
pub(crate) const SERVICE: &str = "api";

/// Queries stopped by `--api-statement-timeout-ms` (answered 504).
pub const QUERIES_TIMED_OUT: Metric = Metric::counter("queries_timed_out_total", &["service"]);
/// `/api/dlq` entries whose payload was sent cut.
pub const DLQ_PAYLOADS_CUT: Metric = Metric::counter("dlq_payloads_cut_total", &["service"]);

/// Everything the API records (its HTTP listener's and access control's aside).
pub const ALL: &[Metric] = &[QUERIES_TIMED_OUT, DLQ_PAYLOADS_CUT];

/// The API's series of a counter labelled by the service alone.
pub(crate) fn counter(metric: &Metric) -> metrics::Counter {
    metric.counter_of(telemetry_metrics::series!(SERVICE))
}
