//! Every column of a row (and of a DLQ index entry) the MySQL store writes comes back exactly as
//! it went in, whatever its strings and bytes hold (quotes, backslashes, NUL, SQL): a small batch
//! goes as one text statement with the values written in as literals (`src/literal.rs`), a
//! redelivered one through bound parameters, and both must keep every value a value.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use telemetry_core::event::{CleanedRecord, Event, Quality};
use telemetry_core::{DeviceScope, SourcePosition};
use telemetry_store::{DeadLetterFilter, NewDeadLetter, Store, Table, TelemetryStore};

/// Strings a SQL literal must not be fooled by: quotes, backslashes (which some sql_modes treat
/// as escapes and some do not), a NUL byte, newlines, multi-byte characters, a comment opener.
const HOSTILE: [&str; 6] = [
    "it's",
    r"C:\new\table\",
    "nul\u{0}byte",
    "line\nbreak\r\u{1a}",
    "Grüße 🚀 ✓",
    "x'); DROP TABLE telemetry; -- ",
];

fn record(place: usize, text: &str, seq: Option<i64>) -> CleanedRecord {
    let base = 1_764_000_000_123 + i64::try_from(place).unwrap() * 1_000;
    let mut metrics = BTreeMap::new();
    metrics.insert("temperature_c".to_string(), 21.5 + place as f64);
    let mut attributes = BTreeMap::new();
    attributes.insert("note".to_string(), serde_json::json!(text));
    attributes.insert(
        text.to_string(),
        serde_json::json!({ "nested": [text, 1, null] }),
    );
    let quality = Quality {
        coerced_fields: vec![text.to_string()],
        ..Quality::default()
    };
    CleanedRecord {
        event: Event {
            device_id: format!("{text}-{place}"),
            device_ts: base,
            received_at: base + 7,
            seq,
            metrics: serde_json::from_value(serde_json::to_value(metrics).unwrap()).unwrap(),
            attributes,
            schema_version: 3,
            quality,
        },
        source: SourcePosition {
            topic: format!("raw-{text}"),
            partition: 2,
            offset: 9_000_000_000 + i64::try_from(place).unwrap(),
        },
    }
}

type Stored = (
    String,
    chrono::NaiveDateTime,
    Option<i64>,
    chrono::NaiveDateTime,
    String,
    u32,
    Option<String>,
    Option<String>,
    String,
    i32,
    i64,
);

#[tokio::test]
async fn every_column_round_trips_whatever_its_strings_hold() {
    let url = telemetry_testkit::database_url(&telemetry_testkit::unique("literals"));
    let store = Store::connect(&url, 2).await.unwrap();
    store.migrate().await.unwrap();
    let records: Vec<CleanedRecord> = HOSTILE
        .iter()
        .enumerate()
        .map(|(place, text)| record(place, text, (place % 2 == 0).then_some(-5 + place as i64)))
        .collect();
    let live = Table::live();
    assert_eq!(store.insert_events_into(&live, &records).await.unwrap(), 6);
    // Again, with one new: the stored ones are skipped (the path with ON DUPLICATE KEY).
    let mut again = records.clone();
    again.push(record(6, "fresh", None));
    assert_eq!(store.insert_events_into(&live, &again).await.unwrap(), 1);
    assert_eq!(store.count_events().await.unwrap(), 7);

    let pool = sqlx::MySqlPool::connect(&url).await.unwrap();
    for expected in &again {
        let event = &expected.event;
        let stored: Stored = sqlx::query_as(
            "SELECT CAST(device_id AS CHAR), device_ts, seq, received_at, CAST(metrics AS CHAR), \
             schema_version, CAST(attributes AS CHAR), CAST(quality AS CHAR), source_topic, \
             source_partition, source_offset FROM telemetry WHERE device_id = ?",
        )
        .bind(&event.device_id)
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|error| panic!("{:?}: {error}", event.device_id));
        assert_eq!(stored.0, event.device_id);
        assert_eq!(stored.1.and_utc().timestamp_millis(), event.device_ts);
        assert_eq!(stored.2, event.seq);
        assert_eq!(stored.3.and_utc().timestamp_millis(), event.received_at);
        let json = |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap();
        assert_eq!(
            json(&stored.4),
            serde_json::to_value(&event.metrics).unwrap()
        );
        assert_eq!(stored.5, event.schema_version);
        let attributes = stored.6.as_deref().map(json);
        let expected_attributes = (!event.attributes.is_empty())
            .then(|| serde_json::to_value(&event.attributes).unwrap());
        assert_eq!(attributes, expected_attributes);
        let quality = stored.7.as_deref().map(json);
        let expected_quality =
            (!event.quality.is_clean()).then(|| serde_json::to_value(&event.quality).unwrap());
        assert_eq!(quality, expected_quality);
        assert_eq!(stored.8, expected.source.topic);
        assert_eq!(stored.9, expected.source.partition);
        assert_eq!(stored.10, expected.source.offset);
    }
}

#[tokio::test]
async fn every_dead_letter_field_round_trips_whatever_it_holds() {
    let url = telemetry_testkit::database_url(&telemetry_testkit::unique("letter_values"));
    let store = Store::connect(&url, 2).await.unwrap();
    store.migrate().await.unwrap();
    // Every byte value, quotes and backslashes in the payload; hostile text in every string.
    let payload: Vec<u8> = (0..=255u8).chain(*b"'\\\"").collect();
    let received_at = 1_764_000_000_123;
    let letters: Vec<NewDeadLetter<'_>> = HOSTILE
        .iter()
        .enumerate()
        .map(|(place, text)| NewDeadLetter {
            source_topic: text,
            source_partition: 1,
            source_offset: i64::try_from(place).unwrap(),
            device_id: Some(text),
            received_at: received_at + i64::try_from(place).unwrap(),
            code: "invalid_json",
            message: text,
            field: Some(text),
            rule: (place % 2 == 0).then_some(*text),
            contract_version: 7,
            payload: if place == 0 { b"" } else { &payload },
        })
        .collect();
    store.insert_dead_letters(&letters).await.unwrap();
    // Again with one more: the indexed ones are skipped.
    let mut again = letters.clone();
    let mut extra = letters[1].clone();
    extra.source_offset = 99;
    again.push(extra);
    store.insert_dead_letters(&again).await.unwrap();
    assert_eq!(store.count_dead_letters().await.unwrap(), 7);

    for letter in &letters {
        let filter = DeadLetterFilter {
            device_id: letter.device_id,
            code: None,
            scope: &DeviceScope::All,
            limit: 10,
            max_payload_bytes: 65_536,
        };
        let found = store.dead_letters(&filter).await.unwrap();
        let entry = found
            .iter()
            .find(|entry| entry.source_offset == letter.source_offset)
            .unwrap_or_else(|| panic!("{:?} is indexed", letter.device_id));
        assert_eq!(entry.device_id.as_deref(), letter.device_id);
        assert_eq!(entry.source_topic, letter.source_topic);
        assert_eq!(entry.message, letter.message);
        assert_eq!(entry.field.as_deref(), letter.field);
        assert_eq!(entry.rule.as_deref(), letter.rule);
        assert_eq!(entry.payload, letter.payload);
        assert_eq!(entry.payload_bytes as usize, letter.payload.len());
        assert_eq!(entry.contract_version, 7);
        assert_eq!(entry.received_at.timestamp_millis(), letter.received_at);
    }
}
