//! `start-services.sh` and `stop-services.sh` as an operator runs them: every service comes up
//! under PM2 and answers `/readyz`, an event published over MQTT reaches the table through them,
//! and the stop script stops each one gracefully (its "stopped" line in its log, its port closed,
//! PM2's list empty). The test runs its own PM2 daemon (`PM2_HOME`), topics, groups, database and
//! ports, and the debug binary cargo built for it (`TELEMETRY_BINARY`), so it neither builds the
//! release binary nor touches a pipeline already running on the machine.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use telemetry_testkit::{
    database_url, eventually, free_port, http_get, kafka_brokers, mqtt_url, publish_qos1, unique,
};

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Kills the test's PM2 daemon (and with it any app still running), then removes its files,
/// however the test ends.
struct Pm2Daemon {
    directory: PathBuf,
    home: PathBuf,
}

impl Drop for Pm2Daemon {
    fn drop(&mut self) {
        let _ = Command::new("pm2")
            .arg("kill")
            .env("PM2_HOME", &self.home)
            .output();
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

/// (app, address) of every service.
const SERVICES: [(&str, &str); 5] = [
    ("telemetry-bridge", "TELEMETRY_BRIDGE_LISTEN"),
    ("telemetry-audit", "TELEMETRY_AUDIT_LISTEN"),
    ("telemetry-api", "TELEMETRY_API_LISTEN"),
    ("telemetry-rollup", "TELEMETRY_ROLLUP_LISTEN"),
    ("telemetry-alert", "TELEMETRY_ALERT_LISTEN"),
];

fn script(name: &str, env: &[(String, String)], pm2_home: &Path) -> (bool, String) {
    let mut command = Command::new("bash");
    command
        .arg(repository().join(name))
        .current_dir(repository());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TELEMETRY_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().map(|(key, value)| (key, value)));
    command.env("PM2_HOME", pm2_home);
    let output = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scripts_start_every_service_healthy_and_stop_them_gracefully() {
    let id = unique("pm2");
    let directory = std::env::temp_dir().join(&id);
    let pm2_home = directory.join("pm2");
    let logs = directory.join("logs");
    std::fs::create_dir_all(&pm2_home).unwrap();
    let _daemon = Pm2Daemon {
        directory: directory.clone(),
        home: pm2_home.clone(),
    };
    let mut env: Vec<(String, String)> = vec![
        (
            "TELEMETRY_BINARY".into(),
            env!("CARGO_BIN_EXE_telemetry").into(),
        ),
        ("TELEMETRY_LOG_DIR".into(), logs.display().to_string()),
        ("TELEMETRY_KAFKA_BROKERS".into(), kafka_brokers()),
        ("TELEMETRY_MQTT_URL".into(), mqtt_url()),
        (
            "TELEMETRY_MQTT_TOPIC".into(),
            format!("{id}/devices/+/telemetry"),
        ),
        ("TELEMETRY_MQTT_CLIENT_ID".into(), format!("{id}-bridge")),
        ("TELEMETRY_BRIDGE_ID".into(), format!("{id}-bridge")),
        ("TELEMETRY_RAW_TOPIC".into(), format!("{id}.raw")),
        ("TELEMETRY_CLEANED_TOPIC".into(), format!("{id}.cleaned")),
        ("TELEMETRY_DLQ_TOPIC".into(), format!("{id}.dlq")),
        ("TELEMETRY_ALERTS_TOPIC".into(), format!("{id}.alerts")),
        ("TELEMETRY_AUDIT_GROUP".into(), format!("{id}-audit")),
        ("TELEMETRY_ROLLUP_GROUP".into(), format!("{id}-rollup")),
        ("TELEMETRY_ALERT_GROUP".into(), format!("{id}-alert")),
        ("TELEMETRY_MYSQL_URL".into(), database_url(&id)),
        ("TELEMETRY_MYSQL_OWNER_URL".into(), database_url(&id)),
    ];
    let mut addresses = Vec::new();
    for (app, variable) in SERVICES {
        let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        env.push((variable.to_string(), address.to_string()));
        addresses.push((app, address));
    }

    let (started, output) = script("start-services.sh", &env, &pm2_home);
    assert!(started, "start-services.sh failed:\n{output}");
    for (app, address) in &addresses {
        let ready = eventually(Duration::from_secs(60), || async {
            matches!(http_get(*address, "/readyz").await, Ok((200, _)))
        })
        .await;
        assert!(ready, "{app} is not ready on {address}:\n{output}");
    }

    // Through the services PM2 runs: MQTT → bridge → Kafka → audit → table.
    let payload = format!(
        r#"{{"device_id":"pm2-dev","device_ts":{},"temp":21.5}}"#,
        chrono::Utc::now().timestamp_millis()
    );
    publish_qos1(
        &format!("{id}-device"),
        &[(
            format!("{id}/devices/pm2-dev/telemetry"),
            payload.into_bytes(),
        )],
    )
    .await;
    let pool = sqlx::MySqlPool::connect_lazy(&database_url(&id)).unwrap();
    let stored = eventually(Duration::from_secs(60), || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM telemetry WHERE device_id = 'pm2-dev'")
            .fetch_one(&pool)
            .await
            .is_ok_and(|rows| rows == 1)
    })
    .await;
    assert!(stored, "the event reached the table");

    let (stopped, output) = script("stop-services.sh", &env, &pm2_home);
    assert!(stopped, "stop-services.sh failed:\n{output}");
    for (app, address) in &addresses {
        assert!(
            tokio::net::TcpStream::connect(address).await.is_err(),
            "{app} still listens on {address}"
        );
        assert!(
            output.contains(&format!("stopped and removed {app}")),
            "{output}"
        );
    }
    let listed = Command::new("pm2")
        .arg("jlist")
        .env("PM2_HOME", &pm2_home)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.trim_end().ends_with("[]"),
        "PM2 still lists apps: {listed}"
    );
    for (app, stopped_line) in [
        ("telemetry-bridge", "Bridge stopped."),
        ("telemetry-audit", "Audit service stopped."),
        ("telemetry-api", "API stopped."),
        ("telemetry-rollup", "Rollup service stopped."),
        ("telemetry-alert", "Alerter stopped."),
    ] {
        // The PM2 daemon copies an app's output to its log file on its own time: the last lines
        // may land a moment after `pm2 stop` returned (seen once in CI, 2026-12-07).
        let path = logs.join(format!("{app}.error.log"));
        let read = || std::fs::read_to_string(&path).unwrap_or_default();
        eventually(Duration::from_secs(5), || async {
            read().contains(stopped_line)
        })
        .await;
        let log = read();
        assert!(
            log.contains(stopped_line),
            "{app} did not stop gracefully; its log:\n{log}"
        );
        assert!(!log.contains("panicked"), "{app} panicked; its log:\n{log}");
        assert!(
            !log.contains('\u{1b}'),
            "{app}'s log file has terminal colour codes"
        );
    }
}
