//! Upkeep beside the stages: the DLQ index and the per-minute device counts kept within bounds.

use std::time::Duration;

use telemetry_store::DynStore;
use tokio_util::sync::CancellationToken;

/// How often the DLQ index is pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// Keeps the DLQ index within its retention and size, and the per-minute device counts to two
/// days, once a minute until `shutdown`.
pub(crate) async fn prune_dead_letters(
    store: DynStore,
    retention_hours: u32,
    max_rows: u64,
    shutdown: CancellationToken,
) {
    loop {
        let older_than = chrono::Utc::now() - chrono::Duration::hours(i64::from(retention_hours));
        match store.prune_dead_letters(older_than, max_rows).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "Pruned the DLQ index."),
            Err(error) => {
                tracing::warn!(%error, "Could not prune the DLQ index; trying again later.")
            }
        }
        let two_days_ago = chrono::Utc::now() - chrono::Duration::days(2);
        if let Err(error) = store.prune_device_minutes(two_days_ago).await {
            tracing::warn!(%error, "Could not prune the per-minute device counts; trying again later.");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(PRUNE_INTERVAL) => {}
        }
    }
}
