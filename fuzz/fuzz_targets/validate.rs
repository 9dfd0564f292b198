//! Arbitrary bytes through the shipped contract: the engine must never panic, every rejection
//! must carry a documented code, and an accepted event's canonical payload must be accepted
//! again as the same event (normalization is idempotent).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use telemetry_core::{Code, Contract, Outcome, Validator};

/// 2025-11-28T03:20:00.500Z: device times within the contract's skew limits of it are accepted.
const RECEIVED_AT: i64 = 1_764_300_000_500;

/// Found by this target: serde_json's private marker for raw values.
const SERDE_RAW_VALUE_TOKEN: &[u8] = b"$serde_json::private::RawValue";

fn validator() -> &'static Validator {
    static VALIDATOR: OnceLock<Validator> = OnceLock::new();
    VALIDATOR.get_or_init(|| match Validator::new(Contract::default()) {
        Ok(validator) => validator,
        Err(error) => panic!("the shipped contract does not load: {error}"),
    })
}

fuzz_target!(|payload: &[u8]| {
    let outcome = validator().validate(payload, RECEIVED_AT);
    // Differential: the engine's own JSON reader agrees with serde_json on what is JSON, unless
    // a payload limit stopped it first.
    let limit_or = |codes: &[Code], code: Code| {
        codes.contains(&code)
            || matches!(code, Code::PayloadTooLarge | Code::PayloadTooDeep | Code::TooManyFields)
    };
    let code = match &outcome {
        Outcome::Rejected(rejection) => Some(rejection.kind()),
        Outcome::Accepted(_) => None,
    };
    // serde_json (with the `raw_value` feature the workspace enables) gives this member name a
    // special meaning and refuses the object; it is valid JSON, and the engine is right.
    let serde_quirk = payload
        .windows(SERDE_RAW_VALUE_TOKEN.len())
        .any(|window| window == SERDE_RAW_VALUE_TOKEN);
    match (serde_json::from_slice::<serde_json::Value>(payload), code) {
        _ if serde_quirk => {}
        (Err(_), Some(code)) => assert!(
            limit_or(&[Code::InvalidJson, Code::EmptyPayload], code),
            "serde_json refuses the payload, the engine says {code}"
        ),
        (Err(error), None) => panic!("serde_json refuses an accepted payload: {error}"),
        (Ok(serde_json::Value::Object(_)), Some(code)) => assert!(
            code != Code::InvalidJson && code != Code::NotAnObject,
            "serde_json reads an object, the engine says {code}"
        ),
        (Ok(serde_json::Value::Object(_)), None) => {}
        (Ok(_), code) => assert!(
            code.is_some_and(|code| limit_or(&[Code::NotAnObject], code)),
            "serde_json reads a non-object, the engine says {code:?}"
        ),
    }
    match outcome {
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
