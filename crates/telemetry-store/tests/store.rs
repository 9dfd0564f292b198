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

/// A record the audit service rejected as not JSON, from `device_id`, at raw offset `offset`.
fn rejected(offset: i64, device_id: Option<&str>, received_at: i64) -> NewDeadLetter<'_> {
    NewDeadLetter {
        source_topic: "raw",
        source_partition: 0,
        source_offset: offset,
        device_id,
        received_at,
        code: "invalid_json",
        message: "not JSON",
        field: None,
        rule: Some("json"),
        contract_version: 1,
        payload: b"oops",
    }
}

/// A store on a database of the test's own, migrated, and the test's own connections to it
/// (to read the tables as an operator would).
async fn fresh_store(name: &str) -> (Store, sqlx::MySqlPool) {
    let url = telemetry_testkit::database_url(&telemetry_testkit::unique(name));
    let store = Store::connect(&url, 2).await.unwrap();
    store.migrate().await.unwrap();
    (store, sqlx::MySqlPool::connect(&url).await.unwrap())
}

async fn rows(pool: &sqlx::MySqlPool) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM telemetry")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn overlapping_and_repeated_events_are_stored_and_counted_once() {
    let (store, pool) = fresh_store("store").await;
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
    assert_eq!(rows(&pool).await, 3);

    let letter = |offset| rejected(offset, Some("d1"), now);
    store.insert_dead_letters(&[letter(10)]).await.unwrap();
    store
        .insert_dead_letters(&[letter(10), letter(11), letter(11)])
        .await
        .unwrap();

    let devices = store
        .devices(
            chrono::Utc::now(),
            &telemetry_store::DevicePage {
                after: None,
                scope: &telemetry_core::DeviceScope::All,
                limit: 100,
            },
        )
        .await
        .unwrap();
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
                scope: &telemetry_core::DeviceScope::All,
                limit: 10,
                max_payload_bytes: 65_536,
            })
            .await
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn a_device_scope_filters_in_sql_with_prefix_wildcards_taken_literally() {
    use telemetry_core::{DevicePattern, DeviceScope};
    let (store, _pool) = fresh_store("scope").await;
    let now = chrono::Utc::now().timestamp_millis();
    let devices = ["a_b-1", "axb-1", "a%b-2", "pico-7", "pico-70", "pico-7 "];
    let letters: Vec<NewDeadLetter<'_>> = devices
        .iter()
        .enumerate()
        .map(|(offset, device)| rejected(offset as i64, Some(device), now))
        .chain(std::iter::once(rejected(99, None, now)))
        .collect();
    store.insert_dead_letters(&letters).await.unwrap();
    let listed = |scope: DeviceScope| {
        let store = store.clone();
        async move {
            let mut ids: Vec<String> = store
                .dead_letters(&telemetry_store::DeadLetterFilter {
                    device_id: None,
                    code: None,
                    scope: &scope,
                    limit: 100,
                    max_payload_bytes: 65_536,
                })
                .await
                .unwrap()
                .into_iter()
                .map(|entry| entry.device_id.unwrap_or_else(|| "(none)".into()))
                .collect();
            ids.sort();
            ids
        }
    };
    let scope = |patterns: &[&str]| {
        DeviceScope::from_patterns(
            patterns
                .iter()
                .map(|pattern| DevicePattern::parse(pattern).unwrap())
                .collect(),
        )
    };
    // `_` and `%` in a prefix match themselves, not any character.
    assert_eq!(listed(scope(&["a_b*"])).await, ["a_b-1"]);
    assert_eq!(listed(scope(&["a%*"])).await, ["a%b-2"]);
    // Exact ids are exact: MariaDB's `=` alone would also take `pico-7 ` (trailing space).
    assert_eq!(listed(scope(&["pico-7"])).await, ["pico-7"]);
    assert_eq!(
        listed(scope(&["pico-7*", "axb-1"])).await,
        ["axb-1", "pico-7", "pico-7 ", "pico-70"]
    );
    let only_pico_7 = store
        .dead_letters(&telemetry_store::DeadLetterFilter {
            device_id: Some("pico-7"),
            code: None,
            scope: &DeviceScope::All,
            limit: 100,
            max_payload_bytes: 65_536,
        })
        .await
        .unwrap();
    assert_eq!(only_pico_7.len(), 1);
    // Every device, and the record without one.
    assert_eq!(listed(DeviceScope::All).await.len(), 7);
}

#[tokio::test]
async fn a_device_id_with_a_trailing_space_is_a_device_of_its_own() {
    let (store, pool) = fresh_store("pad").await;
    let now = chrono::Utc::now().timestamp_millis();
    // `pico-7 ` (from an MQTT topic) and `pico-7`: rejected records of both, and an event of
    // `pico-7` (a validated id has no space).
    store
        .insert_dead_letters(&[
            rejected(1, Some("pico-7 "), now),
            rejected(2, Some("pico-7"), now),
            rejected(3, Some("pico-7  "), now),
        ])
        .await
        .unwrap();
    store
        .insert_events(&[record("pico-7", now, 1)])
        .await
        .unwrap();
    let texts = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            // Binary-collated text decodes as bytes: read through CAST, as the store does. Sorted
            // here: `[pico-7  ]` < `[pico-7 ]` < `[pico-7]`.
            let mut rows: Vec<String> =
                sqlx::query_scalar(&format!("SELECT CAST(text AS CHAR) FROM ({sql}) AS t"))
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            rows.sort();
            rows
        }
    };
    assert_eq!(
        texts("SELECT CONCAT('[', device_id, ']') AS text FROM devices").await,
        ["[pico-7  ]", "[pico-7 ]", "[pico-7]"],
        "three devices"
    );
    assert_eq!(
        texts(
            "SELECT CONCAT('[', device_id, ']', accepted, '/', rejected) AS text \
             FROM device_minutes"
        )
        .await,
        ["[pico-7  ]0/1", "[pico-7 ]0/1", "[pico-7]1/1"],
        "each counted for itself"
    );
    let last_rejected: Vec<(String, Option<chrono::NaiveDateTime>)> = sqlx::query_as(
        "SELECT CAST(device_id AS CHAR), last_accepted FROM devices WHERE device_id = 'pico-7 '",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        last_rejected,
        [("pico-7 ".to_string(), None)],
        "`=` is exact: only the one with the space, which never had an event"
    );
    assert_eq!(
        texts(
            "SELECT CONCAT('[', device_id, ']') AS text FROM dlq_events WHERE device_id = 'pico-7'"
        )
        .await,
        ["[pico-7]"]
    );

    // The alerter's tables too: two states, and alerts under each device.
    let alert = |alert_id, device_id| telemetry_store::NewAlert {
        alert_id,
        status: "firing",
        device_id,
        payload: "{}",
    };
    store
        .save_alerts(
            "group",
            &[],
            &[
                ("quiet", "pico-7 ", Some("{\"phase\": \"ok\"}")),
                ("quiet", "pico-7", Some("{\"phase\": \"ok\"}")),
            ],
            &[
                alert("quiet:pico-7 :1", "pico-7 "),
                alert("quiet:pico-7:1", "pico-7"),
            ],
            false,
        )
        .await
        .unwrap();
    // The devices of the stored alert states, bracketed to show trailing spaces, sorted.
    let state_devices = || async {
        let mut devices: Vec<String> = store
            .alert_states()
            .await
            .unwrap()
            .into_iter()
            .map(|row| format!("[{}]", row.device_id))
            .collect();
        devices.sort();
        devices
    };
    assert_eq!(state_devices().await, ["[pico-7 ]", "[pico-7]"]);
    assert_eq!(
        texts("SELECT alert_id AS text FROM alert_outbox WHERE device_id = 'pico-7'").await,
        ["quiet:pico-7:1"]
    );
    // Deleting one state leaves the other.
    store
        .save_alerts("group", &[], &[("quiet", "pico-7", None)], &[], false)
        .await
        .unwrap();
    assert_eq!(state_devices().await, ["[pico-7 ]"]);
}
