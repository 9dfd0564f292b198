//! Every metric the services record is declared once, in its crate's `instruments` module (see
//! `telemetry_metrics`), and `docs/architecture.md` lists exactly those, with their labels. No
//! code names a metric with a string of its own.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use telemetry_metrics::Metric;

/// Every declaration, by name; a name declared twice must be the same metric.
fn declared() -> BTreeMap<&'static str, Metric> {
    let lists: [&[Metric]; 9] = [
        telemetry_ops::instruments::ALL,
        telemetry_kafka::instruments::ALL,
        telemetry_auth::instruments::ALL,
        telemetry_bridge::instruments::ALL,
        telemetry_audit::instruments::ALL,
        telemetry_api::instruments::ALL,
        telemetry_rollup::instruments::ALL,
        telemetry_alert::instruments::ALL,
        telemetry_embedded::mqtt::METRICS,
    ];
    let mut declared = BTreeMap::new();
    for metric in lists.into_iter().flatten() {
        if let Some(before) = declared.insert(metric.name, *metric) {
            assert_eq!(
                before, *metric,
                "{} is declared twice, differently",
                metric.name
            );
        }
    }
    declared
}

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The metrics table of docs/architecture.md's "Observability": each name with its labels (the
/// backticked words of the second column outside parentheses, which list values).
fn documented() -> BTreeMap<String, BTreeSet<String>> {
    let text = std::fs::read_to_string(repository().join("docs/architecture.md")).unwrap();
    let section = text
        .split("\n## Observability")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("docs/architecture.md has an Observability section");
    let mut documented = BTreeMap::new();
    for row in section.lines().filter(|line| line.starts_with("| `")) {
        let columns: Vec<&str> = row.split('|').map(str::trim).collect();
        let labels: BTreeSet<String> = backticked(&without_parentheses(columns[2]));
        for name in backticked(columns[1]) {
            assert!(
                documented.insert(name.clone(), labels.clone()).is_none(),
                "{name} is listed twice"
            );
        }
    }
    documented
}

fn backticked(text: &str) -> BTreeSet<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn without_parentheses(text: &str) -> String {
    let mut depth = 0;
    text.chars()
        .filter(|character| {
            match character {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => return depth == 0,
            }
            false
        })
        .collect()
}

#[test]
fn the_documented_metrics_are_the_declared_ones_with_their_labels() {
    let declared: BTreeMap<String, BTreeSet<String>> = declared()
        .into_values()
        .map(|metric| {
            let labels = metric
                .labels
                .iter()
                .map(|label| label.to_string())
                .collect();
            (metric.name.to_string(), labels)
        })
        .collect();
    let documented = documented();
    let undocumented: Vec<_> = declared
        .keys()
        .filter(|name| !documented.contains_key(*name))
        .collect();
    let undeclared: Vec<_> = documented
        .keys()
        .filter(|name| !declared.contains_key(*name))
        .collect();
    assert!(
        undocumented.is_empty() && undeclared.is_empty(),
        "declared, not in docs/architecture.md: {undocumented:?}; documented, not declared: {undeclared:?}"
    );
    for (name, labels) in &declared {
        assert_eq!(
            labels, &documented[name],
            "the labels of {name}: declared (left), documented (right)"
        );
    }
}

/// The Rust sources of the workspace's crates, without their unit-test modules.
fn sources() -> Vec<(PathBuf, String)> {
    let mut found = Vec::new();
    let mut pending = vec![repository().join("crates")];
    while let Some(directory) = pending.pop() {
        for entry in std::fs::read_dir(&directory).unwrap() {
            let path = entry.unwrap().path();
            let name = path
                .file_name()
                .and_then(|name| name.to_str())
                .unwrap_or("");
            if path.is_dir() && !matches!(name, "tests" | "benches" | "target") {
                pending.push(path);
            } else if name.ends_with(".rs") && name != "tests.rs" && name != "test_support.rs" {
                let text = std::fs::read_to_string(&path).unwrap();
                let code = text
                    .split("#[cfg(test)]\nmod ")
                    .next()
                    .unwrap_or("")
                    .to_string();
                found.push((path, code));
            }
        }
    }
    found
}

#[test]
fn metrics_are_recorded_through_their_declarations_only() {
    let declared = declared();
    let mut problems = Vec::new();
    for (path, code) in sources() {
        let own = path.starts_with(repository().join("crates/telemetry-metrics"));
        for macro_name in ["counter!(", "gauge!(", "histogram!("] {
            for (at, _) in code.match_indices(macro_name) {
                let after = code[at + macro_name.len()..].trim_start();
                if after.starts_with('"') && !own {
                    problems.push(format!(
                        "{}: {macro_name}\"…\" names a metric",
                        path.display()
                    ));
                }
            }
        }
        // Every declaration is in a crate's list, so the documentation test sees it.
        for kind in [
            "Metric::counter(\"",
            "Metric::gauge(\"",
            "Metric::histogram(\"",
        ] {
            for (at, _) in code.match_indices(kind) {
                let name = code[at + kind.len()..].split('"').next().unwrap_or("");
                if !declared.contains_key(name) {
                    problems.push(format!("{}: {name} is in no crate's list", path.display()));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}
