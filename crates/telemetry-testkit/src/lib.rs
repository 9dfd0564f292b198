//! Helpers for integration tests against the real services (Mosquitto, Apache Kafka, MariaDB),
//! started by `scripts/services.sh start`. Every helper isolates the calling test: its own topic
//! names, consumer groups, MQTT topic prefix and database.
//!
//! The services' addresses come from the same environment variables the services read
//! (`TELEMETRY_KAFKA_BROKERS`, `TELEMETRY_MQTT_URL`) plus `TELEMETRY_TEST_MYSQL_URL` for the
//! database server, defaulting to what `scripts/services.sh` starts.
//!
//! # Layout
//! - [`unique`]: a fresh name for topics, groups, client ids and databases.
//! - [`kafka_brokers`], [`mqtt_url`], [`database_url`]: where the services are.
//! - [`read_topic`], [`produce`]: read a whole topic / write records, as a user would check.
//! - [`publish_qos1`], [`publish_qos1_to`]: publish over MQTT and wait for the broker's
//!   acknowledgements.
//! - [`http_get`], [`http_get_with`]: a minimal HTTP GET for health checks and API calls.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rand::distr::{Alphanumeric, SampleString};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A name no other test uses: `prefix` plus a random lowercase suffix.
pub fn unique(prefix: &str) -> String {
    let suffix = Alphanumeric
        .sample_string(&mut rand::rng(), 10)
        .to_lowercase();
    format!("{prefix}_{suffix}")
}

/// Kafka bootstrap servers of the test broker.
pub fn kafka_brokers() -> String {
    std::env::var("TELEMETRY_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_string())
}

/// Kafka bootstrap servers of the test broker's SASL_SSL listener (`scripts/services.sh`).
pub fn kafka_secure_brokers() -> String {
    std::env::var("TELEMETRY_TEST_KAFKA_SECURE_BROKERS")
        .unwrap_or_else(|_| "127.0.0.1:9094".to_string())
}

/// The development SASL user and password of the test broker (`scripts/services.sh`).
pub const KAFKA_SASL_CREDENTIALS: (&str, &str) = ("telemetry", "telemetry-secret");

/// Where `scripts/services.sh` keeps the development CA (`ca.pem`) and the server certificate
/// (`server.pem`, `server.key`) the test services use for TLS.
pub fn tls_dir() -> std::path::PathBuf {
    std::env::var_os("TELEMETRY_STATE_DIR")
        .map_or_else(
            || std::path::PathBuf::from("/var/lib/telemetry-pipeline"),
            std::path::PathBuf::from,
        )
        .join("tls")
}

/// The tests' own MQTT user of `scripts/services.sh` (the development broker takes no anonymous
/// client): it may read and write any topic, the tests' prefixes included.
pub const MQTT_TEST_CREDENTIALS: (&str, &str) = ("telemetry-test", "telemetry-test");

/// URL of the test MQTT broker, with the tests' credentials ([`MQTT_TEST_CREDENTIALS`]).
pub fn mqtt_url() -> String {
    std::env::var("TELEMETRY_MQTT_URL").unwrap_or_else(|_| {
        let (user, password) = MQTT_TEST_CREDENTIALS;
        format!("mqtt://{user}:{password}@127.0.0.1:1883")
    })
}

/// URL of a database of its own for the calling test, `test_<name>`, with the tests' owner
/// account (`telemetry_test`: every privilege on the `test_` databases, none elsewhere; the
/// database is created by whoever connects first; `scripts/test.sh` drops the `test_` databases
/// of earlier runs). `TELEMETRY_TEST_MYSQL_URL` names another server (without a database).
pub fn database_url(name: &str) -> String {
    let server = std::env::var("TELEMETRY_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://telemetry_test:telemetry-test@127.0.0.1:3306".to_string());
    format!("{}/test_{name}", server.trim_end_matches('/'))
}

/// [`database_url`] with another of the tests' accounts of `scripts/services.sh`, same password:
/// `telemetry_test_writer` (SELECT, INSERT, UPDATE, DELETE), `telemetry_test_reader` (SELECT) or
/// `telemetry_test_tls` (every privilege, TLS required).
pub fn database_url_as(user: &str, name: &str) -> String {
    database_url(name).replacen("telemetry_test:", &format!("{user}:"), 1)
}

/// Reads `topic` from the beginning with a fresh consumer group until `expected` records arrived
/// or `timeout` passed, whichever is first, then keeps reading for `settle` more to catch records
/// beyond `expected`. Returns every record read.
pub async fn read_topic(
    topic: &str,
    expected: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<OwnedMessage> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("test consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut records = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while records.len() < expected {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(message)) => records.push(message.detach()),
            // The topic may not exist yet: the service under test creates it.
            Ok(Err(rdkafka::error::KafkaError::MessageConsumption(
                rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
            ))) => tokio::time::sleep(Duration::from_millis(200)).await,
            Ok(Err(error)) => panic!("reading {topic}: {error}"),
            Err(_) => return records,
        }
    }
    let settle_deadline = tokio::time::Instant::now() + settle;
    while let Ok(Ok(message)) = tokio::time::timeout_at(settle_deadline, consumer.recv()).await {
        records.push(message.detach());
    }
    records
}

/// A record for [`produce`].
#[derive(Debug, Clone)]
pub struct TestRecord {
    /// Record key.
    pub key: Option<Vec<u8>>,
    /// Record value.
    pub payload: Vec<u8>,
    /// Headers, key and value.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Produces `records` to `topic` (acks=all) and waits until Kafka confirmed all of them.
pub async fn produce(topic: &str, records: &[TestRecord]) {
    produce_to(&kafka_brokers(), topic, records.iter().cloned(), &[]).await;
}

/// Produces `records` to `topic` on `brokers` in order, up to 10,000 in flight, with `settings`
/// added to the producer's (e.g. `linger.ms` for a benchmark's million records), and waits until
/// Kafka confirmed all of them.
pub async fn produce_to(
    brokers: &str,
    topic: &str,
    records: impl IntoIterator<Item = TestRecord>,
    settings: &[(&str, &str)],
) {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers).set("acks", "all");
    for (key, value) in settings {
        config.set(*key, *value);
    }
    let producer: FutureProducer = config.create().expect("test producer");
    let mut in_flight = Vec::with_capacity(10_000);
    for record in records {
        let mut headers = OwnedHeaders::new();
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut future_record = FutureRecord::<[u8], [u8]>::to(topic)
            .payload(&record.payload)
            .headers(headers);
        if let Some(key) = &record.key {
            future_record = future_record.key(key);
        }
        // librdkafka copies the record; its delivery report is awaited later.
        loop {
            match producer.send_result(future_record) {
                Ok(delivery) => {
                    in_flight.push(delivery);
                    break;
                }
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    returned,
                )) => {
                    future_record = returned;
                    confirm(&mut in_flight).await;
                }
                Err((error, _)) => panic!("test produce: {error}"),
            }
        }
        if in_flight.len() == 10_000 {
            confirm(&mut in_flight).await;
        }
    }
    confirm(&mut in_flight).await;
}

/// Waits for the delivery reports of `in_flight`, panicking on a failed one.
async fn confirm(in_flight: &mut Vec<rdkafka::producer::DeliveryFuture>) {
    for delivery in futures::future::join_all(in_flight.drain(..)).await {
        delivery
            .expect("test produce: the producer went away")
            .map_err(|(error, _)| error)
            .expect("test produce");
    }
}

/// Publishes each `(topic, payload)` with QoS 1 to [`mqtt_url`] and returns once the broker
/// acknowledged all.
pub async fn publish_qos1(client_id: &str, messages: &[(String, Vec<u8>)]) {
    publish_qos1_to(&mqtt_url(), client_id, messages, None, &AtomicUsize::new(0)).await;
}

/// Publishes each `(topic, payload)` with QoS 1 to the broker at `url`, at most `per_second`
/// messages a second when given, counting the broker's acknowledgements in `acknowledged`.
/// Returns once the broker acknowledged all.
pub async fn publish_qos1_to(
    url: &str,
    client_id: &str,
    messages: &[(String, Vec<u8>)],
    per_second: Option<u32>,
    acknowledged: &AtomicUsize,
) {
    publish_qos1_with(
        options_for(url, client_id),
        messages,
        per_second,
        acknowledged,
    )
    .await;
}

/// Client options for the broker at `url` (`mqtt://[user:password@]host[:port]`).
fn options_for(url: &str, client_id: &str) -> MqttOptions {
    let (credentials, host, port) = url_parts(url);
    let mut options = MqttOptions::new(client_id, host, port);
    if let Some((user, password)) = credentials {
        options.set_credentials(user, password);
    }
    options
}

/// As [`publish_qos1_to`], but as a device that outlives a broker restart: a persistent
/// session (`clean_session = false`), and on a lost connection it reconnects and sends again what
/// the broker had not acknowledged, as MQTT clients on devices do.
pub async fn publish_qos1_through_restarts(
    url: &str,
    client_id: &str,
    messages: &[(String, Vec<u8>)],
    per_second: Option<u32>,
    acknowledged: &AtomicUsize,
) {
    let mut options = options_for(url, client_id);
    options.set_clean_session(false);
    publish(options, messages, per_second, acknowledged, true).await;
}

/// [`publish_qos1_to`] with the client options made by the caller (TLS, credentials).
pub async fn publish_qos1_with(
    options: MqttOptions,
    messages: &[(String, Vec<u8>)],
    per_second: Option<u32>,
    acknowledged: &AtomicUsize,
) {
    publish(options, messages, per_second, acknowledged, false).await;
}

/// Publishes `messages` with QoS 1; a lost connection is reconnected when `reconnect`, a failure
/// otherwise (rumqttc sends the unacknowledged publishes again after reconnecting).
async fn publish(
    mut options: MqttOptions,
    messages: &[(String, Vec<u8>)],
    per_second: Option<u32>,
    acknowledged: &AtomicUsize,
    reconnect: bool,
) {
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(100)
        .set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    let expected = messages.len();
    let poll = async {
        let mut count = 0;
        while count < expected {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    count += 1;
                    acknowledged.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) if reconnect => tokio::time::sleep(Duration::from_millis(200)).await,
                Err(error) => panic!("test MQTT publisher: {error}"),
            }
        }
    };
    let publish = async {
        // Paced in 10 ms ticks.
        let per_tick = per_second.map(|rate| (rate as usize / 100).max(1));
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        for (index, (topic, payload)) in messages.iter().enumerate() {
            if let Some(per_tick) = per_tick {
                if index % per_tick == 0 {
                    tick.tick().await;
                }
            }
            client
                .publish(topic, QoS::AtLeastOnce, false, payload.clone())
                .await
                .expect("queue publish");
        }
    };
    tokio::time::timeout(Duration::from_secs(600), async {
        tokio::join!(poll, publish)
    })
    .await
    .expect("the MQTT broker acknowledged every publish within 600 s");
}

/// `mqtt://[user:password@]host[:port]`: the credentials, the host and the port.
fn url_parts(url: &str) -> (Option<(String, String)>, String, u16) {
    let rest = url
        .trim_start_matches("mqtt://")
        .trim_start_matches("tcp://");
    let (credentials, address) = match rest.rsplit_once('@') {
        Some((userinfo, address)) => {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            (Some((user.to_string(), password.to_string())), address)
        }
        None => (None, rest),
    };
    match address.rsplit_once(':') {
        Some((host, port)) => (
            credentials,
            host.to_string(),
            port.parse().expect("MQTT port"),
        ),
        None => (credentials, address.to_string(), 1883),
    }
}

/// `GET path` on `address`; returns the status code and body. Enough for health checks.
pub async fn http_get(address: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let (status, _, body) = http_get_with(address, path, &[]).await?;
    Ok((status, body))
}

/// `GET path` on `address` with extra request `headers`; returns the status code, the response
/// headers (as text, one per line) and the body.
pub async fn http_get_with(
    address: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String, String)> {
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\n{extra}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .map(|(head, body)| (head.to_string(), body.to_string()))
        .unwrap_or_default();
    Ok((status, head, body))
}

/// Polls `check` every 100 ms until it returns true or `timeout` passes; returns its last answer.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago: for a service that must be told its
/// address before it starts (a port given back by the OS is not handed out again at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("binding 127.0.0.1:0")
}

/// A Mosquitto of the calling test's own, with a configuration of its own (the shared one runs
/// `deploy/mosquitto/mosquitto.conf`): for what only another configuration shows, such as a
/// broker without a packet size limit. Stopped when dropped.
pub struct PrivateMosquitto {
    child: std::process::Child,
    port: u16,
    directory: std::path::PathBuf,
}

impl PrivateMosquitto {
    /// Starts the real Mosquitto binary on a free port of 127.0.0.1 with `settings` (lines of
    /// `mosquitto.conf`) after a listener, anonymous access, no persistence and a QoS 1 window as
    /// ours; waits until it accepts connections.
    pub async fn start(settings: &str) -> Self {
        let port = free_port();
        let directory = std::env::temp_dir().join(unique("mosquitto"));
        std::fs::create_dir_all(&directory).expect("a directory for the test's Mosquitto");
        let config = directory.join("mosquitto.conf");
        std::fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_queued_messages 0\nmax_inflight_messages 1000\nset_tcp_nodelay true\n\
                 log_dest none\n{settings}\n"
            ),
        )
        .expect("the test's Mosquitto configuration");
        let binary = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|path| std::path::Path::new(path).exists())
            .unwrap_or("mosquitto");
        let child = std::process::Command::new(binary)
            .arg("-c")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting Mosquitto (scripts/services.sh installs it)");
        let broker = PrivateMosquitto {
            child,
            port,
            directory,
        };
        let up = eventually(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        assert!(up, "the test's Mosquitto did not listen on {port}");
        broker
    }

    /// Its URL, `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateMosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}
