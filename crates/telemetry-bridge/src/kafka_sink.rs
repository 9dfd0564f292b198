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
use rdkafka::producer::FutureRecord;
use telemetry_core::names::headers;
use telemetry_core::KEPT_PAYLOAD_BYTES;
use telemetry_kafka::delivery::record_bytes;
use telemetry_kafka::{refusal, Refusal, RenewableProducer, TopicLimits};
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

/// A message whose record Kafka has confirmed.
type Delivered = BoxFuture<'static, Message>;

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
        let mut in_flight_bytes = 0usize;
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
                in_flight_gauge.set(in_flight.len() as f64);
                in_flight_bytes_gauge.set(in_flight_bytes as f64);
                queued_gauge.set(messages.len() as f64);
            }
            // One message always passes, however large, or nothing would ever move.
            let room = in_flight.is_empty()
                || (in_flight.len() < bound.records && in_flight_bytes < bound.bytes);
            if !room && !full {
                held_back.increment(1);
            }
            full = !room;
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(delivered) = in_flight.next(), if !in_flight.is_empty() => {
                    in_flight_bytes -= delivered.payload.len();
                    acknowledge(&delivered, mqtt, &produced);
                }
                received = messages.recv(), if room => match received {
                    Some(mut message) => {
                        // Out of the queue: its bytes count as in flight now.
                        message.queued = None;
                        in_flight_bytes += message.payload.len();
                        websocket::broadcast(frames, &message);
                        in_flight.push_back(self.deliver(message));
                    }
                    None => break,
                },
            }
        }
        // Stop intake; what the MQTT task still receives stays unacknowledged and is redelivered.
        messages.close();
        let pending = in_flight.len();
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

    /// Produces `message` until Kafka confirms it: whole if it fits, else cut. Passing failures
    /// are retried; a final refusal makes the next attempt smaller (whole, the first bytes, no
    /// bytes), so no message holds up the ones behind it. Each message retries on its own, so
    /// many failing at once (a broker restart) retry together, while [`FuturesOrdered`] still
    /// hands them back in arrival order for acknowledgement.
    fn deliver(&self, message: Message) -> Delivered {
        let sink = self.clone();
        async move {
            let (mut delay, max_delay) = RETRY_DELAY;
            let mut form = sink.form(&message).await;
            loop {
                let error = match sink.produce(&message, &form).await {
                    Ok(()) => {
                        if let Form::Cut { reason, .. } = &form {
                            instruments::RECORDS_CUT
                                .counter_of(series!(SERVICE, reason.code()))
                                .increment(1);
                        }
                        return message;
                    }
                    Err(error) => error,
                };
                match refusal(&error) {
                    Some(refused) => {
                        KAFKA_RECORDS_REFUSED
                            .counter_of(series!(SERVICE, refused.code()))
                            .increment(1);
                        match sink.smaller(&message, &form, refused, &error).await {
                            Some(next) => {
                                tracing::warn!(%error, mqtt_topic = %message.topic, bytes = message.payload.len(), "Kafka refused a record for good; producing what can be kept of it.");
                                form = next;
                                continue;
                            }
                            None if form == Form::Whole => {
                                // Refused as too large while it fits the limit as last read:
                                // the batch it was in was too large, not the record.
                                tracing::debug!(%error, "A record was refused with its batch; producing it again.");
                            }
                            None => {
                                tracing::error!(%error, topic = %sink.topic, "The raw topic refuses even a record without payload; an operator must fix the topic. Retrying.");
                            }
                        }
                    }
                    None => {
                        sink.producer.delivery_failed(&error);
                        tracing::debug!(%error, mqtt_topic = %message.topic, "Producing to Kafka failed; retrying.");
                    }
                }
                instruments::counter(&PRODUCE_RETRIES).increment(1);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(max_delay);
            }
        }
        .boxed()
    }

    /// The form a message goes out in first: cut if it was read through or is larger than the
    /// bridge forwards or the raw topic takes.
    async fn form(&self, message: &Message) -> Form {
        let size = message.payload.len();
        if let Some(original) = message.original_bytes {
            return self
                .cut(
                    message,
                    Refusal::TooLarge,
                    format!(
                        "the MQTT packet was larger than the bridge reads whole \
                         (TELEMETRY_MQTT_MAX_PACKET_BYTES = {}); {original} bytes of payload",
                        self.max_packet_bytes
                    ),
                )
                .await;
        }
        if size > self.max_message_bytes {
            return self
                .cut(
                    message,
                    Refusal::TooLarge,
                    format!(
                        "larger than TELEMETRY_MAX_MESSAGE_BYTES = {}",
                        self.max_message_bytes
                    ),
                )
                .await;
        }
        let limit = self.limits.max_record_bytes(&self.topic).await;
        if self.record_bytes(message, size, None) > limit {
            return self
                .cut(
                    message,
                    Refusal::TooLarge,
                    format!("the raw topic takes records of at most {limit} bytes"),
                )
                .await;
        }
        Form::Whole
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
                Some(
                    self.cut(
                        message,
                        refused,
                        format!("the raw topic takes records of at most {limit} bytes"),
                    )
                    .await,
                )
            }
            (Form::Whole, Refusal::Invalid) => Some(
                self.cut(message, refused, format!("Kafka refused it: {error}"))
                    .await,
            ),
            (Form::Cut { kept, detail, .. }, _) if *kept > 0 => Some(Form::Cut {
                kept: 0,
                reason: refused,
                detail: format!("{detail}; Kafka refused its first {kept} bytes too: {error}"),
            }),
            (Form::Cut { .. }, _) => None,
        }
    }

    /// The message cut to what the raw topic takes, at most [`KEPT_PAYLOAD_BYTES`].
    async fn cut(&self, message: &Message, reason: Refusal, detail: String) -> Form {
        let limit = self.limits.max_record_bytes(&self.topic).await;
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

    /// Produces `message` once in `form`; resolves when Kafka confirmed or failed it.
    async fn produce(&self, message: &Message, form: &Form) -> Result<(), KafkaError> {
        let received_at = message.received_at.to_string();
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
        let mut record = FutureRecord::<str, [u8]>::to(&self.topic)
            .payload(payload)
            .headers(record_headers);
        if let Some(device_id) = &message.device_id {
            record = record.key(device_id.as_str());
        }
        self.producer.send(record).await
    }
}

/// Where confirmed messages are counted: the metric and the bridge's progress.
struct Produced<'a>(metrics::Counter, &'a Progress);

/// Counts a confirmed message and acknowledges it to the MQTT broker.
fn acknowledge(message: &Message, mqtt: &MqttHandle, produced: &Produced<'_>) {
    produced.0.increment(1);
    Progress::add(&produced.1.produced, 1);
    mqtt.ack(message);
}
