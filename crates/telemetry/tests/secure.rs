//! The pipeline over secured connections, against the real services: MQTT over TLS with a user
//! name and password (a Mosquitto of the test's own), Kafka over SASL_SSL (the development
//! broker's secure listener, `scripts/services.sh`), MySQL over verified TLS with a user that
//! may not connect without it. Wrong credentials are refused with errors that say so.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use telemetry_bridge::{Bridge, MqttConnectionConfig};
use telemetry_kafka::KafkaConfig;
use telemetry_testkit::{
    eventually, free_port, http_get, kafka_secure_brokers, publish_qos1_with, tls_dir, unique,
    KAFKA_SASL_CREDENTIALS,
};
use tokio_util::sync::CancellationToken;

mod common;
use common::{audit_config, base_ts, bridge_config, kafka_config, stopped};

const MQTT_USER: &str = "pico-fleet";
const MQTT_PASSWORD: &str = "mqtt-secret";

/// A Mosquitto of the test's own that only takes TLS connections with a user name and password.
struct SecureMosquitto {
    process: tokio::process::Child,
    port: u16,
    dir: PathBuf,
}

impl SecureMosquitto {
    async fn start(id: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{id}-mosquitto"));
        std::fs::create_dir_all(&dir).unwrap();
        // Copies readable by the broker's own user (it drops root's privileges).
        for file in ["ca.pem", "server.pem", "server.key"] {
            std::fs::copy(tls_dir().join(file), dir.join(file)).unwrap();
            set_mode(&dir.join(file), 0o644);
        }
        set_mode(&dir, 0o755);
        let passwords = dir.join("passwords");
        let status = std::process::Command::new("mosquitto_passwd")
            .args(["-c", "-b"])
            .arg(&passwords)
            .args([MQTT_USER, MQTT_PASSWORD])
            .status()
            .unwrap();
        assert!(status.success(), "mosquitto_passwd failed");
        set_mode(&passwords, 0o644);
        let port = free_port();
        let config = dir.join("mosquitto.conf");
        std::fs::write(
            &config,
            format!(
                "persistence false\nlog_dest stderr\nallow_anonymous false\n\
                 password_file {passwords}\nmax_queued_messages 0\n\
                 listener {port} 127.0.0.1\ncafile {dir}/ca.pem\ncertfile {dir}/server.pem\n\
                 keyfile {dir}/server.key\n",
                passwords = passwords.display(),
                dir = dir.display(),
            ),
        )
        .unwrap();
        let binary = if Path::new("/usr/sbin/mosquitto").exists() {
            "/usr/sbin/mosquitto"
        } else {
            "mosquitto"
        };
        let process = tokio::process::Command::new(binary)
            .arg("-c")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        assert!(
            eventually(Duration::from_secs(10), || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            })
            .await,
            "the test's Mosquitto did not start"
        );
        SecureMosquitto { process, port, dir }
    }

    /// Settings for this broker: TLS against the development CA, with `password`.
    fn connection(&self, password: &str) -> MqttConnectionConfig {
        let mut connection = MqttConnectionConfig::new(format!("mqtts://localhost:{}", self.port));
        connection.mqtt_ca_file = Some(tls_dir().join("ca.pem"));
        connection.mqtt_username = Some(MQTT_USER.into());
        connection.mqtt_password = Some(password.into());
        connection
    }

    async fn stop(mut self) {
        self.process.kill().await.ok();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The test's Kafka settings on the SASL_SSL listener with `mechanism` and `password`.
fn secure_kafka(id: &str, mechanism: &str, password: &str) -> KafkaConfig {
    KafkaConfig {
        brokers: kafka_secure_brokers(),
        security_protocol: "sasl_ssl".into(),
        sasl_mechanism: Some(mechanism.into()),
        sasl_username: Some(KAFKA_SASL_CREDENTIALS.0.into()),
        sasl_password: Some(password.into()),
        ssl_ca_file: Some(tls_dir().join("ca.pem")),
        ..kafka_config(id)
    }
}

/// The URL (verified TLS against the development CA) of the tests' account that the server
/// refuses without TLS (`telemetry_test_tls`, made by `scripts/services.sh`), on a database of the
/// test's own.
fn tls_only_mysql_url(id: &str) -> String {
    let ca = tls_dir().join("ca.pem");
    format!(
        "{}?ssl-mode=VERIFY_IDENTITY&ssl-ca={}",
        telemetry_testkit::database_url_as("telemetry_test_tls", id),
        ca.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_pipeline_runs_over_tls_with_credentials_to_mqtt_kafka_and_mysql() {
    let id = unique("secure");
    let mosquitto = SecureMosquitto::start(&id).await;
    let kafka = secure_kafka(&id, "SCRAM-SHA-256", KAFKA_SASL_CREDENTIALS.1);
    let mysql_url = tls_only_mysql_url(&id);
    let shutdown = CancellationToken::new();

    let mut bridge = bridge_config(&id, &kafka);
    bridge.mqtt = mosquitto.connection(MQTT_PASSWORD);
    let bridge = Bridge::bind(bridge).await.unwrap();
    let bridge_address = bridge.local_addr().unwrap();
    let bridge_task = tokio::spawn(bridge.run(shutdown.clone()));
    let mut audit = audit_config(&id, &format!("{id}-audit"), &kafka);
    audit.database.mysql_url = mysql_url.clone();
    let audit_task = tokio::spawn(telemetry_audit::run(audit, shutdown.clone()));
    assert!(
        eventually(Duration::from_secs(30), || async {
            matches!(http_get(bridge_address, "/readyz").await, Ok((200, _)))
        })
        .await,
        "the bridge did not subscribe over TLS"
    );

    // A device publishing over TLS with its user name and password.
    let device = "pico-secure";
    let options = mosquitto
        .connection(MQTT_PASSWORD)
        .options(&format!("{id}-device"), |_| {})
        .unwrap();
    let payload = format!(
        r#"{{"device_id":"{device}","device_ts":{},"seq":1,"temperature":22.5}}"#,
        base_ts()
    );
    publish_qos1_with(
        options,
        &[(
            format!("{id}/devices/{device}/telemetry"),
            payload.into_bytes(),
        )],
        None,
        &AtomicUsize::new(0),
    )
    .await;

    // The row arrives through SASL_SSL Kafka, written over verified TLS.
    let pool = sqlx::MySqlPool::connect(&mysql_url).await.unwrap();
    assert!(
        eventually(Duration::from_secs(60), || async {
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM telemetry WHERE device_id = ?")
                .bind(device)
                .fetch_one(&pool)
                .await
                .is_ok_and(|count| count == 1)
        })
        .await,
        "the event did not reach the table"
    );
    let (_, cipher): (String, String) = sqlx::query_as("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(!cipher.is_empty(), "the MySQL connection is not encrypted");
    pool.close().await;

    shutdown.cancel();
    stopped(bridge_task).await;
    stopped(audit_task).await;
    mosquitto.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_or_no_tls_are_refused() {
    let id = unique("secure-refused");

    // Kafka: PLAIN with the right password reads the cluster's metadata; a wrong password does not.
    let metadata = |config: KafkaConfig| async move {
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = config.client_config(&[]).unwrap().create().unwrap();
            consumer
                .fetch_metadata(None, Duration::from_secs(10))
                .map(|metadata| metadata.brokers().len())
        })
        .await
        .unwrap()
    };
    let plain = metadata(secure_kafka(&id, "PLAIN", KAFKA_SASL_CREDENTIALS.1)).await;
    assert_eq!(
        plain.ok(),
        Some(1),
        "PLAIN over TLS with the right password"
    );
    let wrong = metadata(secure_kafka(&id, "SCRAM-SHA-512", "wrong")).await;
    assert!(wrong.is_err(), "a wrong SCRAM password must be refused");

    // MySQL: the TLS-only user cannot connect with TLS turned off.
    let mysql_url = tls_only_mysql_url(&id);
    let without_tls = mysql_url
        .split_once('?')
        .map(|(base, _)| format!("{base}?ssl-mode=DISABLED"))
        .unwrap();
    assert!(telemetry_store::Store::connect(&without_tls, 1)
        .await
        .is_err());
    assert!(telemetry_store::Store::connect(&mysql_url, 1).await.is_ok());

    // MQTT: with a wrong password the bridge never subscribes, so it is not ready.
    let mosquitto = SecureMosquitto::start(&id).await;
    let shutdown = CancellationToken::new();
    let mut bridge = bridge_config(&id, &kafka_config(&id));
    bridge.mqtt = mosquitto.connection("wrong");
    let bridge = Bridge::bind(bridge).await.unwrap();
    let bridge_address = bridge.local_addr().unwrap();
    let bridge_task = tokio::spawn(bridge.run(shutdown.clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, body) = http_get(bridge_address, "/readyz").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"mqtt_subscribed\":false"), "{body}");
    shutdown.cancel();
    stopped(bridge_task).await;
    mosquitto.stop().await;
}

/// An HTTPS client that trusts the development CA of `scripts/services.sh` only.
fn https_client() -> reqwest::Client {
    let ca = std::fs::read(tls_dir().join("ca.pem")).unwrap();
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_and_the_live_view_answer_over_tls_with_the_configured_certificate() {
    let id = unique("https");
    let kafka = kafka_config(&id);
    let shutdown = CancellationToken::new();
    let tls = telemetry_ops::HttpTls {
        tls_certificate_file: Some(tls_dir().join("server.pem")),
        tls_key_file: Some(tls_dir().join("server.key")),
    };
    let mut bridge = bridge_config(&id, &kafka);
    bridge.tls = tls.clone();
    let bridge = Bridge::bind(bridge).await.unwrap();
    let bridge_address = bridge.local_addr().unwrap();
    let bridge_task = tokio::spawn(bridge.run(shutdown.clone()));
    let mut api = common::api_config(&id, "127.0.0.1:0", Default::default());
    api.tls = tls;
    let api = telemetry_api::Api::bind(api).await.unwrap();
    let api_address = api.local_addr().unwrap();
    let api_task = tokio::spawn(api.run(shutdown.clone()));

    // The certificate names localhost and 127.0.0.1 and chains to the development CA: the client
    // verifies both.
    let client = https_client();
    for (name, address, path) in [
        ("API", api_address, "/api/config"),
        ("dashboard", api_address, "/"),
        ("bridge", bridge_address, "/healthz"),
    ] {
        let response = client
            .get(format!("https://localhost:{}{path}", address.port()))
            .send()
            .await
            .unwrap_or_else(|error| panic!("{name} over TLS: {error:?}"));
        assert_eq!(response.status(), 200, "{name}");
    }
    // The live view upgrades over TLS (wss://): a handshake answered 101.
    let upgrade = client
        .get(format!("https://localhost:{}/ws", bridge_address.port()))
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(upgrade.status(), 101);
    // Plain HTTP gets no answer from a TLS listener, and a client that does not trust the CA
    // refuses the certificate.
    let plain = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{}/api/config",
            api_address.port()
        ))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP must not be served: {plain:?}");
    let untrusting = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .build()
        .unwrap()
        .get(format!(
            "https://localhost:{}/api/config",
            api_address.port()
        ))
        .send()
        .await;
    assert!(untrusting.is_err());

    shutdown.cancel();
    stopped(bridge_task).await;
    stopped(api_task).await;
}
