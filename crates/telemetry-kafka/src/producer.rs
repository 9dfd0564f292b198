//! [`RenewableProducer`]: every producer of ours. A caller hands it a whole batch of records at
//! once and waits once for all their acknowledgements.
//!
//! Why not rdkafka's `FutureProducer`: it makes a oneshot channel and a future per record, and
//! wakes the waiting task once per acknowledgement; at full rate that machinery cost more than
//! the rest of producing (a quarter of the audit service's CPU, docs/benchmarks.md). Here
//! librdkafka's delivery-report callback (rdkafka's `ProducerContext::delivery`, on the
//! producer's polling thread) counts each record off its batch, and only the batch's last
//! acknowledgement wakes the caller: one wakeup per batch, however many records it holds.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::Notify;

use crate::reachability::{Reachability, STATISTICS_INTERVAL_MS};
use crate::{instruments, Result};

/// Shortest life of a producer instance before a failure may replace it: the message timeout, so
/// that while Kafka is simply down the instance is renewed at most once per timeout.
const RENEW_AFTER: Duration = Duration::from_secs(30);

/// One record to produce. librdkafka copies key, payload and headers when it takes the record,
/// so the borrows end when [`RenewableProducer::send_all`] returns.
pub struct Record<'a> {
    /// The topic it goes to.
    pub topic: &'a str,
    /// Its key (which also picks its partition), if any.
    pub key: Option<&'a [u8]>,
    /// Its value, if any.
    pub payload: Option<&'a [u8]>,
    /// Its headers, if any.
    pub headers: Option<OwnedHeaders>,
}

/// A producer that replaces its librdkafka instance when deliveries keep failing.
///
/// Why: a guard. After a broker restart an idempotent librdkafka producer holds records of
/// unknown fate until they time out, and its recovery from there depends on broker and client
/// versions; a fresh instance (a new producer id) starts clean. Callers produce failed records
/// again themselves, so replacing the instance loses nothing: the old one's queued records fail
/// with a purge error and are produced again on the new one.
#[derive(Clone)]
pub struct RenewableProducer {
    inner: Arc<Renewable>,
}

type Instance = ThreadedProducer<Acknowledgements>;

struct Renewable {
    config: ClientConfig,
    /// The `service` label of the produce metrics.
    service: &'static str,
    /// Whether the brokers are reachable, across the instances.
    reachability: Arc<Reachability>,
    /// The produce metrics' handles by topic, registered once per topic rather than looked up
    /// (labels hashed, topic name copied) for every record. A service produces to a few topics.
    meters: Mutex<Vec<(String, ProduceMeters)>>,
    /// Why a mutex: producers run on several tasks; the instance is swapped rarely.
    current: Mutex<(Instance, Instant)>,
    /// The message timeout (`message.timeout.ms`) and a minute more: by then librdkafka has
    /// reported every record it was given, delivered or failed.
    give_up_after: Duration,
}

/// A topic's produce metrics.
#[derive(Clone)]
struct ProduceMeters {
    duration: metrics::Histogram,
    errors: metrics::Counter,
}

/// Where librdkafka's delivery report of one record goes: its batch and its place in it.
struct Ticket {
    batch: Arc<Batch>,
    index: usize,
}

/// The acknowledgements of one batch, filled by the delivery-report callback.
struct Batch {
    /// Records not yet acknowledged or failed.
    remaining: AtomicUsize,
    /// The records that failed, by place in the batch. Touched only on failures.
    failed: Mutex<Vec<(usize, KafkaError)>>,
    /// Notified once, by the batch's last report.
    settled: Notify,
}

impl Batch {
    fn settle(&self, index: usize, outcome: std::result::Result<(), KafkaError>) {
        if let Err(error) = outcome {
            lock(&self.failed).push((index, error));
        }
        // The failure is recorded before the count says so (release), and read after (acquire).
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.settled.notify_one();
        }
    }
}

/// The producer context: counts each delivery report off its batch, and says once per outage
/// that the brokers are unreachable (shared by the instances a producer is renewed with).
struct Acknowledgements {
    reachability: Arc<Reachability>,
}

impl ClientContext for Acknowledgements {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        self.reachability.log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.reachability.error(&error, reason);
    }

    fn stats(&self, statistics: Statistics) {
        self.reachability.statistics(&statistics);
    }
}

impl ProducerContext for Acknowledgements {
    type DeliveryOpaque = Box<Ticket>;

    fn delivery(&self, result: &DeliveryResult<'_>, ticket: Box<Ticket>) {
        let outcome = match result {
            Ok(_) => Ok(()),
            Err((error, _)) => Err(error.clone()),
        };
        ticket.batch.settle(ticket.index, outcome);
    }
}

/// A batch handed to librdkafka; [`Deliveries::wait`] resolves once Kafka acknowledged or failed
/// every record of it.
#[must_use = "records are produced, but nothing waits for Kafka's acknowledgements"]
pub struct Deliveries {
    batch: Arc<Batch>,
    started: Instant,
    /// When to stop waiting for reports librdkafka should have sent by then.
    give_up_after: Duration,
    /// The topics' meters, each with the first place in the batch it applies from.
    meters: Vec<(usize, ProduceMeters)>,
    count: usize,
}

impl Deliveries {
    /// The records that failed, by place in the batch (ascending), with their errors; empty when
    /// Kafka acknowledged them all.
    pub async fn wait(self) -> Vec<(usize, KafkaError)> {
        let give_up = tokio::time::Instant::from_std(self.started + self.give_up_after);
        let mut lost = false;
        while self.batch.remaining.load(Ordering::Acquire) > 0 {
            // `notify_one` keeps a permit when nobody waits yet: no report is missed.
            if tokio::time::timeout_at(give_up, self.batch.settled.notified())
                .await
                .is_err()
            {
                lost = true;
                break;
            }
        }
        let mut failed = std::mem::take(&mut *lock(&self.batch.failed));
        if lost {
            // librdkafka reports every record within its message timeout while the instance
            // lives; reports can only be lost when an instance is destroyed before it could
            // send them (a renewal's purge outlasting its half second). Which of the others
            // arrived is not kept, so every place counts as failed and is produced again: at
            // least once, never lost.
            tracing::warn!(
                records = self.count,
                "Kafka's delivery reports of a batch did not all arrive; producing the batch again."
            );
            failed = (0..self.count)
                .map(|place| (place, KafkaError::Canceled))
                .collect();
        }
        failed.sort_unstable_by_key(|(index, _)| *index);
        // From handing the batch to librdkafka to its last acknowledgement (acks=all): batching,
        // compression, the network and replication; what Kafka adds to a record's latency.
        let elapsed = self.started.elapsed().as_secs_f64();
        let mut failures = failed.iter().map(|(index, _)| *index).peekable();
        for (run, (from, meters)) in self.meters.iter().enumerate() {
            let until = self
                .meters
                .get(run + 1)
                .map_or(self.count, |(next, _)| *next);
            let mut errors = 0;
            while failures.next_if(|index| *index < until).is_some() {
                errors += 1;
            }
            if errors > 0 {
                meters.errors.increment(errors as u64);
            }
            let acknowledged = until - from - errors;
            if acknowledged > 0 {
                meters.duration.record_many(elapsed, acknowledged);
            }
        }
        failed
    }
}

impl RenewableProducer {
    /// Creates the first instance from `config` (see [`crate::KafkaConfig::producer_config`]),
    /// for `service` (the label of its metrics).
    pub fn new(mut config: ClientConfig, service: &'static str) -> Result<Self> {
        // Whether a broker answers again after an outage (the reachability's "back" line).
        if config.get("statistics.interval.ms").is_none() {
            config.set("statistics.interval.ms", STATISTICS_INTERVAL_MS);
        }
        let reachability = Arc::new(Reachability::new("producer", service));
        let producer = config.create_with_context(Acknowledgements {
            reachability: reachability.clone(),
        })?;
        // librdkafka's default message timeout is 300 s.
        let message_timeout_ms = config
            .get("message.timeout.ms")
            .and_then(|value| value.parse::<u64>().ok())
            .unwrap_or(300_000);
        Ok(RenewableProducer {
            inner: Arc::new(Renewable {
                config,
                service,
                reachability,
                meters: Mutex::new(Vec::new()),
                current: Mutex::new((producer, Instant::now())),
                give_up_after: Duration::from_millis(message_timeout_ms) + Duration::from_secs(60),
            }),
        })
    }

    /// The current instance (cheap: a reference-counted handle).
    fn current(&self) -> Instance {
        lock(&self.inner.current).0.clone()
    }

    /// Reports a failed delivery. Replaces the instance when it has lived at least
    /// [`RENEW_AFTER`], so a broker outage renews it at most once per message timeout.
    pub fn delivery_failed(&self, error: &KafkaError) {
        // librdkafka's queue is full: the instance is fine, only busy (renewing it would purge
        // everything it holds).
        if matches!(
            error,
            KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
        ) {
            return;
        }
        let mut current = lock(&self.inner.current);
        if current.1.elapsed() < RENEW_AFTER {
            return;
        }
        match self.inner.config.create_with_context(Acknowledgements {
            reachability: self.inner.reachability.clone(),
        }) {
            Ok(fresh) => {
                let old = std::mem::replace(&mut *current, (fresh, Instant::now())).0;
                drop(current);
                tracing::warn!(%error, "Kafka deliveries are failing; replaced the producer with a fresh instance.");
                // Dropping purges its queue (those records fail and are produced again) and
                // blocks for up to half a second: not on an async worker.
                std::thread::spawn(move || drop(old));
            }
            Err(create_error) => {
                tracing::error!(%create_error, "Could not create a fresh Kafka producer; keeping the current one.");
            }
        }
    }

    /// Hands every record to librdkafka now, in order, and returns their acknowledgements to
    /// wait for. A record librdkafka does not take (its queue full, too large) fails at once.
    /// The caller decides about retrying, and reports failures through
    /// [`RenewableProducer::delivery_failed`].
    pub fn send_all<'a>(&self, records: impl ExactSizeIterator<Item = Record<'a>>) -> Deliveries {
        let count = records.len();
        let batch = Arc::new(Batch {
            remaining: AtomicUsize::new(count),
            failed: Mutex::new(Vec::new()),
            settled: Notify::new(),
        });
        let producer = self.current();
        let mut meters: Vec<(usize, ProduceMeters)> = Vec::with_capacity(2);
        let mut topic: Option<&str> = None;
        for (index, record) in records.enumerate() {
            if topic != Some(record.topic) {
                topic = Some(record.topic);
                meters.push((index, self.meters(record.topic)));
            }
            let ticket = Box::new(Ticket {
                batch: Arc::clone(&batch),
                index,
            });
            let mut base =
                BaseRecord::<[u8], [u8], Box<Ticket>>::with_opaque_to(record.topic, ticket);
            if let Some(key) = record.key {
                base = base.key(key);
            }
            if let Some(payload) = record.payload {
                base = base.payload(payload);
            }
            if let Some(headers) = record.headers {
                base = base.headers(headers);
            }
            if let Err((error, refused)) = producer.send(base) {
                refused.delivery_opaque.batch.settle(index, Err(error));
            }
        }
        Deliveries {
            batch,
            started: Instant::now(),
            give_up_after: self.inner.give_up_after,
            meters,
            count,
        }
    }

    /// Produces one record and waits for Kafka's acknowledgement, or the error it failed with.
    pub async fn send(&self, record: Record<'_>) -> std::result::Result<(), KafkaError> {
        match self.send_all(std::iter::once(record)).wait().await.pop() {
            Some((_, error)) => Err(error),
            None => Ok(()),
        }
    }

    /// The produce metrics of `topic`, registered on its first record.
    fn meters(&self, topic: &str) -> ProduceMeters {
        let mut meters = lock(&self.inner.meters);
        if let Some((_, found)) = meters.iter().find(|(name, _)| name == topic) {
            return found.clone();
        }
        let (service, label) = (self.inner.service, topic.to_string());
        let registered = ProduceMeters {
            duration: instruments::KAFKA_PRODUCE_DURATION
                .histogram_of(telemetry_metrics::series!(service, label.clone())),
            errors: instruments::KAFKA_PRODUCE_ERRORS
                .counter_of(telemetry_metrics::series!(service, label.clone())),
        };
        meters.push((label, registered.clone()));
        registered
    }

    /// Waits up to `timeout` for everything queued in the current instance.
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        Ok(self.current().flush(timeout)?)
    }
}

/// A mutex's guard, also after a panic elsewhere poisoned it (the data stays consistent: every
/// critical section here is a push, a take or a swap).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    //! Against the real Kafka of `scripts/services.sh`.

    use rdkafka::message::{Header, Headers, Message};
    use telemetry_testkit::{kafka_brokers, read_topic, unique};

    use super::*;
    use crate::KafkaConfig;

    fn producer(extra: &[(&str, &str)]) -> (KafkaConfig, RenewableProducer) {
        let kafka = KafkaConfig {
            brokers: kafka_brokers(),
            topic_partitions: 1,
            ..KafkaConfig::default()
        };
        let config = kafka.producer_config(extra).expect("producer settings");
        (
            kafka,
            RenewableProducer::new(config, "test").expect("producer"),
        )
    }

    #[tokio::test]
    async fn a_batch_is_acknowledged_at_once_and_its_failures_are_named_by_place() {
        // A producer that takes records of at most 2,000 bytes: the third record fails at once,
        // the others reach the topic, in order, with their keys and headers.
        let (kafka, producer) = producer(&[("message.max.bytes", "2000")]);
        let topic = unique("send_all");
        crate::ensure_topics(&kafka, &[topic.as_str()])
            .await
            .expect("topic");
        let large = vec![b'x'; 4000];
        let payloads: Vec<Vec<u8>> = (0..5)
            .map(|n| {
                if n == 2 {
                    large.clone()
                } else {
                    format!("record {n}").into_bytes()
                }
            })
            .collect();
        let records = payloads.iter().enumerate().map(|(n, payload)| Record {
            topic: &topic,
            key: Some(b"device-1"),
            payload: Some(payload),
            headers: (n == 4).then(|| {
                OwnedHeaders::new().insert(Header {
                    key: "note",
                    value: Some("last".as_bytes()),
                })
            }),
        });
        let failed = producer.send_all(records).wait().await;
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].0, 2);
        assert_eq!(crate::refusal(&failed[0].1), Some(crate::Refusal::TooLarge));

        let read = read_topic(&topic, 4, Duration::from_secs(30), Duration::from_secs(1)).await;
        let values: Vec<&[u8]> = read.iter().filter_map(Message::payload).collect();
        assert_eq!(
            values,
            [&b"record 0"[..], b"record 1", b"record 3", b"record 4"]
        );
        assert!(read
            .iter()
            .all(|record| record.key() == Some(&b"device-1"[..])));
        let note = read[3]
            .headers()
            .and_then(|found| found.iter().find(|header| header.key == "note"))
            .and_then(|header| header.value);
        assert_eq!(note, Some(&b"last"[..]));

        // An empty batch is settled at once; a single record goes through `send`.
        assert!(producer
            .send_all(std::iter::empty())
            .wait()
            .await
            .is_empty());
        let one = Record {
            topic: &topic,
            key: None,
            payload: Some(b"alone"),
            headers: None,
        };
        producer.send(one).await.expect("acknowledged");
    }

    #[tokio::test]
    async fn records_of_an_unreachable_kafka_fail_instead_of_waiting_for_ever() {
        // Nothing listens on port 9; librdkafka gives up on each record after the message
        // timeout, and the batch settles with every record failed, by place.
        let kafka = KafkaConfig {
            brokers: "127.0.0.1:9".to_string(),
            ..KafkaConfig::default()
        };
        let config = kafka
            .producer_config(&[("message.timeout.ms", "1500")])
            .expect("producer settings");
        let producer = RenewableProducer::new(config, "test").expect("producer");
        let records = (0..3).map(|_| Record {
            topic: "nowhere",
            key: None,
            payload: Some(b"lost?"),
            headers: None,
        });
        let failed =
            tokio::time::timeout(Duration::from_secs(20), producer.send_all(records).wait())
                .await
                .expect("settled within the message timeout");
        let places: Vec<usize> = failed.iter().map(|(place, _)| *place).collect();
        assert_eq!(places, [0, 1, 2]);
        assert!(failed
            .iter()
            .all(|(_, error)| crate::refusal(error).is_none()));
    }
}
