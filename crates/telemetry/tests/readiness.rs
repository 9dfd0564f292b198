//! Every service with its database (or, for the bridge, its MQTT broker) unreachable: the process
//! is up (`/healthz` 200) but not ready (`/readyz` 503, naming the dependency), so an orchestrator
//! or `start-services.sh` sees it; and it still stops cleanly on the signal.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use common::{audit_config, bridge_config, kafka_config};
use telemetry_testkit::{eventually, free_port, http_get, unique};
use tokio_util::sync::CancellationToken;

/// Nothing listens on the discard port: connections are refused at once.
const DEAD_MYSQL: &str = "mysql://telemetry:telemetry@127.0.0.1:9/telemetry";

/// Starts `run`, checks it is up and not ready, and returns its task (to be stopped later).
async fn up_but_not_ready<F, E>(
    name: &str,
    address: SocketAddr,
    dependency: &str,
    run: F,
) -> tokio::task::JoinHandle<Result<(), String>>
where
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Debug + Send + 'static,
{
    let task = tokio::spawn(async move { run.await.map_err(|error| format!("{error:?}")) });
    let up = eventually(Duration::from_secs(20), || async {
        matches!(http_get(address, "/healthz").await, Ok((200, _)))
    })
    .await;
    assert!(up, "{name}: /healthz answers 200");
    let (status, body) = http_get(address, "/readyz").await.unwrap();
    assert_eq!(
        status, 503,
        "{name}: /readyz with {dependency} down: {body}"
    );
    assert!(
        body.contains(dependency),
        "{name}: /readyz names {dependency}: {body}"
    );
    // Still not ready a moment later: it keeps retrying, it does not pretend.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, _) = http_get(address, "/readyz").await.unwrap();
    assert_eq!(status, 503, "{name}");
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_is_up_but_not_ready_while_its_dependency_is_down() {
    let id = unique("readiness");
    let kafka = kafka_config(&id);
    let shutdown = CancellationToken::new();
    let address = |port: u16| -> SocketAddr { format!("127.0.0.1:{port}").parse().unwrap() };

    let mut tasks = Vec::new();
    let mut audit = audit_config(&id, &format!("{id}-audit"), &kafka);
    audit.database.mysql_url = DEAD_MYSQL.into();
    let audit_address = address(free_port());
    audit.listen = audit_address.to_string();
    tasks.push(
        up_but_not_ready(
            "audit",
            audit_address,
            "database",
            telemetry_audit::run(audit, shutdown.clone()),
        )
        .await,
    );

    let rollup_address = address(free_port());
    tasks.push(
        up_but_not_ready(
            "rollup",
            rollup_address,
            "database",
            telemetry_rollup::run(
                telemetry_rollup::RollupConfig {
                    database: telemetry_store::DatabaseConfig {
                        mysql_url: DEAD_MYSQL.into(),
                        mysql_owner_url: None,
                        mysql_max_connections: Some(1),
                    },
                    group_id: format!("{id}-rollup"),
                    batch_size: 100,
                    batch_linger_ms: 20,
                    late_window_seconds: 600,
                    listen: rollup_address.to_string(),
                    http: Default::default(),
                    kafka: kafka.clone(),
                },
                shutdown.clone(),
            ),
        )
        .await,
    );

    let rules = std::env::temp_dir().join(format!("{id}-alerts.toml"));
    std::fs::write(&rules, "[[rules]]\nname = \"quiet\"\nsilent_for = \"5m\"\n").unwrap();
    let alert_address = address(free_port());
    tasks.push(
        up_but_not_ready(
            "alert",
            alert_address,
            "database",
            telemetry_alert::run(
                telemetry_alert::AlertConfig {
                    rules,
                    database: telemetry_store::DatabaseConfig {
                        mysql_url: DEAD_MYSQL.into(),
                        mysql_owner_url: None,
                        mysql_max_connections: Some(1),
                    },
                    group_id: format!("{id}-alert"),
                    alerts_topic: format!("{id}.alerts"),
                    tick_ms: 200,
                    forget_after_seconds: 604_800,
                    batch_size: 100,
                    listen: alert_address.to_string(),
                    http: Default::default(),
                    kafka: kafka.clone(),
                },
                shutdown.clone(),
            ),
        )
        .await,
    );

    let api_address = address(free_port());
    tasks.push(
        up_but_not_ready(
            "api",
            api_address,
            "database",
            telemetry_api::run(
                telemetry_api::ApiConfig {
                    mysql_url: Some(DEAD_MYSQL.into()),
                    mysql_max_connections: 1,
                    statement_timeout_ms: 5_000,
                    dlq_payload_bytes: 4_096,
                    listen: api_address.to_string(),
                    live_url: None,
                    stale_after_seconds: 300,
                    failing_dlq_ratio: 0.5,
                    failing_min_rejections: 3,
                    auth: Default::default(),
                    http: Default::default(),
                    tls: Default::default(),
                },
                shutdown.clone(),
            ),
        )
        .await,
    );

    let mut bridge = bridge_config(&id, &kafka);
    bridge.mqtt.mqtt_url = "mqtt://127.0.0.1:9".into();
    let bridge_address = address(free_port());
    bridge.listen = bridge_address.to_string();
    tasks.push(
        up_but_not_ready(
            "bridge",
            bridge_address,
            "mqtt_subscribed",
            telemetry_bridge::run(bridge, shutdown.clone()),
        )
        .await,
    );

    // Each stops on the signal, although its dependency never came.
    shutdown.cancel();
    for task in tasks {
        let stopped = tokio::time::timeout(Duration::from_secs(30), task).await;
        assert!(
            matches!(stopped, Ok(Ok(Ok(())))),
            "stopped cleanly: {stopped:?}"
        );
    }
}
