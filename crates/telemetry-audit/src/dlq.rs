//! `telemetry dlq list|show|stats`: the rejected records in the DLQ topic, as Kafka has them (every
//! header, the original bytes), filtered by device, reason code and time. Read-only: it assigns
//! itself the partitions and commits nothing. What devices chose (payloads, device ids, topics,
//! header values) reaches the operator's terminal through [`printable`] only.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use telemetry_core::names::headers;
use telemetry_kafka::KafkaConfig;

use crate::replay::{ranges, Position};
use crate::{Error, Result};

/// Which DLQ records to read.
#[derive(Debug, Clone, clap::Args)]
pub struct DlqFilter {
    /// Only this device's records (the device of the MQTT topic they were published to).
    #[arg(long)]
    pub device: Option<String>,

    /// Only records with this reason code (`error.code`), e.g. `invalid_json`.
    #[arg(long)]
    pub code: Option<String>,

    /// From this time (RFC 3339, when the DLQ record was written); default: 24 hours ago.
    #[arg(long)]
    pub since: Option<DateTime<Utc>>,

    /// Until this time (exclusive); default: now.
    #[arg(long)]
    pub until: Option<DateTime<Utc>>,

    /// Kafka settings (the DLQ topic is `--dlq-topic`).
    #[command(flatten)]
    pub kafka: KafkaConfig,
}

/// One record of the DLQ topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadRecord {
    /// Partition in the DLQ topic.
    pub partition: i32,
    /// Offset in that partition.
    pub offset: i64,
    /// When Kafka stored it, UTC milliseconds.
    pub timestamp: Option<i64>,
    /// Its key: the device of its MQTT topic, as the bridge keyed the raw record.
    pub key: Option<String>,
    /// Every header, in order, values as text when they are UTF-8.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// The original bytes.
    pub payload: Vec<u8>,
}

impl DeadRecord {
    fn new(message: &OwnedMessage) -> Self {
        DeadRecord {
            partition: message.partition(),
            offset: message.offset(),
            timestamp: message.timestamp().to_millis(),
            key: message
                .key()
                .map(|key| String::from_utf8_lossy(key).into_owned()),
            headers: message.headers().map_or_else(Vec::new, |record_headers| {
                record_headers
                    .iter()
                    .map(|header| (header.key.to_string(), header.value.map(<[u8]>::to_vec)))
                    .collect()
            }),
            payload: message.payload().unwrap_or_default().to_vec(),
        }
    }

    /// The value of header `key` as text.
    pub fn header(&self, key: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(name, _)| name == key)
            .and_then(|(_, value)| value.as_deref())
            .map(|value| String::from_utf8_lossy(value).into_owned())
    }

    /// The reason code.
    pub fn code(&self) -> String {
        self.header(headers::ERROR_CODE)
            .unwrap_or_else(|| String::from("(none)"))
    }
}

/// The DLQ records matching `filter`, oldest first per partition, partitions in order.
pub async fn read(filter: &DlqFilter) -> Result<Vec<DeadRecord>> {
    let now = Utc::now();
    let since = filter.since.unwrap_or(now - chrono::Duration::days(1));
    let until = filter.until.unwrap_or(now);
    let topic = filter.kafka.dlq_topic.as_str();
    let consumer = reader(&filter.kafka)?;
    let ranges = ranges(
        &consumer,
        topic,
        Position::Time(since.timestamp_millis()),
        Position::Time(until.timestamp_millis()),
    )?;
    let records = read_ranges(&consumer, topic, &ranges).await?;
    Ok(records
        .iter()
        .map(DeadRecord::new)
        .filter(|record| {
            filter
                .device
                .as_ref()
                .is_none_or(|device| record.key.as_ref() == Some(device))
                && filter
                    .code
                    .as_ref()
                    .is_none_or(|code| record.header(headers::ERROR_CODE).as_ref() == Some(code))
        })
        .collect())
}

/// Settings of `telemetry dlq show`.
#[derive(Debug, Clone, clap::Args)]
pub struct ShowConfig {
    /// Partition of the record in the DLQ topic (as `dlq list` prints it: PARTITION:OFFSET).
    #[arg(long)]
    pub partition: i32,

    /// Offset of the record in that partition.
    #[arg(long)]
    pub offset: i64,

    /// Kafka settings (the DLQ topic is `--dlq-topic`).
    #[command(flatten)]
    pub kafka: KafkaConfig,
}

/// One DLQ record by its position.
pub async fn show(config: &ShowConfig) -> Result<DeadRecord> {
    let (kafka, partition, offset) = (&config.kafka, config.partition, config.offset);
    let topic = kafka.dlq_topic.as_str();
    let consumer = reader(kafka)?;
    let mut ranges = BTreeMap::new();
    ranges.insert(partition, (offset, offset + 1));
    let records = read_ranges(&consumer, topic, &ranges).await?;
    records
        .iter()
        .find(|message| message.offset() == offset)
        .map(DeadRecord::new)
        .ok_or_else(|| {
            Error::Tool(format!(
                "the DLQ topic `{topic}` has no record at partition {partition}, offset {offset}"
            ))
        })
}

/// A consumer that reads partitions it assigns itself, commits nothing and reports their ends.
fn reader(kafka: &KafkaConfig) -> Result<StreamConsumer> {
    Ok(kafka
        .client_config(&[
            ("group.id", "telemetry-dlq-reader"),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("enable.partition.eof", "true"),
            // A start offset retention removed meanwhile: read from the oldest left, not the end.
            ("auto.offset.reset", "earliest"),
        ])?
        .create()
        .map_err(telemetry_kafka::Error::from)?)
}

/// Reads `[start, end)` of every partition in `ranges`.
async fn read_ranges(
    consumer: &StreamConsumer,
    topic: &str,
    ranges: &BTreeMap<i32, (i64, i64)>,
) -> Result<Vec<OwnedMessage>> {
    let mut assignment = TopicPartitionList::new();
    let mut open = HashSet::new();
    for (partition, (start, end)) in ranges {
        if start < end {
            assignment
                .add_partition_offset(topic, *partition, Offset::Offset(*start))
                .map_err(telemetry_kafka::Error::from)?;
            open.insert(*partition);
        }
    }
    let mut records = Vec::new();
    if open.is_empty() {
        return Ok(records);
    }
    consumer
        .assign(&assignment)
        .map_err(telemetry_kafka::Error::from)?;
    while !open.is_empty() {
        match tokio::time::timeout(READ_TIMEOUT, consumer.recv()).await {
            Err(_) => {
                return Err(Error::Tool(format!(
                    "the DLQ topic `{topic}` sent nothing for {} s",
                    READ_TIMEOUT.as_secs()
                )))
            }
            Ok(Ok(message)) => {
                let partition = message.partition();
                let Some((_, end)) = ranges.get(&partition) else {
                    continue;
                };
                if message.offset() + 1 >= *end {
                    open.remove(&partition);
                }
                if message.offset() < *end {
                    records.push(message.detach());
                }
            }
            Ok(Err(KafkaError::PartitionEOF(partition))) => {
                open.remove(&partition);
            }
            Ok(Err(error)) => return Err(telemetry_kafka::Error::from(error).into()),
        }
    }
    Ok(records)
}

/// Longest wait for the next DLQ record while some are still expected.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Counts by reason code and by device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records counted.
    pub total: u64,
    /// Records per reason code.
    pub by_code: BTreeMap<String, u64>,
    /// Records per device (`(none)` for records without one).
    pub by_device: BTreeMap<String, u64>,
}

/// Counts `records` by code and device.
pub fn stats(records: &[DeadRecord]) -> Stats {
    let mut stats = Stats::default();
    for record in records {
        stats.total += 1;
        *stats.by_code.entry(record.code()).or_default() += 1;
        let device = record.key.clone().unwrap_or_else(|| String::from("(none)"));
        *stats.by_device.entry(device).or_default() += 1;
    }
    stats
}

/// `text` safe to print to a terminal, ordinary text unchanged: control characters (C0 such as
/// ESC and CR, DEL, C1) and the invisible characters that reorder or break lines (Unicode bidi
/// overrides and isolates, line and paragraph separators) are written out as escapes: `\t`,
/// `\n`, `\r`, `\x1b`, `\u{9b}`, `\u{202e}`. A device's bytes then cannot move the cursor,
/// clear the screen, set the window title or disguise text. (A backslash is left as it is, so a
/// payload may spell an escape itself; the hex dump of `dlq show` is unambiguous.)
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unprintable) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 16);
    for character in text.chars() {
        match character {
            '\t' => escaped.push_str("\\t"),
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            character if character.is_ascii() && is_unprintable(character) => {
                let _ = write!(escaped, "\\x{:02x}", u32::from(character));
            }
            character if is_unprintable(character) => {
                let _ = write!(escaped, "\\u{{{:x}}}", u32::from(character));
            }
            character => escaped.push(character),
        }
    }
    Cow::Owned(escaped)
}

/// Control characters (Unicode `Cc`: C0, DEL, C1), bidi formatting characters and the Unicode
/// line and paragraph separators.
fn is_unprintable(character: char) -> bool {
    character.is_control()
        || matches!(
            character,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
                | '\u{2028}' | '\u{2029}'
        )
}

/// `records` as a table, one line each: time, position, device, code, message.
pub fn list_text(records: &[DeadRecord]) -> String {
    let mut text = String::new();
    for record in records {
        let time = record
            .timestamp
            .and_then(DateTime::from_timestamp_millis)
            .map_or_else(
                || String::from("-"),
                |time| time.to_rfc3339_opts(SecondsFormat::Millis, true),
            );
        let message = record.header(headers::ERROR_MESSAGE).unwrap_or_default();
        let message: String = message.chars().take(100).collect();
        let _ = writeln!(
            text,
            "{time}  {}:{:<8} {:<24} {:<22} {}",
            record.partition,
            record.offset,
            printable(record.key.as_deref().unwrap_or("-")),
            printable(&record.code()),
            printable(&message),
        );
    }
    text
}

/// One record in full: position, every header and the payload (text, or a hex dump of bytes that
/// are not UTF-8).
pub fn show_text(record: &DeadRecord) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "partition {}, offset {}",
        record.partition, record.offset
    );
    if let Some(time) = record.timestamp.and_then(DateTime::from_timestamp_millis) {
        let _ = writeln!(
            text,
            "timestamp {}",
            time.to_rfc3339_opts(SecondsFormat::Millis, true)
        );
    }
    let _ = writeln!(
        text,
        "key       {}",
        printable(record.key.as_deref().unwrap_or("(none)"))
    );
    let _ = writeln!(text, "headers");
    for (name, value) in &record.headers {
        let value = value.as_deref().map_or_else(
            || String::from("(null)"),
            |value| printable(&String::from_utf8_lossy(value)).into_owned(),
        );
        let _ = writeln!(text, "  {}: {value}", printable(name));
    }
    let _ = writeln!(text, "payload ({} bytes)", record.payload.len());
    match std::str::from_utf8(&record.payload) {
        Ok(payload) => {
            // Line by line, so a payload of several lines stays readable; a CR is escaped.
            for line in payload.split('\n') {
                let _ = writeln!(text, "{}", printable(line));
            }
        }
        Err(_) => {
            for (line, chunk) in record.payload.chunks(16).enumerate() {
                let hex: Vec<String> = chunk.iter().map(|byte| format!("{byte:02x}")).collect();
                let ascii: String = chunk
                    .iter()
                    .map(|byte| {
                        if byte.is_ascii_graphic() {
                            char::from(*byte)
                        } else {
                            '.'
                        }
                    })
                    .collect();
                let _ = writeln!(text, "{:08x}  {:<47}  {ascii}", line * 16, hex.join(" "));
            }
        }
    }
    text
}

/// `stats` as text: totals by code, then by device (most first).
pub fn stats_text(stats: &Stats) -> String {
    let mut text = String::new();
    let _ = writeln!(text, "{} rejected records", stats.total);
    let _ = writeln!(text, "by code:");
    let mut codes: Vec<_> = stats.by_code.iter().collect();
    codes.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (code, count) in codes {
        let _ = writeln!(text, "  {:<24} {count}", printable(code));
    }
    let _ = writeln!(text, "by device:");
    let mut devices: Vec<_> = stats.by_device.iter().collect();
    devices.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (device, count) in devices {
        let _ = writeln!(text, "  {:<24} {count}", printable(device));
    }
    text
}

/// Settings of `telemetry dlq replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayConfig {
    /// Which DLQ records to replay.
    #[command(flatten)]
    pub filter: DlqFilter,

    /// MySQL/MariaDB URL of the telemetry database with the writer's account; `sqlite://<file>`
    /// for `telemetry up`'s SQLite store (`<data dir>/telemetry.db`).
    #[arg(
        long,
        env = "TELEMETRY_MYSQL_URL",
        hide_env_values = true,
        default_value = telemetry_store::DEFAULT_MYSQL_URL,
        hide_default_value = true
    )]
    pub mysql_url: String,

    /// The payload contract to validate with (as `telemetry audit --contract`): usually the fixed
    /// one the audit service now runs with.
    #[arg(long, env = "TELEMETRY_CONTRACT")]
    pub contract: Option<std::path::PathBuf>,

    /// Only say what would happen: validate, count, write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// What `telemetry dlq replay` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    /// DLQ records selected by the filter.
    pub selected: u64,
    /// Accepted now and stored as new rows (their cleaned records produced).
    pub stored: u64,
    /// Accepted now, but their event was in the table already.
    pub already_stored: u64,
    /// Replayed by an earlier run: left alone.
    pub already_replayed: u64,
    /// Still rejected by the contract, by reason code: they stay in the DLQ, no new entry.
    pub still_rejected: BTreeMap<String, u64>,
    /// Cleaned records produced (including any an earlier, interrupted run left).
    pub produced: u64,
    /// Whether nothing was written.
    pub dry_run: bool,
}

impl std::fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.dry_run {
            "would replay"
        } else {
            "replayed"
        };
        writeln!(f, "{verb} {} DLQ records:", self.selected)?;
        writeln!(f, "  accepted, new rows           {}", self.stored)?;
        writeln!(f, "  accepted, already in table   {}", self.already_stored)?;
        writeln!(
            f,
            "  replayed before, skipped     {}",
            self.already_replayed
        )?;
        let rejected: u64 = self.still_rejected.values().sum();
        writeln!(f, "  still rejected (stay in DLQ) {rejected}")?;
        for (code, count) in &self.still_rejected {
            writeln!(f, "    {code:<24} {count}")?;
        }
        writeln!(f, "  cleaned records produced     {}", self.produced)
    }
}

/// Validates the selected DLQ records again with the (fixed) contract. Accepted ones are stored
/// (each DLQ record once, however often this runs; with the time it was first received) and their
/// cleaned record produced once Kafka acknowledges it; still invalid ones stay where they are.
pub async fn replay(config: &ReplayConfig) -> Result<ReplaySummary> {
    let validator =
        telemetry_core::Validator::new(crate::load_contract(config.contract.as_deref())?)?;
    let kafka = &config.filter.kafka;
    let records = read(&config.filter).await?;
    let mut summary = ReplaySummary {
        selected: records.len() as u64,
        dry_run: config.dry_run,
        ..ReplaySummary::default()
    };
    let (store, _lock) = if config.dry_run {
        (None, None)
    } else {
        let store = telemetry_store::open_now(&config.mysql_url, 2).await?;
        // One DLQ replay at a time: two would produce the same pending cleaned records.
        let lock = store.lock_dlq_replay().await?;
        // What an earlier run stored but could not produce goes first.
        summary.produced += produce_pending(store.as_ref(), kafka).await?;
        (Some(store), Some(lock))
    };
    for record in &records {
        let received_at = record
            .header(headers::RECEIVED_AT)
            .and_then(|text| text.parse::<i64>().ok())
            .filter(|millis| (0..=telemetry_core::validate::MAX_TIMESTAMP_MS).contains(millis))
            .or(record.timestamp)
            .unwrap_or_else(|| Utc::now().timestamp_millis());
        let original_bytes = record.header(headers::PAYLOAD_ORIGINAL_BYTES);
        let cut_reason = record.header(headers::PAYLOAD_CUT_REASON);
        let cut_detail = record.header(headers::PAYLOAD_CUT_DETAIL);
        let received = telemetry_core::Received {
            payload: &record.payload,
            received_at,
            topic_device: record.key.as_deref().map(str::as_bytes),
            cut: original_bytes
                .and_then(|size| size.parse::<u64>().ok())
                .map(|original_bytes| telemetry_core::Cut {
                    original_bytes,
                    reason: cut_reason.as_deref(),
                    detail: cut_detail.as_deref(),
                }),
        };
        let event = match validator.validate_received(&received) {
            telemetry_core::Outcome::Accepted(event) => event,
            telemetry_core::Outcome::Rejected(rejection) => {
                *summary
                    .still_rejected
                    .entry(rejection.code().to_string())
                    .or_default() += 1;
                continue;
            }
        };
        let Some(store) = &store else {
            summary.stored += 1;
            continue;
        };
        // The row points at the raw record, as rows the audit service writes do.
        let source = telemetry_core::SourcePosition {
            topic: record
                .header(headers::SOURCE_TOPIC)
                .unwrap_or_else(|| kafka.raw_topic.clone()),
            partition: record
                .header(headers::SOURCE_PARTITION)
                .and_then(|text| text.parse().ok())
                .unwrap_or(record.partition),
            offset: record
                .header(headers::SOURCE_OFFSET)
                .and_then(|text| text.parse().ok())
                .unwrap_or(record.offset),
        };
        let cleaned = telemetry_core::event::CleanedRecord { event, source };
        let json = serde_json::to_string(&cleaned)
            .map_err(|error| Error::Tool(format!("could not encode a cleaned event: {error}")))?;
        let position = telemetry_store::DlqPosition {
            topic: kafka.dlq_topic.clone(),
            partition: record.partition,
            offset: record.offset,
        };
        match store.replay_dead_letter(&position, &cleaned, &json).await {
            Ok(telemetry_store::DeadLetterReplay::Stored) => summary.stored += 1,
            Ok(telemetry_store::DeadLetterReplay::AlreadyStored) => summary.already_stored += 1,
            Ok(telemetry_store::DeadLetterReplay::AlreadyReplayed) => {
                summary.already_replayed += 1;
            }
            // The database refuses the row itself: it stays in the DLQ, the others go on.
            Err(error) if error.is_data_error() => {
                tracing::warn!(%error, partition = record.partition, offset = record.offset, "The database refused a replayed record; it stays in the DLQ.");
                *summary
                    .still_rejected
                    .entry(crate::DB_REJECTED.to_string())
                    .or_default() += 1;
            }
            Err(error) => return Err(error.into()),
        }
    }
    if let Some(store) = &store {
        summary.produced += produce_pending(store.as_ref(), kafka).await?;
    }
    Ok(summary)
}

/// Produces the cleaned records the ledger holds and marks each once Kafka acknowledged it.
async fn produce_pending(
    store: &dyn telemetry_store::TelemetryStore,
    kafka: &KafkaConfig,
) -> Result<u64> {
    let pending = store.pending_cleaned().await?;
    if pending.is_empty() {
        return Ok(0);
    }
    telemetry_kafka::ensure_topics(kafka, &[&kafka.cleaned_topic]).await?;
    let producer: rdkafka::producer::FutureProducer = kafka
        .producer_config(&[])?
        .create()
        .map_err(telemetry_kafka::Error::from)?;
    for (position, device_id, cleaned) in &pending {
        producer
            .send(
                rdkafka::producer::FutureRecord::to(&kafka.cleaned_topic)
                    .key(device_id.as_bytes())
                    .payload(cleaned.as_bytes()),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(error, _)| telemetry_kafka::Error::from(error))?;
        // Marked one by one: a stop in between repeats at most the record in flight.
        store
            .mark_cleaned_produced(std::slice::from_ref(position))
            .await?;
    }
    Ok(pending.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record whose every device-chosen part tries to drive the terminal.
    fn hostile() -> DeadRecord {
        DeadRecord {
            partition: 0,
            offset: 7,
            timestamp: Some(1_764_300_000_000),
            key: Some(String::from("pico-1\x1b[2J")),
            headers: vec![
                (
                    headers::MQTT_TOPIC.to_string(),
                    Some(b"devices/pico-1\x1b]0;owned\x07/telemetry".to_vec()),
                ),
                (
                    headers::ERROR_CODE.to_string(),
                    Some(b"invalid_json".to_vec()),
                ),
                (
                    headers::ERROR_MESSAGE.to_string(),
                    Some("bad \u{202e}txt.exe\r ok".as_bytes().to_vec()),
                ),
            ],
            payload: "{\"temp\": 21.5,\r\x1b[31m\"note\": \"café\u{9b}\"}\n{\"next\": 1}"
                .as_bytes()
                .to_vec(),
        }
    }

    fn assert_harmless(text: &str) {
        for forbidden in ['\x1b', '\r', '\x07', '\u{9b}', '\u{202e}'] {
            assert!(!text.contains(forbidden), "{forbidden:?} in {text:?}");
        }
    }

    #[test]
    fn control_characters_are_escaped_visibly_and_ordinary_text_is_left_alone() {
        assert_eq!(
            printable("pico-1 café ✓ {\"a\": 1}"),
            "pico-1 café ✓ {\"a\": 1}"
        );
        assert!(matches!(printable("pico-1"), Cow::Borrowed(_)));
        assert_eq!(printable("a\x1b[2Jb"), "a\\x1b[2Jb");
        assert_eq!(printable("line\r\nnext\ttab"), "line\\r\\nnext\\ttab");
        assert_eq!(
            printable("\x00\x7f\u{85}\u{9b}"),
            "\\x00\\x7f\\u{85}\\u{9b}"
        );
        assert_eq!(printable("abc\u{202e}fdp.exe"), "abc\\u{202e}fdp.exe");
        assert_eq!(
            printable("\u{2066}x\u{2069}\u{2028}"),
            "\\u{2066}x\\u{2069}\\u{2028}"
        );
    }

    #[test]
    fn show_list_and_stats_print_escapes_not_escape_sequences() {
        let record = hostile();
        let shown = show_text(&record);
        assert_harmless(&shown);
        assert!(shown.contains("key       pico-1\\x1b[2J\n"), "{shown}");
        assert!(
            shown.contains("mqtt.topic: devices/pico-1\\x1b]0;owned\\x07/telemetry\n"),
            "{shown}"
        );
        assert!(
            shown.contains(
                "{\"temp\": 21.5,\\r\\x1b[31m\"note\": \"café\\u{9b}\"}\n{\"next\": 1}\n"
            ),
            "the payload's lines stay lines, its CR and ESC are shown: {shown}"
        );

        let listed = list_text(std::slice::from_ref(&record));
        assert_harmless(&listed);
        assert_eq!(listed.lines().count(), 1, "{listed}");
        assert!(listed.contains("pico-1\\x1b[2J"), "{listed}");
        assert!(listed.contains("bad \\u{202e}txt.exe\\r ok"), "{listed}");

        let counted = stats_text(&stats(&[record]));
        assert_harmless(&counted);
        assert!(counted.contains("  pico-1\\x1b[2J "), "{counted}");
    }
}
