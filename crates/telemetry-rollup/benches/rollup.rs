//! Rollup throughput over 1,000,000 cleaned events: the `telemetry rollup` service, in-process,
//! reading the topic in a new consumer group and folding every event into the minute and hour
//! tables of a new database, end to end against the real Kafka and MariaDB.
//!
//! Run: `scripts/services.sh start && cargo bench -p telemetry-rollup --bench rollup`. The first
//! run produces the events to the topic `bench.rollup.cleaned` (kept for later runs); each run
//! folds them into a new database `bench_rollup_<time>` and prints events/s. Not a criterion
//! benchmark: one run takes a minute or more, so it is timed once and printed.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use telemetry_kafka::KafkaConfig;
use telemetry_rollup::RollupConfig;
use telemetry_testkit::TestRecord;
use tokio_util::sync::CancellationToken;

const EVENTS: i64 = 1_000_000;
const DEVICES: i64 = 1_000;
const TOPIC: &str = "bench.rollup.cleaned";

fn brokers() -> String {
    std::env::var("TELEMETRY_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn client() -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", "bench-rollup-probe")
        .create()
        .unwrap()
}

fn events_in_topic() -> i64 {
    let consumer = client();
    (0..3)
        .map(|partition| {
            consumer
                .fetch_watermarks(TOPIC, partition, Duration::from_secs(10))
                .map_or(0, |(low, high)| high - low)
        })
        .sum()
}

/// How many events `group` has committed past.
fn committed(group: &str) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .create()
        .unwrap();
    let mut partitions = TopicPartitionList::new();
    for partition in 0..3 {
        partitions.add_partition(TOPIC, partition);
    }
    consumer
        .committed_offsets(partitions, Duration::from_secs(10))
        .map(|list| {
            list.elements()
                .iter()
                .map(|element| match element.offset() {
                    Offset::Offset(offset) => offset,
                    _ => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// 1,000 devices reporting once a second for 1,000 s, five metrics each, as the audit service
/// writes cleaned records (keyed by device).
async fn fill(kafka: &KafkaConfig) {
    telemetry_kafka::ensure_topics(kafka, &[TOPIC])
        .await
        .unwrap();
    if events_in_topic() >= EVENTS {
        return;
    }
    eprintln!("producing {EVENTS} cleaned events to {TOPIC}...");
    let start = (chrono::Utc::now().timestamp() - 2 * 86_400) * 1_000;
    let records = (0..EVENTS).map(|index| {
        let device = format!("pico-{:04}", index % DEVICES);
        let second = index / DEVICES;
        let ts = start + second * 1_000 + index % DEVICES;
        #[allow(clippy::cast_precision_loss)]
        let payload = format!(
            r#"{{"device_id":"{device}","device_ts":{ts},"received_at":{},"seq":{second},"metrics":{{"battery_v":3.71,"humidity_pct":{:.1},"pressure_hpa":1013.2,"rssi_dbm":-67,"temperature_c":{:.2}}},"schema_version":1,"source":{{"topic":"telemetry.raw","partition":0,"offset":{index}}}}}"#,
            ts + 120,
            40.0 + (index % 300) as f64 / 10.0,
            20.0 + (index % 70) as f64 / 10.0,
        );
        TestRecord {
            key: Some(device.into_bytes()),
            payload: payload.into_bytes(),
            headers: Vec::new(),
        }
    });
    telemetry_testkit::produce_to(
        &brokers(),
        TOPIC,
        records,
        &[
            ("linger.ms", "20"),
            ("batch.size", "1000000"),
            ("compression.type", "lz4"),
        ],
    )
    .await;
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let kafka = KafkaConfig {
            brokers: brokers(),
            raw_topic: "bench.rollup.raw".into(),
            cleaned_topic: TOPIC.into(),
            dlq_topic: "bench.rollup.dlq".into(),
            topic_partitions: 3,
            topic_replication_factor: 1,
            ..KafkaConfig::default()
        };
        fill(&kafka).await;
        let total = events_in_topic();
        let stamp = chrono::Utc::now().format("%Y%m%d%H%M%S");
        let group = format!("bench-rollup-{stamp}");
        let database = format!("bench_rollup_{stamp}");
        let config = RollupConfig {
            database: telemetry_store::DatabaseConfig {
                mysql_url: std::env::var("TELEMETRY_BENCH_MYSQL_URL")
                .unwrap_or_else(|_| "mysql://telemetry_test:telemetry-test@127.0.0.1:3306/".into())
                + &database,
                mysql_owner_url: None,
                mysql_max_connections: Some(2),
            },
            group_id: group.clone(),
            batch_size: std::env::var("BENCH_BATCH_SIZE")
                .ok()
                .and_then(|size| size.parse().ok())
                .unwrap_or(10_000),
            batch_linger_ms: 500,
            late_window_seconds: 600,
            listen: "127.0.0.1:0".into(),
            http: Default::default(),
            kafka,
        };
        let batch_size = config.batch_size;
        let shutdown = CancellationToken::new();
        let started = Instant::now();
        let service = tokio::spawn(telemetry_rollup::run(config, shutdown.clone()));
        let mut last_report = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let done = committed(&group);
            if done >= total {
                break;
            }
            if last_report.elapsed() >= Duration::from_secs(10) {
                last_report = Instant::now();
                eprintln!("{done} of {total} events folded");
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        shutdown.cancel();
        service.await.unwrap().unwrap();
        #[allow(clippy::cast_precision_loss)]
        let rate = total as f64 / seconds;
        println!(
            "rollup_1m_events: {total} events ({DEVICES} devices, 5 metrics, batches of {batch_size}) in {seconds:.1} s = {rate:.0} events/s into database {database}"
        );
    });
}
