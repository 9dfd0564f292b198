//! The produce stage: each written batch's cleaned and DLQ records produced and acknowledged by
//! Kafka, then its offsets stored, in batch order. Also what a batch turns into on Kafka: the
//! dead letters of its rejected and refused records, and the cleaned records of its stored events.

use std::sync::Arc;

use futures::stream::{FuturesOrdered, StreamExt};
use rdkafka::message::{Message, OwnedMessage};
use telemetry_kafka::BatchConsumer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::decide::Decided;
use crate::kafka_sink::{DeadLetter, OutcomeSink, OutgoingRecord};
use crate::write::Writer;
use crate::DB_REJECTED;

/// A written batch: its raw records (whose offsets to store) and the records to produce for it.
pub(crate) type ToProduce = (Vec<OwnedMessage>, Vec<OutgoingRecord>);

/// Batches written to the database whose records may still be waiting for Kafka: enough to
/// overlap one batch's database write with the previous one's produce.
pub(crate) const PIPELINE_DEPTH: usize = 2;

/// Batches whose records are with Kafka at once. A batch's records are handed to librdkafka as
/// soon as it is written, not after the previous batch's acknowledgements: at a low rate every
/// batch would otherwise wait out the producer's linger and the acknowledgement one after the
/// other, and batches would queue behind the produce stage (publish -> row went from 7 to 19 ms
/// at 2,000 events/s).
const PRODUCING_AT_ONCE: usize = 2;

/// Starts the stage: produces each batch `written` brings, then stores its offsets in `source`,
/// in batch order. Ends when `written` is closed, or when `abandon` stops a batch before Kafka
/// acknowledged it (its offsets stay: it is redelivered).
pub(crate) fn spawn(
    source: Arc<BatchConsumer>,
    sink: Arc<OutcomeSink>,
    abandon: CancellationToken,
    mut written: mpsc::Receiver<ToProduce>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // In batch order: offsets are stored only past batches whose records are all with Kafka.
        let mut producing = FuturesOrdered::new();
        let mut open = true;
        loop {
            tokio::select! {
                received = written.recv(), if open && producing.len() < PRODUCING_AT_ONCE => {
                    match received {
                        Some((batch, outgoing)) => {
                            let (sink, abandon) = (sink.clone(), abandon.clone());
                            producing.push_back(async move {
                                let produced = sink.produce_all(outgoing, &batch, &abandon).await;
                                (batch, produced)
                            });
                        }
                        None => open = false,
                    }
                }
                Some((batch, produced)) = producing.next(), if !producing.is_empty() => {
                    if !produced {
                        return;
                    }
                    source.store_offsets(&batch);
                }
                else => return,
            }
        }
    })
}

/// A rejected or refused record of the batch, with its reason, for the DLQ index and topic.
pub(crate) struct Letter<'a> {
    /// Its index in the batch.
    pub index: usize,
    pub message: &'a OwnedMessage,
    pub code: &'static str,
    pub text: String,
    pub field: Option<&'a str>,
    pub rule: Option<&'a str>,
}

/// The batch's rejected records, then those the database refused (index in the accepted events
/// and the database's reason), with their reasons.
pub(crate) fn dead_letters<'a>(
    batch: &'a [OwnedMessage],
    decided: &'a Decided,
    refused: &'a [(usize, String)],
) -> Vec<Letter<'a>> {
    let mut letters = Vec::with_capacity(decided.rejected.len() + refused.len());
    for (index, rejection) in &decided.rejected {
        letters.push(Letter {
            index: *index,
            message: &batch[*index],
            code: rejection.code(),
            text: rejection.to_string(),
            field: rejection.field(),
            rule: Some(rejection.rule()),
        });
    }
    for (position, reason) in refused {
        let index = decided.accepted_index[*position];
        letters.push(Letter {
            index,
            message: &batch[index],
            code: DB_REJECTED,
            text: format!("the database refused the record: {reason}"),
            field: None,
            rule: None,
        });
    }
    letters
}

/// The DLQ records of rejected and refused records, and the cleaned records of stored events.
pub(crate) fn outgoing_records(
    decided: &Decided,
    letters: &[Letter<'_>],
    refused: &[(usize, String)],
    writer: &Writer<'_>,
) -> Vec<OutgoingRecord> {
    let mut outgoing = Vec::with_capacity(decided.accepted.len() + letters.len());
    let contract_version = writer.validator.contract().version;
    for letter in letters {
        outgoing.push(OutgoingRecord::dead_letter(
            &writer.dlq_topic,
            letter.index,
            letter.message,
            &DeadLetter {
                device: writer.validator.topic_device(letter.message.key()).name(),
                code: letter.code,
                message: &letter.text,
                field: letter.field,
                rule: letter.rule,
                contract_version,
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
        match OutgoingRecord::cleaned(&writer.cleaned_topic, source, record) {
            Ok(record) => outgoing.push(record),
            Err(error) => {
                tracing::error!(%error, "Could not encode a cleaned event; it is in the table but not on the cleaned topic.");
            }
        }
    }
    outgoing
}

#[cfg(test)]
mod tests {
    //! The read and produce stages against the real Kafka of `scripts/services.sh`, with the
    //! write stage between them on SQLite.

    use std::time::Duration;

    use rdkafka::message::Headers;
    use telemetry_core::names::headers;
    use telemetry_kafka::KafkaConfig;
    use telemetry_store::Table;
    use telemetry_testkit::{kafka_brokers, read_topic, unique, TestRecord};

    use super::*;
    use crate::read::{self, Batching};
    use crate::test_support::{header, sqlite_store, validator};
    use crate::write::{write_batch, Batch};
    use crate::DATABASE;
    use telemetry_consumer::Writes;
    use telemetry_metrics::Progress;

    fn record(device: &str, payload: &str) -> TestRecord {
        let now = chrono::Utc::now().timestamp_millis();
        TestRecord {
            key: Some(device.as_bytes().to_vec()),
            payload: payload
                .replace(r#""ts":"now""#, &format!(r#""ts":{now}"#))
                .into_bytes(),
            headers: Vec::new(),
        }
    }

    /// The first batch `reader` hands on, within 30 s.
    async fn next(decided: &mut mpsc::Receiver<Batch>) -> Batch {
        tokio::time::timeout(Duration::from_secs(30), decided.recv())
            .await
            .expect("a batch within 30 s")
            .expect("the read stage runs")
    }

    #[tokio::test]
    async fn records_reach_their_topics_before_their_offsets_are_committed() {
        let id = unique("audit_stages");
        let kafka = KafkaConfig {
            brokers: kafka_brokers(),
            raw_topic: format!("{id}.raw"),
            cleaned_topic: format!("{id}.cleaned"),
            dlq_topic: format!("{id}.dlq"),
            ..KafkaConfig::default()
        };
        let (raw, cleaned, dlq) = (&kafka.raw_topic, &kafka.cleaned_topic, &kafka.dlq_topic);
        telemetry_kafka::ensure_topics(&kafka, &[raw, cleaned, dlq])
            .await
            .unwrap();
        let valid = r#"{"device_id":"pico-1","ts":"now","seq":1,"temp":21.5}"#;
        telemetry_testkit::produce(raw, &[record("pico-1", valid), record("pico-1", "{oops")])
            .await;

        // Read: one batch of both records, decided.
        let source = Arc::new(BatchConsumer::new(&kafka, &id, &[raw.as_str()]).unwrap());
        let validator = Arc::new(validator());
        let (to_write, mut decided) = mpsc::channel(1);
        let stop = CancellationToken::new();
        let batching = Batching {
            records: 2,
            linger: Duration::from_secs(5),
        };
        let progress = Arc::new(Progress::default());
        let reader = read::spawn(
            source.clone(),
            validator.clone(),
            batching,
            progress.clone(),
            stop.clone(),
            to_write,
        );
        let batch = next(&mut decided).await;
        stop.cancel();
        read::join(reader).await;
        assert_eq!(batch.records.len(), 2);
        assert_eq!(
            (batch.decided.accepted.len(), batch.decided.rejected.len()),
            (1, 1)
        );
        assert_eq!(Progress::read(&progress.received), 2);
        assert_eq!(Progress::read(&progress.rejected), 1);

        // Write, on SQLite.
        let (_directory, store) = sqlite_store().await;
        let (writes, abandon) = (
            Writes::new(
                crate::instruments::SERVICE,
                telemetry_ops::Readiness::new(&[DATABASE]),
            ),
            CancellationToken::new(),
        );
        let writer = Writer {
            store: &store,
            table: &Table::live(),
            writes: &writes,
            abandon: &abandon,
            cleaned_topic: Arc::from(cleaned.as_str()),
            dlq_topic: Arc::from(dlq.as_str()),
            validator: &validator,
            progress: &Progress::default(),
        };
        let written = write_batch(batch, &writer).await.unwrap();

        // Produce, then store the offsets; closing commits them.
        let sink = Arc::new(OutcomeSink::new(&kafka, validator.contract().version).unwrap());
        let (to_produce, written_batches) = mpsc::channel(1);
        let producer = spawn(
            source.clone(),
            sink.clone(),
            abandon.clone(),
            written_batches,
        );
        to_produce.send(written).await.unwrap();
        drop(to_produce);
        producer.await.unwrap();
        let Ok(source) = Arc::try_unwrap(source) else {
            panic!("the consumer is shared")
        };
        source.close(Duration::from_secs(5)).await;

        let cleaned_records = read_topic(cleaned, 1, Duration::from_secs(30), Duration::ZERO).await;
        let cleaned_event: serde_json::Value =
            serde_json::from_slice(cleaned_records[0].payload().unwrap()).unwrap();
        assert_eq!(cleaned_event["seq"], 1);
        let dead = read_topic(dlq, 1, Duration::from_secs(30), Duration::ZERO).await;
        assert_eq!(dead[0].payload(), Some(&b"{oops"[..]));
        let dead_headers: Vec<(String, String)> = dead[0]
            .headers()
            .map(|found| {
                found
                    .iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(
            header(&dead_headers, headers::ERROR_CODE),
            Some("invalid_json")
        );

        // The group resumes after both records: a new one is the next read, nothing redelivered.
        let next_valid = r#"{"device_id":"pico-1","ts":"now","seq":2,"temp":21.5}"#;
        telemetry_testkit::produce(raw, &[record("pico-1", next_valid)]).await;
        let again = BatchConsumer::new(&kafka, &id, &[raw.as_str()]).unwrap();
        let resumed = again
            .next_batch_within(
                10,
                Duration::from_secs(1),
                Some(Duration::from_secs(30)),
                &CancellationToken::new(),
            )
            .await
            .unwrap();
        let offsets: Vec<i64> = resumed.iter().map(Message::offset).collect();
        assert_eq!(offsets, [2]);
        again.close(Duration::from_secs(5)).await;
    }
}
