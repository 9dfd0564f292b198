//! The dashboard end to end, in a real browser: the bridge, the audit service and the API run
//! in-process against the real Mosquitto, Kafka and MariaDB; a device publishes over MQTT; headless
//! Chromium (Debian's, driven by playwright-core from `tests/browser/dashboard.mjs`) loads the
//! dashboard and checks that the device appears, the live chart receives points, the history
//! chart has data, a malformed event shows in the DLQ panel and the alert the rejections raise
//! (the alerter runs too) in the alerts panel, after signing in with a bearer token (auth is on
//! for the API and the live view); 120 other devices come first in id order, so the device is on
//! the second page of `/api/devices`, which the page loads with its "More devices" control; then
//! the bridge is stopped and
//! started again, and the page must show the live view disconnected and reconnect by itself. `scripts/test.sh` installs
//! Chromium and the script's npm packages.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

use common::{audit_config, bridge_config, kafka_config};
use telemetry_api::{Api, ApiConfig};
use telemetry_bridge::Bridge;
use telemetry_testkit::{database_url, http_get, mqtt_url, publish_qos1_to, unique};
use tokio_util::sync::CancellationToken;

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// One accepted event, two hours old, from each of `count` devices `pico--filler-NNN`.
fn filler_devices(count: u32) -> Vec<telemetry_core::event::CleanedRecord> {
    let validator = telemetry_core::Validator::new(telemetry_core::Contract::default()).unwrap();
    let at = chrono::Utc::now().timestamp_millis() - 2 * 3_600_000;
    (0..count)
        .map(|index| {
            let payload = format!(
                r#"{{"device_id":"pico--filler-{index:03}","device_ts":{at},"temperature_c":20.5}}"#
            );
            let telemetry_core::Outcome::Accepted(event) =
                validator.validate(payload.as_bytes(), at)
            else {
                panic!("{payload} is valid");
            };
            telemetry_core::event::CleanedRecord {
                event,
                source: telemetry_core::SourcePosition {
                    topic: "filler".into(),
                    partition: 0,
                    offset: i64::from(index),
                },
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_devices_live_data_history_and_rejections() {
    let script = repository().join("tests/browser/dashboard.mjs");
    assert!(
        repository().join("tests/browser/node_modules/playwright-core").is_dir(),
        "tests/browser has no node_modules: run scripts/test.sh (it runs `npm ci --prefix tests/browser`)"
    );

    let id = unique("dashboard");
    let kafka = kafka_config(&id);
    let shutdown = CancellationToken::new();
    // Auth on, as a deployment reachable by others runs it: the page must ask for a token, and
    // this one may read the test's devices (`pico-*`) only.
    let token = format!("tp_{id}");
    let tokens = std::env::temp_dir().join(format!("{id}-tokens.toml"));
    std::fs::write(
        &tokens,
        format!(
            "[[token]]\nname = \"dashboard\"\nsha256 = \"{}\"\ndevices = [\"pico-*\"]\n",
            telemetry_auth::token_digest(&token)
        ),
    )
    .unwrap();
    let auth = telemetry_auth::AuthConfig {
        auth_tokens: Some(tokens.clone()),
        allow_unauthenticated: false,
    };
    // The dashboard's page comes from the API: its origin is the one the live view allows.
    let api_port = telemetry_testkit::free_port();
    let dashboard_origin = format!("http://127.0.0.1:{api_port}");
    let mut first_bridge = bridge_config(&id, &kafka);
    first_bridge.auth = auth.clone();
    first_bridge.ws_allowed_origins = vec![dashboard_origin.clone()];
    let bridge = Bridge::bind(first_bridge).await.unwrap();
    let bridge_address = bridge.local_addr().unwrap();
    let bridge_stop = shutdown.child_token();
    let bridge_task = tokio::spawn(bridge.run(bridge_stop.clone()));
    let audit_task = tokio::spawn(telemetry_audit::run(
        audit_config(&id, &format!("{id}-audit"), &kafka),
        shutdown.clone(),
    ));
    let api = Api::bind(ApiConfig {
        mysql_url: Some(telemetry_testkit::database_url_as(
            "telemetry_test_reader",
            &id,
        )),
        mysql_max_connections: 2,
        statement_timeout_ms: 5_000,
        dlq_payload_bytes: 4_096,
        listen: format!("127.0.0.1:{api_port}"),
        live_url: Some(format!("ws://{bridge_address}/ws")),
        stale_after_seconds: 300,
        failing_dlq_ratio: 0.5,
        failing_min_rejections: 3,
        auth: auth.clone(),
        http: Default::default(),
        tls: Default::default(),
    })
    .await
    .unwrap();
    let api_address = api.local_addr().unwrap();
    let api_task = tokio::spawn(api.run(shutdown.clone()));
    // 120 devices whose ids sort before the test's device (`pico--` < `pico-0`): the API lists
    // 100 per page, so the page must follow the cursor to show it. Written once the audit service
    // has made the tables (two migrating at once would trip over each other).
    let store = telemetry_store::Store::connect(&database_url(&id), 1)
        .await
        .unwrap();
    let fillers = filler_devices(120);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Err(error) = store.insert_events(&fillers).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the audit service made no tables: {error}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(store);
    // The alerter, with one rule the malformed payloads below break.
    let rules = std::env::temp_dir().join(format!("{id}-alerts.toml"));
    std::fs::write(
        &rules,
        "[[rules]]\nname = \"rejections\"\ndlq_above = 2\nwindow = \"1m\"\nseverity = \"critical\"\n",
    )
    .unwrap();
    let alert_task = tokio::spawn(telemetry_alert::run(
        telemetry_alert::AlertConfig {
            rules,
            database: telemetry_store::DatabaseConfig {
                mysql_url: database_url(&id),
                mysql_owner_url: None,
                mysql_max_connections: Some(2),
            },
            group_id: format!("{id}-alert"),
            alerts_topic: format!("{id}.alerts"),
            tick_ms: 500,
            forget_after_seconds: 604_800,
            batch_size: 100,
            listen: format!("127.0.0.1:{}", telemetry_testkit::free_port()),
            http: Default::default(),
            kafka: kafka.clone(),
        },
        shutdown.clone(),
    ));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !matches!(http_get(bridge_address, "/readyz").await, Ok((200, _))) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bridge did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A device publishing a reading every 250 ms, with aliases and a unit the contract converts
    // (`temp`, `battery_mv`), and a malformed payload every 2 s.
    let device = format!("pico-{}", &id[id.len() - 6..]);
    let topic = format!("{id}/devices/{device}/telemetry");
    let publisher = tokio::spawn({
        let (shutdown, topic, device, id) =
            (shutdown.clone(), topic.clone(), device.clone(), id.clone());
        async move {
            let acknowledged = AtomicUsize::new(0);
            let mut seq = 0u64;
            while !shutdown.is_cancelled() {
                let now = chrono::Utc::now().timestamp_millis();
                #[allow(clippy::cast_precision_loss)]
                let temperature = 21.0 + (seq % 40) as f64 / 10.0;
                let mut messages = vec![(
                    topic.clone(),
                    format!(
                        r#"{{"device_id":"{device}","device_ts":{now},"seq":{seq},"temp":{temperature},"battery_mv":{}}}"#,
                        3_900 - seq % 300
                    )
                    .into_bytes(),
                )];
                if seq.is_multiple_of(8) {
                    messages.push((topic.clone(), b"temperature=21.5;oops".to_vec()));
                }
                publish_qos1_to(
                    &mqtt_url(),
                    &format!("{id}-device"),
                    &messages,
                    None,
                    &acknowledged,
                )
                .await;
                seq += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    });

    let screenshot = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| repository().join("target"), PathBuf::from)
        .join("screenshots/dashboard.png");
    let mut browser = tokio::process::Command::new("node")
        .arg(&script)
        .args(["--url", &format!("http://{api_address}/")])
        .args(["--device", &device])
        .arg("--screenshot")
        .arg(&screenshot)
        .args(["--timeout-seconds", "150", "--expect-reconnect"])
        .args(["--expect-alert", "rejections"])
        .args(["--token", &token])
        .arg("--expect-more-devices")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs (Node.js is installed)");
    let stderr = tokio::spawn({
        let mut stderr = browser.stderr.take().unwrap();
        async move {
            let mut text = String::new();
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await;
            text
        }
    });
    // Follow the script's steps: once the screenshot is taken, stop the bridge; once the page
    // shows the live view disconnected, start a bridge again on the same address.
    let mut lines = tokio::io::BufReader::new(browser.stdout.take().unwrap()).lines();
    let mut stdout = String::new();
    let mut second_bridge = None;
    while let Ok(Some(line)) = lines.next_line().await {
        println!("{line}");
        stdout.push_str(&line);
        stdout.push('\n');
        if line.starts_with("ok screenshot:") {
            bridge_stop.cancel();
        } else if line.starts_with("ok e1:") {
            let mut config = bridge_config(&id, &kafka);
            config.listen = bridge_address.to_string();
            config.auth = auth.clone();
            config.ws_allowed_origins = vec![dashboard_origin.clone()];
            let bridge = Bridge::bind(config).await.unwrap();
            second_bridge = Some(tokio::spawn(bridge.run(shutdown.clone())));
        }
    }
    let status = browser.wait().await.unwrap();
    let stderr = stderr.await.unwrap();
    println!("{stderr}");
    println!("screenshot: {}", screenshot.display());

    shutdown.cancel();
    publisher.await.unwrap();
    bridge_task.await.unwrap().unwrap();
    if let Some(second_bridge) = second_bridge {
        second_bridge.await.unwrap().unwrap();
    }
    audit_task.await.unwrap().unwrap();
    api_task.await.unwrap().unwrap();
    alert_task.await.unwrap().unwrap();
    assert!(
        status.success(),
        "the browser check failed:\n{stdout}{stderr}"
    );
    std::fs::remove_file(tokens).ok();
    for step in [
        "ok s:", "ok a:", "ok b:", "ok c:", "ok d:", "ok e1:", "ok e2:",
    ] {
        assert!(stdout.contains(step), "step {step} did not pass:\n{stdout}");
    }
}
