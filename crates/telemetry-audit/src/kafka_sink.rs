//! Produces cleaned events and dead letters, retrying each record until Kafka acknowledged it.
//!
//! A record Kafka refuses for good (too large for its topic, invalid by a broker policy) is not
//! retried for ever, which would stop the partition behind it: a cleaned event becomes a dead
//! letter of its raw record (`kafka_rejected`; its row is in the table), and a dead letter is
//! produced cut, with its first bytes and the reason in `payload.*` headers, then with none.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use telemetry_core::event::CleanedRecord;
use telemetry_core::names::headers;
use telemetry_core::KEPT_PAYLOAD_BYTES;
use telemetry_kafka::delivery::record_bytes;
use telemetry_kafka::{refusal, KafkaConfig, Record, Refusal, RenewableProducer, TopicLimits};
use telemetry_metrics::{series, KAFKA_RECORDS_REFUSED, PRODUCE_RETRIES, RECORDS_PRODUCED};
use telemetry_retry::RETRY_BACKOFF;
use tokio_util::sync::CancellationToken;

use crate::instruments::SERVICE;

use crate::Result;

/// A record to produce, owned so it can be produced again after a failure. A dead letter's key
/// and bytes are not copied: they are the raw record's, at `source` in the batch.
pub(crate) struct OutgoingRecord {
    /// `cleaned` or `dlq`: the metric label (topic names vary, the roles do not).
    kind: &'static str,
    topic: Arc<str>,
    /// The raw record it comes from: its index in the batch.
    source: usize,
    /// A cleaned record's key and JSON; `None` for a dead letter, whose are the raw record's.
    own: Option<(Vec<u8>, Vec<u8>)>,
    headers: OwnedHeaders,
    /// How much of the raw record's bytes a dead letter carries.
    body: Body,
}

/// What an [`OutgoingRecord`] would produce: topic, key, value and headers (UTF-8 values).
#[cfg(test)]
pub(crate) struct Parts<'a> {
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: Vec<(String, String)>,
}

/// How much of the raw record's payload a dead letter carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    Whole,
    /// The first bytes only.
    Head(usize),
}

impl OutgoingRecord {
    /// The cleaned-topic record of an accepted event (the raw record at `source`): JSON, keyed
    /// by device id.
    pub fn cleaned(
        topic: &Arc<str>,
        source: usize,
        record: &CleanedRecord,
    ) -> serde_json::Result<Self> {
        Ok(OutgoingRecord {
            kind: "cleaned",
            topic: topic.clone(),
            source,
            own: Some((
                record.event.device_id.as_bytes().to_vec(),
                serde_json::to_vec(record)?,
            )),
            headers: OwnedHeaders::new(),
            body: Body::Whole,
        })
    }

    /// The DLQ record of a rejected one (`message`, at `source` in the batch): its key, bytes and
    /// headers unchanged, plus the reason and where it came from.
    pub fn dead_letter(
        topic: &Arc<str>,
        source: usize,
        message: &OwnedMessage,
        reason: &DeadLetter<'_>,
    ) -> Self {
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
            (headers::DEVICE_ID, reason.device),
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
            topic: topic.clone(),
            source,
            own: None,
            headers: record_headers,
            body: Body::Whole,
        }
    }

    /// What it would produce, `batch` holding the raw records.
    #[cfg(test)]
    pub fn parts<'a>(&'a self, batch: &'a [OwnedMessage]) -> Parts<'a> {
        let (key, value) = self.key_and_value(batch);
        let headers = self
            .headers
            .iter()
            .map(|header| {
                let value = String::from_utf8_lossy(header.value.unwrap_or_default());
                (header.key.to_string(), value.into_owned())
            })
            .collect();
        Parts {
            topic: &self.topic,
            key,
            value,
            headers,
        }
    }

    /// The record to hand to Kafka, `batch` holding the raw records.
    pub fn to_kafka<'a>(&'a self, batch: &'a [OwnedMessage]) -> Record<'a> {
        let (key, payload) = self.key_and_value(batch);
        Record {
            topic: &self.topic,
            key,
            payload,
            // A cleaned record has none: no copy of an empty list per event.
            headers: (self.headers.count() > 0).then(|| self.headers.clone()),
        }
    }

    /// Its key and value, `batch` holding the raw records.
    fn key_and_value<'a>(
        &'a self,
        batch: &'a [OwnedMessage],
    ) -> (Option<&'a [u8]>, Option<&'a [u8]>) {
        match &self.own {
            Some((key, value)) => (Some(key), Some(value)),
            None => {
                let message = batch.get(self.source);
                let value = message
                    .and_then(Message::payload)
                    .map(|payload| match self.body {
                        Body::Whole => payload,
                        Body::Head(kept) => &payload[..kept.min(payload.len())],
                    });
                (message.and_then(Message::key), value)
            }
        }
    }

    /// What it counts against its topic's record limit.
    fn size(&self, batch: &[OwnedMessage]) -> usize {
        let (key, value) = self.key_and_value(batch);
        let header_sizes: Vec<(&str, usize)> = self
            .headers
            .iter()
            .map(|header| (header.key, header.value.map_or(0, <[u8]>::len)))
            .collect();
        record_bytes(
            key.map_or(0, <[u8]>::len),
            value.map_or(0, <[u8]>::len),
            &header_sizes,
        )
    }
}

/// Why a record goes to the DLQ, as its headers say it.
pub(crate) struct DeadLetter<'a> {
    /// The device it counts against (`device.id`), when its topic names one.
    pub device: Option<&'a str>,
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
    limits: TopicLimits,
    dlq_topic: Arc<str>,
    contract_version: u32,
}

impl OutcomeSink {
    pub fn new(kafka: &KafkaConfig, contract_version: u32) -> Result<Self> {
        let client = kafka.producer_config(&[])?;
        let producer_limit = telemetry_kafka::producer_max_message_bytes(&client);
        let producer = RenewableProducer::new(client, "audit")?;
        Ok(OutcomeSink {
            producer,
            limits: TopicLimits::new(kafka, producer_limit)?,
            dlq_topic: Arc::from(kafka.dlq_topic.as_str()),
            contract_version,
        })
    }

    /// Produces every record (their raw records in `batch`) and waits for Kafka's
    /// acknowledgements, producing failed ones again with backoff, and what Kafka refuses for
    /// good in a form it takes. `false` if `shutdown` came first.
    pub async fn produce_all(
        &self,
        records: Vec<OutgoingRecord>,
        batch: &[OwnedMessage],
        shutdown: &CancellationToken,
    ) -> bool {
        let (mut backoff, max_backoff) = RETRY_BACKOFF;
        let mut pending = records;
        loop {
            // While Kafka is down deliveries wait up to message.timeout.ms; shutdown does not.
            let deliveries = self
                .producer
                .send_all(pending.iter().map(|record| record.to_kafka(batch)));
            let mut failures = tokio::select! {
                () = shutdown.cancelled() => return false,
                failed = deliveries.wait() => failed.into_iter().peekable(),
            };
            // Counted per batch and kind: a metric looked up per record was 5% of the audit's CPU.
            let mut produced: Vec<(&'static str, u64)> = Vec::with_capacity(2);
            let mut failed = Vec::new();
            let mut refused_now = false;
            for (at, record) in pending.into_iter().enumerate() {
                let Some((_, error)) = failures.next_if(|(failed_at, _)| *failed_at == at) else {
                    match produced.iter_mut().find(|(kind, _)| *kind == record.kind) {
                        Some((_, count)) => *count += 1,
                        None => produced.push((record.kind, 1)),
                    }
                    continue;
                };
                match refusal(&error) {
                    Some(refused) => {
                        refused_now = true;
                        failed.push(self.smaller(record, batch, refused, &error).await);
                    }
                    None => {
                        crate::instruments::counter(&PRODUCE_RETRIES).increment(1);
                        self.producer.delivery_failed(&error);
                        tracing::warn!(%error, topic = %record.topic, "Producing failed; retrying.");
                        failed.push(record);
                    }
                }
            }
            for (kind, count) in produced {
                RECORDS_PRODUCED
                    .counter_of(series!(SERVICE, kind))
                    .increment(count);
            }
            if failed.is_empty() {
                return true;
            }
            pending = failed;
            if refused_now {
                // A record in another form goes again at once.
                continue;
            }
            tokio::select! {
                () = shutdown.cancelled() => return false,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(max_backoff);
        }
    }

    /// The form to produce `record` in after Kafka refused it for good.
    async fn smaller(
        &self,
        mut record: OutgoingRecord,
        batch: &[OwnedMessage],
        refused: Refusal,
        error: &KafkaError,
    ) -> OutgoingRecord {
        KAFKA_RECORDS_REFUSED
            .counter_of(series!(SERVICE, refused.code()))
            .increment(1);
        if refused == Refusal::TooLarge {
            // Refused with a batch that was too large, or a limit lowered since it was read?
            let limit = self.limits.refresh(&record.topic).await;
            if record.size(batch) <= limit {
                tracing::debug!(%error, "A record was refused with its batch; producing it again.");
                return record;
            }
        }
        let Some(message) = batch.get(record.source) else {
            return record; // Every record comes from its batch.
        };
        if let Some((device, _)) = &record.own {
            // A cleaned event the cleaned topic will not take: its row is in the table; the DLQ
            // says why it is not on the topic, under the event's device.
            let device = String::from_utf8_lossy(device);
            tracing::warn!(%error, offset = message.offset(), "The cleaned topic refused an event for good; it goes to the DLQ.");
            let detail =
                format!("the cleaned topic refused the event (its row is stored): {error}");
            return OutgoingRecord::dead_letter(
                &self.dlq_topic,
                record.source,
                message,
                &DeadLetter {
                    device: Some(&device),
                    code: Refusal::Invalid.code(),
                    message: &detail,
                    field: None,
                    rule: None,
                    contract_version: self.contract_version,
                },
            );
        }
        let payload = message.payload().map_or(0, <[u8]>::len);
        match record.body {
            Body::Whole => {
                record.body = Body::Head(0);
                let original = message.headers().is_some_and(|found| {
                    found
                        .iter()
                        .any(|header| header.key == headers::PAYLOAD_ORIGINAL_BYTES)
                });
                if !original {
                    let size = payload.to_string();
                    record.headers = record.headers.insert(Header {
                        key: headers::PAYLOAD_ORIGINAL_BYTES,
                        value: Some(size.as_bytes()),
                    });
                }
                let detail = format!("the DLQ topic refused the whole record: {error}");
                record.headers = record
                    .headers
                    .insert(Header {
                        key: headers::PAYLOAD_CUT_REASON,
                        value: Some(refused.code().as_bytes()),
                    })
                    .insert(Header {
                        key: headers::PAYLOAD_CUT_DETAIL,
                        value: Some(detail.as_bytes()),
                    });
                let limit = self.limits.max_record_bytes(&record.topic).await;
                let room = limit.saturating_sub(record.size(batch));
                record.body = Body::Head(payload.min(KEPT_PAYLOAD_BYTES).min(room));
            }
            Body::Head(kept) if kept > 0 => record.body = Body::Head(0),
            Body::Head(_) => {
                tracing::error!(%error, topic = %record.topic, "The DLQ topic refuses even a record without payload; an operator must fix the topic. Retrying.");
                return record;
            }
        }
        tracing::warn!(%error, offset = message.offset(), body = ?record.body, "Kafka refused a dead letter for good; producing what it takes of it.");
        record
    }

    /// Waits for anything still queued in the producer.
    pub fn flush(&self) {
        if let Err(error) = self.producer.flush(Duration::from_secs(5)) {
            tracing::warn!(%error, "Flushing the Kafka producer failed.");
        }
    }
}
