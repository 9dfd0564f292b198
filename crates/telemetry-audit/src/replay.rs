//! `telemetry replay`: runs validation and normalization again over a range of the raw topic,
//! into the live table (idempotent: stored events are skipped) or into a new table for a schema
//! change, which `telemetry replay swap` then makes the live one.
//!
//! The replay reads partitions it assigns itself (no group membership, no rebalance) and never
//! commits an offset, so the audit service's consumer group and its offsets are untouched. Ends are
//! fixed when it starts: `latest` means the end of each partition at that moment.

use std::collections::{BTreeMap, HashSet};
use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use telemetry_core::{SequenceTracker, Validator};
use telemetry_kafka::KafkaConfig;
use telemetry_store::{Table, TelemetryStore};
use tokio_util::sync::CancellationToken;

use telemetry_consumer::Writes;

use crate::decide::decide;
use crate::write::{write_accepted, Written};
use crate::{load_contract, Error, Result, DATABASE, DB_REJECTED};

/// How long a Kafka metadata or offset lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a batch to fill before it is written anyway.
const LINGER: Duration = Duration::from_millis(50);
/// How often progress lines are printed when stderr is not a terminal.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Where a replay starts or stops in each partition of the raw topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// The first record still in the topic.
    Earliest,
    /// The end of the partition when the replay starts.
    Latest,
    /// This offset in every partition (clamped to what the partition has).
    Offset(i64),
    /// The first record with a Kafka timestamp at or after this time (UTC milliseconds).
    Time(i64),
}

impl std::str::FromStr for Position {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, Self::Err> {
        match text {
            "earliest" => return Ok(Position::Earliest),
            "latest" => return Ok(Position::Latest),
            _ => {}
        }
        if let Some(offset) = text.strip_prefix("offset:") {
            return offset
                .parse::<i64>()
                .ok()
                .filter(|offset| *offset >= 0)
                .map(Position::Offset)
                .ok_or_else(|| format!("`{offset}` is not an offset (a whole number from 0)"));
        }
        DateTime::parse_from_rfc3339(text)
            .map(|time| Position::Time(time.with_timezone(&Utc).timestamp_millis()))
            .map_err(|_| {
                format!(
                    "`{text}` is not a position: use earliest, latest, offset:N or an RFC 3339 \
                     time such as 2026-11-29T10:00:00Z"
                )
            })
    }
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A bar on a terminal, plain lines otherwise.
    Auto,
    /// Always a bar.
    Bar,
    /// Always plain lines.
    Lines,
    /// Nothing until the summary.
    None,
}

/// Replay settings.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayConfig {
    /// MySQL/MariaDB URL of the telemetry database (`--into` and `swap` need an account that may
    /// create and rename tables: the owner's); `sqlite://<file>` for `telemetry up`'s store.
    #[arg(
        long,
        env = "TELEMETRY_MYSQL_URL",
        hide_env_values = true,
        default_value = telemetry_store::DEFAULT_MYSQL_URL,
        hide_default_value = true
    )]
    pub mysql_url: String,

    /// Where to start in every partition: `earliest`, `offset:N`, or an RFC 3339 time (the first
    /// record the broker received at or after it).
    #[arg(long, default_value = "earliest")]
    pub from: Position,

    /// Where to stop (exclusive): `latest` (the end when the replay starts), `offset:N`, or an RFC
    /// 3339 time.
    #[arg(long, default_value = "latest")]
    pub to: Position,

    /// Only this device's events (repeat for more). Accepted events are matched by their
    /// `device_id`, rejected records by the device of their MQTT topic.
    #[arg(long = "device")]
    pub devices: Vec<String>,

    /// Write into this table instead of the live `telemetry` (created as a copy of its schema when
    /// missing); make it live later with `telemetry replay swap --table NAME`.
    #[arg(long)]
    pub into: Option<String>,

    /// The payload contract to validate with (as `telemetry audit --contract`).
    #[arg(long, env = "TELEMETRY_CONTRACT")]
    pub contract: Option<std::path::PathBuf>,

    /// Records written per database transaction.
    #[arg(long, default_value_t = 5_000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,

    /// Consumer group id the replay's consumer carries. It never joins the group's assignment
    /// nor commits offsets: partitions are assigned directly.
    #[arg(long, default_value = "telemetry-replay")]
    pub group_id: String,

    /// How progress is shown on stderr.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,

    /// Kafka settings.
    #[command(flatten)]
    pub kafka: KafkaConfig,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Records read from the raw topic within the range.
    pub read: u64,
    /// Records that passed the contract (and the device filter).
    pub accepted: u64,
    /// Accepted events that were new rows.
    pub inserted: u64,
    /// Accepted events already in the table, skipped.
    pub duplicates: u64,
    /// Records rejected, by reason code.
    pub rejected: BTreeMap<String, u64>,
    /// Records of other devices, left out by `--device`.
    pub filtered_out: u64,
    /// The table written.
    pub table: String,
    /// Records in the range when the replay started.
    pub expected: u64,
    /// Whether it was stopped (Ctrl-C) before the end of the range.
    pub stopped_early: bool,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rejected: u64 = self.rejected.values().sum();
        if self.stopped_early {
            writeln!(
                f,
                "STOPPED EARLY: replayed {} of {} records into `{}`; run it again to finish (stored events are skipped):",
                self.read, self.expected, self.table
            )?;
        } else {
            writeln!(f, "replayed {} records into `{}`:", self.read, self.table)?;
        }
        writeln!(
            f,
            "  accepted    {} ({} new rows, {} duplicates skipped)",
            self.accepted, self.inserted, self.duplicates
        )?;
        writeln!(f, "  rejected    {rejected}")?;
        for (code, count) in &self.rejected {
            writeln!(f, "    {code:<24} {count}")?;
        }
        if self.filtered_out > 0 {
            writeln!(f, "  other devices, left out: {}", self.filtered_out)?;
        }
        Ok(())
    }
}

/// Replays the range, then returns what it did. Stops early (with what was done) on `shutdown`.
pub async fn run(config: ReplayConfig, shutdown: CancellationToken) -> Result<Summary> {
    let validator = Validator::new(load_contract(config.contract.as_deref())?)?;
    let table = match &config.into {
        Some(name) => Table::new(name)?,
        None => Table::live(),
    };
    let store = telemetry_store::open_now(&config.mysql_url, 2).await?;
    store.prepare_rebuild(&table).await?;

    let consumer: StreamConsumer = config
        .kafka
        .client_config(&[
            ("group.id", config.group_id.as_str()),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("enable.partition.eof", "true"),
            ("auto.offset.reset", "earliest"),
        ])?
        .create()
        .map_err(telemetry_kafka::Error::from)?;
    let ranges = ranges(&consumer, &config.kafka.raw_topic, config.from, config.to)?;
    let total: i64 = ranges.values().map(|(start, end)| end - start).sum();
    let mut assignment = TopicPartitionList::new();
    for (partition, (start, _)) in ranges.iter().filter(|(_, (start, end))| start < end) {
        assignment
            .add_partition_offset(&config.kafka.raw_topic, *partition, Offset::Offset(*start))
            .map_err(telemetry_kafka::Error::from)?;
    }
    let mut open: HashSet<i32> = ranges
        .iter()
        .filter(|(_, (start, end))| start < end)
        .map(|(partition, _)| *partition)
        .collect();
    let mut progress = Progress::new(config.progress, u64::try_from(total).unwrap_or(0));
    tracing::info!(
        raw_topic = %config.kafka.raw_topic,
        table = %table,
        records = total,
        partitions = open.len(),
        "Replay started."
    );
    if !open.is_empty() {
        consumer
            .assign(&assignment)
            .map_err(telemetry_kafka::Error::from)?;
    }

    let devices: HashSet<&str> = config.devices.iter().map(String::as_str).collect();
    // Counted as the audit service's writes (its label), as the live path counts them.
    let writes = Writes::new(
        crate::instruments::SERVICE,
        telemetry_ops::Readiness::new(&[DATABASE]),
    );
    let mut sequences = SequenceTracker::new();
    let mut summary = Summary {
        table: table.to_string(),
        expected: u64::try_from(total).unwrap_or(0),
        ..Summary::default()
    };
    let batch_size = usize::try_from(config.batch_size).unwrap_or(usize::MAX);
    let mut batch: Vec<OwnedMessage> = Vec::with_capacity(batch_size);
    while !open.is_empty() || !batch.is_empty() {
        let deadline = tokio::time::Instant::now() + LINGER;
        while !open.is_empty() && batch.len() < batch_size {
            let received = tokio::select! {
                () = shutdown.cancelled() => {
                    summary.stopped_early = true;
                    return Ok(summary);
                }
                () = tokio::time::sleep_until(deadline) => break,
                received = consumer.recv() => received,
            };
            match received {
                Ok(message) => {
                    let partition = message.partition();
                    let Some((_, end)) = ranges.get(&partition) else {
                        continue;
                    };
                    if message.offset() + 1 >= *end {
                        open.remove(&partition);
                    }
                    if message.offset() < *end {
                        batch.push(message.detach());
                    }
                }
                Err(KafkaError::PartitionEOF(partition)) => {
                    open.remove(&partition);
                }
                Err(error) => {
                    tracing::warn!(%error, "Reading the raw topic failed; retrying.");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        if !handle(
            store.as_ref(),
            &table,
            &validator,
            &mut sequences,
            &devices,
            &batch,
            &writes,
            &shutdown,
            &mut summary,
        )
        .await
        {
            summary.stopped_early = true;
            return Ok(summary);
        }
        progress.advance(batch.len() as u64);
        batch.clear();
    }
    progress.finish();
    tracing::info!(
        table = %table,
        read = summary.read,
        inserted = summary.inserted,
        duplicates = summary.duplicates,
        "Replay finished."
    );
    Ok(summary)
}

/// Validates and writes one batch; `false` if `shutdown` came first.
#[allow(clippy::too_many_arguments)]
async fn handle(
    store: &dyn TelemetryStore,
    table: &Table,
    validator: &Validator,
    sequences: &mut SequenceTracker,
    devices: &HashSet<&str>,
    batch: &[OwnedMessage],
    writes: &Writes,
    shutdown: &CancellationToken,
    summary: &mut Summary,
) -> bool {
    let mut decided = decide(batch, validator, sequences);
    if !devices.is_empty() {
        let before = decided.accepted.len() + decided.rejected.len();
        decided
            .accepted
            .retain(|record| devices.contains(record.event.device_id.as_str()));
        decided.rejected.retain(|(index, _)| {
            batch[*index]
                .key()
                .and_then(|key| std::str::from_utf8(key).ok())
                .is_some_and(|key| devices.contains(key))
        });
        let after = decided.accepted.len() + decided.rejected.len();
        summary.filtered_out += (before - after) as u64;
    }
    let Some(Written { refused, inserted }) =
        write_accepted(store, table, &decided.accepted, writes, shutdown).await
    else {
        return false;
    };
    // Counted once the batch is written: a stopped replay reports only what it did.
    summary.read += batch.len() as u64;
    for (_, rejection) in &decided.rejected {
        *summary
            .rejected
            .entry(rejection.code().to_string())
            .or_default() += 1;
    }
    let accepted = (decided.accepted.len() - refused.len()) as u64;
    if !refused.is_empty() {
        *summary.rejected.entry(DB_REJECTED.to_string()).or_default() += refused.len() as u64;
    }
    summary.accepted += accepted;
    summary.inserted += inserted;
    summary.duplicates += accepted.saturating_sub(inserted);
    true
}

/// `[start, end)` offsets of every partition of `topic` for the positions.
pub(crate) fn ranges(
    consumer: &StreamConsumer,
    topic: &str,
    from: Position,
    to: Position,
) -> Result<BTreeMap<i32, (i64, i64)>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), LOOKUP_TIMEOUT)
        .map_err(telemetry_kafka::Error::from)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|found| found.name() == topic)
        .flat_map(|found| found.partitions().iter().map(|partition| partition.id()))
        .collect();
    if partitions.is_empty() {
        return Err(Error::Tool(format!(
            "the raw topic `{topic}` has no partitions (does it exist?)"
        )));
    }
    let mut ranges = BTreeMap::new();
    for partition in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, LOOKUP_TIMEOUT)
            .map_err(telemetry_kafka::Error::from)?;
        let start = offset_of(consumer, topic, partition, from, (low, high))?;
        let end = offset_of(consumer, topic, partition, to, (low, high))?.max(start);
        ranges.insert(partition, (start, end));
    }
    Ok(ranges)
}

/// The offset `position` names in one partition whose records are `[low, high)`.
fn offset_of(
    consumer: &StreamConsumer,
    topic: &str,
    partition: i32,
    position: Position,
    (low, high): (i64, i64),
) -> Result<i64> {
    Ok(match position {
        Position::Earliest => low,
        Position::Latest => high,
        Position::Offset(offset) => offset.clamp(low, high),
        Position::Time(millis) => {
            let mut query = TopicPartitionList::new();
            query
                .add_partition_offset(topic, partition, Offset::Offset(millis))
                .map_err(telemetry_kafka::Error::from)?;
            let found = consumer
                .offsets_for_times(query, LOOKUP_TIMEOUT)
                .map_err(telemetry_kafka::Error::from)?;
            match found
                .find_partition(topic, partition)
                .map(|element| element.offset())
            {
                Some(Offset::Offset(offset)) => offset.clamp(low, high),
                // No record at or after the time: the end.
                _ => high,
            }
        }
    })
}

/// Progress on stderr: a bar with records/s and ETA on a terminal, plain lines otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    started: Instant,
    done: u64,
    last_line: Instant,
    lines: bool,
}

impl Progress {
    fn new(mode: ProgressMode, total: u64) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let (bar, lines) = match mode {
            ProgressMode::Bar => (true, false),
            ProgressMode::Lines => (false, true),
            ProgressMode::None => (false, false),
            ProgressMode::Auto => (terminal, !terminal),
        };
        let bar = bar.then(|| {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} records  {per_sec}  ETA {eta}",
            ) {
                bar.set_style(style);
            }
            bar
        });
        Progress {
            bar,
            total,
            started: Instant::now(),
            done: 0,
            last_line: Instant::now(),
            lines,
        }
    }

    fn advance(&mut self, records: u64) {
        self.done += records;
        if let Some(bar) = &self.bar {
            bar.set_position(self.done);
        }
        if self.lines && self.last_line.elapsed() >= PROGRESS_EVERY {
            self.last_line = Instant::now();
            self.line(self.done);
        }
    }

    // Progress figures are estimates; f64 is exact far beyond any topic's record count.
    #[allow(clippy::cast_precision_loss)]
    fn line(&self, done: u64) {
        let seconds = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / seconds;
        let left = self.total.saturating_sub(done) as f64 / rate.max(1.0);
        let percent = if self.total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / self.total as f64
        };
        eprintln!(
            "replay: {done}/{} records ({percent:.1}%), {rate:.0} records/s, ETA {left:.0} s",
            self.total
        );
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
        if self.lines {
            self.line(self.done);
        }
    }
}

/// Settings of `telemetry replay swap`.
#[derive(Debug, Clone, clap::Args)]
pub struct SwapConfig {
    /// MySQL/MariaDB URL of the telemetry database (`--into` and `swap` need an account that may
    /// create and rename tables: the owner's); `sqlite://<file>` for `telemetry up`'s store.
    #[arg(
        long,
        env = "TELEMETRY_MYSQL_URL",
        hide_env_values = true,
        default_value = telemetry_store::DEFAULT_MYSQL_URL,
        hide_default_value = true
    )]
    pub mysql_url: String,

    /// The rebuilt table to make live (as given to `telemetry replay --into`).
    #[arg(long)]
    pub table: String,

    /// The name the current live table is kept under; default `telemetry_before_<UTC time>`.
    #[arg(long)]
    pub keep_as: Option<String>,
}

/// Makes the rebuilt table live in one atomic rename; returns the name the old table is kept as.
pub async fn swap(config: SwapConfig) -> Result<String> {
    let table = Table::new(&config.table)?;
    if table.is_live() {
        return Err(Error::Tool(
            "--table names the live table; give the rebuilt one".into(),
        ));
    }
    let keep_as = match &config.keep_as {
        Some(name) => Table::new(name)?,
        None => Table::new(&format!(
            "telemetry_before_{}",
            Utc::now().format("%Y%m%d%H%M%S")
        ))?,
    };
    let store = telemetry_store::open_now(&config.mysql_url, 1).await?;
    store.swap_into_live(&table, &keep_as).await?;
    tracing::info!(table = %table, kept_as = %keep_as, "The rebuilt table is live.");
    Ok(keep_as.to_string())
}
