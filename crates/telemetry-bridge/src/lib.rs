//! The bridge: subscribes to device telemetry over MQTT, fans every message out to WebSocket
//! clients for the live view, and produces it, byte for byte, to the Kafka raw topic.
//!
//! Delivery: subscriptions are QoS 1 on a persistent session with manual acknowledgements. A
//! message is acknowledged to the MQTT broker only after Kafka confirmed its record (acks=all,
//! idempotent producer), so if the bridge dies the broker redelivers what was not yet in Kafka.
//! The bridge never touches the database.
//!
//! # Layout
//! - [`BridgeConfig`]: every setting, with its flag and environment variable.
//! - [`MqttConnectionConfig`] (`mqtt_settings`): how to reach the MQTT broker, shared with the
//!   simulator and the load harness.
//! - `mqtt_source`: the bridge's MQTT session in a task of its own: reads messages of any size,
//!   stops reading at the queue's byte bound, writes acknowledgements and pings.
//! - `kafka_sink`: the raw-record producer, acknowledgement order, and what is cut when Kafka
//!   cannot take a message whole.
//! - `websocket`: the HTTP server: `GET /ws` live frames, plus `/healthz`, `/readyz` and
//!   `/metrics` from `telemetry-ops`.
//! - [`Bridge`]: binds the listener ([`Bridge::bind`]) and runs until shutdown ([`Bridge::run`]).

pub mod instruments;
mod kafka_sink;
mod mqtt_source;
mod websocket;

use std::net::SocketAddr;
use std::time::Duration;

use telemetry_kafka::KafkaConfig;
use tokio_util::sync::CancellationToken;

pub use mqtt_source::{device_id_from_topic, DEFAULT_MQTT_MAX_PACKET_BYTES};
pub use telemetry_mqtt::MqttConnectionConfig;

/// Errors that stop the bridge.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The MQTT connection settings cannot be used.
    #[error(transparent)]
    Mqtt(#[from] telemetry_mqtt::Error),
    /// A setting is missing, unusable, or contradicts another.
    #[error("{setting} {problem}")]
    InvalidSetting {
        /// The setting's variable and flag.
        setting: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// Kafka set-up failed.
    #[error(transparent)]
    Kafka(#[from] telemetry_kafka::Error),
    /// The HTTP listener could not be bound or served.
    #[error(transparent)]
    Listen(#[from] telemetry_ops::ListenError),
    /// The tokens file is unusable, or the live view would serve everyone on a public address.
    #[error(transparent)]
    Auth(#[from] telemetry_auth::AuthError),
    /// The payload contract (for the live view's normalized metrics) could not be loaded.
    #[error(transparent)]
    Contract(#[from] telemetry_core::ContractError),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Bridge settings.
#[derive(Debug, Clone, clap::Args)]
pub struct BridgeConfig {
    /// The MQTT broker and how to authenticate to it.
    #[command(flatten)]
    pub mqtt: MqttConnectionConfig,

    /// MQTT topic filter to subscribe to (QoS 1). The segment matched by the first `+` is the
    /// device id, used as the Kafka record key.
    #[arg(
        long,
        env = "TELEMETRY_MQTT_TOPIC",
        default_value = "devices/+/telemetry"
    )]
    pub mqtt_topic: String,

    /// MQTT client id. Fixed, so the broker keeps this bridge's persistent session (and queues
    /// messages for it) across restarts. Two bridges must not share it.
    #[arg(
        long,
        env = "TELEMETRY_MQTT_CLIENT_ID",
        default_value = "telemetry-bridge"
    )]
    pub mqtt_client_id: String,

    /// Shared subscription group: several bridges with the same group share the subscription
    /// (`$share/<group>/<filter>`), each message going to one of them, instead of each bridge
    /// receiving every message. Each bridge keeps its own client id and persistent session.
    /// Default: none (this bridge receives every message of the filter).
    #[arg(long, env = "TELEMETRY_MQTT_SHARE_GROUP", value_parser = share_group)]
    pub mqtt_share_group: Option<String>,

    /// Value of the `bridge.id` header on every raw record.
    #[arg(long, env = "TELEMETRY_BRIDGE_ID", default_value = "telemetry-bridge")]
    pub bridge_id: String,

    /// Address of the HTTP server (`/ws`, `/healthz`, `/readyz`, `/metrics`).
    #[arg(
        long = "bridge-listen",
        env = "TELEMETRY_BRIDGE_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: String,

    /// Web pages allowed to open the live view: origins (`scheme://host[:port]`), comma-separated,
    /// or `*` for any. A browser sends its page's origin with every WebSocket; one not listed is
    /// answered 403, so a page on another site cannot read the frames through a browser on the
    /// same machine or network. Clients that send no `Origin` (not browsers) are not affected.
    /// Default: the dashboard's own origin at the API's default address.
    #[arg(
        long,
        env = "TELEMETRY_WS_ALLOWED_ORIGINS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8082,http://localhost:8082"
    )]
    pub ws_allowed_origins: Vec<String>,

    /// Frames buffered per WebSocket client; a client further behind skips frames (counted)
    /// instead of slowing the pipeline. Each frame carries at most `--ws-max-payload-bytes` of
    /// its payload, so this bounds a client's queue in bytes too.
    #[arg(long, env = "TELEMETRY_WS_BUFFER", default_value_t = 1024)]
    pub ws_buffer: usize,

    /// Most messages produced to Kafka but not yet acknowledged to MQTT (see also
    /// `--max-in-flight-bytes`). When reached, the bridge stops producing; what the broker sends
    /// meanwhile waits in the queue (`--max-queued-bytes`).
    #[arg(long, env = "TELEMETRY_BRIDGE_MAX_IN_FLIGHT", default_value_t = 10_000)]
    pub max_in_flight: usize,

    /// Sizes the bridge reads, forwards and holds: each a bound in bytes.
    #[command(flatten)]
    pub limits: BridgeLimits,

    /// The payload contract the live view normalizes metrics with (the audit service's, so the
    /// live chart and the history show the same names and units): as `telemetry audit
    /// --contract`. Only used while WebSocket clients are connected.
    #[arg(long, env = "TELEMETRY_CONTRACT")]
    pub contract: Option<std::path::PathBuf>,

    /// How long shutdown waits for Kafka to confirm in-flight messages, in seconds.
    #[arg(long, env = "TELEMETRY_SHUTDOWN_GRACE_SECONDS", default_value_t = 10)]
    pub shutdown_grace_seconds: u64,

    /// Bearer tokens and their device allow-lists, for the live view.
    #[command(flatten)]
    pub auth: telemetry_auth::AuthConfig,

    /// Header-read and idle timeouts and the connection cap of the HTTP server.
    #[command(flatten)]
    pub http: telemetry_ops::HttpLimits,

    /// TLS of the HTTP server: a certificate and its key.
    #[command(flatten)]
    pub tls: telemetry_ops::HttpTls,

    /// Kafka settings.
    #[command(flatten)]
    pub kafka: KafkaConfig,
}

/// The bridge's bounds in bytes. Reaching the queue's or the in-flight bound holds the broker
/// back (backpressure; a QoS 1 message is never dropped) and shows in `/metrics`
/// (`bridge_backpressure_total{bound}`, `bridge_queued_bytes`, `bridge_in_flight_bytes`).
#[derive(Debug, Clone, clap::Args)]
pub struct BridgeLimits {
    /// The largest MQTT packet the bridge reads whole: the broker's own limit (Mosquitto's
    /// `max_packet_size`; `deploy/mosquitto/mosquitto.conf` and `telemetry up`'s embedded broker
    /// use this default). A larger packet, from a broker without a limit, is read through: its
    /// first 64 KiB go on, to the DLQ as `payload_too_large`, and the connection stays up.
    #[arg(long, env = "TELEMETRY_MQTT_MAX_PACKET_BYTES", default_value_t = DEFAULT_MQTT_MAX_PACKET_BYTES)]
    pub mqtt_max_packet_bytes: usize,

    /// The largest payload forwarded to the raw topic whole; the raw topic's own record limit
    /// (`max.message.bytes`) applies too. A larger one is forwarded cut to its first 64 KiB, with
    /// its size in the `payload.original_bytes` header, and goes to the DLQ as
    /// `payload_too_large`.
    #[arg(long, env = "TELEMETRY_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MQTT_MAX_PACKET_BYTES)]
    pub max_message_bytes: usize,

    /// Bytes of messages read from MQTT and not yet produced to Kafka. At the bound the bridge
    /// stops reading from the broker, which keeps the rest queued.
    #[arg(long, env = "TELEMETRY_BRIDGE_MAX_QUEUED_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_queued_bytes: usize,

    /// Payload bytes produced to Kafka and not yet acknowledged to MQTT. At the bound the bridge
    /// stops producing until Kafka confirms what it has (librdkafka holds a copy of each).
    #[arg(long, env = "TELEMETRY_BRIDGE_MAX_IN_FLIGHT_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_in_flight_bytes: usize,

    /// Most payload bytes in one live-view frame; a longer payload is cut and the frame says so
    /// (`payload_cut`: the full size).
    #[arg(long, env = "TELEMETRY_WS_MAX_PAYLOAD_BYTES", default_value_t = 4096)]
    pub ws_max_payload_bytes: usize,

    /// Longest a live-view client may take to accept a write, in milliseconds; a slower one is
    /// dropped (`websocket_clients_dropped_total{cause="write_timeout"}`).
    #[arg(long, env = "TELEMETRY_WS_WRITE_TIMEOUT_MS", default_value_t = 10_000)]
    pub ws_write_timeout_ms: u64,
}

impl Default for BridgeLimits {
    /// The flags' defaults.
    fn default() -> Self {
        BridgeLimits {
            mqtt_max_packet_bytes: DEFAULT_MQTT_MAX_PACKET_BYTES,
            max_message_bytes: DEFAULT_MQTT_MAX_PACKET_BYTES,
            max_queued_bytes: 32 * 1024 * 1024,
            max_in_flight_bytes: 32 * 1024 * 1024,
            ws_max_payload_bytes: 4096,
            ws_write_timeout_ms: 10_000,
        }
    }
}

/// The readiness check the bridge reports on `/readyz`: passing while the broker holds our
/// subscription on the current connection.
const MQTT_SUBSCRIBED: &str = "mqtt_subscribed";

/// A bridge whose HTTP listener is bound. [`Bridge::local_addr`] tells the port when the
/// configuration asked for port 0.
#[derive(Debug)]
pub struct Bridge {
    config: BridgeConfig,
    server: telemetry_ops::HttpServer,
    validator: std::sync::Arc<telemetry_core::Validator>,
    auth: telemetry_auth::Auth,
    progress: std::sync::Arc<telemetry_metrics::Progress>,
}

/// A shared subscription's group name as MQTT takes it: not empty, without `/`, `+` or `#`
/// (MQTT 5.0, 4.8.2).
fn share_group(value: &str) -> std::result::Result<String, String> {
    if value.is_empty() || value.contains(['/', '+', '#']) {
        Err("a shared subscription group is a non-empty name without `/`, `+` or `#`".to_string())
    } else {
        Ok(value.to_string())
    }
}

impl BridgeConfig {
    /// What the bridge subscribes to: the topic filter, or with a share group
    /// `$share/<group>/<filter>`.
    pub fn subscription(&self) -> String {
        match &self.mqtt_share_group {
            Some(group) => format!("$share/{group}/{}", self.mqtt_topic),
            None => self.mqtt_topic.clone(),
        }
    }
}

impl Bridge {
    /// Checks the configuration and binds the HTTP listener.
    pub async fn bind(config: BridgeConfig) -> Result<Self> {
        // Reads the TLS files too, so a bad one fails here rather than at each connection.
        config.mqtt.options(&config.mqtt_client_id, |_| {})?;
        mqtt_source::check(&config)?;
        let contract = telemetry_core::Contract::load_or_builtin(config.contract.as_deref())?;
        let validator = std::sync::Arc::new(telemetry_core::Validator::new(contract)?);
        let server = telemetry_ops::HttpServer::bind(&config.listen)
            .await?
            .with_tls(&config.tls)?;
        let auth = telemetry_auth::Auth::from_config(
            &config.auth,
            "bridge",
            "TELEMETRY_BRIDGE_LISTEN / --bridge-listen",
            server.local_addr()?,
        )?;
        Ok(Bridge {
            config,
            server,
            validator,
            auth,
            progress: std::sync::Arc::default(),
        })
    }

    /// What this bridge has done so far: messages received (`received`) and raw records Kafka
    /// acknowledged (`produced`).
    pub fn progress(&self) -> std::sync::Arc<telemetry_metrics::Progress> {
        self.progress.clone()
    }

    /// The address the HTTP server listens on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.server.local_addr()?)
    }

    /// Runs until `shutdown` is cancelled, then stops reading MQTT, waits (up to the grace
    /// period) for Kafka to confirm what is in flight, acknowledges it and disconnects.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let Bridge {
            config,
            server,
            validator,
            auth,
            progress,
        } = self;
        telemetry_kafka::ensure_topics(&config.kafka, &[&config.kafka.raw_topic]).await?;
        let readiness = telemetry_ops::Readiness::new(&[MQTT_SUBSCRIBED]);
        let limits = &config.limits;
        let frames = websocket::Frames::new(
            config.ws_buffer.max(1),
            validator,
            limits.ws_max_payload_bytes,
            Duration::from_millis(limits.ws_write_timeout_ms.max(1)),
        );

        let server = server.spawn(
            websocket::router(
                frames.clone(),
                readiness.clone(),
                auth,
                websocket::AllowedOrigins::new(&config.ws_allowed_origins),
            ),
            "bridge",
            &config.http,
            shutdown.clone(),
        );
        let sink = kafka_sink::KafkaSink::new(&config, progress.clone())?;
        sink.prepare().await;
        let queue = mqtt_source::ByteBound::new(
            limits.max_queued_bytes,
            instruments::gauge(&instruments::QUEUED_BYTES),
        );
        let (mqtt, messages) = mqtt_source::start(&config, readiness, queue, progress.clone())?;
        tracing::info!(
            mqtt_url = %config.mqtt.redacted_url(),
            mqtt_topic = %config.mqtt_topic,
            mqtt_share_group = config.mqtt_share_group.as_deref().unwrap_or("(none)"),
            raw_topic = %config.kafka.raw_topic,
            listen = %config.listen,
            "Bridge started."
        );

        let grace = Duration::from_secs(config.shutdown_grace_seconds);
        sink.run(
            messages,
            &mqtt,
            &frames,
            kafka_sink::InFlightBound {
                records: config.max_in_flight.max(1),
                bytes: limits.max_in_flight_bytes,
            },
            grace,
            shutdown.clone(),
        )
        .await;
        mqtt.disconnect().await;
        shutdown.cancel();
        telemetry_ops::join(server).await?;
        tracing::info!("Bridge stopped.");
        Ok(())
    }
}

/// Binds and runs a bridge until `shutdown` is cancelled.
pub async fn run(config: BridgeConfig, shutdown: CancellationToken) -> Result<()> {
    Bridge::bind(config).await?.run(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_group_is_a_name_without_topic_separators_or_wildcards() {
        assert_eq!(share_group("bridges-1").as_deref(), Ok("bridges-1"));
        for bad in ["", "a/b", "fleet+", "#"] {
            assert!(share_group(bad).is_err(), "{bad:?} was taken");
        }
    }
}
