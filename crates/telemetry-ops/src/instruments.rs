//! The metrics of every service's HTTP listener (see `telemetry_metrics`).

use telemetry_metrics::Metric;

/// Open HTTP connections, WebSocket clients included.
pub const HTTP_CONNECTIONS: Metric = Metric::gauge("http_connections", &["service"]);
/// Connections past the cap, answered 503 and closed.
pub const HTTP_CONNECTIONS_REFUSED: Metric =
    Metric::counter("http_connections_refused_total", &["service"]);
/// Connections closed for not sending a request's headers in time, or idle.
pub const HTTP_CONNECTIONS_TIMED_OUT: Metric =
    Metric::counter("http_connections_timed_out_total", &["service", "cause"]);

/// Everything this crate records.
pub const ALL: &[Metric] = &[
    HTTP_CONNECTIONS,
    HTTP_CONNECTIONS_REFUSED,
    HTTP_CONNECTIONS_TIMED_OUT,
];
