//! What a failed produce means, and how large a record a topic takes.
//!
//! Every producer of ours retries what failed, and most failures are passing (a broker restart,
//! a leader election, a full queue). A few are final for that one record: Kafka will refuse it
//! however often it is sent (too large, invalid by a broker policy). Retrying those for ever
//! stops the partition behind them, so [`refusal`] tells them apart and the caller sends what it
//! can keep of the record instead (the bridge and the audit service: the first bytes, with the
//! reason in headers). [`TopicLimits`] says how large a record a topic takes, so the bridge
//! can cut a payload before Kafka refuses it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::{KafkaConfig, Result};

/// Why Kafka refused a record for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The record (or the batch it was in) is larger than the topic or the producer takes.
    TooLarge,
    /// Anything else final for this record: invalid, a broker policy, a bad timestamp.
    Invalid,
}

impl Refusal {
    /// The reason code this refusal gives a record: `payload_too_large` or `kafka_rejected`.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::TooLarge => telemetry_core::Code::PayloadTooLarge.as_str(),
            Refusal::Invalid => telemetry_core::Code::KafkaRejected.as_str(),
        }
    }
}

/// `Some` when `error` is final for the record that failed with it; `None` when sending it again
/// may succeed (the caller retries with backoff).
pub fn refusal(error: &KafkaError) -> Option<Refusal> {
    let code = match error {
        KafkaError::MessageProduction(code) => *code,
        _ => return None,
    };
    match code {
        RDKafkaErrorCode::MessageSizeTooLarge
        | RDKafkaErrorCode::MessageBatchTooLarge
        | RDKafkaErrorCode::InvalidMessageSize => Some(Refusal::TooLarge),
        RDKafkaErrorCode::InvalidRecord
        | RDKafkaErrorCode::InvalidMessage
        | RDKafkaErrorCode::BadMessage
        | RDKafkaErrorCode::InvalidTimestamp
        | RDKafkaErrorCode::PolicyViolation
        | RDKafkaErrorCode::UnsupportedForMessageFormat => Some(Refusal::Invalid),
        _ => None,
    }
}

/// Bytes a record costs beyond its key, value and headers in Kafka's record batch format (the
/// batch header, 61 bytes, and the record's own framing), rounded up generously: a record is cut
/// to fit under the limit with this much room to spare.
pub const RECORD_OVERHEAD_BYTES: usize = 256;

/// The size a record counts against a topic's `max.message.bytes`: key, value, headers and
/// [`RECORD_OVERHEAD_BYTES`].
pub fn record_bytes(key: usize, value: usize, headers: &[(&str, usize)]) -> usize {
    let headers: usize = headers
        .iter()
        .map(|(name, value)| name.len() + value + 8)
        .sum();
    key + value + headers + RECORD_OVERHEAD_BYTES
}

/// How long a topic's limit is trusted before it is read again after a refusal.
const REFRESH_AFTER: Duration = Duration::from_secs(10);

/// Kafka's default `max.message.bytes` for topics (and `message.max.bytes` for brokers).
const KAFKA_DEFAULT_MAX_MESSAGE_BYTES: usize = 1_048_588;

/// The largest record each topic takes: the smaller of its `max.message.bytes` and the
/// producer's `message.max.bytes`. Read from the brokers at first use and again (at most every
/// ten seconds) when a record is refused as too large, so a limit an operator lowers later is
/// learned from the refusal.
pub struct TopicLimits {
    admin: AdminClient<DefaultClientContext>,
    /// The producer's own `message.max.bytes`, which librdkafka enforces before sending.
    producer_limit: usize,
    /// Why a mutex: read by every produce, written rarely.
    known: Mutex<HashMap<String, (usize, Instant)>>,
}

impl TopicLimits {
    /// Limits read through an admin client of `config`, for a producer whose `message.max.bytes`
    /// is `producer_limit`.
    pub fn new(config: &KafkaConfig, producer_limit: usize) -> Result<Self> {
        Ok(TopicLimits {
            admin: config.client_config(&[])?.create()?,
            producer_limit,
            known: Mutex::new(HashMap::new()),
        })
    }

    /// The largest record `topic` takes, as last read.
    pub async fn max_record_bytes(&self, topic: &str) -> usize {
        if let Some((limit, _)) = self.lock().get(topic) {
            return *limit;
        }
        self.read(topic).await
    }

    /// After a refusal: reads `topic`'s limit again unless it was read within the last ten
    /// seconds, and returns it.
    pub async fn refresh(&self, topic: &str) -> usize {
        match self.lock().get(topic) {
            Some((limit, read_at)) if read_at.elapsed() < REFRESH_AFTER => return *limit,
            _ => {}
        }
        self.read(topic).await
    }

    async fn read(&self, topic: &str) -> usize {
        let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        let specifier = ResourceSpecifier::Topic(topic);
        let read = self
            .admin
            .describe_configs([&specifier], &options)
            .await
            .ok()
            .and_then(|mut results| results.pop())
            .and_then(|result| result.ok())
            .and_then(|resource| {
                resource
                    .get("max.message.bytes")
                    .and_then(|entry| entry.value.as_deref())
                    .and_then(|value| value.parse::<usize>().ok())
            });
        let topic_limit = match read {
            Some(limit) => limit,
            None => {
                tracing::warn!(
                    topic,
                    "Could not read the topic's max.message.bytes; assuming Kafka's default."
                );
                KAFKA_DEFAULT_MAX_MESSAGE_BYTES
            }
        };
        let limit = topic_limit.min(self.producer_limit);
        let previous = self
            .lock()
            .insert(topic.to_string(), (limit, Instant::now()));
        if previous.is_none_or(|(before, _)| before != limit) {
            tracing::info!(
                topic,
                max_record_bytes = limit,
                "The largest record the topic takes."
            );
        }
        limit
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (usize, Instant)>> {
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_refusals_are_told_from_passing_failures() {
        let produce = KafkaError::MessageProduction;
        assert_eq!(
            refusal(&produce(RDKafkaErrorCode::MessageSizeTooLarge)),
            Some(Refusal::TooLarge)
        );
        assert_eq!(
            refusal(&produce(RDKafkaErrorCode::InvalidRecord)),
            Some(Refusal::Invalid)
        );
        for passing in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::PurgeQueue,
            RDKafkaErrorCode::AllBrokersDown,
        ] {
            assert_eq!(refusal(&produce(passing)), None, "{passing:?}");
        }
        assert_eq!(refusal(&KafkaError::Canceled), None);
        assert_eq!(Refusal::TooLarge.code(), "payload_too_large");
        assert_eq!(Refusal::Invalid.code(), "kafka_rejected");
    }

    #[test]
    fn record_bytes_count_key_value_headers_and_framing() {
        assert_eq!(
            record_bytes(6, 1000, &[("mqtt.topic", 24)]),
            6 + 1000 + 10 + 24 + 8 + RECORD_OVERHEAD_BYTES
        );
    }
}
