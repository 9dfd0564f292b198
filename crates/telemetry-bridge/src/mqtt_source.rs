//! The MQTT side of the bridge: one task owns rumqttc's event loop and keeps polling it, so pings,
//! acknowledgements and reconnects happen whatever the rest of the bridge is doing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::path::PathBuf;

use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS, TlsConfiguration,
    Transport,
};
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

/// How to reach the MQTT broker and who we are to it: shared by the bridge and the simulator.
#[derive(Clone, clap::Args)]
pub struct MqttConnectionConfig {
    /// MQTT broker URL: `mqtt://host[:port]` (port 1883 by default) or `mqtts://host[:port]` for
    /// TLS (port 8883 by default).
    #[arg(
        long,
        env = "TELEMETRY_MQTT_URL",
        hide_env_values = true,
        default_value = "mqtt://127.0.0.1:1883"
    )]
    pub mqtt_url: String,

    /// MQTT user name (or give it in the URL, `mqtt://user:password@host`).
    #[arg(long, env = "TELEMETRY_MQTT_USERNAME")]
    pub mqtt_username: Option<String>,

    /// MQTT password. Never logged; prefer the environment variable or the configuration file to
    /// the flag, which other users of the machine can read in the process list.
    #[arg(long, env = "TELEMETRY_MQTT_PASSWORD", hide_env_values = true)]
    pub mqtt_password: Option<String>,

    /// PEM file of the CA certificates that sign the broker's certificate, with `mqtts://`.
    /// Without it, the system's CA store.
    #[arg(long, env = "TELEMETRY_MQTT_CA_FILE")]
    pub mqtt_ca_file: Option<PathBuf>,

    /// PEM file of this client's certificate chain, for brokers that require client certificates
    /// (`require_certificate true` in Mosquitto); with `--mqtt-key-file`.
    #[arg(long, env = "TELEMETRY_MQTT_CERTIFICATE_FILE")]
    pub mqtt_certificate_file: Option<PathBuf>,

    /// PEM file of this client's private key (unencrypted), with `--mqtt-certificate-file`.
    #[arg(long, env = "TELEMETRY_MQTT_KEY_FILE")]
    pub mqtt_key_file: Option<PathBuf>,

    /// MQTT client option as key=value (repeatable; env: comma-separated), applied over our
    /// defaults: `keep_alive_secs` (30), `max_packet_bytes` (1000000), `inflight` (outgoing QoS 1
    /// messages awaiting their acknowledgement; 100, the simulator 1000), `pending_throttle_ms`
    /// (0). rumqttc has no option map of its own; these are the settings of its `MqttOptions`
    /// that are safe to change (the bridge's session and acknowledgement settings are not).
    #[arg(
        long = "mqtt-option",
        env = "TELEMETRY_MQTT_OPTIONS",
        value_delimiter = ','
    )]
    pub mqtt_options: Vec<String>,
}

/// The keys `--mqtt-option` takes.
const MQTT_OPTION_KEYS: &[&str] = &[
    "keep_alive_secs",
    "max_packet_bytes",
    "inflight",
    "pending_throttle_ms",
];

impl std::fmt::Debug for MqttConnectionConfig {
    // The password never reaches a log or an error message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttConnectionConfig")
            .field("mqtt_url", &self.redacted_url())
            .field("mqtt_username", &self.mqtt_username)
            .field(
                "mqtt_password",
                &self.mqtt_password.as_ref().map(|_| "<redacted>"),
            )
            .field("mqtt_ca_file", &self.mqtt_ca_file)
            .field("mqtt_certificate_file", &self.mqtt_certificate_file)
            .field("mqtt_key_file", &self.mqtt_key_file)
            .field("mqtt_options", &self.mqtt_options)
            .finish()
    }
}

/// Where the MQTT broker is and who we are to it, from the settings.
#[derive(PartialEq, Eq)]
pub(crate) struct MqttAddress {
    host: String,
    port: u16,
    tls: bool,
    /// User name and password, when given.
    credentials: Option<(String, String)>,
}

impl std::fmt::Debug for MqttAddress {
    // The password never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttAddress")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("user", &self.credentials.as_ref().map(|(user, _)| user))
            .finish()
    }
}

impl MqttConnectionConfig {
    /// Settings for the broker at `url`, without credentials or TLS files.
    pub fn new(url: impl Into<String>) -> Self {
        MqttConnectionConfig {
            mqtt_url: url.into(),
            mqtt_username: None,
            mqtt_password: None,
            mqtt_ca_file: None,
            mqtt_certificate_file: None,
            mqtt_key_file: None,
            mqtt_options: Vec::new(),
        }
    }

    /// The URL without its password, for logs.
    pub fn redacted_url(&self) -> String {
        match url::Url::parse(&self.mqtt_url) {
            Ok(mut url) if url.password().is_some() => {
                // Only fails for URLs that cannot have credentials, which this one has.
                let _ = url.set_password(Some("redacted"));
                url.to_string()
            }
            Ok(_) => self.mqtt_url.clone(),
            Err(_) => String::from("(not a URL)"),
        }
    }

    /// Checks the settings against each other; see [`MqttConnectionConfig::options`].
    pub(crate) fn address(&self) -> Result<MqttAddress> {
        let invalid = |reason: &str| Error::InvalidMqttUrl {
            url: self.redacted_url(),
            reason: reason.to_string(),
        };
        let url = url::Url::parse(&self.mqtt_url).map_err(|error| invalid(&error.to_string()))?;
        let tls = match url.scheme() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            other => {
                return Err(invalid(&format!(
                    "scheme `{other}` is not supported, use mqtt:// or mqtts://"
                )))
            }
        };
        let host = url.host_str().ok_or_else(|| invalid("it has no host"))?;
        let from_url = match (url.username(), url.password()) {
            ("", None) => None,
            (user, password) => Some((
                percent_decoded(user),
                percent_decoded(password.unwrap_or_default()),
            )),
        };
        let from_settings = match (&self.mqtt_username, &self.mqtt_password) {
            (None, None) => None,
            (Some(user), password) => Some((user.clone(), password.clone().unwrap_or_default())),
            (None, Some(_)) => {
                return Err(Error::InvalidSetting {
                    setting: "TELEMETRY_MQTT_USERNAME / --mqtt-username",
                    problem: "is required with a password".into(),
                })
            }
        };
        let credentials = match (from_url, from_settings) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "it carries credentials and --mqtt-username is set too: give them once",
                ))
            }
            (url, settings) => url.or(settings),
        };
        let files = [
            (
                "TELEMETRY_MQTT_CA_FILE / --mqtt-ca-file",
                &self.mqtt_ca_file,
            ),
            (
                "TELEMETRY_MQTT_CERTIFICATE_FILE / --mqtt-certificate-file",
                &self.mqtt_certificate_file,
            ),
            (
                "TELEMETRY_MQTT_KEY_FILE / --mqtt-key-file",
                &self.mqtt_key_file,
            ),
        ];
        for (setting, file) in files {
            if file.is_some() && !tls {
                return Err(Error::InvalidSetting {
                    setting,
                    problem: "is set, but the MQTT URL is not mqtts://".into(),
                });
            }
        }
        if self.mqtt_certificate_file.is_some() != self.mqtt_key_file.is_some() {
            return Err(Error::InvalidSetting {
                setting: "TELEMETRY_MQTT_KEY_FILE / --mqtt-key-file",
                problem: "a client certificate and its key are given together, or neither".into(),
            });
        }
        Ok(MqttAddress {
            host: host.to_string(),
            port: url.port().unwrap_or(if tls { 8883 } else { 1883 }),
            tls,
            credentials,
        })
    }

    /// MQTT client options for the configured broker, with its credentials and TLS: what every
    /// MQTT client of ours starts from. `defaults` sets the caller's own settings, which the
    /// `--mqtt-option`s then override. Certificate files are read here, so a bad one fails
    /// start-up naming its setting.
    pub fn options(
        &self,
        client_id: &str,
        defaults: impl FnOnce(&mut MqttOptions),
    ) -> Result<MqttOptions> {
        let address = self.address()?;
        let mut options = MqttOptions::new(client_id, address.host, address.port);
        defaults(&mut options);
        self.apply_pass_through(&mut options)?;
        if let Some((user, password)) = address.credentials {
            options.set_credentials(user, password);
        }
        if address.tls {
            let tls = self.tls_config()?;
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls),
            )));
        }
        Ok(options)
    }

    /// A client and its event loop for `options`, with Nagle's algorithm off: each packet (a
    /// publish, an acknowledgement) goes out at once instead of waiting for the TCP
    /// acknowledgement of the previous one, up to 40 ms with Linux's delayed acknowledgements.
    pub fn client(options: MqttOptions, capacity: usize) -> (AsyncClient, EventLoop) {
        let (client, mut eventloop) = AsyncClient::new(options, capacity);
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        (client, eventloop)
    }

    /// Applies the `--mqtt-option`s, each checked against its range.
    fn apply_pass_through(&self, options: &mut MqttOptions) -> Result<()> {
        for option in &self.mqtt_options {
            let invalid = |problem: String| Error::InvalidSetting {
                setting: "TELEMETRY_MQTT_OPTIONS / --mqtt-option",
                problem: format!("`{option}`: {problem}"),
            };
            let (key, value) = option
                .split_once('=')
                .map(|(key, value)| (key.trim(), value.trim()))
                .ok_or_else(|| invalid("is not of the form key=value".into()))?;
            let number = |low: u64, high: u64| {
                value
                    .parse::<u64>()
                    .ok()
                    .filter(|number| (low..=high).contains(number))
                    .ok_or_else(|| invalid(format!("must be a whole number from {low} to {high}")))
            };
            match key {
                "keep_alive_secs" => {
                    options.set_keep_alive(Duration::from_secs(number(1, 65_535)?));
                }
                "max_packet_bytes" => {
                    let bytes = usize::try_from(number(1, 268_435_455)?).unwrap_or(usize::MAX);
                    options.set_max_packet_size(bytes, bytes);
                }
                "inflight" => {
                    let inflight = u16::try_from(number(1, 65_535)?).unwrap_or(u16::MAX);
                    options.set_inflight(inflight);
                }
                "pending_throttle_ms" => {
                    options.set_pending_throttle(Duration::from_millis(number(0, 60_000)?));
                }
                other => {
                    return Err(invalid(format!(
                        "`{other}` is not an option; the options are {}",
                        MQTT_OPTION_KEYS.join(", ")
                    )))
                }
            }
        }
        Ok(())
    }

    /// The TLS client configuration: the CA file's certificates (or the system's), and the client
    /// certificate when one is set.
    fn tls_config(&self) -> Result<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::PrivateKeyDer;

        let mut roots = rustls::RootCertStore::empty();
        match &self.mqtt_ca_file {
            Some(path) => {
                let setting = "TELEMETRY_MQTT_CA_FILE / --mqtt-ca-file";
                let certificates = read_certificates(setting, path)?;
                for certificate in certificates {
                    roots
                        .add(certificate)
                        .map_err(|error| Error::InvalidSetting {
                            setting,
                            problem: format!("`{}`: {error}", path.display()),
                        })?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                for error in &native.errors {
                    tracing::debug!(%error, "A system CA certificate could not be loaded.");
                }
                let (_added, _ignored) = roots.add_parsable_certificates(native.certs);
                if roots.is_empty() {
                    return Err(Error::InvalidSetting {
                        setting: "TELEMETRY_MQTT_CA_FILE / --mqtt-ca-file",
                        problem: "is not set and the system has no CA certificates".into(),
                    });
                }
            }
        }
        // The provider is named rather than taken from the process default: more than one crate
        // in the binary enables rustls providers, so there is no single default.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| Error::InvalidSetting {
                setting: "TELEMETRY_MQTT_URL / --mqtt-url",
                problem: format!("TLS cannot be set up: {error}"),
            })?
            .with_root_certificates(roots);
        match (&self.mqtt_certificate_file, &self.mqtt_key_file) {
            (Some(certificate_path), Some(key_path)) => {
                let chain = read_certificates(
                    "TELEMETRY_MQTT_CERTIFICATE_FILE / --mqtt-certificate-file",
                    certificate_path,
                )?;
                let key_setting = "TELEMETRY_MQTT_KEY_FILE / --mqtt-key-file";
                let key = PrivateKeyDer::from_pem_file(key_path).map_err(|error| {
                    Error::InvalidSetting {
                        setting: key_setting,
                        problem: format!(
                            "`{}` holds no usable private key: {error}",
                            key_path.display()
                        ),
                    }
                })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|error| Error::InvalidSetting {
                        setting: key_setting,
                        problem: format!("does not go with the certificate: {error}"),
                    })
            }
            _ => Ok(builder.with_no_client_auth()),
        }
    }
}

/// The certificates of the PEM file at `path`; at least one.
fn read_certificates(
    setting: &'static str,
    path: &std::path::Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    let problem = |reason: String| Error::InvalidSetting {
        setting,
        problem: format!("`{}` {reason}", path.display()),
    };
    let certificates = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|error| problem(format!("cannot be read: {error}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| problem(format!("is not valid PEM: {error}")))?;
    if certificates.is_empty() {
        return Err(problem("holds no certificate".into()));
    }
    Ok(certificates)
}

/// A URL's user or password with its percent-escapes decoded (`p%40ss` is `p@ss`).
fn percent_decoded(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
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
    let mut options = config.mqtt.options(&config.mqtt_client_id, |options| {
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
    })?;
    // What delivery rests on: not for the pass-through options to change.
    options
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_request_channel_capacity(REQUEST_CAPACITY);
    let (client, eventloop) = MqttConnectionConfig::client(options, REQUEST_CAPACITY);
    // Unbounded so that the MQTT task never waits and reads every PINGRESP in time: the broker's
    // in-flight window (messages sent but not acknowledged, `max_inflight_messages` in
    // Mosquitto; 1,000 in our configuration) is what bounds this queue. Mosquitto 2.0.11 does not
    // keep to it while acknowledgements flow: `telemetry bench` saw 350,000 messages queued here
    // (the `bridge_messages_queued` gauge). Bounding the queue in the bridge instead stalled
    // reading, so the PINGRESP behind those messages came too late and the connection was lost
    // every minute (measured).
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
            received: metrics::counter!("events_received_total", "service" => "bridge"),
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
    received: metrics::Counter,
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
                    self.received.increment(1);
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

    fn address_of(url: &str) -> Result<MqttAddress> {
        MqttConnectionConfig::new(url).address()
    }

    #[test]
    fn mqtt_urls_are_checked() {
        let address = |host: &str, port, tls, credentials: Option<(&str, &str)>| MqttAddress {
            host: host.to_string(),
            port,
            tls,
            credentials: credentials
                .map(|(user, password)| (user.to_string(), password.to_string())),
        };
        assert_eq!(
            address_of("mqtt://127.0.0.1:1884").ok(),
            Some(address("127.0.0.1", 1884, false, None))
        );
        assert_eq!(
            address_of("mqtts://broker").ok(),
            Some(address("broker", 8883, true, None))
        );
        let with_credentials = address_of("mqtt://u:p%40ss+word@broker").ok();
        assert_eq!(
            with_credentials,
            Some(address("broker", 1883, false, Some(("u", "p@ss+word"))))
        );
        assert!(!format!("{with_credentials:?}").contains("p@ss"));
        assert!(address_of("http://x").is_err());
        assert!(address_of("not a url").is_err());
    }

    #[test]
    fn credentials_and_tls_files_are_checked_against_each_other() {
        let mut config = MqttConnectionConfig::new("mqtt://u:secret@broker");
        config.mqtt_username = Some("other".into());
        let error = config.address().err().map(|error| error.to_string());
        assert!(error
            .as_deref()
            .is_some_and(|text| text.contains("give them once")));
        assert!(!error.unwrap_or_default().contains("secret"));

        let mut config = MqttConnectionConfig::new("mqtt://broker");
        config.mqtt_password = Some("secret".into());
        assert!(config.address().is_err());
        config.mqtt_username = Some("user".into());
        assert!(config
            .address()
            .is_ok_and(|address| address.credentials == Some(("user".into(), "secret".into()))));
        assert!(!format!("{config:?}").contains("secret"));

        let mut config = MqttConnectionConfig::new("mqtt://broker");
        config.mqtt_ca_file = Some("ca.pem".into());
        let error = config.address().err().map(|error| error.to_string());
        assert!(
            error.is_some_and(|text| text.contains("--mqtt-ca-file") && text.contains("mqtts://"))
        );

        let mut config = MqttConnectionConfig::new("mqtts://broker");
        config.mqtt_certificate_file = Some("client.pem".into());
        assert!(config.address().is_err());
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_naming_the_setting() {
        let path = std::env::temp_dir().join(format!("mqtt-ca-{}.pem", std::process::id()));
        std::fs::write(&path, "not a certificate\n").ok();
        let mut config = MqttConnectionConfig::new("mqtts://broker");
        config.mqtt_ca_file = Some(path.clone());
        let error = config
            .options("client", |_| {})
            .err()
            .map(|error| error.to_string());
        std::fs::remove_file(&path).ok();
        assert!(error.is_some_and(|text| text.contains("--mqtt-ca-file")));
    }

    #[test]
    fn pass_through_options_override_defaults_and_are_checked() {
        let mut config = MqttConnectionConfig::new("mqtt://broker");
        config.mqtt_options = vec!["keep_alive_secs=60".into(), "inflight = 500".into()];
        let options = config
            .options("client", |options| {
                options.set_keep_alive(Duration::from_secs(30));
            })
            .ok();
        assert_eq!(
            options.map(|options| (options.keep_alive(), options.inflight())),
            Some((Duration::from_secs(60), 500))
        );
        for (bad, expected) in [
            ("inflight=0", "from 1 to 65535"),
            ("keep_alive_secs=0.5", "whole number"),
            ("clean_session=true", "the options are keep_alive_secs"),
            ("inflight", "key=value"),
        ] {
            config.mqtt_options = vec![bad.into()];
            let error = config
                .options("client", |_| {})
                .err()
                .map(|error| error.to_string())
                .unwrap_or_default();
            assert!(
                error.contains(expected) && error.contains("--mqtt-option"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn redacted_urls_keep_everything_but_the_password() {
        assert_eq!(
            MqttConnectionConfig::new("mqtt://u:secret@broker:1884").redacted_url(),
            "mqtt://u:redacted@broker:1884"
        );
        assert_eq!(
            MqttConnectionConfig::new("mqtt://broker").redacted_url(),
            "mqtt://broker"
        );
    }
}
