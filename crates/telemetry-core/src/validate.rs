//! Validation and normalization of raw payloads.
//!
//! The payload contract (see `docs/architecture.md`):
//! - a JSON object of at most [`Limits::max_payload_bytes`];
//! - `device_id`: a non-empty string of printable characters, at most
//!   [`Limits::max_device_id_len`] bytes;
//! - `device_ts`: device time as a number of seconds, milliseconds, microseconds or nanoseconds
//!   since the Unix epoch (told apart by magnitude), or an RFC 3339 string with offset; normalized
//!   to UTC milliseconds;
//! - `seq` (optional): a non-negative integer, part of the event's identity;
//! - every other numeric field is a metric; other fields are listed in
//!   [`Event::ignored_fields`].

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value};

use crate::event::Event;

/// The result of validating one raw record. A rejection is a value, not an error.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The payload passed the contract; here it is normalized.
    Accepted(Event),
    /// The payload failed the contract; the record goes to the DLQ with this reason.
    Rejected(Rejection),
}

/// Why a payload was rejected. [`Rejection::code`] is stable and becomes the DLQ `error.code`
/// header; [`fmt::Display`] is the human-readable `error.message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The payload has no bytes at all.
    EmptyPayload,
    /// The payload is larger than [`Limits::max_payload_bytes`].
    PayloadTooLarge {
        /// Size of the payload in bytes.
        size: usize,
        /// The limit it exceeded.
        limit: usize,
    },
    /// The payload is not valid JSON (or not UTF-8).
    InvalidJson {
        /// The parser's explanation, with line and column.
        detail: String,
    },
    /// The payload is valid JSON but not an object.
    NotAnObject {
        /// The JSON type found instead.
        found: &'static str,
    },
    /// The object has no `device_id` (or it is null).
    MissingDeviceId,
    /// `device_id` is present but not acceptable.
    InvalidDeviceId {
        /// What is wrong with it.
        reason: &'static str,
        /// The offending value, truncated.
        value: String,
    },
    /// The object has no `device_ts` (or it is null).
    MissingDeviceTs,
    /// `device_ts` is present but not a usable timestamp.
    InvalidDeviceTs {
        /// What is wrong with it.
        reason: &'static str,
        /// The offending value, truncated.
        value: String,
    },
    /// `seq` is present but not a non-negative integer.
    InvalidSeq {
        /// The offending value, truncated.
        value: String,
    },
}

impl Rejection {
    /// The short, stable, snake_case reason code: the DLQ `error.code` header and metric label.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::EmptyPayload => "empty_payload",
            Rejection::PayloadTooLarge { .. } => "payload_too_large",
            Rejection::InvalidJson { .. } => "invalid_json",
            Rejection::NotAnObject { .. } => "not_an_object",
            Rejection::MissingDeviceId => "missing_device_id",
            Rejection::InvalidDeviceId { .. } => "invalid_device_id",
            Rejection::MissingDeviceTs => "missing_device_ts",
            Rejection::InvalidDeviceTs { .. } => "invalid_device_ts",
            Rejection::InvalidSeq { .. } => "invalid_seq",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::EmptyPayload => write!(f, "payload is empty"),
            Rejection::PayloadTooLarge { size, limit } => {
                write!(f, "payload is {size} bytes, more than the limit of {limit}")
            }
            Rejection::InvalidJson { detail } => write!(f, "payload is not valid JSON: {detail}"),
            Rejection::NotAnObject { found } => {
                write!(f, "payload is a JSON {found}, expected an object")
            }
            Rejection::MissingDeviceId => write!(f, "field `device_id` is missing"),
            Rejection::InvalidDeviceId { reason, value } => {
                write!(f, "field `device_id` {reason}: {value}")
            }
            Rejection::MissingDeviceTs => write!(f, "field `device_ts` is missing"),
            Rejection::InvalidDeviceTs { reason, value } => {
                write!(f, "field `device_ts` {reason}: {value}")
            }
            Rejection::InvalidSeq { value } => {
                write!(f, "field `seq` must be a non-negative integer: {value}")
            }
        }
    }
}

/// Bounds on what a payload may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload accepted, in bytes. Larger ones are rejected before parsing.
    pub max_payload_bytes: usize,
    /// Longest `device_id` accepted, in bytes (the database column holds this many).
    pub max_device_id_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: 64 * 1024,
            max_device_id_len: 128,
        }
    }
}

/// Latest device time accepted: 9999-12-31T23:59:59.999Z, the end of SQL's DATETIME range.
pub const MAX_TIMESTAMP_MS: i64 = 253_402_300_799_999;

/// Offending values quoted in messages are cut to this many characters.
const MAX_QUOTED_CHARS: usize = 64;

/// Validates and normalizes one raw payload received at `received_at` (UTC milliseconds).
pub fn validate(payload: &[u8], received_at: i64, limits: &Limits) -> Outcome {
    match validate_inner(payload, received_at, limits) {
        Ok(event) => Outcome::Accepted(event),
        Err(rejection) => Outcome::Rejected(rejection),
    }
}

fn validate_inner(payload: &[u8], received_at: i64, limits: &Limits) -> Result<Event, Rejection> {
    if payload.is_empty() {
        return Err(Rejection::EmptyPayload);
    }
    if payload.len() > limits.max_payload_bytes {
        return Err(Rejection::PayloadTooLarge {
            size: payload.len(),
            limit: limits.max_payload_bytes,
        });
    }
    let value: Value = serde_json::from_slice(payload).map_err(|error| Rejection::InvalidJson {
        detail: error.to_string(),
    })?;
    let Value::Object(mut object) = value else {
        return Err(Rejection::NotAnObject {
            found: json_type(&value),
        });
    };

    let device_id = take_device_id(&mut object, limits)?;
    let device_ts = take_device_ts(&mut object)?;
    let seq = take_seq(&mut object)?;

    let mut metrics = BTreeMap::new();
    let mut ignored_fields = Vec::new();
    for (name, value) in object {
        match value.as_f64() {
            Some(number) if number.is_finite() => {
                metrics.insert(name, number);
            }
            _ => ignored_fields.push(name),
        }
    }
    ignored_fields.sort_unstable();

    Ok(Event {
        device_id,
        device_ts,
        received_at,
        seq,
        metrics,
        ignored_fields,
    })
}

fn take_device_id(object: &mut Map<String, Value>, limits: &Limits) -> Result<String, Rejection> {
    let invalid = |reason, value: &Value| Rejection::InvalidDeviceId {
        reason,
        value: quote(value),
    };
    match object.remove("device_id") {
        None | Some(Value::Null) => Err(Rejection::MissingDeviceId),
        Some(Value::String(id)) => {
            if id.is_empty() {
                Err(invalid("must not be empty", &Value::String(id)))
            } else if id.len() > limits.max_device_id_len {
                Err(invalid("is too long", &Value::String(id)))
            } else if id.chars().any(char::is_control) {
                Err(invalid("contains control characters", &Value::String(id)))
            } else {
                Ok(id)
            }
        }
        Some(other) => Err(invalid("must be a string", &other)),
    }
}

fn take_device_ts(object: &mut Map<String, Value>) -> Result<i64, Rejection> {
    let invalid = |reason, value: &Value| Rejection::InvalidDeviceTs {
        reason,
        value: quote(value),
    };
    let value = match object.remove("device_ts") {
        None | Some(Value::Null) => return Err(Rejection::MissingDeviceTs),
        Some(value) => value,
    };
    let millis = match &value {
        Value::Number(number) => epoch_number_to_millis(number)
            .ok_or_else(|| invalid("is not a time since the epoch", &value))?,
        Value::String(text) => chrono::DateTime::parse_from_rfc3339(text)
            .map_err(|_| invalid("is not an RFC 3339 timestamp with offset", &value))?
            .timestamp_millis(),
        _ => return Err(invalid("must be a number or an RFC 3339 string", &value)),
    };
    if !(0..=MAX_TIMESTAMP_MS).contains(&millis) {
        return Err(invalid("is out of range (1970 to 9999)", &value));
    }
    Ok(millis)
}

/// Reads a number of seconds, milliseconds, microseconds or nanoseconds since the epoch, told
/// apart by magnitude, as whole milliseconds. Seconds reach to the year 5138, milliseconds start
/// in 1973, so the ranges do not overlap for any real device clock. Integers are converted exactly;
/// fractions are rounded to the nearest millisecond.
fn epoch_number_to_millis(number: &serde_json::Number) -> Option<i64> {
    if let Some(integer) = number.as_u64() {
        let millis = match integer {
            0..100_000_000_000 => integer.checked_mul(1_000)?,
            100_000_000_000..100_000_000_000_000 => integer,
            100_000_000_000_000..100_000_000_000_000_000 => integer / 1_000,
            _ => integer / 1_000_000,
        };
        return i64::try_from(millis).ok();
    }
    let number = number.as_f64()?;
    if !number.is_finite() || number < 0.0 {
        return None;
    }
    let millis = if number < 1e11 {
        number * 1e3
    } else if number < 1e14 {
        number
    } else if number < 1e17 {
        number / 1e3
    } else if number < 1e20 {
        number / 1e6
    } else {
        return None;
    };
    // The value is finite, non-negative and below 1e14 here, so the cast is exact.
    #[allow(clippy::cast_possible_truncation)]
    Some(millis.round() as i64)
}

fn take_seq(object: &mut Map<String, Value>) -> Result<Option<i64>, Rejection> {
    match object.remove("seq") {
        None | Some(Value::Null) => Ok(None),
        Some(value) => match value.as_u64().and_then(|seq| i64::try_from(seq).ok()) {
            Some(seq) => Ok(Some(seq)),
            None => Err(Rejection::InvalidSeq {
                value: quote(&value),
            }),
        },
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The value as JSON text, cut to [`MAX_QUOTED_CHARS`] characters for messages.
fn quote(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(MAX_QUOTED_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECEIVED_AT: i64 = 1_764_300_000_500;

    fn check(payload: &str) -> Outcome {
        validate(payload.as_bytes(), RECEIVED_AT, &Limits::default())
    }

    fn accepted(payload: &str) -> Event {
        match check(payload) {
            Outcome::Accepted(event) => event,
            Outcome::Rejected(rejection) => panic!("rejected {payload}: {rejection}"),
        }
    }

    fn rejected_code(payload: &[u8]) -> &'static str {
        match validate(payload, RECEIVED_AT, &Limits::default()) {
            Outcome::Accepted(event) => panic!("accepted {event:?}"),
            Outcome::Rejected(rejection) => rejection.code(),
        }
    }

    #[test]
    fn accepts_a_valid_payload_and_normalizes_it() {
        let event = accepted(
            r#"{"device_id":"pico-1","device_ts":1764300000000,"temperature":21.5,"humidity":40}"#,
        );
        assert_eq!(event.device_id, "pico-1");
        assert_eq!(event.device_ts, 1_764_300_000_000);
        assert_eq!(event.received_at, RECEIVED_AT);
        assert_eq!(event.seq, None);
        assert_eq!(
            event.metrics.into_iter().collect::<Vec<_>>(),
            vec![
                ("humidity".to_string(), 40.0),
                ("temperature".to_string(), 21.5)
            ]
        );
        assert!(event.ignored_fields.is_empty());
    }

    #[test]
    fn device_ts_in_every_accepted_form_normalizes_to_the_same_millisecond() {
        let forms = [
            "1764300000",
            "1764300000.0",
            "1764300000000",
            "1764300000000000",
            "1764300000000000000",
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
    fn seq_is_kept_and_other_fields_are_listed_not_lost() {
        let event = accepted(
            r#"{"device_id":"d","device_ts":1764300000,"seq":7,"status":"ok","on":true,"v":1}"#,
        );
        assert_eq!(event.seq, Some(7));
        assert_eq!(event.metrics.len(), 1);
        assert_eq!(
            event.ignored_fields,
            vec!["on".to_string(), "status".to_string()]
        );
    }

    #[test]
    fn every_malformed_case_has_its_code() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty_payload"),
            (b"not json", "invalid_json"),
            (b"{\"device_id\":", "invalid_json"),
            (b"\xff\xfe\x00binary", "invalid_json"),
            (b"[1,2]", "not_an_object"),
            (b"42", "not_an_object"),
            (br#"{"device_ts":1764300000}"#, "missing_device_id"),
            (
                br#"{"device_id":null,"device_ts":1764300000}"#,
                "missing_device_id",
            ),
            (
                br#"{"device_id":17,"device_ts":1764300000}"#,
                "invalid_device_id",
            ),
            (
                br#"{"device_id":"","device_ts":1764300000}"#,
                "invalid_device_id",
            ),
            (
                br#"{"device_id":"a\u0000b","device_ts":1764300000}"#,
                "invalid_device_id",
            ),
            (br#"{"device_id":"d"}"#, "missing_device_ts"),
            (
                br#"{"device_id":"d","device_ts":"yesterday"}"#,
                "invalid_device_ts",
            ),
            (
                br#"{"device_id":"d","device_ts":"2025-11-28T03:20:00"}"#,
                "invalid_device_ts",
            ),
            (
                br#"{"device_id":"d","device_ts":true}"#,
                "invalid_device_ts",
            ),
            (br#"{"device_id":"d","device_ts":-5}"#, "invalid_device_ts"),
            (
                br#"{"device_id":"d","device_ts":1e30}"#,
                "invalid_device_ts",
            ),
            (
                br#"{"device_id":"d","device_ts":1764300000,"seq":-1}"#,
                "invalid_seq",
            ),
            (
                br#"{"device_id":"d","device_ts":1764300000,"seq":"1"}"#,
                "invalid_seq",
            ),
            (
                br#"{"device_id":"d","device_ts":1764300000,"seq":1.5}"#,
                "invalid_seq",
            ),
        ];
        for (payload, code) in cases {
            assert_eq!(
                rejected_code(payload),
                *code,
                "payload {:?}",
                String::from_utf8_lossy(payload)
            );
        }
    }

    #[test]
    fn limits_are_enforced_before_parsing() {
        let long_id = "x".repeat(129);
        assert_eq!(
            rejected_code(format!(r#"{{"device_id":"{long_id}","device_ts":1}}"#).as_bytes()),
            "invalid_device_id"
        );
        let huge = vec![b' '; Limits::default().max_payload_bytes + 1];
        assert_eq!(rejected_code(&huge), "payload_too_large");
    }

    #[test]
    fn messages_name_the_field_and_quote_the_value_truncated() {
        let Outcome::Rejected(rejection) = check(&format!(
            r#"{{"device_id":"d","device_ts":"{}"}}"#,
            "z".repeat(500)
        )) else {
            panic!("accepted");
        };
        let message = rejection.to_string();
        assert!(message.contains("`device_ts`"), "{message}");
        assert!(message.contains("zzzz"), "{message}");
        assert!(message.len() < 200, "{message}");
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::*;

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic_and_always_decide(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                match validate(&bytes, 0, &Limits::default()) {
                    Outcome::Accepted(event) => prop_assert!(!event.device_id.is_empty()),
                    Outcome::Rejected(rejection) => prop_assert!(!rejection.code().is_empty()),
                }
            }

            #[test]
            fn valid_events_round_trip_through_their_normalized_form(
                device_id in "[a-z0-9-]{1,32}",
                device_ts in 100_000_000_000i64..100_000_000_000_000,
                seq in proptest::option::of(0i64..i64::MAX),
                temperature in -1e6f64..1e6,
            ) {
                let mut payload = serde_json::json!({
                    "device_id": device_id, "device_ts": device_ts, "temperature": temperature,
                });
                if let Some(seq) = seq {
                    payload["seq"] = seq.into();
                }
                let Outcome::Accepted(event) = validate(payload.to_string().as_bytes(), 1, &Limits::default()) else {
                    return Err(TestCaseError::fail("valid payload rejected"));
                };
                prop_assert_eq!(event.device_ts, device_ts);
                prop_assert_eq!(event.seq, seq);
                // Normalizing the normalized event changes nothing.
                let again = serde_json::json!({
                    "device_id": event.device_id, "device_ts": event.device_ts, "seq": event.seq,
                    "temperature": event.metrics["temperature"],
                });
                let Outcome::Accepted(second) = validate(again.to_string().as_bytes(), 1, &Limits::default()) else {
                    return Err(TestCaseError::fail("normalized event rejected"));
                };
                prop_assert_eq!(second, event);
            }
        }
    }
}
