//! The embedded MQTT broker: rumqttd, in this process, on 127.0.0.1.
//!
//! rumqttd keeps persistent sessions (clean session off, as the bridge connects) in memory while
//! the process runs; unlike Mosquitto it does not write them to disk, so QoS 1 messages that a
//! device published but the bridge had not read yet are gone when `up` stops. The bridge reads
//! continuously and hands every message to Kafka before acknowledging it, so that window is the
//! bridge's read-ahead. For at-least-once through broker restarts, give `up` a real broker with
//! `--mqtt-url`.
//!
//! rumqttd has no stop: its threads end with the process.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Errors of the embedded MQTT broker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// rumqttd refused its configuration or could not start a thread.
    #[error("the embedded MQTT broker (rumqttd) failed: {0}")]
    Broker(String),
    /// Nothing answered on the port.
    #[error("the embedded MQTT broker did not answer on {0} within 10 s")]
    NoAnswer(SocketAddr),
}

/// Starts rumqttd listening on `address` (MQTT 3.1.1) and waits until it accepts connections.
/// It takes packets of up to `max_packet_bytes` (the bridge's `TELEMETRY_MQTT_MAX_PACKET_BYTES`,
/// as Mosquitto's `max_packet_size` in the shipped configuration): the broker's limit and the
/// size the bridge reads whole are one setting.
pub async fn start(address: SocketAddr, max_packet_bytes: usize) -> Result<(), Error> {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: max_packet_bytes,
        // QoS 1 messages sent to a subscriber before it acknowledges: the same window as the
        // Mosquitto configuration we ship.
        max_inflight_count: 1_000,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: String::from("v4-embedded"),
        listen: address,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            // Each topic's log: 8 segments of 64 MiB, filled only as used. A subscriber that
            // falls further behind than that loses the oldest messages, as with Mosquitto's
            // queue limit; the bridge reads continuously and never falls that far behind.
            max_segment_size: 64 * 1024 * 1024,
            max_segment_count: 8,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([(String::from("1"), server)])),
        ..rumqttd::Config::default()
    };
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name(String::from("rumqttd"))
        .spawn(move || {
            if let Err(error) = broker.start() {
                tracing::error!(%error, "The embedded MQTT broker stopped.");
            }
        })
        .map_err(|error| Error::Broker(error.to_string()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(address).await.is_err() {
        if Instant::now() > deadline {
            return Err(Error::NoAnswer(address));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
