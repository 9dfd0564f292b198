//! Validate + normalize throughput over a realistic mix: 80% valid, 20% invalid payloads of about
//! 200 bytes (the group name carries the exact average), as a fleet sends them, through the
//! shipped contract. Run: `cargo bench -p telemetry-core --bench validate`.
#![allow(missing_docs, clippy::unwrap_used)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use telemetry_core::{Contract, Outcome, Validator};

/// When the bridge received every payload: 2025-11-28T03:20:00Z plus a little.
const RECEIVED_AT: i64 = 1_764_300_000_500;

/// 1,000 payloads: 800 valid in the forms devices use, 200 invalid of every kind.
fn fleet_mix() -> Vec<Vec<u8>> {
    let mut payloads = Vec::with_capacity(1_000);
    for index in 0..1_000u64 {
        let device = index % 50;
        let ts = 1_764_300_000_000 - (1_000 - index) * 50;
        let payload = match index % 10 {
            // Valid: canonical names in milliseconds, with firmware kept as an attribute.
            0..=3 => format!(
                r#"{{"device_id":"pico-w-{device:04}","device_ts":{ts},"seq":{index},"temperature_c":{:.2},"humidity_pct":{:.1},"battery_v":3.71,"rssi_dbm":-67,"pressure_hpa":1013.2,"uptime_s":{},"firmware":"rp2040-1.4.2"}}"#,
                20.0 + (index % 70) as f64 / 10.0,
                40.0 + (index % 30) as f64,
                index * 60
            ),
            // Valid: aliases, seconds, a unit conversion and a numeric string.
            4..=5 => format!(
                r#"{{"deviceId":"pico-w-{device:04}","ts":{},"seq":{index},"temp":21.37,"humidity":"44.5","pressure":1013.2,"battery_mv":3690,"rssi":-71,"uptime_s":86400,"wifi_channel":6}}"#,
                ts / 1_000
            ),
            // Valid: RFC 3339 with an offset, Fahrenheit.
            6..=7 => format!(
                r#"{{"device_id":"pico-w-{device:04}","device_ts":"2025-11-28T04:19:{:02}.250+01:00","seq":{index},"temperature_f":67.6,"humidity":51.0,"battery_v":3.7,"rssi_dbm":-80,"pressure_hpa":1009.9,"firmware":"rp2040-1.4.2"}}"#,
                index % 60
            ),
            // Invalid: missing id, bad timestamp, not JSON, truncated, out of range.
            8 => match index % 5 {
                0 => format!(r#"{{"device_ts":{ts},"seq":{index},"temperature_c":21.5,"humidity_pct":40.0,"battery_v":3.7,"rssi_dbm":-70,"pressure_hpa":1013.2,"firmware":"1.4.2"}}"#),
                1 => format!(r#"{{"device_id":"pico-w-{device:04}","device_ts":"yesterday at noon","seq":{index},"temperature_c":21.5,"humidity_pct":40.0,"battery_v":3.7,"rssi_dbm":-70}}"#),
                2 => "temperature=21.5;humidity=40.0;battery=3.7;device=pico-w-0001;ts=1764300000000;seq=5;rssi=-70;pressure=1013.2;firmware=1.4.2;uptime=86400;mode=eco".to_string(),
                3 => format!(r#"{{"device_id":"pico-w-{device:04}","device_ts":{ts},"seq":{index},"temperature_c":21.5,"humidity_pct":40.0,"battery_v":3.7,"rssi_dbm":-70,"pressure_hpa":10"#),
                _ => format!(r#"{{"device_id":"pico-w-{device:04}","device_ts":{ts},"seq":{index},"temperature_c":21.5,"humidity_pct":140.0,"battery_v":3.7,"rssi_dbm":-70,"pressure_hpa":1013.2}}"#),
            },
            _ => format!(r#"{{"device_id":{device},"device_ts":{ts},"seq":{index},"temperature_c":21.5,"humidity_pct":40.0,"battery_v":3.7,"rssi_dbm":-70,"pressure_hpa":1013.2,"firmware":"1.4.2"}}"#),
        };
        payloads.push(payload.into_bytes());
    }
    payloads
}

fn bench_validate(criterion: &mut Criterion) {
    let validator = Validator::new(Contract::default()).unwrap();
    let payloads = fleet_mix();
    let accepted = payloads
        .iter()
        .filter(|payload| {
            matches!(
                validator.validate(payload, RECEIVED_AT),
                Outcome::Accepted(_)
            )
        })
        .count();
    assert_eq!(accepted, 800, "the mix is 80% valid");
    let average = payloads.iter().map(Vec::len).sum::<usize>() / payloads.len();
    let mut group = criterion.benchmark_group(format!("validate_fleet_mix_{average}_bytes"));
    group.throughput(Throughput::Elements(payloads.len() as u64));
    group.bench_function("validate_and_normalize", |bencher| {
        bencher.iter(|| {
            for payload in &payloads {
                std::hint::black_box(
                    validator.validate(std::hint::black_box(payload), RECEIVED_AT),
                );
            }
        });
    });
    // For scale: only parsing the same bytes into a generic JSON value, with no rule applied,
    // the first step of a validator built on a JSON DOM.
    group.bench_function("reference_serde_json_value_parse_only", |bencher| {
        bencher.iter(|| {
            for payload in &payloads {
                let _ = std::hint::black_box(serde_json::from_slice::<serde_json::Value>(
                    std::hint::black_box(payload),
                ));
            }
        });
    });
    group.finish();

    // The same mix by shape, to show what each costs: the mix cycles through ten slots.
    let shapes: [(&str, &[u64]); 4] = [
        ("valid_canonical_with_attribute", &[0, 1, 2, 3]),
        ("valid_aliases_units_numeric_string", &[4, 5]),
        ("valid_rfc3339_fahrenheit", &[6, 7]),
        ("invalid", &[8, 9]),
    ];
    let mut group = criterion.benchmark_group("validate_by_shape");
    for (shape, slots) in shapes {
        let subset: Vec<&Vec<u8>> = payloads
            .iter()
            .zip(0u64..)
            .filter(|(_, index)| slots.contains(&(index % 10)))
            .map(|(payload, _)| payload)
            .collect();
        group.throughput(Throughput::Elements(subset.len() as u64));
        group.bench_function(shape, |bencher| {
            bencher.iter(|| {
                for payload in &subset {
                    std::hint::black_box(
                        validator.validate(std::hint::black_box(payload), RECEIVED_AT),
                    );
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench_validate);
criterion_main!(benches);
