//! The metrics of the API's and the live view's access control (see `telemetry_metrics`).

use telemetry_metrics::Metric;

/// Requests refused for want of a valid token, by cause.
pub const HTTP_REQUESTS_UNAUTHORIZED: Metric =
    Metric::counter("http_requests_unauthorized_total", &["service", "cause"]);
/// Changes to the tokens file that could not be used (the tokens read before stay in force).
pub const TOKENS_RELOAD_FAILURES: Metric =
    Metric::counter("auth_tokens_reload_failures_total", &["service"]);

/// Everything this crate records.
pub const ALL: &[Metric] = &[HTTP_REQUESTS_UNAUTHORIZED, TOKENS_RELOAD_FAILURES];
