//! The ACLs of the development Kafka's SASL_SSL listener (`scripts/services.sh`, the production
//! recipe in docs/operations.md "Kafka ACLs"): each role user reaches its own topics and groups and
//! is refused the rest.
//!
//! The checks run against the pipeline's real topics, which a developer's pipeline may be using,
//! so they leave nothing there: a permitted write is a record larger than the broker takes (the
//! broker authorizes the write, then refuses the record as too large, so nothing is appended), a
//! permitted read starts at the end of a partition (the broker answers "end of partition"), and the
//! audit's group is only looked up, never joined (the consumer's attempt to join it is refused
//! while the ACLs hold). The groups joined are the test's own. `TELEMETRY_TEST_KAFKA_SECURE_BROKERS` and `TELEMETRY_STATE_DIR` (for the CA) name
//! another broker started by `scripts/services.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use telemetry_core::names::topics::{CLEANED, DLQ, RAW};
use telemetry_testkit::{kafka_secure_brokers, tls_dir, unique, KAFKA_SASL_CREDENTIALS};

/// The role users of `scripts/services.sh` and their development passwords.
const BRIDGE: (&str, &str) = ("telemetry-bridge", "telemetry-bridge-secret");
const AUDIT: (&str, &str) = ("telemetry-audit", "telemetry-audit-secret");
const CONSUMER: (&str, &str) = ("telemetry-consumer", "telemetry-consumer-secret");

/// The audit service's default consumer group.
const AUDIT_GROUP: &str = "telemetry-audit";

/// Larger than any topic of the broker takes (Kafka's default `message.max.bytes`, 1 MiB).
const OVERSIZED_RECORD_BYTES: usize = 2 * 1024 * 1024;

/// How long a check waits for the broker's answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(20);

/// A client of `user` on the SASL_SSL listener, with SCRAM-SHA-512 and the development CA.
fn client((user, password): (&str, &str)) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", kafka_secure_brokers())
        .set("security.protocol", "sasl_ssl")
        .set("sasl.mechanism", "SCRAM-SHA-512")
        .set("sasl.username", user)
        .set("sasl.password", password)
        .set(
            "ssl.ca.location",
            tls_dir().join("ca.pem").display().to_string(),
        );
    config
}

/// Our services' Kafka settings for `user` on the SASL_SSL listener.
fn service_kafka((user, password): (&str, &str)) -> telemetry_kafka::KafkaConfig {
    telemetry_kafka::KafkaConfig {
        brokers: kafka_secure_brokers(),
        security_protocol: "sasl_ssl".into(),
        sasl_mechanism: Some("SCRAM-SHA-512".into()),
        sasl_username: Some(user.into()),
        sasl_password: Some(password.into()),
        ssl_ca_file: Some(tls_dir().join("ca.pem")),
        ..telemetry_kafka::KafkaConfig::default()
    }
}

/// What the broker answers when `user` produces to `topic` with our services' producer settings
/// (idempotent, acks=all) a record too large for it: `MessageSizeTooLarge` when the write is
/// permitted (nothing is appended), an authorization error when it is not.
async fn write(user: (&str, &str), topic: &str) -> RDKafkaErrorCode {
    let producer: FutureProducer = client(user)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("compression.type", "none")
        .set(
            "message.max.bytes",
            (2 * OVERSIZED_RECORD_BYTES).to_string(),
        )
        .set("message.timeout.ms", ANSWER_WITHIN.as_millis().to_string())
        .create()
        .unwrap();
    let payload = vec![b'x'; OVERSIZED_RECORD_BYTES];
    let record = FutureRecord::<(), _>::to(topic).payload(&payload);
    match producer.send(record, Duration::from_secs(0)).await {
        Ok(delivery) => panic!("{} appended a record to {topic}: {delivery:?}", user.0),
        // An idempotent producer that may not start (ClusterAuthorizationFailed) purges its
        // records; its fatal error is the broker's answer.
        Err((error, _)) => producer
            .client()
            .fatal_error()
            .map_or_else(|| code(&error), |(fatal, _)| fatal),
    }
}

/// What the broker answers when `user`, carrying `group` without joining it, reads partition 0 of
/// `topic` from its end: `PartitionEOF` when the read is permitted, an authorization error when
/// it is not (from the metadata already when `user` may not even see the topic: librdkafka does
/// not report that for an assigned partition).
async fn read(user: (&'static str, &'static str), group: &str, topic: &str) -> RDKafkaErrorCode {
    let group = group.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client(user)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create()
            .unwrap();
        if let Some(error) = topic_error(&consumer, &topic) {
            return error;
        }
        let mut partitions = TopicPartitionList::new();
        partitions
            .add_partition_offset(&topic, 0, Offset::End)
            .unwrap();
        consumer.assign(&partitions).unwrap();
        first_answer(&consumer, user.0, &topic)
    })
    .await
    .unwrap()
}

/// What the broker answers when `user` joins `group` on `topic` (the group then reads from the
/// end): `PartitionEOF` when both are permitted, an authorization error when not.
async fn join(user: (&'static str, &'static str), group: &str, topic: &str) -> RDKafkaErrorCode {
    let group = group.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client(user)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "latest")
            .set("enable.partition.eof", "true")
            .create()
            .unwrap();
        consumer.subscribe(&[&topic]).unwrap();
        first_answer(&consumer, user.0, &topic)
    })
    .await
    .unwrap()
}

/// The error the broker's metadata gives for `topic`, if any.
fn topic_error(consumer: &BaseConsumer, topic: &str) -> Option<RDKafkaErrorCode> {
    match consumer.fetch_metadata(Some(topic), ANSWER_WITHIN) {
        Ok(metadata) => metadata
            .topics()
            .iter()
            .find_map(|topic| topic.error())
            .map(RDKafkaErrorCode::from),
        Err(error) => Some(code(&error)),
    }
}

/// Polls `consumer` until the broker answered: the first error or end-of-partition event.
fn first_answer(consumer: &BaseConsumer, user: &str, topic: &str) -> RDKafkaErrorCode {
    let deadline = Instant::now() + ANSWER_WITHIN;
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Err(KafkaError::PartitionEOF(_))) => return RDKafkaErrorCode::PartitionEOF,
            Some(Err(error)) => return code(&error),
            Some(Ok(message)) => {
                panic!("{user} read a record of {topic} from its end: {message:?}")
            }
            None => {}
        }
    }
    panic!("no answer within {ANSWER_WITHIN:?} to {user} reading {topic}");
}

/// What the broker answers when `user` looks up `group`'s committed offset of `topic` (a
/// read-only request): `NoError` when permitted. (A refused group is not reported but waited for
/// until the timeout: librdkafka retries finding its coordinator; [`join`] tells refusals.)
async fn look_up(user: (&'static str, &'static str), group: &str, topic: &str) -> RDKafkaErrorCode {
    let group = group.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client(user)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut partitions = TopicPartitionList::new();
        partitions.add_partition(&topic, 0);
        match consumer.committed_offsets(partitions, ANSWER_WITHIN) {
            Ok(offsets) => offsets
                .elements()
                .iter()
                .find_map(|element| element.error().err())
                .map_or(RDKafkaErrorCode::NoError, |error| code(&error)),
            Err(error) => code(&error),
        }
    })
    .await
    .unwrap()
}

fn code(error: &KafkaError) -> RDKafkaErrorCode {
    error
        .rdkafka_error_code()
        .unwrap_or_else(|| panic!("not a broker's answer: {error}"))
}

/// An authorization refusal, whichever resource the broker names: the topic, the group, or the
/// cluster (an idempotent producer that may write no topic at all may not even start).
fn refused(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::GroupAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_may_write_raw_and_nothing_else() {
    let group = unique("telemetry-acl-bridge");
    // The bridge's start-up check of its topic: it exists, though the bridge may not create it.
    telemetry_kafka::ensure_topics(&service_kafka(BRIDGE), &[RAW])
        .await
        .unwrap();
    assert_eq!(
        write(BRIDGE, RAW).await,
        RDKafkaErrorCode::MessageSizeTooLarge,
        "the bridge writes {RAW}"
    );
    for topic in [CLEANED, DLQ] {
        assert_eq!(
            write(BRIDGE, topic).await,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            "the bridge must not write {topic}"
        );
    }
    let answer = read(BRIDGE, &group, RAW).await;
    assert!(
        refused(answer),
        "the bridge must not read {RAW}: {answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_may_read_raw_in_its_group_and_write_cleaned_and_dlq() {
    let id = unique("acl-audit");
    telemetry_kafka::ensure_topics(&service_kafka(AUDIT), &[RAW, CLEANED, DLQ])
        .await
        .unwrap();
    assert_eq!(
        read(AUDIT, AUDIT_GROUP, RAW).await,
        RDKafkaErrorCode::PartitionEOF,
        "the audit reads {RAW}"
    );
    assert_eq!(
        look_up(AUDIT, AUDIT_GROUP, RAW).await,
        RDKafkaErrorCode::NoError,
        "the audit uses its group"
    );
    for topic in [CLEANED, DLQ] {
        assert_eq!(
            write(AUDIT, topic).await,
            RDKafkaErrorCode::MessageSizeTooLarge,
            "the audit writes {topic}"
        );
    }

    let other_group = format!("telemetry-{id}");
    let answer = join(AUDIT, &other_group, RAW).await;
    assert_eq!(
        answer,
        RDKafkaErrorCode::GroupAuthorizationFailed,
        "the audit must not use another group"
    );
    for topic in [RAW, &format!("{id}.other")] {
        assert_eq!(
            write(AUDIT, topic).await,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            "the audit must not write {topic}"
        );
    }
    let answer = read(AUDIT, AUDIT_GROUP, CLEANED).await;
    assert!(
        refused(answer),
        "the audit must not read {CLEANED}: {answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_may_read_cleaned_in_its_groups_and_nothing_else() {
    let group = unique("telemetry-acl-consumer");
    assert_eq!(
        join(CONSUMER, &group, CLEANED).await,
        RDKafkaErrorCode::PartitionEOF,
        "a consumer reads {CLEANED} in group {group}"
    );

    let answer = read(CONSUMER, &group, RAW).await;
    assert!(
        refused(answer),
        "a consumer must not read {RAW}: {answer:?}"
    );
    for topic in [RAW, CLEANED, DLQ] {
        let answer = write(CONSUMER, topic).await;
        assert!(
            refused(answer),
            "a consumer must not write {topic}: {answer:?}"
        );
    }
    let answer = join(CONSUMER, AUDIT_GROUP, CLEANED).await;
    assert_eq!(
        answer,
        RDKafkaErrorCode::GroupAuthorizationFailed,
        "a consumer must not join the audit's group"
    );
    let answer = join(CONSUMER, &unique("acl-consumer"), CLEANED).await;
    assert_eq!(
        answer,
        RDKafkaErrorCode::GroupAuthorizationFailed,
        "a consumer's groups begin with telemetry-"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tests_user_cannot_reach_the_pipelines_topics() {
    let tests_user = KAFKA_SASL_CREDENTIALS;
    let answer = write(tests_user, RAW).await;
    assert!(
        refused(answer),
        "the tests' user must not write {RAW}: {answer:?}"
    );
    let answer = read(tests_user, &unique("acl-tests-user"), CLEANED).await;
    assert!(
        refused(answer),
        "the tests' user must not read {CLEANED}: {answer:?}"
    );
}
