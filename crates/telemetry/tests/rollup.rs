//! `telemetry rollup` against the real Kafka and MariaDB: its minute and hour aggregates agree with
//! the rows the audit service stored (duplicates on the cleaned topic counted once); reading the
//! topic again, over the tables or into emptied ones, gives the same tables bit for bit; an event
//! inside the late window is folded into its minute, one later than that is left out, and a
//! damaged record does not stop the stream.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{audit_config, kafka_config, metric};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;
use telemetry_core::names::headers;
use telemetry_kafka::KafkaConfig;
use telemetry_rollup::RollupConfig;
use telemetry_store::{Resolution, RollupRow, Store};
use telemetry_testkit::TestRecord;
use telemetry_testkit::{database_url, eventually, http_get, kafka_brokers, produce, unique};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(90);

fn rollup_config(
    id: &str,
    group: &str,
    kafka: &KafkaConfig,
    late_window_seconds: u32,
) -> RollupConfig {
    RollupConfig {
        database: telemetry_store::DatabaseConfig {
            mysql_url: database_url(id),
            mysql_owner_url: None,
            mysql_max_connections: Some(2),
        },
        group_id: group.to_string(),
        batch_size: 100,
        batch_linger_ms: 20,
        late_window_seconds,
        listen: format!("127.0.0.1:{}", telemetry_testkit::free_port()),
        http: Default::default(),
        kafka: kafka.clone(),
    }
}

struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<telemetry_rollup::Result<()>>,
}

fn start(config: RollupConfig) -> Running {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(telemetry_rollup::run(config, shutdown.clone()));
    Running { shutdown, task }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// Whether `group` has committed the end of every partition of `topic`: it has read it all.
fn caught_up(group: &str, topic: &str) -> bool {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", group)
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let partitions = metadata.topics()[0].partitions().len();
    let mut list = TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition(topic, i32::try_from(partition).unwrap());
    }
    let committed = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .unwrap();
    committed.elements().iter().all(|element| {
        let (_, high) = consumer
            .fetch_watermarks(topic, element.partition(), Duration::from_secs(10))
            .unwrap();
        high == 0 || element.offset() == Offset::Offset(high)
    })
}

async fn tables(store: &Store) -> (Vec<RollupRow>, Vec<RollupRow>) {
    (
        store.rollup_rows(Resolution::Minute, &[]).await.unwrap(),
        store.rollup_rows(Resolution::Hour, &[]).await.unwrap(),
    )
}

/// What a bucket should hold, worked out from the stored rows: (count, min, max, sum, last).
type Expected = BTreeMap<(String, String, i64), (u32, f64, f64, f64, (i64, i64, f64))>;

/// The aggregates of the `telemetry` table's rows by `width_ms` buckets of device time.
async fn expected_from_rows(pool: &sqlx::MySqlPool, width_ms: i64) -> Expected {
    let rows: Vec<(String, chrono::NaiveDateTime, i64, String)> = sqlx::query_as(
        "SELECT CAST(device_id AS CHAR), device_ts, seq_key, CAST(metrics AS CHAR) \
         FROM telemetry ORDER BY device_id, device_ts, seq_key",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut expected = Expected::new();
    for (device, ts, seq_key, metrics) in rows {
        let ts = ts.and_utc().timestamp_millis();
        let metrics: BTreeMap<String, f64> = serde_json::from_str(&metrics).unwrap();
        for (name, value) in metrics {
            let bucket = ts.div_euclid(width_ms) * width_ms;
            let entry = expected.entry((device.clone(), name, bucket)).or_insert((
                0,
                f64::INFINITY,
                f64::NEG_INFINITY,
                0.0,
                (i64::MIN, i64::MIN, 0.0),
            ));
            entry.0 += 1;
            entry.1 = entry.1.min(value);
            entry.2 = entry.2.max(value);
            entry.3 += value;
            if (ts, seq_key) > (entry.4 .0, entry.4 .1) {
                entry.4 = (ts, seq_key, value);
            }
        }
    }
    expected
}

fn assert_agrees(rows: &[RollupRow], expected: &Expected, table: &str) {
    assert_eq!(
        rows.len(),
        expected.len(),
        "{table}: one row per device, metric and bucket"
    );
    for row in rows {
        let key = (row.device_id.clone(), row.metric.clone(), row.bucket_start);
        let (count, min, max, sum, last) = expected
            .get(&key)
            .unwrap_or_else(|| panic!("{table}: unexpected bucket {key:?}"));
        let aggregate = row.aggregate;
        assert_eq!(aggregate.samples, *count, "{table} {key:?} count");
        assert_eq!(
            (aggregate.min, aggregate.max),
            (*min, *max),
            "{table} {key:?} min/max"
        );
        assert!(
            (aggregate.avg() - sum / f64::from(*count)).abs() < 1e-9,
            "{table} {key:?} avg"
        );
        assert_eq!(
            (aggregate.last_ts, aggregate.last_seq_key, aggregate.last),
            *last,
            "{table} {key:?} last"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_agree_with_the_stored_rows_and_replaying_the_topic_gives_the_same_tables() {
    let id = unique("rollup");
    let kafka = kafka_config(&id);
    telemetry_kafka::ensure_topics(&kafka, &[&kafka.raw_topic, &kafka.cleaned_topic])
        .await
        .unwrap();

    // Three devices, one event every 97 s over three hours, as the bridge produces them; the
    // third device sends no seq. Some events are sent twice (a device retrying), so they reach
    // the cleaned topic twice; some records are malformed.
    let now = chrono::Utc::now().timestamp_millis();
    let first_ts = now - 3 * 3_600_000;
    let mut records = Vec::new();
    let mut events = 0;
    for step in 0..110_i64 {
        for device in 0..3_i64 {
            let device_id = format!("pico-{device}");
            let ts = first_ts + step * 97_000 + device * 1_000;
            let mut payload = json!({
                "device_id": device_id,
                "device_ts": ts,
                "temperature_c": 18.0 + ((step * 37 + device * 11) % 100) as f64 / 7.0,
                "humidity_pct": 40.0 + ((step * 13) % 50) as f64 * 0.3,
                "rssi_dbm": -40 - (step * 7) % 50,
            });
            if device != 2 {
                payload["seq"] = json!(step);
            }
            let record = TestRecord {
                key: Some(device_id.into_bytes()),
                payload: payload.to_string().into_bytes(),
                headers: vec![(
                    headers::RECEIVED_AT.to_string(),
                    now.to_string().into_bytes(),
                )],
            };
            if step % 10 == 3 {
                records.push(record.clone());
            }
            records.push(record);
            events += 1;
        }
        if step % 25 == 0 {
            records.push(TestRecord {
                key: Some(b"pico-0".to_vec()),
                payload: b"{\"device_id\": \"pico-0\", \"device_ts\":".to_vec(),
                headers: Vec::new(),
            });
        }
    }
    produce(&kafka.raw_topic, &records).await;

    let audit_shutdown = CancellationToken::new();
    let audit = tokio::spawn(telemetry_audit::run(
        audit_config(&id, &format!("{id}-audit"), &kafka),
        audit_shutdown.clone(),
    ));
    let first_group = format!("{id}-rollup");
    let rollup = start(rollup_config(&id, &first_group, &kafka, 600));

    let store = Store::connect(&database_url(&id), 2).await.unwrap();
    let pool = sqlx::MySqlPool::connect(&database_url(&id)).await.unwrap();
    let folded = eventually(WAIT, || async {
        let samples: Option<i64> = sqlx::query_scalar(
            "SELECT CAST(SUM(samples) AS SIGNED) FROM rollup_1m WHERE metric = 'temperature_c'",
        )
        .fetch_one(&pool)
        .await
        .unwrap_or(None);
        samples == Some(events) && caught_up(&first_group, &kafka.cleaned_topic)
    })
    .await;
    assert!(folded, "the rollup folds in all {events} stored events");
    audit_shutdown.cancel();
    audit.await.unwrap().unwrap();
    rollup.stop().await;

    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM telemetry")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, events, "the audit service stored each event once");
    let (minutes, hours) = tables(&store).await;
    assert_agrees(
        &minutes,
        &expected_from_rows(&pool, 60_000).await,
        "rollup_1m",
    );
    assert_agrees(
        &hours,
        &expected_from_rows(&pool, 3_600_000).await,
        "rollup_1h",
    );
    assert!(
        hours.len() >= 3 * 2 * 3,
        "three hours of two metrics of three devices"
    );

    // The topic read again by a new group, over the tables: nothing changes.
    let again = format!("{id}-rollup-again");
    let rollup = start(rollup_config(&id, &again, &kafka, 600));
    assert!(eventually(WAIT, || async { caught_up(&again, &kafka.cleaned_topic) }).await);
    rollup.stop().await;
    assert_same(
        &tables(&store).await,
        &(minutes.clone(), hours.clone()),
        "read again",
    );

    // Rebuilt from nothing: the same tables, bit for bit (sums included).
    for table in ["rollup_1m", "rollup_1h", "rollup_devices", "rollup_seen"] {
        sqlx::query(&format!("DELETE FROM {table}"))
            .execute(&pool)
            .await
            .unwrap();
    }
    let rebuild = format!("{id}-rollup-rebuild");
    let rollup = start(rollup_config(&id, &rebuild, &kafka, 600));
    assert!(eventually(WAIT, || async { caught_up(&rebuild, &kafka.cleaned_topic) }).await);
    rollup.stop().await;
    assert_same(&tables(&store).await, &(minutes, hours), "rebuilt");
}

/// Fails with the first row that differs (the tables are too long to print whole).
fn assert_same(
    now: &(Vec<RollupRow>, Vec<RollupRow>),
    before: &(Vec<RollupRow>, Vec<RollupRow>),
    what: &str,
) {
    for (now, before, table) in [
        (&now.0, &before.0, "rollup_1m"),
        (&now.1, &before.1, "rollup_1h"),
    ] {
        assert_eq!(now.len(), before.len(), "{what}: rows of {table}");
        if let Some((now, before)) = now.iter().zip(before).find(|(now, before)| now != before) {
            panic!("{what}: {table} differs: {now:?} was {before:?}");
        }
    }
}

/// A cleaned record as the audit service produces it.
fn cleaned(device_id: &str, device_ts: i64, seq: i64, temperature: f64) -> TestRecord {
    TestRecord {
        key: Some(device_id.as_bytes().to_vec()),
        payload: json!({
            "device_id": device_id, "device_ts": device_ts, "received_at": device_ts + 50,
            "seq": seq, "metrics": {"temperature_c": temperature}, "schema_version": 1,
            "source": {"topic": "raw", "partition": 0, "offset": seq},
        })
        .to_string()
        .into_bytes(),
        headers: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_events_inside_the_window_are_folded_and_later_ones_are_left_out() {
    let id = unique("rollup-late");
    let kafka = kafka_config(&id);
    telemetry_kafka::ensure_topics(&kafka, &[&kafka.cleaned_topic])
        .await
        .unwrap();
    let hour = 3_600_000;
    let t0 = (chrono::Utc::now().timestamp_millis() / hour - 2) * hour;
    let device = "late-1";
    // One reading a minute for eleven minutes (the watermark ends at t0 + 10 min), then one 100 s
    // behind it (inside the 120 s window), one 270 s behind it (outside), a damaged record, and
    // one more on time.
    let mut records: Vec<TestRecord> = (0..=10)
        .map(|minute| cleaned(device, t0 + minute * 60_000, minute, minute as f64))
        .collect();
    records.push(cleaned(device, t0 + 500_000, 100, 50.0));
    records.push(cleaned(device, t0 + 330_000, 101, 99.0));
    records.push(TestRecord {
        key: Some(device.as_bytes().to_vec()),
        payload: b"\x00not json".to_vec(),
        headers: Vec::new(),
    });
    records.push(cleaned(device, t0 + 660_000, 11, 11.0));
    produce(&kafka.cleaned_topic, &records).await;

    let config = rollup_config(&id, &format!("{id}-rollup"), &kafka, 120);
    let address: std::net::SocketAddr = config.listen.parse().unwrap();
    let rollup = start(config);
    let store = Store::connect(&database_url(&id), 2).await.unwrap();
    let minute = |start: i64| {
        let store = store.clone();
        async move {
            // Until the service has migrated the database, the table is not there.
            store
                .rollup_rows(Resolution::Minute, &[device])
                .await
                .unwrap_or_default()
                .into_iter()
                .find(|row| row.bucket_start == start)
        }
    };
    assert!(
        eventually(WAIT, || async { minute(t0 + 660_000).await.is_some() }).await,
        "the stream goes on past the late and damaged records"
    );

    // 100 s late: in its minute (t0 + 8 min), beside that minute's own reading.
    let eighth = minute(t0 + 480_000).await.unwrap().aggregate;
    assert_eq!((eighth.samples, eighth.min, eighth.max), (2, 8.0, 50.0));
    assert_eq!((eighth.last_ts, eighth.last), (t0 + 500_000, 50.0));
    // 270 s late: left out; its minute has only its own reading.
    let fifth = minute(t0 + 300_000).await.unwrap().aggregate;
    assert_eq!((fifth.samples, fifth.max), (1, 5.0));
    let hours = store
        .rollup_rows(Resolution::Hour, &[device])
        .await
        .unwrap();
    assert_eq!(hours.len(), 1);
    assert_eq!(
        hours[0].aggregate.samples, 13,
        "12 on time and the one inside the window"
    );
    assert_eq!(hours[0].aggregate.max, 50.0);

    let (status, text) = http_get(address, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    // Tests in this binary share one metrics registry: at least this test's counts.
    let counted = |name: &str| metric(&text, name, &[("service", "rollup")]).unwrap_or(0.0);
    assert!(counted("rollup_events_too_late_total") >= 1.0);
    assert!(counted("rollup_records_invalid_total") >= 1.0);
    rollup.stop().await;
}
