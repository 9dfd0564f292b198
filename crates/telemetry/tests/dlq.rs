//! `telemetry dlq list|show|stats` against the real Kafka: the audit service's dead letters,
//! filtered by device, code and time, shown whole, and counted.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use common::{audit_config, kafka_config};
use telemetry_audit::dlq::{self, DlqFilter, ShowConfig};
use telemetry_core::names::headers;
use telemetry_testkit::{eventually, produce, read_topic, unique, TestRecord};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_tools_list_show_and_count_what_the_audit_service_rejected() {
    let id = unique("dlq");
    let kafka = kafka_config(&id);
    telemetry_kafka::ensure_topics(&kafka, &[&kafka.raw_topic])
        .await
        .unwrap();
    // Rejected records as the bridge produced them: two devices, three reasons, one binary.
    let raw = |device: &str, payload: &[u8]| TestRecord {
        key: Some(device.as_bytes().to_vec()),
        payload: payload.to_vec(),
        headers: vec![(
            headers::MQTT_TOPIC.to_string(),
            format!("devices/{device}/telemetry").into_bytes(),
        )],
    };
    produce(
        &kafka.raw_topic,
        &[
            raw("pico-1", b"oops"),
            raw("pico-1", br#"{"device_ts":1}"#),
            raw("pico-2", b"{\"device_id\":\"pico-2\""),
            raw("pico-2", &[0xff, 0xfe, 0x00]),
        ],
    )
    .await;
    let shutdown = CancellationToken::new();
    let audit = tokio::spawn(telemetry_audit::run(
        audit_config(&id, &format!("{id}-audit"), &kafka),
        shutdown.clone(),
    ));
    let dead = read_topic(
        &kafka.dlq_topic,
        4,
        Duration::from_secs(60),
        Duration::from_millis(200),
    )
    .await;
    assert_eq!(dead.len(), 4);
    shutdown.cancel();
    audit.await.unwrap().unwrap();

    let filter = DlqFilter {
        device: None,
        code: None,
        since: None,
        until: None,
        kafka: kafka.clone(),
    };
    let all = dlq::read(&filter).await.unwrap();
    assert_eq!(all.len(), 4);
    let text = dlq::list_text(&all);
    assert_eq!(text.lines().count(), 4);
    assert!(
        text.contains("pico-1") && text.contains("invalid_json"),
        "{text}"
    );

    let only_pico_1 = dlq::read(&DlqFilter {
        device: Some("pico-1".into()),
        ..filter.clone()
    })
    .await
    .unwrap();
    assert_eq!(only_pico_1.len(), 2);
    assert!(only_pico_1
        .iter()
        .all(|record| record.key.as_deref() == Some("pico-1")));
    let invalid_json = dlq::read(&DlqFilter {
        code: Some("invalid_json".into()),
        ..filter.clone()
    })
    .await
    .unwrap();
    assert_eq!(invalid_json.len(), 3, "{}", dlq::list_text(&invalid_json));
    let later = dlq::read(&DlqFilter {
        since: Some(chrono::Utc::now() + chrono::Duration::minutes(1)),
        until: Some(chrono::Utc::now() + chrono::Duration::minutes(2)),
        ..filter.clone()
    })
    .await
    .unwrap();
    assert!(later.is_empty());

    let stats = dlq::stats(&all);
    assert_eq!(stats.total, 4);
    assert_eq!(stats.by_code.get("invalid_json"), Some(&3));
    assert_eq!(stats.by_code.get("missing_device_id"), Some(&1));
    assert_eq!(stats.by_device.get("pico-2"), Some(&2));

    // One record whole: the original bytes (here not UTF-8, so a hex dump) and every header.
    let binary = all
        .iter()
        .find(|record| record.payload == [0xff, 0xfe, 0x00])
        .unwrap();
    let shown = dlq::show(&ShowConfig {
        partition: binary.partition,
        offset: binary.offset,
        kafka: kafka.clone(),
    })
    .await
    .unwrap();
    assert_eq!(&shown, binary);
    let text = dlq::show_text(&shown);
    assert!(text.contains("00000000  ff fe 00"), "{text}");
    assert!(text.contains("error.code: invalid_json"), "{text}");
    assert!(
        text.contains("mqtt.topic: devices/pico-2/telemetry"),
        "{text}"
    );
    assert!(text.contains("source.topic: "), "{text}");
    let missing = dlq::show(&ShowConfig {
        partition: binary.partition,
        offset: binary.offset + 1_000,
        kafka,
    })
    .await;
    assert!(missing.is_err());
}

/// The fix of these tests, written to `path`: version 2 of the contract, humidity up to 200.
fn fixed_contract(path: &std::path::Path) -> std::path::PathBuf {
    let mut fixed = telemetry_core::Contract {
        version: 2,
        ..telemetry_core::Contract::default()
    };
    fixed.metrics.get_mut("humidity_pct").unwrap().max = Some(200.0);
    std::fs::write(path, fixed.to_toml()).unwrap();
    path.to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_fix_and_dlq_replay_move_exactly_the_fixed_records_into_the_table() {
    let id = unique("dlqreplay");
    let kafka = kafka_config(&id);
    telemetry_kafka::ensure_topics(&kafka, &[&kafka.raw_topic])
        .await
        .unwrap();
    let ts = common::base_ts();
    let event = |seq: i64, humidity: f64| {
        let device = if seq == 3 { "dev-3" } else { "dev-1" };
        TestRecord {
        key: Some(device.as_bytes().to_vec()),
        payload: format!(
            r#"{{"device_id":"{device}","device_ts":{},"seq":{seq},"humidity_pct":{humidity}}}"#,
            ts + seq * 1_000
        )
        .into_bytes(),
        headers: vec![(
            headers::RECEIVED_AT.to_string(),
            (ts + seq * 1_000 + 250).to_string().into_bytes(),
        )],
    }
    };
    // One valid event, three above the contract's humidity maximum (100), two not JSON.
    let mut records = vec![
        event(0, 50.0),
        event(1, 140.0),
        event(2, 150.0),
        event(3, 160.0),
    ];
    for _ in 0..2 {
        records.push(TestRecord {
            key: Some(b"dev-2".to_vec()),
            payload: b"oops".to_vec(),
            headers: Vec::new(),
        });
    }
    produce(&kafka.raw_topic, &records).await;
    let shutdown = CancellationToken::new();
    let audit = tokio::spawn(telemetry_audit::run(
        audit_config(&id, &format!("{id}-audit"), &kafka),
        shutdown.clone(),
    ));
    let dead = read_topic(
        &kafka.dlq_topic,
        5,
        Duration::from_secs(60),
        Duration::from_millis(200),
    )
    .await;
    assert_eq!(dead.len(), 5);
    let cleaned = read_topic(
        &kafka.cleaned_topic,
        1,
        Duration::from_secs(30),
        Duration::from_millis(200),
    )
    .await;
    assert_eq!(cleaned.len(), 1);
    shutdown.cancel();
    audit.await.unwrap().unwrap();

    let contract = fixed_contract(&std::env::temp_dir().join(format!("{id}-fixed.toml")));
    let config = dlq::ReplayConfig {
        filter: DlqFilter {
            device: None,
            code: None,
            since: None,
            until: None,
            kafka: kafka.clone(),
        },
        mysql_url: telemetry_testkit::database_url(&id),
        contract: Some(contract),
        dry_run: false,
    };
    let dry = dlq::replay(&dlq::ReplayConfig {
        dry_run: true,
        ..config.clone()
    })
    .await
    .unwrap();
    assert_eq!((dry.selected, dry.stored), (5, 3));

    // A table rebuild with the fixed contract stores dev-3's event first (rows only, no cleaned
    // record): `dlq replay` must still produce its cleaned record.
    let rebuilt = telemetry_audit::replay::run(
        telemetry_audit::replay::ReplayConfig {
            mysql_url: telemetry_testkit::database_url(&id),
            from: telemetry_audit::replay::Position::Earliest,
            to: telemetry_audit::replay::Position::Latest,
            devices: vec!["dev-3".into()],
            into: None,
            contract: config.contract.clone(),
            batch_size: 100,
            group_id: format!("{id}-replay"),
            progress: telemetry_audit::replay::ProgressMode::None,
            kafka: kafka.clone(),
        },
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(rebuilt.inserted, 1);

    let first = dlq::replay(&config).await.unwrap();
    assert_eq!(first.selected, 5);
    assert_eq!((first.stored, first.already_stored), (2, 1), "{first}");
    assert_eq!(first.produced, 3);
    assert_eq!(first.still_rejected.get("invalid_json"), Some(&2));
    // Again: nothing more.
    let second = dlq::replay(&config).await.unwrap();
    assert_eq!(
        (second.stored, second.already_replayed, second.produced),
        (0, 3, 0),
        "{second}"
    );

    let pool = sqlx::MySqlPool::connect(&telemetry_testkit::database_url(&id))
        .await
        .unwrap();
    let rows: Vec<(i64, u32, i64)> = sqlx::query_as(
        "SELECT seq, schema_version, \
                CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01', received_at) DIV 1000 AS SIGNED) \
         FROM telemetry ORDER BY seq",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        (0..4)
            .map(|seq| (seq, if seq == 0 { 1 } else { 2 }, ts + seq * 1_000 + 250))
            .collect::<Vec<_>>(),
        "the fixed records are stored once, with the time they were first received"
    );
    // Exactly the three fixed events reached the cleaned topic, once each; the DLQ is unchanged.
    let cleaned = read_topic(
        &kafka.cleaned_topic,
        5,
        Duration::from_secs(10),
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(cleaned.len(), 4);
    let dead = read_topic(
        &kafka.dlq_topic,
        6,
        Duration::from_secs(5),
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(dead.len(), 5);
}

/// The same repair on `telemetry up`'s SQLite store: `dlq replay --mysql-url sqlite://...` stores
/// the fixed records once, produces their cleaned records once, and leaves the rest in the DLQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_repairs_the_sqlite_store_of_telemetry_up() {
    let id = unique("dlqreplay_sqlite");
    let kafka = kafka_config(&id);
    let directory = tempfile::tempdir().unwrap();
    let store_url = format!(
        "sqlite://{}",
        directory.path().join("telemetry.db").display()
    );
    let ts = common::base_ts();
    let reading = |seq: i64, humidity: f64| TestRecord {
        key: Some(b"pico-9".to_vec()),
        payload: format!(
            r#"{{"device_id":"pico-9","device_ts":{},"seq":{seq},"humidity_pct":{humidity}}}"#,
            ts + seq * 1_000
        )
        .into_bytes(),
        headers: Vec::new(),
    };
    let not_json = TestRecord {
        key: Some(b"pico-9".to_vec()),
        payload: b"{oops".to_vec(),
        headers: Vec::new(),
    };
    telemetry_kafka::ensure_topics(&kafka, &[&kafka.raw_topic])
        .await
        .unwrap();
    produce(
        &kafka.raw_topic,
        &[
            reading(0, 50.0),
            reading(1, 140.0),
            reading(2, 150.0),
            not_json,
        ],
    )
    .await;
    let mut audit = audit_config(&id, &format!("{id}-audit"), &kafka);
    audit.database.mysql_url = store_url.clone();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(telemetry_audit::run(audit, shutdown.clone()));
    let dead = read_topic(&kafka.dlq_topic, 3, Duration::from_secs(60), Duration::ZERO).await;
    assert_eq!(dead.len(), 3);
    // The DLQ records are indexed with the batch; the audit service stops once they are.
    assert!(
        eventually(Duration::from_secs(30), || async {
            let store = telemetry_store::open_reader(&store_url, 1).await.unwrap();
            store.count_dead_letters().await.unwrap() == 3
        })
        .await
    );
    shutdown.cancel();
    running.await.unwrap().unwrap();

    let contract = fixed_contract(&directory.path().join("fixed.toml"));
    let config = dlq::ReplayConfig {
        filter: DlqFilter {
            device: None,
            code: None,
            since: None,
            until: None,
            kafka: kafka.clone(),
        },
        mysql_url: store_url.clone(),
        contract: Some(contract),
        dry_run: false,
    };
    let first = dlq::replay(&config).await.unwrap();
    assert_eq!(
        (first.selected, first.stored, first.produced),
        (3, 2, 2),
        "{first}"
    );
    assert_eq!(first.still_rejected.get("invalid_json"), Some(&1));
    let again = dlq::replay(&config).await.unwrap();
    assert_eq!(
        (again.stored, again.already_replayed, again.produced),
        (0, 2, 0),
        "{again}"
    );

    let store = telemetry_store::open_reader(&store_url, 1).await.unwrap();
    assert_eq!(store.count_events().await.unwrap(), 3);
    let cleaned = read_topic(
        &kafka.cleaned_topic,
        4,
        Duration::from_secs(10),
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(
        cleaned.len(),
        3,
        "the valid event once, the two fixed ones once each"
    );
}
