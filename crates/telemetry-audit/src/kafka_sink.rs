//! Produces cleaned events and dead letters, retrying each record until Kafka acknowledged it.

use std::time::Duration;

use futures::future::join_all;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;
use telemetry_core::event::CleanedRecord;
use telemetry_core::names::headers;
use telemetry_kafka::{KafkaConfig, RenewableProducer};
use tokio_util::sync::CancellationToken;

use telemetry_ops::RETRY_BACKOFF;

use crate::Result;

/// A record to produce, owned so it can be produced again after a failure.
pub(crate) struct OutgoingRecord {
    /// `cleaned` or `dlq`: the metric label (topic names vary, the roles do not).
    kind: &'static str,
    topic: String,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: OwnedHeaders,
}

impl OutgoingRecord {
    /// The cleaned-topic record of an accepted event: JSON, keyed by device id.
    pub fn cleaned(topic: &str, record: &CleanedRecord) -> serde_json::Result<Self> {
        Ok(OutgoingRecord {
            kind: "cleaned",
            topic: topic.to_string(),
            key: Some(record.event.device_id.as_bytes().to_vec()),
            payload: Some(serde_json::to_vec(record)?),
            headers: OwnedHeaders::new(),
        })
    }

    /// The DLQ record of a rejected one: its key, bytes and headers unchanged, plus the reason and
    /// where it came from.
    pub fn dead_letter(topic: &str, message: &OwnedMessage, reason: &DeadLetter<'_>) -> Self {
        let original = message.headers();
        let mut record_headers =
            OwnedHeaders::new_with_capacity(original.map_or(0, Headers::count) + 8);
        if let Some(original) = original {
            for header in original.iter() {
                record_headers = record_headers.insert(header);
            }
        }
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        let version = reason.contract_version.to_string();
        for (key, value) in [
            (headers::ERROR_CODE, Some(reason.code)),
            (headers::ERROR_MESSAGE, Some(reason.message)),
            (headers::ERROR_FIELD, reason.field),
            (headers::ERROR_RULE, reason.rule),
            (headers::CONTRACT_VERSION, Some(version.as_str())),
            (headers::SOURCE_TOPIC, Some(message.topic())),
            (headers::SOURCE_PARTITION, Some(partition.as_str())),
            (headers::SOURCE_OFFSET, Some(offset.as_str())),
        ] {
            if let Some(value) = value {
                record_headers = record_headers.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                });
            }
        }
        OutgoingRecord {
            kind: "dlq",
            topic: topic.to_string(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers: record_headers,
        }
    }
}

/// Why a record goes to the DLQ, as its headers say it.
pub(crate) struct DeadLetter<'a> {
    /// The stable reason code.
    pub code: &'a str,
    /// The sentence for people.
    pub message: &'a str,
    /// The payload field at fault, when one is.
    pub field: Option<&'a str>,
    /// The contract rule that failed, when one did.
    pub rule: Option<&'a str>,
    /// The version of the contract the record was checked against.
    pub contract_version: u32,
}

pub(crate) struct OutcomeSink {
    producer: RenewableProducer,
}

impl OutcomeSink {
    pub fn new(kafka: &KafkaConfig) -> Result<Self> {
        let producer = RenewableProducer::new(kafka.producer_config(&[])?, "audit")?;
        Ok(OutcomeSink { producer })
    }

    /// Produces every record and waits for Kafka's acknowledgements, producing failed ones again
    /// with backoff. `false` if `shutdown` came first.
    pub async fn produce_all(
        &self,
        records: Vec<OutgoingRecord>,
        shutdown: &CancellationToken,
    ) -> bool {
        let (mut backoff, max_backoff) = RETRY_BACKOFF;
        let mut pending = records;
        loop {
            // While Kafka is down deliveries wait up to message.timeout.ms; shutdown does not.
            let results = tokio::select! {
                () = shutdown.cancelled() => return false,
                results = join_all(pending.iter().map(|record| self.produce(record))) => results,
            };
            // Counted per batch and kind: a metric looked up per record was 5% of the audit's CPU.
            let mut produced: Vec<(&'static str, u64)> = Vec::with_capacity(2);
            let failed: Vec<OutgoingRecord> = pending
                .into_iter()
                .zip(results)
                .filter_map(|(record, result)| match result {
                    Ok(()) => {
                        match produced.iter_mut().find(|(kind, _)| *kind == record.kind) {
                            Some((_, count)) => *count += 1,
                            None => produced.push((record.kind, 1)),
                        }
                        None
                    }
                    Err(error) => {
                        metrics::counter!("produce_retries_total", "service" => "audit").increment(1);
                        self.producer.delivery_failed(&error);
                        tracing::warn!(%error, topic = %record.topic, "Producing failed; retrying.");
                        Some(record)
                    }
                })
                .collect();
            for (kind, count) in produced {
                metrics::counter!("records_produced_total", "service" => "audit", "topic" => kind)
                    .increment(count);
            }
            if failed.is_empty() {
                return true;
            }
            pending = failed;
            tokio::select! {
                () = shutdown.cancelled() => return false,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(max_backoff);
        }
    }

    async fn produce(&self, record: &OutgoingRecord) -> Result<(), rdkafka::error::KafkaError> {
        let mut future_record =
            FutureRecord::<[u8], [u8]>::to(&record.topic).headers(record.headers.clone());
        if let Some(key) = &record.key {
            future_record = future_record.key(key);
        }
        if let Some(payload) = &record.payload {
            future_record = future_record.payload(payload);
        }
        self.producer.send(future_record).await
    }

    /// Waits for anything still queued in the producer.
    pub fn flush(&self) {
        if let Err(error) = self.producer.flush(Duration::from_secs(5)) {
            tracing::warn!(%error, "Flushing the Kafka producer failed.");
        }
    }
}
