//! The SQLite store's schema versions: a database made by an earlier release is upgraded in place
//! and keeps its rows; one made by a newer release is refused and left as it is; the migration
//! files and the list the binary embeds agree.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use telemetry_store::{Resolution, SqliteStore, TelemetryStore};

/// A database as release 1 made it (its schema, verbatim), with a row, a device and a DLQ entry.
async fn release_1_database(path: &std::path::Path) {
    let database = libsql::Builder::new_local(path).build().await.unwrap();
    let connection = database.connect().unwrap();
    connection
        .execute_batch(include_str!("fixtures/sqlite_v1.sql"))
        .await
        .unwrap();
    connection
        .execute_batch(
            "INSERT INTO telemetry (device_id, device_ts, seq, seq_key, received_at, metrics, \
             source_topic, source_partition, source_offset) \
             VALUES ('d1', 1704103200000, 1, 1, 1704103200500, '{\"temperature_c\":21.5}', \
                     'raw', 0, 7); \
             INSERT INTO devices (device_id, first_seen, last_seen, last_accepted) \
             VALUES ('d1', 1704103200500, 1704103200500, 1704103200500); \
             INSERT INTO dlq_events (source_topic, source_partition, source_offset, device_id, \
             received_at, code, message, contract_version, payload, payload_bytes) \
             VALUES ('raw', 0, 8, 'd1', 1704103201000, 'invalid_json', 'not JSON', 1, x'7b', 1);",
        )
        .await
        .unwrap();
}

async fn user_version(path: &std::path::Path) -> i64 {
    let database = libsql::Builder::new_local(path).build().await.unwrap();
    let connection = database.connect().unwrap();
    let mut rows = connection.query("PRAGMA user_version", ()).await.unwrap();
    let row = rows.next().await.unwrap().unwrap();
    row.get::<i64>(0).unwrap()
}

#[tokio::test]
async fn a_release_1_database_is_upgraded_and_keeps_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("telemetry.db");
    release_1_database(&path).await;
    assert_eq!(user_version(&path).await, 1);

    let url = format!("sqlite://{}", path.display());
    let store = SqliteStore::open(&url).await.unwrap();
    assert_eq!(
        user_version(&path).await,
        i64::from(telemetry_store::sqlite_schema_version())
    );
    assert_eq!(store.count_events().await.unwrap(), 1);
    assert_eq!(store.count_dead_letters().await.unwrap(), 1);
    assert!(store.device_exists("d1").await.unwrap());
    // The tables the upgrade added work: the rollup and the alerter can run on it.
    let validator = telemetry_core::Validator::new(telemetry_core::Contract::default()).unwrap();
    let telemetry_core::Outcome::Accepted(event) = validator.validate(
        br#"{"device_id":"d1","device_ts":1704103260000,"seq":2,"temperature_c":22}"#,
        1_704_103_260_000,
    ) else {
        panic!("valid");
    };
    let outcome = store.roll_up(&[event], 600_000).await.unwrap();
    assert_eq!(outcome.folded, 1);
    assert_eq!(
        store
            .rollup_rows(Resolution::Minute, &[])
            .await
            .unwrap()
            .len(),
        1
    );
    store
        .save_alerts("g", &[], &[("hot", "d1", Some("{}"))], &[], false)
        .await
        .unwrap();
    assert_eq!(store.alert_states().await.unwrap().len(), 1);
    drop(store);

    // Opening again changes nothing.
    let store = SqliteStore::open(&url).await.unwrap();
    assert_eq!(store.count_events().await.unwrap(), 1);
    assert_eq!(store.alert_states().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_database_from_a_newer_release_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("telemetry.db");
    release_1_database(&path).await;
    let newer = i64::from(telemetry_store::sqlite_schema_version()) + 1;
    {
        let database = libsql::Builder::new_local(&path).build().await.unwrap();
        let connection = database.connect().unwrap();
        connection
            .execute_batch(&format!("PRAGMA user_version = {newer};"))
            .await
            .unwrap();
    }
    let error = SqliteStore::open(&format!("sqlite://{}", path.display()))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("newer release"), "{error}");
    assert_eq!(user_version(&path).await, newer);
}

#[test]
fn every_migration_file_is_embedded_in_order() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let embedded = telemetry_store::SQLITE_MIGRATIONS;
    assert_eq!(files.len(), embedded.len(), "{files:?}");
    for (index, (file, (version, sql))) in files.iter().zip(embedded).enumerate() {
        assert_eq!(*version as usize, index + 1, "versions count up from 1");
        assert!(file.starts_with(&format!("{version:04}_")), "{file}");
        let on_disk = std::fs::read_to_string(dir.join(file)).unwrap();
        assert_eq!(
            &on_disk, sql,
            "{file} is the one embedded as version {version}"
        );
    }
}
