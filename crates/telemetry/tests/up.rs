//! `telemetry up` as a newcomer runs it: one process, embedded MQTT and Kafka-protocol brokers and
//! the SQLite store, on free ports and a data directory of the test's own. Simulated and published
//! events reach the SQLite table and the dashboard's API, malformed ones the DLQ; Ctrl-C (SIGINT)
//! exits 0 within seconds; a second `up` over the same data directory resumes where the first
//! stopped, without reading the log again or duplicating rows.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use telemetry_testkit::{eventually, http_get};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A base with its seven ports free.
fn free_base() -> u16 {
    loop {
        let base = telemetry_testkit::free_port();
        let free = (0..7).all(|offset| {
            base.checked_add(offset)
                .is_some_and(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        });
        if free {
            return base;
        }
    }
}

fn up(base: u16, data_dir: &Path, simulate: u32) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_telemetry"));
    command
        .args([
            "up",
            "--port-base",
            &base.to_string(),
            "--simulate",
            &simulate.to_string(),
        ])
        .args([
            "--simulate-rate",
            "20",
            "--status-every-seconds",
            "1",
            "--data-dir",
        ])
        .arg(data_dir)
        // The separate services' settings must not leak in from the test environment.
        .env_remove("TELEMETRY_MYSQL_URL")
        .env_remove("TELEMETRY_KAFKA_BROKERS")
        .env_remove("TELEMETRY_MQTT_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    command
}

/// Starts `up` and waits for its dashboard line; the rest of its output is kept reading.
async fn start(base: u16, data_dir: &Path, simulate: u32) -> Child {
    start_command(up(base, data_dir, simulate), base).await.0
}

/// Starts `command` (an `up`) and waits for its dashboard line; returns the lines before it too.
async fn start_command(mut command: Command, base: u16) -> (Child, Vec<String>) {
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let dashboard = format!("Dashboard: http://127.0.0.1:{}/", base + 2);
    let mut before = Vec::new();
    let started = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line == dashboard {
                return true;
            }
            before.push(line);
        }
        false
    })
    .await;
    assert!(
        matches!(started, Ok(true)),
        "`up` printed its dashboard URL"
    );
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, before)
}

/// Runs `command` (an `up` that ends by itself) to its end, at most `limit`; its output.
async fn run_to_end(mut command: Command, limit: Duration) -> std::process::Output {
    tokio::time::timeout(limit, command.output())
        .await
        .unwrap_or_else(|_| panic!("`up` ends by itself within {limit:?}"))
        .unwrap()
}

/// SIGINT, as Ctrl-C sends; `up` must exit 0 within 30 s.
async fn interrupt(mut child: Child) {
    let pid = child.id().unwrap().to_string();
    Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("`up` exits within 30 s of Ctrl-C")
        .unwrap();
    assert!(status.success(), "`up` exits 0 on Ctrl-C: {status}");
}

async fn get(base: u16, port_offset: u16, path: &str) -> Option<serde_json::Value> {
    let address = SocketAddr::from(([127, 0, 0, 1], base + port_offset));
    match http_get(address, path).await {
        Ok((200, body)) => serde_json::from_str(&body).ok(),
        _ => None,
    }
}

async fn rows(data_dir: &Path) -> u64 {
    let url = format!("sqlite://{}", data_dir.join("telemetry.db").display());
    let store = telemetry_store::open_reader(&url, 1).await.unwrap();
    store.count_events().await.unwrap()
}

/// The audit service's count of raw records it read, from its `/metrics`.
async fn audit_received(base: u16) -> f64 {
    let address = SocketAddr::from(([127, 0, 0, 1], base + 4));
    let (_, text) = http_get(address, "/metrics").await.unwrap();
    telemetry_metrics::EVENTS_RECEIVED
        .total_in(&text, &[("service", "audit")])
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn up_runs_the_pipeline_stops_on_ctrl_c_and_resumes_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let base = free_base();
    let child = start(base, &data_dir, 5).await;

    // Simulated devices reach the dashboard's API and the SQLite table.
    let devices = eventually(Duration::from_secs(90), || async {
        get(base, 2, "/api/devices")
            .await
            .and_then(|body| body["devices"].as_array().map(Vec::len))
            .is_some_and(|count| count >= 5)
    })
    .await;
    assert!(devices, "the five simulated devices are listed by the API");
    assert!(
        data_dir.join("alerts.toml").is_file(),
        "with no rules file given, the alerter's rules are written to the data directory"
    );
    // A second `up` over the same data directory is refused while this one runs.
    let second = up(free_base(), &data_dir, 0)
        .stderr(Stdio::piped())
        .output();
    let second = tokio::time::timeout(Duration::from_secs(60), second)
        .await
        .expect("a refused `up` exits at once")
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("another `telemetry up`"), "{stderr}");
    // A malformed payload, as a device with a firmware bug sends, lands in the DLQ.
    let mqtt_url = format!("mqtt://127.0.0.1:{base}");
    telemetry_testkit::publish_qos1_to(
        &mqtt_url,
        "up-test-broken",
        &[("devices/broken-1/telemetry".into(), b"{not json".to_vec())],
        None,
        &AtomicUsize::new(0),
    )
    .await;
    let in_dlq = eventually(Duration::from_secs(60), || async {
        get(base, 2, "/api/dlq?device=broken-1")
            .await
            .is_some_and(|body| body.to_string().contains("broken-1"))
    })
    .await;
    assert!(in_dlq, "the malformed payload is listed in the DLQ view");
    // The history of a simulated device's metric, as the dashboard's chart reads it.
    let body = get(base, 2, "/api/devices").await.unwrap();
    let device = body["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|device| {
            device["metrics"]
                .as_array()
                .is_some_and(|metrics| !metrics.is_empty())
        })
        .expect("a simulated device with metrics")
        .clone();
    let (id, metric) = (
        device["device_id"].as_str().unwrap(),
        device["metrics"][0].as_str().unwrap(),
    );
    let series = get(
        base,
        2,
        &format!("/api/devices/{id}/telemetry?metric={metric}&max_points=100"),
    )
    .await
    .expect("the history endpoint answers from SQLite");
    assert!(
        series.to_string().contains("\"count\""),
        "the history has readings: {series}"
    );
    interrupt(child).await;
    let first_rows = rows(&data_dir).await;
    assert!(first_rows > 0, "simulated events are rows in SQLite");

    // Again over the same data directory, without simulated devices: three known events.
    let child = start(base, &data_dir, 0).await;
    let now = chrono::Utc::now().timestamp();
    let events: Vec<(String, Vec<u8>)> = (1..=3)
        .map(|seq| {
            (
                String::from("devices/resume-1/telemetry"),
                format!(
                    r#"{{"device_id":"resume-1","device_ts":{now},"seq":{seq},"temperature_c":21.5}}"#
                )
                .into_bytes(),
            )
        })
        .collect();
    telemetry_testkit::publish_qos1_to(
        &mqtt_url,
        "up-test-resume",
        &events,
        None,
        &AtomicUsize::new(0),
    )
    .await;
    let arrived = eventually(Duration::from_secs(60), || async {
        rows(&data_dir).await >= first_rows + 3
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(arrived, "the three new events arrive");
    assert_eq!(
        rows(&data_dir).await,
        first_rows + 3,
        "exactly the three new events were added"
    );
    assert_eq!(
        audit_received(base).await,
        3.0,
        "the audit service resumed at its committed offsets: it read only the new records"
    );
    interrupt(child).await;
    assert_eq!(rows(&data_dir).await, first_rows + 3);
}

/// A device publishing one QoS 1 message at a time (the next after the broker's PUBACK) until
/// `stop`, on a fresh connection after every failure; returns the seqs acknowledged.
async fn steady_device(
    base: u16,
    device: &'static str,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<u64> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut acknowledged = Vec::new();
    let mut seq = 0_u64;
    while !stop.is_cancelled() {
        let mut options = MqttOptions::new(format!("{device}-client"), "127.0.0.1", base);
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(options, 10);
        'connection: loop {
            seq += 1;
            let payload = format!(
                r#"{{"device_id":"{device}","device_ts":{},"seq":{seq},"temperature_c":20.5}}"#,
                chrono::Utc::now().timestamp_millis()
            );
            if client
                .publish(
                    format!("devices/{device}/telemetry"),
                    QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await
                .is_err()
            {
                break 'connection;
            }
            loop {
                let polled = tokio::select! {
                    () = stop.cancelled() => return acknowledged,
                    polled = tokio::time::timeout(Duration::from_secs(5), eventloop.poll()) => polled,
                };
                match polled {
                    Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                        acknowledged.push(seq);
                        break;
                    }
                    Ok(Ok(_)) => {}
                    // Refused, closed or silent: this message may or may not have arrived.
                    Ok(Err(_)) | Err(_) => break 'connection,
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    acknowledged
}

/// The seqs of the device's rows in the SQLite store.
async fn stored_seqs(data_dir: &Path, device: &str) -> std::collections::BTreeSet<u64> {
    let database = libsql::Builder::new_local(data_dir.join("telemetry.db"))
        .build()
        .await
        .unwrap();
    let connection = database.connect().unwrap();
    let mut rows = connection
        .query("SELECT seq FROM telemetry WHERE device_id = ?1", [device])
        .await
        .unwrap();
    let mut seqs = std::collections::BTreeSet::new();
    while let Some(row) = rows.next().await.unwrap() {
        seqs.insert(u64::try_from(row.get::<i64>(0).unwrap()).unwrap());
    }
    seqs
}

/// The embedded broker acknowledges no message it would lose: a device publishing while `up`
/// starts (before the bridge has subscribed) and while it stops (after the bridge is gone) finds
/// every acknowledged message in the table.
#[tokio::test(flavor = "multi_thread")]
async fn the_embedded_broker_loses_no_acknowledged_message_at_start_or_stop() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let base = free_base();
    let stop = tokio_util::sync::CancellationToken::new();
    // The device is there before `up`: it connects as soon as the port takes connections.
    let device = tokio::spawn(steady_device(base, "steady-1", stop.clone()));
    let child = start(base, &data_dir, 0).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Ctrl-C while the device keeps publishing; then it stops trying.
    interrupt(child).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let acknowledged = device.await.unwrap();
    assert!(
        acknowledged.len() > 10,
        "the device published: {acknowledged:?}"
    );
    let stored = stored_seqs(&data_dir, "steady-1").await;
    let lost: Vec<u64> = acknowledged
        .iter()
        .copied()
        .filter(|seq| !stored.contains(seq))
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged by the embedded broker but not stored: {lost:?} (of {} acknowledged)",
        acknowledged.len()
    );
}

/// The rollup and the alerter run under `up` too, on the SQLite store: a hot device's alert is
/// listed by the API, and its events are in the minute rollups.
#[tokio::test(flavor = "multi_thread")]
async fn up_runs_the_rollup_and_the_alerter_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "[[rules]]\nname = \"hot\"\nwhen = \"temperature_c > 30\"\nseverity = \"critical\"\n",
    )
    .unwrap();
    let base = free_base();
    let mut command = up(base, &data_dir, 0);
    command.env("TELEMETRY_ALERT_RULES", &rules);
    let (child, _) = start_command(command, base).await;

    // A device keeps sending hot readings, as a real one would: the alerter starts at the end of
    // its topics on its first start, so the first readings may come before that.
    let mqtt_url = format!("mqtt://127.0.0.1:{base}");
    let mut sent = 0_u64;
    let fired = eventually(Duration::from_secs(90), || {
        sent += 1;
        let payload = format!(
            r#"{{"device_id":"hot-1","device_ts":{},"seq":{sent},"temperature_c":45.5}}"#,
            chrono::Utc::now().timestamp_millis()
        );
        let mqtt_url = mqtt_url.clone();
        async move {
            telemetry_testkit::publish_qos1_to(
                &mqtt_url,
                "up-test-hot",
                &[("devices/hot-1/telemetry".into(), payload.into_bytes())],
                None,
                &AtomicUsize::new(0),
            )
            .await;
            get(base, 2, "/api/alerts?device=hot-1")
                .await
                .is_some_and(|body| body.to_string().contains("hot:hot-1"))
        }
    })
    .await;
    assert!(fired, "the alert of the hot device is listed by the API");
    let url = format!("sqlite://{}", data_dir.join("telemetry.db").display());
    let rolled_up = eventually(Duration::from_secs(30), || async {
        let store = telemetry_store::open_reader(&url, 1).await.unwrap();
        let rows = store
            .rollup_rows(telemetry_store::Resolution::Minute, &["hot-1"])
            .await
            .unwrap();
        let samples: u64 = rows
            .iter()
            .filter(|row| row.metric == "temperature_c")
            .map(|row| u64::from(row.aggregate.samples))
            .sum();
        samples > 0 && samples == rows_of(&url, "hot-1").await
    })
    .await;
    assert!(
        rolled_up,
        "every stored event of the device is in the minute rollups"
    );
    interrupt(child).await;
}

/// The device's rows in the live table.
async fn rows_of(url: &str, device: &str) -> u64 {
    let store = telemetry_store::open_reader(url, 1).await.unwrap();
    store
        .devices(
            chrono::Utc::now(),
            &telemetry_store::DevicePage {
                after: None,
                scope: &telemetry_core::DeviceScope::All,
                limit: 10,
            },
        )
        .await
        .unwrap()
        .iter()
        .find(|summary| summary.device_id == device)
        .map_or(0, |summary| summary.events_last_hour)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_taken_port_is_named_with_the_flag_that_moves_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base();
    let _holder = std::net::TcpListener::bind(("127.0.0.1", base + 2)).unwrap();
    let output = up(base, dir.path(), 0).stderr(Stdio::piped()).output();
    let output = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .expect("a refused `up` exits at once")
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("port {} (dashboard and API) is in use", base + 2)),
        "{stderr}"
    );
    assert!(stderr.contains("--port-base"), "{stderr}");
}

/// A rules file the user names is used as named: a missing one stops `up` with its path, rather
/// than `up` quietly starting with other rules.
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_rules_file_the_user_named_stops_up_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("my-rules.toml");
    let mut command = up(free_base(), &dir.path().join("data"), 0);
    command
        .env("TELEMETRY_ALERT_RULES", &missing)
        .stderr(Stdio::piped());
    let output = run_to_end(command, Duration::from_secs(120)).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("my-rules.toml"), "{stderr}");
    assert!(
        !dir.path().join("data/alerts.toml").exists(),
        "no rules of its own were written"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn up_runs_against_the_real_services_when_given() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let base = free_base();
    let prefix = telemetry_testkit::unique("up");
    let database_url = telemetry_testkit::database_url(&telemetry_testkit::unique("up"));
    let mut command = Command::new(env!("CARGO_BIN_EXE_telemetry"));
    command
        .args(["up", "--port-base", &base.to_string(), "--simulate", "0"])
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--mqtt-url", &telemetry_testkit::mqtt_url()])
        .args(["--kafka-brokers", &telemetry_testkit::kafka_brokers()])
        .args(["--mysql-url", &database_url])
        // This test's own topics, MQTT subscription and session on the shared services.
        .env("TELEMETRY_RAW_TOPIC", format!("{prefix}.raw"))
        .env("TELEMETRY_CLEANED_TOPIC", format!("{prefix}.cleaned"))
        .env("TELEMETRY_DLQ_TOPIC", format!("{prefix}.dlq"))
        .env("TELEMETRY_MQTT_TOPIC", format!("{prefix}/+/telemetry"))
        .env("TELEMETRY_MQTT_CLIENT_ID", format!("{prefix}-bridge"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let (child, before) = start_command(command, base).await;
    let summary = before.join("\n");
    assert!(summary.contains("store MySQL (given)"), "{summary}");
    assert!(
        !summary.contains("embedded"),
        "nothing embedded runs: {summary}"
    );

    let now = chrono::Utc::now().timestamp();
    let events: Vec<(String, Vec<u8>)> = (1..=5)
        .map(|seq| {
            (
                format!("{prefix}/real-1/telemetry"),
                format!(
                    r#"{{"device_id":"real-1","device_ts":{now},"seq":{seq},"temperature_c":20.5}}"#
                )
                .into_bytes(),
            )
        })
        .collect();
    telemetry_testkit::publish_qos1(&format!("{prefix}-device"), &events).await;
    let pool = sqlx::MySqlPool::connect(&database_url).await.unwrap();
    let rows = || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM telemetry WHERE device_id = 'real-1'")
            .fetch_one(&pool)
            .await
            .unwrap_or(0)
    };
    let arrived = eventually(Duration::from_secs(60), || async { rows().await == 5 }).await;
    assert!(
        arrived,
        "the five events are rows in the given MySQL database"
    );
    let listed = get(base, 2, "/api/devices")
        .await
        .is_some_and(|body| body.to_string().contains("real-1"));
    assert!(listed, "the API reads the given database");
    interrupt(child).await;
    assert!(
        !data_dir.join("kafka").exists() && !data_dir.join("telemetry.db").exists(),
        "no embedded Kafka log and no SQLite file were made"
    );
    assert_eq!(rows().await, 5);
}

/// The number after `before` in `text` (e.g. "took 41 events" after "took ").
fn number_after(text: &str, before: &str) -> u64 {
    let (_, rest) = text
        .split_once(before)
        .unwrap_or_else(|| panic!("`{before}` in the bench's output:\n{text}"));
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn up_bench_measures_itself_stops_by_itself_and_counts_what_the_store_holds() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base();
    let mut command = up(base, dir.path(), 5);
    command.args(["--bench-seconds", "2"]);
    let output = run_to_end(command, Duration::from_secs(180)).await;
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "`up` exits 0 after its bench:\n{text}"
    );

    let taken = number_after(&text, "the bridge took ");
    let written = number_after(&text, "the audit service wrote ");
    let rejected = number_after(&text, " and sent ");
    // 5 devices at 20 events/s for 2 s, a few of them malformed.
    assert!(
        taken >= 20,
        "the simulated devices published for 2 s:\n{text}"
    );
    assert!(
        written + rejected >= taken,
        "the bench waited for everything the bridge took:\n{text}"
    );
    assert!(!text.contains("not all within"), "{text}");
    for figure in ["events/s", "µs per event", "embedded Kafka broker"] {
        assert!(
            text.contains(figure),
            "the bench reports `{figure}`:\n{text}"
        );
    }

    // What it counted is what the store holds: the DLQ index has every rejected record, and the
    // table every accepted one (a duplicate the simulator sends is accepted, stored once).
    let url = format!("sqlite://{}", dir.path().join("telemetry.db").display());
    let store = telemetry_store::open_reader(&url, 1).await.unwrap();
    assert_eq!(store.count_dead_letters().await.unwrap(), rejected);
    let rows = store.count_events().await.unwrap();
    assert!(
        rows > 0 && rows <= written,
        "{rows} rows, {written} written"
    );
}

#[tokio::test]
async fn a_bench_without_simulated_devices_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base();
    let mut command = up(base, dir.path(), 0);
    command
        .args(["--bench-seconds", "2"])
        .stderr(Stdio::piped());
    let output = run_to_end(command, Duration::from_secs(30)).await;
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("--bench-seconds needs") && error.contains("--simulate N"),
        "{error}"
    );
    // Nothing was started: no Kafka log in the data directory.
    assert!(!dir.path().join("kafka").exists());
}
