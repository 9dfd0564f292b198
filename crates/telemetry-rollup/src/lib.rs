//! `telemetry rollup`: a consumer group on the cleaned topic that keeps per-device, per-metric
//! aggregates (count, min, max, avg, last) by minute and by hour of device time in the
//! `rollup_1m` and `rollup_1h` tables. The API reads them for long ranges.
//!
//! It is also the worked example of adding a consumer (`docs/architecture.md`): it reads the
//! cleaned topic in its own consumer group with [`telemetry_kafka::BatchConsumer`], writes only
//! its own tables, and touches neither the bridge nor the audit service.
//!
//! Delivery: each batch is folded in one database transaction ([`Store::roll_up`]), and its
//! offsets are committed only after that transaction. The fold skips events it folded before, so
//! redelivery after a crash, a duplicate on the topic, or a replay of the whole topic leaves the
//! tables as they were. Events behind their device's watermark (its latest device time) by more
//! than the late window are left out and counted (`rollup_events_too_late_total`); the
//! `telemetry` table still has them.
//!
//! # Layout
//! - [`RollupConfig`]: every setting, with its flag and environment variable.
//! - [`run`]: serve `/healthz`, `/readyz`, `/metrics`; connect, migrate; then batch → decode →
//!   fold → commit offsets.

pub mod instruments;

use std::time::Duration;

use rdkafka::message::{Message, OwnedMessage};
use telemetry_consumer::{DatabaseConfig, Service, Started, Writes};
use telemetry_core::validate::MAX_TIMESTAMP_MS;
use telemetry_core::Event;
use telemetry_kafka::{BatchConsumer, KafkaConfig};
use telemetry_store::{DynStore, RollupOutcome};
use tokio_util::sync::CancellationToken;

/// Errors that stop the rollup service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Kafka set-up failed.
    #[error(transparent)]
    Kafka(#[from] telemetry_kafka::Error),
    /// The database could not be set up.
    #[error(transparent)]
    Store(#[from] telemetry_store::Error),
    /// The HTTP listener could not be bound or served.
    #[error(transparent)]
    Listen(#[from] telemetry_ops::ListenError),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Rollup service settings.
#[derive(Debug, Clone, clap::Args)]
pub struct RollupConfig {
    /// The database (its pool: 2 connections unless set).
    #[command(flatten)]
    pub database: DatabaseConfig,

    /// Kafka consumer group of the rollup. Instances in one group share the partitions; a new
    /// group starts from the beginning of the cleaned topic.
    #[arg(
        long,
        env = "TELEMETRY_ROLLUP_GROUP",
        default_value = "telemetry-rollup"
    )]
    pub group_id: String,

    /// Most records folded per batch (one database transaction). A batch writes one row per
    /// device, metric and bucket it touches, so larger batches fold faster
    /// (`docs/benchmarks.md`).
    #[arg(long, env = "TELEMETRY_ROLLUP_BATCH_SIZE", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,

    /// Longest wait for a batch to fill before it is folded anyway, in milliseconds.
    #[arg(long, env = "TELEMETRY_ROLLUP_BATCH_LINGER_MS", default_value_t = 500)]
    pub batch_linger_ms: u64,

    /// How far behind its device's latest device time an event may arrive and still be folded
    /// in, in seconds. Later ones are counted and left out of the rollups (the `telemetry` table
    /// has them). Also how long event identities are remembered to skip duplicates.
    #[arg(long, env = "TELEMETRY_ROLLUP_LATE_WINDOW_SECONDS", default_value_t = 600,
          value_parser = clap::value_parser!(u32).range(0..=30 * 24 * 3600))]
    pub late_window_seconds: u32,

    /// Address of the HTTP server (`/healthz`, `/readyz`, `/metrics`).
    #[arg(
        long = "rollup-listen",
        env = "TELEMETRY_ROLLUP_LISTEN",
        default_value = "127.0.0.1:8083"
    )]
    pub listen: String,

    /// Header-read and idle timeouts and the connection cap of the HTTP server.
    #[command(flatten)]
    pub http: telemetry_ops::HttpLimits,

    /// Kafka settings.
    #[command(flatten)]
    pub kafka: KafkaConfig,
}

/// Runs the rollup service until `shutdown` is cancelled. A batch in hand then is dropped
/// uncommitted (its transaction rolls back) and read again on the next start.
pub async fn run(config: RollupConfig, shutdown: CancellationToken) -> Result<()> {
    let kafka = &config.kafka;
    Service {
        service: instruments::SERVICE,
        listen: &config.listen,
        http: &config.http,
        database: &config.database,
        connections: 2,
        kafka,
        topics: &[&kafka.cleaned_topic],
    }
    .run(shutdown, |started| consume(&config, started))
    .await
}

/// Batch after batch: decode, fold, then store the offsets, until shutdown.
async fn consume(config: &RollupConfig, started: Started) -> Result<()> {
    let Started {
        store,
        writes,
        shutdown,
    } = started;
    let shutdown = &shutdown;
    let kafka = &config.kafka;
    // Folding costs per batch and nothing waits on it: batches fill for the linger.
    let consumer =
        BatchConsumer::new(kafka, &config.group_id, &[kafka.cleaned_topic.as_str()])?.filling();
    let late_window_ms = i64::from(config.late_window_seconds) * 1_000;
    tracing::info!(
        cleaned_topic = %kafka.cleaned_topic,
        group_id = %config.group_id,
        late_window_seconds = config.late_window_seconds,
        "Rollup service started."
    );
    let linger = Duration::from_millis(config.batch_linger_ms);
    let batch_size = usize::try_from(config.batch_size).unwrap_or(usize::MAX);
    while let Some(batch) = consumer.next_batch(batch_size, linger, shutdown).await {
        let events = decode(&batch);
        let Some(outcome) = fold(&store, &events, late_window_ms, &writes, shutdown).await else {
            break; // Stopped first: the batch is read again on the next start.
        };
        count(&outcome, batch.len());
        consumer.store_offsets(&batch);
    }
    consumer.close(Duration::from_secs(5)).await;
    tracing::info!("Rollup service stopped.");
    Ok(())
}

/// The events of `batch`. Records that are not cleaned events (another producer's, or damaged)
/// are logged with their position, counted, and left out: the topic keeps them.
fn decode(batch: &[OwnedMessage]) -> Vec<Event> {
    let mut events = Vec::with_capacity(batch.len());
    for message in batch {
        let problem = match serde_json::from_slice::<Event>(message.payload().unwrap_or_default()) {
            Ok(event) => match storable(&event) {
                None => {
                    events.push(event);
                    continue;
                }
                Some(problem) => problem.to_string(),
            },
            Err(error) => format!("not a cleaned event: {error}"),
        };
        instruments::counter(&instruments::RECORDS_INVALID).increment(1);
        tracing::warn!(
            topic = message.topic(),
            partition = message.partition(),
            offset = message.offset(),
            %problem,
            "Skipped a record of the cleaned topic."
        );
    }
    events
}

/// How far ahead of its arrival a device time may be. The contract allows minutes (its clock-skew
/// limit); a time further ahead would move the device's watermark on and leave every later event
/// of the device behind the late window.
const MAX_AHEAD_OF_ARRIVAL_MS: i64 = 24 * 3_600_000;

/// Why `event` cannot be folded in, if it cannot: the validator never produces such events, but
/// the cleaned topic is open to other producers.
fn storable(event: &Event) -> Option<&'static str> {
    if event.device_id.is_empty() || event.device_id.chars().count() > 128 {
        Some("device_id is empty or longer than 128 characters")
    } else if !(0..=MAX_TIMESTAMP_MS).contains(&event.device_ts) {
        Some("device_ts is outside the years 1970-9999")
    } else if event.device_ts > event.received_at.saturating_add(MAX_AHEAD_OF_ARRIVAL_MS) {
        Some("device_ts is more than a day ahead of received_at")
    } else {
        None
    }
}

/// Folds `events`, retrying while the database is unavailable. Should the database refuse the
/// data itself, the batch is split in halves (in stream order) until each refused event is alone;
/// those are logged and left out, so one record never holds back the stream. `None` when
/// `shutdown` came first.
async fn fold(
    store: &DynStore,
    events: &[Event],
    late_window_ms: i64,
    writes: &Writes,
    shutdown: &CancellationToken,
) -> Option<RollupOutcome> {
    let halved = writes
        .halving("Writing the rollups", events, shutdown, |chunk| {
            store.roll_up(chunk, late_window_ms)
        })
        .await?;
    for (index, error) in halved.refused {
        let event = &events[index];
        instruments::counter(&instruments::RECORDS_INVALID).increment(1);
        tracing::error!(%error, device_id = %event.device_id, device_ts = event.device_ts,
            "The database refused a rollup; the event is left out of the rollups.");
    }
    let mut total = RollupOutcome::default();
    for (_, outcome) in halved.done {
        total.folded += outcome.folded;
        total.duplicates += outcome.duplicates;
        total.too_late += outcome.too_late;
        total.skipped_readings += outcome.skipped_readings;
    }
    Some(total)
}

fn count(outcome: &RollupOutcome, records: usize) {
    instruments::counter(&telemetry_metrics::EVENTS_RECEIVED).increment(records as u64);
    instruments::counter(&instruments::EVENTS_FOLDED).increment(outcome.folded);
    instruments::counter(&instruments::EVENTS_DUPLICATE).increment(outcome.duplicates);
    instruments::counter(&instruments::EVENTS_TOO_LATE).increment(outcome.too_late);
    instruments::counter(&instruments::READINGS_SKIPPED).increment(outcome.skipped_readings);
    if outcome.too_late > 0 {
        tracing::info!(
            events = outcome.too_late,
            "Events arrived later than the late window; they are in the telemetry table but not in the rollups."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(device_id: &str, device_ts: i64) -> Event {
        Event {
            device_id: device_id.to_string(),
            device_ts,
            received_at: device_ts,
            seq: None,
            metrics: telemetry_core::event::Metrics::new(),
            attributes: Default::default(),
            schema_version: 1,
            quality: Default::default(),
        }
    }

    #[test]
    fn events_the_tables_cannot_hold_are_named() {
        assert_eq!(storable(&event("pico-1", 1_700_000_000_000)), None);
        assert!(storable(&event("", 1_700_000_000_000)).is_some());
        assert!(storable(&event(&"x".repeat(129), 1_700_000_000_000)).is_some());
        assert!(storable(&event("pico-1", -1)).is_some());
        assert!(storable(&event("pico-1", MAX_TIMESTAMP_MS + 1)).is_some());
        let mut ahead = event("pico-1", 1_700_000_000_000 + MAX_AHEAD_OF_ARRIVAL_MS + 1);
        ahead.received_at = 1_700_000_000_000;
        assert!(storable(&ahead).is_some());
    }
}
