//! Handler tests: every endpoint through the router (`oneshot`), over a real MariaDB database of
//! the test's own, filled through the store as the audit service fills it.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use chrono::Utc;
use http_body_util::BodyExt;
use serde_json::Value;
use telemetry_api::{app, AppState, HealthThresholds};
use telemetry_core::event::CleanedRecord;
use telemetry_core::{Contract, Outcome, SourcePosition, Validator};
use telemetry_store::{NewDeadLetter, Store};
use tower::ServiceExt;

const MINUTE_MS: i64 = 60_000;

fn thresholds() -> HealthThresholds {
    HealthThresholds {
        stale_after: Duration::from_secs(300),
        failing_dlq_ratio: 0.5,
        failing_min_rejections: 3,
    }
}

async fn store(name: &str) -> Store {
    let store = Store::connect(&telemetry_testkit::database_url(name), 2)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    store
}

fn state(store: Store) -> AppState {
    state_of(std::sync::Arc::new(store))
}

/// The API's state over any store, with the default settings.
fn state_of(store: telemetry_store::DynStore) -> AppState {
    AppState {
        store,
        thresholds: thresholds(),
        live_url: Some("ws://127.0.0.1:9/ws".into()),
        auth: telemetry_auth::Auth::disabled("api"),
        dlq_payload_bytes: 4_096,
    }
}

/// An accepted event as the audit service stores it.
fn record(
    device: &str,
    device_ts: i64,
    received_at: i64,
    temperature: f64,
    offset: i64,
) -> CleanedRecord {
    let validator = Validator::new(Contract::default()).unwrap();
    let payload = format!(
        r#"{{"device_id":"{device}","device_ts":{device_ts},"temperature_c":{temperature},"battery_v":3.7}}"#
    );
    let Outcome::Accepted(event) = validator.validate(payload.as_bytes(), received_at) else {
        panic!("{payload} is valid");
    };
    CleanedRecord {
        event,
        source: SourcePosition {
            topic: "telemetry.raw".into(),
            partition: 0,
            offset,
        },
    }
}

fn letter<'a>(
    device: Option<&'a str>,
    code: &'a str,
    payload: &'a [u8],
    received_at: i64,
    offset: i64,
) -> NewDeadLetter<'a> {
    NewDeadLetter {
        source_topic: "telemetry.raw",
        source_partition: 1,
        source_offset: offset,
        device_id: device,
        received_at,
        code,
        message: "payload is not valid JSON: expected value at byte 1",
        field: None,
        rule: Some("json"),
        contract_version: 1,
        payload,
    }
}

/// Checks `body` against the OpenAPI document's schema `name`, so the document stays true.
fn conforms(name: &str, body: &Value) {
    let document: Value =
        serde_json::from_str(include_str!("../openapi.json")).expect("openapi.json is JSON");
    let schema = serde_json::json!({
        "$ref": format!("#/components/schemas/{name}"),
        "components": document["components"],
    });
    let validator = jsonschema::validator_for(&schema).expect("the schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|error| format!("{} at {}", error, error.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{name} does not match openapi.json: {errors:?}\n{body}"
    );
}

async fn get(state: &AppState, uri: &str) -> (StatusCode, Value) {
    get_with(state, uri, None).await
}

/// `get` with a bearer token.
async fn get_with(state: &AppState, uri: &str, token: Option<&str>) -> (StatusCode, Value) {
    let mut request = Request::get(uri);
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let response = app(state.clone())
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, body)
}

#[tokio::test]
async fn devices_carry_counts_metrics_and_health() {
    let store = store(&telemetry_testkit::unique("api_devices")).await;
    let now = Utc::now().timestamp_millis();
    let mut records = Vec::new();
    // Sending and valid: 5 events in the last minutes, one two hours ago.
    for index in 0..5 {
        let at = now - index * MINUTE_MS;
        records.push(record("pico-ok", at, at, 20.0, index));
    }
    records.push(record(
        "pico-ok",
        now - 120 * MINUTE_MS,
        now - 120 * MINUTE_MS,
        19.0,
        9,
    ));
    // Silent for ten minutes.
    records.push(record(
        "pico-quiet",
        now - 10 * MINUTE_MS,
        now - 10 * MINUTE_MS,
        21.0,
        10,
    ));
    // Sending, but mostly garbage.
    records.push(record(
        "pico-bad",
        now - MINUTE_MS,
        now - MINUTE_MS,
        22.0,
        11,
    ));
    store.insert_events(&records).await.unwrap();
    let letters: Vec<_> = (0..4)
        .map(|index| {
            letter(
                Some("pico-bad"),
                "invalid_json",
                b"oops",
                now - index * 1_000,
                index,
            )
        })
        .collect();
    store.insert_dead_letters(&letters).await.unwrap();
    // Written twice, as after a redelivery: nothing changes.
    store.insert_events(&records).await.unwrap();
    store.insert_dead_letters(&letters).await.unwrap();

    let (status, body) = get(&state(store), "/api/devices").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    conforms("Devices", &body);
    let devices = body["devices"].as_array().unwrap();
    let ids: Vec<&str> = devices
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["pico-bad", "pico-ok", "pico-quiet"]);
    let by_id = |id: &str| {
        devices
            .iter()
            .find(|d| d["device_id"] == id)
            .unwrap()
            .clone()
    };

    let ok = by_id("pico-ok");
    assert_eq!(ok["health"], "ok");
    assert_eq!(ok["events_last_hour"], 5);
    assert_eq!(ok["events_last_day"], 6);
    assert_eq!(ok["dlq_last_hour"], 0);
    assert_eq!(
        ok["metrics"],
        serde_json::json!(["battery_v", "temperature_c"])
    );
    assert_eq!(ok["last_rejected"], Value::Null);

    assert_eq!(by_id("pico-quiet")["health"], "stale");

    let bad = by_id("pico-bad");
    assert_eq!(bad["health"], "failing");
    assert_eq!(bad["events_last_hour"], 1);
    assert_eq!(bad["dlq_last_hour"], 4);
    assert_eq!(bad["dlq_rate_last_hour"], 0.8);
    assert!(bad["last_rejected"].as_str().unwrap().ends_with('Z'));
    assert_eq!(body["thresholds"]["stale_after_seconds"], 300);
}

#[tokio::test]
async fn telemetry_is_downsampled_into_buckets_by_the_database() {
    let store = store(&telemetry_testkit::unique("api_series")).await;
    // Ten minutes of 1 Hz readings: temperature = seconds since the start, mod 60.
    let start = Utc::now().timestamp_millis() / MINUTE_MS * MINUTE_MS - 20 * MINUTE_MS;
    let records: Vec<_> = (0..600)
        .map(|second| {
            let at = start + second * 1_000;
            #[allow(clippy::cast_precision_loss)]
            let temperature = (second % 60) as f64;
            record("pico-1", at, at, temperature, second)
        })
        .collect();
    store.insert_events(&records).await.unwrap();
    // One more device's rows interleaved in the table must not leak into pico-1's series.
    store
        .insert_events(&[record("pico-2", start, start, 99.0, 1_000)])
        .await
        .unwrap();
    let state = state(store);

    let uri = format!(
        "/api/devices/pico-1/telemetry?metric=temperature_c&from={start}&to={}&max_points=10",
        start + 10 * MINUTE_MS
    );
    let (status, body) = get(&state, &uri).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    conforms("Series", &body);
    assert_eq!(body["bucket_ms"], MINUTE_MS);
    assert_eq!(body["source"], "raw", "no rollup has seen the device");
    let points = body["points"].as_array().unwrap();
    assert_eq!(points.len(), 10);
    for (index, point) in points.iter().enumerate() {
        assert_eq!(
            point["t"],
            start + i64::try_from(index).unwrap() * MINUTE_MS
        );
        assert_eq!(point["count"], 60);
        assert_eq!(point["min"], 0.0);
        assert_eq!(point["max"], 59.0);
        assert_eq!(point["avg"], 29.5);
    }

    // RFC 3339 bounds, a narrower range: the first 90 s in 3 buckets of 30 s.
    let from = chrono::DateTime::from_timestamp_millis(start).unwrap();
    let to = from + chrono::Duration::seconds(90);
    let uri = format!(
        "/api/devices/pico-1/telemetry?metric=temperature_c&from={}&to={}&max_points=3",
        from.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        to.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    );
    let (status, body) = get(&state, &uri.replace('+', "%2B")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let averages: Vec<f64> = body["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|point| point["avg"].as_f64().unwrap())
        .collect();
    assert_eq!(averages, [14.5, 44.5, 14.5]);

    // A range over two hours is read in two parts at once, split on a bucket boundary: here 25
    // buckets of 5 minutes split at the 12th, 5 minutes into the data. Nothing lost, nothing
    // counted twice.
    let from = start - 55 * MINUTE_MS;
    let uri = format!(
        "/api/devices/pico-1/telemetry?metric=temperature_c&from={from}&to={}&max_points=25",
        from + 125 * MINUTE_MS
    );
    let (status, body) = get(&state, &uri).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["bucket_ms"], 5 * MINUTE_MS);
    let points = body["points"].as_array().unwrap();
    let starts: Vec<i64> = points.iter().map(|p| p["t"].as_i64().unwrap()).collect();
    assert_eq!(starts, [start, start + 5 * MINUTE_MS]);
    for point in points {
        assert_eq!(point["count"], 300);
        assert_eq!(point["avg"], 29.5);
    }

    // A metric the device never sent: no points. An unknown device: 404.
    let (status, body) = get(&state, "/api/devices/pico-1/telemetry?metric=humidity_pct").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["points"], serde_json::json!([]));
    let (status, body) = get(&state, "/api/devices/nobody/telemetry?metric=temperature_c").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("nobody"));
}

/// (count, min, max, avg) of `readings` (device time, value) per bucket of `width` from `origin`.
fn aggregate_by(
    readings: &[(i64, f64)],
    origin: i64,
    width: i64,
) -> Vec<(i64, u64, f64, f64, f64)> {
    let mut buckets: std::collections::BTreeMap<i64, Vec<f64>> = Default::default();
    for (at, value) in readings {
        buckets
            .entry(origin + (at - origin).div_euclid(width) * width)
            .or_default()
            .push(*value);
    }
    buckets
        .into_iter()
        .map(|(start, values)| {
            let min = values.iter().copied().fold(f64::INFINITY, f64::min);
            let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            #[allow(clippy::cast_precision_loss)]
            let avg = values.iter().sum::<f64>() / values.len() as f64;
            (start, values.len() as u64, min, max, avg)
        })
        .collect()
}

fn points_of(body: &Value) -> Vec<(i64, u64, f64, f64, f64)> {
    body["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|point| {
            (
                point["t"].as_i64().unwrap(),
                point["count"].as_u64().unwrap(),
                point["min"].as_f64().unwrap(),
                point["max"].as_f64().unwrap(),
                point["avg"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn assert_points(got: &[(i64, u64, f64, f64, f64)], expected: &[(i64, u64, f64, f64, f64)]) {
    assert_eq!(got.len(), expected.len(), "{got:?}");
    for (got, expected) in got.iter().zip(expected) {
        assert_eq!(
            (got.0, got.1, got.2, got.3),
            (expected.0, expected.1, expected.2, expected.3)
        );
        assert!((got.4 - expected.4).abs() < 1e-9, "{got:?} vs {expected:?}");
    }
}

#[tokio::test]
async fn long_ranges_are_read_from_the_rollups_where_they_cover_them_and_from_rows_elsewhere() {
    let store = store(&telemetry_testkit::unique("api_rollup")).await;
    let hour = 60 * MINUTE_MS;
    let start = Utc::now().timestamp_millis() / hour * hour - 4 * hour;
    // Three hours of readings every 10 s, all stored. The rollup started 30 minutes in (the
    // cleaned topic no longer had the first ones) and lags 20 minutes behind.
    let readings: Vec<(i64, f64)> = (0..1_080)
        .map(|index: i64| {
            #[allow(clippy::cast_precision_loss)]
            let value = ((index * 37) % 101) as f64 / 3.0;
            (start + index * 10_000, value)
        })
        .collect();
    let records: Vec<_> = readings
        .iter()
        .zip(0..)
        .map(|((at, value), offset)| record("pico-r", *at, *at, *value, offset))
        .collect();
    store.insert_events(&records).await.unwrap();
    let rolled: Vec<_> = records
        .iter()
        .filter(|record| {
            (start + 30 * MINUTE_MS + 20_000..start + 160 * MINUTE_MS + 20_000)
                .contains(&record.event.device_ts)
        })
        .map(|record| record.event.clone())
        .collect();
    store.roll_up(&rolled, 600_000).await.unwrap();
    let state = state(store);

    // 18 buckets of 10 minutes: from the minute rollup where it covers the range, from the rows
    // before it (its first minutes) and after it (the minutes still filling). The same numbers
    // as the rows give.
    let uri = format!(
        "/api/devices/pico-r/telemetry?metric=temperature_c&from={start}&to={}&max_points=18",
        start + 3 * hour
    );
    let (status, body) = get(&state, &uri).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    conforms("Series", &body);
    assert_eq!(body["source"], "rollup_1m");
    assert_eq!(body["bucket_ms"], 10 * MINUTE_MS);
    assert_points(
        &points_of(&body),
        &aggregate_by(&readings, start, 10 * MINUTE_MS),
    );

    // 3 buckets of an hour: the hour the rollup saw whole (the second) from the hour rollup, the
    // first and the filling third from the rows; the same numbers.
    let uri = format!(
        "/api/devices/pico-r/telemetry?metric=temperature_c&from={start}&to={}&max_points=3",
        start + 3 * hour
    );
    let (status, body) = get(&state, &uri).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    conforms("Series", &body);
    assert_eq!(body["source"], "rollup_1h");
    assert_eq!(body["bucket_ms"], hour);
    let from = chrono::DateTime::from_timestamp_millis(start).unwrap();
    assert_eq!(
        body["from"],
        from.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    );
    assert_points(&points_of(&body), &aggregate_by(&readings, start, hour));

    // Short buckets are read from the rows.
    let uri = format!(
        "/api/devices/pico-r/telemetry?metric=temperature_c&from={start}&to={}&max_points=60",
        start + 10 * MINUTE_MS
    );
    let (_, body) = get(&state, &uri).await;
    assert_eq!(body["source"], "raw");
    assert_points(
        &points_of(&body),
        &aggregate_by(&readings[..60], start, 10_000),
    );
}

#[tokio::test]
async fn the_dlq_lists_rejections_newest_first_with_their_original_bytes() {
    let store = store(&telemetry_testkit::unique("api_dlq")).await;
    let now = Utc::now().timestamp_millis();
    let binary = [0xff_u8, 0x00, 0x7b];
    // 80,000 bytes of two-byte characters: the index keeps 64 KiB, cut inside a character.
    let long = "é".repeat(40_000);
    let letters = [
        letter(Some("pico-1"), "invalid_json", b"oops", now - 3_000, 1),
        letter(
            Some("pico-2"),
            "missing_device_id",
            br#"{"temp":1}"#,
            now - 2_000,
            2,
        ),
        letter(Some("pico-1"), "invalid_json", &binary, now - 1_000, 3),
        letter(None, "invalid_json", b"no key", now, 4),
        letter(
            Some("pico-3"),
            "payload_too_large",
            long.as_bytes(),
            now - 4_000,
            5,
        ),
    ];
    store.insert_dead_letters(&letters).await.unwrap();
    store.insert_dead_letters(&letters).await.unwrap(); // redelivered: indexed once
    let state = state(store);

    let (status, body) = get(&state, "/api/dlq").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    conforms("DeadLetters", &body);
    let offsets: Vec<i64> = body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["source"]["offset"].as_i64().unwrap())
        .collect();
    assert_eq!(offsets, [5, 4, 3, 2, 1]);

    let (_, body) = get(&state, "/api/dlq?device=pico-1&code=invalid_json&limit=1").await;
    let entries = body["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    let entry = &entries[0];
    assert_eq!(entry["device_id"], "pico-1");
    assert_eq!(entry["code"], "invalid_json");
    assert_eq!(entry["payload_encoding"], "base64");
    assert_eq!(entry["payload"], "/wB7");
    assert_eq!(entry["payload_bytes"], 3);
    assert_eq!(entry["rule"], "json");
    assert_eq!(entry["source"]["topic"], "telemetry.raw");

    // Cut by the query to TELEMETRY_API_DLQ_PAYLOAD_BYTES (4,096 bytes: 2,048 of the two-byte
    // characters), marked, the full length given.
    let (_, body) = get(&state, "/api/dlq?device=pico-3").await;
    let entry = &body["entries"][0];
    assert_eq!(entry["payload_encoding"], "utf8");
    assert_eq!(entry["payload_truncated"], true);
    assert_eq!(entry["payload_bytes"], 80_000);
    assert_eq!(entry["payload"].as_str().unwrap().chars().count(), 2_048);

    let (_, body) = get(&state, "/api/dlq?code=missing_device_id").await;
    let entries = body["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["payload"], r#"{"temp":1}"#);
    assert_eq!(entries[0]["payload_encoding"], "utf8");
}

/// An alert as `telemetry alert` writes it.
fn alert_json(rule: &str, device: &str, status: &str, resolved_at: Option<&str>) -> String {
    serde_json::json!({
        "alert_id": format!("{rule}:{device}:1795944370000"), "status": status, "rule": rule,
        "severity": "critical", "condition": "temperature_c > 40 for 2m", "device_id": device,
        "started_at": "2026-11-29T10:06:10.000Z", "fired_at": "2026-11-29T10:08:10.000Z",
        "resolved_at": resolved_at, "value": 42.5,
    })
    .to_string()
}

#[tokio::test]
async fn alerts_are_listed_newest_first_firing_or_resolved() {
    use telemetry_store::NewAlert;
    let store = store(&telemetry_testkit::unique("api_alerts")).await;
    let hot_fired = alert_json("hot", "pico-1", "firing", None);
    let hot_resolved = alert_json(
        "hot",
        "pico-1",
        "resolved",
        Some("2026-11-29T10:20:00.000Z"),
    );
    let quiet_fired = alert_json("quiet", "pico-2", "firing", None);
    let alert = |id: &'static str, status: &'static str, device: &'static str, payload| NewAlert {
        alert_id: id,
        status,
        device_id: device,
        payload,
    };
    store
        .save_alerts(
            "g",
            &[],
            &[],
            &[alert(
                "hot:pico-1:1795944370000",
                "firing",
                "pico-1",
                &hot_fired,
            )],
            false,
        )
        .await
        .unwrap();
    store
        .save_alerts(
            "g",
            &[],
            &[],
            &[
                alert(
                    "hot:pico-1:1795944370000",
                    "resolved",
                    "pico-1",
                    &hot_resolved,
                ),
                alert(
                    "quiet:pico-2:1795944370000",
                    "firing",
                    "pico-2",
                    &quiet_fired,
                ),
            ],
            false,
        )
        .await
        .unwrap();
    let state = state(store);

    let (status, body) = get(&state, "/api/alerts").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    conforms("Alerts", &body);
    let alerts = body["alerts"].as_array().unwrap();
    let listed: Vec<(&str, &str)> = alerts
        .iter()
        .map(|alert| {
            (
                alert["rule"].as_str().unwrap(),
                alert["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(listed, [("quiet", "firing"), ("hot", "resolved")]);
    assert_eq!(alerts[1]["resolved_at"], "2026-11-29T10:20:00.000Z");
    assert_eq!(alerts[1]["fired_at"], "2026-11-29T10:08:10.000Z");
    assert_eq!(alerts[0]["resolved_at"], Value::Null);

    let (_, body) = get(&state, "/api/alerts?state=firing").await;
    assert_eq!(body["alerts"].as_array().unwrap().len(), 1);
    assert_eq!(body["alerts"][0]["device_id"], "pico-2");
    let (_, body) = get(&state, "/api/alerts?device=pico-1&limit=5").await;
    assert_eq!(body["alerts"].as_array().unwrap().len(), 1);
    assert_eq!(body["alerts"][0]["rule"], "hot");
    let (status, body) = get(&state, "/api/alerts?state=open").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["parameter"], "state");
}

#[tokio::test]
async fn bad_parameters_are_a_400_naming_the_parameter() {
    let store = store(&telemetry_testkit::unique("api_bad")).await;
    let now = Utc::now().timestamp_millis();
    store
        .insert_events(&[record("pico-1", now, now, 20.0, 1)])
        .await
        .unwrap();
    let state = state(store);
    let long = "x".repeat(129);
    let series = "/api/devices/pico-1/telemetry";
    let cases: Vec<(String, Option<&str>)> = vec![
        (series.to_string(), Some("metric")),
        (format!("{series}?metric="), Some("metric")),
        (
            format!("{series}?metric=temperature_c&max_points=0"),
            Some("max_points"),
        ),
        (
            format!("{series}?metric=temperature_c&max_points=10001"),
            Some("max_points"),
        ),
        (
            format!("{series}?metric=temperature_c&max_points=lots"),
            Some("max_points"),
        ),
        (
            format!("{series}?metric=temperature_c&from=yesterday"),
            Some("from"),
        ),
        (
            format!("{series}?metric=temperature_c&to=2016-12-31T23:59:60Z"),
            Some("to"),
        ),
        (
            format!("{series}?metric=temperature_c&to=99999999999999999999"),
            Some("to"),
        ),
        (
            format!("{series}?metric=temperature_c&from=2000&to=1000"),
            Some("from"),
        ),
        (
            format!("{series}?metric=temperature_c&from=0&to=1764300000000"),
            Some("from"),
        ),
        (
            format!("{series}?metric=temperature_c&metric=battery_v"),
            Some("metric"),
        ),
        (format!("{series}?metric=temperature_c&metrc=1"), None),
        (format!("{series}?metric=a%00b"), Some("metric")),
        (
            format!("/api/devices/{long}/telemetry?metric=temperature_c"),
            Some("id"),
        ),
        ("/api/dlq?limit=0".into(), Some("limit")),
        ("/api/dlq?limit=1001".into(), Some("limit")),
        ("/api/dlq?code=not_a_code".into(), Some("code")),
        (format!("/api/dlq?device={long}"), Some("device")),
        ("/api/devices?verbose=1".into(), None),
        ("/api/devices?limit=0".into(), Some("limit")),
        ("/api/devices?limit=1001".into(), Some("limit")),
        ("/api/devices?limit=many".into(), Some("limit")),
        ("/api/devices?limit=1&limit=2".into(), Some("limit")),
        ("/api/devices?cursor=%21%21".into(), Some("cursor")),
        // base64url of the byte 0xff: not UTF-8, so no device id.
        ("/api/devices?cursor=_w".into(), Some("cursor")),
        (
            format!("/api/devices?cursor={}", "A".repeat(700)),
            Some("cursor"),
        ),
        ("/api/devices?cursor=YQ&cursor=Yg".into(), Some("cursor")),
    ];
    for (uri, parameter) in cases {
        let (status, body) = get(&state, &uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
        assert_eq!(
            body["error"]["parameter"],
            parameter.map_or(Value::Null, Value::from),
            "{uri}: {body}"
        );
        assert!(
            !body["error"]["message"].as_str().unwrap().is_empty(),
            "{uri}"
        );
    }
}

#[tokio::test]
async fn a_database_that_does_not_answer_is_a_503_not_a_500() {
    // Nothing listens on port 9 of loopback. With a statement timeout, as the API runs.
    let store = Store::connect_reader(
        "mysql://telemetry:telemetry@127.0.0.1:9/telemetry",
        1,
        Some(Duration::from_secs(5)),
    )
    .unwrap();
    let state = state(store);
    for uri in [
        "/api/devices",
        "/api/dlq",
        "/api/devices/pico-1/telemetry?metric=t",
    ] {
        let (status, body) = get(&state, uri).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{uri}: {body}");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unavailable"));
    }
}

#[tokio::test]
async fn the_openapi_document_describes_every_endpoint_and_the_dashboard_is_served() {
    let store =
        Store::connect_lazy("mysql://telemetry:telemetry@127.0.0.1:9/telemetry", 1).unwrap();
    let state = state(store);
    let (status, document) = get(&state, "/api/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(document["openapi"], "3.1.0");
    for path in [
        "/api/devices",
        "/api/devices/{id}/telemetry",
        "/api/dlq",
        "/api/alerts",
        "/api/config",
        "/api/openapi.json",
    ] {
        assert!(
            document["paths"][path]["get"].is_object(),
            "{path} is documented"
        );
    }
    let (status, config) = get(&state, "/api/config").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(config["live_url"], "ws://127.0.0.1:9/ws");

    let (status, page) = get(&state, "/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.as_str().unwrap().contains("/assets/app.js"));
    for asset in [
        "app.js",
        "app.css",
        "vendor/uPlot.iife.min.js",
        "vendor/uPlot.min.css",
    ] {
        let (status, _) = get(&state, &format!("/assets/{asset}")).await;
        assert_eq!(status, StatusCode::OK, "{asset}");
    }
    let (status, _) = get(&state, "/assets/nope.js").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = get(&state, "/api/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"]["message"].is_string());
}

/// The ids of one page of `/api/devices` and its `next_cursor`, checked against the schema.
async fn device_page(
    state: &AppState,
    uri: &str,
    token: Option<&str>,
) -> (Vec<String>, Option<String>) {
    let (status, body) = get_with(state, uri, token).await;
    assert_eq!(status, StatusCode::OK, "{uri}: {body}");
    conforms("Devices", &body);
    let ids = body["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|device| device["device_id"].as_str().unwrap().to_string())
        .collect();
    (ids, body["next_cursor"].as_str().map(str::to_string))
}

/// Every page of `/api/devices?limit=` following `next_cursor` to the end.
async fn device_pages(state: &AppState, limit: u32, token: Option<&str>) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let uri = match &cursor {
            Some(cursor) => format!("/api/devices?limit={limit}&cursor={cursor}"),
            None => format!("/api/devices?limit={limit}"),
        };
        let (ids, next) = device_page(state, &uri, token).await;
        pages.push(ids);
        match next {
            Some(next) => cursor = Some(next),
            None => return pages,
        }
        assert!(pages.len() <= 100, "the cursor does not advance");
    }
}

#[tokio::test]
async fn devices_are_paged_by_cursor_in_id_order() {
    let store = store(&telemetry_testkit::unique("api_pages")).await;
    let now = Utc::now().timestamp_millis();
    let ids: Vec<String> = (0..25).map(|index| format!("pico-{index:02}")).collect();
    // Stored in another order than the ids'.
    let records: Vec<_> = ids
        .iter()
        .rev()
        .zip(0..)
        .map(|(id, offset)| record(id, now - offset, now - offset, 20.0, offset))
        .collect();
    store.insert_events(&records).await.unwrap();
    let state = state(store);

    for limit in [1, 4, 24, 25, 100] {
        let pages = device_pages(&state, limit, None).await;
        let walked: Vec<String> = pages.concat();
        assert_eq!(walked, ids, "pages of {limit}: each device once, in order");
        let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
        let full = usize::try_from(limit).unwrap();
        assert!(
            sizes[..sizes.len() - 1].iter().all(|size| *size == full),
            "pages of {limit}: {sizes:?}"
        );
        // No empty last page: `next_cursor` is null on the page that holds the last device.
        assert_ne!(sizes.last(), Some(&0), "pages of {limit}: {sizes:?}");
    }
    // Without `limit`: pages of 100, here one.
    let (all, next) = device_page(&state, "/api/devices", None).await;
    assert_eq!((all.len(), next), (25, None));
    // A page's metrics and counts are those of its devices.
    let (_, body) = get(&state, "/api/devices?limit=2&cursor=cGljby0xMA").await;
    assert_eq!(body["devices"][0]["device_id"], "pico-11");
    assert_eq!(body["devices"][0]["events_last_hour"], 1);
    assert_eq!(
        body["devices"][0]["metrics"],
        serde_json::json!(["battery_v", "temperature_c"])
    );
    // A cursor past the last device: an empty last page.
    let (past, next) = device_page(&state, "/api/devices?cursor=cGljby05OQ", None).await;
    assert!(past.is_empty() && next.is_none(), "{past:?}");
}

#[tokio::test]
async fn a_restricted_token_gets_full_pages_of_its_own_devices() {
    let id = telemetry_testkit::unique("api_scope");
    let store = store(&id).await;
    let now = Utc::now().timestamp_millis();
    // The token may see pico-03 and pico-1x: 11 of 30 devices, between others in id order.
    let ids: Vec<String> = (0..30).map(|index| format!("pico-{index:02}")).collect();
    let records: Vec<_> = ids
        .iter()
        .zip(0..)
        .map(|(id, offset)| record(id, now - offset, now - offset, 20.0, offset))
        .collect();
    store.insert_events(&records).await.unwrap();
    let token = format!("tp_{id}");
    let tokens = std::env::temp_dir().join(format!("{id}-tokens.toml"));
    std::fs::write(
        &tokens,
        format!(
            "[[token]]\nname = \"some\"\nsha256 = \"{}\"\ndevices = [\"pico-1*\", \"pico-03\"]\n",
            telemetry_auth::token_digest(&token)
        ),
    )
    .unwrap();
    let auth = telemetry_auth::Auth::from_config(
        &telemetry_auth::AuthConfig {
            auth_tokens: Some(tokens.clone()),
            allow_unauthenticated: false,
        },
        "api",
        "TELEMETRY_API_LISTEN / --api-listen",
        "127.0.0.1:8082".parse().unwrap(),
    )
    .unwrap();
    std::fs::remove_file(tokens).ok();
    let state = AppState {
        auth,
        ..state(store)
    };

    let pages = device_pages(&state, 4, Some(&token)).await;
    let expected: Vec<String> = ids
        .iter()
        .filter(|id| *id == "pico-03" || id.starts_with("pico-1"))
        .cloned()
        .collect();
    assert_eq!(pages.concat(), expected);
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        [4, 4, 3],
        "full pages: the scope is applied in the query, before the limit"
    );
    // A cursor naming a device outside the scope reveals nothing beyond it.
    let (ids, _) = device_page(
        &state,
        "/api/devices?limit=2&cursor=cGljby0yMA",
        Some(&token),
    )
    .await;
    assert!(ids.is_empty(), "{ids:?}");
}

#[tokio::test]
async fn dlq_payloads_are_cut_by_the_query_so_a_full_answer_stays_small() {
    let store = store(&telemetry_testkit::unique("api_dlq_cut")).await;
    let now = Utc::now().timestamp_millis();
    // 300 payloads of 40,000 bytes: 12 MB uncut.
    let big = "x".repeat(40_000);
    let letters: Vec<_> = (0..300)
        .map(|offset| letter(Some("pico-1"), "invalid_json", big.as_bytes(), now, offset))
        .collect();
    store.insert_dead_letters(&letters).await.unwrap();
    // Text that JSON escaping would make six times larger; bytes that are not UTF-8; text cut
    // inside a character.
    let controls = vec![1_u8; 10_000];
    let binary: Vec<u8> = (0..10_000_u32).map(|index| (index % 256) as u8).collect();
    let accented = "é".repeat(3_000);
    store
        .insert_dead_letters(&[
            letter(Some("pico-2"), "invalid_json", &controls, now, 1_000),
            letter(Some("pico-3"), "invalid_json", &binary, now, 1_001),
            letter(
                Some("pico-4"),
                "invalid_json",
                accented.as_bytes(),
                now,
                1_002,
            ),
        ])
        .await
        .unwrap();
    let state = AppState {
        dlq_payload_bytes: 4_095,
        ..state(store)
    };

    let response = app(state.clone())
        .oneshot(
            Request::get("/api/dlq?device=pico-1&limit=1000")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    conforms("DeadLetters", &body);
    let entries = body["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 300);
    for entry in entries {
        assert_eq!(entry["payload"].as_str().unwrap().len(), 4_095);
        assert_eq!(entry["payload_truncated"], true);
        assert_eq!(entry["payload_bytes"], 40_000);
    }
    assert!(
        bytes.len() < 300 * 5_000,
        "{} bytes for 300 entries",
        bytes.len()
    );

    let entry = |device: &'static str| {
        let state = state.clone();
        async move {
            let (status, body) = get(&state, &format!("/api/dlq?device={device}")).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body["entries"][0].clone()
        }
    };
    let controls = entry("pico-2").await;
    assert_eq!(controls["payload_encoding"], "base64");
    assert_eq!(
        controls["payload"].as_str().unwrap().len(),
        4_095 / 3 * 4,
        "base64 of the 4,095 bytes kept, not 6 escaped bytes for each"
    );
    let binary = entry("pico-3").await;
    assert_eq!(binary["payload_encoding"], "base64");
    assert_eq!(binary["payload_bytes"], 10_000);
    assert_eq!(binary["payload_truncated"], true);
    let accented = entry("pico-4").await;
    assert_eq!(accented["payload_encoding"], "utf8");
    assert_eq!(
        accented["payload"].as_str().unwrap().chars().count(),
        2_047,
        "the character cut in two is left out"
    );
}

/// 100,000 readings a second apart: a series query over them takes well over
/// [`STATEMENT_TIMEOUT`] (about 150 ms on MariaDB, 400 ms on SQLite).
async fn fill_slow_device(store: &dyn telemetry_store::TelemetryStore) -> i64 {
    let rows = 100_000;
    let start = Utc::now().timestamp_millis() / MINUTE_MS * MINUTE_MS - rows * 1_000;
    let template = record("slow-1", start, start, 20.0, 0);
    for chunk in (0..rows).collect::<Vec<_>>().chunks(10_000) {
        let records: Vec<_> = chunk
            .iter()
            .map(|second| {
                let mut record = template.clone();
                record.event.device_ts = start + second * 1_000;
                record.source.offset = *second;
                record
            })
            .collect();
        store
            .insert_events_into(&telemetry_store::Table::live(), &records)
            .await
            .unwrap();
    }
    start
}

/// Far below the slow query, far above an index lookup.
const STATEMENT_TIMEOUT: Duration = Duration::from_millis(20);

/// A 504 naming the setting for the slow series; then the API goes on answering.
async fn the_slow_query_is_a_504(state: &AppState, start: i64) {
    let uri = format!(
        "/api/devices/slow-1/telemetry?metric=temperature_c&from={start}&to={}&max_points=100",
        start + 100_000 * 1_000
    );
    let started = std::time::Instant::now();
    let (status, body) = get(state, &uri).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(body["error"]["parameter"], Value::Null);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("TELEMETRY_API_STATEMENT_TIMEOUT_MS"),
        "{body}"
    );
    let (status, body) = get(state, "/api/devices").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["devices"][0]["device_id"], "slow-1");
}

#[tokio::test]
async fn a_query_past_the_statement_timeout_is_a_504_on_mariadb() {
    let name = telemetry_testkit::unique("api_timeout");
    let writer = store(&name).await;
    let start = fill_slow_device(&writer).await;
    let reader = telemetry_store::open_bounded_reader(
        &telemetry_testkit::database_url(&name),
        2,
        Some(STATEMENT_TIMEOUT),
    )
    .await
    .unwrap();
    the_slow_query_is_a_504(&state_of(reader), start).await;
}

#[tokio::test]
async fn a_query_past_the_statement_timeout_is_a_504_on_sqlite() {
    let directory = std::env::temp_dir().join(telemetry_testkit::unique("api_timeout"));
    let url = format!("sqlite://{}", directory.join("telemetry.db").display());
    let writer = telemetry_store::open_migrated(&url, 1, &Default::default())
        .await
        .unwrap()
        .unwrap();
    let start = fill_slow_device(writer.as_ref()).await;
    let reader = telemetry_store::open_bounded_reader(&url, 1, Some(STATEMENT_TIMEOUT))
        .await
        .unwrap();
    the_slow_query_is_a_504(&state_of(reader), start).await;
    drop(writer);
    std::fs::remove_dir_all(directory).ok();
}
