//! The pipeline under load: the bridge and the audit service run as child processes of the
//! `telemetry` binary (so their CPU time and memory are read from `/proc` alone), with topics,
//! consumer group, MQTT topics and database of the run's own.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use telemetry_kafka::KafkaConfig;
use telemetry_metrics::{
    Metric, AUDIT_BATCH_RECORDS, DB_WRITE_DURATION, EVENTS_REJECTED, EVENTS_WRITTEN,
    RECORDS_PRODUCED,
};
use telemetry_store::{Store, TelemetryStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::baseline::per_second;
use crate::load::{malformed_every, publish, publish_burst, Load, SentAt};
use crate::measure::{cpu_seconds, peak_rss_mb, ticks_per_second, Percentiles};
use crate::{BenchConfig, Error, PipelineResult, Result, ServiceUsage};

/// A service running as a child process.
struct Service {
    name: &'static str,
    child: tokio::process::Child,
    pid: u32,
    address: SocketAddr,
}

/// One part of a run: its topics, its database, its MQTT topics (`<name>/devices/...`), and how
/// its services are started. Everything is named after `name`, so parts never share anything.
struct Part<'a> {
    config: &'a BenchConfig,
    binary: &'a Path,
    name: String,
    kafka: KafkaConfig,
    mysql_url: String,
    store: Store,
}

impl<'a> Part<'a> {
    /// Makes the part's database (migrated); its topics are made by its services.
    async fn new(config: &'a BenchConfig, binary: &'a Path, name: String) -> Result<Self> {
        let kafka = KafkaConfig {
            brokers: config.bench_kafka_brokers.clone(),
            raw_topic: format!("{name}.raw"),
            cleaned_topic: format!("{name}.cleaned"),
            dlq_topic: format!("{name}.dlq"),
            ..KafkaConfig::default()
        };
        let mysql_url = format!("{}/{name}", config.bench_mysql_server.trim_end_matches('/'));
        let store = Store::connect(&mysql_url, 2).await?;
        store.migrate().await?;
        Ok(Part {
            config,
            binary,
            name,
            kafka,
            mysql_url,
            store,
        })
    }

    /// The load for this part's bridge.
    fn load(&self, events: u64, rate: u64, malformed: f64) -> Load {
        Load {
            url: self.config.bench_mqtt_url.clone(),
            client_prefix: format!("{}-device", self.name),
            topic_prefix: format!("{}/devices", self.name),
            devices: self.config.devices,
            events,
            rate,
            publishers: self.config.publishers,
            malformed_every: malformed_every(malformed),
        }
    }

    fn topics_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("TELEMETRY_KAFKA_BROKERS", self.kafka.brokers.clone()),
            ("TELEMETRY_RAW_TOPIC", self.kafka.raw_topic.clone()),
            ("TELEMETRY_CLEANED_TOPIC", self.kafka.cleaned_topic.clone()),
            ("TELEMETRY_DLQ_TOPIC", self.kafka.dlq_topic.clone()),
        ]
    }

    async fn start_bridge(&self) -> Result<Service> {
        let mut environment = self.topics_env();
        environment.extend([
            ("TELEMETRY_MQTT_URL", self.config.bench_mqtt_url.clone()),
            (
                "TELEMETRY_MQTT_TOPIC",
                format!("{}/devices/+/telemetry", self.name),
            ),
            ("TELEMETRY_MQTT_CLIENT_ID", format!("{}-bridge", self.name)),
            ("TELEMETRY_BRIDGE_ID", format!("{}-bridge", self.name)),
        ]);
        self.start("bridge", "TELEMETRY_BRIDGE_LISTEN", environment)
            .await
    }

    async fn start_audit(&self) -> Result<Service> {
        let mut environment = self.topics_env();
        environment.extend([
            ("TELEMETRY_MYSQL_URL", self.mysql_url.clone()),
            ("TELEMETRY_AUDIT_GROUP", format!("{}-audit", self.name)),
        ]);
        self.start("audit", "TELEMETRY_AUDIT_LISTEN", environment)
            .await
    }

    async fn start(
        &self,
        service: &'static str,
        listen_variable: &str,
        environment: Vec<(&'static str, String)>,
    ) -> Result<Service> {
        let extra: Vec<(String, String)> = self
            .config
            .service_env
            .iter()
            .filter_map(|setting| setting.split_once('='))
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        start(
            self.binary,
            service,
            listen_variable,
            environment,
            &extra,
            &self.name,
        )
        .await
    }

    /// Deletes the part's topics and database, unless `--keep`.
    async fn clean_up(&self) {
        if self.config.keep {
            return;
        }
        let kafka = &self.kafka;
        delete_topics(
            kafka,
            &[&kafka.raw_topic, &kafka.cleaned_topic, &kafka.dlq_topic],
        )
        .await;
        if let Err(error) = self.store.drop_database().await {
            tracing::warn!(%error, "Could not drop the bench database.");
        }
    }
}

/// Runs the pipeline under the configured load; returns what it measured.
pub(crate) async fn run(
    config: &BenchConfig,
    binary: &Path,
    id: &str,
    shutdown: &CancellationToken,
) -> Result<(PipelineResult, Vec<ServiceUsage>)> {
    let part = Part::new(config, binary, id.to_string()).await?;
    let audit = part.start_audit().await?;
    let bridge = part.start_bridge().await?;
    let mut services = vec![bridge, audit];
    let outcome = measure(&part, &services, shutdown).await;
    for service in &mut services {
        stop(service).await;
    }
    part.clean_up().await;
    outcome
}

/// The measured part: live-view clients, the load, the drain, then the figures.
async fn measure(
    part: &Part<'_>,
    services: &[Service],
    shutdown: &CancellationToken,
) -> Result<(PipelineResult, Vec<ServiceUsage>)> {
    let (config, store) = (part.config, &part.store);
    let bridge_address = services[0].address;
    let sent: SentAt = Arc::new(Mutex::new(std::collections::HashMap::new()));
    let stop_clients = CancellationToken::new();
    let mut clients = Vec::new();
    for index in 0..config.ws_clients {
        let url = format!("ws://{bridge_address}/ws");
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .map_err(|error| Error::Service(format!("WebSocket client {index}: {error}")))?;
        let measuring = (index == 0).then(|| sent.clone());
        clients.push(tokio::spawn(read_frames(
            socket,
            measuring,
            stop_clients.clone(),
        )));
    }

    let ticks = ticks_per_second();
    let cpu_before: Vec<f64> = services
        .iter()
        .map(|service| cpu_seconds(service.pid, ticks).unwrap_or(0.0))
        .collect();
    let load = part.load(config.events, config.rate, config.malformed);
    let started = Instant::now();
    let stop_sampler = CancellationToken::new();
    let sampler = tokio::spawn(sample_progress(
        services[0].address,
        services[1].address,
        config.events,
        started,
        stop_sampler.clone(),
    ));
    let burst = async {
        if config.burst == 0 {
            return Ok(0);
        }
        publish_burst(
            &config.bench_mqtt_url,
            &format!("{}-burst", part.name),
            &format!("{}/devices", part.name),
            config.burst,
            usize::try_from(config.burst_bytes).unwrap_or(usize::MAX),
            shutdown,
        )
        .await
    };
    let (published, burst) = tokio::join!(publish(&load, Some(sent.clone()), shutdown), burst);
    let mut published = published?;
    let burst = burst?;
    published.malformed += burst;

    // Drain: every valid event a row, every malformed one in the DLQ index.
    let deadline = Instant::now() + Duration::from_secs(config.drain_timeout_seconds);
    // Watched on the audit's `/metrics`, and counted in the database only once it says done: a
    // `COUNT(*)` every 100 ms took MariaDB's time from the writes being measured.
    loop {
        #[allow(clippy::cast_precision_loss)]
        let maybe_done = decided(services[1].address)
            .await
            .is_none_or(|decided| decided >= (published.valid + published.malformed) as f64);
        if maybe_done {
            let rows = store.count_events().await?;
            let dead = store.count_dead_letters().await?;
            if rows >= published.valid && dead >= published.malformed {
                break;
            }
        }
        if Instant::now() > deadline || shutdown.is_cancelled() {
            let rows = store.count_events().await?;
            let dead = store.count_dead_letters().await?;
            tracing::warn!(rows, dead, "The pipeline did not drain in time.");
            break;
        }
        tokio::time::sleep(PROGRESS_INTERVAL).await;
    }
    // Where the audit service's time went: its database writes, and its batches.
    let audit = services[1].address;
    let audit_metrics = http_get(audit, "/metrics").await.map(|(_, body)| body);
    let audit_db_write_seconds = audit_metrics
        .as_deref()
        .and_then(|text| DB_WRITE_DURATION.total_in(text, &[AUDIT]));
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let audit_batches = audit_metrics
        .as_deref()
        .and_then(|text| AUDIT_BATCH_RECORDS.count_in(text, &[AUDIT]))
        .map(|count| count as u64);
    let usage: Vec<ServiceUsage> = services
        .iter()
        .zip(cpu_before)
        .map(|(service, before)| {
            let cpu = cpu_seconds(service.pid, ticks).unwrap_or(before) - before;
            #[allow(clippy::cast_precision_loss)]
            let per_event = cpu * 1e6 / (published.valid + published.malformed).max(1) as f64;
            ServiceUsage {
                service: service.name.to_string(),
                cpu_seconds: cpu,
                cpu_us_per_event: per_event,
                peak_rss_mb: peak_rss_mb(service.pid).unwrap_or(0.0),
            }
        })
        .collect();
    stop_clients.cancel();
    stop_sampler.cancel();
    let stages = sampler.await.unwrap_or_default();
    // The measuring client is the first; the others only keep the bridge busy.
    let mut frame_latencies = Vec::new();
    let mut frames_received = 0;
    for (index, client) in clients.into_iter().enumerate() {
        if let Ok((frames, latencies)) = client.await {
            if index == 0 {
                frames_received = frames;
                frame_latencies = latencies;
            }
        }
    }

    let written = store.written_rows().await?;
    let (rows, distinct) = (written.rows, written.distinct_device_seq);
    let dead_letters = store.count_dead_letters().await?;
    let last_written_ms = written.last_written_us / 1_000;
    let row_latencies = store.write_delays_micros().await?;
    let span = Duration::from_millis(
        u64::try_from(last_written_ms - published.first_publish_ms).unwrap_or(0),
    );
    let result = PipelineResult {
        published: published.valid + published.malformed,
        valid: published.valid,
        malformed: published.malformed,
        burst,
        burst_bytes: config.burst_bytes,
        publish_seconds: published.seconds,
        publish_per_second: per_second(
            published.valid + published.malformed,
            Duration::from_secs_f64(published.seconds),
        ),
        rows,
        lost: published.valid.saturating_sub(distinct),
        duplicates: rows.saturating_sub(distinct),
        dead_letters,
        end_to_end_per_second: per_second(rows.min(published.valid), span),
        publish_to_row_ms: Percentiles::of_micros(row_latencies),
        publish_to_frame_ms: Percentiles::of_micros(frame_latencies),
        frames_received,
        ws_clients: config.ws_clients,
        bridge_produced_all_seconds: stages.bridge,
        audit_wrote_all_seconds: stages.audit,
        audit_db_write_seconds,
        audit_batches,
    };
    Ok((result, usage))
}

/// How often the bench reads the services' `/metrics` during a run. Each read renders every
/// metric; at 50 ms (and two reads of the audit's) that was 7% of the audit's CPU (perf).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// When each stage had passed on everything, in seconds from the first publish.
#[derive(Debug, Default)]
struct Stages {
    bridge: Option<f64>,
    audit: Option<f64>,
}

/// Polls the services' `/metrics` every [`PROGRESS_INTERVAL`]: when the bridge had produced every
/// message to the raw topic, and when the audit service had decided every record. What tells which
/// stage holds the pipeline back.
async fn sample_progress(
    bridge: SocketAddr,
    audit: SocketAddr,
    events: u64,
    started: Instant,
    stop: CancellationToken,
) -> Stages {
    let mut stages = Stages::default();
    let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
    loop {
        // Stopped once the last row is in: one more sample, in case it came within the interval.
        let last = tokio::select! {
            () = stop.cancelled() => true,
            _ = ticker.tick() => false,
        };
        if stages.bridge.is_none() {
            let produced = metric(bridge, &RECORDS_PRODUCED, &[BRIDGE, RAW]).await;
            if produced.is_some_and(|produced| produced >= events) {
                stages.bridge = Some(started.elapsed().as_secs_f64());
            }
        }
        if stages.audit.is_none() {
            // Written rows plus records sent to the DLQ: everything the audit service decided.
            #[allow(clippy::cast_precision_loss)]
            if decided(audit)
                .await
                .is_some_and(|decided| decided >= events as f64)
            {
                stages.audit = Some(started.elapsed().as_secs_f64());
            }
        }
        if last || (stages.bridge.is_some() && stages.audit.is_some()) {
            return stages;
        }
    }
}

/// The `service` label of the bridge's and the audit service's series, and the raw topic's role.
const BRIDGE: (&str, &str) = ("service", "bridge");
const AUDIT: (&str, &str) = ("service", "audit");
const RAW: (&str, &str) = ("topic", "raw");

/// A counter's series carrying every label of `labels`, summed, in a service's `/metrics`.
async fn metric(address: SocketAddr, metric: &Metric, labels: &[(&str, &str)]) -> Option<u64> {
    let (_, body) = http_get(address, "/metrics").await?;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    metric.total_in(&body, labels).map(|value| value as u64)
}

/// What the audit service has decided so far, from its `/metrics`: rows written (a record
/// written again counts again) plus records rejected. `None` if it did not answer.
async fn decided(audit: SocketAddr) -> Option<f64> {
    let (_, body) = http_get(audit, "/metrics").await?;
    Some(
        [EVENTS_WRITTEN, EVENTS_REJECTED]
            .iter()
            .filter_map(|metric| metric.total_in(&body, &[AUDIT]))
            .sum(),
    )
}

/// Reads frames until stopped; the measuring client (with `sent`) also returns the latency, in
/// microseconds, of every frame whose event was sampled.
async fn read_frames(
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    sent: Option<SentAt>,
    stop: CancellationToken,
) -> (u64, Vec<i64>) {
    let (_write, mut read) = socket.split();
    let mut frames = 0;
    let mut latencies = Vec::new();
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => break,
            message = read.next() => message,
        };
        let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) = message else {
            if message.is_none() {
                break;
            }
            continue;
        };
        frames += 1;
        let Some(sent) = &sent else { continue };
        let arrived = Instant::now();
        let Ok(frame) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let device = frame["device_id"]
            .as_str()
            .and_then(|name| name.strip_prefix("bench-"))
            .and_then(|index| index.parse::<u32>().ok());
        let seq = frame["payload"]["seq"].as_u64();
        let (Some(device), Some(seq)) = (device, seq) else {
            continue;
        };
        if seq % 10 != 0 {
            continue;
        }
        let published = sent
            .lock()
            .ok()
            .and_then(|mut map| map.remove(&(device, seq)));
        if let Some(published) = published {
            latencies.push(
                i64::try_from(arrived.duration_since(published).as_micros()).unwrap_or(i64::MAX),
            );
        }
    }
    (frames, latencies)
}

/// Starts `telemetry <name>` with the run's settings (and none of the caller's `TELEMETRY_*`
/// variables) on a free port, and waits until its `/readyz` answers 200.
async fn start(
    binary: &Path,
    name: &'static str,
    listen_variable: &str,
    environment: Vec<(&str, String)>,
    extra: &[(String, String)],
    id: &str,
) -> Result<Service> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map_err(|source| Error::Io {
            what: String::from("finding a free port"),
            source,
        })?
        .port();
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let log_path = std::env::temp_dir().join(format!("{id}-{name}.log"));
    let log = std::fs::File::create(&log_path).map_err(|source| Error::Io {
        what: format!("creating {}", log_path.display()),
        source,
    })?;
    let log_err = log.try_clone().map_err(|source| Error::Io {
        what: format!("opening {}", log_path.display()),
        source,
    })?;
    let mut command = tokio::process::Command::new(binary);
    command.arg(name);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TELEMETRY_") {
            command.env_remove(key);
        }
    }
    command
        .envs(environment)
        .envs(
            extra
                .iter()
                .map(|(key, value)| (key.as_str(), value.as_str())),
        )
        .env(listen_variable, address.to_string())
        .env("RUST_LOG", "warn")
        .stdout(log)
        .stderr(log_err)
        .kill_on_drop(true);
    let child = command.spawn().map_err(|source| Error::Io {
        what: format!("starting {} {name}", binary.display()),
        source,
    })?;
    let pid = child.id().unwrap_or(0);
    let mut service = Service {
        name,
        child,
        pid,
        address,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_status(address, "/readyz").await != Some(200) {
        if Instant::now() > deadline {
            stop(&mut service).await;
            return Err(Error::Service(format!(
                "the {name} did not become ready within 60 s; see {}",
                log_path.display()
            )));
        }
        if let Ok(Some(status)) = service.child.try_wait() {
            return Err(Error::Service(format!(
                "the {name} exited ({status}); see {}",
                log_path.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(service)
}

/// SIGTERM, then up to 30 s for a clean stop, then SIGKILL.
async fn stop(service: &mut Service) {
    let _ = tokio::process::Command::new("kill")
        .args(["-TERM", &service.pid.to_string()])
        .status()
        .await;
    if tokio::time::timeout(Duration::from_secs(30), service.child.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            service = service.name,
            "Did not stop within 30 s; killing it."
        );
        let _ = service.child.kill().await;
    }
}

/// The status code of `GET path`, or `None` when nothing answers.
async fn http_status(address: SocketAddr, path: &str) -> Option<u16> {
    http_get(address, path).await.map(|(status, _)| status)
}

/// `GET path`: the status code and the body, or `None` when nothing answers.
async fn http_get(address: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())?;
    Some((status, body))
}

/// Deletes the run's topics; failures are logged, not fatal.
pub(crate) async fn delete_topics(kafka: &KafkaConfig, topics: &[&str]) {
    let admin: AdminClient<DefaultClientContext> = match kafka
        .client_config(&[])
        .and_then(|config| Ok(config.create()?))
    {
        Ok(admin) => admin,
        Err(error) => {
            tracing::warn!(%error, "Could not delete the bench topics.");
            return;
        }
    };
    if let Err(error) = admin.delete_topics(topics, &AdminOptions::new()).await {
        tracing::warn!(%error, "Could not delete the bench topics.");
    }
}

/// Each stage alone, with the same payloads: the bridge with no audit service running (MQTT in,
/// Kafka out, acknowledgements after Kafka confirmed), and the audit service over a raw topic
/// filled beforehand (Kafka in, rows and cleaned records out). What each stage can do when it
/// does not share the machine with the other.
pub(crate) async fn stages_alone(
    config: &BenchConfig,
    binary: &Path,
    id: &str,
    messages: u64,
    shutdown: &CancellationToken,
) -> Result<crate::StagesAlone> {
    let part = Part::new(config, binary, format!("{id}_stage")).await?;
    let outcome = stage_by_stage(&part, messages, shutdown).await;
    part.clean_up().await;
    outcome
}

async fn stage_by_stage(
    part: &Part<'_>,
    messages: u64,
    shutdown: &CancellationToken,
) -> Result<crate::StagesAlone> {
    // The bridge alone fills the raw topic: its rate is the bridge stage's.
    let mut bridge = part.start_bridge().await?;
    let started = Instant::now();
    let published = publish(&part.load(messages, 0, 0.0), None, shutdown).await;
    let deadline = Instant::now() + Duration::from_secs(part.config.drain_timeout_seconds);
    let mut bridge_seconds = None;
    while Instant::now() < deadline && !shutdown.is_cancelled() {
        let produced = metric(bridge.address, &RECORDS_PRODUCED, &[BRIDGE, RAW]).await;
        if produced.is_some_and(|produced| produced >= messages) {
            bridge_seconds = Some(started.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop(&mut bridge).await;
    published?;

    // The audit service alone over what the bridge produced: first row to last.
    let mut audit = part.start_audit().await?;
    let deadline = Instant::now() + Duration::from_secs(part.config.drain_timeout_seconds);
    // Watched on its `/metrics`: a `COUNT(*)` every 100 ms took MariaDB's time from the writes
    // being measured.
    while Instant::now() < deadline && !shutdown.is_cancelled() {
        let written = metric(audit.address, &EVENTS_WRITTEN, &[AUDIT]).await;
        if written.is_some_and(|written| written >= messages) {
            break;
        }
        tokio::time::sleep(PROGRESS_INTERVAL).await;
    }
    stop(&mut audit).await;
    let written = part.store.written_rows().await?;
    let rows = written.rows;
    let span_ms = (written.last_written_us - written.first_written_us) / 1_000;
    Ok(crate::StagesAlone {
        messages,
        bridge_per_second: bridge_seconds
            .map(|seconds| per_second(messages, Duration::from_secs_f64(seconds))),
        audit_per_second: (rows == messages && span_ms > 0).then(|| {
            per_second(
                rows,
                Duration::from_millis(u64::try_from(span_ms).unwrap_or(1)),
            )
        }),
    })
}
