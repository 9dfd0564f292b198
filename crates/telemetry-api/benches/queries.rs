//! The API's queries over a realistic table: 60 devices at 1 Hz for a day, 5,184,000 rows, plus
//! 10,000 indexed rejections, and one device's day also in the rollup tables. Each request goes through the router as a client's would (query
//! check, SQL on MariaDB, JSON encoding).
//!
//! Run: `scripts/services.sh start && cargo bench -p telemetry-api --bench queries`. The first run
//! (and any run more than an hour after the last fill) fills the database `bench_api` (about two
//! minutes); `TELEMETRY_BENCH_MYSQL_URL` points it elsewhere.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use criterion::{criterion_group, criterion_main, Criterion};
use http_body_util::BodyExt;
use telemetry_api::{app, AppState, HealthThresholds};
use telemetry_store::Store;
use tower::ServiceExt;

const DEVICES: i64 = 60;
const SECONDS: i64 = 86_400;
const ROWS: i64 = DEVICES * SECONDS;
const REJECTIONS: i64 = 10_000;

/// Fills the tables through raw SQL (MariaDB's sequence engine): 5 million rows through the
/// audit service's path would take far longer, and the benchmark is about reading them.
async fn fill(pool: &sqlx::MySqlPool) -> i64 {
    let (rows, newest): (i64, Option<chrono::NaiveDateTime>) =
        sqlx::query_as("SELECT COUNT(*), MAX(received_at) FROM telemetry")
            .fetch_one(pool)
            .await
            .unwrap();
    let fresh = newest
        .is_some_and(|newest| chrono::Utc::now().naive_utc() - newest < chrono::Duration::hours(1));
    if rows == ROWS && fresh {
        return newest.unwrap().and_utc().timestamp_millis();
    }
    eprintln!("filling bench_api with {ROWS} rows (about two minutes)...");
    for table in [
        "telemetry",
        "devices",
        "dlq_events",
        "device_minutes",
        "rollup_1m",
        "rollup_1h",
        "rollup_devices",
        "rollup_seen",
    ] {
        sqlx::query(&format!("TRUNCATE TABLE {table}"))
            .execute(pool)
            .await
            .unwrap();
    }
    let end = chrono::Utc::now().timestamp();
    sqlx::query(&format!(
        "INSERT INTO telemetry (device_id, device_ts, seq, seq_key, received_at, metrics, \
         schema_version, source_topic, source_partition, source_offset) \
         SELECT CONCAT('pico-w-', LPAD(seq % {DEVICES}, 4, '0')), \
                FROM_UNIXTIME({end} - {SECONDS} + seq DIV {DEVICES}), \
                seq DIV {DEVICES}, seq DIV {DEVICES}, \
                FROM_UNIXTIME({end} - {SECONDS} + seq DIV {DEVICES} + 0.12), \
                CONCAT('{{\"battery_v\":', ROUND(4.1 - (seq DIV {DEVICES}) / 200000, 3), \
                       ',\"humidity_pct\":', 40 + seq % 17, \
                       ',\"pressure_hpa\":1013.2,\"rssi_dbm\":', -60 - CAST(seq % 20 AS SIGNED), \
                       ',\"temperature_c\":', ROUND(20 + SIN(seq / 6000) * 5, 2), '}}'), \
                1, 'telemetry.raw', seq % 4, seq DIV 4 \
         FROM seq_0_to_{}",
        ROWS - 1
    ))
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(&format!(
        "INSERT INTO dlq_events (source_topic, source_partition, source_offset, device_id, \
         received_at, code, message, rule, contract_version, payload, payload_bytes) \
         SELECT 'telemetry.raw', 9, seq, CONCAT('pico-w-', LPAD(seq % {DEVICES}, 4, '0')), \
                FROM_UNIXTIME({end} - {SECONDS} + seq * {SECONDS} / {REJECTIONS}), \
                ELT(1 + seq % 3, 'invalid_json', 'metric_out_of_range', 'missing_device_id'), \
                'payload is not valid JSON', 'json', 1, 'temperature=21.5;oops', 21 \
         FROM seq_0_to_{}",
        REJECTIONS - 1
    ))
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO devices (device_id, first_seen, last_seen, last_accepted) \
         SELECT device_id, MIN(received_at), MAX(received_at), MAX(received_at) \
         FROM telemetry GROUP BY device_id",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO device_minutes (device_id, minute, accepted) \
         SELECT device_id, DATE_FORMAT(received_at, '%Y-%m-%d %H:%i:00'), COUNT(*) \
         FROM telemetry GROUP BY 1, 2",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO device_minutes (device_id, minute, rejected) \
         SELECT device_id, DATE_FORMAT(received_at, '%Y-%m-%d %H:%i:00'), COUNT(*) \
         FROM dlq_events GROUP BY 1, 2 \
         ON DUPLICATE KEY UPDATE rejected = VALUES(rejected)",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE TABLE telemetry, devices, dlq_events, device_minutes")
        .execute(pool)
        .await
        .unwrap();
    end * 1_000
}

/// The device whose day is also in the rollups, as `telemetry rollup` would have folded it.
const ROLLED_UP: &str = "pico-w-0008";

/// Folds `ROLLED_UP`'s day into the rollup tables through the store (a few seconds), unless done.
async fn fill_rollups(store: &Store, pool: &sqlx::MySqlPool) {
    if store.rollup_coverage(ROLLED_UP).await.unwrap().is_some() {
        return;
    }
    eprintln!("folding {ROLLED_UP}'s day into the rollups...");
    let rows: Vec<(chrono::NaiveDateTime, i64, chrono::NaiveDateTime, String)> = sqlx::query_as(
        "SELECT device_ts, seq, received_at, CAST(metrics AS CHAR) FROM telemetry \
         WHERE device_id = ? ORDER BY device_ts",
    )
    .bind(ROLLED_UP)
    .fetch_all(pool)
    .await
    .unwrap();
    let events: Vec<telemetry_core::Event> = rows
        .into_iter()
        .map(
            |(device_ts, seq, received_at, metrics)| telemetry_core::Event {
                device_id: ROLLED_UP.to_string(),
                device_ts: device_ts.and_utc().timestamp_millis(),
                received_at: received_at.and_utc().timestamp_millis(),
                seq: Some(seq),
                metrics: serde_json::from_str(&metrics).unwrap(),
                attributes: Default::default(),
                schema_version: 1,
                quality: Default::default(),
            },
        )
        .collect();
    for batch in events.chunks(10_000) {
        store.roll_up(batch, 600_000).await.unwrap();
    }
}

async fn get(state: &AppState, uri: &str) -> usize {
    let response = app(state.clone())
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{uri}");
    response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .len()
}

fn bench_queries(criterion: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let url = std::env::var("TELEMETRY_BENCH_MYSQL_URL").unwrap_or_else(|_| {
        "mysql://telemetry_test:telemetry-test@127.0.0.1:3306/bench_api".into()
    });
    let (state, newest) = runtime.block_on(async {
        let store = Store::connect(&url, 4).await.unwrap();
        store.migrate().await.unwrap();
        // Filled with the benchmark's own connections: raw SQL the store does not offer.
        let pool = sqlx::MySqlPool::connect(&url).await.unwrap();
        let newest = fill(&pool).await;
        fill_rollups(&store, &pool).await;
        let state = AppState {
            store: std::sync::Arc::new(store),
            thresholds: HealthThresholds {
                stale_after: Duration::from_secs(300),
                failing_dlq_ratio: 0.5,
                failing_min_rejections: 3,
            },
            live_url: None,
            auth: telemetry_auth::Auth::disabled("api"),
            dlq_payload_bytes: 4_096,
        };
        (state, newest)
    });
    let day = format!(
        "/api/devices/pico-w-0007/telemetry?metric=temperature_c&from={}&to={}&max_points=500",
        newest - SECONDS * 1_000,
        newest + 1
    );
    // Warm the buffer pool the way a dashboard in use would have it.
    runtime.block_on(get(&state, &day));

    let mut group = criterion.benchmark_group(format!("api_over_{ROWS}_rows"));
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(15));
    group.bench_function("telemetry_24h_1_device_1_metric_500_points", |bencher| {
        bencher.to_async(&runtime).iter(|| get(&state, &day));
    });
    let rolled_up_day = day.replace("pico-w-0007", ROLLED_UP);
    group.bench_function("telemetry_24h_from_rollup_1m_500_points", |bencher| {
        bencher
            .to_async(&runtime)
            .iter(|| get(&state, &rolled_up_day));
    });
    let hour = format!(
        "/api/devices/pico-w-0007/telemetry?metric=temperature_c&from={}&to={}&max_points=500",
        newest - 3_600_000,
        newest + 1
    );
    group.bench_function("telemetry_1h_1_device_1_metric_500_points", |bencher| {
        bencher.to_async(&runtime).iter(|| get(&state, &hour));
    });
    group.bench_function("devices_60_with_hour_and_day_counts", |bencher| {
        bencher
            .to_async(&runtime)
            .iter(|| get(&state, "/api/devices"));
    });
    group.bench_function("dlq_newest_50_of_one_device", |bencher| {
        bencher
            .to_async(&runtime)
            .iter(|| get(&state, "/api/dlq?device=pico-w-0007&limit=50"));
    });
    group.finish();
}

criterion_group!(benches, bench_queries);
criterion_main!(benches);
