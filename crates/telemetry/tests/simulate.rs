//! `telemetry simulate` feeding the real pipeline: simulated devices publish over Mosquitto, the
//! bridge and the audit service run in-process against Kafka and MariaDB, and every valid reading
//! is one row, every duplicate absorbed, every malformed or clock-skewed message in the DLQ.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use common::{audit_config, bridge_config, kafka_config};
use telemetry_bridge::Bridge;
use telemetry_simulator::SimulateConfig;
use telemetry_testkit::{database_url, eventually, http_get, mqtt_url, read_topic, unique};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_devices_feed_the_pipeline_and_their_faults_land_in_the_dlq() {
    let id = unique("simulate");
    let kafka = kafka_config(&id);
    let shutdown = CancellationToken::new();
    let bridge = Bridge::bind(bridge_config(&id, &kafka)).await.unwrap();
    let address = bridge.local_addr().unwrap();
    let bridge_task = tokio::spawn(bridge.run(shutdown.clone()));
    let audit_task = tokio::spawn(telemetry_audit::run(
        audit_config(&id, &format!("{id}-audit"), &kafka),
        shutdown.clone(),
    ));
    assert!(
        eventually(Duration::from_secs(60), || async {
            matches!(http_get(address, "/readyz").await, Ok((200, _)))
        })
        .await,
        "the bridge did not become ready"
    );

    let summary = telemetry_simulator::run(
        SimulateConfig {
            mqtt: telemetry_bridge::MqttConnectionConfig::new(mqtt_url()),
            topic_prefix: format!("{id}/devices"),
            devices: 20,
            rate: 400.0,
            duration_seconds: Some(2.5),
            malformed: 0.05,
            duplicates: 0.05,
            clock_skew: 0.02,
            silent: 0.0,
            seed: Some(11),
            client_id: format!("{id}-simulator"),
        },
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(summary.acknowledged, summary.sent(), "{summary}");
    assert!(
        summary.valid > 500 && summary.malformed > 0 && summary.duplicates > 0,
        "{summary}"
    );

    let pool = sqlx::MySqlPool::connect_lazy(&database_url(&id)).unwrap();
    let valid = i64::try_from(summary.valid).unwrap();
    let stored = eventually(Duration::from_secs(60), || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM telemetry")
            .fetch_one(&pool)
            .await
            .is_ok_and(|rows| rows >= valid)
    })
    .await;
    assert!(stored, "rows did not reach {valid}");
    let rejected = usize::try_from(summary.malformed + summary.skewed).unwrap();
    let dead = read_topic(
        &kafka.dlq_topic,
        rejected,
        Duration::from_secs(30),
        Duration::from_secs(2),
    )
    .await;
    shutdown.cancel();
    bridge_task.await.unwrap().unwrap();
    audit_task.await.unwrap().unwrap();

    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM telemetry")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        rows, valid,
        "one row per valid reading, duplicates absorbed ({summary})"
    );
    assert_eq!(
        dead.len(),
        rejected,
        "every malformed and skewed message in the DLQ ({summary})"
    );
    let devices: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM devices")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(devices, 20);
}
