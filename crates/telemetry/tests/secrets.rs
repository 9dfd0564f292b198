//! Secrets stay out of what the binary prints: `--help` of every subcommand, with every
//! secret-bearing setting set (in the environment or in a configuration file), shows none of
//! them; a failing webhook's log lines name its scheme, host and port, never its path, query or
//! credentials (against the real Kafka and MariaDB).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::BufRead as _;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use telemetry_testkit::{database_url, free_port, kafka_brokers, produce, unique, TestRecord};

mod common;
use common::telemetry;

/// Every setting that may hold a secret, with a value that is easy to spot.
const SECRETS: &[(&str, &str)] = &[
    (
        "TELEMETRY_MYSQL_URL",
        "mysql://telemetry:SECRET-MYSQL-PASSWORD@db.example:3306/telemetry",
    ),
    (
        "TELEMETRY_MQTT_URL",
        "mqtt://device:SECRET-MQTT-URL-PASSWORD@broker.example:1883",
    ),
    (
        "TELEMETRY_MYSQL_OWNER_URL",
        "mysql://owner:SECRET-MYSQL-OWNER-PASSWORD@db.example:3306/telemetry",
    ),
    (
        "TELEMETRY_API_MYSQL_URL",
        "mysql://reader:SECRET-MYSQL-READER-PASSWORD@db.example:3306/telemetry",
    ),
    ("TELEMETRY_MQTT_PASSWORD", "SECRET-MQTT-PASSWORD"),
    (
        "TELEMETRY_KAFKA_SASL_PASSWORD",
        "SECRET-KAFKA-SASL-PASSWORD",
    ),
    (
        "TELEMETRY_KAFKA_OPTIONS",
        "sasl.password=SECRET-KAFKA-OPTION,ssl.key.password=SECRET-KAFKA-KEY-PASSWORD",
    ),
];

/// Settings whose names look secret-bearing but are not, and why.
const NOT_SECRETS: &[(&str, &str)] = &[
    (
        "TELEMETRY_API_LIVE_URL",
        "the live view's public WebSocket address, given to every browser",
    ),
    (
        "TELEMETRY_MQTT_OPTIONS",
        "four numeric client options, none a credential",
    ),
    (
        "TELEMETRY_AUTH_TOKENS",
        "a path; the tokens file holds digests only",
    ),
    ("TELEMETRY_KAFKA_SSL_KEY_FILE", "a path"),
    ("TELEMETRY_MQTT_KEY_FILE", "a path"),
    ("TELEMETRY_TLS_KEY_FILE", "a path"),
];

/// `telemetry <path> --help`: stdout and stderr together.
fn help(path: &[String], configure: &dyn Fn(&mut Command)) -> String {
    let mut command = telemetry();
    configure(&mut command);
    let output = command.args(path).arg("--help").output().unwrap();
    assert!(
        output.status.success(),
        "telemetry {path:?} --help: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The subcommands a help text lists under `Commands:` (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|line| line.trim() != "Commands:")
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        // Entries are indented by two spaces; wrapped descriptions by more.
        .filter(|line| line.starts_with("  ") && !line.starts_with("   "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// Every command path, `[]` (the top level) first, found through the help texts themselves.
fn every_command() -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut pending = vec![Vec::new()];
    while let Some(path) = pending.pop() {
        for name in subcommands(&help(&path, &|_| {})) {
            let mut child = path.clone();
            child.push(name);
            pending.push(child);
        }
        found.push(path);
    }
    found
}

/// The `TELEMETRY_*` names in a text.
fn variables(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
        .filter(|word| word.starts_with("TELEMETRY_") && word.len() > "TELEMETRY_".len())
        .map(str::to_string)
        .collect()
}

fn assert_no_secret(text: &str, context: &str) {
    for (name, value) in SECRETS {
        for part in value.split([',', '@', ':', '=']) {
            if part.starts_with("SECRET-") {
                assert!(
                    !text.contains(part),
                    "{context} shows {name}'s secret {part}:\n{text}"
                );
            }
        }
    }
}

#[test]
fn help_of_every_command_shows_no_secret_setting() {
    let commands = every_command();
    let names: Vec<&[String]> = commands.iter().map(Vec::as_slice).collect();
    for expected in [
        &["audit"][..],
        &["alert"],
        &["dlq", "replay"],
        &["replay", "swap"],
    ] {
        assert!(
            names.iter().any(|path| path == &expected),
            "{expected:?} is among the commands found: {names:?}"
        );
    }

    // A setting whose name suggests a secret is either in SECRETS (and tested) or says why not.
    let mut seen = std::collections::BTreeSet::new();
    for path in &commands {
        seen.extend(variables(&help(path, &|_| {})));
    }
    for name in &seen {
        let suggestive = ["PASSWORD", "SECRET", "TOKEN", "URL", "OPTIONS", "KEY"]
            .iter()
            .any(|word| name.contains(word));
        let classified = SECRETS.iter().any(|(secret, _)| secret == name)
            || NOT_SECRETS.iter().any(|(plain, _)| plain == name);
        assert!(
            !suggestive || classified,
            "{name} may hold a secret: add it to SECRETS (and hide its value) or to NOT_SECRETS"
        );
    }
    for (name, _) in SECRETS {
        assert!(seen.contains(*name), "{name} is a setting of some command");
    }

    // Every secret in the environment.
    let from_environment = |command: &mut Command| {
        for (name, value) in SECRETS {
            command.env(name, value);
        }
    };
    // Every secret in a configuration file (its values become the environment's defaults).
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("telemetry.toml");
    let mut text = String::new();
    for (name, value) in SECRETS {
        let key = name.trim_start_matches("TELEMETRY_").to_ascii_lowercase();
        let value = if value.contains(',') {
            toml::Value::Array(
                value
                    .split(',')
                    .map(|item| toml::Value::String(item.to_string()))
                    .collect(),
            )
        } else {
            toml::Value::String(value.to_string())
        };
        text.push_str(&format!("{key} = {value}\n"));
    }
    std::fs::write(&file, text).unwrap();
    let from_file = |command: &mut Command| {
        command.env("TELEMETRY_CONFIG", &file);
    };

    for path in &commands {
        let shown = format!("`telemetry {} --help`", path.join(" "));
        assert_no_secret(
            &help(path, &from_environment),
            &format!("{shown} with the secrets in the environment"),
        );
        assert_no_secret(
            &help(path, &from_file),
            &format!("{shown} with the secrets in a configuration file"),
        );
    }
}

/// A child process whose stderr is collected as it comes.
struct Logged {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Logged {
    fn spawn(mut command: Command) -> Logged {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Logged { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hot(device_id: &str) -> TestRecord {
    let now = chrono::Utc::now().timestamp_millis();
    TestRecord {
        key: Some(device_id.as_bytes().to_vec()),
        payload: json!({
            "device_id": device_id, "device_ts": now, "received_at": now,
            "metrics": {"temperature_c": 90.0}, "schema_version": 1,
            "source": {"topic": "raw", "partition": 0, "offset": 0},
        })
        .to_string()
        .into_bytes(),
        headers: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_webhook_is_logged_by_scheme_host_and_port_only() {
    let id = unique("secrets");
    let kafka = telemetry_kafka::KafkaConfig {
        brokers: kafka_brokers(),
        cleaned_topic: format!("{id}.cleaned"),
        dlq_topic: format!("{id}.dlq"),
        ..telemetry_kafka::KafkaConfig::default()
    };
    telemetry_kafka::ensure_topics(&kafka, &[&kafka.cleaned_topic, &kafka.dlq_topic])
        .await
        .unwrap();

    // Nothing listens on the webhook's port: every delivery fails with reqwest's error, whose
    // text carries the URL.
    let port = free_port();
    let directory = tempfile::tempdir().unwrap();
    let rules = directory.path().join("alerts.toml");
    std::fs::write(
        &rules,
        format!(
            r#"
            [[rules]]
            name = "hot"
            when = "temperature_c > 40"

            [webhook]
            url = "http://hook:SECRET-USERINFO@127.0.0.1:{port}/hooks/SECRET-PATH?token=SECRET-QUERY"
            timeout = "2s"
            "#
        ),
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&rules, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let mut command = telemetry();
    command
        .arg("alert")
        .env("RUST_LOG", "info")
        .env("TELEMETRY_ALERT_RULES", &rules)
        .env("TELEMETRY_MYSQL_URL", database_url(&id))
        .env("TELEMETRY_KAFKA_BROKERS", &kafka.brokers)
        .env("TELEMETRY_CLEANED_TOPIC", &kafka.cleaned_topic)
        .env("TELEMETRY_DLQ_TOPIC", &kafka.dlq_topic)
        .env("TELEMETRY_ALERTS_TOPIC", format!("{id}.alerts"))
        .env("TELEMETRY_ALERT_GROUP", format!("{id}-alert"))
        .env("TELEMETRY_ALERT_TICK_MS", "200")
        .env(
            "TELEMETRY_ALERT_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        );
    let mut alerter = Logged::spawn(command);

    // A new group starts at the end of the topic: send until an alert was raised and its
    // delivery failed.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let mut sent = 0;
    while !alerter.log().contains("Webhook delivery failed") {
        if let Ok(Some(status)) = alerter.child.try_wait() {
            panic!("the alerter stopped ({status}):\n{}", alerter.log());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no failed webhook delivery within 90 s:\n{}",
            alerter.log()
        );
        produce(&kafka.cleaned_topic, &[hot(&format!("hot-{sent}"))]).await;
        sent += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let log = alerter.log();
    let failure = log
        .lines()
        .find(|line| line.contains("Webhook delivery failed"))
        .unwrap();
    assert!(
        failure.contains(&format!("http://127.0.0.1:{port}")),
        "the failure names the webhook's scheme, host and port: {failure}"
    );
    assert!(
        failure.contains("Connection refused"),
        "the failure still says why: {failure}"
    );
    // The rules file holds the URL and anyone may read it: a warning naming the file.
    #[cfg(unix)]
    assert!(
        log.lines().any(|line| line.contains("WARN")
            && line.contains("chmod 600")
            && line.contains(&rules.display().to_string())),
        "a warning about the rules file's mode:\n{log}"
    );
    for secret in ["SECRET-PATH", "SECRET-QUERY", "SECRET-USERINFO", "/hooks"] {
        assert!(!log.contains(secret), "the log shows {secret}:\n{log}");
    }
}
