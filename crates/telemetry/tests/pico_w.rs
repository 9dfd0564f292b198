//! The Pico W example builds payloads the contract accepts: its `payload.py` runs under CPython
//! and every payload is validated with the shipped contract.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::process::Command;

use telemetry_core::{Contract, Outcome, Validator};

#[test]
fn the_pico_w_example_builds_payloads_the_contract_accepts() {
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/pico-w");
    let now: i64 = 1_795_946_400_000;
    let script = format!(
        r#"
import sys
sys.path.insert(0, {example:?})
from payload import adc_to_celsius, build_payload, topic_for
# The ADC reading of 0.706 V is 27 C; a few raw readings around room temperature.
print(round(adc_to_celsius(0.706 / 3.3 * 65535), 3))
for seq, raw in enumerate([14000, 14200, 13800, 14100], start=1):
    print(build_payload("pico-w-e66138528372a92c", seq, {now} + seq * 10000, adc_to_celsius(raw), rssi_dbm=-58, firmware="pico-w-example-1.0").decode())
print(topic_for("pico-w-e66138528372a92c"))
"#,
        example = example.display().to_string()
    );
    let output = Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "27.0", "the sensor formula");
    assert_eq!(lines[5], "devices/pico-w-e66138528372a92c/telemetry");

    let validator = Validator::new(Contract::default()).unwrap();
    for (index, payload) in lines[1..5].iter().enumerate() {
        let seq = i64::try_from(index + 1).unwrap();
        let received_at = now + seq * 10_000 + 300;
        match validator.validate(payload.as_bytes(), received_at) {
            Outcome::Accepted(event) => {
                assert_eq!(event.device_id, "pico-w-e66138528372a92c");
                assert_eq!(event.seq, Some(seq));
                assert_eq!(event.device_ts, received_at - 300);
                let temperature = event.metrics.get("temperature_c").unwrap();
                assert!((10.0..40.0).contains(&temperature), "{payload}");
                assert_eq!(event.metrics.get("rssi_dbm"), Some(-58.0));
                assert!(event.quality.is_clean(), "{payload}: {:?}", event.quality);
            }
            Outcome::Rejected(rejection) => panic!("{payload}: {rejection}"),
        }
    }
}
