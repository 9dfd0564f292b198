//! Arbitrary bytes through the shipped contract: the engine must never panic, every rejection
//! must carry a documented code, and an accepted event's canonical payload must be accepted
//! again as the same event (normalization is idempotent).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use telemetry_core::{Code, Contract, Outcome, Validator};

/// 2025-11-28T03:20:00.500Z: device times within the contract's skew limits of it are accepted.
const RECEIVED_AT: i64 = 1_764_300_000_500;

fn validator() -> &'static Validator {
    static VALIDATOR: OnceLock<Validator> = OnceLock::new();
    VALIDATOR.get_or_init(|| match Validator::new(Contract::default()) {
        Ok(validator) => validator,
        Err(error) => panic!("the shipped contract does not load: {error}"),
    })
}

fuzz_target!(|payload: &[u8]| {
    match validator().validate(payload, RECEIVED_AT) {
        Outcome::Rejected(rejection) => assert!(Code::ALL.contains(&rejection.kind())),
        Outcome::Accepted(event) => {
            let canonical = event.canonical_payload().to_string();
            match validator().validate(canonical.as_bytes(), RECEIVED_AT) {
                Outcome::Accepted(again) => {
                    assert_eq!(again.device_id, event.device_id);
                    assert_eq!(again.device_ts, event.device_ts);
                    assert_eq!(again.seq, event.seq);
                    assert_eq!(again.metrics, event.metrics);
                    assert_eq!(again.attributes, event.attributes);
                }
                Outcome::Rejected(rejection) => {
                    panic!("canonical payload {canonical} rejected: {rejection}")
                }
            }
        }
    }
});
