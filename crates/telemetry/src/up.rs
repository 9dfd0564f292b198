//! `telemetry up`: the whole pipeline in one process, on embedded defaults, for a machine with
//! nothing installed.
//!
//! Starts an MQTT broker (rumqttd, in-process), a Kafka-protocol broker (nisshi, a child process
//! with SQLite storage) and the SQLite store, then the bridge, the audit service, the rollup, the
//! alerter, the API and dashboard and, with `--simulate N`, N simulated devices; every piece talks
//! the real protocol over 127.0.0.1, as in production. `--mqtt-url`, `--kafka-brokers` and
//! `--mysql-url` replace an embedded piece with the real one. Ctrl-C stops the devices, then the
//! bridge, the audit service (each finishing its work in flight), the rollup and the alerter, the
//! API, and last the Kafka broker.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use telemetry_embedded::ports::{self, Ports};
use telemetry_metrics::Progress;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// `telemetry up` settings. Only these flags: the services' other settings come from the
/// environment or the configuration file, as for the separate services.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Simulated devices publishing telemetry (with a few malformed and duplicate messages, as
    /// real fleets send); 0 for none.
    #[arg(long, default_value_t = 5)]
    simulate: u32,

    /// Messages per second of all simulated devices together [default: one per device per
    /// second].
    #[arg(long)]
    simulate_rate: Option<f64>,

    /// Where the embedded pieces keep their data across restarts: `kafka/` (the Kafka log),
    /// `telemetry.db` (the SQLite store) and `alerts.toml` (the alert rules, when
    /// TELEMETRY_ALERT_RULES names no file that exists).
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,

    /// First of the seven ports `up` listens on (127.0.0.1): MQTT, Kafka, dashboard and API,
    /// bridge (live view), then the health and metrics of the audit service, the rollup and the
    /// alerter.
    #[arg(long, default_value_t = ports::DEFAULT_BASE, value_parser = clap::value_parser!(u16).range(1..))]
    port_base: u16,

    /// Use this MQTT broker instead of the embedded one (`mqtt://host:port`).
    #[arg(long = "mqtt-url")]
    mqtt_url: Option<String>,

    /// Use these Kafka brokers instead of the embedded one (`host:port,...`).
    #[arg(long = "kafka-brokers")]
    kafka_brokers: Option<String>,

    /// Use this MySQL/MariaDB database instead of the embedded SQLite store.
    #[arg(long = "mysql-url")]
    mysql_url: Option<String>,

    /// Seconds between status lines.
    #[arg(long, default_value_t = 2)]
    status_every_seconds: u64,

    /// Measure `up` instead of running it: the simulated devices (--simulate, at
    /// --simulate-rate) publish for this many seconds, then `up` waits until the audit service
    /// has written everything the bridge took, prints the rate end to end and the CPU time per
    /// event of its own process and of the embedded Kafka broker, and stops.
    #[arg(long, value_name = "SECONDS")]
    bench_seconds: Option<f64>,
}

/// Consumer group of the audit service under `up`.
const GROUP_ID: &str = "telemetry-up-audit";
/// Consumer group of the rollup under `up`.
const ROLLUP_GROUP_ID: &str = "telemetry-up-rollup";
/// Consumer group of the alerter under `up`.
const ALERT_GROUP_ID: &str = "telemetry-up-alert";

/// The alert rules `up` starts with when no rules file is given: the shipped example.
const DEFAULT_ALERT_RULES: &str = include_str!("../../../config/alerts.toml");

/// Runs everything until `shutdown`, then stops it in order.
pub async fn run(args: UpArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    if let Some(seconds) = args.bench_seconds {
        anyhow::ensure!(
            seconds.is_finite() && seconds > 0.0 && args.simulate > 0,
            "--bench-seconds needs a positive number of seconds and simulated devices (--simulate N)"
        );
    }
    let ports = Ports::from_base(args.port_base).with_context(|| {
        format!(
            "--port-base {} leaves no room for the seven ports from it",
            args.port_base
        )
    })?;
    let mut external = Vec::new();
    if args.mqtt_url.is_some() {
        external.push(ports::ROLE_MQTT);
    }
    if args.kafka_brokers.is_some() {
        external.push(ports::ROLE_KAFKA);
    }
    ports.check_free(&external)?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot make the data directory {}", args.data_dir.display()))?;
    let data_dir = args
        .data_dir
        .canonicalize()
        .with_context(|| format!("cannot read the data directory {}", args.data_dir.display()))?;
    // One `up` per data directory: two would share one Kafka log and one SQLite file.
    let _lock = lock_data_dir(&data_dir)?;

    // The infrastructure: each embedded piece unless a real one is given.
    // Devices' URL, the bridge's, and the embedded broker (see `telemetry_embedded::mqtt`: the
    // bridge reaches it directly, devices only while the bridge is subscribed).
    let (mqtt_url, bridge_mqtt_url, mut embedded_mqtt, mqtt_kind) = match &args.mqtt_url {
        Some(url) => (url.clone(), url.clone(), None, "given"),
        None => {
            let address = std::net::SocketAddr::from(([127, 0, 0, 1], ports.mqtt));
            // The broker takes packets as large as the bridge reads whole: one setting.
            let limits: telemetry_bridge::BridgeLimits = parse()?;
            let mqtt =
                telemetry_embedded::mqtt::start(address, limits.mqtt_max_packet_bytes).await?;
            (
                format!("mqtt://{}", mqtt.device_address()),
                format!("mqtt://{}", mqtt.broker_address()),
                Some(mqtt),
                "embedded rumqttd",
            )
        }
    };
    let (mut kafka, kafka_brokers, kafka_kind) = match &args.kafka_brokers {
        Some(brokers) => (None, brokers.clone(), "given"),
        None => {
            // Ctrl-C while the broker starts: dropping the start kills the child.
            let kafka = tokio::select! {
                kafka = start_kafka(&data_dir, ports.kafka) => kafka?,
                () = shutdown.cancelled() => return Ok(()),
            };
            let brokers = kafka.bootstrap();
            (Some(kafka), brokers, "embedded nisshi")
        }
    };
    let (store_url, store_kind) = match &args.mysql_url {
        Some(url) => (url.clone(), "MySQL (given)"),
        None => (
            format!("sqlite://{}", data_dir.join("telemetry.db").display()),
            "SQLite",
        ),
    };

    // A given MQTT URL may carry a password: the summary names its origin only.
    let summary = format!(
        "MQTT {} ({mqtt_kind}) · Kafka {kafka_brokers} ({kafka_kind}) · store {store_kind}",
        telemetry_secrets::redact_url(&mqtt_url)
    );
    let result = run_services(
        &args,
        &ports,
        Endpoints {
            mqtt_url: &mqtt_url,
            bridge_mqtt_url: &bridge_mqtt_url,
            kafka_brokers: &kafka_brokers,
            store_url: &store_url,
            data_dir: &data_dir,
        },
        summary,
        Infrastructure {
            kafka: &mut kafka,
            mqtt: &mut embedded_mqtt,
        },
        &shutdown,
    )
    .await;

    if let Some(kafka) = kafka {
        stop_kafka(kafka).await;
    }
    result
}

/// The alert rules file `up` gives the alerter: `configured` (TELEMETRY_ALERT_RULES) when the
/// user named one (a missing one then stops the alerter with its name) or when the default
/// `config/alerts.toml` exists; otherwise `<data_dir>/alerts.toml`, written from the shipped
/// example the first time, for the user to edit.
fn alert_rules(configured: &Path, data_dir: &Path) -> anyhow::Result<PathBuf> {
    if configured != Path::new(telemetry_alert::DEFAULT_RULES) || configured.is_file() {
        return Ok(configured.to_path_buf());
    }
    let own = data_dir.join("alerts.toml");
    if !own.exists() {
        std::fs::write(&own, DEFAULT_ALERT_RULES)
            .with_context(|| format!("cannot write the alert rules {}", own.display()))?;
    }
    Ok(own)
}

/// Holds an exclusive lock on `<data_dir>/up.lock` while `up` runs (released when the process
/// ends, however it ends).
fn lock_data_dir(data_dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = data_dir.join("up.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another `telemetry up` is using the data directory {}: stop it, or give this one another --data-dir",
            data_dir.display()
        ),
        Err(std::fs::TryLockError::Error(error)) => {
            Err(error).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

#[cfg(feature = "embedded-kafka")]
type Kafka = telemetry_embedded::kafka::EmbeddedKafka;

#[cfg(feature = "embedded-kafka")]
async fn start_kafka(data_dir: &Path, port: u16) -> anyhow::Result<Kafka> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let settings = telemetry_embedded::kafka::BrokerSettings {
        data_dir: data_dir.join("kafka"),
        port,
    };
    Ok(telemetry_embedded::kafka::EmbeddedKafka::start(&exe, settings).await?)
}

#[cfg(feature = "embedded-kafka")]
async fn stop_kafka(kafka: Kafka) {
    if !kafka.stop().await {
        tracing::warn!("The embedded Kafka broker did not stop cleanly.");
    }
}

/// Without the embedded broker (built with `--no-default-features`).
#[cfg(not(feature = "embedded-kafka"))]
struct Kafka;

#[cfg(not(feature = "embedded-kafka"))]
impl Kafka {
    fn bootstrap(&self) -> String {
        String::new()
    }

    fn is_running(&mut self) -> bool {
        true
    }

    fn log_path(&self) -> PathBuf {
        PathBuf::new()
    }

    fn pid(&self) -> Option<u32> {
        None
    }
}

#[cfg(not(feature = "embedded-kafka"))]
async fn start_kafka(_data_dir: &Path, _port: u16) -> anyhow::Result<Kafka> {
    anyhow::bail!(
        "this build has no embedded Kafka broker (cargo feature `embedded-kafka`): give --kafka-brokers"
    )
}

#[cfg(not(feature = "embedded-kafka"))]
async fn stop_kafka(_kafka: Kafka) {}

/// A running service: its stop token and task, and what to wait for before stopping it.
struct Running {
    name: &'static str,
    drain: Drain,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

/// What a clean stop waits for (bounded) before stopping a service, so that it hands on what it
/// holds; whatever is left stays in Kafka for the next start. Read from the services' own
/// progress counts.
#[derive(Debug, Clone)]
enum Drain {
    /// Nothing.
    Nothing,
    /// The bridge (its progress): until its count of received messages has not moved for
    /// 600 ms (at most 5 s), so it has what the embedded broker, which keeps nothing on disk,
    /// still held.
    Received(Arc<Progress>),
    /// The audit service: until it has read as many records as the bridge produced in this run
    /// (at most 10 s).
    CaughtUp(Pipeline),
}

/// The progress of the bridge and the audit service.
#[derive(Debug, Clone)]
struct Pipeline {
    bridge: Arc<Progress>,
    audit: Arc<Progress>,
}

impl Drain {
    async fn wait(&self) {
        match self {
            Drain::Nothing => {}
            Drain::Received(bridge) => {
                settle(|| Progress::read(&bridge.received), Duration::from_secs(5)).await;
            }
            Drain::CaughtUp(pipeline) => {
                let produced = Progress::read(&pipeline.bridge.produced);
                let deadline = Instant::now() + Duration::from_secs(10);
                while Progress::read(&pipeline.audit.received) < produced
                    && Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

impl Running {
    fn spawn<F>(name: &'static str, drain: Drain, run: impl FnOnce(CancellationToken) -> F) -> Self
    where
        F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(stop.clone()));
        Running {
            name,
            drain,
            stop,
            task,
        }
    }

    /// For a service that ended by itself: why.
    async fn failure(self) -> anyhow::Error {
        let name = self.name;
        match self.stop().await {
            Err(error) => error.context(format!("the {name} stopped by itself")),
            Ok(()) => anyhow::anyhow!("the {name} stopped by itself, without an error"),
        }
    }

    /// Stops it and waits for it; its error, if it had one.
    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        match self.task.await {
            Ok(result) => result.with_context(|| format!("the {} failed", self.name)),
            Err(error) => Err(anyhow::anyhow!("the {} panicked: {error}", self.name)),
        }
    }
}

/// Where the services find the infrastructure.
struct Endpoints<'a> {
    /// Where devices (the simulator) connect.
    mqtt_url: &'a str,
    /// Where the bridge connects.
    bridge_mqtt_url: &'a str,
    kafka_brokers: &'a str,
    store_url: &'a str,
    /// The data directory (for the alert rules when none are given).
    data_dir: &'a Path,
}

/// The embedded pieces `up` started (`None`: a real one was given).
struct Infrastructure<'a> {
    kafka: &'a mut Option<Kafka>,
    mqtt: &'a mut Option<telemetry_embedded::mqtt::EmbeddedMqtt>,
}

async fn run_services(
    args: &UpArgs,
    ports: &Ports,
    endpoints: Endpoints<'_>,
    summary: String,
    infrastructure: Infrastructure<'_>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let Infrastructure { kafka, mqtt } = infrastructure;
    let Endpoints {
        mqtt_url,
        bridge_mqtt_url,
        kafka_brokers,
        store_url,
        data_dir,
    } = endpoints;
    // Each service's settings as its own subcommand reads them (the environment, the
    // configuration file), then what `up` decides set on the typed fields.
    let mut kafka_config: telemetry_kafka::KafkaConfig = parse()?;
    kafka_config.brokers = kafka_brokers.to_string();
    // Our topics are made before anything produces: a Kafka-protocol broker that auto-creates
    // topics (nisshi does, with 4 partitions) must not make them on first use.
    let names = [
        kafka_config.raw_topic.as_str(),
        kafka_config.cleaned_topic.as_str(),
        kafka_config.dlq_topic.as_str(),
    ];
    let topics = telemetry_kafka::ensure_topics(&kafka_config, &names);
    tokio::select! {
        created = topics => created
            .with_context(|| format!("cannot create the topics on Kafka at {kafka_brokers}"))?,
        () = shutdown.cancelled() => return Ok(()),
    }

    let local = |port: u16| format!("127.0.0.1:{port}");
    let bridge_address = local(ports.bridge);
    let mut bridge: telemetry_bridge::BridgeConfig = parse()?;
    bridge.kafka = kafka_config.clone();
    bridge.mqtt.mqtt_url = bridge_mqtt_url.to_string();
    bridge.listen = bridge_address.clone();
    // The dashboard's page comes from the API's address.
    bridge.ws_allowed_origins = vec![
        format!("http://127.0.0.1:{}", ports.api),
        format!("http://localhost:{}", ports.api),
    ];
    let mut audit: telemetry_audit::AuditConfig = parse()?;
    audit.kafka = kafka_config.clone();
    audit.database.mysql_url = store_url.to_string();
    audit.group_id = GROUP_ID.to_string();
    audit.listen = local(ports.audit);
    let mut rollup: telemetry_rollup::RollupConfig = parse()?;
    rollup.kafka = kafka_config.clone();
    rollup.database.mysql_url = store_url.to_string();
    rollup.group_id = ROLLUP_GROUP_ID.to_string();
    rollup.listen = local(ports.rollup);
    let mut alert: telemetry_alert::AlertConfig = parse()?;
    alert.kafka = kafka_config.clone();
    alert.database.mysql_url = store_url.to_string();
    alert.group_id = ALERT_GROUP_ID.to_string();
    alert.listen = local(ports.alert);
    alert.rules = alert_rules(&alert.rules, data_dir)?;
    let mut api: telemetry_api::ApiConfig = parse()?;
    api.mysql_url = Some(store_url.to_string());
    api.listen = local(ports.api);
    api.live_url = Some(format!("ws://{bridge_address}/ws"));
    let simulate = match args.simulate {
        0 => None,
        devices => {
            let rate = args.simulate_rate.unwrap_or(f64::from(devices));
            anyhow::ensure!(
                rate.is_finite() && rate > 0.0,
                "--simulate-rate must be a positive number of messages per second"
            );
            let mut simulate: telemetry_simulator::SimulateConfig = parse()?;
            simulate.mqtt.mqtt_url = mqtt_url.to_string();
            simulate.devices = devices;
            simulate.rate = rate;
            simulate.client_id = String::from("telemetry-up-simulator");
            simulate.duration_seconds = args.bench_seconds;
            Some(simulate)
        }
    };
    let api = telemetry_api::Api::bind(api).await?;
    let bridge = telemetry_bridge::Bridge::bind(bridge).await?;
    let pipeline = Pipeline {
        bridge: bridge.progress(),
        audit: Arc::default(),
    };

    let audit = Running::spawn("audit service", Drain::CaughtUp(pipeline.clone()), {
        let progress = pipeline.audit.clone();
        |stop| async move { Ok(telemetry_audit::run_with(audit, stop, progress).await?) }
    });
    let bridge = Running::spawn(
        "bridge",
        Drain::Received(pipeline.bridge.clone()),
        |stop| async move { Ok(bridge.run(stop).await?) },
    );
    let rollup = Running::spawn("rollup service", Drain::Nothing, |stop| async move {
        Ok(telemetry_rollup::run(rollup, stop).await?)
    });
    let alert = Running::spawn("alerter", Drain::Nothing, |stop| async move {
        Ok(telemetry_alert::run(alert, stop).await?)
    });
    let api = Running::spawn("API", Drain::Nothing, |stop| async move {
        Ok(api.run(stop).await?)
    });
    // In stopping order.
    let mut services = vec![bridge, audit, rollup, alert, api];

    // Devices start once the bridge has subscribed: the embedded broker keeps no session from an
    // earlier run, so it drops what is published before that, as any MQTT broker does with
    // messages nobody subscribed to.
    let mut ended = None;
    for (port, name) in [
        (ports.bridge, "bridge"),
        (ports.audit, "audit service"),
        (ports.rollup, "rollup service"),
        (ports.alert, "alerter"),
    ] {
        ended = wait_ready(port, name, &services, kafka, shutdown).await;
        if ended.is_some() {
            break;
        }
    }
    if ended.is_none() {
        // The bridge is subscribed: devices may publish.
        if let Some(mqtt) = mqtt.as_mut() {
            mqtt.open_to_devices();
        }
        let bench = args.bench_seconds.map(|_| Bench::start(kafka.as_ref()));
        if let Some(simulate) = simulate {
            services.insert(
                0,
                Running::spawn("simulator", Drain::Nothing, |stop| async move {
                    telemetry_simulator::run(simulate, stop).await?;
                    Ok(())
                }),
            );
        }
        println!("telemetry up: {summary}");
        println!("Dashboard: http://127.0.0.1:{}/", ports.api);
        match args.simulate {
            0 => println!("No simulated devices (--simulate N adds some)."),
            devices => println!("Simulating {devices} devices."),
        }
        println!("Ctrl-C stops everything.");
        ended = Some(match bench {
            Some(bench) => bench.run(&services, &pipeline, kafka, shutdown).await,
            None => {
                watch(
                    &services,
                    &pipeline,
                    kafka,
                    args.status_every_seconds,
                    shutdown,
                )
                .await
            }
        });
    }
    let failure = match ended {
        Some(Ended::Failed(index)) => Some(services.remove(index).failure().await),
        Some(Ended::KafkaExited(log)) => Some(anyhow::anyhow!(
            "the embedded Kafka broker exited; its log is {}",
            log.display()
        )),
        Some(Ended::NotReady(error)) => Some(error),
        Some(Ended::Signal) | None => None,
    };

    // In order: no new messages; the bridge hands what it holds to Kafka; the audit service
    // writes what it read; the rollup and the alerter (what they have not read stays in Kafka,
    // after the offsets they committed with their writes); then the API (see `Drain`).
    let mut errors = Vec::new();
    for service in services {
        if matches!(service.drain, Drain::Received(_)) {
            // Once the bridge stops, nothing would read what the embedded broker acknowledges:
            // devices are shut out first (they send again to the next `up`).
            if let Some(mqtt) = mqtt.as_mut() {
                mqtt.close_to_devices();
            }
        }
        if failure.is_none() {
            service.drain.wait().await;
        }
        if let Err(error) = service.stop().await {
            errors.push(error);
        }
    }
    if let Some(failure) = failure {
        return Err(failure);
    }
    match errors.into_iter().next() {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// Why `up` stops.
enum Ended {
    /// Ctrl-C or SIGTERM.
    Signal,
    /// The service at this index ended by itself.
    Failed(usize),
    /// The embedded Kafka broker's process ended; its log.
    KafkaExited(PathBuf),
    /// A service did not become ready.
    NotReady(anyhow::Error),
}

/// Whether a service or the Kafka broker ended by itself.
fn something_ended(services: &[Running], kafka: &mut Option<Kafka>) -> Option<Ended> {
    if let Some(index) = services
        .iter()
        .position(|service| service.task.is_finished())
    {
        return Some(Ended::Failed(index));
    }
    let kafka = kafka.as_mut()?;
    (!kafka.is_running()).then(|| Ended::KafkaExited(kafka.log_path()))
}

/// Waits until the service on `port` answers 200 on `/readyz`, at most 60 s; `None` once it does,
/// or why it will not: a signal, a service or the Kafka broker that ended, the time limit.
async fn wait_ready(
    port: u16,
    name: &str,
    services: &[Running],
    kafka: &mut Option<Kafka>,
    shutdown: &CancellationToken,
) -> Option<Ended> {
    let url = format!("http://127.0.0.1:{port}/readyz");
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
    {
        Ok(client) => client,
        Err(error) => {
            return Some(Ended::NotReady(anyhow::anyhow!(
                "cannot make an HTTP client: {error}"
            )))
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(response) = client.get(&url).send().await {
            if response.status().is_success() {
                return None;
            }
        }
        if let Some(ended) = something_ended(services, kafka) {
            return Some(ended);
        }
        if shutdown.is_cancelled() {
            return Some(Ended::Signal);
        }
        if Instant::now() > deadline {
            return Some(Ended::NotReady(anyhow::anyhow!(
                "the {name} was not ready within 60 s ({url})"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `--bench-seconds`: what `up` measures of itself while the simulated devices publish.
struct Bench {
    started: Instant,
    ticks: f64,
    /// This process and the embedded Kafka broker's, with their CPU seconds at the start.
    processes: Vec<(&'static str, u32, f64)>,
}

impl Bench {
    /// Starts measuring (just before the simulated devices start).
    fn start(kafka: Option<&Kafka>) -> Self {
        use telemetry_bench::measure::{cpu_seconds, ticks_per_second};
        let ticks = ticks_per_second();
        let mut processes = vec![(
            "up (every service, the MQTT broker and the simulated devices)",
            std::process::id(),
        )];
        if let Some(pid) = kafka.and_then(Kafka::pid) {
            processes.push(("embedded Kafka broker", pid));
        }
        let processes = processes
            .into_iter()
            .map(|(name, pid)| (name, pid, cpu_seconds(pid, ticks).unwrap_or(0.0)))
            .collect();
        Bench {
            started: Instant::now(),
            ticks,
            processes,
        }
    }

    /// Waits for the simulated devices (the first service) to finish, then for the audit service
    /// to have written or sent to the DLQ everything the bridge produced; prints the figures.
    async fn run(
        self,
        services: &[Running],
        pipeline: &Pipeline,
        kafka: &mut Option<Kafka>,
        shutdown: &CancellationToken,
    ) -> Ended {
        use telemetry_bench::measure::{cpu_seconds, peak_rss_mb};
        let (devices, others) = services.split_at(1);
        while !devices.iter().all(|device| device.task.is_finished()) {
            if let Some(ended) = self.interrupted(others, kafka, shutdown) {
                return ended;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let published = self.started.elapsed();
        settle(
            || Progress::read(&pipeline.bridge.received),
            Duration::from_secs(5),
        )
        .await;
        let taken = Progress::read(&pipeline.bridge.received);
        let done =
            || Progress::read(&pipeline.audit.written) + Progress::read(&pipeline.audit.rejected);
        let deadline = Instant::now() + Duration::from_secs(300);
        while done() < taken && Instant::now() < deadline {
            if let Some(ended) = self.interrupted(others, kafka, shutdown) {
                return ended;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let elapsed = self.started.elapsed().as_secs_f64();
        let (written, rejected) = (
            Progress::read(&pipeline.audit.written),
            Progress::read(&pipeline.audit.rejected),
        );
        #[allow(clippy::cast_precision_loss)]
        let events = taken as f64;
        println!(
            "bench: the bridge took {taken} events in {:.2} s; the audit service wrote {written} and sent {rejected} to the DLQ{}",
            published.as_secs_f64(),
            if written + rejected < taken { " (not all within 300 s)" } else { "" }
        );
        println!(
            "bench: end to end {:.0} events/s (first publish to last write, {elapsed:.2} s)",
            events / elapsed.max(0.001)
        );
        for (name, pid, before) in &self.processes {
            let used = cpu_seconds(*pid, self.ticks).map_or(0.0, |now| now - before);
            println!(
                "bench: {name}: {used:.2} CPU s, {:.1} µs per event, peak RSS {:.0} MB",
                used * 1e6 / events.max(1.0),
                peak_rss_mb(*pid).unwrap_or(0.0)
            );
        }
        Ended::Signal
    }

    /// Why the bench cannot go on: a signal, a service or the Kafka broker that ended.
    fn interrupted(
        &self,
        services: &[Running],
        kafka: &mut Option<Kafka>,
        shutdown: &CancellationToken,
    ) -> Option<Ended> {
        if shutdown.is_cancelled() {
            return Some(Ended::Signal);
        }
        // Indexes in `services` are one less than in the whole list (the devices come first).
        match something_ended(services, kafka) {
            Some(Ended::Failed(index)) => Some(Ended::Failed(index + 1)),
            other => other,
        }
    }
}

/// Waits until `value` has not changed for 600 ms, at most `limit`.
async fn settle(value: impl Fn() -> u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    let (mut last, mut steady) = (value(), 0);
    while steady < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = value();
        steady = if now == last { steady + 1 } else { 0 };
        last = now;
    }
}

/// Prints the status line until `shutdown`, or until a service or the Kafka broker ends by
/// itself.
async fn watch(
    services: &[Running],
    pipeline: &Pipeline,
    kafka: &mut Option<Kafka>,
    every_seconds: u64,
    shutdown: &CancellationToken,
) -> Ended {
    let every = Duration::from_secs(every_seconds.max(1));
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut last = (Instant::now(), 0);
    let mut check = tokio::time::interval(Duration::from_millis(250));
    let mut next_status = Instant::now() + every;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                if terminal {
                    println!();
                }
                return Ended::Signal;
            }
            _ = check.tick() => {}
        }
        if let Some(ended) = something_ended(services, kafka) {
            if terminal {
                println!();
            }
            return ended;
        }
        if Instant::now() < next_status {
            continue;
        }
        next_status += every;
        let received = Progress::read(&pipeline.bridge.received);
        let written = Progress::read(&pipeline.audit.written);
        let rejected = Progress::read(&pipeline.audit.rejected);
        let now = Instant::now();
        #[allow(clippy::cast_precision_loss)]
        let rate = received.saturating_sub(last.1) as f64
            / now.duration_since(last.0).as_secs_f64().max(0.001);
        last = (now, received);
        let line =
            format!("{rate:.1} events/s in · {written} rows written · {rejected} to the DLQ");
        if terminal {
            use std::io::Write as _;
            print!("\r\x1b[2K{line}");
            let _ = std::io::stdout().flush();
        } else {
            println!("{line}");
        }
    }
}

/// A service's settings as its own subcommand reads them with no flags: from the environment and
/// the configuration file, over the defaults. `up` then sets what it decides on the typed fields.
fn parse<T: clap::Args>() -> anyhow::Result<T> {
    #[derive(Parser)]
    struct Flags<T: clap::Args> {
        #[command(flatten)]
        inner: T,
    }
    Ok(Flags::<T>::try_parse_from(["telemetry-up"])
        .context("a setting from the environment or the configuration file is not valid")?
        .inner)
}
