//! Helpers shared by the integration tests that run the services in-process.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use rdkafka::message::{Headers, Message, OwnedMessage};
use telemetry_audit::AuditConfig;
use telemetry_kafka::KafkaConfig;
use telemetry_testkit::{database_url, kafka_brokers};

/// Device time of the tests' events: ten minutes ago, on a whole second, so it is within the
/// contract's clock-skew limits and not late.
pub fn base_ts() -> i64 {
    static BASE: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *BASE.get_or_init(|| (chrono::Utc::now().timestamp() - 600) * 1_000)
}

pub fn kafka_config(id: &str) -> KafkaConfig {
    KafkaConfig {
        brokers: kafka_brokers(),
        raw_topic: format!("{id}.raw"),
        cleaned_topic: format!("{id}.cleaned"),
        dlq_topic: format!("{id}.dlq"),
        topic_partitions: 3,
        topic_replication_factor: 1,
        ..KafkaConfig::default()
    }
}

/// A bridge subscribed to the test's own MQTT topics (`<id>/devices/+/telemetry`), listening on a
/// free port.
pub fn bridge_config(id: &str, kafka: &KafkaConfig) -> telemetry_bridge::BridgeConfig {
    telemetry_bridge::BridgeConfig {
        mqtt: telemetry_bridge::MqttConnectionConfig::new(telemetry_testkit::mqtt_url()),
        mqtt_topic: format!("{id}/devices/+/telemetry"),
        mqtt_client_id: format!("{id}-bridge"),
        mqtt_share_group: None,
        bridge_id: format!("{id}-bridge"),
        listen: "127.0.0.1:0".to_string(),
        ws_allowed_origins: vec!["http://127.0.0.1:8082".to_string()],
        ws_buffer: 8192,
        max_in_flight: 10_000,
        limits: Default::default(),
        contract: None,
        shutdown_grace_seconds: 10,
        auth: Default::default(),
        http: Default::default(),
        tls: Default::default(),
        kafka: kafka.clone(),
    }
}

pub fn audit_config(id: &str, group: &str, kafka: &KafkaConfig) -> AuditConfig {
    AuditConfig {
        database: telemetry_store::DatabaseConfig {
            mysql_url: database_url(id),
            mysql_owner_url: None,
            mysql_max_connections: Some(4),
        },
        group_id: group.to_string(),
        batch_size: 500,
        batch_bytes: 8 * 1024 * 1024,
        db_writers: 2,
        batch_linger_ms: 20,
        contract: None,
        dlq_index_retention_hours: 168,
        dlq_index_max_rows: 100_000,
        listen: "127.0.0.1:0".to_string(),
        shutdown_grace_seconds: 10,
        http: Default::default(),
        kafka: kafka.clone(),
    }
}

/// The API reading the test's database with the tests' reader account, listening on `listen`.
pub fn api_config(
    id: &str,
    listen: &str,
    auth: telemetry_auth::AuthConfig,
) -> telemetry_api::ApiConfig {
    telemetry_api::ApiConfig {
        mysql_url: Some(telemetry_testkit::database_url_as(
            "telemetry_test_reader",
            id,
        )),
        mysql_max_connections: 2,
        statement_timeout_ms: 5_000,
        dlq_payload_bytes: 4_096,
        listen: listen.to_string(),
        live_url: None,
        stale_after_seconds: 300,
        failing_dlq_ratio: 0.5,
        failing_min_rejections: 3,
        auth,
        http: Default::default(),
        tls: Default::default(),
    }
}

pub fn header<'a>(message: &'a OwnedMessage, key: &str) -> Option<&'a str> {
    message
        .headers()?
        .iter()
        .find(|header| header.key == key)
        .and_then(|header| header.value)
        .and_then(|value| std::str::from_utf8(value).ok())
}

pub fn payload(message: &OwnedMessage) -> Vec<u8> {
    message.payload().unwrap_or_default().to_vec()
}

/// The value of the Prometheus sample `name` that carries all of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .find(|line| {
            labels
                .iter()
                .all(|(key, value)| line.contains(&format!("{key}=\"{value}\"")))
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// Waits up to 30 s for a service task to end and asserts it ended without an error.
pub async fn stopped<E: std::fmt::Debug>(task: tokio::task::JoinHandle<Result<(), E>>) {
    tokio::time::timeout(std::time::Duration::from_secs(30), task)
        .await
        .expect("the service stopped within 30 s")
        .expect("the service task did not panic")
        .expect("the service stopped without an error");
}

/// `telemetry` with no TELEMETRY_* variable from the test's own environment.
pub fn telemetry() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_telemetry"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TELEMETRY_") {
            command.env_remove(name);
        }
    }
    command
}
