//! Kafka plumbing shared by every service: the settings every Kafka client
//! needs, the topic names, and creating those topics at start-up.
//!
//! Kept apart from `telemetry-core` so the model stays free of I/O, and shared so the two services
//! spell their client settings once.
//!
//! # Layout
//! - [`KafkaConfig`]: brokers, topic names, partitions, raw librdkafka options.
//! - [`KafkaConfig::client_config`]: an rdkafka [`ClientConfig`] with all of that applied;
//!   [`KafkaConfig::producer_config`] adds the settings every producer of ours shares.
//! - [`ensure_topics`]: create missing topics, leave existing ones alone.
//! - [`RenewableProducer`]: a producer that replaces its librdkafka instance when it stops
//!   delivering.
//! - [`BatchConsumer`]: a consumer-group member reading in batches, committing only what its
//!   caller declared durable.
//! - [`received_at`]: when the bridge received a record.

mod consumer;

pub use consumer::BatchConsumer;

use rdkafka::message::{Headers, Message};
use telemetry_core::names::headers;
use telemetry_core::validate::MAX_TIMESTAMP_MS;

/// When the bridge received a record (raw, or DLQ, which keeps the raw record's headers): its
/// `received_at` header, else the Kafka timestamp (records from other producers), else now. UTC
/// milliseconds, within the years 1970-9999.
pub fn received_at(message: &impl Message) -> i64 {
    let in_range = |millis: &i64| (0..=MAX_TIMESTAMP_MS).contains(millis);
    let from_header = message.headers().and_then(|record_headers| {
        record_headers
            .iter()
            .find(|header| header.key == headers::RECEIVED_AT)
            .and_then(|header| header.value)
            .and_then(|value| std::str::from_utf8(value).ok())
            .and_then(|text| text.parse::<i64>().ok())
            .filter(in_range)
    });
    from_header
        .or_else(|| message.timestamp().to_millis().filter(in_range))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| {
                    i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
                })
        })
}

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::ToBytes;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use telemetry_core::names::topics;

/// Errors from Kafka set-up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `--kafka-option` was not of the form `key=value`.
    #[error("kafka option `{0}` is not of the form key=value")]
    InvalidOption(String),
    /// librdkafka refused the client configuration or the request.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The broker refused to create a topic.
    #[error("creating topic `{topic}` failed: {code}")]
    CreateTopic {
        /// The topic that could not be created.
        topic: String,
        /// The broker's error code.
        code: RDKafkaErrorCode,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Kafka settings shared by every service.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaConfig {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(
        long = "kafka-brokers",
        env = "TELEMETRY_KAFKA_BROKERS",
        default_value = "127.0.0.1:9092"
    )]
    pub brokers: String,

    /// Topic of raw MQTT payloads (bridge produces, audit consumes).
    #[arg(long = "raw-topic", env = "TELEMETRY_RAW_TOPIC", default_value = topics::RAW)]
    pub raw_topic: String,

    /// Topic of validated, normalized events (audit produces).
    #[arg(long = "cleaned-topic", env = "TELEMETRY_CLEANED_TOPIC", default_value = topics::CLEANED)]
    pub cleaned_topic: String,

    /// Dead-letter topic of rejected records (audit produces).
    #[arg(long = "dlq-topic", env = "TELEMETRY_DLQ_TOPIC", default_value = topics::DLQ)]
    pub dlq_topic: String,

    /// Partitions of each topic created at start-up (existing topics are left as they are).
    #[arg(long = "topic-partitions", env = "TELEMETRY_TOPIC_PARTITIONS", default_value_t = 3,
          value_parser = clap::value_parser!(i32).range(1..))]
    pub topic_partitions: i32,

    /// Replication factor of each topic created at start-up.
    #[arg(long = "topic-replication-factor", env = "TELEMETRY_TOPIC_REPLICATION_FACTOR",
          default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..))]
    pub topic_replication_factor: i32,

    /// Raw librdkafka option for every client, as key=value (repeatable; env: comma-separated),
    /// e.g. `security.protocol=SASL_SSL`. Applied last, so it overrides our defaults.
    #[arg(
        long = "kafka-option",
        env = "TELEMETRY_KAFKA_OPTIONS",
        value_delimiter = ','
    )]
    pub options: Vec<String>,
}

/// What every producer of ours promises: a record counts as written once all in-sync replicas
/// have it, retries never duplicate or reorder it, and any payload the bridge accepts fits.
///
/// `message.timeout.ms`: after a broker restart the idempotent producer can hold records whose
/// fate it does not know until they time out (the chaos suite once waited out the full 120 s
/// then set). Our services produce failed records again themselves, so a short timeout bounds
/// such a stall without losing anything; while Kafka is down they simply retry every 30 s.
const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("acks", "all"),
    ("enable.idempotence", "true"),
    ("linger.ms", "5"),
    ("compression.type", "lz4"),
    ("message.max.bytes", "1048576"),
    ("message.timeout.ms", "30000"),
];

impl KafkaConfig {
    /// A producer configuration: [`PRODUCER_DEFAULTS`], then `extra`, then the pass-through
    /// options.
    pub fn producer_config(&self, extra: &[(&str, &str)]) -> Result<ClientConfig> {
        let settings: Vec<(&str, &str)> = PRODUCER_DEFAULTS.iter().chain(extra).copied().collect();
        self.client_config(&settings)
    }

    /// A client configuration with the brokers and the pass-through options applied over
    /// `defaults` (the caller's settings for its kind of client).
    pub fn client_config(&self, defaults: &[(&str, &str)]) -> Result<ClientConfig> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        // After a broker restart librdkafka can keep partitions leaderless in its metadata cache
        // until the next periodic refresh (default 5 min), stalling produce and fetch that long;
        // measured in the chaos suite on a restarted single-node broker. Refresh every 10 s.
        config.set("topic.metadata.refresh.interval.ms", "10000");
        for (key, value) in defaults {
            config.set(*key, *value);
        }
        for option in &self.options {
            let (key, value) = option
                .split_once('=')
                .filter(|(key, _)| !key.trim().is_empty())
                .ok_or_else(|| Error::InvalidOption(option.clone()))?;
            config.set(key.trim(), value.trim());
        }
        Ok(config)
    }
}

/// Creates each of `names` that does not exist yet, with the configured partitions and
/// replication; existing topics are left unchanged.
pub async fn ensure_topics(config: &KafkaConfig, names: &[&str]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = config.client_config(&[])?.create()?;
    let new_topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| {
            NewTopic::new(
                name,
                config.topic_partitions,
                TopicReplication::Fixed(config.topic_replication_factor),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new_topics, &options).await? {
        match result {
            Ok(topic) => tracing::info!(topic, "Created Kafka topic."),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(Error::CreateTopic { topic, code }),
        }
    }
    Ok(())
}

/// Shortest life of a producer instance before a failure may replace it: the message timeout, so
/// that while Kafka is simply down the instance is renewed at most once per timeout.
const RENEW_AFTER: Duration = Duration::from_secs(30);

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

struct Renewable {
    config: ClientConfig,
    /// Why a mutex: producers run on several tasks; the instance is swapped rarely.
    current: Mutex<(FutureProducer, Instant)>,
}

impl RenewableProducer {
    /// Creates the first instance from `config` (see [`KafkaConfig::producer_config`]).
    pub fn new(config: ClientConfig) -> Result<Self> {
        let producer: FutureProducer = config.create()?;
        Ok(RenewableProducer {
            inner: Arc::new(Renewable {
                config,
                current: Mutex::new((producer, Instant::now())),
            }),
        })
    }

    /// The current instance (cheap: a reference-counted handle).
    pub fn current(&self) -> FutureProducer {
        match self.inner.current.lock() {
            Ok(current) => current.0.clone(),
            Err(poisoned) => poisoned.into_inner().0.clone(),
        }
    }

    /// Reports a failed delivery. Replaces the instance when it has lived at least
    /// [`RENEW_AFTER`], so a broker outage renews it at most once per message timeout.
    pub fn delivery_failed(&self, error: &KafkaError) {
        let mut current = match self.inner.current.lock() {
            Ok(current) => current,
            Err(poisoned) => poisoned.into_inner(),
        };
        if current.1.elapsed() < RENEW_AFTER {
            return;
        }
        match self.inner.config.create::<FutureProducer>() {
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

    /// Produces `record` on the current instance; resolves when Kafka acknowledged it, or with
    /// the error it failed with (the caller decides about retrying, and reports it through
    /// [`RenewableProducer::delivery_failed`]).
    pub async fn send<K, P>(&self, record: FutureRecord<'_, K, P>) -> Result<(), KafkaError>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        // librdkafka copies key, payload and headers, so the record's borrows end here.
        let delivery = self
            .current()
            .send_result(record)
            .map_err(|(error, _)| error)?;
        match delivery.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((error, _))) => Err(error),
            Err(_canceled) => Err(KafkaError::Canceled),
        }
    }

    /// Waits up to `timeout` for everything queued in the current instance.
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        Ok(self.current().flush(timeout)?)
    }
}
