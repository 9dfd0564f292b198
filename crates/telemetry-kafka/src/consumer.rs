//! [`BatchConsumer`]: a consumer-group member that hands out records in batches and commits only
//! the offsets of batches its caller declared durable. Every consumer of ours (the audit service,
//! the rollup, the alerter) reads this way: at-least-once, with the caller's idempotent writes
//! absorbing what a crash makes it read twice.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::{KafkaConfig, Result};

/// Wait after a consumer error before reading again, so a broker outage does not spin.
const ERROR_PAUSE: Duration = Duration::from_millis(500);

/// Where a consumer group without committed offsets starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// At the beginning of each partition: the retained history first (rollups, tables).
    Earliest,
    /// At the end: only what arrives from now on (alerts about the present).
    Latest,
}

/// A consumer-group member reading in batches; see the module documentation.
pub struct BatchConsumer {
    consumer: StreamConsumer<RebalanceLogger>,
}

/// Commits stored offsets before partitions move to another instance, and logs assignments.
struct RebalanceLogger;

impl ClientContext for RebalanceLogger {}

impl ConsumerContext for RebalanceLogger {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            // The next owner resumes from the last durable batch, not from an older commit.
            if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(%error, "No offsets to commit before the rebalance.");
            }
            tracing::info!(partitions = partitions.count(), "Kafka partitions revoked.");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(partitions) = rebalance {
            tracing::info!(
                partitions = partitions.count(),
                "Kafka partitions assigned."
            );
        }
    }
}

impl BatchConsumer {
    /// Joins consumer group `group_id` on `topics`. A group without committed offsets starts at
    /// the beginning of each partition.
    pub fn new(kafka: &KafkaConfig, group_id: &str, topics: &[&str]) -> Result<Self> {
        Self::starting_at(kafka, group_id, topics, StartAt::Earliest)
    }

    /// Joins consumer group `group_id` on `topics`; a group without committed offsets starts
    /// where `start` says.
    pub fn starting_at(
        kafka: &KafkaConfig,
        group_id: &str,
        topics: &[&str],
        start: StartAt,
    ) -> Result<Self> {
        let reset = match start {
            StartAt::Earliest => "earliest",
            StartAt::Latest => "latest",
        };
        let consumer: StreamConsumer<RebalanceLogger> = kafka
            .client_config(&[
                ("group.id", group_id),
                ("auto.offset.reset", reset),
                // Offsets are committed in the background, but only those we stored: stored only
                // after a batch is durable, so a commit never runs ahead of the database.
                ("enable.auto.commit", "true"),
                ("enable.auto.offset.store", "false"),
                ("auto.commit.interval.ms", "1000"),
                // A killed instance's partitions move to the others after this long (librdkafka's
                // default, 45 s, stalls them that long).
                ("session.timeout.ms", "10000"),
                ("heartbeat.interval.ms", "2000"),
            ])?
            .create_with_context(RebalanceLogger)?;
        consumer.subscribe(topics)?;
        Ok(BatchConsumer { consumer })
    }

    /// Waits for a first record, then collects up to `size` records or until `linger` passed.
    /// `None` once `shutdown` is cancelled.
    pub async fn next_batch(
        &self,
        size: usize,
        linger: Duration,
        shutdown: &CancellationToken,
    ) -> Option<Vec<OwnedMessage>> {
        self.next_batch_within(size, linger, None, shutdown).await
    }

    /// As [`BatchConsumer::next_batch`], but gives up waiting for a first record after `wait`
    /// (when given), returning an empty batch: for consumers that also act on a clock.
    pub async fn next_batch_within(
        &self,
        size: usize,
        linger: Duration,
        wait: Option<Duration>,
        shutdown: &CancellationToken,
    ) -> Option<Vec<OwnedMessage>> {
        let mut batch = Vec::with_capacity(size);
        let give_up = async {
            match wait {
                Some(wait) => tokio::time::sleep(wait).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(give_up);
        loop {
            // Nothing has been taken from the consumer when a wait ends: nothing is dropped.
            let received = tokio::select! {
                () = shutdown.cancelled() => return None,
                () = &mut give_up => return Some(batch),
                received = self.consumer.recv() => received,
            };
            match received {
                Ok(message) => {
                    batch.push(message.detach());
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, "Reading from Kafka failed; retrying.");
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
            }
        }
        let deadline = tokio::time::Instant::now() + linger;
        while batch.len() < size {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => break,
                received = self.consumer.recv() => match received {
                    Ok(message) => batch.push(message.detach()),
                    Err(error) => {
                        tracing::warn!(%error, "Reading from Kafka failed; handling the batch so far.");
                        break;
                    }
                },
            }
        }
        Some(batch)
    }

    /// Marks every record of `batch` as done: the next commit resumes after them.
    pub fn store_offsets(&self, batch: &[OwnedMessage]) {
        let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        for message in batch {
            let entry = next
                .entry((message.topic(), message.partition()))
                .or_insert(0);
            *entry = (*entry).max(message.offset() + 1);
        }
        let mut offsets = TopicPartitionList::with_capacity(next.len());
        for ((topic, partition), offset) in next {
            if let Err(error) =
                offsets.add_partition_offset(topic, partition, Offset::Offset(offset))
            {
                tracing::warn!(%error, topic, partition, "Could not record an offset.");
            }
        }
        // Fails for partitions revoked meanwhile; their new owner re-reads those records, and the
        // idempotent insert keeps the table free of duplicates.
        if let Err(error) = self.consumer.store_offsets(&offsets) {
            tracing::info!(%error, "Offsets not stored (partitions reassigned); the records will be re-read.");
        }
    }

    /// Commits the stored offsets and leaves the group. Both need Kafka, and while it is down
    /// they may block for long, so they run on a thread of their own for at most `timeout`;
    /// whatever was not committed is read again on restart (the callers' writes are idempotent).
    pub async fn close(self, timeout: Duration) {
        let (closed, closing) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            if let Err(error) = self.consumer.commit_consumer_state(CommitMode::Sync) {
                // Nothing stored since the last commit is reported as an error too.
                tracing::debug!(%error, "Final offset commit did not happen.");
            }
            drop(self);
            let _ = closed.send(());
        });
        if tokio::time::timeout(timeout, closing).await.is_err() {
            tracing::warn!("Kafka did not answer the final offset commit; the last batches will be read again on restart.");
        }
    }
}
