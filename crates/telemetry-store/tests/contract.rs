//! One contract for both stores: the same suite runs against the MySQL store (a real MariaDB
//! database of the test's own) and the SQLite store (a file of the test's own). Same rows, same
//! idempotence, same answers to the API's queries.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use chrono::{DateTime, Duration, Utc};
use telemetry_core::event::CleanedRecord;
use telemetry_core::{Contract, DevicePattern, DeviceScope, Outcome, SourcePosition, Validator};
use telemetry_store::{
    DeadLetterFilter, DevicePage, DynStore, NewDeadLetter, SeriesQuery, Store, Table,
    TelemetryStore,
};

static ALL: DeviceScope = DeviceScope::All;

/// The first 1,000 devices: all of them, in these tests.
const EVERY_DEVICE: DevicePage<'static> = DevicePage {
    after: None,
    scope: &ALL,
    limit: 1_000,
};

async fn mysql() -> DynStore {
    let url = telemetry_testkit::database_url(&telemetry_testkit::unique("contract"));
    let store = Store::connect(&url, 2).await.unwrap();
    store.migrate().await.unwrap();
    std::sync::Arc::new(store)
}

async fn sqlite() -> (DynStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}",
        dir.path().join("nested/telemetry.db").display()
    );
    let store = telemetry_store::open_migrated(&url, 2, &Default::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.kind(), "sqlite");
    (store, dir)
}

fn record(device: &str, device_ts: i64, seq: Option<u64>, temperature: f64) -> CleanedRecord {
    let validator = Validator::new(Contract::default()).unwrap();
    let seq = seq.map_or(String::new(), |seq| format!(r#","seq":{seq}"#));
    let payload = format!(
        r#"{{"device_id":"{device}","device_ts":{device_ts}{seq},"temperature_c":{temperature},"humidity_pct":40,"firmware":"1.2"}}"#
    );
    let Outcome::Accepted(event) = validator.validate(payload.as_bytes(), device_ts) else {
        panic!("{payload} is valid");
    };
    CleanedRecord {
        event,
        source: SourcePosition {
            topic: "raw".into(),
            partition: 0,
            offset: device_ts,
        },
    }
}

fn rejected<'a>(
    offset: i64,
    device_id: Option<&'a str>,
    received_at: i64,
    code: &'a str,
) -> NewDeadLetter<'a> {
    NewDeadLetter {
        source_topic: "raw",
        source_partition: 0,
        source_offset: offset,
        device_id,
        received_at,
        code,
        message: "not JSON",
        field: None,
        rule: Some("json"),
        contract_version: 1,
        payload: b"\xffoops",
    }
}

/// A whole minute in the recent past, so per-minute counts are deterministic.
fn base_time() -> DateTime<Utc> {
    let now = Utc::now().timestamp_millis();
    DateTime::from_timestamp_millis(now - now.rem_euclid(60_000) - 120_000).unwrap()
}

async fn idempotent_rows(store: &dyn TelemetryStore) {
    let t0 = base_time().timestamp_millis();
    let (a, b, c) = (
        record("d1", t0, Some(1), 20.0),
        record("d1", t0 + 1_000, Some(2), 21.0),
        record("d1", t0 + 2_000, None, 22.0),
    );
    let live = Table::live();
    assert_eq!(
        store
            .insert_events_into(&live, &[a.clone(), b.clone()])
            .await
            .unwrap(),
        2
    );
    // A redelivered batch overlapping the stored one, with one event twice in it.
    assert_eq!(
        store
            .insert_events_into(&live, &[b.clone(), c.clone(), c.clone()])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store.insert_events_into(&live, &[a, b, c]).await.unwrap(),
        0
    );
    assert_eq!(store.count_events().await.unwrap(), 3);
    // Same device time, another sequence number: another event.
    let d = record("d1", t0, Some(9), 25.0);
    assert_eq!(store.insert_events_into(&live, &[d]).await.unwrap(), 1);
    assert_eq!(store.count_events().await.unwrap(), 4);

    let letter = |offset| rejected(offset, Some("d1"), t0 + 3_000, "invalid_json");
    store.insert_dead_letters(&[letter(10)]).await.unwrap();
    store
        .insert_dead_letters(&[letter(10), letter(11), letter(11)])
        .await
        .unwrap();
    assert_eq!(store.count_dead_letters().await.unwrap(), 2);

    let devices = store.devices(Utc::now(), &EVERY_DEVICE).await.unwrap();
    assert_eq!(devices.len(), 1);
    let device = &devices[0];
    assert_eq!(device.device_id, "d1");
    assert_eq!(device.events_last_hour, 4, "each new row counted once");
    assert_eq!(device.events_last_day, 4);
    assert_eq!(device.dlq_last_hour, 2, "each new rejection counted once");
    assert_eq!(device.first_seen.timestamp_millis(), t0);
    assert_eq!(device.last_seen.timestamp_millis(), t0 + 3_000);
    assert_eq!(device.last_accepted.unwrap().timestamp_millis(), t0 + 2_000);
    assert_eq!(device.last_rejected.unwrap().timestamp_millis(), t0 + 3_000);
    assert_eq!(device.metrics, vec!["humidity_pct", "temperature_c"]);
}

async fn api_queries(store: &dyn TelemetryStore) {
    let t0 = base_time();
    let ms = t0.timestamp_millis();
    let records: Vec<_> = (0..6)
        .map(|i| record("pico-1", ms + i * 10_000, Some(i as u64), 20.0 + i as f64))
        .chain([record("pico-2", ms, Some(1), 5.0)])
        .collect();
    store
        .insert_events_into(&Table::live(), &records)
        .await
        .unwrap();
    assert!(store.device_exists("pico-1").await.unwrap());
    assert!(!store.device_exists("pico-1 ").await.unwrap());
    assert!(!store.device_exists("pico-3").await.unwrap());
    assert_eq!(store.first_event_ts("pico-1").await.unwrap(), Some(ms));
    assert_eq!(store.first_event_ts("pico-3").await.unwrap(), None);

    // 20, 21, 22 in the first 30 s bucket; 23, 24, 25 in the second.
    let buckets = store
        .series(&SeriesQuery {
            device_id: "pico-1",
            metric: "temperature_c",
            from: t0,
            to: t0 + Duration::minutes(1),
            bucket: Duration::seconds(30),
        })
        .await
        .unwrap();
    assert_eq!(buckets.len(), 2, "{buckets:?}");
    assert_eq!((buckets[0].start, buckets[0].count), (ms, 3));
    assert_eq!(
        (buckets[0].min, buckets[0].avg, buckets[0].max),
        (20.0, 21.0, 22.0)
    );
    assert_eq!((buckets[1].start, buckets[1].count), (ms + 30_000, 3));
    assert_eq!(
        (buckets[1].min, buckets[1].avg, buckets[1].max),
        (23.0, 24.0, 25.0)
    );
    // The range's end is exclusive; an unknown metric has no buckets.
    let first_only = store
        .series(&SeriesQuery {
            device_id: "pico-1",
            metric: "temperature_c",
            from: t0,
            to: t0 + Duration::seconds(10),
            bucket: Duration::seconds(30),
        })
        .await
        .unwrap();
    assert_eq!(first_only.len(), 1);
    assert_eq!(first_only[0].count, 1);
    let none = store
        .series(&SeriesQuery {
            device_id: "pico-1",
            metric: "pressure_hpa",
            from: t0,
            to: t0 + Duration::minutes(1),
            bucket: Duration::seconds(30),
        })
        .await
        .unwrap();
    assert!(none.is_empty());

    store
        .insert_dead_letters(&[
            rejected(100, Some("pico-1"), ms, "invalid_json"),
            rejected(101, Some("pico-2"), ms + 1, "out_of_range"),
            rejected(102, None, ms + 2, "invalid_json"),
            rejected(103, Some("greenhouse-1"), ms + 3, "invalid_json"),
        ])
        .await
        .unwrap();
    let every = DeviceScope::All;
    let list = |device_id, code, scope| DeadLetterFilter {
        device_id,
        code,
        scope,
        limit: 10,
        max_payload_bytes: 65_536,
    };
    let all = store.dead_letters(&list(None, None, &every)).await.unwrap();
    assert_eq!(
        all.iter()
            .map(|entry| entry.source_offset)
            .collect::<Vec<_>>(),
        vec![103, 102, 101, 100],
        "newest first"
    );
    assert_eq!(all[3].payload, b"\xffoops", "original bytes kept");
    assert_eq!(all[3].payload_bytes, 5);
    assert_eq!(all[3].device_id.as_deref(), Some("pico-1"));
    assert_eq!(all[1].device_id, None);
    let by_code = store
        .dead_letters(&list(None, Some("out_of_range"), &every))
        .await
        .unwrap();
    assert_eq!(by_code.len(), 1);
    assert_eq!(by_code[0].device_id.as_deref(), Some("pico-2"));
    let by_device = store
        .dead_letters(&list(Some("pico-1"), None, &every))
        .await
        .unwrap();
    assert_eq!(by_device.len(), 1);
    let picos = DeviceScope::Only(vec![DevicePattern::parse("pico-*").unwrap()]);
    let scoped = store.dead_letters(&list(None, None, &picos)).await.unwrap();
    assert_eq!(
        scoped
            .iter()
            .map(|entry| entry.source_offset)
            .collect::<Vec<_>>(),
        vec![101, 100],
        "a scope shows only its devices, and no record without a device"
    );
    let limited = store
        .dead_letters(&DeadLetterFilter {
            limit: 2,
            ..list(None, None, &every)
        })
        .await
        .unwrap();
    assert_eq!(limited.len(), 2);
    // Payloads cut by the query, the full length kept.
    let cut = store
        .dead_letters(&DeadLetterFilter {
            max_payload_bytes: 3,
            ..list(Some("pico-1"), None, &every)
        })
        .await
        .unwrap();
    assert_eq!(cut[0].payload, b"\xffoo");
    assert_eq!(cut[0].payload_bytes, 5);
    let none = store
        .dead_letters(&DeadLetterFilter {
            max_payload_bytes: 0,
            ..list(Some("pico-1"), None, &every)
        })
        .await
        .unwrap();
    assert!(none[0].payload.is_empty());

    // Two hours ago: in the day's counts, not the hour's.
    let earlier = (t0 - Duration::hours(2)).timestamp_millis();
    store
        .insert_events_into(&Table::live(), &[record("pico-2", earlier, Some(0), 4.0)])
        .await
        .unwrap();
    store
        .insert_dead_letters(&[rejected(99, Some("pico-2"), earlier, "invalid_json")])
        .await
        .unwrap();

    let devices = store.devices(Utc::now(), &EVERY_DEVICE).await.unwrap();
    let ids: Vec<_> = devices
        .iter()
        .map(|device| device.device_id.as_str())
        .collect();
    assert_eq!(
        ids,
        vec!["greenhouse-1", "pico-1", "pico-2"],
        "sorted by id"
    );
    assert_eq!(devices[0].events_last_hour, 0);
    assert_eq!(devices[0].dlq_last_hour, 1);
    assert_eq!(devices[0].last_accepted, None, "only rejected records");
    assert!(devices[0].metrics.is_empty());
    assert_eq!(devices[1].events_last_hour, 6);
    let pico_2 = &devices[2];
    assert_eq!((pico_2.events_last_hour, pico_2.events_last_day), (1, 2));
    assert_eq!((pico_2.dlq_last_hour, pico_2.dlq_last_day), (1, 2));
    assert_eq!(pico_2.first_seen.timestamp_millis(), earlier);

    // Pruning: the DLQ index drops what is older than its retention, then keeps the newest rows;
    // old minutes go.
    assert_eq!(store.count_dead_letters().await.unwrap(), 5);
    let pruned = store
        .prune_dead_letters(t0 - Duration::hours(1), 100)
        .await
        .unwrap();
    assert_eq!(pruned, 1, "the one older than the retention");
    let pruned = store
        .prune_dead_letters(t0 - Duration::days(1), 3)
        .await
        .unwrap();
    assert_eq!(pruned, 1, "the oldest beyond the newest 3");
    let kept: Vec<_> = store
        .dead_letters(&list(None, None, &every))
        .await
        .unwrap()
        .iter()
        .map(|entry| entry.source_offset)
        .collect();
    assert_eq!(kept, vec![103, 102, 101], "the newest stay");
    store
        .prune_device_minutes(Utc::now() + Duration::minutes(1))
        .await
        .unwrap();
    let devices = store.devices(Utc::now(), &EVERY_DEVICE).await.unwrap();
    assert_eq!(devices[1].events_last_hour, 0, "counts pruned");
    assert_eq!(devices.len(), 3, "devices stay");
    assert!(store.rollup_coverage("pico-1").await.unwrap().is_none());
}

#[tokio::test]
async fn mysql_rows_are_idempotent() {
    idempotent_rows(mysql().await.as_ref()).await;
}

#[tokio::test]
async fn sqlite_rows_are_idempotent() {
    let (store, _dir) = sqlite().await;
    idempotent_rows(store.as_ref()).await;
}

#[tokio::test]
async fn mysql_answers_the_api_queries() {
    api_queries(mysql().await.as_ref()).await;
}

#[tokio::test]
async fn sqlite_answers_the_api_queries() {
    let (store, _dir) = sqlite().await;
    api_queries(store.as_ref()).await;
}

#[tokio::test]
async fn sqlite_keeps_rows_across_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("telemetry.db").display());
    let open = || async {
        telemetry_store::open_migrated(&url, 1, &Default::default())
            .await
            .unwrap()
            .unwrap()
    };
    let t0 = base_time().timestamp_millis();
    let batch = [
        record("d1", t0, Some(1), 1.0),
        record("d1", t0 + 1, Some(2), 2.0),
    ];
    let first = open().await;
    assert_eq!(
        first
            .insert_events_into(&Table::live(), &batch)
            .await
            .unwrap(),
        2
    );
    drop(first);
    let second = open().await;
    assert_eq!(second.count_events().await.unwrap(), 2);
    assert_eq!(
        second
            .insert_events_into(&Table::live(), &batch)
            .await
            .unwrap(),
        0
    );
    assert!(
        second
            .insert_events_into(&Table::new("rebuilt").unwrap(), &batch)
            .await
            .is_err(),
        "a table that was never prepared for a rebuild (`prepare_rebuild`) is not written"
    );
}

#[tokio::test]
async fn a_bad_sqlite_url_is_a_clear_error() {
    let error = telemetry_store::open_reader("sqlite://", 1)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("give a file"), "{error}");
}

/// Every page of `limit` devices in `scope`, following each page's last id, until a short page.
async fn pages(store: &dyn TelemetryStore, scope: &DeviceScope, limit: u32) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .devices(
                Utc::now(),
                &DevicePage {
                    after: after.as_deref(),
                    scope,
                    limit,
                },
            )
            .await
            .unwrap();
        assert!(page.len() <= limit as usize);
        for device in &page {
            assert!(scope.allows(&device.device_id), "{}", device.device_id);
            assert_eq!(
                device.metrics,
                ["humidity_pct", "temperature_c"],
                "the metrics of {}, found on its page",
                device.device_id
            );
            assert_eq!(device.events_last_day, 1);
        }
        let ids: Vec<String> = page.iter().map(|device| device.device_id.clone()).collect();
        after = ids.last().cloned();
        let full = ids.len() == limit as usize;
        pages.push(ids);
        if !full {
            return pages;
        }
    }
}

async fn devices_are_paged_in_the_query(store: &dyn TelemetryStore) {
    let t0 = base_time().timestamp_millis();
    // Greenhouses between the picos, so a scope of picos skips rows in the middle of pages.
    let mut ids: Vec<String> = (0..25)
        .map(|index| {
            if index % 3 == 0 {
                format!("pico-{index:02}-greenhouse")
            } else {
                format!("pico-{index:02}")
            }
        })
        .collect();
    let records: Vec<_> = ids
        .iter()
        .zip(0..)
        .map(|(id, offset)| record(id, t0 + offset, Some(0), 20.0))
        .collect();
    store
        .insert_events_into(&Table::live(), &records)
        .await
        .unwrap();
    ids.sort();

    for limit in [1, 4, 25, 100] {
        let pages = pages(store, &ALL, limit).await;
        let walked: Vec<String> = pages.iter().flatten().cloned().collect();
        assert_eq!(walked, ids, "pages of {limit}: every device once, in order");
    }
    // A scope: its devices only, and every page but the last full.
    let greenhouses = DeviceScope::Only(vec![
        DevicePattern::parse("pico-0*").unwrap(),
        DevicePattern::parse("pico-21-greenhouse").unwrap(),
    ]);
    let expected: Vec<String> = ids
        .iter()
        .filter(|id| greenhouses.allows(id))
        .cloned()
        .collect();
    assert_eq!(expected.len(), 11);
    let pages = pages(store, &greenhouses, 4).await;
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        [4, 4, 3],
        "full pages: the scope is applied in the query, before the limit"
    );
    assert_eq!(pages.concat(), expected);
    // After the last device: nothing.
    let last = ids.last().unwrap();
    let past = store
        .devices(
            Utc::now(),
            &DevicePage {
                after: Some(last),
                scope: &ALL,
                limit: 10,
            },
        )
        .await
        .unwrap();
    assert!(past.is_empty());
}

#[tokio::test]
async fn mysql_pages_devices() {
    devices_are_paged_in_the_query(mysql().await.as_ref()).await;
}

#[tokio::test]
async fn sqlite_pages_devices() {
    let (store, _dir) = sqlite().await;
    devices_are_paged_in_the_query(store.as_ref()).await;
}

/// Rows for a series query that takes well over [`TIMEOUT`]: `rows` readings a second apart.
async fn fill(store: &dyn TelemetryStore, rows: i64) -> DateTime<Utc> {
    let start = base_time() - Duration::seconds(rows);
    let t0 = start.timestamp_millis();
    // One record validated, copied to each second (validating each would take longer).
    let template = record("slow-1", t0, Some(0), 20.0);
    for chunk in (0..rows).collect::<Vec<_>>().chunks(10_000) {
        let records: Vec<_> = chunk
            .iter()
            .map(|second| {
                let mut record = template.clone();
                record.event.device_ts = t0 + second * 1_000;
                record.source.offset = *second;
                record
            })
            .collect();
        store
            .insert_events_into(&Table::live(), &records)
            .await
            .unwrap();
    }
    start
}

/// A statement timeout far below what the series query over [`fill`]'s rows takes (hundreds of
/// milliseconds), far above what an index lookup takes.
const TIMEOUT: std::time::Duration = std::time::Duration::from_millis(20);

async fn long_queries_are_stopped(writer: &dyn TelemetryStore, reader: &dyn TelemetryStore) {
    let rows = 100_000;
    let from = fill(writer, rows).await;
    let query = SeriesQuery {
        device_id: "slow-1",
        metric: "temperature_c",
        from,
        to: from + Duration::seconds(rows),
        bucket: Duration::minutes(10),
    };
    let started = std::time::Instant::now();
    let error = reader.series(&query).await.unwrap_err();
    assert!(error.is_statement_timeout(), "{error}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "stopped soon after the timeout, not run to the end: {:?}",
        started.elapsed()
    );
    // The reader goes on answering quick queries.
    assert!(reader.device_exists("slow-1").await.unwrap());
    // Without a timeout, the same query runs to the end.
    let buckets = writer.series(&query).await.unwrap();
    assert_eq!(
        buckets.iter().map(|bucket| bucket.count).sum::<u64>(),
        rows as u64
    );
}

#[tokio::test]
async fn mysql_stops_long_queries_at_the_statement_timeout() {
    let url = telemetry_testkit::database_url(&telemetry_testkit::unique("timeout"));
    let writer = Store::connect(&url, 2).await.unwrap();
    writer.migrate().await.unwrap();
    let reader = telemetry_store::open_bounded_reader(&url, 2, Some(TIMEOUT))
        .await
        .unwrap();
    long_queries_are_stopped(&writer, reader.as_ref()).await;
}

#[tokio::test]
async fn sqlite_stops_long_queries_at_the_statement_timeout() {
    let (writer, dir) = sqlite().await;
    let url = format!(
        "sqlite://{}",
        dir.path().join("nested/telemetry.db").display()
    );
    let reader = telemetry_store::open_bounded_reader(&url, 1, Some(TIMEOUT))
        .await
        .unwrap();
    long_queries_are_stopped(writer.as_ref(), reader.as_ref()).await;
}

fn event(
    device: &str,
    device_ts: i64,
    seq: Option<u64>,
    temperature: f64,
) -> telemetry_core::Event {
    record(device, device_ts, seq, temperature).event
}

/// The rollup's writes: a batch folded once however often it is delivered, late events left out,
/// exact sums, the last reading by device time; what the API reads back.
async fn rollups(store: &dyn TelemetryStore) -> Vec<telemetry_store::RollupRow> {
    use telemetry_store::{Resolution, RollupOutcome};
    // 2024-01-01T10:00:00Z: a whole hour.
    let hour = 1_704_103_200_000;
    let batch = [
        event("d1", hour + 1_000, Some(1), 20.1),
        event("d1", hour + 2_000, Some(2), 20.2),
        event("d1", hour + 2_000, Some(2), 20.2),
        event("d1", hour + 61_000, Some(3), -0.3),
        event("d2", hour + 5_000, None, 7.0),
    ];
    let first = store.roll_up(&batch, 600_000).await.unwrap();
    assert_eq!(
        first,
        RollupOutcome {
            folded: 4,
            duplicates: 1,
            too_late: 0,
            skipped_readings: 0,
        }
    );
    // Redelivered, and a later batch overlapping it: nothing twice.
    let again = store.roll_up(&batch, 600_000).await.unwrap();
    assert_eq!((again.folded, again.duplicates), (0, 5));
    let later = [
        event("d1", hour + 2_000, Some(2), 20.2),
        event("d1", hour + 62_000, Some(4), 0.4),
        // 20 minutes after the watermark, then one 30 minutes before it: too late.
        event("d1", hour + 1_261_000, Some(5), 1.0),
        event("d1", hour + 61_000 - 1_800_000, Some(0), 99.0),
    ];
    let outcome = store.roll_up(&later, 600_000).await.unwrap();
    assert_eq!(
        (outcome.folded, outcome.duplicates, outcome.too_late),
        (2, 1, 1)
    );

    let coverage = store.rollup_coverage("d1").await.unwrap().unwrap();
    assert_eq!(
        (coverage.first_ts, coverage.watermark_ts),
        (hour + 1_000, hour + 1_261_000)
    );
    assert!(store.rollup_coverage("d3").await.unwrap().is_none());

    let minutes = store
        .rollup_rows(Resolution::Minute, &["d1"])
        .await
        .unwrap();
    let temperature: Vec<_> = minutes
        .iter()
        .filter(|row| row.metric == "temperature_c")
        .collect();
    assert_eq!(temperature.len(), 3, "{temperature:?}");
    let first_minute = temperature[0].aggregate;
    assert_eq!(temperature[0].bucket_start, hour);
    assert_eq!(first_minute.samples, 2);
    assert_eq!(first_minute.sum_nanos, 40_300_000_000, "exact sum");
    assert_eq!((first_minute.min, first_minute.max), (20.1, 20.2));
    assert_eq!(
        (first_minute.last, first_minute.last_ts),
        (20.2, hour + 2_000)
    );
    let second_minute = temperature[1].aggregate;
    assert_eq!(second_minute.samples, 2);
    assert_eq!(second_minute.sum_nanos, 100_000_000);
    assert_eq!(
        second_minute.last, 0.4,
        "the later reading, from the later batch"
    );

    let hours = store.rollup_rows(Resolution::Hour, &["d1"]).await.unwrap();
    let hourly = hours
        .iter()
        .find(|row| row.metric == "temperature_c")
        .unwrap();
    assert_eq!((hourly.bucket_start, hourly.aggregate.samples), (hour, 5));

    let from = DateTime::from_timestamp_millis(hour).unwrap();
    let series = store
        .rollup_series(
            Resolution::Minute,
            "d1",
            "temperature_c",
            from,
            from + Duration::hours(1),
            120_000,
        )
        .await
        .unwrap();
    assert_eq!(series.len(), 2, "{series:?}");
    assert_eq!((series[0].start, series[0].count), (hour, 4));
    assert!((series[0].avg - 40.4 / 4.0).abs() < 1e-9, "{series:?}");
    assert_eq!((series[0].min, series[0].max), (-0.3, 20.2));
    assert_eq!((series[1].start, series[1].count), (hour + 1_200_000, 1));

    store.rollup_rows(Resolution::Minute, &[]).await.unwrap()
}

#[tokio::test]
async fn mysql_and_sqlite_fold_the_same_rollups() {
    let mysql_rows = rollups(mysql().await.as_ref()).await;
    let (sqlite, _dir) = sqlite().await;
    let sqlite_rows = rollups(sqlite.as_ref()).await;
    assert!(!mysql_rows.is_empty());
    assert_eq!(mysql_rows, sqlite_rows, "the same rows, bit for bit");
}

/// The alerter's writes: states, the outbox written once per transition, offsets that only move
/// forward, Kafka and webhook bookkeeping, what the API lists, and pruning.
async fn alerts(store: &dyn TelemetryStore) {
    use telemetry_store::{AlertOffset, NewAlert};
    let offset = |partition, next_offset| AlertOffset {
        topic: "cleaned".into(),
        partition,
        next_offset,
    };
    let alert = |alert_id, status, device_id, payload| NewAlert {
        alert_id,
        status,
        device_id,
        payload,
    };
    let fired = [
        alert(
            "hot:d1:1",
            "firing",
            "d1",
            r#"{"id":"hot:d1:1","status":"firing"}"#,
        ),
        alert(
            "hot:d2:1",
            "firing",
            "d2",
            r#"{"id":"hot:d2:1","status":"firing"}"#,
        ),
    ];
    let states = [
        ("hot", "d1", Some(r#"{"phase":"firing"}"#)),
        ("hot", "d2", Some(r#"{"phase":"firing"}"#)),
    ];
    for _ in 0..2 {
        store
            .save_alerts("g", &[offset(0, 10), offset(1, 5)], &states, &fired, true)
            .await
            .unwrap();
    }
    // An older offset does not move it back; another group's are its own.
    store
        .save_alerts("g", &[offset(0, 3)], &[], &[], true)
        .await
        .unwrap();
    let mut offsets = store.alert_offsets("g").await.unwrap();
    offsets.sort_by_key(|offset| offset.partition);
    assert_eq!(offsets, [offset(0, 10), offset(1, 5)]);
    assert!(store.alert_offsets("other").await.unwrap().is_empty());
    let mut stored = store.alert_states().await.unwrap();
    stored.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[0].state, r#"{"phase":"firing"}"#);

    let pending = store.unproduced_alerts(10).await.unwrap();
    assert_eq!(pending.len(), 2, "each alert once: {pending:?}");
    assert_eq!(pending[0].alert_id, "hot:d1:1");
    store.mark_alerts_produced(&[pending[0].id]).await.unwrap();
    let pending = store.unproduced_alerts(10).await.unwrap();
    assert_eq!(pending.len(), 1);

    // d1 resolves; its state goes.
    store
        .save_alerts(
            "g",
            &[offset(0, 11)],
            &[("hot", "d1", None)],
            &[alert(
                "hot:d1:1",
                "resolved",
                "d1",
                r#"{"id":"hot:d1:1","status":"resolved"}"#,
            )],
            true,
        )
        .await
        .unwrap();
    assert_eq!(store.alert_states().await.unwrap().len(), 1);
    let listed = store.recent_alerts(None, &ALL, false, 10).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(
        listed[0].fired, r#"{"id":"hot:d2:1","status":"firing"}"#,
        "newest first"
    );
    assert_eq!(listed[0].resolved, None);
    assert_eq!(
        listed[1].resolved.as_deref(),
        Some(r#"{"id":"hot:d1:1","status":"resolved"}"#)
    );
    let firing = store.recent_alerts(None, &ALL, true, 10).await.unwrap();
    assert_eq!(firing.len(), 1);
    let of_d1 = store
        .recent_alerts(Some("d1"), &ALL, false, 10)
        .await
        .unwrap();
    assert_eq!(of_d1.len(), 1);
    let only_d2 = DeviceScope::Only(vec![DevicePattern::Exact("d2".into())]);
    assert_eq!(
        store
            .recent_alerts(None, &only_d2, false, 10)
            .await
            .unwrap()
            .len(),
        1
    );

    // The webhook: a failed attempt waits, then delivered; the queue empties.
    let queue = store.webhook_queue(10).await.unwrap();
    assert_eq!(queue.len(), 3);
    let retry_at = DateTime::from_timestamp_millis(4_102_444_800_000).unwrap();
    store
        .webhook_attempted(queue[0].id, false, Some(retry_at))
        .await
        .unwrap();
    let queue = store.webhook_queue(10).await.unwrap();
    assert_eq!((queue[0].attempts, queue[0].next_attempt_at), (1, retry_at));
    for entry in &queue {
        store.webhook_attempted(entry.id, true, None).await.unwrap();
    }
    assert!(store.webhook_queue(10).await.unwrap().is_empty());

    // Pruning takes the resolved alert's two rows once produced; the firing one stays.
    let ids: Vec<u64> = store
        .unproduced_alerts(10)
        .await
        .unwrap()
        .iter()
        .map(|entry| entry.id)
        .collect();
    store.mark_alerts_produced(&ids).await.unwrap();
    let future = Utc::now() + Duration::hours(1);
    assert_eq!(store.prune_alert_outbox(future).await.unwrap(), 2);
    let left = store.recent_alerts(None, &ALL, false, 10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].fired, r#"{"id":"hot:d2:1","status":"firing"}"#);
}

#[tokio::test]
async fn mysql_keeps_the_alerters_state() {
    alerts(mysql().await.as_ref()).await;
}

#[tokio::test]
async fn sqlite_keeps_the_alerters_state() {
    let (store, _dir) = sqlite().await;
    alerts(store.as_ref()).await;
}

/// `telemetry dlq replay`'s ledger: one replay at a time, each DLQ record stored once however
/// often it is replayed, and its cleaned record pending until Kafka acknowledged it.
async fn dlq_replays(store: &dyn TelemetryStore) {
    use telemetry_store::{DeadLetterReplay, DlqPosition};

    let lock = store.lock_dlq_replay().await.unwrap();
    assert!(matches!(
        store.lock_dlq_replay().await,
        Err(telemetry_store::Error::Busy(_))
    ));
    drop(lock);
    let _lock = store.lock_dlq_replay().await.unwrap();

    let t0 = base_time().timestamp_millis();
    let at = |offset| DlqPosition {
        topic: "dlq".into(),
        partition: 1,
        offset,
    };
    let fixed = record("d-replay", t0, Some(1), 20.0);
    let json = serde_json::to_string(&fixed).unwrap();
    assert_eq!(
        store
            .replay_dead_letter(&at(10), &fixed, &json)
            .await
            .unwrap(),
        DeadLetterReplay::Stored
    );
    assert_eq!(
        store
            .replay_dead_letter(&at(10), &fixed, &json)
            .await
            .unwrap(),
        DeadLetterReplay::AlreadyReplayed
    );
    let pending = store.pending_cleaned().await.unwrap();
    assert_eq!(pending, [(at(10), "d-replay".to_string(), json.clone())]);

    // Sent again by the device and stored by the audit service (another raw record): its cleaned
    // record went out then, so nothing is pending for it.
    let resent = record("d-replay", t0 + 1_000, Some(2), 21.0);
    store
        .insert_events_into(&Table::live(), std::slice::from_ref(&resent))
        .await
        .unwrap();
    let mut replayed = resent.clone();
    replayed.source.offset += 1_000_000;
    let replayed_json = serde_json::to_string(&replayed).unwrap();
    assert_eq!(
        store
            .replay_dead_letter(&at(11), &replayed, &replayed_json)
            .await
            .unwrap(),
        DeadLetterReplay::AlreadyStored
    );
    // Stored from this very raw record by `telemetry replay`: nothing produced it, it stays pending.
    let rebuilt = record("d-replay", t0 + 2_000, Some(3), 22.0);
    store
        .insert_events_into(&Table::live(), std::slice::from_ref(&rebuilt))
        .await
        .unwrap();
    let rebuilt_json = serde_json::to_string(&rebuilt).unwrap();
    assert_eq!(
        store
            .replay_dead_letter(&at(12), &rebuilt, &rebuilt_json)
            .await
            .unwrap(),
        DeadLetterReplay::AlreadyStored
    );
    let pending: Vec<DlqPosition> = store
        .pending_cleaned()
        .await
        .unwrap()
        .into_iter()
        .map(|(position, ..)| position)
        .collect();
    assert_eq!(pending, [at(10), at(12)]);

    store
        .mark_cleaned_produced(&[at(10), at(12)])
        .await
        .unwrap();
    assert!(store.pending_cleaned().await.unwrap().is_empty());
    assert_eq!(store.count_events().await.unwrap(), 3);
}

#[tokio::test]
async fn mysql_replays_dead_letters_once() {
    dlq_replays(mysql().await.as_ref()).await;
}

#[tokio::test]
async fn sqlite_replays_dead_letters_once() {
    let (store, _dir) = sqlite().await;
    dlq_replays(store.as_ref()).await;
}

/// `telemetry replay --into` and `replay swap`: a copy of the live table's schema filled apart,
/// swapped in, and swapped back.
async fn rebuilds(store: &dyn TelemetryStore) {
    let t0 = base_time().timestamp_millis();
    let live = Table::live();
    let events: Vec<_> = (0..3)
        .map(|seq| {
            record(
                "d-rebuild",
                t0 + seq * 1_000,
                Some(seq.unsigned_abs()),
                20.0,
            )
        })
        .collect();
    store.insert_events_into(&live, &events).await.unwrap();

    let rebuilt = Table::new("rebuilt").unwrap();
    store.prepare_rebuild(&rebuilt).await.unwrap();
    // Again: the table is there and like the live one.
    store.prepare_rebuild(&rebuilt).await.unwrap();
    assert_eq!(
        store
            .insert_events_into(&rebuilt, &events[..2])
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        store
            .insert_events_into(&rebuilt, &events[..2])
            .await
            .unwrap(),
        0,
        "idempotent in the copy too"
    );
    assert_eq!(
        store.count_events().await.unwrap(),
        3,
        "the live table is untouched"
    );

    let kept = Table::new("telemetry_before").unwrap();
    store.swap_into_live(&rebuilt, &kept).await.unwrap();
    assert_eq!(store.count_events().await.unwrap(), 2);
    // The kept table is like the live one: it can be swapped back.
    store.prepare_rebuild(&kept).await.unwrap();
    store
        .swap_into_live(&kept, &Table::new("rebuilt_again").unwrap())
        .await
        .unwrap();
    assert_eq!(store.count_events().await.unwrap(), 3);
}

#[tokio::test]
async fn mysql_rebuilds_and_swaps_the_table() {
    rebuilds(mysql().await.as_ref()).await;
}

#[tokio::test]
async fn sqlite_rebuilds_and_swaps_the_table() {
    let (store, dir) = sqlite().await;
    // An operator's index and trigger on the live table: the copy takes the index, not the
    // trigger (as MySQL's `CREATE TABLE ... LIKE`).
    let database = libsql::Builder::new_local(dir.path().join("nested/telemetry.db"))
        .build()
        .await
        .unwrap();
    database
        .connect()
        .unwrap()
        .execute_batch(
            "CREATE INDEX by_arrival\n  on telemetry (received_at); \
             CREATE TRIGGER no_far_future BEFORE INSERT ON telemetry \
             WHEN NEW.device_ts > 253402300799999 BEGIN SELECT RAISE(ABORT, 'too far'); END;",
        )
        .await
        .unwrap();
    rebuilds(store.as_ref()).await;
    // Again into the first name, after two swaps left copies of the index on other tables.
    let again = Table::new("rebuilt").unwrap();
    store.prepare_rebuild(&again).await.unwrap();
    store
        .swap_into_live(&again, &Table::new("third").unwrap())
        .await
        .unwrap();
    assert_eq!(store.count_events().await.unwrap(), 0);
}
