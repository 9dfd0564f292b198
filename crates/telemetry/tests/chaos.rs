//! Chaos suite: the delivery promise under faults, with real processes.
//!
//! A stream of QoS 1 events is published over MQTT while the real `telemetry bridge` and
//! `telemetry audit` processes are killed with SIGKILL, and MariaDB and Apache Kafka are stopped
//! and started. Afterwards every event must be in the table exactly once, and the services must
//! have resumed by themselves.
//!
//! The suite runs its own Mosquitto, Kafka and MariaDB (`scripts/services.sh` with a state
//! directory and ports of its own), so stopping them disturbs neither other tests nor a pipeline
//! running on the default ports. Scenarios run one after another.
//!
//! Settings (environment): `TELEMETRY_CHAOS_EVENTS` events per scenario (default 20,000),
//! `TELEMETRY_CHAOS_RATE` publish rate per second (default 2,000), `TELEMETRY_CHAOS_OUTAGE_SECONDS`
//! how long MariaDB and Kafka stay down (default 30), `TELEMETRY_CHAOS_RECOVERY_SECONDS` how soon
//! after a stopped Kafka or MariaDB is back the table must hold every event (default 40, for the debug build this suite
//! runs, against a minute or more before the fix; release builds are measured against the 15 s
//! target with `TELEMETRY_CHAOS_BINARY`, docs/benchmarks.md),
//! `TELEMETRY_CHAOS_BINARY` another build of `telemetry` to run. Logs of the services are kept under
//! `<state dir>/chaos/logs` when a scenario fails, or always with `TELEMETRY_CHAOS_KEEP_LOGS=1`.
//! Arguments filter scenarios by name.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::json;
use telemetry_testkit::{eventually, http_get, publish_qos1_through_restarts, unique};
use tokio::process::{Child, Command};

/// The suite's own infrastructure: ports and state apart from the default services.
struct Infrastructure {
    state_dir: PathBuf,
    kafka_port: u16,
    mysql_port: u16,
    mqtt_port: u16,
}

impl Infrastructure {
    fn new() -> Self {
        let base = std::env::var("TELEMETRY_STATE_DIR")
            .unwrap_or_else(|_| "/var/lib/telemetry-pipeline".to_string());
        Infrastructure {
            state_dir: Path::new(&base).join("chaos"),
            kafka_port: 19092,
            mysql_port: 13306,
            mqtt_port: 11883,
        }
    }

    /// Runs `scripts/services.sh <command> <services...>` for this infrastructure.
    async fn services(&self, command: &str, services: &[&str]) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/services.sh");
        let status = Command::new("bash")
            .arg(script)
            .arg(command)
            .args(services)
            .env("TELEMETRY_STATE_DIR", &self.state_dir)
            .env("TELEMETRY_KAFKA_PORT", self.kafka_port.to_string())
            .env("TELEMETRY_MYSQL_PORT", self.mysql_port.to_string())
            .env("TELEMETRY_MQTT_PORT", self.mqtt_port.to_string())
            .status()
            .await
            .expect("run scripts/services.sh");
        assert!(
            status.success(),
            "scripts/services.sh {command} {services:?} failed"
        );
    }

    /// Starts the stopped Kafka broker; returns when it accepted a connection again (before the
    /// script's own checks and set-up end): when a client could first reach it.
    async fn start_kafka(&self) -> Instant {
        self.start_listening("kafka", self.kafka_port).await
    }

    /// Starts the stopped `service`, which listens on `port`; returns when it first accepted a
    /// connection.
    async fn start_listening(&self, service: &str, port: u16) -> Instant {
        let address = format!("127.0.0.1:{port}");
        let listening = async {
            loop {
                if tokio::net::TcpStream::connect(&address).await.is_ok() {
                    return Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let services = [service];
        let ((), back) = tokio::join!(self.services("start", &services), listening);
        back
    }

    fn kafka_brokers(&self) -> String {
        format!("127.0.0.1:{}", self.kafka_port)
    }

    fn mqtt_url(&self) -> String {
        let (user, password) = telemetry_testkit::MQTT_TEST_CREDENTIALS;
        format!("mqtt://{user}:{password}@127.0.0.1:{}", self.mqtt_port)
    }

    fn mysql_url(&self, database: &str) -> String {
        format!(
            "mysql://telemetry_test:telemetry-test@127.0.0.1:{}/{database}",
            self.mysql_port
        )
    }
}

/// One `telemetry` process that can be killed and started again with the same settings.
struct Service {
    name: String,
    /// Where it serves `/readyz`; each process has a port of its own.
    http_port: u16,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    starts: usize,
}

impl Service {
    fn new(name: &str, args: &[&str], mut env: Vec<(String, String)>, log_dir: &Path) -> Self {
        let http_port = telemetry_testkit::free_port();
        let listen = if args == ["bridge"] {
            "TELEMETRY_BRIDGE_LISTEN"
        } else {
            "TELEMETRY_AUDIT_LISTEN"
        };
        env.push((listen.to_string(), format!("127.0.0.1:{http_port}")));
        Service {
            name: name.to_string(),
            http_port,
            args: args.iter().map(ToString::to_string).collect(),
            env,
            log: log_dir.join(format!("{name}.log")),
            child: None,
            starts: 0,
        }
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let binary = std::env::var("TELEMETRY_CHAOS_BINARY")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_telemetry").to_string());
        let child = Command::new(binary)
            .args(&self.args)
            .envs(
                self.env
                    .iter()
                    .map(|(key, value)| (key.as_str(), value.as_str())),
            )
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.starts += 1;
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }

    /// Whether the process is still running (it must never have exited on its own).
    fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| child.try_wait().unwrap().is_none())
    }

    /// SIGTERM, then waits for a clean exit.
    async fn terminate(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id().unwrap().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(format!("{} exited with {status} on SIGTERM", self.name)),
            _ => Err(format!("{} did not stop within 30 s of SIGTERM", self.name)),
        }
    }

    /// Waits until the process answers 200 on `/readyz`.
    async fn wait_ready(&self) -> Result<(), String> {
        let address = format!("127.0.0.1:{}", self.http_port).parse().unwrap();
        let ready = eventually(Duration::from_secs(60), || async {
            matches!(http_get(address, "/readyz").await, Ok((200, _)))
        })
        .await;
        if ready {
            Ok(())
        } else {
            Err(format!(
                "{} did not become ready:\n{}",
                self.name,
                self.log_tail()
            ))
        }
    }

    /// After a Kafka outage the service said so once per client, not once per connection
    /// attempt: no ERROR line in its log, one "unreachable" and one "reachable again" line per
    /// Kafka client and outage (`outages`), and its `/metrics` counts the outages and shows the
    /// brokers reachable again.
    async fn check_outage_reports(&self, outages: usize) -> Result<(), String> {
        use telemetry_kafka::instruments::{KAFKA_BROKERS_REACHABLE, KAFKA_OUTAGES};
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let count = |needle: &str| text.lines().filter(|line| line.contains(needle)).count();
        let (errors, down, back) = (
            count(" ERROR "),
            count("Kafka is unreachable"),
            count("Kafka is reachable again"),
        );
        // The bridge has a producer; an audit instance a consumer and a producer.
        let clients = if self.name.starts_with("bridge") {
            1
        } else {
            2
        };
        let address = format!("127.0.0.1:{}", self.http_port).parse().unwrap();
        let metrics = http_get(address, "/metrics")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default();
        let counted = KAFKA_OUTAGES.total_in(&metrics, &[]).unwrap_or(0.0);
        let reachable = KAFKA_BROKERS_REACHABLE.total_in(&metrics, &[]);
        let expected = clients * outages;
        if errors == 0
            && (expected..=2 * expected).contains(&down)
            && back == down
            && counted == down as f64
            && reachable == Some(clients as f64)
        {
            Ok(())
        } else {
            Err(format!(
                "{}: {errors} ERROR lines, {down} \"unreachable\" and {back} \"reachable again\" lines (expected {expected} each), kafka_outages_total {counted}, kafka_brokers_reachable {reachable:?} (expected {clients})",
                self.name
            ))
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

/// Settings of the whole run.
struct Settings {
    events: usize,
    rate: u32,
    outage: Duration,
    /// How soon after a stopped Kafka broker or MariaDB listens again (or after the last
    /// publish, whichever is later) the table must hold every event.
    recovery: Duration,
}

impl Settings {
    fn from_env() -> Self {
        let number = |key: &str, default: u64| {
            std::env::var(key)
                .ok()
                .and_then(|value| value.parse().ok())
                .unwrap_or(default)
        };
        Settings {
            events: usize::try_from(number("TELEMETRY_CHAOS_EVENTS", 20_000)).unwrap(),
            rate: u32::try_from(number("TELEMETRY_CHAOS_RATE", 2_000)).unwrap(),
            outage: Duration::from_secs(number("TELEMETRY_CHAOS_OUTAGE_SECONDS", 30)),
            recovery: Duration::from_secs(number("TELEMETRY_CHAOS_RECOVERY_SECONDS", 40)),
        }
    }
}

const DEVICES: usize = 10;
/// Device time of the first event: two days ago, so that even 100,000 events a second apart stay
/// in the past (the contract rejects device time more than 5 minutes ahead).
fn base_ts() -> i64 {
    static BASE: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *BASE.get_or_init(|| (chrono::Utc::now().timestamp() - 2 * 86_400) * 1_000)
}

/// One scenario: a bridge, one or more audit instances, a publisher, and faults.
struct Run<'a> {
    infrastructure: &'a Infrastructure,
    settings: &'a Settings,
    database: String,
    bridge: Service,
    /// A second bridge sharing the first one's MQTT subscription (`TELEMETRY_MQTT_SHARE_GROUP`),
    /// in the scenarios that have one.
    partner: Option<Service>,
    audits: Vec<Service>,
    /// How many events the broker has acknowledged to the publisher so far.
    published: Arc<AtomicUsize>,
    log_dir: PathBuf,
    prefix: String,
    /// When a stopped dependency (Kafka, MariaDB) accepted connections again, for scenarios
    /// that stop one: the table must catch up within `TELEMETRY_CHAOS_RECOVERY_SECONDS` of this or of
    /// the last publish, whichever is later.
    back: Option<Instant>,
    /// How many times Kafka was stopped: each service must report each outage once.
    kafka_outages: usize,
    /// When the table first held every event, watched from the start (a scenario's own steps,
    /// such as the services script's set-up after a start, do not delay the reading).
    complete: Option<tokio::task::JoinHandle<Instant>>,
}

impl<'a> Run<'a> {
    fn new(
        infrastructure: &'a Infrastructure,
        settings: &'a Settings,
        audits: usize,
        shared: bool,
    ) -> Self {
        let id = unique("chaos");
        let log_dir = infrastructure.state_dir.join("logs").join(&id);
        std::fs::create_dir_all(&log_dir).unwrap();
        let database = format!("test_{id}");
        let common = vec![
            (
                "TELEMETRY_KAFKA_BROKERS".to_string(),
                infrastructure.kafka_brokers(),
            ),
            ("TELEMETRY_RAW_TOPIC".to_string(), format!("{id}.raw")),
            (
                "TELEMETRY_CLEANED_TOPIC".to_string(),
                format!("{id}.cleaned"),
            ),
            ("TELEMETRY_DLQ_TOPIC".to_string(), format!("{id}.dlq")),
        ];
        let mut bridge_env = common.clone();
        bridge_env.extend([
            ("TELEMETRY_MQTT_URL".to_string(), infrastructure.mqtt_url()),
            (
                "TELEMETRY_MQTT_TOPIC".to_string(),
                format!("{id}/devices/+/telemetry"),
            ),
        ]);
        let bridge_env = |name: &str| {
            let mut env = bridge_env.clone();
            env.push((
                "TELEMETRY_MQTT_CLIENT_ID".to_string(),
                format!("{id}-{name}"),
            ));
            env.push(("TELEMETRY_BRIDGE_ID".to_string(), format!("{id}-{name}")));
            if shared {
                env.push((
                    "TELEMETRY_MQTT_SHARE_GROUP".to_string(),
                    format!("{id}-bridges"),
                ));
            }
            env
        };
        let mut audit_env = common;
        audit_env.extend([
            (
                "TELEMETRY_MYSQL_URL".to_string(),
                infrastructure.mysql_url(&database),
            ),
            ("TELEMETRY_AUDIT_GROUP".to_string(), format!("{id}-audit")),
        ]);
        Run {
            infrastructure,
            settings,
            bridge: Service::new("bridge", &["bridge"], bridge_env("bridge"), &log_dir),
            partner: shared
                .then(|| Service::new("bridge-2", &["bridge"], bridge_env("bridge-2"), &log_dir)),
            audits: (0..audits)
                .map(|index| {
                    Service::new(
                        &format!("audit-{index}"),
                        &["audit"],
                        audit_env.clone(),
                        &log_dir,
                    )
                })
                .collect(),
            database,
            published: Arc::new(AtomicUsize::new(0)),
            log_dir,
            prefix: id,
            back: None,
            kafka_outages: 0,
            complete: None,
        }
    }

    /// Starts the services and waits until each is ready: the bridge holds its MQTT subscription
    /// (so the broker keeps the session from the first event on), every audit instance has its
    /// database.
    async fn start(&mut self) -> Result<(), String> {
        for audit in &mut self.audits {
            audit.start();
        }
        self.bridge.start();
        self.bridge.wait_ready().await?;
        if let Some(partner) = &mut self.partner {
            partner.start();
            partner.wait_ready().await?;
        }
        for audit in &self.audits {
            audit.wait_ready().await?;
        }
        Ok(())
    }

    /// A new run with `audits` audit instances, started, with its stream being published.
    async fn begin(
        infrastructure: &'a Infrastructure,
        settings: &'a Settings,
        audits: usize,
    ) -> Result<(Self, tokio::task::JoinHandle<Instant>), String> {
        Self::begin_with(infrastructure, settings, audits, false).await
    }

    /// As [`Run::begin`], with two bridges sharing the subscription when `shared`.
    async fn begin_with(
        infrastructure: &'a Infrastructure,
        settings: &'a Settings,
        audits: usize,
        shared: bool,
    ) -> Result<(Self, tokio::task::JoinHandle<Instant>), String> {
        let mut run = Run::new(infrastructure, settings, audits, shared);
        run.start().await?;
        let publisher = run.publish();
        run.complete = Some(run.watch_rows());
        Ok((run, publisher))
    }

    /// Publishes the stream in the background.
    fn publish(&self) -> tokio::task::JoinHandle<Instant> {
        let mut messages = Vec::with_capacity(self.settings.events);
        for seq in 0..self.settings.events / DEVICES {
            for device in 0..DEVICES {
                let topic = format!("{}/devices/dev-{device}/telemetry", self.prefix);
                let payload = json!({
                    "device_id": format!("dev-{device}"),
                    "device_ts": base_ts() + i64::try_from(seq).unwrap() * 1_000,
                    "seq": seq,
                    "temperature": 20.0 + (seq % 100) as f64 / 10.0,
                });
                messages.push((topic, payload.to_string().into_bytes()));
            }
        }
        let url = self.infrastructure.mqtt_url();
        let client_id = format!("{}-publisher", self.prefix);
        let rate = self.settings.rate;
        let published = self.published.clone();
        tokio::spawn(async move {
            publish_qos1_through_restarts(&url, &client_id, &messages, Some(rate), &published)
                .await;
            Instant::now()
        })
    }

    /// Counts the table's rows every 100 ms until it holds every event; resolves to when it did.
    fn watch_rows(&self) -> tokio::task::JoinHandle<Instant> {
        let pool =
            sqlx::MySqlPool::connect_lazy(&self.infrastructure.mysql_url(&self.database)).unwrap();
        let expected = i64::try_from(self.settings.events / DEVICES * DEVICES).unwrap();
        tokio::spawn(async move {
            while count(&pool, "SELECT COUNT(*) FROM telemetry").await < expected {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Instant::now()
        })
    }

    /// Waits until the publisher got `fraction` of the stream acknowledged, plus a random jitter.
    async fn wait_for_progress(&self, fraction: f64) {
        let jitter = rand::rng().random_range(-0.05..0.05);
        let target = ((fraction + jitter).clamp(0.0, 1.0) * self.settings.events as f64) as usize;
        while self.published.load(Ordering::Relaxed) < target {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// After the faults: every event in the table exactly once, every service still running and
    /// stopping cleanly.
    async fn verify(
        mut self,
        publisher: tokio::task::JoinHandle<Instant>,
    ) -> Result<String, String> {
        // When the broker acknowledged the last publish.
        let published_at = publisher
            .await
            .map_err(|error| format!("publisher failed: {error}"))?;
        let pool =
            sqlx::MySqlPool::connect_lazy(&self.infrastructure.mysql_url(&self.database)).unwrap();
        let expected = i64::try_from(self.settings.events / DEVICES * DEVICES).unwrap();
        // Generous: catch-up after a Kafka outage once took up to ~150 s (docs/architecture.md);
        // a lost event never arrives however long this waits.
        let watcher = self.complete.take().expect("the run was begun");
        let complete_at = tokio::time::timeout(Duration::from_secs(600), watcher)
            .await
            .ok()
            .and_then(Result::ok);
        let complete = complete_at.is_some();
        let complete_at = complete_at.unwrap_or_else(Instant::now);
        let waited = complete_at.saturating_duration_since(published_at);
        // From the broker's return when that came after the last publish.
        let recovered_in = self
            .back
            .filter(|back| *back > published_at)
            .map(|back| complete_at.saturating_duration_since(back));
        // A little longer, to catch anything arriving twice.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rows = count(&pool, "SELECT COUNT(*) FROM telemetry").await;
        let distinct = count(
            &pool,
            "SELECT COUNT(DISTINCT device_id, seq) FROM telemetry",
        )
        .await;
        let mut problems = Vec::new();
        if !complete || rows != expected || distinct != expected {
            problems.push(format!(
                "expected {expected} rows, one per event; found {rows} rows, {distinct} distinct events"
            ));
        }
        let caught_up = recovered_in.unwrap_or(waited);
        if self.back.is_some() && caught_up > self.settings.recovery {
            problems.push(format!(
                "the table caught up {:.1} s after the stopped service was back or the last publish (target: {} s)",
                caught_up.as_secs_f64(),
                self.settings.recovery.as_secs()
            ));
        }
        if self.kafka_outages > 0 {
            for service in self
                .audits
                .iter()
                .chain([&self.bridge])
                .chain(&self.partner)
            {
                if let Err(problem) = service.check_outage_reports(self.kafka_outages).await {
                    problems.push(problem);
                }
            }
        }
        let mut services: Vec<&mut Service> = self
            .audits
            .iter_mut()
            .filter(|audit| audit.child.is_some())
            .collect();
        services.push(&mut self.bridge);
        services.extend(self.partner.as_mut());
        for service in services {
            if !service.is_running() {
                problems.push(format!(
                    "{} exited by itself:\n{}",
                    service.name,
                    service.log_tail()
                ));
            } else if let Err(problem) = service.terminate().await {
                problems.push(format!("{problem}:\n{}", service.log_tail()));
            }
        }
        if problems.is_empty() {
            if std::env::var_os("TELEMETRY_CHAOS_KEEP_LOGS").is_none() {
                let _ = std::fs::remove_dir_all(&self.log_dir);
            }
            let after = match self.back {
                Some(back) if recovered_in.is_some() => format!(
                    "the stopped service was back (it listened again; the last publish was {:.1} s before)",
                    back.saturating_duration_since(published_at).as_secs_f64()
                ),
                // The publisher finished after the broker was back: the later of the two counts.
                Some(back) => format!(
                    "the last publish, which was {:.1} s after the stopped service was back",
                    published_at.saturating_duration_since(back).as_secs_f64()
                ),
                None => "the last publish".to_string(),
            };
            Ok(format!(
                "{expected} events, {rows} rows; caught up {:.1} s after {after}",
                caught_up.as_secs_f64()
            ))
        } else {
            Err(format!(
                "{}\n(logs in {})",
                problems.join("\n"),
                self.log_dir.display()
            ))
        }
    }
}

async fn count(pool: &sqlx::MySqlPool, query: &str) -> i64 {
    sqlx::query_scalar(query)
        .fetch_one(pool)
        .await
        .unwrap_or(-1)
}

/// Restarts a process a few times at random moments of the stream.
async fn bridge_killed_repeatedly(
    infrastructure: &Infrastructure,
    settings: &Settings,
) -> Result<String, String> {
    let (mut run, publisher) = Run::begin(infrastructure, settings, 1).await?;
    for round in 1..=3 {
        run.wait_for_progress(f64::from(round) * 0.25).await;
        run.bridge.kill().await;
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(100..1_500))).await;
        run.bridge.start();
    }
    run.verify(publisher).await
}

async fn audit_killed_repeatedly(
    infrastructure: &Infrastructure,
    settings: &Settings,
) -> Result<String, String> {
    let (mut run, publisher) = Run::begin(infrastructure, settings, 1).await?;
    for round in 1..=3 {
        run.wait_for_progress(f64::from(round) * 0.25).await;
        run.audits[0].kill().await;
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(100..1_500))).await;
        run.audits[0].start();
    }
    run.verify(publisher).await
}

async fn database_down_mid_stream(
    infrastructure: &Infrastructure,
    settings: &Settings,
) -> Result<String, String> {
    let (mut run, publisher) = Run::begin(infrastructure, settings, 1).await?;
    run.wait_for_progress(0.3).await;
    infrastructure.services("stop", &["mariadb"]).await;
    tokio::time::sleep(settings.outage).await;
    run.back = Some(
        infrastructure
            .start_listening("mariadb", infrastructure.mysql_port)
            .await,
    );
    run.verify(publisher).await
}

async fn kafka_restarted_and_down_mid_stream(
    infrastructure: &Infrastructure,
    settings: &Settings,
) -> Result<String, String> {
    let (mut run, publisher) = Run::begin(infrastructure, settings, 1).await?;
    run.wait_for_progress(0.2).await;
    infrastructure.services("stop", &["kafka"]).await;
    infrastructure.services("start", &["kafka"]).await;
    run.wait_for_progress(0.5).await;
    infrastructure.services("stop", &["kafka"]).await;
    tokio::time::sleep(settings.outage).await;
    run.back = Some(infrastructure.start_kafka().await);
    run.kafka_outages = 2;
    run.verify(publisher).await
}

/// Issue 20's drill (b): the single broker stopped for 20 s mid-stream and started again; the
/// table must catch up within `TELEMETRY_CHAOS_RECOVERY_SECONDS` of its return.
async fn kafka_down_20_s(
    infrastructure: &Infrastructure,
    settings: &Settings,
) -> Result<String, String> {
    let (mut run, publisher) = Run::begin(infrastructure, settings, 1).await?;
    run.wait_for_progress(0.3).await;
    infrastructure.services("stop", &["kafka"]).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    run.back = Some(infrastructure.start_kafka().await);
    run.kafka_outages = 1;
    run.verify(publisher).await
}

/// Issue 20's drill (d): three audit instances in one group (one partition each), one SIGKILLed
/// for good; the others take its partition over.
async fn one_of_three_audits_killed(
    infrastructure: &Infrastructure,
    settings: &Settings,
) -> Result<String, String> {
    let (mut run, publisher) = Run::begin(infrastructure, settings, 3).await?;
    run.wait_for_progress(0.4).await;
    for audit in &mut run.audits {
        if !audit.is_running() {
            return Err(format!(
                "{} was not running:\n{}",
                audit.name,
                audit.log_tail()
            ));
        }
    }
    run.audits[1].kill().await;
    run.verify(publisher).await
}

/// Issue 20's drill (e): Mosquitto stopped mid-stream and started again. Its persistence keeps
/// the bridge's session and what was queued for it; the bridge reconnects by itself, and the
/// publisher, like a device, reconnects and sends again what was not acknowledged.
async fn mosquitto_restarted_mid_stream(
    infrastructure: &Infrastructure,
    settings: &Settings,
) -> Result<String, String> {
    let (run, publisher) = Run::begin(infrastructure, settings, 1).await?;
    run.wait_for_progress(0.4).await;
    infrastructure.services("stop", &["mosquitto"]).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    infrastructure.services("start", &["mosquitto"]).await;
    run.verify(publisher).await
}

/// Issue 20's drill (c): two bridges share the subscription (`TELEMETRY_MQTT_SHARE_GROUP`); one
/// is SIGKILLed mid-stream and restarted (its persistent session brings back what it had not
/// acknowledged). Both must have taken a share of the stream, and together no more than a few
/// in-flight windows more than the stream (a shared subscription hands each message to one).
async fn two_bridges_sharing_one_killed(
    infrastructure: &Infrastructure,
    settings: &Settings,
) -> Result<String, String> {
    let (mut run, publisher) = Run::begin_with(infrastructure, settings, 1, true).await?;
    run.wait_for_progress(0.4).await;
    run.bridge.kill().await;
    tokio::time::sleep(Duration::from_millis(rand::rng().random_range(500..2_000))).await;
    run.bridge.start();
    let published_at = publisher
        .await
        .map_err(|error| format!("publisher failed: {error}"))?;
    // What each bridge received, read before `verify` stops them; the restarted bridge's count
    // is since its restart.
    let received = |service: &Service| {
        let address = format!("127.0.0.1:{}", service.http_port).parse().unwrap();
        async move {
            let metrics = http_get(address, "/metrics")
                .await
                .map(|(_, body)| body)
                .unwrap_or_default();
            telemetry_metrics::EVENTS_RECEIVED
                .total_in(&metrics, &[])
                .unwrap_or(0.0)
        }
    };
    // The whole stream in the table (the bridges idle) before their counts are read.
    let pool = sqlx::MySqlPool::connect_lazy(&infrastructure.mysql_url(&run.database)).unwrap();
    let expected = settings.events / DEVICES * DEVICES;
    eventually(Duration::from_secs(120), || async {
        count(&pool, "SELECT COUNT(*) FROM telemetry").await >= i64::try_from(expected).unwrap()
    })
    .await;
    let restarted = received(&run.bridge).await;
    let partner = received(run.partner.as_ref().unwrap()).await;
    let summary = run
        .verify(tokio::spawn(async move { published_at }))
        .await?;
    // Without the share group each bridge receives every message.
    #[allow(clippy::cast_precision_loss)]
    let stream = expected as f64;
    if partner > 0.0 && partner < 0.9 * stream && restarted > 0.0 {
        Ok(format!(
            "{summary}; the bridge that stayed received {partner}, the restarted one {restarted} since its restart"
        ))
    } else {
        Err(format!(
            "the bridges did not share the stream: the one that stayed received {partner} of {expected} events, the restarted one {restarted} since its restart"
        ))
    }
}

/// SIGTERM while Kafka is down: both services stop within their grace period instead of hanging
/// on deliveries, and what they had not finished is redelivered after the restart.
async fn stopped_while_kafka_is_down(
    infrastructure: &Infrastructure,
    settings: &Settings,
) -> Result<String, String> {
    let (mut run, publisher) = Run::begin(infrastructure, settings, 1).await?;
    run.wait_for_progress(0.5).await;
    infrastructure.services("stop", &["kafka"]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    run.bridge.terminate().await?;
    run.audits[0].terminate().await?;
    run.back = Some(infrastructure.start_kafka().await);
    run.audits[0].start();
    run.bridge.start();
    run.verify(publisher).await
}

fn main() -> ExitCode {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let settings = Settings::from_env();
        let infrastructure = Infrastructure::new();
        let scenarios: [(&str, ScenarioFn); 9] = [
            ("bridge_killed_repeatedly", |i, s| Box::pin(bridge_killed_repeatedly(i, s))),
            ("audit_killed_repeatedly", |i, s| Box::pin(audit_killed_repeatedly(i, s))),
            ("database_down_mid_stream", |i, s| Box::pin(database_down_mid_stream(i, s))),
            ("kafka_restarted_and_down_mid_stream", |i, s| {
                Box::pin(kafka_restarted_and_down_mid_stream(i, s))
            }),
            ("kafka_down_20_s", |i, s| Box::pin(kafka_down_20_s(i, s))),
            ("two_bridges_sharing_one_killed", |i, s| {
                Box::pin(two_bridges_sharing_one_killed(i, s))
            }),
            ("one_of_three_audits_killed", |i, s| Box::pin(one_of_three_audits_killed(i, s))),
            ("mosquitto_restarted_mid_stream", |i, s| {
                Box::pin(mosquitto_restarted_mid_stream(i, s))
            }),
            ("stopped_while_kafka_is_down", |i, s| Box::pin(stopped_while_kafka_is_down(i, s))),
        ];
        let selected: Vec<_> = scenarios
            .iter()
            .filter(|(name, _)| filters.is_empty() || filters.iter().any(|filter| name.contains(filter.as_str())))
            .collect();
        if selected.is_empty() {
            println!(
                "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; {} filtered out; finished in 0.00s",
                scenarios.len()
            );
            return ExitCode::SUCCESS;
        }
        println!(
            "chaos: {} events per scenario at {}/s, outages of {} s",
            settings.events,
            settings.rate,
            settings.outage.as_secs()
        );
        // A fresh broker each run: topics of earlier runs would make every broker restart in the
        // scenarios reload them all, and slow recovery for reasons of the test, not the pipeline.
        infrastructure.services("stop", &["kafka"]).await;
        let _ = std::fs::remove_dir_all(infrastructure.state_dir.join("kafka"));
        infrastructure.services("start", &[]).await;
        let started = Instant::now();
        let (mut passed, mut failed) = (0, 0);
        for (name, scenario) in &selected {
            let scenario_started = Instant::now();
            match scenario(&infrastructure, &settings).await {
                Ok(summary) => {
                    passed += 1;
                    println!("test chaos::{name} ... ok ({summary}; {:.0} s)", scenario_started.elapsed().as_secs_f64());
                }
                Err(problem) => {
                    failed += 1;
                    println!("test chaos::{name} ... FAILED\n{problem}");
                }
            }
            // Whatever a scenario stopped is running again for the next one.
            infrastructure.services("start", &[]).await;
        }
        infrastructure.services("stop", &[]).await;
        let filtered = scenarios.len() - selected.len();
        let verdict = if failed == 0 { "ok" } else { "FAILED" };
        println!(
            "\ntest result: {verdict}. {passed} passed; {failed} failed; 0 ignored; 0 measured; {filtered} filtered out; finished in {:.2}s",
            started.elapsed().as_secs_f64()
        );
        if failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    })
}

type ScenarioFn = for<'a> fn(
    &'a Infrastructure,
    &'a Settings,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<String, String>> + 'a>,
>;
