//! `telemetry`: the one binary of telemetry-pipeline. Each subcommand runs one service; this file
//! only parses arguments, sets up logging and signals, and calls the service's `run`.

mod config_file;
mod contract_tool;
mod up;

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Telemetry pipeline: MQTT devices → Kafka → validated history in MySQL, plus a live view.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log format: `text` for people, `json` for log collectors. Levels come from RUST_LOG
    /// (default `info`).
    #[arg(long, env = "TELEMETRY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,

    /// A configuration file (TOML) with any of the settings: keys are the environment variables
    /// without `TELEMETRY_`, in lower case. The environment overrides the file, flags override
    /// both; `telemetry config example` prints every key.
    #[arg(long, env = config_file::CONFIG_ENV, global = true)]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

// One value, parsed once at start-up: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// The whole pipeline in one process on embedded defaults (MQTT broker, Kafka-protocol
    /// broker, SQLite), with simulated devices and the dashboard: nothing to install. Each
    /// embedded piece is replaced by a real one with --mqtt-url, --kafka-brokers, --mysql-url.
    Up(up::UpArgs),
    /// MQTT → WebSocket live view + Kafka raw topic. Never writes the database.
    Bridge(telemetry_bridge::BridgeConfig),
    /// Kafka raw topic → validate → MySQL `telemetry` table + cleaned topic + DLQ.
    Audit(telemetry_audit::AuditConfig),
    /// HTTP API (devices, history, DLQ) and the dashboard, reading the database.
    Api(telemetry_api::ApiConfig),
    /// Validate a range of the raw topic again, into the live table or a new one (`replay swap`
    /// makes that one live). Never touches the audit service's offsets.
    Replay(ReplayArgs),
    /// List, show or count the rejected records in the DLQ topic.
    Dlq(DlqArgs),
    /// Cleaned topic → per-device, per-metric minute and hour aggregates (count, min, max, avg,
    /// last) in MySQL, for long time ranges.
    Rollup(telemetry_rollup::RollupConfig),
    /// Alert rules over the cleaned and DLQ topics (thresholds, silent devices, rejection rates):
    /// alerts to the `telemetry.alerts` topic and a webhook, fired and resolved once.
    Alert(telemetry_alert::AlertConfig),
    /// Simulated devices publishing realistic telemetry (and faults) over MQTT.
    Simulate(telemetry_simulator::SimulateConfig),
    /// Create the telemetry database if it is missing and bring its schema up to date, with the
    /// owner's account; the services then need only their own (writers DML, the API SELECT).
    Migrate(MigrateArgs),
    /// Check, show or export the payload contract, or try payloads against it.
    Contract(contract_tool::ContractArgs),
    /// Check a configuration file, or print a commented example with every setting.
    Config(ConfigArgs),
    /// Make bearer tokens for the API and the live view (`--auth-tokens`).
    Token(TokenArgs),
    /// Load harness: the real pipeline under simulated devices, measured end to end (rate,
    /// loss, latency, CPU, memory) next to the infrastructure's own limits in the same run.
    Bench(telemetry_bench::BenchConfig),
    /// The embedded Kafka-protocol broker, as `telemetry up` runs it in a child process.
    #[cfg(feature = "embedded-kafka")]
    #[command(name = "embedded-kafka", hide = true)]
    EmbeddedKafka(EmbeddedKafkaArgs),
}

#[cfg(feature = "embedded-kafka")]
#[derive(Debug, clap::Args)]
struct EmbeddedKafkaArgs {
    /// Where its SQLite storage goes.
    #[arg(long)]
    data_dir: PathBuf,
    /// Its port on 127.0.0.1.
    #[arg(long)]
    port: u16,
}

#[derive(Debug, clap::Args)]
struct MigrateArgs {
    /// MySQL/MariaDB URL of the telemetry database with the owner's account: every privilege on
    /// that database, none elsewhere (docs/operations.md, "Database accounts"). Default: the
    /// development owner account of `scripts/services.sh`.
    #[arg(
        long,
        env = "TELEMETRY_MYSQL_OWNER_URL",
        hide_env_values = true,
        default_value = telemetry_store::DEFAULT_OWNER_URL,
        hide_default_value = true
    )]
    mysql_owner_url: String,
}

#[derive(Debug, clap::Args)]
struct TokenArgs {
    #[command(subcommand)]
    action: TokenAction,
}

#[derive(Debug, Subcommand)]
enum TokenAction {
    /// Makes a random token and prints it (once: the file keeps only its SHA-256) with the entry
    /// to add to the tokens file.
    New {
        /// The token's name, shown in logs (who or what uses it).
        #[arg(long)]
        name: String,
        /// A device it may read: an id, or a prefix ending in `*` (`greenhouse-*`; `*` for all).
        /// Repeatable.
        #[arg(long = "device", required = true)]
        devices: Vec<String>,
    },
}

#[derive(Debug, clap::Args)]
struct ConfigArgs {
    #[command(subcommand)]
    action: ConfigAction,
}

#[derive(Debug, Subcommand)]
enum ConfigAction {
    /// Checks the file given by `--config` or `TELEMETRY_CONFIG`: every key a setting, every
    /// value one its setting accepts. Exits non-zero naming the first that is not.
    Check,
    /// Prints a complete example file: every setting, commented, with its default.
    Example,
}

#[derive(Debug, clap::Args)]
struct DlqArgs {
    #[command(subcommand)]
    action: DlqAction,
}

#[derive(Debug, Subcommand)]
enum DlqAction {
    /// Rejected records, one line each: time, PARTITION:OFFSET, device, code, message.
    List(telemetry_audit::dlq::DlqFilter),
    /// One rejected record in full: every header and the original bytes.
    Show(telemetry_audit::dlq::ShowConfig),
    /// Rejected records counted by reason code and by device.
    Stats(telemetry_audit::dlq::DlqFilter),
    /// Validate selected rejected records again (after a contract fix): accepted ones go to the
    /// table and the cleaned topic once; still invalid ones stay in the DLQ.
    Replay(telemetry_audit::dlq::ReplayConfig),
}

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct ReplayArgs {
    #[command(subcommand)]
    action: Option<ReplayAction>,
    #[command(flatten)]
    run: telemetry_audit::replay::ReplayConfig,
}

#[derive(Debug, Subcommand)]
enum ReplayAction {
    /// Make a table rebuilt with `replay --into` the live `telemetry` table (one atomic rename;
    /// the old one is kept).
    Swap(telemetry_audit::replay::SwapConfig),
}

fn main() -> anyhow::Result<()> {
    // The configuration file's settings become the environment's defaults before the arguments
    // are parsed, and before any thread starts.
    let args: Vec<OsString> = std::env::args_os().collect();
    let mut exposed = None;
    if let Some(path) = config_file::path_from(&args) {
        match config_file::load(&path, &Cli::command()) {
            Ok(values) => {
                exposed = config_file::exposed_secrets(&path, &values, &Cli::command());
                config_file::apply(&values);
            }
            Err(error) => {
                eprintln!("error: {error}");
                std::process::exit(2);
            }
        }
    }
    let cli = Cli::parse_from(args);
    // `up` runs every service in one terminal: warnings only, unless RUST_LOG says otherwise.
    // rumqttd logs every closed connection as an error; its own problems surface as the bridge's.
    let default_level = if matches!(cli.command, Command::Up(_)) {
        "warn,rumqttd=off"
    } else {
        "info"
    };
    init_logging(cli.log_format, default_level);
    if let Some(exposed) = exposed {
        exposed.warn();
    }
    match cli.command {
        #[cfg(feature = "embedded-kafka")]
        Command::EmbeddedKafka(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?
            // nisshi's own SIGINT/SIGTERM handling stops it cleanly.
            .block_on(telemetry_embedded::kafka::serve(
                &telemetry_embedded::kafka::BrokerSettings {
                    data_dir: args.data_dir,
                    port: args.port,
                },
            ))
            .context("the embedded Kafka broker failed"),
        Command::Contract(args) => contract_tool::run(args),
        Command::Config(ConfigArgs { action }) => config_command(action, cli.config.as_deref()),
        Command::Token(TokenArgs { action }) => token_command(action),
        command => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?
            // On a worker, not on this thread: a future `block_on` polls itself runs here, and
            // every wakeup between it and the tasks it spawned crossed threads (a futex wait and
            // a context switch each; a third of the audit service's CPU at 2,000 events/s).
            .block_on(async move {
                match tokio::spawn(run(command)).await {
                    Ok(result) => result,
                    Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                    Err(error) => Err(anyhow::anyhow!("the service task was cancelled: {error}")),
                }
            }),
    }
}

fn config_command(action: ConfigAction, path: Option<&std::path::Path>) -> anyhow::Result<()> {
    match action {
        ConfigAction::Example => print!("{}", config_file::example(&Cli::command())),
        ConfigAction::Check => {
            let path = path.context(
                "no configuration file: give it with --config FILE or TELEMETRY_CONFIG=FILE",
            )?;
            // Loaded and checked before the arguments were parsed; this only reports.
            let values = config_file::load(path, &Cli::command())?;
            println!("{}: {} settings, all valid", path.display(), values.len());
        }
    }
    Ok(())
}

fn token_command(action: TokenAction) -> anyhow::Result<()> {
    use base64::Engine as _;
    use rand::RngCore as _;
    let TokenAction::New { name, devices } = action;
    anyhow::ensure!(!name.trim().is_empty(), "--name must not be empty");
    for pattern in &devices {
        telemetry_core::DevicePattern::parse(pattern)
            .map_err(|problem| anyhow::anyhow!("--device {problem}"))?;
    }
    // 256 bits from the thread's CSPRNG (ChaCha, seeded from the operating system).
    let mut secret = [0_u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let token = format!(
        "tp_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    let quoted = |text: &str| toml::Value::String(text.to_string()).to_string();
    let devices: Vec<String> = devices.iter().map(|device| quoted(device)).collect();
    println!("Token for `{name}` (shown only now; the tokens file keeps only its SHA-256):");
    println!("{token}");
    println!();
    println!("Add to the tokens file (TELEMETRY_AUTH_TOKENS / --auth-tokens), then restart the API and the bridge:");
    println!("[[token]]");
    println!("name = {}", quoted(&name));
    println!("sha256 = \"{}\"", telemetry_auth::token_digest(&token));
    println!("devices = [{}]", devices.join(", "));
    Ok(())
}

/// Runs a service or tool until it ends or a signal stops it.
async fn run(command: Command) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    match command {
        Command::Up(args) => up::run(args, shutdown).await,
        Command::Bridge(config) => telemetry_bridge::run(config, shutdown)
            .await
            .context("the bridge stopped with an error"),
        Command::Audit(config) => telemetry_audit::run(config, shutdown)
            .await
            .context("the audit service stopped with an error"),
        Command::Api(config) => telemetry_api::run(config, shutdown)
            .await
            .context("the API stopped with an error"),
        Command::Rollup(config) => telemetry_rollup::run(config, shutdown)
            .await
            .context("the rollup service stopped with an error"),
        Command::Alert(config) => telemetry_alert::run(config, shutdown)
            .await
            .context("the alerter stopped with an error"),
        Command::Replay(ReplayArgs {
            action: Some(ReplayAction::Swap(config)),
            ..
        }) => {
            let kept_as = telemetry_audit::replay::swap(config)
                .await
                .context("the swap failed")?;
            println!(
                "The rebuilt table is now `telemetry`; the previous one is kept as `{kept_as}`."
            );
            Ok(())
        }
        Command::Replay(ReplayArgs { run, .. }) => {
            let summary = telemetry_audit::replay::run(run, shutdown)
                .await
                .context("the replay failed")?;
            print!("{summary}");
            if summary.stopped_early {
                anyhow::bail!("the replay was stopped before the end of its range");
            }
            Ok(())
        }
        Command::Dlq(DlqArgs { action }) => {
            use telemetry_audit::dlq;
            let text = match action {
                DlqAction::List(filter) => {
                    dlq::list_text(&dlq::read(&filter).await.context("reading the DLQ failed")?)
                }
                DlqAction::Show(config) => {
                    dlq::show_text(&dlq::show(&config).await.context("reading the DLQ failed")?)
                }
                DlqAction::Stats(filter) => dlq::stats_text(&dlq::stats(
                    &dlq::read(&filter).await.context("reading the DLQ failed")?,
                )),
                DlqAction::Replay(config) => dlq::replay(&config)
                    .await
                    .context("the DLQ replay failed")?
                    .to_string(),
            };
            print!("{text}");
            Ok(())
        }
        Command::Bench(config) => {
            let report = telemetry_bench::run(config, shutdown)
                .await
                .context("the bench failed")?;
            print!("{report}");
            if !report.lossless() {
                anyhow::bail!(
                    "the pipeline lost or duplicated events: {} lost, {} duplicates, {} of {} malformed in the DLQ",
                    report.pipeline.lost,
                    report.pipeline.duplicates,
                    report.pipeline.dead_letters,
                    report.pipeline.malformed
                );
            }
            Ok(())
        }
        Command::Migrate(MigrateArgs { mysql_owner_url }) => {
            if telemetry_store::is_sqlite_url(&mysql_owner_url) {
                anyhow::bail!(
                    "the SQLite store of `telemetry up` makes its own schema; `telemetry migrate` is for MySQL/MariaDB"
                );
            }
            if telemetry_store::Store::migrate_as_owner(&mysql_owner_url, &shutdown)
                .await
                .context("migrating the database")?
            {
                tracing::info!("The database schema is up to date.");
            }
            Ok(())
        }
        Command::Simulate(config) => {
            let summary = telemetry_simulator::run(config, shutdown)
                .await
                .context("the simulator stopped with an error")?;
            print!("{summary}");
            Ok(())
        }
        // Handled in `main`, without a runtime (or with one of its own).
        Command::Contract(_) | Command::Config(_) | Command::Token(_) => Ok(()),
        #[cfg(feature = "embedded-kafka")]
        Command::EmbeddedKafka(_) => Ok(()),
    }
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // Colours only on a terminal: PM2's log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Cancels `shutdown` on SIGINT or SIGTERM; a second signal exits at once.
async fn cancel_on_signal(shutdown: CancellationToken) {
    wait_for_signal().await;
    tracing::info!("Shutting down; a second signal stops at once.");
    shutdown.cancel();
    wait_for_signal().await;
    tracing::warn!("Second signal: exiting without finishing in-flight work.");
    std::process::exit(130);
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(error) => {
            tracing::warn!(%error, "Cannot listen for SIGTERM; only Ctrl-C stops the service.");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
