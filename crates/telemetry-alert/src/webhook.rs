//! Webhook delivery from the outbox: each alert POSTed as JSON, in outbox order, until the
//! receiver answers 2xx. A failed attempt is retried after a backoff (1 s, doubling, at most
//! 5 min) and holds back the alerts after it, so a receiver sees an alert fire before it resolves;
//! after `max_attempts` the alert is given up, logged and counted, and the next one goes.
//! Receivers deduplicate on `(alert_id, status)`: an answer lost on the way back means a repeat.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use telemetry_store::{DynStore, OutboxEntry};
use tokio_util::sync::CancellationToken;

use crate::rules::Webhook;

/// Longest wait between two looks at the outbox when nothing wakes the task.
const IDLE: Duration = Duration::from_secs(1);
/// Longest backoff between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Delivers the outbox to `hook` until `shutdown`.
pub(crate) async fn deliver(
    store: DynStore,
    hook: Webhook,
    wake: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) {
    let client = match reqwest::Client::builder().timeout(hook.timeout).build() {
        Ok(client) => client,
        Err(error) => {
            let error = describe(error);
            tracing::error!(%error, "Cannot create the webhook client; alerts go to Kafka only.");
            return;
        }
    };
    // The URL's path, query and credentials often hold the receiver's secret (a Slack or
    // PagerDuty key): logs name its origin only.
    let shown = telemetry_secrets::redact_url(&hook.url);
    loop {
        let wait = match store.webhook_queue(100).await {
            Ok(queue) => deliver_due(&store, &client, &hook, &shown, &queue).await,
            Err(error) => {
                tracing::warn!(%error, "Reading the alert outbox for the webhook failed; retrying.");
                IDLE
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Delivers the due alerts at the head of `queue`; returns how long to wait before looking again.
/// `shown` is the webhook as logs show it.
async fn deliver_due(
    store: &DynStore,
    client: &reqwest::Client,
    hook: &Webhook,
    shown: &str,
    queue: &[OutboxEntry],
) -> Duration {
    for entry in queue {
        let due_in = (entry.next_attempt_at - Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO);
        if !due_in.is_zero() {
            return due_in.min(IDLE);
        }
        let answer = client
            .post(&hook.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(entry.payload.clone())
            .send()
            .await;
        let failure = match answer {
            Ok(response) if response.status().is_success() => None,
            Ok(response) => Some(format!("the receiver answered {}", response.status())),
            Err(error) => Some(describe(error)),
        };
        let attempts = entry.attempts.saturating_add(1);
        let (delivered, retry_at) = match &failure {
            None => (true, None),
            Some(_) if attempts >= hook.max_attempts => (false, None),
            Some(_) => {
                // 1 s after the first failure, doubling.
                let backoff = Duration::from_secs(1)
                    .saturating_mul(1 << attempts.saturating_sub(1).min(16))
                    .min(MAX_BACKOFF);
                let retry_at = Utc::now()
                    + chrono::Duration::from_std(backoff).unwrap_or(chrono::Duration::zero());
                (false, Some(retry_at))
            }
        };
        if let Err(error) = store.webhook_attempted(entry.id, delivered, retry_at).await {
            tracing::warn!(%error, "Recording a webhook attempt failed; it will be repeated.");
            return IDLE;
        }
        let result = match (&failure, retry_at) {
            (None, _) => "delivered",
            (Some(_), Some(_)) => "failed",
            (Some(_), None) => "given_up",
        };
        crate::instruments::WEBHOOK_ATTEMPTS
            .counter_of(telemetry_metrics::series!(
                crate::instruments::SERVICE,
                result
            ))
            .increment(1);
        if let Some(failure) = failure {
            if retry_at.is_some() {
                tracing::warn!(webhook = %shown, alert_id = %entry.alert_id, status = %entry.status,
                    attempts, %failure, "Webhook delivery failed; retrying with backoff.");
                return IDLE;
            }
            tracing::error!(webhook = %shown, alert_id = %entry.alert_id, status = %entry.status,
                attempts, %failure,
                "Webhook delivery failed for the last time; the alert is on the alerts topic only.");
        }
    }
    IDLE
}

/// A reqwest error and its causes, without the URL reqwest's own text carries (see
/// [`deliver`]'s `shown`).
fn describe(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(&error);
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}
