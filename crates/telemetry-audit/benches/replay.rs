//! Replay throughput over 1,000,000 raw records: validation, normalization and idempotent inserts
//! into a fresh table, end to end against the real Kafka and MariaDB.
//!
//! Run: `scripts/services.sh start && cargo bench -p telemetry-audit --bench replay`. The first run
//! produces the records to the topic `bench.replay.raw` (kept for later runs; about a minute);
//! each run replays them into a new table of the database `bench_replay`. Not a criterion
//! benchmark: one run takes tens of seconds, so it is timed once and printed.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use telemetry_audit::replay::{Position, ProgressMode, ReplayConfig};
use telemetry_kafka::KafkaConfig;
use telemetry_testkit::TestRecord;
use tokio_util::sync::CancellationToken;

const RECORDS: i64 = 1_000_000;
const TOPIC: &str = "bench.replay.raw";

fn brokers() -> String {
    std::env::var("TELEMETRY_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn records_in_topic() -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    (0..3)
        .map(|partition| {
            consumer
                .fetch_watermarks(TOPIC, partition, Duration::from_secs(10))
                .map_or(0, |(low, high)| high - low)
        })
        .sum()
}

/// 1,000 devices, the same fleet mix as the validation benchmark: 80% valid, 20% invalid.
async fn fill(kafka: &KafkaConfig) {
    telemetry_kafka::ensure_topics(kafka, &[TOPIC])
        .await
        .unwrap();
    if records_in_topic() >= RECORDS {
        return;
    }
    eprintln!("producing {RECORDS} raw records to {TOPIC}...");
    let start = chrono::Utc::now().timestamp_millis() - RECORDS;
    let records = (0..RECORDS).map(|index| {
        let device = format!("pico-{:04}", index % 1_000);
        let ts = start + index;
        let payload = match index % 10 {
            8 => String::from("temperature=21.5;oops"),
            9 => format!(r#"{{"device_id":"{device}","device_ts":{ts},"humidity_pct":140.0}}"#),
            _ => format!(
                r#"{{"device_id":"{device}","device_ts":{ts},"seq":{},"temperature_c":{:.2},"humidity_pct":45.5,"battery_v":3.71,"rssi_dbm":-67,"firmware":"rp2040-1.4.2"}}"#,
                index / 1_000,
                20.0 + (index % 70) as f64 / 10.0
            ),
        };
        TestRecord {
            key: Some(device.into_bytes()),
            payload: payload.into_bytes(),
            headers: vec![("received_at".into(), (ts + 120).to_string().into_bytes())],
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
            raw_topic: TOPIC.into(),
            cleaned_topic: "bench.replay.cleaned".into(),
            dlq_topic: "bench.replay.dlq".into(),
            topic_partitions: 3,
            topic_replication_factor: 1,
            ..KafkaConfig::default()
        };
        fill(&kafka).await;
        let table = format!("replay_{}", chrono::Utc::now().format("%Y%m%d%H%M%S"));
        let config = ReplayConfig {
            mysql_url: std::env::var("TELEMETRY_BENCH_MYSQL_URL").unwrap_or_else(|_| {
                "mysql://telemetry_test:telemetry-test@127.0.0.1:3306/bench_replay".into()
            }),
            from: Position::Earliest,
            to: Position::Latest,
            devices: Vec::new(),
            into: Some(table),
            contract: None,
            batch_size: 5_000,
            group_id: "bench-replay".into(),
            progress: ProgressMode::Lines,
            kafka,
        };
        let started = Instant::now();
        let summary = telemetry_audit::replay::run(config, CancellationToken::new())
            .await
            .unwrap();
        let seconds = started.elapsed().as_secs_f64();
        print!("{summary}");
        #[allow(clippy::cast_precision_loss)]
        let rate = summary.read as f64 / seconds;
        println!(
            "replay_1m_records: {} records in {seconds:.1} s = {rate:.0} records/s ({} rows written)",
            summary.read, summary.inserted
        );
    });
}
