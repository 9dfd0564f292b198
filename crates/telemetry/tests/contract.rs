//! The payload contract in the running audit service, against the real Kafka and MariaDB: every
//! rejection code ends in the DLQ with that code and the original bytes, and a changed contract
//! file changes the outcome after a restart. Each test has its own topics, group and database.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use rdkafka::message::Message;
use serde_json::json;
use telemetry_core::contract::UnknownFields;
use telemetry_core::names::headers;
use telemetry_core::{Code, Contract};
use telemetry_testkit::{database_url, eventually, produce, read_topic, unique, TestRecord};
use tokio_util::sync::CancellationToken;

mod common;
use common::{audit_config, base_ts, header, kafka_config, payload};

/// Writes `contract` as TOML to a file of its own and returns the path.
fn write_contract(id: &str, contract: &Contract) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{id}-{}.toml", contract.version));
    std::fs::write(&path, contract.to_toml()).unwrap();
    path
}

fn record(device: &str, payload: Vec<u8>) -> TestRecord {
    TestRecord {
        key: Some(device.as_bytes().to_vec()),
        payload,
        headers: Vec::new(),
    }
}

/// The headers the bridge puts on the raw record of a case: for `kafka_rejected`, that it kept
/// only the first bytes of a payload Kafka refused.
fn bridge_headers(code: &str) -> Vec<(String, Vec<u8>)> {
    if code != "kafka_rejected" {
        return Vec::new();
    }
    vec![
        (headers::PAYLOAD_ORIGINAL_BYTES.into(), b"2000000".to_vec()),
        (headers::PAYLOAD_CUT_REASON.into(), code.as_bytes().to_vec()),
        (
            headers::PAYLOAD_CUT_DETAIL.into(),
            b"Broker: Message size too large".to_vec(),
        ),
    ]
}

/// A payload with the code and `error.field` it must get.
type Case = (&'static str, Option<&'static str>, Vec<u8>);

/// One payload per contract code (the unit tests hold the full table), under a strict contract.
fn one_payload_per_code() -> Vec<Case> {
    let ts = base_ts();
    let ok = format!(r#""device_id":"d","device_ts":{ts},"seq":1,"battery_v":3.7"#);
    let future = chrono::Utc::now().timestamp_millis() + 3_600_000;
    let ancient = ts - 40 * 86_400_000;
    let cases: Vec<(&str, Option<&str>, String)> = vec![
        ("empty_payload", None, String::new()),
        ("payload_too_large", None, " ".repeat(70_000)),
        (
            "payload_too_deep",
            None,
            format!(r#"{{{ok},"a":{{"b":[1]}}}}"#),
        ),
        (
            "too_many_fields",
            None,
            format!(r#"{{{ok},"a":[1,2,3,4,5,6,7]}}"#),
        ),
        ("invalid_json", None, "temperature=21.5".into()),
        ("not_an_object", None, "[21.5, 40]".into()),
        (
            "duplicate_field",
            Some("vbat"),
            format!(r#"{{{ok},"vbat":3.6}}"#),
        ),
        (
            "missing_device_id",
            Some("device_id"),
            format!(r#"{{"device_ts":{ts},"seq":1}}"#),
        ),
        (
            "invalid_device_id",
            Some("id"),
            format!(r#"{{"id":"a b","device_ts":{ts},"seq":1}}"#),
        ),
        (
            "missing_device_ts",
            Some("device_ts"),
            r#"{"device_id":"d","seq":1}"#.into(),
        ),
        (
            "invalid_device_ts",
            Some("ts"),
            r#"{"device_id":"d","ts":"last tuesday"}"#.into(),
        ),
        (
            "device_ts_in_future",
            Some("device_ts"),
            format!(r#"{{"device_id":"d","device_ts":{future}}}"#),
        ),
        (
            "device_ts_too_old",
            Some("device_ts"),
            format!(r#"{{"device_id":"d","device_ts":{ancient}}}"#),
        ),
        (
            "missing_seq",
            Some("seq"),
            format!(r#"{{"device_id":"d","device_ts":{ts},"battery_v":3.7}}"#),
        ),
        (
            "invalid_seq",
            Some("seq"),
            format!(r#"{{"device_id":"d","device_ts":{ts},"seq":-1}}"#),
        ),
        (
            "missing_metric",
            Some("battery_v"),
            format!(r#"{{"device_id":"d","device_ts":{ts},"seq":1}}"#),
        ),
        (
            "invalid_metric",
            Some("temp"),
            format!(r#"{{{ok},"temp":"warm"}}"#),
        ),
        (
            "metric_not_finite",
            Some("humidity"),
            format!(r#"{{{ok},"humidity":"NaN"}}"#),
        ),
        (
            "metric_out_of_range",
            Some("humidity"),
            format!(r#"{{{ok},"humidity":101}}"#),
        ),
        (
            "unknown_field",
            Some("colour"),
            format!(r#"{{{ok},"colour":"red"}}"#),
        ),
        // Published on `devices/d/telemetry` (the record's key) in the name of another device.
        (
            "device_id_mismatch",
            Some("device_id"),
            format!(r#"{{"device_id":"e","device_ts":{ts},"seq":1,"battery_v":3.7}}"#),
        ),
        // The first bytes of a payload Kafka refused whole; the bridge's headers say why.
        (
            "kafka_rejected",
            None,
            format!(r#"{{"device_id":"d","device_ts":{ts},"#),
        ),
    ];
    cases
        .into_iter()
        .map(|(code, field, payload)| (code, field, payload.into_bytes()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_code_ends_in_the_dlq_with_that_code_and_the_original_bytes() {
    let id = unique("codes");
    let kafka = kafka_config(&id);
    telemetry_kafka::ensure_topics(&kafka, &[&kafka.raw_topic])
        .await
        .unwrap();
    let mut contract = Contract::default();
    contract.seq.required = true;
    contract.unknown_fields = UnknownFields::Reject;
    contract.limits.max_depth = 2;
    contract.limits.max_fields = 10;
    contract.metrics.get_mut("battery_v").unwrap().required = true;
    let path = write_contract(&id, &contract);

    let cases = one_payload_per_code();
    let covered: std::collections::BTreeSet<&str> =
        cases.iter().map(|(code, _, _)| *code).collect();
    let all: std::collections::BTreeSet<&str> =
        Code::ALL.iter().map(|code| code.as_str()).collect();
    assert_eq!(covered, all, "one case per contract code");
    let valid = format!(
        r#"{{"device_id":"d","device_ts":{},"seq":1,"battery_v":3.7,"humidity":"45.5"}}"#,
        base_ts()
    );
    let mut records: Vec<TestRecord> = cases
        .iter()
        .map(|(code, _, bytes)| TestRecord {
            headers: bridge_headers(code),
            ..record("d", bytes.clone())
        })
        .collect();
    records.push(record("d", valid.into_bytes()));
    produce(&kafka.raw_topic, &records).await;

    let shutdown = CancellationToken::new();
    let mut config = audit_config(&id, &format!("{id}-audit"), &kafka);
    config.contract = Some(path);
    let audit = tokio::spawn(telemetry_audit::run(config, shutdown.clone()));
    let dead = read_topic(
        &kafka.dlq_topic,
        cases.len(),
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .await;
    let pool = sqlx::MySqlPool::connect(&database_url(&id)).await.unwrap();
    let stored = eventually(Duration::from_secs(30), || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM telemetry")
            .fetch_one(&pool)
            .await
            .is_ok_and(|rows| rows == 1)
    })
    .await;
    shutdown.cancel();
    audit.await.unwrap().unwrap();

    assert!(stored, "the one valid record is in the table");
    let coerced: Option<String> = sqlx::query_scalar(
        "SELECT CAST(JSON_EXTRACT(quality, '$.coerced_fields') AS CHAR) FROM telemetry",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        coerced.as_deref(),
        Some(r#"["humidity"]"#),
        "the coercion is on the row"
    );
    assert_eq!(
        dead.len(),
        cases.len(),
        "one DLQ record per rejected record"
    );
    let by_payload: HashMap<Vec<u8>, &Case> =
        cases.iter().map(|case| (case.2.clone(), case)).collect();
    for message in &dead {
        let (code, field, _) = by_payload
            .get(&payload(message))
            .expect("the DLQ record carries the original bytes");
        assert_eq!(header(message, headers::ERROR_CODE), Some(*code));
        assert_eq!(
            header(message, headers::ERROR_FIELD),
            *field,
            "field of {code}"
        );
        assert!(header(message, headers::ERROR_RULE).is_some_and(|rule| !rule.is_empty()));
        assert!(header(message, headers::ERROR_MESSAGE).is_some_and(|text| text.len() < 400));
        assert_eq!(header(message, headers::CONTRACT_VERSION), Some("1"));
        assert_eq!(message.key(), Some(&b"d"[..]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widening_a_range_in_the_contract_file_changes_the_outcome_after_a_restart() {
    let id = unique("widen");
    let kafka = kafka_config(&id);
    telemetry_kafka::ensure_topics(&kafka, &[&kafka.raw_topic])
        .await
        .unwrap();
    let hot = |seq: i64| {
        record(
            "oven-1",
            json!({"device_id": "oven-1", "device_ts": base_ts() + seq * 1_000, "seq": seq, "temp": 150})
                .to_string()
                .into_bytes(),
        )
    };
    let pool_url = database_url(&id);

    // Version 1: the shipped contract, where temperature_c is at most 125.
    let first = Contract::default();
    assert_eq!(first.metrics["temperature_c"].max, Some(125.0));
    let mut config = audit_config(&id, &format!("{id}-audit"), &kafka);
    config.contract = Some(write_contract(&id, &first));
    produce(&kafka.raw_topic, &[hot(1)]).await;
    let shutdown = CancellationToken::new();
    let audit = tokio::spawn(telemetry_audit::run(config.clone(), shutdown.clone()));
    let dead = read_topic(&kafka.dlq_topic, 1, Duration::from_secs(60), Duration::ZERO).await;
    shutdown.cancel();
    audit.await.unwrap().unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header(&dead[0], headers::ERROR_CODE),
        Some("metric_out_of_range")
    );
    assert_eq!(
        header(&dead[0], headers::ERROR_RULE),
        Some("metrics.temperature_c.max = 125")
    );

    // Version 2: the operator widens the range in the file and restarts the service.
    let mut second = first.clone();
    second.version = 2;
    second.metrics.get_mut("temperature_c").unwrap().max = Some(300.0);
    config.contract = Some(write_contract(&id, &second));
    produce(&kafka.raw_topic, &[hot(2)]).await;
    let shutdown = CancellationToken::new();
    let audit = tokio::spawn(telemetry_audit::run(config.clone(), shutdown.clone()));
    let pool = sqlx::MySqlPool::connect(&pool_url).await.unwrap();
    let stored = eventually(Duration::from_secs(60), || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM telemetry")
            .fetch_one(&pool)
            .await
            .is_ok_and(|rows| rows >= 1)
    })
    .await;
    shutdown.cancel();
    audit.await.unwrap().unwrap();
    assert!(stored, "the same reading is accepted under version 2");
    let rows: Vec<(i64, i64, f64)> = sqlx::query_as(
        "SELECT seq, CAST(schema_version AS SIGNED), \
                CAST(JSON_VALUE(metrics, '$.temperature_c') AS DOUBLE) FROM telemetry",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![(2, 2, 150.0)],
        "stamped with the contract version that accepted it"
    );
    let dead = read_topic(&kafka.dlq_topic, 2, Duration::from_secs(5), Duration::ZERO).await;
    assert_eq!(
        dead.len(),
        1,
        "the record rejected under version 1 stays in the DLQ"
    );

    // A contract with a mistake stops the service at start-up, naming the setting.
    let broken = std::env::temp_dir().join(format!("{id}-broken.toml"));
    std::fs::write(
        &broken,
        "version = 3\n[metrics.temperature_c]\nmin = 10.0\nmax = 5.0\n",
    )
    .unwrap();
    config.contract = Some(broken);
    let error = telemetry_audit::run(config, CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("metrics.temperature_c.min"), "{error}");
}
