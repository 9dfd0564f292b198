//! Produces every MQTT message to the raw topic and acknowledges it to MQTT once Kafka confirmed
//! it, in the order the messages arrived.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use futures::FutureExt;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use telemetry_core::names::headers;
use telemetry_kafka::RenewableProducer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::mqtt_source::{Message, MqttHandle};
use crate::websocket::{self, Frames};
use crate::{BridgeConfig, Result};

/// Shortest and longest wait before producing a message again after Kafka failed it.
const RETRY_DELAY: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// A raw-topic producer. Cheap to clone: every clone shares one librdkafka producer.
#[derive(Clone)]
pub(crate) struct KafkaSink {
    producer: RenewableProducer,
    topic: Arc<str>,
    bridge_id: Arc<str>,
}

/// A message whose record Kafka has confirmed.
type Delivered = BoxFuture<'static, Message>;

impl KafkaSink {
    pub fn new(config: &BridgeConfig) -> Result<Self> {
        // Failed records are produced again (see `settle`); meanwhile nothing is acknowledged and
        // the MQTT broker buffers.
        let producer = RenewableProducer::new(config.kafka.producer_config(&[])?, "bridge")?;
        Ok(KafkaSink {
            producer,
            topic: Arc::from(config.kafka.raw_topic.as_str()),
            bridge_id: Arc::from(config.bridge_id.as_str()),
        })
    }

    /// Moves messages from MQTT to Kafka until `shutdown`, then drains what is in flight for at
    /// most `grace` and flushes the producer.
    pub async fn run(
        &self,
        mut messages: mpsc::UnboundedReceiver<Message>,
        mqtt: &MqttHandle,
        frames: &Frames,
        max_in_flight: usize,
        grace: Duration,
        shutdown: CancellationToken,
    ) {
        // Ordered, so acknowledgements go out in the order the broker sent the messages.
        let mut in_flight: FuturesOrdered<Delivered> = FuturesOrdered::new();
        let produced =
            metrics::counter!("records_produced_total", "service" => "bridge", "topic" => "raw");
        let in_flight_gauge = metrics::gauge!("bridge_messages_in_flight", "service" => "bridge");
        let queued_gauge = metrics::gauge!("bridge_messages_queued", "service" => "bridge");
        loop {
            #[allow(clippy::cast_precision_loss)]
            {
                in_flight_gauge.set(in_flight.len() as f64);
                queued_gauge.set(messages.len() as f64);
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(delivered) = in_flight.next(), if !in_flight.is_empty() => {
                    acknowledge(&delivered, mqtt, &produced);
                }
                received = messages.recv(), if in_flight.len() < max_in_flight => match received {
                    Some(message) => {
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

    /// Produces `message` until Kafka confirms it. Each message retries on its own, so many
    /// failing at once (a broker restart, a purged producer queue) retry together, while
    /// [`FuturesOrdered`] still hands them back in arrival order for acknowledgement.
    fn deliver(&self, message: Message) -> Delivered {
        let sink = self.clone();
        async move {
            let (mut delay, max_delay) = RETRY_DELAY;
            loop {
                match sink.produce(&message).await {
                    Ok(()) => return message,
                    Err(error) => {
                        metrics::counter!("produce_retries_total", "service" => "bridge").increment(1);
                        sink.producer.delivery_failed(&error);
                        tracing::debug!(%error, mqtt_topic = %message.publish.topic, "Producing to Kafka failed; retrying.");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(max_delay);
                    }
                }
            }
        }
        .boxed()
    }

    /// Produces `message` once; resolves when Kafka confirmed or failed it.
    async fn produce(&self, message: &Message) -> Result<(), KafkaError> {
        let received_at = message.received_at.to_string();
        let record_headers = OwnedHeaders::new_with_capacity(3)
            .insert(Header {
                key: headers::MQTT_TOPIC,
                value: Some(message.publish.topic.as_bytes()),
            })
            .insert(Header {
                key: headers::RECEIVED_AT,
                value: Some(received_at.as_bytes()),
            })
            .insert(Header {
                key: headers::BRIDGE_ID,
                value: Some(self.bridge_id.as_bytes()),
            });
        let mut record = FutureRecord::<str, [u8]>::to(&self.topic)
            .payload(&message.publish.payload[..])
            .headers(record_headers);
        if let Some(device_id) = &message.device_id {
            record = record.key(device_id.as_str());
        }
        self.producer.send(record).await
    }
}

/// Counts a confirmed message and acknowledges it to the MQTT broker.
fn acknowledge(message: &Message, mqtt: &MqttHandle, produced: &metrics::Counter) {
    produced.increment(1);
    mqtt.ack(message);
}
