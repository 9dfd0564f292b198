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
//! - `mqtt_source`: the MQTT connection, run in its own task so it is always polled.
//! - `kafka_sink`: the raw-record producer and acknowledgement order.
//! - `websocket`: the HTTP server: `GET /ws` live frames, plus `/healthz`, `/readyz` and
//!   `/metrics` from `telemetry-ops`.
//! - [`Bridge`]: binds the listener ([`Bridge::bind`]) and runs until shutdown ([`Bridge::run`]).

mod kafka_sink;
mod mqtt_source;
mod websocket;

use std::net::SocketAddr;
use std::time::Duration;

use telemetry_kafka::KafkaConfig;
use tokio_util::sync::CancellationToken;

pub use mqtt_source::{device_id_from_topic, MqttConnectionConfig};

/// Errors that stop the bridge.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--mqtt-url` is not a usable MQTT URL.
    #[error("TELEMETRY_MQTT_URL / --mqtt-url `{url}` is not valid: {reason}")]
    InvalidMqttUrl {
        /// The URL as given, without its password.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
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
    Auth(#[from] telemetry_ops::auth::AuthError),
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

    /// Frames buffered per WebSocket client; a client further behind skips frames (counted)
    /// instead of slowing the pipeline.
    #[arg(long, env = "TELEMETRY_WS_BUFFER", default_value_t = 1024)]
    pub ws_buffer: usize,

    /// Most messages produced to Kafka but not yet acknowledged to MQTT. When reached, the
    /// bridge stops producing and queues what the broker still sends; the broker's own in-flight
    /// window (Mosquitto's `max_inflight_messages`) bounds that queue.
    #[arg(long, env = "TELEMETRY_BRIDGE_MAX_IN_FLIGHT", default_value_t = 10_000)]
    pub max_in_flight: usize,

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
    pub auth: telemetry_ops::auth::AuthConfig,

    /// Kafka settings.
    #[command(flatten)]
    pub kafka: KafkaConfig,
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
    auth: telemetry_ops::auth::Auth,
}

impl Bridge {
    /// Checks the configuration and binds the HTTP listener.
    pub async fn bind(config: BridgeConfig) -> Result<Self> {
        // Reads the TLS files too, so a bad one fails here rather than at each connection.
        config.mqtt.options(&config.mqtt_client_id, |_| {})?;
        let contract = telemetry_core::Contract::load_or_builtin(config.contract.as_deref())?;
        let validator = std::sync::Arc::new(telemetry_core::Validator::new(contract)?);
        let server = telemetry_ops::HttpServer::bind(&config.listen).await?;
        let auth = telemetry_ops::auth::Auth::from_config(
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
        })
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
        } = self;
        telemetry_kafka::ensure_topics(&config.kafka, &[&config.kafka.raw_topic]).await?;
        let readiness = telemetry_ops::Readiness::new(&[MQTT_SUBSCRIBED]);
        let frames = websocket::Frames::new(config.ws_buffer.max(1), validator);

        let server = server.spawn(
            websocket::router(frames.clone(), readiness.clone(), auth),
            shutdown.clone(),
        );
        let (mqtt, messages) = mqtt_source::start(&config, readiness)?;
        let sink = kafka_sink::KafkaSink::new(&config)?;
        tracing::info!(
            mqtt_url = %config.mqtt.redacted_url(),
            mqtt_topic = %config.mqtt_topic,
            raw_topic = %config.kafka.raw_topic,
            listen = %config.listen,
            "Bridge started."
        );

        let grace = Duration::from_secs(config.shutdown_grace_seconds);
        sink.run(
            messages,
            &mqtt,
            &frames,
            config.max_in_flight,
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
