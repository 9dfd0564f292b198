//! The embedded MQTT broker: rumqttd, in this process, on 127.0.0.1.
//!
//! rumqttd keeps sessions in memory only, and acknowledges a QoS 1 message nobody has subscribed
//! to yet and then drops it, as MQTT brokers do. So that no device's message is acknowledged and
//! lost, devices reach it only while the bridge is subscribed: rumqttd listens on a port of its
//! own, which the bridge uses, and devices connect to [`EmbeddedMqtt::device_address`], whose
//! connections `up` forwards to rumqttd only between [`EmbeddedMqtt::open_to_devices`] (after the
//! bridge has subscribed) and [`EmbeddedMqtt::close_to_devices`] (before the bridge stops).
//! A device that connects earlier waits in the listener's queue until the bridge is there; one
//! that publishes while `up` stops has its connection closed, and sends its unacknowledged
//! messages again when it reconnects to the next `up`, as MQTT's QoS 1 has it.
//!
//! (rumqttd's authentication hook cannot be the gate: once set, it refuses every client without a
//! username, which devices of `up` need not have.)
//!
//! rumqttd has no stop: its threads end with the process.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use telemetry_metrics::Metric;

/// Device connections forwarded now (at most 10,000).
pub const DEVICE_CONNECTIONS: Metric =
    Metric::gauge("embedded_mqtt_device_connections", &["service"]);

/// Everything the embedded MQTT broker records.
pub const METRICS: &[Metric] = &[DEVICE_CONNECTIONS];

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

/// Most device connections forwarded at once (rumqttd takes 10,010: these and the bridge's).
/// Each holds two 8 KiB copy buffers, so the forwarding holds at most 160 MiB; the count is the
/// gauge `embedded_mqtt_device_connections`.
const MAX_DEVICE_CONNECTIONS: usize = 10_000;

/// The running broker: its own address (the bridge's) and the devices' listener.
#[derive(Debug)]
pub struct EmbeddedMqtt {
    broker: SocketAddr,
    devices: SocketAddr,
    /// The devices' listener until it is opened.
    listener: Option<tokio::net::TcpListener>,
    /// Stops accepting and closes every forwarded device connection.
    closed: tokio_util::sync::CancellationToken,
}

impl EmbeddedMqtt {
    /// Where the bridge connects: rumqttd itself.
    pub fn broker_address(&self) -> SocketAddr {
        self.broker
    }

    /// Where devices connect (the address `start` was given).
    pub fn device_address(&self) -> SocketAddr {
        self.devices
    }

    /// Lets devices in: their connections (also those waiting since the start) are forwarded to
    /// rumqttd from now on.
    pub fn open_to_devices(&mut self) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        let (broker, closed) = (self.broker, self.closed.clone());
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_DEVICE_CONNECTIONS));
        let connections = DEVICE_CONNECTIONS.gauge_of(telemetry_metrics::series!("up"));
        tokio::spawn(async move {
            loop {
                // At the bound, the next device waits in the listener's queue.
                let slot = tokio::select! {
                    () = closed.cancelled() => return,
                    slot = slots.clone().acquire_owned() => slot,
                };
                let Ok(slot) = slot else { return };
                let accepted = tokio::select! {
                    () = closed.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                match accepted {
                    Ok((device, _)) => {
                        let (closed, connections) = (closed.clone(), connections.clone());
                        connections.increment(1.0);
                        tokio::spawn(async move {
                            forward(device, broker, closed).await;
                            connections.decrement(1.0);
                            drop(slot);
                        });
                    }
                    Err(error) => {
                        tracing::warn!(%error, "The embedded MQTT broker could not accept a connection.");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }

    /// Shuts devices out: the listener closes and every device connection is closed. What rumqttd
    /// acknowledged before is in the bridge's session, for the bridge to read before it stops.
    pub fn close_to_devices(&mut self) {
        self.listener = None;
        self.closed.cancel();
    }
}

/// Forwards one device connection to rumqttd until either side closes it, or `closed`.
async fn forward(
    mut device: tokio::net::TcpStream,
    broker: SocketAddr,
    closed: tokio_util::sync::CancellationToken,
) {
    let mut upstream = match tokio::net::TcpStream::connect(broker).await {
        Ok(upstream) => upstream,
        Err(error) => {
            tracing::warn!(%error, "The embedded MQTT broker did not take a device's connection.");
            return;
        }
    };
    let _ = device.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    tokio::select! {
        () = closed.cancelled() => {}
        _ = tokio::io::copy_bidirectional(&mut device, &mut upstream) => {}
    }
}

/// Starts rumqttd (MQTT 3.1.1) on a port of its own and binds the devices' listener on
/// `address`, closed to devices until [`EmbeddedMqtt::open_to_devices`]; waits until rumqttd
/// accepts connections. It takes packets of up to `max_packet_bytes` (the bridge's
/// `TELEMETRY_MQTT_MAX_PACKET_BYTES`, as Mosquitto's `max_packet_size` in the shipped
/// configuration): the broker's limit and the size the bridge reads whole are one setting.
pub async fn start(address: SocketAddr, max_packet_bytes: usize) -> Result<EmbeddedMqtt, Error> {
    let devices = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|error| Error::Broker(format!("cannot listen on {address}: {error}")))?;
    let device_address = devices
        .local_addr()
        .map_err(|error| Error::Broker(format!("cannot listen on {address}: {error}")))?;
    // A free port for rumqttd, which binds by address.
    let broker_address = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .and_then(|probe| probe.local_addr())
        .map_err(|error| Error::Broker(format!("no free port for the broker: {error}")))?;
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
        listen: broker_address,
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
    while tokio::net::TcpStream::connect(broker_address)
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            return Err(Error::NoAnswer(broker_address));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(EmbeddedMqtt {
        broker: broker_address,
        devices: device_address,
        listener: Some(devices),
        closed: tokio_util::sync::CancellationToken::new(),
    })
}
