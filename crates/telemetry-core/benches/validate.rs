//! Validate + normalize throughput over a realistic mix: 80% valid, 20% invalid payloads (130
//! bytes on average; the group name carries the exact figure), as a fleet sends them. Run: `cargo bench -p telemetry-core --bench validate`.
#![allow(missing_docs, clippy::unwrap_used)]

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use telemetry_core::{validate, Limits, Outcome};

/// 1,000 payloads: 800 valid in the forms devices use, 200 invalid of every kind.
fn fleet_mix() -> Vec<Vec<u8>> {
    let mut payloads = Vec::with_capacity(1_000);
    for index in 0..1_000u64 {
        let device = index % 50;
        let ts = 1_764_300_000_000 + index * 1_000;
        let payload = match index % 10 {
            // Valid: milliseconds, seconds, RFC 3339, with a sequence number and a few metrics.
            0..=3 => format!(
                r#"{{"device_id":"pico-{device:04}","device_ts":{ts},"seq":{index},"temperature":{:.2},"humidity":{:.1},"battery_v":3.71,"rssi":-67,"firmware":"1.4.2"}}"#,
                20.0 + (index % 70) as f64 / 10.0,
                40.0 + (index % 30) as f64
            ),
            4..=5 => format!(
                r#"{{"device_id":"pico-{device:04}","device_ts":{},"seq":{index},"temperature":21.37,"humidity":44.5,"pressure_hpa":1013.2,"battery_v":3.69}}"#,
                ts / 1_000
            ),
            6..=7 => format!(
                r#"{{"device_id":"pico-{device:04}","device_ts":"2025-11-28T03:{:02}:{:02}.250+01:00","seq":{index},"temperature":19.8,"humidity":51.0,"battery_v":3.7}}"#,
                index % 60,
                index % 60
            ),
            // Invalid: missing id, bad timestamp, not JSON, truncated.
            8 => match index % 4 {
                0 => format!(r#"{{"device_ts":{ts},"seq":{index},"temperature":21.5,"humidity":40.0,"battery_v":3.7,"rssi":-70}}"#),
                1 => format!(r#"{{"device_id":"pico-{device:04}","device_ts":"yesterday at noon","temperature":21.5,"humidity":40.0}}"#),
                2 => "temperature=21.5;humidity=40.0;battery=3.7;device=pico-0001;ts=1764300000000;seq=5".to_string(),
                _ => format!(r#"{{"device_id":"pico-{device:04}","device_ts":{ts},"seq":{index},"temperature":21.5,"humid"#),
            },
            _ => format!(r#"{{"device_id":{device},"device_ts":{ts},"seq":{index},"temperature":21.5,"humidity":40.0,"battery_v":3.7}}"#),
        };
        payloads.push(payload.into_bytes());
    }
    payloads
}

fn bench_validate(criterion: &mut Criterion) {
    let payloads = fleet_mix();
    let accepted = payloads
        .iter()
        .filter(|payload| {
            matches!(
                validate(payload, 0, &Limits::default()),
                Outcome::Accepted(_)
            )
        })
        .count();
    assert_eq!(accepted, 800, "the mix is 80% valid");
    let average = payloads.iter().map(Vec::len).sum::<usize>() / payloads.len();
    let mut group = criterion.benchmark_group(format!("validate_fleet_mix_{average}_bytes"));
    group.throughput(Throughput::Elements(payloads.len() as u64));
    group.bench_function("validate_and_normalize", |bencher| {
        bencher.iter_batched(
            || (),
            |()| {
                for payload in &payloads {
                    std::hint::black_box(validate(
                        std::hint::black_box(payload),
                        1_764_300_000_500,
                        &Limits::default(),
                    ));
                }
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

criterion_group!(benches, bench_validate);
criterion_main!(benches);
