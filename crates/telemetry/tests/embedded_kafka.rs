//! The embedded Kafka-protocol broker of `telemetry up` (nisshi, SQLite storage), checked before
//! it is trusted as a default: through librdkafka, as our services use it, with headers on every
//! record, a consumer group resumes at any offset, a rebalance between two consumers and a broker
//! restart (clean, and killed outright while producing) lose and duplicate nothing.
//!
//! Each test runs its own broker (`telemetry embedded-kafka`, the child process `up` runs) on a free
//! port, with storage in a temporary directory.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use telemetry_embedded::kafka::{BrokerSettings, EmbeddedKafka};

async fn start(dir: &Path, port: u16) -> EmbeddedKafka {
    EmbeddedKafka::start(
        Path::new(env!("CARGO_BIN_EXE_telemetry")),
        BrokerSettings {
            data_dir: dir.to_path_buf(),
            port,
        },
    )
    .await
    .unwrap()
}

async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .unwrap();
    for result in results {
        result.unwrap();
    }
}

fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "60000")
        .create()
        .unwrap()
}

/// Produces records `from..to` (key and payload `n`, headers `n` and `kind`), spread over the
/// partitions by key, in batches of many records each; waits for every acknowledgement.
async fn produce(producer: &FutureProducer, topic: &str, range: std::ops::Range<u32>) {
    let keys: Vec<String> = range.map(|n| n.to_string()).collect();
    let sends: Vec<_> = keys
        .iter()
        .map(|key| {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "n",
                    value: Some(key.as_bytes()),
                })
                .insert(Header {
                    key: "kind",
                    value: Some("telemetry".as_bytes()),
                });
            producer.send(
                FutureRecord::to(topic)
                    .key(key.as_str())
                    .payload(key.as_str())
                    .headers(headers),
                Duration::from_secs(60),
            )
        })
        .collect();
    for sent in futures::future::join_all(sends).await {
        sent.map_err(|(error, _)| error).unwrap();
    }
}

fn consumer(brokers: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("partition.assignment.strategy", "range")
        .create()
        .unwrap()
}

/// The record's number, checked against its headers: both must be there and agree.
fn number(message: &rdkafka::message::BorrowedMessage<'_>) -> u32 {
    let payload = std::str::from_utf8(message.payload().unwrap()).unwrap();
    let headers = message.headers().expect("every record keeps its headers");
    let mut found = BTreeMap::new();
    for header in headers.iter() {
        found.insert(header.key.to_string(), header.value.map(<[u8]>::to_vec));
    }
    assert_eq!(
        found.get("n").cloned().flatten().as_deref(),
        Some(payload.as_bytes()),
        "header `n` of record {payload}"
    );
    assert_eq!(
        found.get("kind").cloned().flatten().as_deref(),
        Some("telemetry".as_bytes())
    );
    payload.parse().unwrap()
}

/// Polls until `want` records were read or `timeout` passed; commits after each record when
/// `commit` (synchronously, so a record counts only once its offset is committed).
fn read(consumer: &BaseConsumer, want: usize, timeout: Duration, commit: bool) -> Vec<u32> {
    let deadline = Instant::now() + timeout;
    let mut read = Vec::new();
    while read.len() < want && Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.unwrap();
        let n = number(&message);
        // Not committed: it will be read again, by this consumer or another.
        if commit && consumer.commit_message(&message, CommitMode::Sync).is_err() {
            continue;
        }
        read.push(n);
    }
    read
}

/// Reads (without committing) everything there is: waits up to 30 s for the first record (a new
/// member joins its group first), then until nothing came for 3 s, so a duplicate past the
/// expected records shows too.
fn read_all(consumer: &BaseConsumer) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut all = read(consumer, 1, Duration::from_secs(30), false);
    loop {
        let more = read(consumer, usize::MAX, Duration::from_secs(3), false);
        if more.is_empty() || Instant::now() > deadline {
            return all;
        }
        all.extend(more);
    }
}

/// Asserts that `read` holds each number of `expected` exactly once (and nothing else), in order
/// when `ordered`; the message lists what is missing, doubled or unexpected (the first 10 each).
fn assert_exactly(read: &[u32], expected: std::ops::Range<u32>, ordered: bool, what: &str) {
    let mut seen = BTreeMap::new();
    for n in read {
        *seen.entry(*n).or_insert(0_u32) += 1;
    }
    let missing: Vec<u32> = expected
        .clone()
        .filter(|n| !seen.contains_key(n))
        .take(10)
        .collect();
    let doubled: Vec<u32> = seen
        .iter()
        .filter(|(_, count)| **count > 1)
        .map(|(n, _)| *n)
        .take(10)
        .collect();
    let unexpected: Vec<u32> = seen
        .keys()
        .filter(|n| !expected.contains(n))
        .copied()
        .take(10)
        .collect();
    assert!(
        missing.is_empty() && doubled.is_empty() && unexpected.is_empty(),
        "{what}: {} read for {} expected; missing {missing:?}, doubled {doubled:?}, unexpected {unexpected:?}",
        read.len(),
        expected.len()
    );
    if ordered {
        assert!(
            read.windows(2).all(|pair| pair[0] < pair[1]),
            "{what}: out of order"
        );
    }
}

fn commit_at(consumer: &BaseConsumer, topic: &str, offset: i64) {
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, 0, Offset::Offset(offset))
        .unwrap();
    consumer.commit(&list, CommitMode::Sync).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_resumes_at_any_offset_even_inside_a_record_batch() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = start(dir.path(), telemetry_testkit::free_port()).await;
    let brokers = kafka.bootstrap();
    let topic = "resume";
    create_topic(&brokers, topic, 1).await;
    // Many records per produce request: the resume points below fall inside record batches.
    produce(&producer(&brokers), topic, 0..500).await;

    for stop_at in [1_i64, 137, 250, 499] {
        let group = format!("resume-{stop_at}");
        let brokers = brokers.clone();
        let rest = tokio::task::spawn_blocking(move || {
            let first = consumer(&brokers, &group);
            first.subscribe(&[topic]).unwrap();
            let head = read(
                &first,
                usize::try_from(stop_at).unwrap(),
                Duration::from_secs(60),
                false,
            );
            assert_exactly(&head, 0..u32::try_from(stop_at).unwrap(), true, "the head");
            commit_at(&first, topic, stop_at);
            drop(first);
            let second = consumer(&brokers, &group);
            second.subscribe(&[topic]).unwrap();
            read_all(&second)
        })
        .await
        .unwrap();
        assert_exactly(
            &rest,
            u32::try_from(stop_at).unwrap()..500,
            true,
            &format!("resumed at {stop_at}: exactly the records after it, in order"),
        );
    }
    assert!(kafka.stop().await, "stops cleanly on SIGTERM");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebalance_between_two_consumers_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = start(dir.path(), telemetry_testkit::free_port()).await;
    let brokers = kafka.bootstrap();
    let topic = "rebalance";
    create_topic(&brokers, topic, 4).await;
    produce(&producer(&brokers), topic, 0..2_000).await;

    let total = 2_000;
    let (first_brokers, second_brokers) = (brokers.clone(), brokers.clone());
    let (head_read, wait_for_head) = std::sync::mpsc::channel::<()>();
    // The first consumer reads 400 records alone, then slowly: the second joins, the group
    // rebalances while the first still reads, and both go on until every record has been read
    // and committed.
    let first = tokio::task::spawn_blocking(move || {
        let consumer = consumer(&first_brokers, "rebalance");
        consumer.subscribe(&[topic]).unwrap();
        let mut read_ = read(&consumer, 400, Duration::from_secs(60), true);
        assert_eq!(read_.len(), 400);
        assert_eq!(
            consumer.assignment().unwrap().count(),
            4,
            "alone: every partition"
        );
        head_read.send(()).unwrap();
        let (mut lost_partitions, mut idle) = (false, 0);
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline && idle < 5 {
            let more = read(&consumer, 10, Duration::from_secs(1), true);
            idle = if more.is_empty() { idle + 1 } else { 0 };
            read_.extend(more);
            lost_partitions |= consumer.assignment().unwrap().count() < 4;
            std::thread::sleep(Duration::from_millis(100));
        }
        (read_, lost_partitions)
    });
    tokio::task::spawn_blocking(move || wait_for_head.recv())
        .await
        .unwrap()
        .unwrap();
    let second = tokio::task::spawn_blocking(move || {
        let consumer = consumer(&second_brokers, "rebalance");
        consumer.subscribe(&[topic]).unwrap();
        let mut read_ = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut idle = 0;
        while Instant::now() < deadline && idle < 5 {
            let more = read(&consumer, 100, Duration::from_secs(2), true);
            idle = if more.is_empty() { idle + 1 } else { 0 };
            read_.extend(more);
        }
        read_
    });
    let (first, first_lost_partitions) = first.await.unwrap();
    let second = second.await.unwrap();
    assert!(
        first_lost_partitions,
        "the group rebalanced while the first consumer was reading"
    );
    assert!(
        !second.is_empty(),
        "the second consumer read after the rebalance"
    );
    let all: Vec<u32> = first.iter().chain(&second).copied().collect();
    assert_exactly(
        &all,
        0..total,
        false,
        "read and committed, by either consumer",
    );
    assert!(kafka.stop().await);
}

/// Chunks of 50 records the producer streams while the broker is killed.
const CHUNKS: u32 = 100;

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_restart_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = telemetry_testkit::free_port();
    let kafka = start(dir.path(), port).await;
    let brokers = kafka.bootstrap();
    let topic = "restart";
    create_topic(&brokers, topic, 1).await;
    produce(&producer(&brokers), topic, 0..300).await;
    let group_brokers = brokers.clone();
    tokio::task::spawn_blocking(move || {
        let consumer = consumer(&group_brokers, "restart");
        consumer.subscribe(&[topic]).unwrap();
        assert_eq!(
            read(&consumer, 100, Duration::from_secs(60), false).len(),
            100
        );
        commit_at(&consumer, topic, 100);
    })
    .await
    .unwrap();

    // A clean stop, then a crash: killed outright while an idempotent producer is mid-stream.
    assert!(kafka.stop().await);
    let kafka = start(dir.path(), port).await;
    let streaming = producer(&brokers);
    let chunks_done = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let stream = tokio::spawn({
        let (streaming, chunks_done) = (streaming.clone(), chunks_done.clone());
        async move {
            for chunk in 0..CHUNKS {
                produce(&streaming, topic, 300 + chunk * 50..300 + (chunk + 1) * 50).await;
                chunks_done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    let streaming_now = telemetry_testkit::eventually(Duration::from_secs(60), || async {
        chunks_done.load(std::sync::atomic::Ordering::Relaxed) >= 3
    })
    .await;
    assert!(streaming_now, "the producer got going");
    assert!(
        !stream.is_finished(),
        "the broker is killed while the producer streams"
    );
    kafka.kill().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let kafka = start(dir.path(), port).await;
    // The producer retries what was not acknowledged; every send must end acknowledged.
    tokio::time::timeout(Duration::from_secs(120), stream)
        .await
        .expect("the producer finishes after the restart")
        .unwrap();

    let group_brokers = brokers.clone();
    let rest = tokio::task::spawn_blocking(move || {
        let consumer = consumer(&group_brokers, "restart");
        consumer.subscribe(&[topic]).unwrap();
        read_all(&consumer)
    })
    .await
    .unwrap();
    assert_exactly(
        &rest,
        100..300 + CHUNKS * 50,
        true,
        "the group resumed at its committed offset, and every acknowledged record is there once",
    );
    assert!(kafka.stop().await);
}
