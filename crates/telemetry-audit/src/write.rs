//! The write stage: each decided batch's accepted events into the table and its rejected records
//! into the DLQ index, up to `--db-writers` batches at once, handed on to the produce stage in
//! batch order with the records to produce for them.

use std::collections::VecDeque;
use std::sync::Arc;

use futures::stream::{FuturesOrdered, StreamExt};
use rdkafka::message::{Message, OwnedMessage};
use telemetry_consumer::Writes;
use telemetry_core::event::CleanedRecord;
use telemetry_core::Validator;
use telemetry_store::{Table, TelemetryStore};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use telemetry_metrics::{series, Progress, AUDIT_BATCH_RECORDS, EVENTS_REJECTED, EVENTS_WRITTEN};

use crate::decide::Decided;
use crate::instruments::{self, SERVICE};
use crate::kafka_sink::OutgoingRecord;
use crate::produce::{self, Letter, ToProduce};
use crate::DB_REJECTED;

/// A batch read and decided.
pub(crate) struct Batch {
    pub records: Vec<OwnedMessage>,
    pub decided: Decided,
}

/// Where and how batches are written.
pub(crate) struct Writer<'a> {
    pub store: &'a dyn TelemetryStore,
    pub table: &'a Table,
    /// Its writes as `/readyz` and the metrics see them.
    pub writes: &'a Writes,
    /// Stops the writes in hand (the end of the shutdown grace period).
    pub abandon: &'a CancellationToken,
    pub cleaned_topic: Arc<str>,
    pub dlq_topic: Arc<str>,
    /// For the device a rejected record is indexed under (its topic's, as the contract allows).
    pub validator: &'a Validator,
    /// Counts the rows written and the records the database refused.
    pub progress: &'a Progress,
}

/// Writes the batches `decided` brings, up to `db_writers` at once, and sends each written one to
/// `to_produce` in batch order. Returns when `decided` is closed and every batch was handed on,
/// or when a write or the produce stage was abandoned (their offsets stay: they are redelivered).
pub(crate) async fn run(
    writer: &Writer<'_>,
    mut decided: mpsc::Receiver<Batch>,
    to_produce: mpsc::Sender<ToProduce>,
    db_writers: usize,
) {
    let batch_records = AUDIT_BATCH_RECORDS.histogram_of(series!(SERVICE));
    let mut writing = FuturesOrdered::new();
    // Written batches waiting for room in the produce stage; meanwhile the other writes go on.
    let mut written = VecDeque::new();
    let mut reading = true;
    loop {
        tokio::select! {
            biased;
            room = to_produce.reserve(), if !written.is_empty() => match (room, written.pop_front()) {
                (Ok(room), Some(batch)) => room.send(batch),
                _ => break, // The produce stage was abandoned.
            },
            done = writing.next(), if !writing.is_empty() => match done {
                Some(Some(batch)) => written.push_back(batch),
                // Stopped before the batch was durable: its offsets stay, it is redelivered.
                _ => break,
            },
            received = decided.recv(), if reading && writing.len() + written.len() < db_writers => match received {
                Some(batch) => {
                    #[allow(clippy::cast_precision_loss)]
                    batch_records.record(batch.records.len() as f64);
                    let span = tracing::debug_span!(
                        "batch",
                        records = batch.records.len(),
                        accepted = batch.decided.accepted.len(),
                        rejected = batch.decided.rejected.len()
                    );
                    writing.push_back(write_batch(batch, writer).instrument(span));
                }
                None => reading = false,
            },
            else => break,
        }
    }
}

/// Writes a batch's accepted events to the table and its rejected records to the DLQ index, and
/// returns the batch with the records to produce for it; `None` if abandoned first.
pub(crate) async fn write_batch(batch: Batch, writer: &Writer<'_>) -> Option<ToProduce> {
    let Batch { records, decided } = batch;
    // The table first: what it refuses goes to the DLQ instead of the cleaned topic.
    let Written { refused, .. } = write_accepted(
        writer.store,
        writer.table,
        &decided.accepted,
        writer.writes,
        writer.abandon,
    )
    .await?;
    let written = decided.accepted.len() - refused.len();
    Progress::add(&writer.progress.written, written as u64);
    Progress::add(&writer.progress.rejected, refused.len() as u64);
    let letters = produce::dead_letters(&records, &decided, &refused);
    if !index_dead_letters(
        writer.store,
        &letters,
        writer.validator,
        writer.writes,
        writer.abandon,
    )
    .await
    {
        return None;
    }
    let outgoing: Vec<OutgoingRecord> =
        produce::outgoing_records(&decided, &letters, &refused, writer);
    drop(letters);
    Some((records, outgoing))
}

/// What writing a batch's accepted events did.
pub(crate) struct Written {
    /// Records the database refused: index in the accepted events and the database's reason.
    pub refused: Vec<(usize, String)>,
    /// Rows that were new (the others were stored already).
    pub inserted: u64,
}

/// Inserts the accepted events, retrying while the database is unavailable. When the database
/// refuses the data itself, the batch is split in halves until the refused records are alone, so
/// one bad record never holds back the others. Returns the refused records (index in `accepted`
/// and the database's reason), or `None` if `shutdown` came first.
pub(crate) async fn write_accepted(
    store: &dyn TelemetryStore,
    table: &Table,
    records: &[CleanedRecord],
    writes: &Writes,
    shutdown: &CancellationToken,
) -> Option<Written> {
    let written = instruments::counter(&EVENTS_WRITTEN);
    let halved = writes
        .halving("Writing to the database", records, shutdown, |chunk| {
            let written = &written;
            async move {
                let result = store.insert_events_into(table, chunk).await;
                if result.is_ok() {
                    written.increment(chunk.len() as u64);
                }
                result
            }
        })
        .await?;
    let mut refused = Vec::with_capacity(halved.refused.len());
    for (index, error) in halved.refused {
        tracing::warn!(%error, offset = records[index].source.offset, "The database refused a record; it goes to the DLQ.");
        EVENTS_REJECTED
            .counter_of(series!(SERVICE, DB_REJECTED))
            .increment(1);
        refused.push((index, error.to_string()));
    }
    Some(Written {
        refused,
        inserted: halved.done.iter().map(|(_, new)| new).sum(),
    })
}

/// Indexes the batch's rejected records in the database (the API's DLQ view and device health),
/// retrying while the database is unavailable. `false` if `shutdown` came first. When the database
/// refuses the data itself, the batch is split in halves until the refused record is alone; that
/// one is logged and left out of the index (the DLQ topic has it all the same).
async fn index_dead_letters(
    store: &dyn TelemetryStore,
    letters: &[Letter<'_>],
    validator: &Validator,
    writes: &Writes,
    shutdown: &CancellationToken,
) -> bool {
    if letters.is_empty() {
        return true;
    }
    let rows: Vec<_> = letters
        .iter()
        .map(|letter| telemetry_store::NewDeadLetter {
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
            contract_version: validator.contract().version,
            payload: letter.message.payload().unwrap_or_default(),
        })
        .collect();
    let Some(halved) = writes
        .halving("Indexing rejected records", &rows, shutdown, |chunk| {
            store.insert_dead_letters(chunk)
        })
        .await
    else {
        return false;
    };
    for (index, error) in halved.refused {
        tracing::warn!(%error, offset = rows[index].source_offset, "The database refused to index a rejected record; it is on the DLQ topic only.");
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::decide;
    use crate::test_support::{header, raw, refuse_device, sqlite_store, validator};
    use telemetry_core::names::headers;
    use telemetry_core::{DeviceScope, SequenceTracker};

    const CLEANED: &str = "test.cleaned";
    const DLQ: &str = "test.dlq";

    /// A write stage on a fresh SQLite store.
    struct Stage {
        directory: tempfile::TempDir,
        store: telemetry_store::SqliteStore,
        validator: Validator,
        writes: Writes,
        abandon: CancellationToken,
        table: Table,
        progress: Progress,
    }

    impl Stage {
        async fn new() -> Self {
            let (directory, store) = sqlite_store().await;
            Stage {
                directory,
                store,
                validator: validator(),
                writes: Writes::new(SERVICE, telemetry_ops::Readiness::new(&[crate::DATABASE])),
                abandon: CancellationToken::new(),
                table: Table::live(),
                progress: Progress::default(),
            }
        }

        fn writer(&self) -> Writer<'_> {
            Writer {
                store: &self.store,
                table: &self.table,
                writes: &self.writes,
                abandon: &self.abandon,
                cleaned_topic: Arc::from(CLEANED),
                dlq_topic: Arc::from(DLQ),
                validator: &self.validator,
                progress: &self.progress,
            }
        }
    }

    fn batch(records: Vec<OwnedMessage>, validator: &Validator) -> Batch {
        let decided = decide(&records, validator, &mut SequenceTracker::new());
        Batch { records, decided }
    }

    fn event(offset: i64, device: &str, seq: u64) -> OwnedMessage {
        let payload = format!(r#"{{"device_id":"{device}","ts":"now","seq":{seq},"temp":21.5}}"#);
        raw(offset, device, payload.as_bytes())
    }

    fn rejected(offset: i64, device: &str) -> OwnedMessage {
        raw(offset, device, br#"{"device_id":"#)
    }

    async fn dead_letters(store: &dyn TelemetryStore) -> Vec<telemetry_store::DeadLetterEntry> {
        let scope = DeviceScope::All;
        let filter = telemetry_store::DeadLetterFilter {
            device_id: None,
            code: None,
            scope: &scope,
            limit: 100,
            max_payload_bytes: 1024,
        };
        store
            .dead_letters(&filter)
            .await
            .expect("the DLQ index reads")
    }

    #[tokio::test]
    async fn a_batch_becomes_rows_index_entries_and_records_to_produce() {
        let stage = Stage::new().await;
        let (writer, store, validator) = (stage.writer(), &stage.store, &stage.validator);
        let records = vec![
            event(10, "pico-1", 1),
            rejected(11, "pico-1"),
            event(12, "pico-2", 1),
        ];

        let (records, outgoing) = write_batch(batch(records, validator), &writer)
            .await
            .expect("not abandoned");

        assert_eq!(store.count_events().await.unwrap(), 2);
        let indexed = dead_letters(store).await;
        assert_eq!(indexed.len(), 1);
        assert_eq!(
            (indexed[0].code.as_str(), indexed[0].source_offset),
            ("invalid_json", 11)
        );
        assert_eq!(indexed[0].device_id.as_deref(), Some("pico-1"));
        assert_eq!(indexed[0].payload, br#"{"device_id":"#);
        assert!(stage.writes.is_ready());
        assert_eq!(Progress::read(&stage.progress.written), 2);

        let produced: Vec<_> = outgoing
            .iter()
            .map(|record| record.parts(&records))
            .collect();
        let topics: Vec<_> = produced.iter().map(|parts| parts.topic).collect();
        assert_eq!(topics, [DLQ, CLEANED, CLEANED]);
        // The dead letter carries the original bytes and the reason.
        let dead = &produced[0];
        assert_eq!(
            (dead.key, dead.value),
            (Some(&b"pico-1"[..]), Some(&br#"{"device_id":"#[..]))
        );
        assert_eq!(
            header(&dead.headers, headers::ERROR_CODE),
            Some("invalid_json")
        );
        assert_eq!(header(&dead.headers, headers::SOURCE_OFFSET), Some("11"));
        // The cleaned records are the stored events, keyed by device.
        let last = &produced[2];
        assert_eq!(last.key, Some(&b"pico-2"[..]));
        let cleaned: serde_json::Value = serde_json::from_slice(last.value.unwrap()).unwrap();
        assert_eq!(cleaned["device_id"], "pico-2");
        assert_eq!(cleaned["metrics"]["temperature_c"], 21.5);
    }

    #[tokio::test]
    async fn a_redelivered_batch_adds_no_rows_and_is_produced_again() {
        let stage = Stage::new().await;
        let (writer, store, validator) = (stage.writer(), &stage.store, &stage.validator);
        // The same records twice, as Kafka redelivers them after a crash.
        let records = vec![
            event(0, "pico-1", 1),
            rejected(1, "pico-1"),
            event(2, "pico-1", 2),
        ];

        write_batch(batch(records.clone(), validator), &writer)
            .await
            .unwrap();
        let (_, again) = write_batch(batch(records, validator), &writer)
            .await
            .unwrap();

        assert_eq!(store.count_events().await.unwrap(), 2);
        assert_eq!(store.count_dead_letters().await.unwrap(), 1);
        // At least once: the records of a redelivered batch go to Kafka again.
        assert_eq!(again.len(), 3);
    }

    #[tokio::test]
    async fn what_the_database_refuses_goes_to_the_dlq_and_the_rest_is_written() {
        let stage = Stage::new().await;
        refuse_device(&stage.directory, "pico-bad").await;
        let (writer, store, validator) = (stage.writer(), &stage.store, &stage.validator);
        let records = vec![
            event(0, "pico-1", 1),
            event(1, "pico-bad", 1),
            event(2, "pico-2", 1),
            event(3, "pico-3", 1),
        ];

        let (records, outgoing) = write_batch(batch(records, validator), &writer)
            .await
            .unwrap();

        assert_eq!(store.count_events().await.unwrap(), 3);
        assert_eq!(Progress::read(&stage.progress.written), 3);
        assert_eq!(Progress::read(&stage.progress.rejected), 1);
        let indexed = dead_letters(store).await;
        assert_eq!(indexed.len(), 1);
        assert_eq!(
            (indexed[0].code.as_str(), indexed[0].source_offset),
            (DB_REJECTED, 1)
        );
        assert!(
            indexed[0].message.contains("refused by an operator rule"),
            "{}",
            indexed[0].message
        );
        let produced: Vec<_> = outgoing
            .iter()
            .map(|record| {
                let parts = record.parts(&records);
                (
                    parts.topic,
                    parts.key.map(<[u8]>::to_vec),
                    header(&parts.headers, headers::ERROR_CODE).map(str::to_string),
                )
            })
            .collect();
        assert_eq!(
            produced,
            [
                (
                    DLQ,
                    Some(b"pico-bad".to_vec()),
                    Some(DB_REJECTED.to_string())
                ),
                (CLEANED, Some(b"pico-1".to_vec()), None),
                (CLEANED, Some(b"pico-2".to_vec()), None),
                (CLEANED, Some(b"pico-3".to_vec()), None),
            ]
        );
    }

    #[tokio::test]
    async fn the_stage_hands_batches_on_in_their_order_with_writes_overlapping() {
        let stage = Stage::new().await;
        let (writer, store, validator) = (stage.writer(), &stage.store, &stage.validator);
        let (to_write, decided) = mpsc::channel(1);
        let (to_produce, mut written) = mpsc::channel::<ToProduce>(1);
        let feed = async {
            for first in (0..40).step_by(4) {
                let records = (first..first + 4)
                    .map(|offset| event(offset, "pico-1", offset.unsigned_abs() + 1))
                    .collect();
                to_write.send(batch(records, validator)).await.unwrap();
            }
            drop(to_write);
        };
        let drain = async {
            let mut offsets = Vec::new();
            while let Some((records, outgoing)) = written.recv().await {
                assert_eq!(outgoing.len(), records.len());
                offsets.extend(records.iter().map(Message::offset));
            }
            offsets
        };

        let ((), (), offsets) = tokio::join!(feed, run(&writer, decided, to_produce, 2), drain);

        assert_eq!(offsets, (0..40).collect::<Vec<_>>());
        assert_eq!(store.count_events().await.unwrap(), 40);
    }
}
