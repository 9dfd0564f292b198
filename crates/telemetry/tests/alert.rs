//! `telemetry alert` against the real Kafka and MariaDB, with a real HTTP webhook receiver: a
//! threshold held for its duration fires once, a value hovering at the threshold never fires, the
//! alert resolves once after the alerter restarted in between with its Kafka offsets lost (its
//! state and offsets are in the database), a
//! silent device and a burst of rejections fire and resolve, and the webhook gets every alert the
//! topic has, although its first answer is a 500. A device silent past the forget window is
//! forgotten (its firing alert resolved, saying why; its states gone from `alert_states`), while
//! devices that keep sending events or rejected records keep theirs.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use telemetry_alert::instruments::{
    DEVICES_FORGOTTEN, DEVICES_TRACKED, STATES_FORGOTTEN, STATES_HELD,
};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use common::kafka_config;
use serde_json::{json, Value};
use telemetry_alert::AlertConfig;
use telemetry_core::names::headers;
use telemetry_kafka::KafkaConfig;
use telemetry_testkit::{database_url, eventually, produce, read_topic, unique, TestRecord};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);
const SECOND: i64 = 1_000;

/// What the webhook receiver got: every body, with the status it answered.
#[derive(Default)]
struct Received {
    requests: Vec<(u16, Value)>,
}

async fn receive(State(received): State<Arc<Mutex<Received>>>, body: String) -> StatusCode {
    let mut received = received.lock().unwrap();
    // The first delivery fails, as a receiver that is restarting would.
    let status = if received.requests.is_empty() {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    received
        .requests
        .push((status.as_u16(), serde_json::from_str(&body).unwrap()));
    status
}

struct Alerter {
    shutdown: CancellationToken,
    task: JoinHandle<telemetry_alert::Result<()>>,
}

fn start(config: AlertConfig) -> Alerter {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(telemetry_alert::run(config, shutdown.clone()));
    Alerter { shutdown, task }
}

impl Alerter {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn cleaned(device_id: &str, device_ts: i64, temperature: f64) -> TestRecord {
    TestRecord {
        key: Some(device_id.as_bytes().to_vec()),
        payload: json!({
            "device_id": device_id, "device_ts": device_ts,
            "received_at": chrono::Utc::now().timestamp_millis(),
            "metrics": {"temperature_c": temperature}, "schema_version": 1,
            "source": {"topic": "raw", "partition": 0, "offset": 0},
        })
        .to_string()
        .into_bytes(),
        headers: Vec::new(),
    }
}

/// Every alert on the topic so far, in order.
async fn alerts(topic: &str) -> Vec<Value> {
    read_topic(topic, usize::MAX, Duration::from_secs(2), Duration::ZERO)
        .await
        .iter()
        .map(|record| {
            use rdkafka::Message as _;
            serde_json::from_slice(record.payload().unwrap()).unwrap()
        })
        .collect()
}

/// `(status, alert_id)` of the alerts of `rule` for `device`, in order.
fn of(alerts: &[Value], rule: &str, device: &str) -> Vec<(String, String)> {
    alerts
        .iter()
        .filter(|alert| alert["rule"] == rule && alert["device_id"] == device)
        .map(|alert| {
            (
                alert["status"].as_str().unwrap().to_string(),
                alert["alert_id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

async fn wait_for(topic: &str, what: &str, check: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let found = eventually(WAIT, || async { check(&alerts(topic).await) }).await;
    let alerts = alerts(topic).await;
    assert!(found, "{what}; the topic has {alerts:#?}");
    alerts
}

/// Commits offset 0 for every partition of `topics` for `group` (which has no member now).
fn rewind(group: &str, topics: &[&str]) {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", telemetry_testkit::kafka_brokers())
        .set("group.id", group)
        .create()
        .unwrap();
    let mut list = rdkafka::TopicPartitionList::new();
    for topic in topics {
        for partition in 0..3 {
            list.add_partition_offset(topic, partition, rdkafka::Offset::Offset(0))
                .unwrap();
        }
    }
    consumer.commit(&list, CommitMode::Sync).unwrap();
}

fn config(id: &str, rules: &std::path::Path, kafka: &KafkaConfig) -> AlertConfig {
    AlertConfig {
        rules: rules.to_path_buf(),
        database: telemetry_store::DatabaseConfig {
            mysql_url: database_url(id),
            mysql_owner_url: None,
            mysql_max_connections: Some(2),
        },
        group_id: format!("{id}-alert"),
        alerts_topic: format!("{id}.alerts"),
        tick_ms: 200,
        forget_after_seconds: 604_800,
        batch_size: 100,
        listen: format!("127.0.0.1:{}", telemetry_testkit::free_port()),
        http: Default::default(),
        kafka: kafka.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_fire_once_resolve_once_survive_a_restart_and_reach_the_webhook() {
    let id = unique("alert");
    let kafka = kafka_config(&id);
    let alerts_topic = format!("{id}.alerts");
    telemetry_kafka::ensure_topics(&kafka, &[&kafka.cleaned_topic, &kafka.dlq_topic])
        .await
        .unwrap();

    let received = Arc::new(Mutex::new(Received::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/alerts", post(receive))
        .with_state(received.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let directory = std::env::temp_dir().join(&id);
    std::fs::create_dir_all(&directory).unwrap();
    let rules = directory.join("alerts.toml");
    std::fs::write(
        &rules,
        format!(
            r#"
            [[rules]]
            name = "hot"
            when = "temperature_c > 40 for 2m"
            clear_for = "1m"

            [[rules]]
            name = "quiet"
            silent_for = "3s"

            [[rules]]
            name = "bad"
            dlq_above = 2
            window = "4s"

            [webhook]
            url = "http://{hook}/alerts"
            max_attempts = 5
            timeout = "2s"
            "#
        ),
    )
    .unwrap();
    let alerter = start(config(&id, &rules, &kafka));

    // A new group starts at the end of the topics: an event counts once the alerter has joined.
    // Until then, send one every 5 s; the first it reads goes silent 3 s later.
    let joined = eventually(WAIT, || async {
        produce(&kafka.cleaned_topic, &[cleaned("probe-0", 0, 20.0)]).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        !of(&alerts(&alerts_topic).await, "quiet", "probe-0").is_empty()
    })
    .await;
    assert!(joined, "a silent device fires");
    produce(&kafka.cleaned_topic, &[cleaned("probe-0", 0, 20.0)]).await;
    wait_for(
        &alerts_topic,
        "a silent device's next event resolves it",
        |alerts| of(alerts, "quiet", "probe-0").len() >= 2,
    )
    .await;

    // Held above 40 for two minutes of device time: fires once. Hovering at 40: never.
    let t0 = chrono::Utc::now().timestamp_millis() - 600 * SECOND;
    // Cool for 70 s first: read again without the stored offsets, those two readings would
    // resolve the alert at once.
    let mut records = vec![
        cleaned("hot-1", t0, 30.0),
        cleaned("hot-1", t0 + 70 * SECOND, 30.0),
        cleaned("hot-1", t0 + 80 * SECOND, 41.0),
        cleaned("hot-1", t0 + 140 * SECOND, 45.0),
        cleaned("hot-1", t0 + 200 * SECOND, 42.0),
        cleaned("hot-1", t0 + 210 * SECOND, 44.0),
    ];
    for step in 0..20 {
        let value = if step % 2 == 0 { 41.0 } else { 39.0 };
        records.push(cleaned("flap-1", t0 + step * 30 * SECOND, value));
    }
    produce(&kafka.cleaned_topic, &records).await;
    let hot_id = format!("hot:hot-1:{}", t0 + 80 * SECOND);
    wait_for(&alerts_topic, "the held threshold fires", |alerts| {
        !of(alerts, "hot", "hot-1").is_empty()
    })
    .await;

    // A restart in between, with the group's committed offsets lost (as when the alerter dies
    // after saving its state and before Kafka has the commit): every record is read again and
    // skipped, the firing alert is in the database, and it resolves once, after the value has
    // stayed below for a minute of device time.
    alerter.stop().await;
    rewind(
        &format!("{id}-alert"),
        &[&kafka.cleaned_topic, &kafka.dlq_topic],
    );
    let alerter = start(config(&id, &rules, &kafka));
    produce(
        &kafka.cleaned_topic,
        &[
            cleaned("hot-1", t0 + 270 * SECOND, 35.0),
            cleaned("hot-1", t0 + 300 * SECOND, 30.0),
            cleaned("hot-1", t0 + 331 * SECOND, 30.0),
            cleaned("hot-1", t0 + 360 * SECOND, 30.0),
        ],
    )
    .await;
    wait_for(&alerts_topic, "the threshold resolves", |alerts| {
        of(alerts, "hot", "hot-1").len() >= 2
    })
    .await;

    // Three rejections from one device within 4 s: fires; resolves when they leave the window.
    let now = chrono::Utc::now().timestamp_millis();
    let rejections: Vec<TestRecord> = (0..3)
        .map(|index| TestRecord {
            key: Some(b"bad-1".to_vec()),
            payload: b"{oops".to_vec(),
            headers: vec![
                (
                    headers::RECEIVED_AT.to_string(),
                    (now + index).to_string().into_bytes(),
                ),
                (headers::ERROR_CODE.to_string(), b"invalid_json".to_vec()),
            ],
        })
        .collect();
    produce(&kafka.dlq_topic, &rejections).await;
    let alerts = wait_for(
        &alerts_topic,
        "the rejection burst fires and resolves",
        |alerts| of(alerts, "bad", "bad-1").len() >= 2,
    )
    .await;

    assert_eq!(
        of(&alerts, "hot", "hot-1"),
        [
            ("firing".to_string(), hot_id.clone()),
            ("resolved".to_string(), hot_id.clone())
        ],
        "fired once and resolved once, across the restart"
    );
    assert_eq!(
        of(&alerts, "hot", "flap-1"),
        [],
        "never held for two minutes"
    );
    let bad = of(&alerts, "bad", "bad-1");
    assert_eq!(
        bad.iter()
            .map(|(status, _)| status.as_str())
            .collect::<Vec<_>>(),
        ["firing", "resolved"]
    );
    let quiet = of(&alerts, "quiet", "probe-0");
    assert_eq!(
        (quiet[0].0.as_str(), quiet[1].0.as_str()),
        ("firing", "resolved")
    );
    assert_eq!(
        quiet[0].1, quiet[1].1,
        "one alert id from firing to resolving"
    );
    let hot = alerts
        .iter()
        .find(|alert| alert["alert_id"] == hot_id.as_str() && alert["status"] == "resolved")
        .unwrap();
    assert_eq!(hot["condition"], "temperature_c > 40 for 2m");
    assert_eq!(hot["severity"], "warning");
    assert_eq!(hot["value"], 44.0, "the last value above the threshold");
    let time = |millis: i64| {
        chrono::DateTime::from_timestamp_millis(millis)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    assert_eq!(hot["started_at"], time(t0 + 80 * SECOND));
    assert_eq!(
        hot["fired_at"],
        time(t0 + 200 * SECOND),
        "held for 2 minutes"
    );
    assert_eq!(
        hot["resolved_at"],
        time(t0 + 331 * SECOND),
        "below for a minute"
    );

    // The webhook: every alert of the topic, with the same body, the first after a retry.
    // (Silences keep firing meanwhile: the webhook may have more than this snapshot. Delivery is
    // at least once: receivers deduplicate on alert id and status.)
    let expected: BTreeMap<(String, String), Value> = alerts
        .iter()
        .map(|alert| {
            (
                (alert["alert_id"].to_string(), alert["status"].to_string()),
                alert.clone(),
            )
        })
        .collect();
    let delivered = || {
        received
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|(status, _)| *status == 200)
            .map(|(_, body)| {
                (
                    (body["alert_id"].to_string(), body["status"].to_string()),
                    body.clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    let complete = eventually(WAIT, || async {
        let delivered: BTreeMap<_, _> = delivered().into_iter().collect();
        expected.keys().all(|key| delivered.contains_key(key))
    })
    .await;
    assert!(
        complete,
        "the webhook got {:?}, the topic has {expected:?}",
        delivered()
    );
    alerter.stop().await;
    for (key, body) in delivered() {
        if let Some(on_topic) = expected.get(&key) {
            assert_eq!(&body, on_topic, "the webhook gets what the topic has");
        }
    }
    let requests = received.lock().unwrap().requests.clone();
    assert_eq!(requests[0].0, 500);
    assert_eq!(
        requests[1].1, requests[0].1,
        "the failed one is retried first"
    );
}

/// A rejected record from `device_id`, arrived now.
fn rejected(device_id: &str) -> TestRecord {
    TestRecord {
        key: Some(device_id.as_bytes().to_vec()),
        payload: b"{oops".to_vec(),
        headers: vec![
            (
                headers::RECEIVED_AT.to_string(),
                chrono::Utc::now()
                    .timestamp_millis()
                    .to_string()
                    .into_bytes(),
            ),
            (headers::ERROR_CODE.to_string(), b"invalid_json".to_vec()),
        ],
    }
}

/// The devices with a row in `alert_states`, by rule.
async fn stored_states(database: &str) -> Vec<(String, String)> {
    let pool = sqlx::MySqlPool::connect(database).await.unwrap();
    let mut rows: Vec<(String, String)> =
        sqlx::query_as("SELECT CAST(rule AS CHAR), CAST(device_id AS CHAR) FROM alert_states")
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    rows.sort();
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_silent_past_the_forget_window_is_forgotten_and_active_ones_are_kept() {
    let id = unique("forget");
    let kafka = kafka_config(&id);
    let alerts_topic = format!("{id}.alerts");
    telemetry_kafka::ensure_topics(&kafka, &[&kafka.cleaned_topic, &kafka.dlq_topic])
        .await
        .unwrap();
    let directory = std::env::temp_dir().join(&id);
    std::fs::create_dir_all(&directory).unwrap();
    let rules = directory.join("alerts.toml");
    std::fs::write(
        &rules,
        r#"
        [[rules]]
        name = "quiet"
        severity = "critical"
        silent_for = "2s"

        [[rules]]
        name = "bad"
        dlq_above = 1000
        window = "3s"
        "#,
    )
    .unwrap();
    let mut settings = config(&id, &rules, &kafka);
    settings.forget_after_seconds = 6;
    let metrics_address: std::net::SocketAddr = settings.listen.parse().unwrap();
    let alerter = start(settings);

    // Throughout: `kept-1` sends an event and `rejecting-1` a rejected record twice a second.
    let active = CancellationToken::new();
    let traffic = tokio::spawn({
        let (active, kafka) = (active.clone(), kafka.clone());
        async move {
            while !active.is_cancelled() {
                produce(&kafka.cleaned_topic, &[cleaned("kept-1", 0, 20.0)]).await;
                produce(&kafka.dlq_topic, &[rejected("rejecting-1")]).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });
    // `gone-1` sends until the alerter has read one of its events (its silence fires 2 s
    // later), then nothing.
    let joined = eventually(WAIT, || async {
        produce(&kafka.cleaned_topic, &[cleaned("gone-1", 0, 20.0)]).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        !of(&alerts(&alerts_topic).await, "quiet", "gone-1").is_empty()
    })
    .await;
    assert!(joined, "gone-1's silence fires");
    let database = database_url(&id);
    assert!(
        stored_states(&database)
            .await
            .contains(&("quiet".to_string(), "gone-1".to_string())),
        "while it is silent, but not for long, its state is kept"
    );

    // Six seconds after its last event, it is forgotten: its firing alert resolves, saying why.
    let alerts = wait_for(
        &alerts_topic,
        "the forgotten device's alert resolves",
        |alerts| {
            alerts.iter().any(|alert| {
                alert["device_id"] == "gone-1"
                    && alert["status"] == "resolved"
                    && alert["condition"]
                        .as_str()
                        .is_some_and(|condition| condition.contains("forgotten"))
            })
        },
    )
    .await;
    let resolved = alerts
        .iter()
        .find(|alert| alert["device_id"] == "gone-1" && alert["status"] == "resolved")
        .unwrap();
    assert_eq!(
        resolved["condition"],
        "(the device sent nothing for 6s: its alert state was forgotten)"
    );
    assert_eq!(resolved["severity"], "critical", "the rule's, as it fired");
    assert!(
        alerts
            .iter()
            .any(|alert| alert["alert_id"] == resolved["alert_id"] && alert["status"] == "firing"),
        "the alert that fired resolves: {alerts:#?}"
    );
    // Its state has left the table (in the transaction that wrote the alert) and the alerter's
    // memory; the devices that keep sending keep theirs.
    let states = stored_states(&database).await;
    assert!(
        states.iter().all(|(_, device)| device != "gone-1"),
        "{states:?}"
    );
    assert!(
        states.contains(&("quiet".to_string(), "kept-1".to_string())),
        "{states:?}"
    );
    assert!(
        states.contains(&("bad".to_string(), "rejecting-1".to_string())),
        "rejected records keep a device: {states:?}"
    );
    let (_, metrics) = telemetry_testkit::http_get(metrics_address, "/metrics")
        .await
        .unwrap();
    let alert = [("service", "alert")];
    for forgotten in [DEVICES_FORGOTTEN, STATES_FORGOTTEN] {
        assert!(
            forgotten
                .total_in(&metrics, &alert)
                .is_some_and(|count| count >= 1.0),
            "{} in {metrics}",
            forgotten.name
        );
    }
    for held in [DEVICES_TRACKED, STATES_HELD] {
        assert!(
            held.total_in(&metrics, &alert).is_some(),
            "{} in {metrics}",
            held.name
        );
    }
    active.cancel();
    traffic.await.unwrap();
    alerter.stop().await;
}
