//! The load harness in its short smoke mode, against the real services: it runs, the pipeline it
//! measures loses and duplicates nothing, and its JSON report carries every figure. The figures
//! themselves are benchmarks (docs/benchmarks.md), not checked here.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use serde_json::Value;
use telemetry_testkit::{kafka_brokers, mqtt_url, unique};

#[test]
fn the_bench_runs_the_pipeline_and_reports_every_figure() {
    let json = std::env::temp_dir().join(format!("{}.json", unique("bench")));
    let server = telemetry_testkit::database_url("x");
    let server = server.trim_end_matches("/test_x");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_telemetry"))
        .args([
            "bench",
            "--events",
            "3000",
            "--rate",
            "1500",
            "--devices",
            "20",
        ])
        .args([
            "--malformed",
            "0.1",
            "--ws-clients",
            "3",
            "--baseline-events",
            "3000",
        ])
        .args(["--bench-mqtt-url", &mqtt_url()])
        .args(["--bench-kafka-brokers", &kafka_brokers()])
        .args(["--bench-mysql-server", server])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("end to end (publish -> row committed)"),
        "{stdout}"
    );

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).ok();
    let pipeline = &report["pipeline"];
    assert_eq!(pipeline["published"], 3000);
    assert_eq!(pipeline["malformed"], 300);
    assert_eq!(pipeline["valid"], 2700);
    assert_eq!(pipeline["rows"], 2700);
    assert_eq!(pipeline["lost"], 0);
    assert_eq!(pipeline["duplicates"], 0);
    assert_eq!(pipeline["dead_letters"], 300);
    assert_eq!(pipeline["publish_to_row_ms"]["samples"], 2700);
    assert!(pipeline["end_to_end_per_second"].as_f64().unwrap() > 0.0);
    // Every tenth event of each device is timed to the live view.
    assert!(pipeline["publish_to_frame_ms"]["samples"].as_u64().unwrap() > 100);
    assert_eq!(pipeline["frames_received"], 3000);
    for baseline in [
        "mqtt_qos1_per_second",
        "kafka_produce_per_second",
        "kafka_consume_per_second",
        "mysql_insert_rows_per_second",
    ] {
        assert!(
            report["baselines"][baseline].as_f64().unwrap() > 0.0,
            "{baseline}"
        );
    }
    let services = report["services"].as_array().unwrap();
    let names: Vec<&str> = services
        .iter()
        .map(|s| s["service"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["bridge", "audit"]);
    for service in services {
        assert!(service["cpu_seconds"].as_f64().unwrap() > 0.0, "{service}");
        assert!(service["peak_rss_mb"].as_f64().unwrap() > 1.0, "{service}");
    }
}
