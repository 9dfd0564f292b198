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
//! - [`telemetry_kafka::BatchConsumer`]: the consumer, batching and offset storage.
//! - `kafka_sink`: the cleaned and DLQ producer, retried until acknowledged.
//! - [`run`]: serve `/healthz`, `/readyz`, `/metrics`; connect, migrate, create topics, then
//!   batch → validate → write → produce → store offsets.

pub mod dlq;
mod kafka_sink;
pub mod replay;

use std::time::Duration;

use futures::stream::{FuturesOrdered, StreamExt};
use rdkafka::message::{Message, OwnedMessage};
use telemetry_core::event::CleanedRecord;
use telemetry_core::event::SequenceCheck;
use telemetry_core::{Contract, Outcome, Rejection, SequenceTracker, SourcePosition, Validator};
use telemetry_kafka::KafkaConfig;
use telemetry_store::{DynStore, Table, TelemetryStore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::kafka_sink::{DeadLetter, OutcomeSink, OutgoingRecord};

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
    /// MySQL/MariaDB URL of the telemetry database with the writer's account (SELECT, INSERT,
    /// UPDATE, DELETE); `sqlite://<file>` for the embedded SQLite store of `telemetry up`.
    /// Default: the development writer account of `scripts/services.sh`.
    #[arg(
        long,
        env = "TELEMETRY_MYSQL_URL",
        hide_env_values = true,
        default_value = telemetry_store::DEFAULT_MYSQL_URL,
        hide_default_value = true
    )]
    pub mysql_url: String,

    /// MySQL/MariaDB URL of the telemetry database with the owner's account (DDL on that
    /// database): the schema is migrated with it at start-up, then the service works with
    /// `--mysql-url`'s account (DML alone). Without it, a schema that is behind is migrated with
    /// `--mysql-url`'s account if that may, or the service stops and asks for `telemetry migrate`.
    #[arg(long, env = "TELEMETRY_MYSQL_OWNER_URL", hide_env_values = true)]
    pub mysql_owner_url: Option<String>,

    /// Database connections in the pool.
    #[arg(long, env = "TELEMETRY_MYSQL_MAX_CONNECTIONS", default_value_t = 4)]
    pub mysql_max_connections: u32,

    /// Kafka consumer group of the audit service. Instances in one group share the partitions.
    #[arg(long, env = "TELEMETRY_AUDIT_GROUP", default_value = "telemetry-audit")]
    pub group_id: String,

    /// Most records handled (and written) per batch.
    #[arg(long, env = "TELEMETRY_AUDIT_BATCH_SIZE", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,

    /// Most bytes of records (keys and values) per batch: a batch closes at this many bytes or
    /// `--batch-size` records, whichever comes first. Up to `--db-writers` plus four batches
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

    /// Longest wait for a batch to fill before it is handled anyway, in milliseconds.
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
    /// abandoning them to be redelivered, in seconds. Up to `--db-writers` plus three batches can
    /// be in hand: one read, those being written, two waiting for or being produced.
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

/// The readiness check the audit service reports on `/readyz`: passing while database writes
/// succeed.
const DATABASE: &str = "database";

/// `error.code` of records that passed validation but that the database refused (for example a
/// value outside a constraint an operator added).
pub const DB_REJECTED: &str = "db_rejected";

/// Runs the audit service until `shutdown` is cancelled. The batches in hand when it is cancelled
/// are finished if they can be within `shutdown_grace_seconds`; a batch's offsets are committed
/// only if it was, and only after every earlier batch's.
pub async fn run(config: AuditConfig, shutdown: CancellationToken) -> Result<()> {
    // A contract that does not load stops the service before it touches anything.
    let validator = Validator::new(load_contract(config.contract.as_deref())?)?;
    let server = telemetry_ops::HttpServer::bind(&config.listen).await?;
    let readiness = telemetry_ops::Readiness::new(&[DATABASE]);
    let server = server.spawn(
        telemetry_ops::router(readiness.clone()),
        "audit",
        &config.http,
        shutdown.clone(),
    );
    let result = consume(&config, validator, &readiness, &shutdown).await;
    shutdown.cancel();
    telemetry_ops::join(server).await?;
    result
}

/// The service proper: set up, then batch after batch until `shutdown`.
async fn consume(
    config: &AuditConfig,
    validator: Validator,
    readiness: &telemetry_ops::Readiness,
    shutdown: &CancellationToken,
) -> Result<()> {
    // Intake stops at `shutdown`; the batches in hand get the grace period to become durable.
    let abandon = CancellationToken::new();
    let grace = Duration::from_secs(config.shutdown_grace_seconds);
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
    let _abandon_on_return = abandon.clone().drop_guard();
    let shutdown = shutdown.clone();
    if let Some(owner_url) = config
        .mysql_owner_url
        .as_deref()
        .filter(|url| !url.is_empty() && !telemetry_store::is_sqlite_url(url))
    {
        if !telemetry_store::Store::migrate_as_owner(owner_url, &shutdown).await? {
            return Ok(());
        }
    }
    let Some(store) =
        telemetry_store::open_migrated(&config.mysql_url, config.mysql_max_connections, &shutdown)
            .await?
    else {
        return Ok(());
    };
    readiness.set(DATABASE, true);
    let kafka = &config.kafka;
    telemetry_kafka::ensure_topics(
        kafka,
        &[&kafka.raw_topic, &kafka.cleaned_topic, &kafka.dlq_topic],
    )
    .await?;
    let source =
        telemetry_kafka::BatchConsumer::new(kafka, &config.group_id, &[kafka.raw_topic.as_str()])?
            .with_max_batch_bytes(usize::try_from(config.batch_bytes).unwrap_or(usize::MAX));
    let sink = OutcomeSink::new(kafka, validator.contract().version)?;
    let mut sequences = SequenceTracker::new();
    tokio::spawn(prune_dead_letters(
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

    let linger = Duration::from_millis(config.batch_linger_ms);
    let batch_size = usize::try_from(config.batch_size).unwrap_or(usize::MAX);
    let live = Table::live();
    // Three stages. A task reads and validates batches; this loop writes up to `--db-writers` of
    // them to the database at once and hands them on in batch order; a third task produces each
    // batch's cleaned and DLQ records and then marks its offsets, in batch order. So reading,
    // database writes and the wait for Kafka overlap, and an offset is still stored only once both
    // the rows and the records of its batch are durable (measured with `telemetry bench`: 15.8k
    // to 20.5k events/s end to end for the produce stage, the audit alone from 53-55% to 65-71% of
    // MariaDB's insert rate for the reading task and two writers; docs/benchmarks.md).
    let source = std::sync::Arc::new(source);
    let sink = std::sync::Arc::new(sink);
    let (to_producer, mut to_produce) =
        tokio::sync::mpsc::channel::<(Vec<OwnedMessage>, Vec<OutgoingRecord>)>(PIPELINE_DEPTH);
    let producer = tokio::spawn({
        let (source, sink, abandon) = (source.clone(), sink.clone(), abandon.clone());
        async move {
            while let Some((batch, outgoing)) = to_produce.recv().await {
                if !sink.produce_all(outgoing, &batch, &abandon).await {
                    return; // Abandoned: the batch's offsets stay, it is redelivered.
                }
                source.store_offsets(&batch);
            }
        }
    });
    let contract_version = validator.contract().version;
    let validator = std::sync::Arc::new(validator);
    let (to_writer, mut to_write) = tokio::sync::mpsc::channel::<(Vec<OwnedMessage>, Decided)>(1);
    // Stops at shutdown, or when this loop ends for another reason.
    let stop_reading = shutdown.child_token();
    let reader = tokio::spawn({
        let (source, validator, stop) = (source.clone(), validator.clone(), stop_reading.clone());
        async move {
            while let Some(batch) = source.next_batch(batch_size, linger, &stop).await {
                let decided = decide(&batch, &validator, &mut sequences);
                if to_writer.send((batch, decided)).await.is_err() {
                    return; // The writing stage stopped; the batch's offsets stay.
                }
            }
        }
    });
    let writer = Writer {
        store: store.as_ref(),
        table: &live,
        readiness,
        abandon: &abandon,
        kafka,
        validator: &validator,
        contract_version,
    };
    let db_writers = usize::from(config.db_writers);
    let batch_records = metrics::histogram!("audit_batch_records", "service" => "audit");
    let mut writing = FuturesOrdered::new();
    // Written batches waiting for room in the producing stage; meanwhile the other writes go on.
    let mut written = std::collections::VecDeque::new();
    let mut reading = true;
    loop {
        tokio::select! {
            biased;
            room = to_producer.reserve(), if !written.is_empty() => match (room, written.pop_front()) {
                (Ok(room), Some(batch)) => room.send(batch),
                _ => break, // The producing stage was abandoned.
            },
            done = writing.next(), if !writing.is_empty() => match done {
                Some(Some(batch)) => written.push_back(batch),
                // Stopped before the batch was durable: its offsets stay, it is redelivered.
                _ => break,
            },
            received = to_write.recv(), if reading && writing.len() + written.len() < db_writers => match received {
                Some((batch, decided)) => {
                    #[allow(clippy::cast_precision_loss)]
                    batch_records.record(batch.len() as f64);
                    let span = tracing::debug_span!(
                        "batch",
                        records = batch.len(),
                        accepted = decided.accepted.len(),
                        rejected = decided.rejected.len()
                    );
                    let batch = Batch { records: batch, decided };
                    writing.push_back(write_batch(batch, &writer).instrument(span));
                }
                None => reading = false,
            },
            else => break,
        }
    }
    stop_reading.cancel();
    drop(to_write);
    drop(writing);
    if let Err(error) = reader.await {
        // A panic while validating is a bug: end the service as one, as before the reading task.
        if error.is_panic() {
            std::panic::resume_unwind(error.into_panic());
        }
        tracing::error!(%error, "The reading stage failed.");
    }
    drop(to_producer);
    if let Err(error) = producer.await {
        tracing::error!(%error, "The producing stage failed.");
    }
    sink.flush();
    match std::sync::Arc::try_unwrap(source) {
        Ok(source) => source.close(CLOSE_TIMEOUT).await,
        Err(_) => {
            tracing::warn!("The consumer is still shared at shutdown; not closing it cleanly.")
        }
    }
    tracing::info!("Audit service stopped.");
    Ok(())
}

/// A batch read and validated.
struct Batch {
    records: Vec<OwnedMessage>,
    decided: Decided,
}

/// Where and how batches are written.
struct Writer<'a> {
    store: &'a dyn TelemetryStore,
    table: &'a Table,
    readiness: &'a telemetry_ops::Readiness,
    abandon: &'a CancellationToken,
    kafka: &'a KafkaConfig,
    /// For the device a rejected record is indexed under (its topic's, as the contract allows).
    validator: &'a Validator,
    contract_version: u32,
}

/// Writes a batch's accepted events to the table and its rejected records to the DLQ index, and
/// returns the batch with the records to produce for it; `None` if stopped first.
async fn write_batch(
    batch: Batch,
    writer: &Writer<'_>,
) -> Option<(Vec<OwnedMessage>, Vec<OutgoingRecord>)> {
    let Batch { records, decided } = batch;
    // The table first: what it refuses goes to the DLQ instead of the cleaned topic.
    let Written { refused, .. } = write_accepted(
        writer.store,
        writer.table,
        &decided.accepted,
        writer.readiness,
        writer.abandon,
    )
    .await?;
    let letters = dead_letters(&records, &decided, &refused, writer.contract_version);
    if !index_dead_letters(
        writer.store,
        &letters,
        writer.validator,
        writer.readiness,
        writer.abandon,
    )
    .await
    {
        return None;
    }
    let outgoing = outgoing_records(&decided, &letters, &refused, writer.kafka, writer.validator);
    drop(letters);
    Some((records, outgoing))
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

/// Batches written to the database whose records may still be waiting for Kafka: enough to
/// overlap one batch's database write with the previous one's produce.
const PIPELINE_DEPTH: usize = 2;

/// How long shutdown waits for the final offset commit and for leaving the consumer group.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What one batch turns into.
struct Decided {
    /// Accepted events, in batch order.
    accepted: Vec<CleanedRecord>,
    /// For each accepted event, the index of its record in the batch.
    accepted_index: Vec<usize>,
    /// Rejected records: index in the batch and reason.
    rejected: Vec<(usize, Rejection)>,
}

/// Validates every record of the batch, and flags `seq` gaps per device.
fn decide(
    batch: &[OwnedMessage],
    validator: &Validator,
    sequences: &mut SequenceTracker,
) -> Decided {
    let mut decided = Decided {
        accepted: Vec::with_capacity(batch.len()),
        accepted_index: Vec::with_capacity(batch.len()),
        rejected: Vec::new(),
    };
    metrics::counter!("events_received_total", "service" => "audit").increment(batch.len() as u64);
    for (index, message) in batch.iter().enumerate() {
        match validator.validate_received(&telemetry_kafka::received(message)) {
            Outcome::Accepted(mut event) => {
                sequences.observe(&mut event);
                count_quality(&event);
                let source = SourcePosition {
                    topic: message.topic().to_string(),
                    partition: message.partition(),
                    offset: message.offset(),
                };
                decided.accepted.push(CleanedRecord { event, source });
                decided.accepted_index.push(index);
            }
            Outcome::Rejected(rejection) => {
                metrics::counter!("events_rejected_total", "service" => "audit", "error_code" => rejection.code())
                    .increment(1);
                tracing::debug!(
                    partition = message.partition(),
                    offset = message.offset(),
                    code = rejection.code(),
                    "Rejected a record."
                );
                decided.rejected.push((index, rejection));
            }
        }
    }
    decided
}

/// Counts what normalization did to an accepted event.
fn count_quality(event: &telemetry_core::Event) {
    let quality = &event.quality;
    if quality.is_clean() {
        return;
    }
    let count = |name: &'static str, value: usize| {
        if value > 0 {
            metrics::counter!(name, "service" => "audit").increment(value as u64);
        }
    };
    count("fields_coerced_total", quality.coerced_fields.len());
    count("fields_converted_total", quality.converted_fields.len());
    count("fields_dropped_total", quality.dropped_fields.len());
    count("events_late_total", usize::from(quality.late));
    match quality.sequence {
        Some(SequenceCheck::Gap { missing, .. }) => {
            count("seq_gaps_total", 1);
            count(
                "seq_missing_total",
                usize::try_from(missing).unwrap_or(usize::MAX),
            );
        }
        Some(SequenceCheck::Regression { .. }) => count("seq_regressions_total", 1),
        Some(SequenceCheck::Repeat) => count("seq_repeats_total", 1),
        None => {}
    }
}

/// Inserts the accepted events, retrying while the database is unavailable. When the database
/// refuses the data itself, the batch is split in halves until the refused records are alone, so
/// one bad record never holds back the others. Returns the refused records (index in `accepted`
/// and the database's reason), or `None` if `shutdown` came first.
async fn write_accepted(
    store: &dyn TelemetryStore,
    table: &Table,
    records: &[CleanedRecord],
    readiness: &telemetry_ops::Readiness,
    shutdown: &CancellationToken,
) -> Option<Written> {
    let halved = telemetry_retry::retry_halving(
        "Writing to the database",
        records,
        shutdown,
        telemetry_store::Error::is_data_error,
        |chunk| async move {
            let started = std::time::Instant::now();
            let result = store.insert_events_into(table, chunk).await;
            metrics::histogram!("db_write_duration_seconds", "service" => "audit")
                .record(started.elapsed().as_secs_f64());
            match &result {
                Ok(_) => {
                    readiness.set(DATABASE, true);
                    metrics::counter!("events_written_total", "service" => "audit")
                        .increment(chunk.len() as u64);
                }
                Err(error) if error.is_data_error() => {}
                Err(_) => {
                    readiness.set(DATABASE, false);
                    metrics::counter!("db_write_retries_total", "service" => "audit").increment(1);
                }
            }
            result
        },
    )
    .await?;
    let mut refused = Vec::with_capacity(halved.refused.len());
    for (index, error) in halved.refused {
        tracing::warn!(%error, offset = records[index].source.offset, "The database refused a record; it goes to the DLQ.");
        metrics::counter!("events_rejected_total", "service" => "audit", "error_code" => DB_REJECTED)
            .increment(1);
        refused.push((index, error.to_string()));
    }
    Some(Written {
        refused,
        inserted: halved.done.iter().map(|(_, new)| new).sum(),
    })
}

/// What writing a batch's accepted events did.
struct Written {
    /// Records the database refused: index in the accepted events and the database's reason.
    refused: Vec<(usize, String)>,
    /// Rows that were new (the others were stored already).
    inserted: u64,
}

/// A rejected or refused record of the batch, with its reason, for the DLQ index.
struct Letter<'a> {
    /// Its index in the batch.
    index: usize,
    message: &'a OwnedMessage,
    code: &'static str,
    text: String,
    field: Option<&'a str>,
    rule: Option<&'a str>,
}

/// The batch's rejected records, then those the database refused, with their reasons.
fn dead_letters<'a>(
    batch: &'a [OwnedMessage],
    decided: &'a Decided,
    refused: &'a [(usize, String)],
    contract_version: u32,
) -> Vec<(Letter<'a>, u32)> {
    let mut letters = Vec::with_capacity(decided.rejected.len() + refused.len());
    for (index, rejection) in &decided.rejected {
        letters.push((
            Letter {
                index: *index,
                message: &batch[*index],
                code: rejection.code(),
                text: rejection.to_string(),
                field: rejection.field(),
                rule: Some(rejection.rule()),
            },
            contract_version,
        ));
    }
    for (position, reason) in refused {
        letters.push((
            Letter {
                index: decided.accepted_index[*position],
                message: &batch[decided.accepted_index[*position]],
                code: DB_REJECTED,
                text: format!("the database refused the record: {reason}"),
                field: None,
                rule: None,
            },
            contract_version,
        ));
    }
    letters
}

/// Indexes the batch's rejected records in the database (the API's DLQ view and device health),
/// retrying while the database is unavailable. `false` if `shutdown` came first. When the database
/// refuses the data itself, the batch is split in halves until the refused record is alone; that
/// one is logged and left out of the index (the DLQ topic has it all the same).
async fn index_dead_letters(
    store: &dyn TelemetryStore,
    letters: &[(Letter<'_>, u32)],
    validator: &Validator,
    readiness: &telemetry_ops::Readiness,
    shutdown: &CancellationToken,
) -> bool {
    if letters.is_empty() {
        return true;
    }
    let rows: Vec<_> = letters
        .iter()
        .map(|(letter, version)| telemetry_store::NewDeadLetter {
            source_topic: letter.message.topic(),
            source_partition: letter.message.partition(),
            source_offset: letter.message.offset(),
            // The topic's device as the contract allows it; a placeholder when it does not, so
            // a made-up topic is never merged with a real device, nor one entry per topic.
            device_id: validator.topic_device(letter.message.key()).name(),
            received_at: telemetry_kafka::received_at(letter.message),
            code: letter.code,
            message: &letter.text,
            field: letter.field,
            rule: letter.rule,
            contract_version: *version,
            payload: letter.message.payload().unwrap_or_default(),
        })
        .collect();
    let Some(halved) = telemetry_retry::retry_halving(
        "Indexing rejected records",
        &rows,
        shutdown,
        telemetry_store::Error::is_data_error,
        |chunk| async move {
            let result = store.insert_dead_letters(chunk).await;
            match &result {
                Ok(()) => readiness.set(DATABASE, true),
                Err(error) if error.is_data_error() => {}
                Err(_) => readiness.set(DATABASE, false),
            }
            result
        },
    )
    .await
    else {
        return false;
    };
    for (index, error) in halved.refused {
        tracing::warn!(%error, offset = rows[index].source_offset, "The database refused to index a rejected record; it is on the DLQ topic only.");
    }
    true
}

/// How often the DLQ index is pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// Keeps the DLQ index within its retention and size, and the per-minute device counts to two
/// days, once a minute until `shutdown`.
async fn prune_dead_letters(
    store: DynStore,
    retention_hours: u32,
    max_rows: u64,
    shutdown: CancellationToken,
) {
    loop {
        let older_than = chrono::Utc::now() - chrono::Duration::hours(i64::from(retention_hours));
        match store.prune_dead_letters(older_than, max_rows).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "Pruned the DLQ index."),
            Err(error) => {
                tracing::warn!(%error, "Could not prune the DLQ index; trying again later.")
            }
        }
        let two_days_ago = chrono::Utc::now() - chrono::Duration::days(2);
        if let Err(error) = store.prune_device_minutes(two_days_ago).await {
            tracing::warn!(%error, "Could not prune the per-minute device counts; trying again later.");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(PRUNE_INTERVAL) => {}
        }
    }
}

/// The DLQ records of rejected and refused records, and the cleaned records of stored events.
fn outgoing_records(
    decided: &Decided,
    letters: &[(Letter<'_>, u32)],
    refused: &[(usize, String)],
    kafka: &KafkaConfig,
    validator: &Validator,
) -> Vec<OutgoingRecord> {
    let mut outgoing = Vec::with_capacity(decided.accepted.len() + letters.len());
    let dlq_topic: std::sync::Arc<str> = std::sync::Arc::from(kafka.dlq_topic.as_str());
    let cleaned_topic: std::sync::Arc<str> = std::sync::Arc::from(kafka.cleaned_topic.as_str());
    for (letter, contract_version) in letters {
        outgoing.push(OutgoingRecord::dead_letter(
            &dlq_topic,
            letter.index,
            letter.message,
            &DeadLetter {
                device: validator.topic_device(letter.message.key()).name(),
                code: letter.code,
                message: &letter.text,
                field: letter.field,
                rule: letter.rule,
                contract_version: *contract_version,
            },
        ));
    }
    let mut refused = refused.iter().peekable();
    for (position, record) in decided.accepted.iter().enumerate() {
        if refused
            .next_if(|(refused_at, _)| *refused_at == position)
            .is_some()
        {
            continue;
        }
        let source = decided.accepted_index[position];
        match OutgoingRecord::cleaned(&cleaned_topic, source, record) {
            Ok(record) => outgoing.push(record),
            Err(error) => {
                tracing::error!(%error, "Could not encode a cleaned event; it is in the table but not on the cleaned topic.");
            }
        }
    }
    outgoing
}
