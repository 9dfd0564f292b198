//! The Grafana dashboard we ship (`deploy/grafana/telemetry-pipeline.json`) against what the
//! services really expose: every metric its Prometheus queries use is one `docs/architecture.md`
//! documents, and every MySQL query runs on a database migrated by the store (Grafana's time macro
//! replaced by a six-hour filter).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::Value;

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(repository().join("deploy/grafana/telemetry-pipeline.json"))
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The query texts of every panel whose data source is of `kind`, with the panel titles.
fn queries(kind: &str, field: &str) -> Vec<(String, String)> {
    let dashboard = dashboard();
    let mut found = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if target["datasource"]["type"] == kind {
                found.push((
                    panel["title"].as_str().unwrap().to_string(),
                    target[field].as_str().unwrap().to_string(),
                ));
            }
        }
    }
    found
}

/// The metric names in the first column of the metrics table of `docs/architecture.md`.
fn documented_metrics() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repository().join("docs/architecture.md")).unwrap();
    let table = text
        .split("| metric | labels | counts |")
        .nth(1)
        .expect("docs/architecture.md has the metrics table");
    let mut names = BTreeSet::new();
    for line in table
        .lines()
        .skip(2)
        .take_while(|line| line.starts_with('|'))
    {
        let first = line.split('|').nth(1).unwrap_or_default();
        for name in first.split('`').skip(1).step_by(2) {
            names.insert(name.to_string());
        }
    }
    names
}

/// The identifiers of a PromQL expression that name series: not inside `{...}`, `by (...)` or
/// quotes, and not functions or keywords.
fn metric_names(expr: &str) -> Vec<String> {
    const NOT_METRICS: &[&str] = &["sum", "max", "rate", "increase", "by"];
    let mut names = Vec::new();
    let mut depth_braces = 0;
    let mut in_by = false;
    let mut word = String::new();
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
            continue;
        }
        if !word.is_empty() {
            if word == "by" {
                in_by = true;
            } else if depth_braces == 0
                && !in_by
                && !NOT_METRICS.contains(&word.as_str())
                && !word
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == 'm' || c == 'h')
            {
                names.push(word.clone());
            }
            word.clear();
        }
        match c {
            '{' => depth_braces += 1,
            '}' => depth_braces -= 1,
            ')' if in_by => in_by = false,
            '"' => {
                for inner in chars.by_ref() {
                    if inner == '"' {
                        break;
                    }
                }
            }
            _ => {}
        }
    }
    if !word.is_empty() && depth_braces == 0 && !NOT_METRICS.contains(&word.as_str()) {
        names.push(word);
    }
    names
}

#[test]
fn every_prometheus_query_uses_documented_metrics() {
    let documented = documented_metrics();
    assert!(
        documented.contains("events_received_total"),
        "{documented:?}"
    );
    let queries = queries("prometheus", "expr");
    assert!(queries.len() >= 20, "{} Prometheus queries", queries.len());
    let mut used = BTreeSet::new();
    for (title, expr) in &queries {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{title}: no metric in `{expr}`");
        for name in names {
            assert!(
                documented.contains(&name),
                "{title}: `{name}` in `{expr}` is not a documented metric"
            );
            used.insert(name);
        }
    }
    for essential in [
        "events_received_total",
        "events_rejected_total",
        "kafka_consumer_lag",
        "db_write_duration_seconds",
        "websocket_frames_missed_total",
    ] {
        assert!(used.contains(essential), "the dashboard shows {essential}");
    }
}

#[tokio::test]
async fn every_mysql_query_runs_on_the_schema() {
    let url = telemetry_testkit::database_url(&telemetry_testkit::unique("grafana"));
    let store = telemetry_store::Store::connect(&url, 1).await.unwrap();
    store.migrate().await.unwrap();
    // Grafana's own connection, as its MySQL data source has.
    let grafana = sqlx::MySqlPool::connect(&url).await.unwrap();
    let queries = queries("mysql", "rawSql");
    assert!(queries.len() >= 5, "{} MySQL queries", queries.len());
    for (title, query) in queries {
        let mut sql = query.clone();
        while let Some(start) = sql.find("$__timeFilter(") {
            let end = start + sql[start..].find(')').unwrap();
            let column = &sql[start + "$__timeFilter(".len()..end];
            let filter = format!("{column} > UTC_TIMESTAMP() - INTERVAL 6 HOUR");
            sql.replace_range(start..=end, &filter);
        }
        assert!(!sql.contains("$__"), "{title}: an unknown macro in {query}");
        sqlx::query(&sql)
            .fetch_all(&grafana)
            .await
            .unwrap_or_else(|error| panic!("{title}: {error}\n{sql}"));
    }
}
