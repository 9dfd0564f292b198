//! Produces every MQTT message to the raw topic and acknowledges it to MQTT once Kafka confirmed
//! it, in the order the messages arrived.
//!
//! A message Kafka cannot take whole never stops the stream: one larger than the raw topic's
//! record limit (or `TELEMETRY_MAX_MESSAGE_BYTES`), one the session read through, and one Kafka
//! refuses for good are produced cut, holding their first bytes (at most 64 KiB) and saying so in
//! `payload.*` headers; the audit service sends them to the DLQ (`payload_too_large`,
//! `kafka_rejected`). Only passing failures (a broker down, a leader moving) are retried as they
//! are.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use futures::FutureExt;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use telemetry_core::names::headers;
use telemetry_core::KEPT_PAYLOAD_BYTES;
use telemetry_kafka::delivery::record_bytes;
use telemetry_kafka::{refusal, Record, Refusal, RenewableProducer, TopicLimits};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use telemetry_metrics::{
    series, Progress, KAFKA_RECORDS_REFUSED, PRODUCE_RETRIES, RECORDS_PRODUCED,
};

use crate::instruments::{self, SERVICE};
use crate::mqtt_source::{Message, MqttHandle};
use crate::websocket::{self, Frames};
use crate::{BridgeConfig, Result};

/// Shortest and longest wait before producing a message again after Kafka failed it.
const RETRY_DELAY: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// A raw-topic producer. Cheap to clone: every clone shares one librdkafka producer.
#[derive(Clone)]
pub(crate) struct KafkaSink {
    producer: RenewableProducer,
    limits: Arc<TopicLimits>,
    topic: Arc<str>,
    bridge_id: Arc<str>,
    /// Largest payload forwarded whole (`TELEMETRY_MAX_MESSAGE_BYTES`).
    max_message_bytes: usize,
    /// Largest MQTT packet read whole (`TELEMETRY_MQTT_MAX_PACKET_BYTES`), for messages' reasons.
    max_packet_bytes: usize,
    /// Counts the records Kafka acknowledged.
    progress: Arc<Progress>,
}

/// A batch of messages whose records Kafka has confirmed.
type Delivered = BoxFuture<'static, Vec<Message>>;

/// The most messages handed to librdkafka at once.
const MAX_BATCH: usize = 1024;

/// How much of a message a record carries.
#[derive(Debug, Clone, PartialEq)]
enum Form {
    /// The whole payload.
    Whole,
    /// The first `kept` bytes, with the reason.
    Cut {
        kept: usize,
        reason: Refusal,
        detail: String,
    },
}

/// The most a bridge holds of messages produced but not yet acknowledged.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InFlightBound {
    /// Messages.
    pub records: usize,
    /// Payload bytes.
    pub bytes: usize,
}

impl KafkaSink {
    pub fn new(config: &BridgeConfig, progress: Arc<Progress>) -> Result<Self> {
        // Failed records are produced again (see `deliver`); meanwhile nothing is acknowledged
        // and the MQTT broker buffers.
        let client = config.kafka.producer_config(&[])?;
        let producer_limit = telemetry_kafka::producer_max_message_bytes(&client);
        let producer = RenewableProducer::new(client, "bridge")?;
        Ok(KafkaSink {
            producer,
            limits: Arc::new(TopicLimits::new(&config.kafka, producer_limit)?),
            topic: Arc::from(config.kafka.raw_topic.as_str()),
            bridge_id: Arc::from(config.bridge_id.as_str()),
            max_message_bytes: config.limits.max_message_bytes,
            max_packet_bytes: config.limits.mqtt_max_packet_bytes,
            progress,
        })
    }

    /// Reads the raw topic's record limit, so the first message does not wait for it.
    pub async fn prepare(&self) {
        self.limits.max_record_bytes(&self.topic).await;
    }

    /// Moves messages from MQTT to Kafka until `shutdown`, then drains what is in flight for at
    /// most `grace` and flushes the producer.
    ///
    /// Messages go to Kafka in batches: whatever the MQTT session has queued when one is taken
    /// (within the in-flight bounds and [`MAX_BATCH`]) goes with it, so a burst costs one
    /// hand-over and one wakeup, and a lone message goes at once.
    pub async fn run(
        &self,
        mut messages: mpsc::UnboundedReceiver<Message>,
        mqtt: &MqttHandle,
        frames: &Frames,
        bound: InFlightBound,
        grace: Duration,
        shutdown: CancellationToken,
    ) {
        // Ordered, so acknowledgements go out in the order the broker sent the messages.
        let mut in_flight: FuturesOrdered<Delivered> = FuturesOrdered::new();
        let (mut in_flight_records, mut in_flight_bytes) = (0usize, 0usize);
        let produced = Produced(
            RECORDS_PRODUCED.counter_of(series!(SERVICE, "raw")),
            &self.progress,
        );
        let in_flight_gauge = instruments::gauge(&instruments::MESSAGES_IN_FLIGHT);
        let in_flight_bytes_gauge = instruments::gauge(&instruments::IN_FLIGHT_BYTES);
        let queued_gauge = instruments::gauge(&instruments::MESSAGES_QUEUED);
        let held_back = instruments::BACKPRESSURE.counter_of(series!(SERVICE, "in_flight"));
        let mut full = false;
        loop {
            #[allow(clippy::cast_precision_loss)]
            {
                in_flight_gauge.set(in_flight_records as f64);
                in_flight_bytes_gauge.set(in_flight_bytes as f64);
                queued_gauge.set(messages.len() as f64);
            }
            // One message always passes, however large, or nothing would ever move.
            let has_room = |records: usize, bytes: usize| {
                records == 0 || (records < bound.records && bytes < bound.bytes)
            };
            let room = has_room(in_flight_records, in_flight_bytes);
            if !room && !full {
                held_back.increment(1);
            }
            full = !room;
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(delivered) = in_flight.next(), if !in_flight.is_empty() => {
                    in_flight_records -= delivered.len();
                    for message in &delivered {
                        in_flight_bytes -= message.payload.len();
                    }
                    acknowledge(&delivered, mqtt, &produced);
                }
                received = messages.recv(), if room => match received {
                    Some(first) => {
                        let mut records = in_flight_records + 1;
                        let mut bytes = in_flight_bytes + first.payload.len();
                        let mut batch = vec![first];
                        while batch.len() < MAX_BATCH && has_room(records, bytes) {
                            let Ok(message) = messages.try_recv() else { break };
                            records += 1;
                            bytes += message.payload.len();
                            batch.push(message);
                        }
                        (in_flight_records, in_flight_bytes) = (records, bytes);
                        for message in &mut batch {
                            // Out of the queue: its bytes count as in flight now.
                            message.queued = None;
                            websocket::broadcast(frames, message);
                        }
                        in_flight.push_back(self.clone().deliver(batch).boxed());
                    }
                    None => break,
                },
            }
        }
        // Stop intake; what the MQTT task still receives stays unacknowledged and is redelivered.
        messages.close();
        let pending = in_flight_records;
        let drain = async {
            while let Some(delivered) = in_flight.next().await {
                acknowledge(&delivered, mqtt, &produced);
            }
        };
        if tokio::time::timeout(grace, drain).await.is_err() {
            tracing::warn!(
                pending,
                "Kafka did not confirm every in-flight message within the grace period; the MQTT broker will redeliver them."
            );
        }
        if let Err(error) = self.producer.flush(Duration::from_secs(5)) {
            tracing::warn!(%error, "Flushing the Kafka producer failed.");
        }
    }

    /// Produces every message of a batch until Kafka confirmed it: whole if it fits, else cut.
    /// Passing failures are produced again, together, with backoff; a final refusal makes that
    /// message's next attempt smaller (whole, the first bytes, no bytes), so no message holds up
    /// the ones behind it. Resolves to the batch, for acknowledgement in arrival order.
    async fn deliver(self, messages: Vec<Message>) -> Vec<Message> {
        let limit = self.limits.max_record_bytes(&self.topic).await;
        let mut forms: Vec<Form> = messages
            .iter()
            .map(|message| self.form(message, limit))
            .collect();
        let mut pending: Vec<usize> = (0..messages.len()).collect();
        // Failed for a passing reason: produced again after the backoff.
        let mut later: Vec<usize> = Vec::new();
        let (mut delay, max_delay) = RETRY_DELAY;
        loop {
            let failed = self
                .producer
                .send_all(
                    pending
                        .iter()
                        .map(|&index| self.record(&messages[index], &forms[index])),
                )
                .wait()
                .await;
            let mut next_failure = 0;
            for (at, &index) in pending.iter().enumerate() {
                if failed
                    .get(next_failure)
                    .is_some_and(|(failed_at, _)| *failed_at == at)
                {
                    next_failure += 1;
                    continue;
                }
                if let Form::Cut { reason, .. } = &forms[index] {
                    instruments::RECORDS_CUT
                        .counter_of(series!(SERVICE, reason.code()))
                        .increment(1);
                }
            }
            // In another form: produced again at once, on their own (with others, a cut record
            // could again make a batch larger than the topic takes).
            let mut now = Vec::new();
            for (at, error) in failed {
                let index = pending[at];
                let message = &messages[index];
                match refusal(&error) {
                    Some(refused) => {
                        KAFKA_RECORDS_REFUSED
                            .counter_of(series!(SERVICE, refused.code()))
                            .increment(1);
                        match self.smaller(message, &forms[index], refused, &error).await {
                            Some(next) => {
                                tracing::warn!(%error, mqtt_topic = %message.topic, bytes = message.payload.len(), "Kafka refused a record for good; producing what can be kept of it.");
                                forms[index] = next;
                                now.push(index);
                                continue;
                            }
                            None if forms[index] == Form::Whole => {
                                // Refused as too large while it fits the limit as last read:
                                // the batch it was in was too large, not the record.
                                tracing::debug!(%error, "A record was refused with its batch; producing it again.");
                            }
                            None => {
                                tracing::error!(%error, topic = %self.topic, "The raw topic refuses even a record without payload; an operator must fix the topic. Retrying.");
                            }
                        }
                    }
                    None => {
                        self.producer.delivery_failed(&error);
                        tracing::debug!(%error, mqtt_topic = %message.topic, "Producing to Kafka failed; retrying.");
                    }
                }
                instruments::counter(&PRODUCE_RETRIES).increment(1);
                later.push(index);
            }
            if !now.is_empty() {
                pending = now;
                continue;
            }
            if later.is_empty() {
                return messages;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(max_delay);
            pending = std::mem::take(&mut later);
            pending.sort_unstable();
        }
    }

    /// The form a message goes out in first: cut if it was read through or is larger than the
    /// bridge forwards or the raw topic takes (`limit`).
    fn form(&self, message: &Message, limit: usize) -> Form {
        let size = message.payload.len();
        let reason = if let Some(original) = message.original_bytes {
            format!(
                "the MQTT packet was larger than the bridge reads whole \
                 (TELEMETRY_MQTT_MAX_PACKET_BYTES = {}); {original} bytes of payload",
                self.max_packet_bytes
            )
        } else if size > self.max_message_bytes {
            format!(
                "larger than TELEMETRY_MAX_MESSAGE_BYTES = {}",
                self.max_message_bytes
            )
        } else if self.record_bytes(message, size, None) > limit {
            format!("the raw topic takes records of at most {limit} bytes")
        } else {
            return Form::Whole;
        };
        self.cut(message, Refusal::TooLarge, reason, limit)
    }

    /// The form to try after Kafka refused `form` for good; `None` to send the same again.
    async fn smaller(
        &self,
        message: &Message,
        form: &Form,
        refused: Refusal,
        error: &KafkaError,
    ) -> Option<Form> {
        match (form, refused) {
            (Form::Whole, Refusal::TooLarge) => {
                // Perhaps the topic's limit was lowered since it was read.
                let limit = self.limits.refresh(&self.topic).await;
                if self.record_bytes(message, message.payload.len(), None) <= limit {
                    return None;
                }
                let detail = format!("the raw topic takes records of at most {limit} bytes");
                Some(self.cut(message, refused, detail, limit))
            }
            (Form::Whole, Refusal::Invalid) => {
                let limit = self.limits.max_record_bytes(&self.topic).await;
                let detail = format!("Kafka refused it: {error}");
                Some(self.cut(message, refused, detail, limit))
            }
            (Form::Cut { kept, detail, .. }, _) if *kept > 0 => Some(Form::Cut {
                kept: 0,
                reason: refused,
                detail: format!("{detail}; Kafka refused its first {kept} bytes too: {error}"),
            }),
            (Form::Cut { .. }, _) => None,
        }
    }

    /// The message cut to what the raw topic takes (`limit`), at most [`KEPT_PAYLOAD_BYTES`].
    fn cut(&self, message: &Message, reason: Refusal, detail: String, limit: usize) -> Form {
        let room = limit.saturating_sub(self.record_bytes(message, 0, Some(&detail)));
        Form::Cut {
            kept: message.payload.len().min(KEPT_PAYLOAD_BYTES).min(room),
            reason,
            detail,
        }
    }

    /// What a record of `message` with `value` bytes counts against the topic's limit.
    fn record_bytes(&self, message: &Message, value: usize, detail: Option<&str>) -> usize {
        let mut header_sizes = vec![
            (headers::MQTT_TOPIC, message.topic.len()),
            (headers::RECEIVED_AT, 20),
            (headers::BRIDGE_ID, self.bridge_id.len()),
        ];
        if let Some(detail) = detail {
            header_sizes.extend([
                (headers::PAYLOAD_ORIGINAL_BYTES, 20),
                (headers::PAYLOAD_CUT_REASON, 32),
                (headers::PAYLOAD_CUT_DETAIL, detail.len()),
            ]);
        }
        let key = message.device_id.as_ref().map_or(0, String::len);
        record_bytes(key, value, &header_sizes)
    }

    /// The record of `message` in `form`.
    fn record<'a>(&'a self, message: &'a Message, form: &'a Form) -> Record<'a> {
        let mut received_at = itoa::Buffer::new();
        let received_at = received_at.format(message.received_at);
        let mut record_headers = OwnedHeaders::new_with_capacity(6)
            .insert(Header {
                key: headers::MQTT_TOPIC,
                value: Some(message.topic.as_bytes()),
            })
            .insert(Header {
                key: headers::RECEIVED_AT,
                value: Some(received_at.as_bytes()),
            })
            .insert(Header {
                key: headers::BRIDGE_ID,
                value: Some(self.bridge_id.as_bytes()),
            });
        let payload = match form {
            Form::Whole => &message.payload[..],
            Form::Cut {
                kept,
                reason,
                detail,
            } => {
                let original = message
                    .original_bytes
                    .unwrap_or(message.payload.len() as u64)
                    .to_string();
                record_headers = record_headers
                    .insert(Header {
                        key: headers::PAYLOAD_ORIGINAL_BYTES,
                        value: Some(original.as_bytes()),
                    })
                    .insert(Header {
                        key: headers::PAYLOAD_CUT_REASON,
                        value: Some(reason.code().as_bytes()),
                    })
                    .insert(Header {
                        key: headers::PAYLOAD_CUT_DETAIL,
                        value: Some(detail.as_bytes()),
                    });
                &message.payload[..(*kept).min(message.payload.len())]
            }
        };
        Record {
            topic: &self.topic,
            key: message.device_id.as_ref().map(String::as_bytes),
            payload: Some(payload),
            headers: Some(record_headers),
        }
    }
}

/// Where confirmed messages are counted: the metric and the bridge's progress.
struct Produced<'a>(metrics::Counter, &'a Progress);

/// Counts confirmed messages and acknowledges them to the MQTT broker, in order.
fn acknowledge(messages: &[Message], mqtt: &MqttHandle, produced: &Produced<'_>) {
    produced.0.increment(messages.len() as u64);
    Progress::add(&produced.1.produced, messages.len() as u64);
    for message in messages {
        mqtt.ack(message);
    }
}
