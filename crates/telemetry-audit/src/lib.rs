//! The audit service: the single writer of the telemetry table. It consumes the raw topic in a
//! consumer group, validates and normalizes every record, writes the accepted ones to the
//! database and the cleaned topic, and the rejected ones, with their original bytes and a reason
//! code, to the DLQ.
//!
//! Delivery: records are handled in batches. A batch's offsets are stored (and later committed)
//! only after its database transaction committed and every cleaned and DLQ record was
//! acknowledged by Kafka (acks=all). A crash therefore means redelivery, never loss; the database
//! insert is idempotent on the event identity, so redelivery adds no duplicate rows.
//!
//! # Layout
//! - [`AuditConfig`]: every setting, with its flag and environment variable.
//! - [`run`]: serve `/healthz`, `/readyz`, `/metrics`; connect, migrate, create topics, then the
//!   four stages, joined by bounded channels so each overlaps the others:
//!   - `read`: batches from the raw topic ([`telemetry_kafka::BatchConsumer`]), each handed to
//!   - `decide`: every record validated (accepted and cleaned, or rejected with a reason);
//!   - `write`: accepted events into the table, rejected records into the DLQ index, up to
//!     `--db-writers` batches at once, handed on in batch order;
//!   - `produce`: cleaned and DLQ records produced (`kafka_sink`, retried until acknowledged),
//!     then the batch's offsets stored.
//! - `upkeep`: the DLQ index pruned beside the stages.

mod decide;
pub mod dlq;
pub mod instruments;
mod kafka_sink;
mod produce;
mod read;
pub mod replay;
#[cfg(test)]
mod test_support;
mod upkeep;
mod write;

use std::sync::Arc;
use std::time::Duration;

use telemetry_consumer::{DatabaseConfig, Service, Started};
use telemetry_core::{Contract, Validator};
use telemetry_kafka::{BatchConsumer, KafkaConfig};
use telemetry_store::Table;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::kafka_sink::OutcomeSink;

/// Errors that stop the audit service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Kafka set-up failed.
    #[error(transparent)]
    Kafka(#[from] telemetry_kafka::Error),
    /// The database could not be set up.
    #[error(transparent)]
    Store(#[from] telemetry_store::Error),
    /// The contract could not be loaded.
    #[error(transparent)]
    Contract(#[from] telemetry_core::ContractError),
    /// The HTTP listener could not be bound or served.
    #[error(transparent)]
    Listen(#[from] telemetry_ops::ListenError),
    /// A tool (`replay`, `dlq`) could not do what it was asked.
    #[error("{0}")]
    Tool(String),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Audit service settings.
#[derive(Debug, Clone, clap::Args)]
pub struct AuditConfig {
    /// The database (its pool: 4 connections unless set).
    #[command(flatten)]
    pub database: DatabaseConfig,

    /// Kafka consumer group of the audit service. Instances in one group share the partitions.
    #[arg(long, env = "TELEMETRY_AUDIT_GROUP", default_value = "telemetry-audit")]
    pub group_id: String,

    /// Most records handled (and written) per batch.
    #[arg(long, env = "TELEMETRY_AUDIT_BATCH_SIZE", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,

    /// Most bytes of records (keys and values) per batch: a batch closes at this many bytes or
    /// `--batch-size` records, whichever comes first. Up to `--db-writers` plus five batches
    /// are in hand at once, so this bounds the service's memory for large records.
    #[arg(long, env = "TELEMETRY_AUDIT_BATCH_BYTES", default_value_t = 8 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_bytes: u64,

    /// Batches written to the database at once, each on a connection of its own from the pool
    /// (`--mysql-max-connections`, shared with the DLQ index's upkeep: more writers than free
    /// connections wait for one). Rows are idempotent, so their order
    /// across batches does not matter; offsets are still stored in batch order. 2 writes a backlog
    /// about a fifth faster than 1, for about a fifth more CPU per event (`telemetry bench`).
    #[arg(long, env = "TELEMETRY_AUDIT_DB_WRITERS", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub db_writers: u16,

    /// Longest a batch stays open while records keep arriving, in milliseconds. A batch closes
    /// as soon as nothing more is waiting (at a low rate, at once), when it is full, or after
    /// this long, whichever comes first.
    #[arg(long, env = "TELEMETRY_AUDIT_BATCH_LINGER_MS", default_value_t = 20)]
    pub batch_linger_ms: u64,

    /// The payload contract: a TOML file (see `contracts/telemetry.toml`), or a JSON Schema
    /// document when the name ends in `.json`. Without it, the contract compiled into the binary
    /// (a copy of `contracts/telemetry.toml`) applies. Read at start-up: restart to apply changes.
    #[arg(long, env = "TELEMETRY_CONTRACT")]
    pub contract: Option<std::path::PathBuf>,

    /// How long rejected records stay in the database's DLQ index (the `dlq_events` table the API
    /// lists), in hours. The DLQ topic keeps them by its own retention.
    #[arg(long, env = "TELEMETRY_DLQ_INDEX_RETENTION_HOURS", default_value_t = 168,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub dlq_index_retention_hours: u32,

    /// Most rows kept in the DLQ index; the oldest beyond it are deleted.
    #[arg(long, env = "TELEMETRY_DLQ_INDEX_MAX_ROWS", default_value_t = 100_000)]
    pub dlq_index_max_rows: u64,

    /// How long shutdown lets the batches in hand finish (database writes, produces) before
    /// abandoning them to be redelivered, in seconds. Up to `--db-writers` plus five batches can
    /// be in hand: one read, those being written, two waiting to be produced, two being produced.
    #[arg(long, env = "TELEMETRY_SHUTDOWN_GRACE_SECONDS", default_value_t = 10)]
    pub shutdown_grace_seconds: u64,

    /// Address of the HTTP server (`/healthz`, `/readyz`, `/metrics`).
    #[arg(
        long = "audit-listen",
        env = "TELEMETRY_AUDIT_LISTEN",
        default_value = "127.0.0.1:8081"
    )]
    pub listen: String,

    /// Header-read and idle timeouts and the connection cap of the HTTP server.
    #[command(flatten)]
    pub http: telemetry_ops::HttpLimits,

    /// Kafka settings.
    #[command(flatten)]
    pub kafka: KafkaConfig,
}

/// The readiness check the audit service reports on `/readyz`: passing while the database
/// answers.
pub(crate) use telemetry_consumer::DATABASE;

/// `error.code` of records that passed validation but that the database refused (for example a
/// value outside a constraint an operator added).
pub const DB_REJECTED: &str = "db_rejected";

/// Runs the audit service until `shutdown` is cancelled. The batches in hand when it is cancelled
/// are finished if they can be within `shutdown_grace_seconds`; a batch's offsets are committed
/// only if it was, and only after every earlier batch's.
pub async fn run(config: AuditConfig, shutdown: CancellationToken) -> Result<()> {
    run_with(config, shutdown, Arc::default()).await
}

/// [`run`], counting what it does in `progress`: records received, rows written, records
/// rejected (by the contract or the database).
pub async fn run_with(
    config: AuditConfig,
    shutdown: CancellationToken,
    progress: Arc<telemetry_metrics::Progress>,
) -> Result<()> {
    // A contract that does not load stops the service before it touches anything.
    let validator = Validator::new(load_contract(config.contract.as_deref())?)?;
    // Intake stops at `shutdown`; the batches in hand get the grace period to become durable,
    // counted from the signal.
    let abandon = abandon_after_grace(
        &shutdown,
        Duration::from_secs(config.shutdown_grace_seconds),
    );
    let _abandon_on_return = abandon.clone().drop_guard();
    let kafka = &config.kafka;
    Service {
        service: instruments::SERVICE,
        listen: &config.listen,
        http: &config.http,
        database: &config.database,
        connections: 4,
        kafka,
        topics: &[&kafka.raw_topic, &kafka.cleaned_topic, &kafka.dlq_topic],
    }
    .run(shutdown, |started| {
        consume(&config, validator, &progress, &abandon, started)
    })
    .await
}

/// The service proper: the stages, until shutdown.
async fn consume(
    config: &AuditConfig,
    validator: Validator,
    progress: &Arc<telemetry_metrics::Progress>,
    abandon: &CancellationToken,
    started: Started,
) -> Result<()> {
    let Started {
        store,
        writes,
        shutdown,
    } = started;
    let shutdown = &shutdown;
    let kafka = &config.kafka;
    let source = Arc::new(
        BatchConsumer::new(kafka, &config.group_id, &[kafka.raw_topic.as_str()])?
            .with_max_batch_bytes(usize::try_from(config.batch_bytes).unwrap_or(usize::MAX)),
    );
    let sink = Arc::new(OutcomeSink::new(kafka, validator.contract().version)?);
    tokio::spawn(upkeep::prune_dead_letters(
        store.clone(),
        config.dlq_index_retention_hours,
        config.dlq_index_max_rows,
        shutdown.clone(),
    ));
    tracing::info!(
        raw_topic = %kafka.raw_topic,
        group_id = %config.group_id,
        contract_version = validator.contract().version,
        "Audit service started."
    );

    // read+decide → write → produce. Reading, database writes and the wait for Kafka overlap,
    // and an offset is still stored only once both the rows and the records of its batch are
    // durable (measured with `telemetry bench`: 15.8k to 20.5k events/s end to end for the
    // produce stage, the audit alone from 53-55% to 65-71% of MariaDB's insert rate for the
    // read stage and two writers; docs/benchmarks.md).
    let validator = Arc::new(validator);
    let (to_write, decided) = mpsc::channel(1);
    let (to_produce, written) = mpsc::channel(produce::PIPELINE_DEPTH);
    // Stops at shutdown, or when the write stage ends for another reason.
    let stop_reading = shutdown.child_token();
    let reader = read::spawn(
        source.clone(),
        validator.clone(),
        read::Batching {
            records: usize::try_from(config.batch_size).unwrap_or(usize::MAX),
            linger: Duration::from_millis(config.batch_linger_ms),
        },
        progress.clone(),
        stop_reading.clone(),
        to_write,
    );
    let producer = produce::spawn(source.clone(), sink.clone(), abandon.clone(), written);
    let writer = write::Writer {
        store: store.as_ref(),
        table: &Table::live(),
        writes: &writes,
        abandon,
        cleaned_topic: Arc::from(kafka.cleaned_topic.as_str()),
        dlq_topic: Arc::from(kafka.dlq_topic.as_str()),
        validator: &validator,
        progress,
    };
    write::run(&writer, decided, to_produce, usize::from(config.db_writers)).await;

    // Shutdown: no new batches; those written are produced (until `abandon`), then the final
    // offsets are committed and the group left.
    stop_reading.cancel();
    read::join(reader).await;
    if let Err(error) = producer.await {
        tracing::error!(%error, "The produce stage failed.");
    }
    sink.flush();
    match Arc::try_unwrap(source) {
        Ok(source) => source.close(CLOSE_TIMEOUT).await,
        Err(_) => {
            tracing::warn!("The consumer is still shared at shutdown; not closing it cleanly.")
        }
    }
    tracing::info!("Audit service stopped.");
    Ok(())
}

/// A token cancelled `grace` after `shutdown` (or when the returned token's drop guard goes).
fn abandon_after_grace(shutdown: &CancellationToken, grace: Duration) -> CancellationToken {
    let abandon = CancellationToken::new();
    tokio::spawn({
        let (shutdown, abandon) = (shutdown.clone(), abandon.clone());
        async move {
            tokio::select! {
                () = shutdown.cancelled() => {
                    tokio::time::sleep(grace).await;
                    abandon.cancel();
                }
                () = abandon.cancelled() => {}
            }
        }
    });
    abandon
}

/// Loads the contract at `path`, or the one compiled into the binary.
pub fn load_contract(path: Option<&std::path::Path>) -> Result<Contract> {
    let contract = Contract::load_or_builtin(path)?;
    tracing::info!(
        version = contract.version,
        path = %path.map_or_else(|| String::from("(built in)"), |path| path.display().to_string()),
        "Loaded the payload contract."
    );
    Ok(contract)
}

/// How long shutdown waits for the final offset commit and for leaving the consumer group.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
