//! Hostile input (issue 19) against the real services: Mosquitto with the shipped configuration
//! (and one without a packet size limit), Apache Kafka and MariaDB. No message, device or client
//! can stop, impersonate or exhaust the pipeline: each case below is followed by valid events
//! that must reach the table in seconds, with no reconnect of the bridge.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use telemetry_bridge::{Bridge, BridgeConfig};
use telemetry_core::names::headers;
use telemetry_kafka::KafkaConfig;
use telemetry_testkit::{
    database_url, eventually, http_get, kafka_brokers, publish_qos1, publish_qos1_to, read_topic,
    unique, PrivateMosquitto,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod common;
use common::{audit_config, base_ts, bridge_config, header, kafka_config, metric};

/// The shipped Mosquitto configuration's `max_packet_size`, which the bridge's default agrees
/// with (checked by `the_broker_limit_is_one_setting` in the config tests).
const BROKER_LIMIT: usize = telemetry_bridge::DEFAULT_MQTT_MAX_PACKET_BYTES;

/// A bridge and an audit service in this process, with the test's own topics and database.
struct Pipeline {
    id: String,
    kafka: KafkaConfig,
    bridge: SocketAddr,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    pool: sqlx::MySqlPool,
}

impl Pipeline {
    async fn start(id: &str, edit: impl FnOnce(&mut BridgeConfig)) -> Pipeline {
        let kafka = kafka_config(id);
        let mut config = bridge_config(id, &kafka);
        edit(&mut config);
        let shutdown = CancellationToken::new();
        let bridge = Bridge::bind(config).await.unwrap();
        let address = bridge.local_addr().unwrap();
        let mut tasks = vec![tokio::spawn({
            let shutdown = shutdown.clone();
            async move { bridge.run(shutdown).await.unwrap() }
        })];
        tasks.push(tokio::spawn({
            let config = audit_config(id, &format!("{id}-audit"), &kafka);
            let shutdown = shutdown.clone();
            async move { telemetry_audit::run(config, shutdown).await.unwrap() }
        }));
        let ready = eventually(Duration::from_secs(60), || async {
            matches!(http_get(address, "/readyz").await, Ok((200, _)))
        })
        .await;
        assert!(ready, "the bridge did not subscribe");
        let pool = sqlx::MySqlPool::connect_lazy(&database_url(id)).unwrap();
        Pipeline {
            id: id.to_string(),
            kafka,
            bridge: address,
            shutdown,
            tasks,
            pool,
        }
    }

    fn topic(&self, device: &str) -> String {
        format!("{}/devices/{device}/telemetry", self.id)
    }

    /// Rows of `device` in the table, as `(device_ts, temperature)`.
    async fn rows(&self, device: &str) -> Vec<(i64, f64)> {
        sqlx::query_as(
            "SELECT CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01', device_ts) DIV 1000 AS SIGNED), \
             CAST(JSON_VALUE(metrics, '$.temperature_c') AS DOUBLE) \
             FROM telemetry WHERE device_id = ? ORDER BY device_ts",
        )
        .bind(device)
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default()
    }

    async fn wait_for_rows(&self, device: &str, count: usize, within: Duration) -> bool {
        eventually(within, || async { self.rows(device).await.len() >= count }).await
    }

    async fn bridge_metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (_, text) = http_get(self.bridge, "/metrics").await.unwrap();
        metric(&text, name, labels).unwrap_or(0.0)
    }

    async fn dead_letters(&self, expected: usize) -> Vec<OwnedMessage> {
        read_topic(
            &self.kafka.dlq_topic,
            expected,
            Duration::from_secs(30),
            Duration::from_secs(1),
        )
        .await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            task.await.unwrap();
        }
    }
}

/// A valid event of `device`, `seconds` after the tests' base time.
fn event(device: &str, seconds: i64, temperature: f64) -> Vec<u8> {
    json!({"device_id": device, "device_ts": base_ts() + seconds * 1000, "temp": temperature})
        .to_string()
        .into_bytes()
}

/// A payload that makes a QoS 1 PUBLISH on `topic` have a remaining length of `remaining` bytes
/// (topic length, topic, packet id, payload).
fn payload_for_remaining(topic: &str, remaining: usize) -> Vec<u8> {
    let size = remaining - 2 - topic.len() - 2;
    (0..size).map(|index| b'a' + (index % 26) as u8).collect()
}

fn code(message: &OwnedMessage) -> Option<&str> {
    header(message, headers::ERROR_CODE)
}

/// The bridge never dropped its MQTT connection in this process. Tests in this file share the
/// process's metrics, and none of them provokes a reconnect.
async fn assert_no_reconnect(pipeline: &Pipeline) {
    let errors = pipeline
        .bridge_metric("mqtt_connection_errors_total", &[("service", "bridge")])
        .await;
    assert_eq!(errors, 0.0, "the bridge reconnected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_up_to_the_brokers_limit_go_to_the_dlq_and_the_stream_keeps_flowing() {
    let pipeline = Pipeline::start(&unique("sizes"), |_| {}).await;
    let topic = pipeline.topic("pico-1");
    // Mosquitto refuses a packet whose remaining length plus one passes `max_packet_size`: the
    // largest it takes, one byte under it, and the 1,020,001-byte publish of the issue.
    let largest = payload_for_remaining(&topic, BROKER_LIMIT - 1);
    let under = payload_for_remaining(&topic, BROKER_LIMIT - 2);
    let issue = vec![b'x'; 1_020_001];
    let messages = vec![
        (topic.clone(), event("pico-1", 1, 20.0)),
        (topic.clone(), largest.clone()),
        (topic.clone(), event("pico-1", 2, 21.0)),
        (topic.clone(), under.clone()),
        (topic.clone(), event("pico-1", 3, 22.0)),
        (topic.clone(), issue.clone()),
        (topic.clone(), event("pico-1", 4, 23.0)),
    ];
    publish_qos1(&format!("{}-device", pipeline.id), &messages).await;
    assert!(
        pipeline
            .wait_for_rows("pico-1", 4, Duration::from_secs(20))
            .await,
        "valid events around the large messages did not all reach the table: {:?}",
        pipeline.rows("pico-1").await
    );
    let letters = pipeline.dead_letters(3).await;
    assert_eq!(letters.len(), 3, "one dead letter per large message");
    // Larger than the raw topic takes: forwarded cut, the first 64 KiB and the size.
    for (letter, original) in letters.iter().zip([&largest, &under]) {
        assert_eq!(code(letter), Some("payload_too_large"));
        assert_eq!(
            header(letter, headers::PAYLOAD_ORIGINAL_BYTES),
            Some(original.len().to_string().as_str())
        );
        let kept = letter.payload().unwrap_or_default();
        assert_eq!(kept.len(), 65_536, "the first 64 KiB are kept");
        assert_eq!(kept, &original[..kept.len()]);
        assert_eq!(letter.key(), Some(&b"pico-1"[..]));
    }
    // Within what the raw topic takes: forwarded whole, and whole in the DLQ (over the
    // contract's `limits.max_payload_bytes`).
    assert_eq!(code(&letters[2]), Some("payload_too_large"));
    assert_eq!(header(&letters[2], headers::PAYLOAD_ORIGINAL_BYTES), None);
    assert_eq!(letters[2].payload(), Some(&issue[..]));
    assert_no_reconnect(&pipeline).await;
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_without_a_size_limit_cannot_stop_the_bridge_either() {
    let broker = PrivateMosquitto::start("").await;
    let url = broker.url();
    let pipeline = Pipeline::start(&unique("unlimited"), |config| {
        config.mqtt = telemetry_bridge::MqttConnectionConfig::new(url.clone());
    })
    .await;
    let topic = pipeline.topic("pico-2");
    let two_megabytes = vec![b'{'; 2_000_000];
    let five_megabytes: Vec<u8> = (0..5_000_000).map(|index| (index % 251) as u8).collect();
    let messages = vec![
        (topic.clone(), event("pico-2", 1, 20.0)),
        (topic.clone(), two_megabytes.clone()),
        (topic.clone(), event("pico-2", 2, 21.0)),
        (topic.clone(), five_megabytes.clone()),
        (topic.clone(), Vec::new()),
        (topic.clone(), event("pico-2", 3, 22.0)),
    ];
    let acknowledged = std::sync::atomic::AtomicUsize::new(0);
    publish_qos1_to(
        &url,
        &format!("{}-device", pipeline.id),
        &messages,
        None,
        &acknowledged,
    )
    .await;
    assert!(
        pipeline
            .wait_for_rows("pico-2", 3, Duration::from_secs(20))
            .await,
        "valid events after the large messages did not reach the table"
    );
    let letters = pipeline.dead_letters(3).await;
    let codes: Vec<_> = letters.iter().map(code).collect();
    assert_eq!(
        codes,
        vec![
            Some("payload_too_large"),
            Some("payload_too_large"),
            Some("empty_payload")
        ]
    );
    for (letter, original) in letters.iter().zip([&two_megabytes, &five_megabytes]) {
        assert_eq!(
            header(letter, headers::PAYLOAD_ORIGINAL_BYTES),
            Some(original.len().to_string().as_str())
        );
        assert_eq!(letter.payload().unwrap_or_default(), &original[..65_536]);
    }
    let read_through = pipeline
        .bridge_metric("mqtt_messages_read_through_total", &[("service", "bridge")])
        .await;
    assert!(read_through >= 2.0, "read through: {read_through}");
    assert_no_reconnect(&pipeline).await;
    pipeline.stop().await;
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_write_as_another() {
    let pipeline = Pipeline::start(&unique("spoof"), |_| {}).await;
    let id = pipeline.id.clone();
    let (live, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", pipeline.bridge))
        .await
        .unwrap();
    // The attacker, on its own topic, sends the victim's next identities first (whole seconds,
    // no seq), then an event of its own; the victim then sends its real events.
    let attacker = pipeline.topic("attacker");
    let victim = pipeline.topic("victim");
    let spoofed = |seconds: i64| {
        json!({"device_id": "victim", "device_ts": base_ts() + seconds * 1000, "temp": 99.0})
            .to_string()
            .into_bytes()
    };
    publish_qos1(
        &format!("{id}-attacker"),
        &[
            (attacker.clone(), spoofed(10)),
            (attacker.clone(), spoofed(11)),
            (attacker.clone(), event("attacker", 10, 30.0)),
            // Topics that name no usable device: a trailing space, a character the contract
            // does not allow.
            (pipeline.topic("victim "), event("victim", 12, 99.0)),
            (pipeline.topic("vict$m"), event("victim", 13, 99.0)),
        ],
    )
    .await;
    publish_qos1(
        &format!("{id}-victim"),
        &[
            (victim.clone(), event("victim", 10, 20.0)),
            (victim.clone(), event("victim", 11, 21.0)),
        ],
    )
    .await;
    assert!(
        pipeline
            .wait_for_rows("victim", 2, Duration::from_secs(20))
            .await
    );
    assert!(
        pipeline
            .wait_for_rows("attacker", 1, Duration::from_secs(5))
            .await
    );
    // The victim's rows are its own readings, not the attacker's.
    let victim_rows = pipeline.rows("victim").await;
    assert_eq!(
        victim_rows,
        vec![(base_ts() + 10_000, 20.0), (base_ts() + 11_000, 21.0)]
    );
    let letters = pipeline.dead_letters(4).await;
    assert_eq!(letters.len(), 4);
    for letter in &letters {
        assert_eq!(code(letter), Some("device_id_mismatch"));
        assert_eq!(header(letter, headers::ERROR_FIELD), Some("device_id"));
    }
    // Counted (by the alerter too) against the device of the topic they came on.
    let mut counted: Vec<_> = letters
        .iter()
        .filter_map(|letter| header(letter, headers::DEVICE_ID))
        .collect();
    counted.sort_unstable();
    assert_eq!(
        counted,
        vec!["#unusable", "#unusable", "attacker", "attacker"]
    );
    // Indexed under the attacker's device, and under the placeholder for unusable topics.
    let indexed: Vec<(Option<String>,)> = sqlx::query_as(
        "SELECT CAST(device_id AS CHAR) FROM dlq_events WHERE code = 'device_id_mismatch'",
    )
    .fetch_all(&pipeline.pool)
    .await
    .unwrap();
    let mut indexed: Vec<_> = indexed.into_iter().filter_map(|(device,)| device).collect();
    indexed.sort();
    assert_eq!(
        indexed,
        vec!["#unusable", "#unusable", "attacker", "attacker"]
    );
    let devices: Vec<(String,)> = sqlx::query_as("SELECT CAST(device_id AS CHAR) FROM devices")
        .fetch_all(&pipeline.pool)
        .await
        .unwrap();
    let mut devices: Vec<_> = devices.into_iter().map(|(device,)| device).collect();
    devices.sort();
    assert_eq!(devices, vec!["#unusable", "attacker", "victim"]);
    // Nothing on the cleaned topic (what the alerter and the rollup read) names the victim but
    // its own two events.
    let cleaned = read_topic(
        &pipeline.kafka.cleaned_topic,
        3,
        Duration::from_secs(20),
        Duration::from_secs(1),
    )
    .await;
    let victims: Vec<f64> = cleaned
        .iter()
        .filter_map(|record| serde_json::from_slice::<Value>(record.payload()?).ok())
        .filter(|event| event["device_id"] == "victim")
        .map(|event| {
            event["metrics"]["temperature_c"]
                .as_f64()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(victims, vec![20.0, 21.0]);
    // No live frame shows the attacker's readings as the victim's.
    let frames: Vec<Value> = live
        .take_until(tokio::time::sleep(Duration::from_secs(2)))
        .filter_map(|frame| async move {
            match frame {
                Ok(tokio_tungstenite::tungstenite::Message::Text(text)) => {
                    serde_json::from_str(&text).ok()
                }
                _ => None,
            }
        })
        .collect()
        .await;
    assert!(frames.len() >= 7, "{} frames", frames.len());
    for frame in &frames {
        if frame["device_id"] == "victim" {
            assert!(
                frame["metrics"]["temperature_c"].as_f64().unwrap() < 90.0,
                "{frame}"
            );
        }
        if frame["rejected"] == "device_id_mismatch" {
            assert!(frame["device_id"] == "attacker" || frame["device_id"] == "#unusable");
        }
    }
    pipeline.stop().await;
}

/// `size` bytes that do not compress (a linear congruential sequence from `seed`).
fn noise(size: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    (0..size)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 56) as u8
        })
        .collect()
}

async fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()
        .unwrap()
}

async fn set_max_message_bytes(topic: &str, bytes: usize) {
    let value = bytes.to_string();
    let change = AlterConfig::new(ResourceSpecifier::Topic(topic)).set("max.message.bytes", &value);
    let results = admin()
        .await
        .alter_configs([&change], &AdminOptions::new())
        .await
        .unwrap();
    assert!(results.iter().all(Result::is_ok), "{results:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_kafka_refuses_for_good_go_to_the_dlq_and_later_records_flow() {
    let id = unique("refused");
    // The DLQ topic takes records of at most 20,000 bytes: a rejected 30 KB payload's dead
    // letter is refused for good.
    let kafka = kafka_config(&id);
    let created = admin()
        .await
        .create_topics(
            [
                &NewTopic::new(&kafka.dlq_topic, 1, TopicReplication::Fixed(1))
                    .set("max.message.bytes", "20000"),
            ],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    assert!(created.iter().all(Result::is_ok));
    let pipeline = Pipeline::start(&id, |_| {}).await;
    // The raw topic's limit goes down after the bridge read it: the next large record is refused
    // by Kafka, not cut beforehand.
    set_max_message_bytes(&pipeline.kafka.raw_topic, 40_000).await;
    let topic = pipeline.topic("pico-3");
    // Not compressible: the broker checks a batch's size after compression.
    let refused_by_raw = noise(50_000, 1);
    let refused_by_dlq = noise(30_000, 2);
    publish_qos1(
        &format!("{id}-device"),
        &[
            (topic.clone(), event("pico-3", 1, 20.0)),
            (topic.clone(), refused_by_raw.clone()),
            (topic.clone(), event("pico-3", 2, 21.0)),
            (topic.clone(), refused_by_dlq.clone()),
            (topic.clone(), event("pico-3", 3, 22.0)),
        ],
    )
    .await;
    assert!(
        pipeline
            .wait_for_rows("pico-3", 3, Duration::from_secs(30))
            .await,
        "records after the refused ones did not reach the table"
    );
    let letters = pipeline.dead_letters(2).await;
    assert_eq!(letters.len(), 2);
    // Cut by the bridge after the raw topic refused it: what fits under the new limit.
    let raw = &letters[0];
    assert_eq!(code(raw), Some("payload_too_large"));
    assert_eq!(header(raw, headers::PAYLOAD_ORIGINAL_BYTES), Some("50000"));
    let kept = raw.payload().unwrap_or_default();
    assert!(!kept.is_empty() && kept.len() < 40_000, "{}", kept.len());
    assert_eq!(kept, &refused_by_raw[..kept.len()]);
    // Rejected by the contract (invalid JSON), cut by the audit service when the DLQ refused it.
    let dlq = &letters[1];
    assert_eq!(code(dlq), Some("invalid_json"));
    assert_eq!(header(dlq, headers::PAYLOAD_ORIGINAL_BYTES), Some("30000"));
    assert_eq!(
        header(dlq, headers::PAYLOAD_CUT_REASON),
        Some("payload_too_large")
    );
    let kept = dlq.payload().unwrap_or_default();
    assert!(!kept.is_empty() && kept.len() < 20_000, "{}", kept.len());
    assert_eq!(kept, &refused_by_dlq[..kept.len()]);
    assert_no_reconnect(&pipeline).await;
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_bridges_byte_bounds_is_held_back_not_dropped() {
    let pipeline = Pipeline::start(&unique("bounded"), |config| {
        config.limits.max_queued_bytes = 256 * 1024;
        config.limits.max_in_flight_bytes = 256 * 1024;
    })
    .await;
    let topic = pipeline.topic("pico-4");
    let mut messages = Vec::new();
    for index in 0..60 {
        messages.push((topic.clone(), vec![b'#'; 200_000]));
        messages.push((topic.clone(), event("pico-4", index, 20.0)));
    }
    publish_qos1(&format!("{}-device", pipeline.id), &messages).await;
    assert!(
        pipeline
            .wait_for_rows("pico-4", 60, Duration::from_secs(60))
            .await,
        "{} of 60 events stored",
        pipeline.rows("pico-4").await.len()
    );
    let letters = pipeline.dead_letters(60).await;
    assert_eq!(letters.len(), 60);
    assert!(letters
        .iter()
        .all(|letter| code(letter) == Some("payload_too_large")
            && letter.payload().map(<[u8]>::len) == Some(200_000)));
    let held = pipeline
        .bridge_metric(
            "bridge_backpressure_total",
            &[("service", "bridge"), ("bound", "queued_bytes")],
        )
        .await;
    assert!(held > 0.0, "the queue's bound was never reached");
    assert_no_reconnect(&pipeline).await;
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_frames_are_cut_and_a_client_that_does_not_read_is_dropped() {
    let pipeline = Pipeline::start(&unique("frames"), |config| {
        config.limits.ws_write_timeout_ms = 500;
        config.limits.ws_max_payload_bytes = 32_768;
    })
    .await;
    let (reader, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", pipeline.bridge))
        .await
        .unwrap();
    // A client that completes the handshake and then never reads.
    let mut stalled = tokio::net::TcpStream::connect(pipeline.bridge)
        .await
        .unwrap();
    let handshake = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        pipeline.bridge
    );
    tokio::io::AsyncWriteExt::write_all(&mut stalled, handshake.as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let topic = pipeline.topic("pico-5");
    let large = json!({"device_id": "pico-5", "note": "n".repeat(60_000)}).to_string();
    let messages: Vec<_> = (0..400)
        .map(|_| (topic.clone(), large.clone().into_bytes()))
        .collect();
    publish_qos1(&format!("{}-device", pipeline.id), &messages).await;
    let frame = Box::pin(reader.filter_map(|frame| async move {
        match frame {
            Ok(tokio_tungstenite::tungstenite::Message::Text(text)) => {
                serde_json::from_str::<Value>(&text).ok()
            }
            _ => None,
        }
    }))
    .next()
    .await
    .unwrap();
    assert_eq!(frame["payload_cut"], json!(large.len()));
    assert!(frame["payload"].as_str().unwrap().len() <= 32_768);
    let dropped = eventually(Duration::from_secs(20), || async {
        pipeline
            .bridge_metric(
                "websocket_clients_dropped_total",
                &[("service", "bridge"), ("cause", "write_timeout")],
            )
            .await
            >= 1.0
    })
    .await;
    assert!(dropped, "the client that does not read was not dropped");
    drop(stalled);
    pipeline.stop().await;
}
