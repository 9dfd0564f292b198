//! The store's writes against a real MariaDB database of the test's own: idempotent rows and
//! counts through redelivery, partial overlaps and repeats within a batch.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use telemetry_core::event::CleanedRecord;
use telemetry_core::{Contract, Outcome, SourcePosition, Validator};
use telemetry_store::{NewDeadLetter, Store};

fn record(device: &str, device_ts: i64, seq: u64) -> CleanedRecord {
    let validator = Validator::new(Contract::default()).unwrap();
    let payload = format!(
        r#"{{"device_id":"{device}","device_ts":{device_ts},"seq":{seq},"temperature_c":20.5}}"#
    );
    let Outcome::Accepted(event) = validator.validate(payload.as_bytes(), device_ts) else {
        panic!("{payload} is valid");
    };
    CleanedRecord {
        event,
        source: SourcePosition {
            topic: "raw".into(),
            partition: 0,
            offset: i64::try_from(seq).unwrap(),
        },
    }
}

async fn rows(store: &Store) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM telemetry")
        .fetch_one(store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn overlapping_and_repeated_events_are_stored_and_counted_once() {
    let store = Store::connect(
        &telemetry_testkit::database_url(&telemetry_testkit::unique("store")),
        2,
    )
    .await
    .unwrap();
    store.migrate().await.unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let (a, b, c) = (
        record("d1", now, 1),
        record("d1", now + 1, 2),
        record("d1", now + 2, 3),
    );
    store.insert_events(&[a.clone(), b.clone()]).await.unwrap();
    // A redelivered batch that overlaps the stored one, with one event twice in it.
    store
        .insert_events(&[b.clone(), c.clone(), c.clone()])
        .await
        .unwrap();
    store.insert_events(&[a, b, c]).await.unwrap();
    assert_eq!(rows(&store).await, 3);

    let letter = |offset| NewDeadLetter {
        source_topic: "raw",
        source_partition: 0,
        source_offset: offset,
        device_id: Some("d1"),
        received_at: now,
        code: "invalid_json",
        message: "not JSON",
        field: None,
        rule: Some("json"),
        contract_version: 1,
        payload: b"oops",
    };
    store.insert_dead_letters(&[letter(10)]).await.unwrap();
    store
        .insert_dead_letters(&[letter(10), letter(11), letter(11)])
        .await
        .unwrap();

    let devices = store.devices(chrono::Utc::now()).await.unwrap();
    assert_eq!(devices.len(), 1);
    let device = &devices[0];
    assert_eq!(device.device_id, "d1");
    assert_eq!((device.events_last_hour, device.events_last_day), (3, 3));
    assert_eq!((device.dlq_last_hour, device.dlq_last_day), (2, 2));
    assert_eq!(device.metrics, ["temperature_c"]);
    assert_eq!(
        store
            .dead_letters(&telemetry_store::DeadLetterFilter {
                device_id: Some("d1"),
                code: None,
                limit: 10
            })
            .await
            .unwrap()
            .len(),
        2
    );
}
