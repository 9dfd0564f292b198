//! Kafka plumbing shared by every service: the settings every Kafka client
//! needs, the topic names, and creating those topics at start-up.
//!
//! Kept apart from `telemetry-core` so the model stays free of I/O, and shared so the two services
//! spell their client settings once.
//!
//! # Layout
//! - [`KafkaConfig`]: brokers, topic names, partitions, raw librdkafka options.
//! - [`KafkaConfig::client_config`]: an rdkafka [`ClientConfig`] with all of that applied;
//!   [`KafkaConfig::producer_config`] adds the settings every producer of ours shares.
//! - [`ensure_topics`]: create missing topics, leave existing ones alone.
//! - [`RenewableProducer`]: a producer that hands librdkafka a whole batch of [`Record`]s and
//!   waits once for all their acknowledgements ([`Deliveries`]), and replaces its librdkafka
//!   instance when it stops delivering.
//! - [`BatchConsumer`]: a consumer-group member reading in batches, committing only what its
//!   caller declared durable.
//! - `Reachability` (private): every producer's and consumer's context reports a broker outage
//!   once (a line down, a line back, `kafka_outages_total`, `kafka_brokers_reachable`) instead
//!   of librdkafka's line per connection attempt.
//! - [`received_at`]: when the bridge received a record; [`received`]: a raw record as the
//!   validator judges it (its topic's device, the bridge's cut headers).
//! - [`delivery`]: which produce failures are final for a record ([`refusal`]), and how large
//!   a record each topic takes ([`TopicLimits`]).

mod consumer;
pub mod delivery;
pub mod instruments;
mod producer;
mod reachability;

pub use consumer::BatchConsumer;
pub use delivery::{refusal, Refusal, TopicLimits};
pub use producer::{Deliveries, Record, RenewableProducer};

use rdkafka::message::{Headers, Message};
use telemetry_core::names::headers;
use telemetry_core::validate::MAX_TIMESTAMP_MS;

/// When the bridge received a record (raw, or DLQ, which keeps the raw record's headers): its
/// `received_at` header, else the Kafka timestamp (records from other producers), else now. UTC
/// milliseconds, within the years 1970-9999.
pub fn received_at(message: &impl Message) -> i64 {
    let in_range = |millis: &i64| (0..=MAX_TIMESTAMP_MS).contains(millis);
    let from_header = message.headers().and_then(|record_headers| {
        record_headers
            .iter()
            .find(|header| header.key == headers::RECEIVED_AT)
            .and_then(|header| header.value)
            .and_then(|value| std::str::from_utf8(value).ok())
            .and_then(|text| text.parse::<i64>().ok())
            .filter(in_range)
    });
    from_header
        .or_else(|| message.timestamp().to_millis().filter(in_range))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| {
                    i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
                })
        })
}

/// The value of the first header named `key`.
pub fn header<'a, M: Message>(message: &'a M, key: &str) -> Option<&'a [u8]> {
    message
        .headers()?
        .iter()
        .find(|header| header.key == key)
        .and_then(|header| header.value)
}

/// A raw record as the validator judges it: its payload, when the bridge received it, the
/// device its MQTT topic names (the record's key) and, when the bridge could not forward the
/// payload whole, what it said about that (`payload.*` headers).
pub fn received<M: Message>(message: &M) -> telemetry_core::Received<'_> {
    let text = |key| header(message, key).and_then(|value| std::str::from_utf8(value).ok());
    let cut = text(headers::PAYLOAD_ORIGINAL_BYTES)
        .and_then(|size| size.parse::<u64>().ok())
        .map(|original_bytes| telemetry_core::Cut {
            original_bytes,
            reason: text(headers::PAYLOAD_CUT_REASON),
            detail: text(headers::PAYLOAD_CUT_DETAIL),
        });
    telemetry_core::Received {
        payload: message.payload().unwrap_or_default(),
        received_at: received_at(message),
        topic_device: message.key(),
        cut,
    }
}

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use telemetry_core::names::topics;

/// Errors from Kafka set-up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `--kafka-option` was not of the form `key=value`.
    #[error("kafka option `{0}` is not of the form key=value")]
    InvalidOption(String),
    /// librdkafka refused the client configuration or the request.
    #[error("kafka: {}", describe(.0))]
    Kafka(#[from] KafkaError),
    /// A setting is missing, or contradicts another.
    #[error("{setting}: {problem}")]
    Invalid {
        /// The setting's variable and flag.
        setting: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The broker refused to create a topic.
    #[error("creating topic `{topic}` failed: {code}")]
    CreateTopic {
        /// The topic that could not be created.
        topic: String,
        /// The broker's error code.
        code: RDKafkaErrorCode,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Kafka settings shared by every service.
#[derive(Clone, clap::Args)]
pub struct KafkaConfig {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(
        long = "kafka-brokers",
        env = "TELEMETRY_KAFKA_BROKERS",
        default_value = "127.0.0.1:9092"
    )]
    pub brokers: String,

    /// Topic of raw MQTT payloads (bridge produces, audit consumes).
    #[arg(long = "raw-topic", env = "TELEMETRY_RAW_TOPIC", default_value = topics::RAW)]
    pub raw_topic: String,

    /// Topic of validated, normalized events (audit produces).
    #[arg(long = "cleaned-topic", env = "TELEMETRY_CLEANED_TOPIC", default_value = topics::CLEANED)]
    pub cleaned_topic: String,

    /// Dead-letter topic of rejected records (audit produces).
    #[arg(long = "dlq-topic", env = "TELEMETRY_DLQ_TOPIC", default_value = topics::DLQ)]
    pub dlq_topic: String,

    /// Partitions of each topic created at start-up (existing topics are left as they are).
    #[arg(long = "topic-partitions", env = "TELEMETRY_TOPIC_PARTITIONS", default_value_t = 3,
          value_parser = clap::value_parser!(i32).range(1..))]
    pub topic_partitions: i32,

    /// Replication factor of each topic created at start-up.
    #[arg(long = "topic-replication-factor", env = "TELEMETRY_TOPIC_REPLICATION_FACTOR",
          default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..))]
    pub topic_replication_factor: i32,

    /// How clients talk to the brokers: `plaintext`, `ssl` (TLS), `sasl_plaintext` or
    /// `sasl_ssl` (SASL authentication over TLS).
    #[arg(long = "kafka-security-protocol", env = "TELEMETRY_KAFKA_SECURITY_PROTOCOL",
          default_value = "plaintext",
          value_parser = ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"])]
    pub security_protocol: String,

    /// SASL mechanism with `sasl_*` protocols: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    #[arg(long = "kafka-sasl-mechanism", env = "TELEMETRY_KAFKA_SASL_MECHANISM",
          value_parser = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])]
    pub sasl_mechanism: Option<String>,

    /// SASL user name.
    #[arg(long = "kafka-sasl-username", env = "TELEMETRY_KAFKA_SASL_USERNAME")]
    pub sasl_username: Option<String>,

    /// SASL password. Never logged; prefer the environment variable or the configuration file
    /// to the flag, which other users of the machine can read in the process list.
    #[arg(
        long = "kafka-sasl-password",
        env = "TELEMETRY_KAFKA_SASL_PASSWORD",
        hide_env_values = true
    )]
    pub sasl_password: Option<String>,

    /// PEM file of the CA certificates that sign the brokers' certificates, with `ssl` and
    /// `sasl_ssl`. Without it, the system's CA store.
    #[arg(long = "kafka-ssl-ca-file", env = "TELEMETRY_KAFKA_SSL_CA_FILE")]
    pub ssl_ca_file: Option<std::path::PathBuf>,

    /// PEM file of this client's certificate, for brokers that require client certificates
    /// (mutual TLS); with `--kafka-ssl-key-file`.
    #[arg(
        long = "kafka-ssl-certificate-file",
        env = "TELEMETRY_KAFKA_SSL_CERTIFICATE_FILE"
    )]
    pub ssl_certificate_file: Option<std::path::PathBuf>,

    /// PEM file of this client's private key (unencrypted), with `--kafka-ssl-certificate-file`.
    #[arg(long = "kafka-ssl-key-file", env = "TELEMETRY_KAFKA_SSL_KEY_FILE")]
    pub ssl_key_file: Option<std::path::PathBuf>,

    /// Raw librdkafka option for every client, as key=value (repeatable; env: comma-separated),
    /// e.g. `socket.keepalive.enable=true`. Applied last, so it overrides our defaults and the
    /// settings above. May hold secrets (`sasl.password`, `ssl.key.password`): never shown.
    #[arg(
        long = "kafka-option",
        env = "TELEMETRY_KAFKA_OPTIONS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub options: Vec<String>,
}

impl Default for KafkaConfig {
    /// The flags' defaults: a plaintext local broker and the standard topic names.
    fn default() -> Self {
        KafkaConfig {
            brokers: String::from("127.0.0.1:9092"),
            raw_topic: topics::RAW.to_string(),
            cleaned_topic: topics::CLEANED.to_string(),
            dlq_topic: topics::DLQ.to_string(),
            topic_partitions: 3,
            topic_replication_factor: 1,
            security_protocol: String::from("plaintext"),
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            ssl_ca_file: None,
            ssl_certificate_file: None,
            ssl_key_file: None,
            options: Vec::new(),
        }
    }
}

impl std::fmt::Debug for KafkaConfig {
    // Passwords (the SASL password, and any pass-through option that names one) never reach a
    // log or an error message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let options: Vec<String> = self
            .options
            .iter()
            .map(|option| redact_option(option))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("raw_topic", &self.raw_topic)
            .field("cleaned_topic", &self.cleaned_topic)
            .field("dlq_topic", &self.dlq_topic)
            .field("topic_partitions", &self.topic_partitions)
            .field("topic_replication_factor", &self.topic_replication_factor)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field(
                "sasl_password",
                &self.sasl_password.as_ref().map(|_| "<redacted>"),
            )
            .field("ssl_ca_file", &self.ssl_ca_file)
            .field("ssl_certificate_file", &self.ssl_certificate_file)
            .field("ssl_key_file", &self.ssl_key_file)
            .field("options", &options)
            .finish()
    }
}

/// `key=value` with the value hidden when the key names a secret (`sasl.password`,
/// `ssl.key.password`, `sasl.oauthbearer.client.secret`, ...).
fn redact_option(option: &str) -> String {
    match option.split_once('=') {
        Some((key, _)) if is_secret_option(key) => format!("{key}=<redacted>"),
        _ => option.to_string(),
    }
}

/// Whether a librdkafka setting's value is a secret: passwords, secrets, JAAS configurations
/// (Java clients' habit, which carry passwords) and inline PEM keys.
pub fn is_secret_option(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "jaas", "pem"]
        .iter()
        .any(|word| key.contains(word))
}

/// A librdkafka error for people: rdkafka's own text, except that a refused setting's value is
/// left out when the setting is a secret (rdkafka's text quotes the value).
fn describe(error: &KafkaError) -> String {
    match error {
        KafkaError::ClientConfig(_, _, key, _) if is_secret_option(key) => {
            format!("the value of client setting `{key}` is not valid (not shown: it is a secret)")
        }
        KafkaError::ClientConfig(_, description, key, _) => {
            format!("client setting `{key}`: {description}")
        }
        other => other.to_string(),
    }
}

/// What every producer of ours promises: a record counts as written once all in-sync replicas
/// have it, retries never duplicate or reorder it, and any payload the bridge accepts fits.
///
/// `message.timeout.ms`: after a broker restart the idempotent producer can hold records whose
/// fate it does not know until they time out (the chaos suite once waited out the full 120 s
/// then set). Our services produce failed records again themselves, so a short timeout bounds
/// such a stall without losing anything; while Kafka is down they simply retry every 30 s.
const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("acks", "all"),
    ("enable.idempotence", "true"),
    ("linger.ms", "5"),
    ("compression.type", "lz4"),
    ("message.max.bytes", "1048576"),
    ("message.timeout.ms", "30000"),
];

/// The `message.max.bytes` a producer configuration ends up with (ours, or a pass-through
/// option's): librdkafka refuses larger records before sending them.
pub fn producer_max_message_bytes(config: &ClientConfig) -> usize {
    config
        .get("message.max.bytes")
        .and_then(|value| value.parse().ok())
        .unwrap_or(1_000_000)
}

impl KafkaConfig {
    /// A producer configuration: [`PRODUCER_DEFAULTS`], then `extra`, then the pass-through
    /// options.
    pub fn producer_config(&self, extra: &[(&str, &str)]) -> Result<ClientConfig> {
        let settings: Vec<(&str, &str)> = PRODUCER_DEFAULTS.iter().chain(extra).copied().collect();
        self.client_config(&settings)
    }

    /// A client configuration with the brokers and the pass-through options applied over
    /// `defaults` (the caller's settings for its kind of client).
    pub fn client_config(&self, defaults: &[(&str, &str)]) -> Result<ClientConfig> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        // After a broker restart librdkafka can keep partitions leaderless in its metadata cache
        // until the next periodic refresh (default 5 min), stalling produce and fetch that long;
        // measured in the chaos suite on a restarted single-node broker. Refresh every 10 s.
        config.set("topic.metadata.refresh.interval.ms", "10000");
        // A broker that is back is found within a second: librdkafka's reconnect backoff grows to
        // 10 s by default, and after a broker outage clients came back up to 9 s after it
        // listened again (the Java clients' default is 1 s too). Refused connections cost
        // nothing; one attempt a second per broker is what an outage costs.
        config.set("reconnect.backoff.max.ms", "1000");
        // Small requests (a produce at a low rate, a fetch response) go out at once instead of
        // waiting up to 40 ms for the TCP acknowledgement of the previous segment.
        config.set("socket.nagle.disable", "true");
        for (key, value) in defaults {
            config.set(*key, *value);
        }
        for (key, value) in self.security_settings()? {
            config.set(key, value);
        }
        for option in &self.options {
            let (key, value) = option
                .split_once('=')
                .filter(|(key, _)| !key.trim().is_empty())
                .ok_or_else(|| Error::InvalidOption(option.clone()))?;
            config.set(key.trim(), value.trim());
        }
        Ok(config)
    }
}

impl KafkaConfig {
    /// The librdkafka settings of the security options, checked against each other: a SASL
    /// protocol needs a mechanism, a user name and a password; a client certificate needs its key.
    fn security_settings(&self) -> Result<Vec<(&'static str, String)>> {
        let invalid = |setting: &'static str, problem: &str| Error::Invalid {
            setting,
            problem: problem.to_string(),
        };
        let protocol = self.security_protocol.as_str();
        let sasl = protocol.starts_with("sasl_");
        let tls = protocol.ends_with("ssl");
        let mut settings = vec![("security.protocol", protocol.to_string())];
        if sasl {
            let mechanism = self.sasl_mechanism.as_ref().ok_or_else(|| {
                invalid(
                    "TELEMETRY_KAFKA_SASL_MECHANISM / --kafka-sasl-mechanism",
                    &format!("is required with security protocol `{protocol}`"),
                )
            })?;
            let username = self.sasl_username.as_ref().ok_or_else(|| {
                invalid(
                    "TELEMETRY_KAFKA_SASL_USERNAME / --kafka-sasl-username",
                    &format!("is required with security protocol `{protocol}`"),
                )
            })?;
            let password = self.sasl_password.as_ref().ok_or_else(|| {
                invalid(
                    "TELEMETRY_KAFKA_SASL_PASSWORD / --kafka-sasl-password",
                    &format!("is required with security protocol `{protocol}`"),
                )
            })?;
            settings.push(("sasl.mechanism", mechanism.clone()));
            settings.push(("sasl.username", username.clone()));
            settings.push(("sasl.password", password.clone()));
        } else if self.sasl_mechanism.is_some()
            || self.sasl_username.is_some()
            || self.sasl_password.is_some()
        {
            return Err(invalid(
                "TELEMETRY_KAFKA_SECURITY_PROTOCOL / --kafka-security-protocol",
                &format!(
                    "is `{protocol}`, but SASL settings are given: use `sasl_ssl` (or `sasl_plaintext`)"
                ),
            ));
        }
        let files = [
            (
                "TELEMETRY_KAFKA_SSL_CA_FILE / --kafka-ssl-ca-file",
                "ssl.ca.location",
                &self.ssl_ca_file,
            ),
            (
                "TELEMETRY_KAFKA_SSL_CERTIFICATE_FILE / --kafka-ssl-certificate-file",
                "ssl.certificate.location",
                &self.ssl_certificate_file,
            ),
            (
                "TELEMETRY_KAFKA_SSL_KEY_FILE / --kafka-ssl-key-file",
                "ssl.key.location",
                &self.ssl_key_file,
            ),
        ];
        for (setting, key, file) in files {
            let Some(file) = file else { continue };
            if !tls {
                return Err(invalid(
                    setting,
                    &format!("is set, but security protocol `{protocol}` does not use TLS: use `ssl` or `sasl_ssl`"),
                ));
            }
            if !file.is_file() {
                return Err(invalid(
                    setting,
                    &format!("`{}` is not a readable file", file.display()),
                ));
            }
            settings.push((key, file.display().to_string()));
        }
        if self.ssl_certificate_file.is_some() != self.ssl_key_file.is_some() {
            return Err(invalid(
                "TELEMETRY_KAFKA_SSL_KEY_FILE / --kafka-ssl-key-file",
                "a client certificate and its key are given together, or neither",
            ));
        }
        Ok(settings)
    }
}

/// Creates each of `names` that does not exist yet, with the configured partitions and
/// replication; existing topics are left unchanged.
///
/// A user without Create on a topic (the role users of a broker with ACLs, docs/operations.md
/// "Kafka ACLs") is refused even when the topic exists; an existing topic the user can see
/// (Describe) is then all that is asked for.
pub async fn ensure_topics(config: &KafkaConfig, names: &[&str]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = config.client_config(&[])?.create()?;
    let new_topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| {
            NewTopic::new(
                name,
                config.topic_partitions,
                TopicReplication::Fixed(config.topic_replication_factor),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new_topics, &options).await? {
        match result {
            Ok(topic) => tracing::info!(topic, "Created Kafka topic."),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, RDKafkaErrorCode::TopicAuthorizationFailed))
                if topic_exists(config, &topic).await? =>
            {
                tracing::debug!(topic, "Kafka topic exists; not authorized to create it.");
            }
            Err((topic, code)) => return Err(Error::CreateTopic { topic, code }),
        }
    }
    Ok(())
}

/// Whether `topic` exists and this client may see it (the broker's metadata lists it without an
/// error).
async fn topic_exists(config: &KafkaConfig, topic: &str) -> Result<bool> {
    let client: BaseConsumer = config.client_config(&[])?.create()?;
    let topic = topic.to_string();
    let metadata = tokio::task::spawn_blocking(move || {
        client.fetch_metadata(Some(&topic), Duration::from_secs(10))
    })
    .await
    .map_err(|_| Error::Kafka(KafkaError::Canceled))??;
    Ok(metadata
        .topics()
        .iter()
        .any(|topic| topic.error().is_none() && !topic.partitions().is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(config: &KafkaConfig) -> String {
        config
            .client_config(&[])
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn security_settings_are_checked_against_each_other() {
        let sasl = KafkaConfig {
            security_protocol: "sasl_ssl".into(),
            ..KafkaConfig::default()
        };
        assert!(error_of(&sasl).contains("--kafka-sasl-mechanism"));
        let sasl = KafkaConfig {
            sasl_mechanism: Some("SCRAM-SHA-256".into()),
            sasl_username: Some("user".into()),
            ..sasl
        };
        assert!(error_of(&sasl).contains("--kafka-sasl-password"));
        let complete = KafkaConfig {
            sasl_password: Some("secret".into()),
            ..sasl.clone()
        };
        assert!(complete.client_config(&[]).is_ok());

        let plaintext_with_user = KafkaConfig {
            sasl_username: Some("user".into()),
            ..KafkaConfig::default()
        };
        assert!(error_of(&plaintext_with_user).contains("sasl_ssl"));
        let missing_file = KafkaConfig {
            security_protocol: "ssl".into(),
            ssl_ca_file: Some("/nonexistent/ca.pem".into()),
            ..KafkaConfig::default()
        };
        assert!(error_of(&missing_file).contains("--kafka-ssl-ca-file"));
        let certificate_without_key = KafkaConfig {
            security_protocol: "ssl".into(),
            ssl_certificate_file: Some(std::env::current_exe().unwrap_or_default()),
            ..KafkaConfig::default()
        };
        assert!(error_of(&certificate_without_key).contains("--kafka-ssl-key-file"));
    }

    #[test]
    fn passwords_never_reach_debug_output() {
        let config = KafkaConfig {
            security_protocol: "sasl_ssl".into(),
            sasl_mechanism: Some("PLAIN".into()),
            sasl_username: Some("user".into()),
            sasl_password: Some("hunter2".into()),
            options: vec![
                "ssl.key.password=hunter3".into(),
                "sasl.jaas.config=secret-jaas".into(),
                "linger.ms=5".into(),
            ],
            ..KafkaConfig::default()
        };
        let shown = format!("{config:?}");
        for secret in ["hunter2", "hunter3", "secret-jaas"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("linger.ms=5") && shown.contains("user"));
    }

    #[test]
    fn a_refused_secret_setting_is_named_without_its_value() {
        let config = KafkaConfig {
            options: vec!["sasl.jaas.config=PlainLoginModule password=\"hunter4\"".into()],
            ..KafkaConfig::default()
        };
        let created = config
            .client_config(&[])
            .and_then(|client| Ok(client.create::<rdkafka::producer::BaseProducer>()?));
        let message = created
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default();
        assert!(message.contains("sasl.jaas.config"), "{message}");
        assert!(!message.contains("hunter4"), "{message}");
    }
}
