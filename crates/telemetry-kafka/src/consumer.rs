//! [`BatchConsumer`]: a consumer-group member that hands out records in batches and commits only
//! the offsets of batches its caller declared durable. Every consumer of ours (the audit service,
//! the rollup, the alerter) reads this way: at-least-once, with the caller's idempotent writes
//! absorbing what a crash makes it read twice.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::FutureExt as _;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::reachability::{Reachability, STATISTICS_INTERVAL_MS};
use crate::{KafkaConfig, Result};

/// Wait after a consumer error (other than the brokers being unreachable, see
/// [`BatchConsumer::read_failed`]) before waiting for a first record again.
const ERROR_PAUSE: Duration = Duration::from_millis(500);

/// A consumer-group member reading in batches; see the module documentation.
pub struct BatchConsumer {
    consumer: StreamConsumer<RebalanceLogger>,
    /// A batch closes once its keys and values reach this many bytes (one record more at most).
    max_batch_bytes: usize,
    /// Whether a batch waits out the linger to fill ([`BatchConsumer::filling`]) rather than
    /// closing when nothing more is waiting.
    fill: bool,
}

/// Bytes of keys and values after which a batch closes, unless the caller sets its own: records
/// can be up to a megabyte each (DLQ records of large payloads), so a count alone does not bound
/// a batch's memory.
pub const DEFAULT_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// What librdkafka may prefetch for a consumer, in KiB (`queued.max.messages.kbytes`; its default
/// is 64 MiB), and the most one fetch response may carry (`fetch.max.bytes`; default 50 MiB):
/// a consumer's read-ahead is bounded in bytes, not only in records.
const PREFETCH_KIB: &str = "16384";
const FETCH_MAX_BYTES: &str = "8388608";

/// Commits stored offsets before partitions move to another instance, logs assignments, and
/// keeps the lag of each fetched partition from librdkafka's statistics (every second unless the
/// caller sets `statistics.interval.ms`), also as the `kafka_consumer_lag` gauge.
struct RebalanceLogger {
    /// The consumer group, for the `kafka_consumer_lag` gauge.
    group: String,
    /// Whether the consumer reaches its brokers: one line per outage, not one per attempt.
    reachability: Reachability,
    /// (topic, partition) → records between what this member processed (or, before it stored an
    /// offset, what the group committed) and the end of the partition; -1 when not known.
    lag: std::sync::Mutex<HashMap<(String, i32), i64>>,
}

impl ClientContext for RebalanceLogger {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        self.reachability.log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.reachability.error(&error, reason);
    }

    fn stats(&self, statistics: Statistics) {
        self.reachability.statistics(&statistics);
        let mut lag = HashMap::new();
        for (topic, partitions) in statistics.topics {
            for (partition, state) in partitions.partitions {
                if partition >= 0 && state.fetch_state == "active" {
                    let behind = if state.consumer_lag_stored >= 0 {
                        state.consumer_lag_stored
                    } else {
                        state.consumer_lag
                    };
                    if behind >= 0 {
                        #[allow(clippy::cast_precision_loss)]
                        crate::instruments::KAFKA_CONSUMER_LAG
                            .gauge_of(telemetry_metrics::series!(
                                self.group.clone(),
                                topic.clone(),
                                partition.to_string()
                            ))
                            .set(behind as f64);
                    }
                    lag.insert((topic.clone(), partition), behind);
                }
            }
        }
        match self.lag.lock() {
            Ok(mut current) => *current = lag,
            Err(poisoned) => *poisoned.into_inner() = lag,
        }
    }
}

impl ConsumerContext for RebalanceLogger {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            // Lost, not revoked (the session timed out, e.g. during a Kafka outage): the group
            // has moved on without this member, and a commit in its old generation can only be
            // refused; the next owner resumes from the last commit that went through.
            if consumer.assignment_lost() {
                tracing::info!(
                    partitions = partitions.count(),
                    "Kafka partitions lost (the group session timed out); rejoining."
                );
                return;
            }
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
        Self::with_options(kafka, group_id, topics, &[])
    }

    /// As [`BatchConsumer::new`], with librdkafka settings of the caller's added, e.g.
    /// `statistics.interval.ms` for [`BatchConsumer::is_caught_up`].
    pub fn with_options(
        kafka: &KafkaConfig,
        group_id: &str,
        topics: &[&str],
        options: &[(&str, &str)],
    ) -> Result<Self> {
        let mut settings = vec![
            ("group.id", group_id),
            ("auto.offset.reset", "earliest"),
            // Offsets are committed in the background, but only those we stored: stored only
            // after a batch is durable, so a commit never runs ahead of the database.
            ("enable.auto.commit", "true"),
            ("enable.auto.offset.store", "false"),
            ("auto.commit.interval.ms", "1000"),
            // A killed instance's partitions move to the others after this long (librdkafka's
            // default, 45 s, stalls them that long). It also bounds the catch-up after a Kafka
            // outage longer than the session: the rejoin waits for the old membership, which the
            // restarted broker reloaded, to expire (docs/architecture.md, "Recovery after a
            // Kafka outage"). 6 s is the brokers' default lower bound
            // (`group.min.session.timeout.ms`); three heartbeats fit in it.
            ("session.timeout.ms", "6000"),
            ("heartbeat.interval.ms", "2000"),
            // Lag per partition (the `kafka_consumer_lag` gauge, `is_caught_up`), and whether a
            // broker is reachable again after an outage.
            ("statistics.interval.ms", STATISTICS_INTERVAL_MS),
            ("queued.max.messages.kbytes", PREFETCH_KIB),
            ("fetch.max.bytes", FETCH_MAX_BYTES),
        ];
        settings.extend_from_slice(options);
        let consumer: StreamConsumer<RebalanceLogger> = kafka
            .client_config(&settings)?
            .create_with_context(RebalanceLogger {
                group: group_id.to_string(),
                reachability: Reachability::new("consumer", group_id),
                lag: std::sync::Mutex::default(),
            })?;
        consumer.subscribe(topics)?;
        Ok(BatchConsumer {
            consumer,
            max_batch_bytes: DEFAULT_BATCH_BYTES,
            fill: false,
        })
    }

    /// Batches wait up to the linger to fill instead of closing when nothing more is waiting: for
    /// a consumer whose cost is per batch and whose output does not wait on it (the rollup).
    #[must_use]
    pub fn filling(mut self) -> Self {
        self.fill = true;
        self
    }

    /// Closes batches once their keys and values reach `bytes` (at least one record each).
    #[must_use]
    pub fn with_max_batch_bytes(mut self, bytes: usize) -> Self {
        self.max_batch_bytes = bytes.max(1);
        self
    }

    /// Waits for a first record, then takes the records already waiting, up to `size` (and up
    /// to the batch byte bound, [`BatchConsumer::with_max_batch_bytes`]): the batch closes when
    /// nothing more is waiting, or at the latest after `linger` (a [`BatchConsumer::filling`]
    /// one waits out `linger` for more). `None` once `shutdown` is cancelled.
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
        let mut batch = Vec::with_capacity(size.min(4096));
        let mut bytes = 0;
        let size_of = |message: &OwnedMessage| {
            message.payload().map_or(0, <[u8]>::len) + message.key().map_or(0, <[u8]>::len)
        };
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
                    let message = message.detach();
                    bytes += size_of(&message);
                    batch.push(message);
                    break;
                }
                Err(error) => {
                    if self.read_failed(&error) {
                        tokio::time::sleep(ERROR_PAUSE).await;
                    }
                }
            }
        }
        // Then whatever is already waiting: the batch closes as soon as the input goes idle (at
        // a low rate that is at once, so an event does not wait out the linger), or when it is
        // full, or at the latest after `linger` while records keep trickling in. A filling
        // consumer waits out the linger for more instead.
        let deadline = tokio::time::Instant::now() + linger;
        while batch.len() < size && bytes < self.max_batch_bytes {
            let received = if self.fill {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => break,
                    received = self.consumer.recv() => received,
                }
            } else {
                // Polled once without waiting: `None` when nothing more is queued right now.
                let Some(received) = self.consumer.recv().now_or_never() else {
                    break;
                };
                received
            };
            match received {
                Ok(message) => {
                    let message = message.detach();
                    bytes += size_of(&message);
                    batch.push(message);
                }
                Err(error) => {
                    // The batch so far is handled at once, as before.
                    self.read_failed(&error);
                    break;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        Some(batch)
    }

    /// A read returned an error instead of a record. librdkafka queues one such error per failed
    /// connection attempt while the brokers are down, and this consumer reads them in order,
    /// ahead of the rebalances and records queued behind them: those about reaching the brokers
    /// (the context has counted them: one line per outage) are passed over at once. Pausing on
    /// each, as this did before, made the consumer work through a minute of stale errors after a
    /// 30 s outage before it took its partitions back (docs/architecture.md, "Recovery after a
    /// Kafka outage"). Any other error is logged; whether it is worth a pause before reading
    /// on.
    fn read_failed(&self, error: &KafkaError) -> bool {
        if let KafkaError::MessageConsumption(code) = error {
            if matches!(
                code,
                RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure
            ) {
                return false;
            }
        }
        if let KafkaError::MessageConsumptionFatal(code) = error {
            // E.g. `FencedInstanceId` with static membership (`group.instance.id` given as a
            // `--kafka-option`; docs/architecture.md, "Recovery after a Kafka outage").
            tracing::error!(%error, ?code, "Kafka refused this consumer for good; it reads nothing more until restarted.");
        } else {
            tracing::warn!(%error, "Reading from Kafka failed; reading on.");
        }
        true
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

    /// Whether this member fetches partitions and is within `slack` records of the end of each,
    /// by librdkafka's latest statistics (as fresh as `statistics.interval.ms`); false until the
    /// first statistics arrive.
    pub fn is_caught_up(&self, slack: i64) -> bool {
        let lag = match self.consumer.context().lag.lock() {
            Ok(lag) => lag.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        !lag.is_empty() && lag.values().all(|behind| (0..=slack).contains(behind))
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
