//! The validation and normalization engine: a [`Validator`] compiled from a [`Contract`] decides,
//! for every raw payload, [`Outcome::Accepted`] with the normalized [`Event`] or
//! [`Outcome::Rejected`] with a [`Rejection`] that carries a stable [`Code`].
//!
//! How a payload is read:
//! 1. Its size is checked before any parsing (`payload_too_large`).
//! 2. It is parsed in one pass straight into its top-level fields, borrowing names and strings
//!    from the payload. Nesting depth and the number of fields are counted while parsing, and
//!    parsing stops at the first limit passed (`payload_too_deep`, `too_many_fields`), so no
//!    payload is ever parsed unbounded.
//! 3. Names are mapped to canonical fields through the contract's aliases and unit sources
//!    (`duplicate_field` when two land on one field), and each metric is checked as it is read.
//! 4. The rules are reported in a fixed order: `device_id`, `device_ts`, `seq`, then the first
//!    faulty metric or unknown field in payload order, then required metrics. A payload always
//!    gets the same code, and the most basic fault wins.
//!
//! Nothing here panics on any input: the fuzz target (`fuzz/`) and the property tests hold it to
//! that.
//!
//! # Layout
//! - this module: [`Validator`], the contract compiled (declared metrics, names, characters), and
//!   the rules each field is held to;
//! - `codes`: [`Outcome`], the stable reason [`Code`]s and the [`Rejection`] that carries one;
//! - `names`: the table from payload names to fields (the engine's hottest lookup);
//! - `reader`: one pass over a payload with `json_reader`, each field checked as it is read;
//! - `epoch`: device times in seconds, milliseconds, microseconds or nanoseconds, as numbers or
//!   strings, to milliseconds.

mod codes;
mod epoch;
mod names;
mod reader;
#[cfg(test)]
mod tests;

pub use codes::{Code, Outcome, Rejection};

use epoch::*;
use names::*;
use reader::*;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, OnceLock};

use rustc_hash::FxHashMap;

use serde_json::Value;

use crate::contract::{fields, AllowedCharacters, Contract, Conversion, UnknownFields};
use crate::event::{Event, MetricName, Metrics, Quality};
use crate::json_reader::{self, ReadError, Scalar};
use crate::received::{Cut, Received, TopicDevice};

/// Latest device time accepted: 9999-12-31T23:59:59.999Z, the end of SQL's DATETIME range.
pub const MAX_TIMESTAMP_MS: i64 = 253_402_300_799_999;

/// Offending values quoted in messages are cut to this many characters.
const MAX_QUOTED_CHARS: usize = 64;

/// One declared metric, compiled.
#[derive(Debug, Clone)]
struct MetricSpec {
    name: &'static str,
    integer: bool,
    required: bool,
    min: Option<f64>,
    max: Option<f64>,
}

/// A contract compiled for fast validation. Build once, validate many; it is `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Validator {
    contract: Contract,
    /// Every name a payload may use for a declared field: canonical names, aliases, unit sources.
    slots: NameTable,
    metrics: Vec<MetricSpec>,
    allowed: AllowedCharacters,
}

impl Validator {
    /// Compiles a contract (which is checked again first).
    pub fn new(contract: Contract) -> Result<Self, crate::ContractError> {
        contract.check()?;
        let allowed = AllowedCharacters::parse(&contract.device_id.allowed_characters).map_err(
            |problem| crate::ContractError::Invalid {
                setting: "device_id.allowed_characters".into(),
                problem,
            },
        )?;
        let mut slots = NameTable::default();
        for (slot, name, aliases) in [
            (
                Slot::DeviceId,
                fields::DEVICE_ID,
                &contract.device_id.aliases,
            ),
            (
                Slot::DeviceTs,
                fields::DEVICE_TS,
                &contract.device_ts.aliases,
            ),
            (Slot::Seq, fields::SEQ, &contract.seq.aliases),
        ] {
            slots.insert(name, slot);
            for alias in aliases {
                slots.insert(alias, slot);
            }
        }
        let mut metrics = Vec::with_capacity(contract.metrics.len());
        for (index, (name, rule)) in contract.metrics.iter().enumerate() {
            let plain = Slot::Metric {
                index,
                conversion: None,
            };
            slots.insert(name, plain);
            for alias in &rule.aliases {
                slots.insert(alias, plain);
            }
            for (source, conversion) in &rule.convert_from {
                let converted = Slot::Metric {
                    index,
                    conversion: Some(*conversion),
                };
                slots.insert(source, converted);
            }
            metrics.push(MetricSpec {
                name: intern(name),
                integer: rule.integer,
                required: rule.required,
                min: rule.min,
                max: rule.max,
            });
        }
        Ok(Validator {
            contract,
            slots,
            metrics,
            allowed,
        })
    }

    /// The contract this validator enforces.
    pub fn contract(&self) -> &Contract {
        &self.contract
    }

    /// Validates and normalizes one payload received at `received_at` (UTC milliseconds), with
    /// no MQTT topic to bind it to: for trying payloads out. Records from the raw topic go
    /// through [`Validator::validate_received`].
    pub fn validate(&self, payload: &[u8], received_at: i64) -> Outcome {
        self.validate_received(&Received::payload(payload, received_at))
    }

    /// Validates and normalizes one raw record: a payload the bridge cut is `payload_too_large`
    /// (or `kafka_rejected`) whatever its bytes, and with `device_id.bind_to_topic` the payload
    /// must name the device its topic names.
    pub fn validate_received(&self, received: &Received<'_>) -> Outcome {
        match self.validate_inner(received) {
            Ok(event) => Outcome::Accepted(event),
            Err(rejection) => Outcome::Rejected(rejection),
        }
    }

    /// The device a record's topic names (its raw-topic key), checked against the contract's
    /// `device_id` rules.
    pub fn topic_device<'a>(&self, key: Option<&'a [u8]>) -> TopicDevice<'a> {
        let Some(key) = key else {
            return TopicDevice::Absent;
        };
        match std::str::from_utf8(key) {
            Ok(id)
                if !id.is_empty()
                    && id.len() <= self.contract.device_id.max_length
                    && self.allowed.allows(id) =>
            {
                TopicDevice::Usable(id)
            }
            _ => TopicDevice::Unusable,
        }
    }

    #[inline(always)]
    fn validate_inner(&self, received: &Received<'_>) -> Result<Event, Rejection> {
        let (payload, received_at) = (received.payload, received.received_at);
        if let Some(cut) = &received.cut {
            return Err(cut_rejection(cut, payload.len()));
        }
        let limits = &self.contract.limits;
        if payload.is_empty() {
            return Err(Rejection::new(Code::EmptyPayload, "json", "is empty"));
        }
        if payload.len() > limits.max_payload_bytes {
            return Err(Rejection::new(
                Code::PayloadTooLarge,
                format!("limits.max_payload_bytes = {}", limits.max_payload_bytes),
                format!("is {} bytes, more than the limit", payload.len()),
            ));
        }
        let mut reader = Reader::new(self);
        parse(payload, &mut reader)?;
        let topic_device = if self.contract.device_id.bind_to_topic {
            self.topic_device(received.topic_device)
        } else {
            TopicDevice::Absent
        };
        reader.finish(received_at, topic_device)
    }

    fn device_id(
        &self,
        field: Option<Field<'_>>,
        topic_device: TopicDevice<'_>,
    ) -> Result<String, Rejection> {
        let rule = &self.contract.device_id;
        let field = match field {
            Some(field) if !matches!(field.value, Scalar::Null) => field,
            _ => {
                return Err(
                    Rejection::new(Code::MissingDeviceId, "device_id", "is missing")
                        .on(fields::DEVICE_ID),
                )
            }
        };
        let invalid = |rule: String, problem: &str| {
            Err(Rejection::new(Code::InvalidDeviceId, rule, problem)
                .on(&field.name)
                .quoting(&field.value))
        };
        let Scalar::Text(id) = &field.value else {
            return invalid("device_id".into(), "must be a string");
        };
        if id.is_empty() {
            return invalid("device_id".into(), "must not be empty");
        }
        if id.len() > rule.max_length {
            return invalid(
                format!("device_id.max_length = {}", rule.max_length),
                "is too long",
            );
        }
        if !self.allowed.allows(id) {
            return invalid(
                format!(
                    "device_id.allowed_characters = \"{}\"",
                    rule.allowed_characters
                ),
                "contains characters that are not allowed",
            );
        }
        self.bound_to_topic(id, &field, topic_device)?;
        Ok(id.to_string())
    }

    /// With `device_id.bind_to_topic`: the payload's device must be the topic's.
    fn bound_to_topic(
        &self,
        device_id: &str,
        field: &Field<'_>,
        topic_device: TopicDevice<'_>,
    ) -> Result<(), Rejection> {
        let topic = match topic_device {
            TopicDevice::Absent => return Ok(()),
            TopicDevice::Usable(topic) if topic == device_id => return Ok(()),
            TopicDevice::Usable(topic) => format!("`{topic}`"),
            TopicDevice::Unusable => String::from("no usable device id"),
        };
        Err(Rejection::new(
            Code::DeviceIdMismatch,
            "device_id.bind_to_topic = true",
            format!("is not the device the MQTT topic names ({topic})"),
        )
        .on(&field.name)
        .quoting(&field.value))
    }

    fn device_ts(
        &self,
        field: Option<Field<'_>>,
        received_at: i64,
        quality: &mut Quality,
    ) -> Result<i64, Rejection> {
        let field = match field {
            Some(field) if !matches!(field.value, Scalar::Null) => field,
            _ => {
                return Err(
                    Rejection::new(Code::MissingDeviceTs, "device_ts", "is missing")
                        .on(fields::DEVICE_TS),
                )
            }
        };
        let reject = |code, rule: String, problem: &str| {
            Err(Rejection::new(code, rule, problem)
                .on(&field.name)
                .quoting(&field.value))
        };
        let millis = match &field.value {
            Scalar::Unsigned(integer) => integer_epoch_to_millis(*integer),
            Scalar::Signed(_) => None,
            Scalar::Float(number) => float_epoch_to_millis(*number),
            Scalar::Text(text) => {
                let numeric = if self.contract.coerce_numeric_strings {
                    coerce_epoch(text)
                } else {
                    None
                };
                match numeric {
                    Some(millis) => {
                        quality.coerced_fields.push(field.name.to_string());
                        Some(millis)
                    }
                    None => match chrono::DateTime::parse_from_rfc3339(text) {
                        Ok(time) => Some(time.timestamp_millis()),
                        Err(_) => {
                            return reject(
                                Code::InvalidDeviceTs,
                                "device_ts".into(),
                                "is not an RFC 3339 timestamp with offset",
                            )
                        }
                    },
                }
            }
            _ => {
                return reject(
                    Code::InvalidDeviceTs,
                    "device_ts".into(),
                    "must be a number or an RFC 3339 string",
                )
            }
        };
        let Some(millis) = millis.filter(|millis| (0..=MAX_TIMESTAMP_MS).contains(millis)) else {
            return reject(
                Code::InvalidDeviceTs,
                "device_ts".into(),
                "is not a time between 1970 and 9999",
            );
        };
        let rule = &self.contract.device_ts;
        let ahead = millis.saturating_sub(received_at);
        if let Some(skew) = rule.max_future_skew_seconds {
            if ahead > seconds_to_millis(skew) {
                return reject(
                    Code::DeviceTsInFuture,
                    format!("device_ts.max_future_skew_seconds = {skew}"),
                    &format!("is {} s ahead of the receive time", ahead / 1_000),
                );
            }
        }
        let behind = received_at.saturating_sub(millis);
        if let Some(max_age) = rule.max_age_seconds {
            if behind > seconds_to_millis(max_age) {
                return reject(
                    Code::DeviceTsTooOld,
                    format!("device_ts.max_age_seconds = {max_age}"),
                    &format!("is {} s behind the receive time", behind / 1_000),
                );
            }
        }
        if let Some(late_after) = rule.late_after_seconds {
            quality.late = behind > seconds_to_millis(late_after);
        }
        Ok(millis)
    }

    fn seq(
        &self,
        field: Option<Field<'_>>,
        quality: &mut Quality,
    ) -> Result<Option<i64>, Rejection> {
        let field = match field {
            Some(field) if !matches!(field.value, Scalar::Null) => field,
            _ if self.contract.seq.required => {
                return Err(
                    Rejection::new(Code::MissingSeq, "seq.required = true", "is missing")
                        .on(fields::SEQ),
                )
            }
            _ => return Ok(None),
        };
        let seq = match &field.value {
            Scalar::Unsigned(integer) => i64::try_from(*integer).ok(),
            Scalar::Text(text) if self.contract.coerce_numeric_strings => {
                let parsed = text
                    .parse::<u64>()
                    .ok()
                    .and_then(|seq| i64::try_from(seq).ok());
                if parsed.is_some() {
                    quality.coerced_fields.push(field.name.to_string());
                }
                parsed
            }
            _ => None,
        };
        match seq {
            Some(seq) => Ok(Some(seq)),
            None => Err(
                Rejection::new(Code::InvalidSeq, "seq", "must be a non-negative integer")
                    .on(&field.name)
                    .quoting(&field.value),
            ),
        }
    }

    fn metric(
        &self,
        spec: &MetricSpec,
        field: &Field<'_>,
        conversion: Option<Conversion>,
        quality: &mut Quality,
    ) -> Result<f64, Rejection> {
        let reject = |code, rule: String, problem: &str| {
            Err(Rejection::new(code, rule, problem)
                .on(&field.name)
                .quoting(&field.value))
        };
        let mut number = match &field.value {
            Scalar::Text(text) if self.contract.coerce_numeric_strings => {
                match text.trim().parse::<f64>() {
                    Ok(number) => {
                        quality.coerced_fields.push(field.name.to_string());
                        number
                    }
                    Err(_) => {
                        return reject(
                            Code::InvalidMetric,
                            format!("metrics.{}", spec.name),
                            "must be a number",
                        )
                    }
                }
            }
            value => match value.as_number() {
                Some(number) => number,
                None => {
                    return reject(
                        Code::InvalidMetric,
                        format!("metrics.{}", spec.name),
                        "must be a number",
                    )
                }
            },
        };
        if let Some(conversion) = conversion {
            number = conversion.apply(number);
            quality.converted_fields.push(field.name.to_string());
        }
        if !number.is_finite() {
            return reject(
                Code::MetricNotFinite,
                format!("metrics.{}", spec.name),
                "must be a finite number",
            );
        }
        if spec.integer && number.fract() != 0.0 {
            return reject(
                Code::InvalidMetric,
                format!("metrics.{}.integer = true", spec.name),
                "must be a whole number",
            );
        }
        // A converted value is named in the metric's unit, which is what the bound is in.
        let value = match conversion {
            Some(_) => format!("converts to {number} {}, which is", spec.name),
            None => String::from("is"),
        };
        if let Some(min) = spec.min.filter(|min| number < *min) {
            return reject(
                Code::MetricOutOfRange,
                format!("metrics.{}.min = {min}", spec.name),
                &format!("{value} below the minimum of {min}"),
            );
        }
        if let Some(max) = spec.max.filter(|max| number > *max) {
            return reject(
                Code::MetricOutOfRange,
                format!("metrics.{}.max = {max}", spec.name),
                &format!("{value} above the maximum of {max}"),
            );
        }
        Ok(number)
    }
}

/// The one copy of a declared metric name, for the life of the process. Every accepted event
/// names its metrics; borrowing the name costs nothing, where a `String` would cost an allocation
/// and an `Arc` an atomic count (measured: 18% of the time spent per field). Names are interned,
/// so loading a contract again adds nothing.
fn intern(name: &str) -> &'static str {
    static NAMES: OnceLock<Mutex<std::collections::BTreeSet<&'static str>>> = OnceLock::new();
    let names = NAMES.get_or_init(Mutex::default);
    // A poisoned lock still holds a valid set: interning only ever inserts.
    let mut names = names
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(interned) = names.get(name) {
        return interned;
    }
    let interned: &'static str = Box::leak(name.to_string().into_boxed_str());
    names.insert(interned);
    interned
}

/// Puts `field` in `slot`, or names the duplicate.
fn place<'a>(
    slot: &mut Option<Field<'a>>,
    field: Field<'a>,
    canonical: &str,
) -> Result<(), Rejection> {
    if slot.is_some() {
        return Err(duplicate(canonical, &field.name));
    }
    *slot = Some(field);
    Ok(())
}

fn duplicate(canonical: &str, name: &str) -> Rejection {
    let problem = if canonical == name {
        "appears twice".to_string()
    } else {
        format!("names `{canonical}`, which the payload already has")
    };
    Rejection::new(Code::DuplicateField, "aliases", problem).on(name)
}
