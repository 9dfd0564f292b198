//! The HTTP listener's limits against the real services: the audit service, consuming its own
//! Kafka topics into its own MariaDB database, with a cap of 4 connections and a 3 s header-read
//! timeout. Four half-open requests (a request line, no headers) take every slot; a fifth
//! connection is answered 503 and closed; the service keeps consuming and writing meanwhile; the
//! half-open requests are closed after the timeout, and `/readyz` answers 200 again.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use telemetry_audit::AuditConfig;
use telemetry_core::names::headers;
use telemetry_ops::instruments::{
    HTTP_CONNECTIONS, HTTP_CONNECTIONS_REFUSED, HTTP_CONNECTIONS_TIMED_OUT,
};
use telemetry_testkit::{
    database_url, eventually, free_port, http_get, http_get_with, kafka_brokers, produce, unique,
    TestRecord,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const CAP: usize = 4;
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(3);

/// The audit service's settings as an operator gives them: flags (over the environment).
fn audit_config(id: &str, listen: SocketAddr) -> AuditConfig {
    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        audit: AuditConfig,
    }
    let flags = [
        ("--mysql-url", database_url(id)),
        ("--group-id", format!("{id}-audit")),
        ("--audit-listen", listen.to_string()),
        ("--batch-linger-ms", "20".into()),
        ("--kafka-brokers", kafka_brokers()),
        ("--raw-topic", format!("{id}.raw")),
        ("--cleaned-topic", format!("{id}.cleaned")),
        ("--dlq-topic", format!("{id}.dlq")),
        ("--topic-replication-factor", "1".into()),
        ("--http-max-connections", CAP.to_string()),
        (
            "--http-header-read-timeout-ms",
            HEADER_READ_TIMEOUT.as_millis().to_string(),
        ),
        ("--http-idle-timeout-ms", "5000".into()),
    ];
    let argv = std::iter::once(String::from("test")).chain(
        flags
            .into_iter()
            .flat_map(|(flag, value)| [flag.into(), value]),
    );
    Flags::try_parse_from(argv).unwrap().audit
}

/// A valid event of `device` as the bridge produces it (key: the topic's device).
fn event(device: &str, seq: i64) -> TestRecord {
    let now = chrono::Utc::now().timestamp_millis();
    TestRecord {
        key: Some(device.as_bytes().to_vec()),
        payload: json!({"device_id": device, "device_ts": (now / 1000 - 60) * 1000, "seq": seq,
                        "temperature": 21.5})
        .to_string()
        .into_bytes(),
        headers: vec![(
            headers::RECEIVED_AT.to_string(),
            now.to_string().into_bytes(),
        )],
    }
}

fn audit_metric(metric: &telemetry_metrics::Metric) -> f64 {
    let text = telemetry_ops::install_metrics().render();
    metric
        .total_in(&text, &[("service", "audit")])
        .unwrap_or(0.0)
}

async fn rows(pool: &sqlx::MySqlPool) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM telemetry")
        .fetch_one(pool)
        .await
        .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_requests_are_closed_and_connections_past_the_cap_refused_while_the_service_works(
) {
    let id = unique("http_limits");
    let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = audit_config(&id, address);
    let raw_topic = config.kafka.raw_topic.clone();
    let shutdown = CancellationToken::new();
    let audit = tokio::spawn(telemetry_audit::run(config, shutdown.clone()));
    let pool = sqlx::MySqlPool::connect_lazy(&database_url(&id)).unwrap();

    let ready = || async { matches!(http_get(address, "/readyz").await, Ok((200, _))) };
    assert!(eventually(Duration::from_secs(60), ready).await, "ready");
    produce(&raw_topic, &[event("pico-1", 1)]).await;
    let written = eventually(Duration::from_secs(60), || async { rows(&pool).await == 1 }).await;
    assert!(written, "the first event was written");
    // The readiness checks' connections are closed: every slot is free.
    let free = eventually(Duration::from_secs(5), || async {
        audit_metric(&HTTP_CONNECTIONS) == 0.0
    })
    .await;
    assert!(free, "no connection left open");

    // Every slot taken by a request that never finishes its headers.
    let attacked = Instant::now();
    let mut half_open = Vec::new();
    for _ in 0..CAP {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.write_all(b"GET /readyz HTTP/1.1\r\n").await.unwrap();
        half_open.push(stream);
    }
    let taken = eventually(Duration::from_secs(2), || async {
        audit_metric(&HTTP_CONNECTIONS) == CAP as f64
    })
    .await;
    assert!(taken, "the half-open requests hold every slot");

    let (status, head, body) = http_get_with(address, "/readyz", &[]).await.unwrap();
    assert_eq!(status, 503, "a connection past the cap is refused: {head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert_eq!(body, "too many connections\n");
    assert!(audit_metric(&HTTP_CONNECTIONS_REFUSED) >= 1.0);

    // Meanwhile the service consumes from Kafka and writes to the database.
    produce(&raw_topic, &[event("pico-1", 2)]).await;
    let written = eventually(Duration::from_secs(30), || async { rows(&pool).await == 2 }).await;
    assert!(written, "an event sent during the attack was written");

    // The half-open requests are closed after the header-read timeout, not before.
    for mut stream in half_open {
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
            .await
            .expect("a half-open request was closed");
        assert!(
            closed.is_err() || rest.is_empty(),
            "closed without an answer"
        );
    }
    let elapsed = attacked.elapsed();
    assert!(
        elapsed >= HEADER_READ_TIMEOUT - Duration::from_millis(100),
        "{elapsed:?}"
    );
    assert!(
        elapsed < HEADER_READ_TIMEOUT + Duration::from_secs(8),
        "{elapsed:?}"
    );
    assert!(audit_metric(&HTTP_CONNECTIONS_TIMED_OUT) >= CAP as f64);

    // Ready again, on the connections it kept.
    assert!(
        eventually(Duration::from_secs(5), ready).await,
        "ready again"
    );
    produce(&raw_topic, &[event("pico-1", 3)]).await;
    let written = eventually(Duration::from_secs(30), || async { rows(&pool).await == 3 }).await;
    assert!(written, "an event sent after the attack was written");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), audit)
        .await
        .expect("the audit service stopped within 30 s")
        .unwrap()
        .unwrap();
}
