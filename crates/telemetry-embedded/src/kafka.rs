//! The embedded Kafka-protocol broker: nisshi 0.8.1 with its SQLite (libsql) storage engine.
//!
//! Why nisshi, and why a child process:
//! - nisshi is a Kafka-protocol broker written in Rust that starts from a builder, so `telemetry up`
//!   needs no Java and no download. Our services talk to it through librdkafka, as to any cluster.
//! - Its storage is SQLite (`<data dir>/kafka/nisshi.db`): the memory engine never frees memory.
//! - It has no public clean-shutdown API besides its own signal handling. So `up` runs it as a
//!   child process of the same executable (`telemetry embedded-kafka`, hidden), in a process group
//!   of its own so that Ctrl-C in the terminal reaches only `up`, which stops the bridge and the
//!   audit service first and then sends the broker SIGTERM.
//! - The child also exits when its standard input closes, so a parent that is killed outright does
//!   not leave a broker running.
//! - Topic auto-creation would make 4 partitions; `up` creates its topics itself.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// The hidden subcommand of the `telemetry` binary that runs [`serve`].
pub const SUBCOMMAND: &str = "embedded-kafka";

/// The cluster id the embedded broker keeps across restarts.
const CLUSTER_ID: &str = "telemetry-up";

/// How long the child may take to answer on its port.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the child may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Errors of the embedded broker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The data directory could not be made or read.
    #[error("{path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The broker could not be built or stopped with an error.
    #[error("the embedded Kafka broker (nisshi) failed: {0}")]
    Broker(String),
    /// The child process could not be started or watched.
    #[error("cannot run the embedded Kafka broker `{exe} {SUBCOMMAND}`: {source}")]
    Spawn {
        /// The executable.
        exe: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The child process ended before it answered, or did not answer in time.
    #[error("the embedded Kafka broker did not start ({reason}); its log, {}, ends with:\n{tail}", log.display())]
    DidNotStart {
        /// What happened.
        reason: String,
        /// Its log file.
        log: PathBuf,
        /// The last lines of the log.
        tail: String,
    },
}

/// Where and how the broker runs.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// Its storage goes to `<data_dir>/nisshi.db`.
    pub data_dir: PathBuf,
    /// It listens on, and advertises, 127.0.0.1 and this port.
    pub port: u16,
}

impl BrokerSettings {
    /// The bootstrap address clients use.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn database(&self) -> PathBuf {
        self.data_dir.join("nisshi.db")
    }

    fn log(&self) -> PathBuf {
        self.data_dir.join("broker.log")
    }
}

/// Runs the broker in this process until SIGINT or SIGTERM (nisshi's own clean shutdown), or
/// until standard input closes (the parent is gone). What the hidden subcommand runs.
pub async fn serve(settings: &BrokerSettings) -> Result<(), Error> {
    std::fs::create_dir_all(&settings.data_dir).map_err(|source| Error::DataDir {
        path: settings.data_dir.clone(),
        source,
    })?;
    let url =
        |text: String| url::Url::parse(&text).map_err(|error| Error::Broker(error.to_string()));
    let listener = url(format!("tcp://127.0.0.1:{}", settings.port))?;
    // nisshi resolves `sqlite://<file>` against the working directory and reads the URL's path
    // without decoding it, so a path with a space or a non-ASCII character would be misread: the
    // file is named relative to the data directory, which is made the working directory.
    std::env::set_current_dir(&settings.data_dir).map_err(|source| Error::DataDir {
        path: settings.data_dir.clone(),
        source,
    })?;
    let storage = url(String::from("sqlite://nisshi.db"))?;
    // `Broker::builder()` cannot name its coordinator type from outside the crate; this is the
    // builder it returns.
    type Unset<T> = std::marker::PhantomData<T>;
    let builder = nisshi_broker::broker::Builder::<
        Unset<i32>,
        Unset<String>,
        Unset<uuid::Uuid>,
        Unset<url::Url>,
        Unset<url::Url>,
        Unset<url::Url>,
    >::default();
    let broker = builder
        .node_id(0)
        .cluster_id(CLUSTER_ID)
        .incarnation_id(uuid::Uuid::new_v4())
        .advertised_listener(listener.clone())
        .storage(storage)
        .listener(listener)
        .silent(true)
        .build()
        .await
        .map_err(|error| Error::Broker(format!("{error:?}")))?;
    tracing::info!(port = settings.port, database = %settings.database().display(), "Embedded Kafka broker listening.");

    // A parent that dies without stopping us closes our standard input.
    let (orphaned_tx, orphaned) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = orphaned_tx.send(());
    });
    tokio::select! {
        result = broker.main(tokio::time::Instant::now()) => {
            result.map(|_| ()).map_err(|error| Error::Broker(format!("{error:?}")))
        }
        _ = orphaned => {
            tracing::warn!("Standard input closed: the parent is gone; stopping.");
            Ok(())
        }
    }
}

/// The embedded broker running as a child process.
#[derive(Debug)]
pub struct EmbeddedKafka {
    child: Child,
    settings: BrokerSettings,
}

impl EmbeddedKafka {
    /// Starts `exe embedded-kafka` (normally this very executable) and waits until it accepts
    /// connections on its port. Its output goes to `<data_dir>/broker.log`.
    pub async fn start(exe: &Path, settings: BrokerSettings) -> Result<Self, Error> {
        std::fs::create_dir_all(&settings.data_dir).map_err(|source| Error::DataDir {
            path: settings.data_dir.clone(),
            source,
        })?;
        let log_path = settings.log();
        let open_log = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(|source| Error::DataDir {
                    path: log_path.clone(),
                    source,
                })
        };
        let spawn_error = |source| Error::Spawn {
            exe: exe.to_path_buf(),
            source,
        };
        let mut child = Command::new(exe)
            .arg(SUBCOMMAND)
            .arg("--data-dir")
            .arg(&settings.data_dir)
            .arg("--port")
            .arg(settings.port.to_string())
            .env(
                "RUST_LOG",
                std::env::var("TELEMETRY_EMBEDDED_KAFKA_LOG")
                    .unwrap_or_else(|_| String::from("warn")),
            )
            .stdin(Stdio::piped())
            .stdout(open_log()?)
            .stderr(open_log()?)
            // Ctrl-C in a terminal signals the whole foreground process group: the broker must
            // outlive the services that still flush to it.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_error)?;
        let deadline = Instant::now() + START_TIMEOUT;
        let address = settings.bootstrap();
        loop {
            if let Some(status) = child.try_wait().map_err(spawn_error)? {
                return Err(did_not_start(&log_path, format!("it exited with {status}")));
            }
            if tokio::net::TcpStream::connect(&address).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill().await;
                return Err(did_not_start(
                    &log_path,
                    format!(
                        "no answer on {address} within {} s",
                        START_TIMEOUT.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(EmbeddedKafka { child, settings })
    }

    /// The bootstrap address clients use.
    pub fn bootstrap(&self) -> String {
        self.settings.bootstrap()
    }

    /// Its log file.
    pub fn log_path(&self) -> PathBuf {
        self.settings.log()
    }

    /// The child's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits for nisshi's clean shutdown; kills it when that takes longer than
    /// 15 s. Returns whether it stopped cleanly.
    pub async fn stop(mut self) -> bool {
        let Some(pid) = self.child.id() else {
            return false;
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
        if let Err(error) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
            tracing::warn!(%error, "Cannot send SIGTERM to the embedded Kafka broker.");
        }
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) => status.success(),
            _ => {
                tracing::warn!("The embedded Kafka broker did not stop within 15 s; killing it.");
                let _ = self.child.kill().await;
                false
            }
        }
    }

    /// Kills the child outright (SIGKILL): a crash, for tests.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

fn did_not_start(log: &Path, reason: String) -> Error {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    Error::DidNotStart {
        reason,
        log: log.to_path_buf(),
        tail,
    }
}
