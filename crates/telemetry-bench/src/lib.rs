//! `telemetry bench`: the load harness. It runs the real pipeline (the bridge and the audit
//! service as child processes of the `telemetry` binary, against the real Mosquitto, Kafka and
//! MariaDB), publishes simulated devices' events over MQTT QoS 1, and measures what a user would:
//! events per second end to end (publish to committed row), loss and duplicates, latency from
//! publish to WebSocket frame and to row, and the CPU and memory of each service. In the same run
//! it measures the infrastructure alone with the same payloads (Mosquitto publish to subscribe,
//! Kafka produce and consume, MariaDB batched inserts), so the pipeline is judged against the
//! machine's own limits rather than a number from another day.
//!
//! # Layout
//! - [`BenchConfig`]: every setting, with its flag.
//! - `baseline`: the infrastructure measured alone.
//! - `load`: the simulated fleet publishing over MQTT.
//! - `pipeline`: the services as child processes, the load, the live-view clients.
//! - `measure`: CPU and memory from `/proc`, percentiles.
//! - [`Report`]: what was measured, as JSON and as a table.

mod baseline;
mod load;
pub mod measure;
mod pipeline;

use std::path::PathBuf;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub use measure::Percentiles;

/// Errors that stop the bench.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is out of range.
    #[error("{0}")]
    Invalid(String),
    /// Kafka refused something.
    #[error(transparent)]
    Kafka(#[from] telemetry_kafka::Error),
    /// Kafka refused something (a client call).
    #[error("kafka: {0}")]
    KafkaClient(#[from] rdkafka::error::KafkaError),
    /// The database refused something.
    #[error(transparent)]
    Store(#[from] telemetry_store::Error),
    /// A query failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The MQTT connection failed.
    #[error("mqtt: {0}")]
    Mqtt(String),
    /// A service could not be started or did not become ready.
    #[error("{0}")]
    Service(String),
    /// Reading or writing a file, or starting a process, failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Stopped before the end.
    #[error("stopped before the end")]
    Stopped,
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Bench settings.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchConfig {
    /// Simulated devices.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub devices: u32,

    /// Events to publish, all devices together.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub events: u64,

    /// Target events per second, all devices together; 0: as fast as the broker takes them.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,

    /// Share (0 to 1) of the events sent malformed (not JSON), spread evenly.
    #[arg(long, default_value_t = 0.0)]
    pub malformed: f64,

    /// Large payloads published during the run on a connection of their own, as fast as the
    /// broker takes them, alongside the events (hostile input: each goes to the DLQ).
    #[arg(long, default_value_t = 0)]
    pub burst: u64,

    /// Bytes of each `--burst` payload (not JSON, not compressible).
    #[arg(long, default_value_t = 900_000,
          value_parser = clap::value_parser!(u64).range(1..=268_000_000))]
    pub burst_bytes: u64,

    /// MQTT connections publishing, each for a share of the devices.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub publishers: u32,

    /// Live-view WebSocket clients connected during the run; the first measures latency.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=20_000))]
    pub ws_clients: u32,

    /// Messages in each baseline (MQTT, Kafka produce and consume, MariaDB insert); 0 skips them.
    #[arg(long, default_value_t = 100_000)]
    pub baseline_events: u64,

    /// How long to wait for the last rows once everything is published, in seconds.
    #[arg(long, default_value_t = 300)]
    pub drain_timeout_seconds: u64,

    /// The `telemetry` binary the bridge and the audit service run from (default: this one).
    /// Measure a release build: `cargo build --release`.
    #[arg(long)]
    pub binary: Option<PathBuf>,

    /// The MQTT broker, as the services take it (`mqtt://[user:password@]host:port`). Default:
    /// the development broker with the tests' user of `scripts/services.sh`, which may use the
    /// bench's own topics.
    #[arg(
        long,
        default_value = "mqtt://telemetry-test:telemetry-test@127.0.0.1:1883",
        hide_default_value = true
    )]
    pub bench_mqtt_url: String,

    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub bench_kafka_brokers: String,

    /// The MySQL/MariaDB server, without a database: the bench makes `bench_<id>` and drops it at
    /// the end. Default: the tests' account of `scripts/services.sh`, which may do so on
    /// `bench_` and `test_` databases only.
    #[arg(
        long,
        default_value = "mysql://telemetry_test:telemetry-test@127.0.0.1:3306",
        hide_default_value = true
    )]
    pub bench_mysql_server: String,

    /// A setting for the bridge and the audit service, as their environment variable
    /// (`TELEMETRY_AUDIT_BATCH_SIZE=5000`); repeatable. Without any they run on their defaults.
    #[arg(long = "service-env", value_name = "KEY=VALUE")]
    pub service_env: Vec<String>,

    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Keep the bench's topics and database instead of deleting them at the end.
    #[arg(long)]
    pub keep: bool,
}

/// The infrastructure alone, in messages (rows) per second.
#[derive(Debug, Clone, Serialize)]
pub struct Baselines {
    /// Messages each baseline moved.
    pub messages: u64,
    /// Mosquitto, QoS 1: first publish to last message at a subscriber.
    pub mqtt_qos1_per_second: f64,
    /// Kafka: records produced (acks=all, our producer settings) until all acknowledged.
    pub kafka_produce_per_second: f64,
    /// Kafka: records read back by a consumer from the start of the topic.
    pub kafka_consume_per_second: f64,
    /// MariaDB: the same rows as the audit service writes, in multi-row INSERTs of 1,000 rows per
    /// transaction, on one connection (as the audit service writes).
    pub mysql_insert_rows_per_second: f64,
}

impl Baselines {
    /// The slowest of the four: the bound the pipeline cannot beat.
    pub fn slowest(&self) -> f64 {
        [
            self.mqtt_qos1_per_second,
            self.kafka_produce_per_second,
            self.kafka_consume_per_second,
            self.mysql_insert_rows_per_second,
        ]
        .into_iter()
        .fold(f64::INFINITY, f64::min)
    }
}

/// Each stage alone, in events per second.
#[derive(Debug, Clone, Serialize)]
pub struct StagesAlone {
    /// Messages each stage moved.
    pub messages: u64,
    /// The bridge with nothing else of ours running: first publish until it had produced every
    /// message to Kafka (it acknowledges to MQTT only after Kafka confirmed).
    pub bridge_per_second: Option<f64>,
    /// The audit service over a raw topic filled beforehand: first row written to last.
    pub audit_per_second: Option<f64>,
}

/// CPU and memory of one service over the loaded part of the run.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceUsage {
    /// `bridge` or `audit`.
    pub service: String,
    /// CPU time (user + system) spent while the load ran and drained, in seconds.
    pub cpu_seconds: f64,
    /// That CPU time per published event, in microseconds.
    pub cpu_us_per_event: f64,
    /// Peak resident memory over the whole life of the process (VmHWM), in MB.
    pub peak_rss_mb: f64,
}

/// The pipeline under load.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineResult {
    /// Events published (acknowledged by the broker, QoS 1).
    pub published: u64,
    /// Of those, valid ones (each must become one row).
    pub valid: u64,
    /// Of those, malformed ones (each must reach the DLQ), the burst's included.
    pub malformed: u64,
    /// Of the malformed ones, the large payloads of `--burst`.
    pub burst: u64,
    /// Bytes of each burst payload.
    pub burst_bytes: u64,
    /// Seconds from the first publish to the last broker acknowledgement.
    pub publish_seconds: f64,
    /// Events per second the publishers achieved.
    pub publish_per_second: f64,
    /// Rows in the table at the end.
    pub rows: u64,
    /// Valid events without a row.
    pub lost: u64,
    /// Rows beyond one per valid event.
    pub duplicates: u64,
    /// Records in the DLQ index at the end.
    pub dead_letters: u64,
    /// Valid events per second from the first publish to the last row committed.
    pub end_to_end_per_second: f64,
    /// Publish to row written (the row's `written_at`), in milliseconds.
    pub publish_to_row_ms: Percentiles,
    /// Publish to the live-view frame at the measuring WebSocket client, in milliseconds, over
    /// every tenth event of each device.
    pub publish_to_frame_ms: Percentiles,
    /// Frames the measuring client received.
    pub frames_received: u64,
    /// WebSocket clients connected during the run.
    pub ws_clients: u32,
    /// Seconds from the first publish until the bridge had produced every message to Kafka
    /// (from its `/metrics`, sampled every 100 ms).
    pub bridge_produced_all_seconds: Option<f64>,
    /// Seconds from the first publish until the audit service had decided every record (rows
    /// written plus records sent to the DLQ).
    pub audit_wrote_all_seconds: Option<f64>,
    /// Seconds the audit service spent in its database writes (its `db_write_duration_seconds`).
    pub audit_db_write_seconds: Option<f64>,
    /// Batches the audit service processed.
    pub audit_batches: Option<u64>,
}

/// Everything one bench run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// When it ran, RFC 3339 UTC.
    pub started_at: String,
    /// The machine: CPU model and cores, from `/proc/cpuinfo`.
    pub machine: String,
    /// The settings of the run.
    pub devices: u32,
    /// Target rate (0: as fast as possible).
    pub target_rate: u64,
    /// MQTT publishing connections.
    pub publishers: u32,
    /// Settings the services ran with beyond their defaults (`--service-env`).
    pub service_env: Vec<String>,
    /// The infrastructure alone, when measured.
    pub baselines: Option<Baselines>,
    /// Each stage alone, when the baselines are measured.
    pub stages_alone: Option<StagesAlone>,
    /// The bridge alone over Mosquitto's QoS 1 rate (the target is 90% or more).
    pub bridge_vs_mqtt_baseline: Option<f64>,
    /// The audit service alone over MariaDB's batched-insert rate (the target is 90% or more).
    pub audit_vs_mysql_baseline: Option<f64>,
    /// The pipeline.
    pub pipeline: PipelineResult,
    /// The bridge's and the audit service's CPU and memory.
    pub services: Vec<ServiceUsage>,
    /// End-to-end events per second over the slowest baseline.
    pub pipeline_vs_slowest_baseline: Option<f64>,
}

impl Report {
    /// Whether the run kept the promise: every valid event stored once, every malformed one in
    /// the DLQ.
    pub fn lossless(&self) -> bool {
        self.pipeline.lost == 0
            && self.pipeline.duplicates == 0
            && self.pipeline.dead_letters == self.pipeline.malformed
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pipeline = &self.pipeline;
        writeln!(
            f,
            "telemetry bench, {} on {}",
            self.started_at, self.machine
        )?;
        writeln!(
            f,
            "{} devices, {} publishers, target {}",
            self.devices,
            self.publishers,
            if self.target_rate == 0 {
                String::from("as fast as possible")
            } else {
                format!("{} events/s", self.target_rate)
            }
        )?;
        if !self.service_env.is_empty() {
            writeln!(f, "services with {}", self.service_env.join(" "))?;
        }
        if let Some(baselines) = &self.baselines {
            writeln!(f, "\nbaselines ({} messages each)", baselines.messages)?;
            writeln!(
                f,
                "  mosquitto QoS 1 publish->subscribe  {:>12.0} msg/s",
                baselines.mqtt_qos1_per_second
            )?;
            writeln!(
                f,
                "  kafka produce (acks=all)            {:>12.0} rec/s",
                baselines.kafka_produce_per_second
            )?;
            writeln!(
                f,
                "  kafka consume                       {:>12.0} rec/s",
                baselines.kafka_consume_per_second
            )?;
            writeln!(
                f,
                "  mariadb multi-row insert            {:>12.0} rows/s",
                baselines.mysql_insert_rows_per_second
            )?;
        }
        if let Some(stages) = &self.stages_alone {
            let rate = |value: Option<f64>| {
                value.map_or_else(|| String::from("-"), |value| format!("{value:.0}"))
            };
            let share = |value: Option<f64>| {
                value.map_or_else(String::new, |value| {
                    format!(" ({:.0} % of its baseline)", value * 100.0)
                })
            };
            writeln!(f, "\neach stage alone ({} messages)", stages.messages)?;
            writeln!(
                f,
                "  bridge (MQTT -> Kafka, acked)        {:>12} events/s{}",
                rate(stages.bridge_per_second),
                share(self.bridge_vs_mqtt_baseline)
            )?;
            writeln!(
                f,
                "  audit (Kafka -> rows + cleaned)     {:>12} events/s{}",
                rate(stages.audit_per_second),
                share(self.audit_vs_mysql_baseline)
            )?;
        }
        writeln!(f, "\npipeline")?;
        writeln!(
            f,
            "  published {} ({} valid, {} malformed) in {:.2} s: {:.0} events/s",
            pipeline.published,
            pipeline.valid,
            pipeline.malformed,
            pipeline.publish_seconds,
            pipeline.publish_per_second
        )?;
        if pipeline.burst > 0 {
            writeln!(
                f,
                "  of the malformed, a burst of {} payloads of {} bytes",
                pipeline.burst, pipeline.burst_bytes
            )?;
        }
        writeln!(
            f,
            "  end to end (publish -> row committed) {:>10.0} events/s",
            pipeline.end_to_end_per_second
        )?;
        if let Some(ratio) = self.pipeline_vs_slowest_baseline {
            writeln!(
                f,
                "  of the slowest baseline              {:>10.1} %",
                ratio * 100.0
            )?;
        }
        let seconds = |value: Option<f64>| {
            value.map_or_else(|| String::from("-"), |value| format!("{value:.2} s"))
        };
        writeln!(
            f,
            "  everything produced by the bridge after {}, decided by the audit after {}",
            seconds(pipeline.bridge_produced_all_seconds),
            seconds(pipeline.audit_wrote_all_seconds)
        )?;
        if let (Some(seconds), Some(batches)) =
            (pipeline.audit_db_write_seconds, pipeline.audit_batches)
        {
            writeln!(
                f,
                "  the audit wrote {batches} batches, {seconds:.2} s in database writes"
            )?;
        }
        writeln!(
            f,
            "  rows {}, lost {}, duplicates {}, DLQ {}",
            pipeline.rows, pipeline.lost, pipeline.duplicates, pipeline.dead_letters
        )?;
        writeln!(f, "  latency, ms          p50      p95      p99      max")?;
        for (name, percentiles) in [
            ("publish -> row  ", &pipeline.publish_to_row_ms),
            ("publish -> frame", &pipeline.publish_to_frame_ms),
        ] {
            if percentiles.samples == 0 {
                writeln!(
                    f,
                    "  {name}        -        -        -        -  (no samples)"
                )?;
                continue;
            }
            writeln!(
                f,
                "  {name} {:>8.2} {:>8.2} {:>8.2} {:>8.2}  ({} samples)",
                percentiles.p50,
                percentiles.p95,
                percentiles.p99,
                percentiles.max,
                percentiles.samples
            )?;
        }
        writeln!(
            f,
            "  WebSocket clients {}, frames at the measuring one {}",
            pipeline.ws_clients, pipeline.frames_received
        )?;
        writeln!(f, "\nservices          CPU s   µs/event   peak RSS MB")?;
        for usage in &self.services {
            writeln!(
                f,
                "  {:<8} {:>10.2} {:>10.2} {:>13.1}",
                usage.service, usage.cpu_seconds, usage.cpu_us_per_event, usage.peak_rss_mb
            )?;
        }
        Ok(())
    }
}

/// Runs the baselines, then the pipeline under load, and reports. The bench's topics and
/// database are its own (`bench_<id>`), deleted at the end unless `keep`.
pub async fn run(config: BenchConfig, shutdown: CancellationToken) -> Result<Report> {
    if let Some(bad) = config.service_env.iter().find(|setting| {
        !setting
            .split_once('=')
            .is_some_and(|(key, _)| key.starts_with("TELEMETRY_"))
    }) {
        return Err(Error::Invalid(format!(
            "--service-env `{bad}` is not TELEMETRY_...=value"
        )));
    }
    if !(0.0..=1.0).contains(&config.malformed) {
        return Err(Error::Invalid(format!(
            "--malformed is {}, must be from 0 to 1",
            config.malformed
        )));
    }
    let binary = match &config.binary {
        Some(binary) => binary.clone(),
        None => std::env::current_exe().map_err(|source| Error::Io {
            what: String::from("finding the telemetry binary"),
            source,
        })?,
    };
    let id = format!("bench_{}", rand::random::<u32>() % 1_000_000_000);
    let started_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let machine = measure::machine();
    let baselines = if config.baseline_events > 0 {
        tracing::info!(
            messages = config.baseline_events,
            "Measuring the infrastructure alone."
        );
        Some(baseline::measure(&config, &id, &shutdown).await?)
    } else {
        None
    };
    let stages_alone = if config.baseline_events > 0 {
        tracing::info!(
            messages = config.baseline_events,
            "Measuring each stage alone."
        );
        Some(
            pipeline::stages_alone(&config, &binary, &id, config.baseline_events, &shutdown)
                .await?,
        )
    } else {
        None
    };
    let ratio = |stage: Option<f64>, baseline: Option<f64>| match (stage, baseline) {
        (Some(stage), Some(baseline)) if baseline > 0.0 => Some(stage / baseline),
        _ => None,
    };
    let bridge_vs_mqtt_baseline = ratio(
        stages_alone
            .as_ref()
            .and_then(|stages| stages.bridge_per_second),
        baselines
            .as_ref()
            .map(|baselines| baselines.mqtt_qos1_per_second),
    );
    let audit_vs_mysql_baseline = ratio(
        stages_alone
            .as_ref()
            .and_then(|stages| stages.audit_per_second),
        baselines
            .as_ref()
            .map(|baselines| baselines.mysql_insert_rows_per_second),
    );
    tracing::info!(events = config.events, "Running the pipeline under load.");
    let (pipeline, services) = pipeline::run(&config, &binary, &id, &shutdown).await?;
    let pipeline_vs_slowest_baseline = baselines
        .as_ref()
        .map(|baselines| pipeline.end_to_end_per_second / baselines.slowest());
    let report = Report {
        started_at,
        machine,
        devices: config.devices,
        target_rate: config.rate,
        publishers: config.publishers,
        service_env: config.service_env.clone(),
        baselines,
        stages_alone,
        bridge_vs_mqtt_baseline,
        audit_vs_mysql_baseline,
        pipeline,
        services,
        pipeline_vs_slowest_baseline,
    };
    if let Some(path) = &config.json {
        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
        std::fs::write(path, text).map_err(|source| Error::Io {
            what: format!("writing {}", path.display()),
            source,
        })?;
    }
    Ok(report)
}

/// The payload of event `seq` of device `device`, as a Pico W sends it; `None` for a malformed
/// one. Every payload is about the same size (~150 bytes).
pub(crate) fn payload(device: &str, seq: u64, device_ts: i64, malformed: bool) -> Vec<u8> {
    if malformed {
        return format!("temperature={}.5;device={device};seq={seq}", 20 + seq % 10).into_bytes();
    }
    #[allow(clippy::cast_precision_loss)]
    let temperature = 18.0 + (seq % 100) as f64 / 10.0;
    format!(
        r#"{{"device_id":"{device}","device_ts":{device_ts},"seq":{seq},"temperature":{temperature:.1},"humidity":{:.1},"battery_v":3.71,"firmware":"1.4.2"}}"#,
        40.0 + temperature / 2.0
    )
    .into_bytes()
}

/// The id of device `index`: `bench-000042`.
pub(crate) fn device_name(index: u32) -> String {
    format!("bench-{index:06}")
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
