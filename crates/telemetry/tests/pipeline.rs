//! End-to-end tests of the walking skeleton against the real services: Mosquitto, Apache Kafka
//! and MariaDB, started by `scripts/services.sh start`. Bridge and audit run in-process; every
//! test has its own MQTT topic prefix, Kafka topics, consumer group and database.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::StreamExt;
use rdkafka::message::Message;
use serde_json::{json, Value};
use telemetry_bridge::Bridge;
use telemetry_core::event::CleanedRecord;
use telemetry_core::names::headers;
use telemetry_testkit::{
    database_url, eventually, http_get, produce, publish_qos1, read_topic, unique, TestRecord,
};
use tokio_util::sync::CancellationToken;

mod common;
use common::{audit_config, base_ts, bridge_config, header, kafka_config, metric, payload};

async fn row_count(pool: &sqlx::MySqlPool) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM telemetry")
        .fetch_one(pool)
        .await
        .unwrap_or(-1)
}

/// A row of the telemetry table, as the test reads it back.
#[derive(sqlx::FromRow)]
struct StoredRow {
    device_id: String,
    seq: i64,
    ts: i64,
    temperature: f64,
    battery_v: f64,
    firmware: Option<String>,
    firmware_metric: Option<String>,
    schema_version: i64,
    source_topic: String,
}

/// A valid event as the devices send it, with `device_ts` in one of the accepted forms.
struct ValidEvent {
    device_id: String,
    seq: i64,
    device_ts: i64,
    temperature: f64,
}

impl ValidEvent {
    fn payload(&self, form: usize) -> Vec<u8> {
        let device_ts = match form % 3 {
            0 => json!(self.device_ts),
            // Seconds with a fraction.
            1 => json!(self.device_ts as f64 / 1000.0),
            // RFC 3339 in another time zone.
            _ => {
                let offset = chrono::FixedOffset::east_opt(2 * 3600).unwrap();
                let time = chrono::DateTime::from_timestamp_millis(self.device_ts)
                    .unwrap()
                    .with_timezone(&offset);
                json!(time.to_rfc3339_opts(chrono::SecondsFormat::Millis, false))
            }
        };
        json!({
            "device_id": self.device_id,
            "device_ts": device_ts,
            "seq": self.seq,
            "temperature": self.temperature,
            "battery_v": 3.7,
            "firmware": "1.0.3",
        })
        .to_string()
        .into_bytes()
    }
}

/// The malformed payloads a fleet really sends, each with the code it must get.
fn malformed() -> Vec<(&'static str, Vec<u8>)> {
    let ts = base_ts();
    vec![
        ("invalid_json", b"temperature=21.5".to_vec()),
        ("empty_payload", Vec::new()),
        ("invalid_json", vec![0x00, 0x9f, 0xff, 0x10, 0x80]),
        (
            "invalid_json",
            br#"{"device_id":"pico-x","device_ts":17643"#.to_vec(),
        ),
        ("not_an_object", b"[21.5, 40]".to_vec()),
        (
            "missing_device_id",
            br#"{"device_ts":1764300000000,"temperature":1}"#.to_vec(),
        ),
        (
            "invalid_device_id",
            br#"{"device_id":42,"device_ts":1764300000000}"#.to_vec(),
        ),
        (
            "missing_device_ts",
            br#"{"device_id":"pico-x","temperature":1}"#.to_vec(),
        ),
        (
            "invalid_device_ts",
            br#"{"device_id":"pico-x","device_ts":"last tuesday"}"#.to_vec(),
        ),
        (
            "invalid_device_ts",
            br#"{"device_id":"pico-x","device_ts":true}"#.to_vec(),
        ),
        (
            "invalid_seq",
            format!(r#"{{"device_id":"pico-x","device_ts":{ts},"seq":"one"}}"#).into_bytes(),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_published_over_mqtt_reach_table_topics_and_websocket() {
    let id = unique("pipeline");
    let kafka = kafka_config(&id);
    let shutdown = CancellationToken::new();

    let bridge = Bridge::bind(bridge_config(&id, &kafka)).await.unwrap();
    let address = bridge.local_addr().unwrap();
    let bridge_task = tokio::spawn(bridge.run(shutdown.clone()));
    let audit_task = tokio::spawn(telemetry_audit::run(
        audit_config(&id, &format!("{id}-audit"), &kafka),
        shutdown.clone(),
    ));

    let ready = eventually(Duration::from_secs(60), || async {
        matches!(http_get(address, "/readyz").await, Ok((200, _)))
    })
    .await;
    assert!(
        ready,
        "the bridge did not become ready (subscribed to MQTT)"
    );

    // A live-view client, connected before anything is published.
    let (socket, _) = tokio_tungstenite::connect_async(format!("ws://{address}/ws"))
        .await
        .unwrap();
    let (_, mut socket) = socket.split();

    // 1,000 valid events from 10 devices, interleaved, and the malformed ones among them.
    let mut valid = Vec::new();
    let mut sent: Vec<(String, Vec<u8>)> = Vec::new();
    for seq in 0..100 {
        for device in 0..10 {
            let event = ValidEvent {
                device_id: format!("dev-{device}"),
                seq,
                device_ts: base_ts() + seq * 1_000 + device,
                temperature: (device * 100 + seq) as f64 / 10.0,
            };
            let topic = format!("{id}/devices/{}/telemetry", event.device_id);
            sent.push((topic, event.payload(usize::try_from(seq + device).unwrap())));
            valid.push(event);
        }
    }
    let mut expected_codes = HashMap::new();
    for (index, (code, bytes)) in malformed().into_iter().enumerate() {
        let topic = format!("{id}/devices/bad-{index}/telemetry");
        // Each names the device of its own topic (`device_id.bind_to_topic`), so it is rejected
        // for its own fault, not as another device's.
        let bytes = match std::str::from_utf8(&bytes) {
            Ok(text) => text
                .replace("\"pico-x\"", &format!("\"bad-{index}\""))
                .into_bytes(),
            Err(_) => bytes,
        };
        expected_codes.insert(topic.clone(), (code, bytes.clone()));
        sent.insert(index * 90, (topic, bytes));
    }
    let total = sent.len();
    publish_qos1(&format!("{id}-publisher"), &sent).await;

    // The table: exactly the 1,000 valid events, normalized.
    let pool = sqlx::MySqlPool::connect(&database_url(&id)).await.unwrap();
    let complete = eventually(Duration::from_secs(60), || async {
        row_count(&pool).await >= 1_000
    })
    .await;
    assert!(complete, "only {} rows arrived", row_count(&pool).await);
    let rows: Vec<StoredRow> = sqlx::query_as(
        // A binary collation reads as VARBINARY in sqlx; CAST gives the text back.
        "SELECT CAST(device_id AS CHAR) AS device_id, seq, \
                CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01', device_ts) DIV 1000 AS SIGNED) AS ts, \
                CAST(JSON_VALUE(metrics, '$.temperature_c') AS DOUBLE) AS temperature, \
                CAST(JSON_VALUE(metrics, '$.battery_v') AS DOUBLE) AS battery_v, \
                CAST(JSON_VALUE(attributes, '$.firmware') AS CHAR) AS firmware, \
                CAST(JSON_VALUE(metrics, '$.firmware') AS CHAR) AS firmware_metric, \
                CAST(schema_version AS SIGNED) AS schema_version, \
                source_topic \
         FROM telemetry",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 1_000, "exactly one row per valid event");
    let stored: HashMap<(String, i64), StoredRow> = rows
        .into_iter()
        .map(|row| ((row.device_id.clone(), row.seq), row))
        .collect();
    for event in &valid {
        let row = stored
            .get(&(event.device_id.clone(), event.seq))
            .unwrap_or_else(|| panic!("no row for {} seq {}", event.device_id, event.seq));
        assert_eq!(
            row.ts, event.device_ts,
            "device_ts of {} seq {}",
            event.device_id, event.seq
        );
        assert_eq!(row.temperature, event.temperature);
        assert_eq!(row.battery_v, 3.7);
        assert_eq!(
            row.firmware.as_deref(),
            Some("1.0.3"),
            "kept as an attribute"
        );
        assert_eq!(row.firmware_metric, None, "string fields are not metrics");
        assert_eq!(row.schema_version, 1, "stamped with the contract's version");
        assert_eq!(row.source_topic, kafka.raw_topic);
    }

    // The cleaned topic: one normalized record per valid event.
    let cleaned = read_topic(
        &kafka.cleaned_topic,
        1_000,
        Duration::from_secs(30),
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(cleaned.len(), 1_000);
    let mut cleaned_by_identity = BTreeMap::new();
    for message in &cleaned {
        let record: CleanedRecord = serde_json::from_slice(&payload(message)).unwrap();
        assert_eq!(message.key(), Some(record.event.device_id.as_bytes()));
        assert_eq!(record.event.attributes["firmware"], json!("1.0.3"));
        assert_eq!(record.event.schema_version, 1);
        cleaned_by_identity.insert((record.event.device_id.clone(), record.event.seq), record);
    }
    for event in &valid {
        let record = &cleaned_by_identity[&(event.device_id.clone(), Some(event.seq))];
        assert_eq!(record.event.device_ts, event.device_ts);
        assert_eq!(record.event.metrics["temperature_c"], event.temperature);
        assert_eq!(record.source.topic, kafka.raw_topic);
    }

    // The DLQ: every malformed payload, byte for byte, with its reason code and origin.
    let dead = read_topic(
        &kafka.dlq_topic,
        expected_codes.len(),
        Duration::from_secs(30),
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(dead.len(), expected_codes.len());
    for message in &dead {
        let mqtt_topic =
            header(message, headers::MQTT_TOPIC).expect("original mqtt.topic header kept");
        let (code, bytes) = &expected_codes[mqtt_topic];
        assert_eq!(&payload(message), bytes, "original bytes of {mqtt_topic}");
        assert_eq!(
            header(message, headers::ERROR_CODE),
            Some(*code),
            "code of {mqtt_topic}"
        );
        assert!(!header(message, headers::ERROR_MESSAGE)
            .unwrap_or_default()
            .is_empty());
        assert_eq!(
            header(message, headers::SOURCE_TOPIC),
            Some(kafka.raw_topic.as_str())
        );
        assert!(header(message, headers::SOURCE_PARTITION)
            .unwrap()
            .parse::<i32>()
            .is_ok());
        assert!(header(message, headers::SOURCE_OFFSET)
            .unwrap()
            .parse::<i64>()
            .is_ok());
    }

    // The raw topic: every message byte for byte, keyed by device, with the bridge's headers.
    let raw = read_topic(
        &kafka.raw_topic,
        total,
        Duration::from_secs(30),
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(raw.len(), total);
    let mut raw_set: Vec<(String, Vec<u8>)> = raw
        .iter()
        .map(|message| {
            let topic = header(message, headers::MQTT_TOPIC).unwrap().to_string();
            let device = topic.split('/').nth(2).unwrap();
            assert_eq!(message.key(), Some(device.as_bytes()));
            assert_eq!(
                header(message, headers::BRIDGE_ID),
                Some(format!("{id}-bridge").as_str())
            );
            assert!(
                header(message, headers::RECEIVED_AT)
                    .unwrap()
                    .parse::<i64>()
                    .unwrap()
                    > base_ts()
            );
            (topic, payload(message))
        })
        .collect();
    let mut sent_set = sent.clone();
    raw_set.sort();
    sent_set.sort();
    assert_eq!(raw_set, sent_set);

    // The live view: one frame per message, payload as JSON when it is JSON, text otherwise.
    let mut frames = Vec::new();
    while frames.len() < total {
        match tokio::time::timeout(Duration::from_secs(10), socket.next()).await {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text)))) => {
                frames.push(serde_json::from_str::<Value>(&text).unwrap());
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("WebSocket ended after {} frames: {other:?}", frames.len()),
        }
    }
    let mut frame_set: Vec<(String, String)> = frames
        .iter()
        .map(|frame| {
            let topic = frame["topic"].as_str().unwrap().to_string();
            assert_eq!(frame["device_id"].as_str(), topic.split('/').nth(2));
            assert!(frame["received_at"].as_i64().unwrap() > base_ts());
            (topic, frame["payload"].to_string())
        })
        .collect();
    let mut expected_frames: Vec<(String, String)> = sent
        .iter()
        .map(|(topic, bytes)| {
            let payload = serde_json::from_slice::<Value>(bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()));
            (topic.clone(), payload.to_string())
        })
        .collect();
    frame_set.sort();
    expected_frames.sort();
    assert_eq!(frame_set, expected_frames);

    // The counters an operator watches. Tests in this binary share one metrics registry, so only
    // counts no other test touches are compared exactly.
    let (status, metrics) = http_get(address, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    let total = total as f64;
    assert_eq!(
        metric(&metrics, "events_received_total", &[("service", "bridge")]),
        Some(total)
    );
    assert_eq!(
        metric(
            &metrics,
            "records_produced_total",
            &[("service", "bridge"), ("topic", "raw")]
        ),
        Some(total)
    );
    assert_eq!(
        metric(&metrics, "websocket_clients", &[("service", "bridge")]),
        Some(1.0)
    );
    // Every raw record's produce latency was measured (a summary: count, sum, quantiles).
    assert_eq!(
        metric(
            &metrics,
            "kafka_produce_duration_seconds_count",
            &[("service", "bridge"), ("topic", kafka.raw_topic.as_str())]
        ),
        Some(total)
    );
    for (code, count) in [
        ("empty_payload", 1.0),
        ("not_an_object", 1.0),
        ("missing_device_ts", 1.0),
        ("invalid_device_ts", 2.0),
        ("invalid_seq", 1.0),
    ] {
        assert_eq!(
            metric(
                &metrics,
                "events_rejected_total",
                &[("service", "audit"), ("error_code", code)]
            ),
            Some(count),
            "rejections counted as {code}"
        );
    }
    // The audit group's lag on each raw partition, from librdkafka's statistics (every 5 s): 0
    // once it has read everything.
    let group = format!("{id}-audit");
    let caught_up = telemetry_testkit::eventually(Duration::from_secs(20), || async {
        let (_, metrics) = http_get(address, "/metrics").await.unwrap();
        (0..3).all(|partition| {
            metric(
                &metrics,
                "kafka_consumer_lag",
                &[
                    ("group", group.as_str()),
                    ("topic", kafka.raw_topic.as_str()),
                    ("partition", &partition.to_string()),
                ],
            ) == Some(0.0)
        })
    })
    .await;
    let (_, metrics) = http_get(address, "/metrics").await.unwrap();
    let lags: Vec<&str> = metrics
        .lines()
        .filter(|line| line.contains("kafka_consumer_lag") && line.contains(group.as_str()))
        .collect();
    assert!(
        caught_up,
        "kafka_consumer_lag is 0 on every raw partition: {lags:#?}"
    );

    // The live view takes nothing from its clients: one that sends a large message is cut off.
    let (intruder, _) = tokio_tungstenite::connect_async(format!("ws://{address}/ws"))
        .await
        .unwrap();
    let (mut to_bridge, mut from_bridge) = intruder.split();
    futures::SinkExt::send(
        &mut to_bridge,
        tokio_tungstenite::tungstenite::Message::text("x".repeat(100_000)),
    )
    .await
    .unwrap();
    let cut_off = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match from_bridge.next().await {
                None
                | Some(Err(_))
                | Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) => return true,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert_eq!(cut_off, Ok(true), "a client sending 100 kB is disconnected");

    shutdown.cancel();
    bridge_task.await.unwrap().unwrap();
    audit_task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consuming_the_raw_topic_again_adds_no_duplicate_rows() {
    let id = unique("replay");
    let kafka = kafka_config(&id);
    telemetry_kafka::ensure_topics(&kafka, &[&kafka.raw_topic])
        .await
        .unwrap();

    // 90 distinct events, 10 of them sent twice (as a bridge does after a crash), and one bad record.
    let mut records = Vec::new();
    for seq in 0..100 {
        let seq = if seq >= 90 { seq - 90 } else { seq };
        records.push(TestRecord {
            key: Some(b"dev-1".to_vec()),
            payload: json!({"device_id": "dev-1", "device_ts": base_ts() + seq * 1000, "seq": seq, "v": seq})
                .to_string()
                .into_bytes(),
            headers: vec![(headers::RECEIVED_AT.to_string(), (base_ts() + 5_000).to_string().into_bytes())],
        });
    }
    records.push(TestRecord {
        key: None,
        payload: b"{oops".to_vec(),
        headers: Vec::new(),
    });
    produce(&kafka.raw_topic, &records).await;

    let pool = sqlx::MySqlPool::connect_lazy(&database_url(&id)).unwrap();
    for (round, group) in ["first", "second"].into_iter().enumerate() {
        let shutdown = CancellationToken::new();
        let audit = tokio::spawn(telemetry_audit::run(
            audit_config(&id, &format!("{id}-{group}"), &kafka),
            shutdown.clone(),
        ));
        // Each group re-produces every accepted record to the cleaned topic (at-least-once), so
        // the cleaned count tells when this group has been through the whole raw topic.
        let cleaned = read_topic(
            &kafka.cleaned_topic,
            100 * (round + 1),
            Duration::from_secs(60),
            Duration::from_millis(500),
        )
        .await;
        assert_eq!(
            cleaned.len(),
            100 * (round + 1),
            "group {group} handled every record"
        );
        shutdown.cancel();
        audit.await.unwrap().unwrap();
        assert_eq!(row_count(&pool).await, 90, "rows after the {group} group");
    }
    let dead = read_topic(
        &kafka.dlq_topic,
        2,
        Duration::from_secs(30),
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(
        dead.len(),
        2,
        "the bad record went to the DLQ once per pass"
    );
    let received_at: Vec<i64> = sqlx::query_scalar(
        "SELECT DISTINCT CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01', received_at) DIV 1000 AS SIGNED) FROM telemetry",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        received_at,
        vec![base_ts() + 5_000],
        "received_at comes from the bridge's header"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_database_refuses_goes_to_the_dlq_and_the_rest_flows() {
    let id = unique("poison");
    let kafka = kafka_config(&id);
    telemetry_kafka::ensure_topics(&kafka, &[&kafka.raw_topic])
        .await
        .unwrap();
    // An operator's constraint the contract does not know about: valid events can break it.
    let store = telemetry_store::Store::connect(&database_url(&id), 1)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let pool = sqlx::MySqlPool::connect(&database_url(&id)).await.unwrap();
    sqlx::query(
        "ALTER TABLE telemetry ADD CONSTRAINT plausible_temperature \
         CHECK (JSON_VALUE(metrics, '$.temperature_c') < 100)",
    )
    .execute(&pool)
    .await
    .unwrap();

    let poisoned = [7, 23, 24];
    let records: Vec<TestRecord> = (0..60)
        .map(|seq| {
            // 110 °C is within the contract's range, so only the database refuses it.
            let temperature = if poisoned.contains(&seq) { 110 } else { 20 };
            TestRecord {
                key: Some(b"dev-1".to_vec()),
                payload: json!({"device_id": "dev-1", "device_ts": base_ts() + seq * 1000,
                                "seq": seq, "temperature": temperature})
                .to_string()
                .into_bytes(),
                headers: Vec::new(),
            }
        })
        .collect();
    produce(&kafka.raw_topic, &records).await;

    let shutdown = CancellationToken::new();
    let mut config = audit_config(&id, &format!("{id}-audit"), &kafka);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    config.listen = format!("127.0.0.1:{port}");
    let audit_address = config.listen.parse().unwrap();
    let audit = tokio::spawn(telemetry_audit::run(config, shutdown.clone()));
    let dead = read_topic(
        &kafka.dlq_topic,
        poisoned.len(),
        Duration::from_secs(60),
        Duration::from_millis(500),
    )
    .await;
    let cleaned = read_topic(
        &kafka.cleaned_topic,
        60 - poisoned.len(),
        Duration::from_secs(60),
        Duration::from_millis(500),
    )
    .await;
    let (status, readiness) = http_get(audit_address, "/readyz").await.unwrap();
    assert_eq!((status, readiness.as_str()), (200, r#"{"database":true}"#));
    let (_, metrics) = http_get(audit_address, "/metrics").await.unwrap();
    assert_eq!(
        metric(
            &metrics,
            "events_rejected_total",
            &[("error_code", "db_rejected")]
        ),
        Some(3.0),
        "refused records are counted by cause"
    );
    shutdown.cancel();
    audit.await.unwrap().unwrap();

    assert_eq!(row_count(&pool).await, 57, "every other event is stored");
    assert_eq!(
        cleaned.len(),
        57,
        "refused events are not on the cleaned topic"
    );
    let mut dead_seqs = Vec::new();
    for message in &dead {
        assert_eq!(
            header(message, headers::ERROR_CODE),
            Some(telemetry_audit::DB_REJECTED)
        );
        assert!(header(message, headers::ERROR_MESSAGE)
            .unwrap()
            .contains("plausible_temperature"));
        let original: Value = serde_json::from_slice(&payload(message)).unwrap();
        assert_eq!(
            payload(message),
            records[original["seq"].as_u64().unwrap() as usize].payload
        );
        dead_seqs.push(original["seq"].as_i64().unwrap());
    }
    dead_seqs.sort_unstable();
    assert_eq!(dead_seqs, poisoned);
}
