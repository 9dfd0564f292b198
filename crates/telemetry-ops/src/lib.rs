//! Operational endpoints every service serves: `/healthz` (the process is up), `/readyz` (its
//! dependencies are reachable) and `/metrics` (Prometheus text format).
//!
//! Metrics are recorded through the `metrics` facade anywhere in the services; this crate
//! installs the process-wide Prometheus recorder once and renders it.
//!
//! # Layout
//! - [`install_metrics`]: the recorder, installed on first call.
//! - [`Readiness`]: named checks a service flips as its dependencies come and go.
//! - [`router`]: the three routes, to serve alone or merge into a service's router.
//! - [`HttpServer`]: bind an address, then serve a router until shutdown, within [`HttpLimits`]
//!   (header-read and idle timeouts, a connection cap); `http_server`.
//! - [`instruments`]: the HTTP listener's metrics, declared with `telemetry_metrics`.

mod http_server;
pub mod instruments;

pub use http_server::{join, HttpLimits, HttpServer, HttpTls, ListenError};

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// The process-wide Prometheus recorder, installed on the first call. Services running in one
/// process (as in tests) share it and tell themselves apart by their `service` label.
pub fn install_metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("A metrics recorder was already installed; /metrics will be empty.");
            }
            handle
        })
        .clone()
}

/// Named readiness checks; the service is ready when every check passes.
#[derive(Debug, Default)]
pub struct Readiness {
    /// Why a mutex: checks are flipped from the services' tasks and read by HTTP handlers; they
    /// change rarely, so contention does not matter.
    checks: Mutex<BTreeMap<&'static str, bool>>,
}

impl Readiness {
    /// A readiness with these checks, all failing until set.
    pub fn new(checks: &[&'static str]) -> Arc<Self> {
        let readiness = Readiness::default();
        if let Ok(mut map) = readiness.checks.lock() {
            for check in checks {
                map.insert(check, false);
            }
        }
        Arc::new(readiness)
    }

    /// Records whether `check` passes now.
    pub fn set(&self, check: &'static str, passing: bool) {
        if let Ok(mut map) = self.checks.lock() {
            map.insert(check, passing);
        }
    }

    /// Every check and whether it passes.
    pub fn snapshot(&self) -> BTreeMap<&'static str, bool> {
        self.checks
            .lock()
            .map(|map| map.clone())
            .unwrap_or_default()
    }
}

#[derive(Clone)]
struct OpsState {
    readiness: Arc<Readiness>,
    metrics: PrometheusHandle,
}

/// `/healthz`, `/readyz` and `/metrics`.
pub fn router(readiness: Arc<Readiness>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(render_metrics))
        .with_state(OpsState {
            readiness,
            metrics: install_metrics(),
        })
}

async fn ready(State(state): State<OpsState>) -> impl IntoResponse {
    let checks = state.readiness.snapshot();
    let code = if checks.values().all(|passing| *passing) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(checks))
}

async fn render_metrics(State(state): State<OpsState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;

    async fn get(router: Router, path: &str) -> (StatusCode, String) {
        let response = router
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn readiness_follows_its_checks() {
        let readiness = Readiness::new(&["database"]);
        let (status, body) = get(router(readiness.clone()), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, r#"{"database":false}"#);
        readiness.set("database", true);
        let (status, _) = get(router(readiness.clone()), "/readyz").await;
        assert_eq!(status, StatusCode::OK);
        let (status, body) = get(router(readiness), "/healthz").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    }

    #[tokio::test]
    async fn metrics_render_what_was_counted() {
        let router = router(Readiness::new(&[]));
        metrics::counter!("ops_test_total", "cause" => "test").increment(3);
        let (status, body) = get(router, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains(r#"ops_test_total{cause="test"} 3"#), "{body}");
    }

    #[test]
    fn a_declared_metric_records_each_label_with_its_value() {
        const TEST_METRIC: telemetry_metrics::Metric =
            telemetry_metrics::Metric::counter("metric_test_total", &["service", "cause"]);
        let handle = install_metrics();
        TEST_METRIC
            .counter_of(telemetry_metrics::series!("test", String::from("because")))
            .increment(2);
        let text = handle.render();
        assert!(
            text.contains(r#"metric_test_total{service="test",cause="because"} 2"#),
            "{text}"
        );
    }
}
