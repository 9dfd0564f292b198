use super::*;
use crate::event::SequenceCheck;

/// 2025-11-28T03:20:00.500Z.
const RECEIVED_AT: i64 = 1_764_300_000_500;
/// A device time a second before `RECEIVED_AT`, in milliseconds.
const TS: i64 = 1_764_299_999_500;

fn validator() -> Validator {
    Validator::new(Contract::default()).unwrap()
}

fn with(edit: impl FnOnce(&mut Contract)) -> Validator {
    let mut contract = Contract::default();
    edit(&mut contract);
    Validator::new(contract).unwrap()
}

fn accepted_by(validator: &Validator, payload: &str) -> Event {
    match validator.validate(payload.as_bytes(), RECEIVED_AT) {
        Outcome::Accepted(event) => event,
        Outcome::Rejected(rejection) => panic!("rejected {payload}: {rejection}"),
    }
}

fn accepted(payload: &str) -> Event {
    accepted_by(&validator(), payload)
}

fn rejected_by(validator: &Validator, payload: &[u8]) -> Rejection {
    match validator.validate(payload, RECEIVED_AT) {
        Outcome::Accepted(event) => {
            panic!("accepted {:?}: {event:?}", String::from_utf8_lossy(payload))
        }
        Outcome::Rejected(rejection) => rejection,
    }
}

fn rejected_received(
    validator: &Validator,
    payload: &[u8],
    topic_device: Option<&[u8]>,
    cut: Option<Cut<'_>>,
) -> Rejection {
    let received = Received {
        payload,
        received_at: RECEIVED_AT,
        topic_device,
        cut,
    };
    match validator.validate_received(&received) {
        Outcome::Accepted(event) => panic!("accepted {event:?}"),
        Outcome::Rejected(rejection) => rejection,
    }
}

#[test]
fn the_topic_names_the_device() {
    let validator = validator();
    let payload = format!(r#"{{"deviceId":"pico-2","device_ts":{TS},"temp":20}}"#);
    let own = Received {
        topic_device: Some(b"pico-2"),
        ..Received::payload(payload.as_bytes(), RECEIVED_AT)
    };
    assert!(matches!(
        validator.validate_received(&own),
        Outcome::Accepted(event) if event.device_id == "pico-2"
    ));
    // Another device's topic, a topic id that differs only by a trailing space, and one
    // the contract does not allow: all refused, naming the payload's field.
    for topic in [&b"pico-1"[..], b"pico-2 ", b"pico\x1b[2J", b"\xff\xfe"] {
        let rejection = rejected_received(&validator, payload.as_bytes(), Some(topic), None);
        assert_eq!(rejection.code(), "device_id_mismatch", "{topic:?}");
        assert_eq!(rejection.field(), Some("deviceId"));
        assert_eq!(rejection.rule(), "device_id.bind_to_topic = true");
    }
    // An invalid device id is reported as such, before any comparison.
    let invalid = format!(r#"{{"device_id":"pico 2","device_ts":{TS}}}"#);
    assert_eq!(
        rejected_received(&validator, invalid.as_bytes(), Some(b"pico-1"), None).code(),
        "invalid_device_id"
    );
    // Gateways publish for many devices on one topic.
    let gateway = with(|contract| contract.device_id.bind_to_topic = false);
    let relayed = Received {
        topic_device: Some(b"gateway-1"),
        ..Received::payload(payload.as_bytes(), RECEIVED_AT)
    };
    assert!(matches!(
        gateway.validate_received(&relayed),
        Outcome::Accepted(event) if event.device_id == "pico-2"
    ));
    // A record whose topic names no device has nothing to be bound to.
    assert!(matches!(
        validator.validate_received(&Received::payload(payload.as_bytes(), RECEIVED_AT)),
        Outcome::Accepted(_)
    ));
}

#[test]
fn topic_device_ids_obey_the_contract() {
    let validator = validator();
    assert_eq!(validator.topic_device(None), TopicDevice::Absent);
    assert_eq!(
        validator.topic_device(Some(b"pico-7")),
        TopicDevice::Usable("pico-7")
    );
    for unusable in [&b"pico-7 "[..], b"", b"a\x1b", b"\xff", &[b'a'; 129]] {
        assert_eq!(
            validator.topic_device(Some(unusable)),
            TopicDevice::Unusable
        );
    }
    assert_eq!(
        TopicDevice::Unusable.name(),
        Some(crate::received::UNUSABLE_TOPIC_DEVICE)
    );
    // The placeholder can never be a device id a payload names.
    let placeholder = format!(
        r#"{{"device_id":"{}","device_ts":{TS}}}"#,
        crate::received::UNUSABLE_TOPIC_DEVICE
    );
    assert_eq!(
        rejected_by(&validator, placeholder.as_bytes()).code(),
        "invalid_device_id"
    );
}

#[test]
fn a_payload_the_bridge_cut_is_too_large_whatever_its_bytes() {
    let cut = Cut {
        original_bytes: 2_000_000,
        reason: Some("payload_too_large"),
        detail: Some("more than max_message_bytes = 1000000"),
    };
    let payload = format!(r#"{{"device_id":"d","device_ts":{TS}}}"#);
    let rejection = rejected_received(&validator(), payload.as_bytes(), Some(b"d"), Some(cut));
    assert_eq!(rejection.code(), "payload_too_large");
    let message = rejection.to_string();
    assert!(message.contains("2000000 bytes"), "{message}");
    assert!(message.contains("max_message_bytes = 1000000"), "{message}");
}

#[test]
fn accepts_a_valid_payload_and_normalizes_it() {
    let event = accepted(&format!(
        r#"{{"deviceId":"pico-1","ts":{TS},"seq":7,"temp":21.5,"humidity":"40","battery_mv":3700,"rssi":-67,"firmware":"1.4.2","uptime_s":12}}"#
    ));
    assert_eq!(event.device_id, "pico-1");
    assert_eq!(event.device_ts, TS);
    assert_eq!(event.received_at, RECEIVED_AT);
    assert_eq!(event.seq, Some(7));
    assert_eq!(event.schema_version, 1);
    let metrics: Vec<(&str, f64)> = event.metrics.iter().collect();
    assert_eq!(
        metrics,
        vec![
            ("battery_v", 3.7),
            ("humidity_pct", 40.0),
            ("rssi_dbm", -67.0),
            ("temperature_c", 21.5),
            ("uptime_s", 12.0),
        ]
    );
    assert_eq!(event.attributes["firmware"], Value::from("1.4.2"));
    assert_eq!(event.quality.coerced_fields, vec!["humidity".to_string()]);
    assert_eq!(
        event.quality.converted_fields,
        vec!["battery_mv".to_string()]
    );
    assert!(!event.quality.late);
}

#[test]
fn units_are_converted_before_the_range_check() {
    let event = accepted(&format!(
        r#"{{"device_id":"d","device_ts":{TS},"temperature_f":212}}"#
    ));
    assert!((event.metrics["temperature_c"] - 100.0).abs() < 1e-9);
    let rejection = rejected_by(
        &validator(),
        format!(r#"{{"device_id":"d","device_ts":{TS},"temperature_f":300}}"#).as_bytes(),
    );
    assert_eq!(rejection.code(), "metric_out_of_range");
    assert_eq!(rejection.field(), Some("temperature_f"));
    assert_eq!(rejection.rule(), "metrics.temperature_c.max = 125");
}

#[test]
fn device_ts_in_every_accepted_form_normalizes_to_the_same_millisecond() {
    let forms = [
        "1764300000",
        "1764300000.0",
        "1764300000000",
        "1764300000000000",
        "1764300000000000000",
        "\"1764300000000\"",
        "\"2025-11-28T03:20:00Z\"",
        "\"2025-11-28T04:20:00+01:00\"",
        "\"2025-11-28T03:20:00.000Z\"",
    ];
    for form in forms {
        let event = accepted(&format!(r#"{{"device_id":"d","device_ts":{form}}}"#));
        assert_eq!(event.device_ts, 1_764_300_000_000, "form {form}");
    }
    let fractional = accepted(r#"{"device_id":"d","device_ts":1764300000.123}"#);
    assert_eq!(fractional.device_ts, 1_764_300_000_123);
}

#[test]
fn late_events_are_flagged_not_rejected() {
    let hours_ago = RECEIVED_AT - 2 * 3_600_000;
    let event = accepted(&format!(r#"{{"device_id":"d","device_ts":{hours_ago}}}"#));
    assert!(event.quality.late);
    assert!(
        !accepted(&format!(r#"{{"device_id":"d","device_ts":{TS}}}"#))
            .quality
            .late
    );
}

#[test]
fn unknown_fields_follow_the_policy() {
    let payload = format!(r#"{{"device_id":"d","device_ts":{TS},"mode":"eco","lux":310}}"#);
    let kept = accepted(&payload);
    assert_eq!(kept.metrics["lux"], 310.0);
    assert_eq!(kept.attributes["mode"], Value::from("eco"));

    let drop = with(|contract| contract.unknown_fields = UnknownFields::Drop);
    let dropped = accepted_by(&drop, &payload);
    assert!(dropped.attributes.is_empty() && !dropped.metrics.contains_key("lux"));
    assert_eq!(
        dropped.quality.dropped_fields,
        vec!["lux".to_string(), "mode".to_string()]
    );

    let reject = with(|contract| contract.unknown_fields = UnknownFields::Reject);
    let rejection = rejected_by(&reject, payload.as_bytes());
    assert_eq!(rejection.code(), "unknown_field");
    assert_eq!(
        rejection.field(),
        Some("mode"),
        "the first unknown field in the payload"
    );
}

#[test]
fn a_null_metric_is_an_absent_reading() {
    let event = accepted(&format!(
        r#"{{"device_id":"d","device_ts":{TS},"temp":null}}"#
    ));
    assert!(event.metrics.is_empty());
}

/// One payload per code, and the field and rule each names.
#[test]
fn every_code_has_a_case() {
    let strict = with(|contract| {
        contract.seq.required = true;
        contract.unknown_fields = UnknownFields::Reject;
        contract.coerce_numeric_strings = false;
        if let Some(rule) = contract.metrics.get_mut("battery_v") {
            rule.required = true;
        }
        contract.limits.max_depth = 2;
        contract.limits.max_fields = 10;
    });
    let ok = format!(r#""device_id":"d","device_ts":{TS},"seq":1,"battery_v":3.7"#);
    let future = RECEIVED_AT + 301_000;
    let ancient = RECEIVED_AT - 31 * 86_400_000;
    let cases: Vec<(String, &str, Option<&str>)> = vec![
        (String::new(), "empty_payload", None),
        (" ".repeat(65_537), "payload_too_large", None),
        (
            format!(r#"{{{ok},"a":{{"b":[1]}}}}"#),
            "payload_too_deep",
            None,
        ),
        (
            format!(r#"{{{ok},"a":[1,2,3,4,5,6,7]}}"#),
            "too_many_fields",
            None,
        ),
        ("not json".into(), "invalid_json", None),
        ("\u{fffd}".into(), "invalid_json", None),
        (format!(r#"{{{ok}"#), "invalid_json", None),
        ("[1,2]".into(), "not_an_object", None),
        (
            format!(r#"{{{ok},"seq":2}}"#),
            "duplicate_field",
            Some("seq"),
        ),
        (
            format!(r#"{{{ok},"vbat":3.6}}"#),
            "duplicate_field",
            Some("vbat"),
        ),
        (
            format!(r#"{{"device_ts":{TS},"seq":1,"battery_v":3.7}}"#),
            "missing_device_id",
            Some("device_id"),
        ),
        (
            format!(r#"{{"device_id":7,"device_ts":{TS},"seq":1,"battery_v":3.7}}"#),
            "invalid_device_id",
            Some("device_id"),
        ),
        (
            format!(r#"{{"id":"a b","device_ts":{TS},"seq":1,"battery_v":3.7}}"#),
            "invalid_device_id",
            Some("id"),
        ),
        (
            format!(
                r#"{{"device_id":"{}","device_ts":{TS},"seq":1,"battery_v":3.7}}"#,
                "x".repeat(129)
            ),
            "invalid_device_id",
            Some("device_id"),
        ),
        (
            r#"{"device_id":"d","seq":1,"battery_v":3.7}"#.into(),
            "missing_device_ts",
            Some("device_ts"),
        ),
        (
            r#"{"device_id":"d","ts":"yesterday","seq":1,"battery_v":3.7}"#.into(),
            "invalid_device_ts",
            Some("ts"),
        ),
        (
            r#"{"device_id":"d","device_ts":"2025-11-28T03:20:00","seq":1,"battery_v":3.7}"#.into(),
            "invalid_device_ts",
            Some("device_ts"),
        ),
        (
            r#"{"device_id":"d","device_ts":-5,"seq":1,"battery_v":3.7}"#.into(),
            "invalid_device_ts",
            Some("device_ts"),
        ),
        (
            r#"{"device_id":"d","device_ts":1e30,"seq":1,"battery_v":3.7}"#.into(),
            "invalid_device_ts",
            Some("device_ts"),
        ),
        (
            format!(r#"{{"device_id":"d","device_ts":{future},"seq":1,"battery_v":3.7}}"#),
            "device_ts_in_future",
            Some("device_ts"),
        ),
        (
            format!(r#"{{"device_id":"d","device_ts":{ancient},"seq":1,"battery_v":3.7}}"#),
            "device_ts_too_old",
            Some("device_ts"),
        ),
        (
            r#"{"device_id":"d","device_ts":5,"seq":1,"battery_v":3.7}"#.into(),
            "device_ts_too_old",
            Some("device_ts"),
        ),
        (
            format!(r#"{{"device_id":"d","device_ts":{TS},"battery_v":3.7}}"#),
            "missing_seq",
            Some("seq"),
        ),
        (
            format!(r#"{{"device_id":"d","device_ts":{TS},"seq":-1,"battery_v":3.7}}"#),
            "invalid_seq",
            Some("seq"),
        ),
        (
            format!(r#"{{"device_id":"d","device_ts":{TS},"sequence":"1","battery_v":3.7}}"#),
            "invalid_seq",
            Some("sequence"),
        ),
        (
            format!(r#"{{"device_id":"d","device_ts":{TS},"seq":1.5,"battery_v":3.7}}"#),
            "invalid_seq",
            Some("seq"),
        ),
        (
            format!(r#"{{"device_id":"d","device_ts":{TS},"seq":1}}"#),
            "missing_metric",
            Some("battery_v"),
        ),
        (
            format!(r#"{{{ok},"temp":"warm"}}"#),
            "invalid_metric",
            Some("temp"),
        ),
        (
            format!(r#"{{{ok},"rssi":-67.5}}"#),
            "invalid_metric",
            Some("rssi"),
        ),
        (
            format!(r#"{{{ok},"temp":true}}"#),
            "invalid_metric",
            Some("temp"),
        ),
        (
            format!(r#"{{{ok},"humidity":101}}"#),
            "metric_out_of_range",
            Some("humidity"),
        ),
        (
            format!(r#"{{{ok},"pressure":-1e3}}"#),
            "metric_out_of_range",
            Some("pressure"),
        ),
        (
            format!(r#"{{{ok},"colour":"red"}}"#),
            "unknown_field",
            Some("colour"),
        ),
    ];
    let mut seen = std::collections::BTreeSet::new();
    for (payload, code, field) in &cases {
        let rejection = rejected_by(&strict, payload.as_bytes());
        assert_eq!(
            rejection.code(),
            *code,
            "payload {payload:.80}: {rejection}"
        );
        assert_eq!(rejection.field(), *field, "payload {payload:.80}");
        assert!(!rejection.rule().is_empty());
        seen.insert(*code);
    }
    // `metric_not_finite` needs coercion ("NaN" as a string), which `strict` turns off.
    let rejection = rejected_by(
        &validator(),
        format!(r#"{{"device_id":"d","device_ts":{TS},"temp":"NaN"}}"#).as_bytes(),
    );
    assert_eq!(rejection.code(), "metric_not_finite");
    seen.insert(rejection.code());
    // The codes about where a record came from need a topic, or a bridge that cut it.
    let spoofed = format!(r#"{{"device_id":"b","device_ts":{TS}}}"#);
    let rejection = rejected_received(&validator(), spoofed.as_bytes(), Some(b"a"), None);
    assert_eq!(rejection.code(), "device_id_mismatch");
    assert_eq!(rejection.field(), Some("device_id"));
    seen.insert(rejection.code());
    let refused = Cut {
        original_bytes: 10,
        reason: Some("kafka_rejected"),
        detail: Some("Broker: Invalid record"),
    };
    let rejection = rejected_received(&validator(), b"{}", None, Some(refused));
    assert_eq!(rejection.code(), "kafka_rejected");
    seen.insert(rejection.code());
    let all: std::collections::BTreeSet<&str> =
        Code::ALL.iter().map(|code| code.as_str()).collect();
    assert_eq!(seen, all, "every code has a case");
}

#[test]
fn messages_name_the_field_quote_the_value_truncated_and_name_the_rule() {
    let rejection = rejected_by(
        &validator(),
        format!(
            r#"{{"device_id":"d","device_ts":{TS},"humidity":"{}"}}"#,
            "z".repeat(500)
        )
        .as_bytes(),
    );
    let message = rejection.to_string();
    assert!(
        message.starts_with("field `humidity` must be a number: \"zzz"),
        "{message}"
    );
    assert!(
        message.ends_with("… (rule metrics.humidity_pct)"),
        "{message}"
    );
    assert!(message.len() < 200, "{message}");
    let out_of_range = rejected_by(
        &validator(),
        format!(r#"{{"device_id":"d","device_ts":{TS},"temp":900}}"#).as_bytes(),
    );
    assert_eq!(
        out_of_range.to_string(),
        "field `temp` is above the maximum of 125: 900 (rule metrics.temperature_c.max = 125)"
    );
    let converted = rejected_by(
        &validator(),
        format!(r#"{{"device_id":"d","device_ts":{TS},"temperature_f":500}}"#).as_bytes(),
    );
    assert_eq!(
        converted.to_string(),
        "field `temperature_f` converts to 260 temperature_c, which is above the maximum of \
         125: 500 (rule metrics.temperature_c.max = 125)"
    );
}

#[test]
fn nesting_and_field_limits_are_enforced_while_parsing() {
    let validator = validator();
    // 60,000 levels deep: stopped at level 9, with no stack overflow.
    let deep = format!(
        "{}{}",
        r#"{"device_id":"d","device_ts":1,"a":"#,
        "[".repeat(60_000)
    );
    assert_eq!(
        rejected_by(&validator, deep.as_bytes()).code(),
        "payload_too_deep"
    );
    let wide = format!(
        r#"{{"device_id":"d","device_ts":{TS},"a":[{}]}}"#,
        vec!["1"; 300].join(",")
    );
    assert_eq!(
        rejected_by(&validator, wide.as_bytes()).code(),
        "too_many_fields"
    );
    let fits = format!(
        r#"{{"device_id":"d","device_ts":{TS},"a":[{}]}}"#,
        vec!["1"; 250].join(",")
    );
    accepted_by(&validator, &fits);
}

/// Found by the fuzz target: a repeated field in a payload that is also broken JSON was
/// reported as `duplicate_field`, and parsing stopped there.
#[test]
fn broken_json_with_a_repeated_field_is_invalid_json() {
    let rejection = rejected_by(&validator(), br#"{"device_id":7,"":"ye","":"yestea""#);
    assert_eq!(rejection.code(), "invalid_json");
}

/// Found by the fuzz target's differential check: serde_json refuses this valid JSON (the
/// name is its private raw-value marker); the engine reads it as the plain name it is.
#[test]
fn a_member_name_serde_json_reserves_is_just_a_name() {
    let payload = b"\t\r\t{\"$serde_json::private::RawValue\":4}";
    assert_eq!(
        rejected_by(&validator(), payload).code(),
        "missing_device_id"
    );
}

#[test]
fn a_repeated_key_is_a_duplicate_not_a_silent_overwrite() {
    let rejection = rejected_by(
        &validator(),
        format!(r#"{{"device_id":"d","device_ts":{TS},"x":1,"x":2}}"#).as_bytes(),
    );
    assert_eq!(rejection.code(), "duplicate_field");
    assert_eq!(
        rejection.to_string(),
        "field `x` appears twice (rule aliases)"
    );
}

#[test]
fn the_codes_table_in_the_docs_lists_every_code() {
    let docs = include_str!("../../../../docs/contract.md");
    for code in Code::ALL {
        assert!(
            docs.contains(&format!("| `{code}` |")),
            "docs/contract.md has no row for `{code}`"
        );
    }
}

#[test]
fn sequence_checks_serialize_for_the_cleaned_topic() {
    let check = SequenceCheck::Gap {
        previous: 4,
        missing: 2,
    };
    assert_eq!(
        serde_json::to_value(check).unwrap(),
        serde_json::json!({"status": "gap", "previous": 4, "missing": 2})
    );
}

mod properties {
    use proptest::prelude::*;

    use super::super::*;
    use super::{RECEIVED_AT, TS};

    fn validator() -> Validator {
        Validator::new(Contract::default()).unwrap()
    }

    /// Payloads shaped like telemetry, with every kind of wrong value mixed in.
    fn payload() -> impl Strategy<Value = String> {
        let name = prop_oneof![
            Just("device_id".to_string()),
            Just("id".to_string()),
            Just("device_ts".to_string()),
            Just("ts".to_string()),
            Just("seq".to_string()),
            Just("temp".to_string()),
            Just("temperature_f".to_string()),
            Just("humidity".to_string()),
            Just("battery_mv".to_string()),
            Just("rssi".to_string()),
            "[a-z_]{1,8}",
        ];
        let value = prop_oneof![
            Just("null".to_string()),
            Just("true".to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>()
                .prop_filter("finite", |n| n.is_finite())
                .prop_map(|n| n.to_string()),
            (TS - 86_400_000..TS + 1_000).prop_map(|n| n.to_string()),
            "[a-zA-Z0-9 .:-]{0,12}".prop_map(|s| format!("{s:?}")),
            Just("\"NaN\"".to_string()),
            Just("[1,[2,{}]]".to_string()),
            Just("{\"a\":{}}".to_string()),
        ];
        proptest::collection::vec((name, value), 0..12).prop_map(|members| {
            let body: Vec<String> = members
                .iter()
                .map(|(name, value)| format!("{name:?}:{value}"))
                .collect();
            format!("{{{}}}", body.join(","))
        })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_always_decide(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            match validator().validate(&bytes, RECEIVED_AT) {
                Outcome::Accepted(event) => prop_assert!(!event.device_id.is_empty()),
                Outcome::Rejected(rejection) => prop_assert!(Code::ALL.contains(&rejection.kind())),
            }
        }

        /// Every output either passes the contract or carries a code, and normalizing an
        /// accepted event's canonical payload changes nothing.
        #[test]
        fn accepted_events_pass_the_contract_and_normalization_is_idempotent(payload in payload()) {
            let validator = validator();
            match validator.validate(payload.as_bytes(), RECEIVED_AT) {
                Outcome::Rejected(rejection) => prop_assert!(Code::ALL.contains(&rejection.kind())),
                Outcome::Accepted(event) => {
                    let contract = validator.contract();
                    prop_assert!(!event.device_id.is_empty());
                    prop_assert!(event.device_id.len() <= contract.device_id.max_length);
                    prop_assert!(event.device_ts <= RECEIVED_AT + 300_000);
                    for (name, rule) in &contract.metrics {
                        if let Some(value) = event.metrics.get(name.as_str()) {
                            prop_assert!(value.is_finite());
                            prop_assert!(rule.min.is_none_or(|min| value >= min), "{name} {value}");
                            prop_assert!(rule.max.is_none_or(|max| value <= max), "{name} {value}");
                        }
                    }
                    let canonical = event.canonical_payload().to_string();
                    let Outcome::Accepted(again) = validator.validate(canonical.as_bytes(), RECEIVED_AT) else {
                        return Err(TestCaseError::fail(format!("canonical payload rejected: {canonical}")));
                    };
                    prop_assert_eq!(&again.device_id, &event.device_id);
                    prop_assert_eq!(again.device_ts, event.device_ts);
                    prop_assert_eq!(again.seq, event.seq);
                    prop_assert_eq!(&again.metrics, &event.metrics);
                    prop_assert_eq!(&again.attributes, &event.attributes);
                    prop_assert_eq!(again.quality.late, event.quality.late);
                    prop_assert!(again.quality.coerced_fields.is_empty());
                    prop_assert!(again.quality.converted_fields.is_empty());
                }
            }
        }

        /// Payloads in the canonical form that the exported JSON Schema accepts are accepted.
        #[test]
        fn the_exported_json_schema_agrees_with_the_validator_on_canonical_payloads(payload in payload()) {
            let validator = validator();
            let schema = validator.contract().to_json_schema();
            let Ok(checker) = jsonschema::validator_for(&schema) else {
                return Err(TestCaseError::fail("exported schema does not compile"));
            };
            if let Outcome::Accepted(event) = validator.validate(payload.as_bytes(), RECEIVED_AT) {
                let canonical = event.canonical_payload();
                prop_assert!(checker.is_valid(&canonical), "{canonical}");
            }
        }
    }
}
