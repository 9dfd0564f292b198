//! The MQTT side of the bridge: one task owns rumqttc's event loop and keeps polling it, so pings,
//! acknowledgements and reconnects happen whatever the rest of the bridge is doing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use telemetry_ops::Readiness;

use crate::{BridgeConfig, Error, Result, MQTT_SUBSCRIBED};

/// Largest MQTT packet accepted; stays under Kafka's default 1 MB record limit with headers.
const MAX_PACKET_BYTES: usize = 1_000_000;

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Room in rumqttc's request channel. Acknowledgements go through it; a packet id is 16 bits, so
/// no more than this many messages can await their acknowledgement at once.
const REQUEST_CAPACITY: usize = 65_536;

/// One message received from the broker.
#[derive(Debug)]
pub(crate) struct Message {
    /// Which connection it arrived on. An acknowledgement is only valid on that connection: after
    /// a reconnect the broker redelivers every unacknowledged message itself.
    pub generation: u64,
    /// The packet, kept whole because acknowledging needs it.
    pub publish: Publish,
    /// When the bridge received it, UTC milliseconds since the Unix epoch.
    pub received_at: i64,
    /// The device id taken from the topic, when the topic has one.
    pub device_id: Option<String>,
}

/// Handle to the MQTT task: acknowledges messages and disconnects.
#[derive(Debug)]
pub(crate) struct MqttHandle {
    client: AsyncClient,
    /// Incremented by the MQTT task on every connection loss; see [`Message::generation`].
    generation: Arc<AtomicU64>,
    task: JoinHandle<()>,
    stop: CancellationToken,
}

impl MqttHandle {
    /// Acknowledges `message` to the broker, unless the connection it came on is gone (the broker
    /// then redelivers it, and this bridge produces it again: at-least-once).
    pub fn ack(&self, message: &Message) {
        if message.generation != self.generation.load(Ordering::Acquire) {
            metrics::counter!("mqtt_acks_skipped_total", "service" => "bridge", "cause" => "reconnected")
                .increment(1);
            return;
        }
        if let Err(error) = self.client.try_ack(&message.publish) {
            tracing::warn!(%error, pkid = message.publish.pkid, "Could not queue an MQTT acknowledgement; the broker will redeliver the message.");
        }
    }

    /// Sends DISCONNECT (keeping the persistent session) and waits briefly for the task to end.
    pub async fn disconnect(self) {
        if let Err(error) = self.client.try_disconnect() {
            tracing::debug!(%error, "MQTT disconnect could not be queued.");
        }
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            self.stop.cancel();
            let _ = task.await;
        }
    }
}

/// Where the MQTT broker is and who we are to it, parsed from `--mqtt-url`.
#[derive(PartialEq, Eq)]
pub(crate) struct MqttAddress {
    host: String,
    port: u16,
    /// User name and password, when the URL carries them.
    credentials: Option<(String, String)>,
}

impl std::fmt::Debug for MqttAddress {
    // The password never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttAddress")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.credentials.as_ref().map(|(user, _)| user))
            .finish()
    }
}

/// Parses `mqtt://[user:password@]host[:port]`.
pub(crate) fn parse_mqtt_url(raw: &str) -> Result<MqttAddress> {
    let invalid = |reason: &str| Error::InvalidMqttUrl {
        url: raw.to_string(),
        reason: reason.to_string(),
    };
    let url = url::Url::parse(raw).map_err(|error| invalid(&error.to_string()))?;
    match url.scheme() {
        "mqtt" | "tcp" => {}
        other => {
            return Err(invalid(&format!(
                "scheme `{other}` is not supported, use mqtt://"
            )))
        }
    }
    let host = url.host_str().ok_or_else(|| invalid("it has no host"))?;
    let credentials = match (url.username(), url.password()) {
        ("", None) => None,
        (user, password) => Some((user.to_string(), password.unwrap_or_default().to_string())),
    };
    Ok(MqttAddress {
        host: host.to_string(),
        port: url.port().unwrap_or(1883),
        credentials,
    })
}

/// MQTT client options for the broker at `url` (`mqtt://[user:password@]host[:port]`), with the
/// URL's credentials: what every MQTT client of ours starts from.
pub fn mqtt_options(url: &str, client_id: &str) -> Result<MqttOptions> {
    let address = parse_mqtt_url(url)?;
    let mut options = MqttOptions::new(client_id, address.host, address.port);
    if let Some((user, password)) = address.credentials {
        options.set_credentials(user, password);
    }
    Ok(options)
}

/// The topic segment matched by the first `+` of `filter`, e.g. `pico-1` for
/// `devices/+/telemetry` and `devices/pico-1/telemetry`.
pub fn device_id_from_topic<'a>(filter: &str, topic: &'a str) -> Option<&'a str> {
    let position = filter.split('/').position(|segment| segment == "+")?;
    topic.split('/').nth(position).filter(|id| !id.is_empty())
}

/// Connects (in the background) and returns the handle plus the stream of received messages.
pub(crate) fn start(
    config: &BridgeConfig,
    readiness: Arc<Readiness>,
) -> Result<(MqttHandle, mpsc::UnboundedReceiver<Message>)> {
    let mut options = mqtt_options(&config.mqtt_url, &config.mqtt_client_id)?;
    options
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES)
        .set_request_channel_capacity(REQUEST_CAPACITY);
    let (client, eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
    // Unbounded so that the MQTT task never waits and keeps answering pings: the broker's
    // in-flight window (messages sent but not acknowledged, `max_inflight_messages` in
    // Mosquitto; 1,000 in our configuration) is what bounds this queue.
    let (sender, receiver) = mpsc::unbounded_channel();
    let generation = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let task = tokio::spawn(
        Poller {
            eventloop,
            client: client.clone(),
            filter: config.mqtt_topic.clone(),
            sender,
            generation: generation.clone(),
            readiness,
            stop: stop.clone(),
        }
        .run(),
    );
    Ok((
        MqttHandle {
            client,
            generation,
            task,
            stop,
        },
        receiver,
    ))
}

struct Poller {
    eventloop: EventLoop,
    client: AsyncClient,
    filter: String,
    sender: mpsc::UnboundedSender<Message>,
    generation: Arc<AtomicU64>,
    readiness: Arc<Readiness>,
    stop: CancellationToken,
}

impl Poller {
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(250);
        loop {
            let event = tokio::select! {
                () = self.stop.cancelled() => break,
                event = self.eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                    // Acknowledgements queued for the lost connection must not reach the new one:
                    // the broker redelivers those messages, and they are acknowledged then.
                    self.eventloop.pending.clear();
                    backoff = Duration::from_millis(250);
                    tracing::info!(
                        session_present = connack.session_present,
                        "Connected to the MQTT broker."
                    );
                    if let Err(error) = self.client.try_subscribe(&self.filter, QoS::AtLeastOnce) {
                        tracing::error!(%error, "Could not queue the MQTT subscription.");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(suback))) => {
                    let refused = suback
                        .return_codes
                        .iter()
                        .any(|code| matches!(code, rumqttc::SubscribeReasonCode::Failure));
                    if refused {
                        tracing::error!(filter = %self.filter, "The MQTT broker refused the subscription.");
                    } else {
                        self.readiness.set(MQTT_SUBSCRIBED, true);
                        tracing::info!(filter = %self.filter, "Subscribed to MQTT telemetry.");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    metrics::counter!("events_received_total", "service" => "bridge").increment(1);
                    let message = Message {
                        generation: self.generation.load(Ordering::Acquire),
                        device_id: device_id_from_topic(&self.filter, &publish.topic)
                            .map(str::to_string),
                        received_at: now_millis(),
                        publish,
                    };
                    // Closed while shutting down: the message stays unacknowledged and the broker
                    // redelivers it to the next bridge.
                    let _ = self.sender.send(message);
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                Ok(_) => {}
                Err(error) => {
                    self.readiness.set(MQTT_SUBSCRIBED, false);
                    self.generation.fetch_add(1, Ordering::AcqRel);
                    metrics::counter!("mqtt_connection_errors_total", "service" => "bridge")
                        .increment(1);
                    tracing::warn!(%error, retry_in = ?backoff, "MQTT connection lost; reconnecting.");
                    tokio::select! {
                        () = self.stop.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        self.readiness.set(MQTT_SUBSCRIBED, false);
    }
}

/// Milliseconds since the Unix epoch, UTC.
pub(crate) fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_is_the_segment_under_the_plus() {
        assert_eq!(
            device_id_from_topic("devices/+/telemetry", "devices/pico-1/telemetry"),
            Some("pico-1")
        );
        assert_eq!(
            device_id_from_topic("t1/devices/+/telemetry", "t1/devices/x/telemetry"),
            Some("x")
        );
        assert_eq!(device_id_from_topic("devices/#", "devices/a/b"), None);
        assert_eq!(
            device_id_from_topic("devices/+/telemetry", "devices//telemetry"),
            None
        );
    }

    #[test]
    fn mqtt_urls_are_checked() {
        let address = |host: &str, port, credentials: Option<(&str, &str)>| MqttAddress {
            host: host.to_string(),
            port,
            credentials: credentials
                .map(|(user, password)| (user.to_string(), password.to_string())),
        };
        assert_eq!(
            parse_mqtt_url("mqtt://127.0.0.1:1884").ok(),
            Some(address("127.0.0.1", 1884, None))
        );
        let with_credentials = parse_mqtt_url("mqtt://u:secret@broker").ok();
        assert_eq!(
            with_credentials,
            Some(address("broker", 1883, Some(("u", "secret"))))
        );
        assert!(!format!("{with_credentials:?}").contains("secret"));
        assert!(parse_mqtt_url("http://x").is_err());
        assert!(parse_mqtt_url("not a url").is_err());
    }
}
