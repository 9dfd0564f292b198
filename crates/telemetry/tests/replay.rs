//! `telemetry replay` against the real Kafka and MariaDB: a rebuild into a new table equals the
//! live table; replaying twice adds nothing; a replay while the audit service runs leaves the
//! audit group's committed offsets as they were; a device filter and a time range select what
//! they say; `replay swap` makes the rebuilt table live.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use common::{audit_config, base_ts, kafka_config};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;
use telemetry_audit::replay::{Position, ProgressMode, ReplayConfig, Summary, SwapConfig};
use telemetry_core::names::headers;
use telemetry_kafka::KafkaConfig;
use telemetry_testkit::{database_url, kafka_brokers, produce, unique, TestRecord};
use tokio_util::sync::CancellationToken;

const DEVICES: i64 = 4;
const PER_DEVICE: i64 = 50;

fn replay_config(id: &str, kafka: &KafkaConfig) -> ReplayConfig {
    ReplayConfig {
        mysql_url: database_url(id),
        from: Position::Earliest,
        to: Position::Latest,
        devices: Vec::new(),
        into: None,
        contract: None,
        batch_size: 64,
        group_id: format!("{id}-replay"),
        progress: ProgressMode::None,
        kafka: kafka.clone(),
    }
}

async fn replay(config: ReplayConfig) -> Summary {
    telemetry_audit::replay::run(config, CancellationToken::new())
        .await
        .unwrap()
}

/// Every row of `table`, in identity order, as text: what a rebuild must reproduce.
async fn rows(pool: &sqlx::MySqlPool, table: &str) -> Vec<String> {
    sqlx::query_scalar(&format!(
        "SELECT CAST(CONCAT_WS('|', CAST(device_id AS CHAR), device_ts, IFNULL(seq, ''), \
                received_at, metrics, schema_version, IFNULL(attributes, ''), \
                IFNULL(quality, ''), source_topic, source_partition, source_offset) AS CHAR) \
         FROM `{table}` ORDER BY device_id, device_ts, seq_key"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The audit group's committed offsets on the raw topic, as Kafka has them.
fn committed(group: &str, topic: &str) -> Vec<(i32, Offset)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", group)
        .create()
        .unwrap();
    let mut partitions = TopicPartitionList::new();
    for partition in 0..3 {
        partitions.add_partition(topic, partition);
    }
    consumer
        .committed_offsets(partitions, Duration::from_secs(10))
        .unwrap()
        .elements()
        .iter()
        .map(|element| (element.partition(), element.offset()))
        .collect()
}

/// 200 events from 4 devices, and 10 malformed records, as the bridge produces them.
fn raw_history() -> Vec<TestRecord> {
    let mut records = Vec::new();
    for index in 0..DEVICES * PER_DEVICE {
        let device = format!("dev-{}", index % DEVICES);
        let ts = base_ts() + index * 1_000;
        records.push(TestRecord {
            key: Some(device.clone().into_bytes()),
            payload: json!({"device_id": device, "device_ts": ts, "seq": index / DEVICES,
                            "temp": 20.0 + (index % 7) as f64, "firmware": "1.0"})
            .to_string()
            .into_bytes(),
            headers: vec![(
                headers::RECEIVED_AT.to_string(),
                (ts + 150).to_string().into_bytes(),
            )],
        });
        if index % 20 == 0 {
            records.push(TestRecord {
                key: Some(device.into_bytes()),
                payload: b"{oops".to_vec(),
                headers: Vec::new(),
            });
        }
    }
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_rebuilds_the_table_adds_no_duplicates_and_leaves_the_audit_offsets_alone() {
    let id = unique("replay");
    let kafka = kafka_config(&id);
    telemetry_kafka::ensure_topics(&kafka, &[&kafka.raw_topic])
        .await
        .unwrap();

    let records = raw_history();
    produce(&kafka.raw_topic, &records).await;

    // The audit service stores them and keeps running.
    let group = format!("{id}-audit");
    let shutdown = CancellationToken::new();
    let audit = tokio::spawn(telemetry_audit::run(
        audit_config(&id, &group, &kafka),
        shutdown.clone(),
    ));
    let pool = sqlx::MySqlPool::connect_lazy(&database_url(&id)).unwrap();
    let expected = usize::try_from(DEVICES * PER_DEVICE).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let stored: Option<i64> = sqlx::query_scalar("SELECT COUNT(*) FROM telemetry")
            .fetch_one(&pool)
            .await
            .ok();
        if stored == Some(i64::try_from(expected).unwrap()) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the audit service stored {stored:?} of {expected} rows"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let the audit service commit what it stored, then note its offsets.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let offsets_before = committed(&group, &kafka.raw_topic);
    let committed_total: i64 = offsets_before
        .iter()
        .filter_map(|(_, offset)| match offset {
            Offset::Offset(offset) => Some(*offset),
            _ => None, // a partition no record was keyed to
        })
        .sum();
    assert_eq!(
        committed_total,
        i64::try_from(records.len()).unwrap(),
        "the audit group committed everything: {offsets_before:?}"
    );
    let live = rows(&pool, "telemetry").await;
    assert_eq!(live.len(), expected);

    // A rebuild into a new table gives the same rows.
    let mut into_v2 = replay_config(&id, &kafka);
    into_v2.into = Some("telemetry_v2".into());
    let summary = replay(into_v2.clone()).await;
    assert_eq!(summary.read, u64::try_from(records.len()).unwrap());
    assert_eq!(summary.accepted, 200);
    assert_eq!(summary.inserted, 200);
    assert_eq!(summary.duplicates, 0);
    assert_eq!(summary.rejected.get("invalid_json"), Some(&10));
    assert_eq!(rows(&pool, "telemetry_v2").await, live);

    // Replaying again, into either table, adds nothing.
    let again = replay(into_v2).await;
    assert_eq!((again.inserted, again.duplicates), (0, 200));
    let into_live = replay(replay_config(&id, &kafka)).await;
    assert_eq!((into_live.inserted, into_live.duplicates), (0, 200));
    assert_eq!(rows(&pool, "telemetry").await, live);
    assert_eq!(rows(&pool, "telemetry_v2").await, live);

    // One device, from a time on: only its later events.
    let mut some = replay_config(&id, &kafka);
    some.into = Some("telemetry_some".into());
    some.devices = vec!["dev-1".into()];
    let summary = replay(some).await;
    assert_eq!(summary.accepted, 50);
    let dev1: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM telemetry_some WHERE device_id = 'dev-1'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(dev1, 50);
    assert_eq!(rows(&pool, "telemetry_some").await.len(), 50);
    let mut nothing = replay_config(&id, &kafka);
    nothing.into = Some("telemetry_none".into());
    nothing.from = Position::Time(chrono::Utc::now().timestamp_millis() + 60_000);
    assert_eq!(replay(nothing).await.read, 0);

    // The documented contract change: a rebuild with contract version 2 stamps every row with it.
    let contract = telemetry_core::Contract {
        version: 2,
        ..telemetry_core::Contract::default()
    };
    let path = std::env::temp_dir().join(format!("{id}-v2.toml"));
    std::fs::write(&path, contract.to_toml()).unwrap();
    let mut rebuild = replay_config(&id, &kafka);
    rebuild.into = Some("telemetry_v3".into());
    rebuild.contract = Some(path);
    assert_eq!(replay(rebuild).await.inserted, 200);
    let versions: Vec<u32> =
        sqlx::query_scalar("SELECT DISTINCT schema_version FROM telemetry_v3 ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(versions, [2]);

    // The audit group's committed offsets are as they were.
    assert_eq!(committed(&group, &kafka.raw_topic), offsets_before);

    // The rebuilt table goes live; the old one is kept.
    let kept = telemetry_audit::replay::swap(SwapConfig {
        mysql_url: database_url(&id),
        table: "telemetry_v2".into(),
        keep_as: Some("telemetry_old".into()),
    })
    .await
    .unwrap();
    assert_eq!(kept, "telemetry_old");
    assert_eq!(rows(&pool, "telemetry").await, live);
    assert_eq!(rows(&pool, "telemetry_old").await, live);

    // Never into, or swapped from, a table that is not a copy of `telemetry`.
    for table in ["devices", "dlq_events"] {
        let mut wrong = replay_config(&id, &kafka);
        wrong.into = Some(table.into());
        assert!(
            telemetry_audit::replay::run(wrong, CancellationToken::new())
                .await
                .is_err()
        );
    }
    sqlx::query("CREATE TABLE other_kind (id INT PRIMARY KEY)")
        .execute(&pool)
        .await
        .unwrap();
    let mut wrong = replay_config(&id, &kafka);
    wrong.into = Some("other_kind".into());
    let error = telemetry_audit::replay::run(wrong, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("not a copy of `telemetry`"),
        "{error}"
    );
    let swap_wrong = telemetry_audit::replay::swap(SwapConfig {
        mysql_url: database_url(&id),
        table: "other_kind".into(),
        keep_as: None,
    })
    .await;
    assert!(swap_wrong.is_err());
    assert_eq!(rows(&pool, "telemetry").await, live);

    shutdown.cancel();
    audit.await.unwrap().unwrap();
}

#[test]
fn positions_parse_as_documented() {
    assert_eq!("earliest".parse::<Position>(), Ok(Position::Earliest));
    assert_eq!("latest".parse::<Position>(), Ok(Position::Latest));
    assert_eq!("offset:42".parse::<Position>(), Ok(Position::Offset(42)));
    assert_eq!(
        "2026-11-29T10:00:00Z".parse::<Position>(),
        Ok(Position::Time(1_795_946_400_000))
    );
    for bad in ["offset:-1", "offset:x", "yesterday", "42"] {
        let error = bad.parse::<Position>().unwrap_err();
        assert!(error.contains(bad.trim_start_matches("offset:")), "{error}");
    }
}

/// The same rebuild on `telemetry up`'s SQLite store: into a new table, swapped in, the old one
/// kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_rebuilds_the_sqlite_store_of_telemetry_up() {
    let id = unique("replay_sqlite");
    let kafka = kafka_config(&id);
    telemetry_kafka::ensure_topics(&kafka, &[&kafka.raw_topic])
        .await
        .unwrap();
    produce(&kafka.raw_topic, &raw_history()).await;
    let directory = tempfile::tempdir().unwrap();
    let store_url = format!(
        "sqlite://{}",
        directory.path().join("telemetry.db").display()
    );

    let rebuilt = replay(ReplayConfig {
        mysql_url: store_url.clone(),
        into: Some("rebuilt".into()),
        ..replay_config(&id, &kafka)
    })
    .await;
    assert_eq!(
        (
            rebuilt.read,
            rebuilt.inserted,
            rebuilt.rejected.get("invalid_json")
        ),
        (
            (DEVICES * PER_DEVICE + 10) as u64,
            (DEVICES * PER_DEVICE) as u64,
            Some(&10)
        )
    );
    let store = telemetry_store::open_reader(&store_url, 1).await.unwrap();
    assert_eq!(
        store.count_events().await.unwrap(),
        0,
        "the live table is untouched"
    );

    let kept = telemetry_audit::replay::swap(SwapConfig {
        mysql_url: store_url.clone(),
        table: "rebuilt".into(),
        keep_as: None,
    })
    .await
    .unwrap();
    assert!(kept.starts_with("telemetry_before_"), "{kept}");
    let store = telemetry_store::open_reader(&store_url, 1).await.unwrap();
    assert_eq!(
        store.count_events().await.unwrap(),
        (DEVICES * PER_DEVICE) as u64
    );
}
