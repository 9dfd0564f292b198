//! The read stage: batches from the raw topic (closed at `--batch-size` records, `--batch-bytes`
//! or the linger time), each decided and sent on to the write stage, until stopped.

use std::sync::Arc;
use std::time::Duration;

use telemetry_core::{SequenceTracker, Validator};
use telemetry_kafka::BatchConsumer;
use telemetry_metrics::Progress;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::decide::decide;
use crate::write::Batch;

/// When a batch closes.
pub(crate) struct Batching {
    /// Most records per batch.
    pub records: usize,
    /// Longest wait for a batch to fill.
    pub linger: Duration,
}

/// Starts the stage. It ends at `stop`, or when the write stage no longer takes batches (the
/// batch in hand is dropped: its offsets were not stored, so it is redelivered).
pub(crate) fn spawn(
    source: Arc<BatchConsumer>,
    validator: Arc<Validator>,
    batching: Batching,
    progress: Arc<Progress>,
    stop: CancellationToken,
    to_write: mpsc::Sender<Batch>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // `seq` is checked per device across batches, in the order the partitions deliver.
        let mut sequences = SequenceTracker::new();
        while let Some(records) = source
            .next_batch(batching.records, batching.linger, &stop)
            .await
        {
            let decided = decide(&records, &validator, &mut sequences);
            Progress::add(&progress.received, records.len() as u64);
            Progress::add(&progress.rejected, decided.rejected.len() as u64);
            if to_write.send(Batch { records, decided }).await.is_err() {
                return;
            }
        }
    })
}

/// Waits for the stage to end. A panic while deciding is a bug: it ends the service as one.
pub(crate) async fn join(reader: tokio::task::JoinHandle<()>) {
    if let Err(error) = reader.await {
        if error.is_panic() {
            std::panic::resume_unwind(error.into_panic());
        }
        tracing::error!(%error, "The read stage failed.");
    }
}
