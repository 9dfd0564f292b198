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

/// The result of validating one raw record. A rejection is a value, not an error.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The payload passed the contract; here it is normalized.
    Accepted(Event),
    /// The payload failed the contract; the record goes to the DLQ with this reason.
    Rejected(Rejection),
}

/// The stable reason codes. Each is documented in `docs/contract.md`; a test keeps the two in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// The payload has no bytes.
    EmptyPayload,
    /// The payload is larger than `limits.max_payload_bytes`.
    PayloadTooLarge,
    /// Objects and arrays nest deeper than `limits.max_depth`.
    PayloadTooDeep,
    /// More object members and array elements than `limits.max_fields`.
    TooManyFields,
    /// Not valid JSON (or not UTF-8).
    InvalidJson,
    /// Valid JSON, but not an object.
    NotAnObject,
    /// Two names in the payload land on one field (a repeated key, or a field and its alias).
    DuplicateField,
    /// No `device_id` (or null).
    MissingDeviceId,
    /// `device_id` is not a string of allowed characters within the length limit.
    InvalidDeviceId,
    /// `device_id` is not the device the MQTT topic names (`device_id.bind_to_topic`).
    DeviceIdMismatch,
    /// No `device_ts` (or null).
    MissingDeviceTs,
    /// `device_ts` is not a usable timestamp.
    InvalidDeviceTs,
    /// `device_ts` is further ahead of the receive time than the contract allows.
    DeviceTsInFuture,
    /// `device_ts` is further behind the receive time than the contract allows.
    DeviceTsTooOld,
    /// The contract requires `seq` and there is none.
    MissingSeq,
    /// `seq` is not a non-negative integer.
    InvalidSeq,
    /// A metric the contract requires is absent (or null).
    MissingMetric,
    /// A declared metric is not a number (or not a whole number where one is required).
    InvalidMetric,
    /// A declared metric is NaN or infinite (sent as a string, or after unit conversion).
    MetricNotFinite,
    /// A declared metric is outside its range.
    MetricOutOfRange,
    /// The contract rejects fields it does not declare, and there is one.
    UnknownField,
    /// Kafka refused the record for good for a reason other than its size; the bridge forwarded
    /// what it could keep of it.
    KafkaRejected,
}

impl Code {
    /// Every code, in documentation order.
    pub const ALL: [Code; 22] = [
        Code::EmptyPayload,
        Code::PayloadTooLarge,
        Code::PayloadTooDeep,
        Code::TooManyFields,
        Code::InvalidJson,
        Code::NotAnObject,
        Code::DuplicateField,
        Code::MissingDeviceId,
        Code::InvalidDeviceId,
        Code::DeviceIdMismatch,
        Code::MissingDeviceTs,
        Code::InvalidDeviceTs,
        Code::DeviceTsInFuture,
        Code::DeviceTsTooOld,
        Code::MissingSeq,
        Code::InvalidSeq,
        Code::MissingMetric,
        Code::InvalidMetric,
        Code::MetricNotFinite,
        Code::MetricOutOfRange,
        Code::UnknownField,
        Code::KafkaRejected,
    ];

    /// The short, stable, snake_case code: the DLQ `error.code` header and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::EmptyPayload => "empty_payload",
            Code::PayloadTooLarge => "payload_too_large",
            Code::PayloadTooDeep => "payload_too_deep",
            Code::TooManyFields => "too_many_fields",
            Code::InvalidJson => "invalid_json",
            Code::NotAnObject => "not_an_object",
            Code::DuplicateField => "duplicate_field",
            Code::MissingDeviceId => "missing_device_id",
            Code::InvalidDeviceId => "invalid_device_id",
            Code::DeviceIdMismatch => "device_id_mismatch",
            Code::MissingDeviceTs => "missing_device_ts",
            Code::InvalidDeviceTs => "invalid_device_ts",
            Code::DeviceTsInFuture => "device_ts_in_future",
            Code::DeviceTsTooOld => "device_ts_too_old",
            Code::MissingSeq => "missing_seq",
            Code::InvalidSeq => "invalid_seq",
            Code::MissingMetric => "missing_metric",
            Code::InvalidMetric => "invalid_metric",
            Code::MetricNotFinite => "metric_not_finite",
            Code::MetricOutOfRange => "metric_out_of_range",
            Code::UnknownField => "unknown_field",
            Code::KafkaRejected => "kafka_rejected",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a payload was rejected: the code, the field and offending value when there is one, the
/// contract rule that failed, and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    code: Code,
    field: Option<String>,
    value: Option<String>,
    rule: String,
    problem: String,
}

impl Rejection {
    fn new(code: Code, rule: impl Into<String>, problem: impl Into<String>) -> Self {
        Rejection {
            code,
            field: None,
            value: None,
            rule: rule.into(),
            problem: problem.into(),
        }
    }

    fn on(mut self, field: &str) -> Self {
        self.field = Some(field.to_string());
        self
    }

    fn quoting(mut self, value: &Scalar<'_>) -> Self {
        self.value = Some(value.quote());
        self
    }

    /// The stable code.
    pub fn code(&self) -> &'static str {
        self.code.as_str()
    }

    /// The stable code, as a value.
    pub fn kind(&self) -> Code {
        self.code
    }

    /// The payload field at fault, as the device named it, when one is.
    pub fn field(&self) -> Option<&str> {
        self.field.as_deref()
    }

    /// The offending value as JSON text, truncated, when there is one.
    pub fn value(&self) -> Option<&str> {
        self.value.as_deref()
    }

    /// The contract rule that failed, e.g. `metrics.temperature_c.max = 125`.
    pub fn rule(&self) -> &str {
        &self.rule
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "field `{field}` {}", self.problem)?,
            None => write!(f, "payload {}", self.problem)?,
        }
        if let Some(value) = &self.value {
            write!(f, ": {value}")?;
        }
        write!(f, " (rule {})", self.rule)
    }
}

/// Latest device time accepted: 9999-12-31T23:59:59.999Z, the end of SQL's DATETIME range.
pub const MAX_TIMESTAMP_MS: i64 = 253_402_300_799_999;

/// Offending values quoted in messages are cut to this many characters.
const MAX_QUOTED_CHARS: usize = 64;

/// Where a payload name lands.
#[derive(Debug, Clone, Copy)]
enum Slot {
    DeviceId,
    DeviceTs,
    Seq,
    Metric {
        index: usize,
        conversion: Option<Conversion>,
    },
}

/// Names to slots, looked up once per payload field: the hottest lookup in the engine. Names of
/// up to 16 bytes (nearly all) are packed into a `u128` and found in an open-addressing table by
/// comparing integers, with no string comparison; longer names use a hash map. Measured: the
/// general hash map spent a quarter of the time per record hashing and comparing strings.
#[derive(Debug, Clone, Default)]
struct NameTable {
    /// `(packed name, length, slot)`; the length is a power of two (or zero).
    short: Vec<Option<(u128, usize, Slot)>>,
    long: FxHashMap<Box<str>, Slot>,
    entries: Vec<(String, Slot)>,
}

impl NameTable {
    fn insert(&mut self, name: &str, slot: Slot) {
        self.entries.push((name.to_string(), slot));
        if name.len() > 16 {
            self.long.insert(name.into(), slot);
            return;
        }
        let size = (self.entries.len() * 4).next_power_of_two().max(16);
        if size != self.short.len() {
            // Rebuild at the new size; contracts are small and this runs once at start-up.
            self.short = vec![None; size];
            let entries = std::mem::take(&mut self.entries);
            for (name, slot) in &entries {
                if name.len() <= 16 {
                    self.place(name.as_bytes(), *slot);
                }
            }
            self.entries = entries;
        } else {
            self.place(name.as_bytes(), slot);
        }
    }

    fn place(&mut self, name: &[u8], slot: Slot) {
        let packed = pack(name);
        let mask = self.short.len() - 1;
        let mut index = spread(packed, name.len()) & mask;
        while let Some(Some(_)) = self.short.get(index) {
            index = (index + 1) & mask;
        }
        if let Some(entry) = self.short.get_mut(index) {
            *entry = Some((packed, name.len(), slot));
        }
    }

    #[inline]
    fn get(&self, name: &str) -> Option<&Slot> {
        let bytes = name.as_bytes();
        if bytes.len() > 16 {
            return self.long.get(name);
        }
        if self.short.is_empty() {
            return None;
        }
        let packed = pack(bytes);
        let mask = self.short.len() - 1;
        let mut index = spread(packed, bytes.len()) & mask;
        // The table is at most a quarter full, so a free entry ends every probe.
        while let Some(Some((candidate, length, slot))) = self.short.get(index) {
            if *candidate == packed && *length == bytes.len() {
                return Some(slot);
            }
            index = (index + 1) & mask;
        }
        None
    }
}

/// Up to 16 bytes as one integer that, with the length, identifies them. Read as (possibly
/// overlapping) whole words straight from the slice: copying through a buffer first stalled the
/// CPU on every field (store forwarding), a third of the lookup's time.
#[inline]
fn pack(name: &[u8]) -> u128 {
    let length = name.len();
    let word = |at: usize| -> u64 {
        name.get(at..at + 8)
            .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
            .map_or(0, u64::from_le_bytes)
    };
    let half = |at: usize| -> u64 {
        name.get(at..at + 4)
            .and_then(|bytes| <[u8; 4]>::try_from(bytes).ok())
            .map_or(0, |bytes| u64::from(u32::from_le_bytes(bytes)))
    };
    let byte = |at: usize| -> u64 { name.get(at).map_or(0, |byte| u64::from(*byte)) };
    let (low, high) = match length {
        0 => (0, 0),
        1..=3 => (byte(0) | byte(length / 2) << 8 | byte(length - 1) << 16, 0),
        4..=7 => (half(0), half(length - 4)),
        _ => (word(0), word(length.saturating_sub(8))),
    };
    u128::from(low) | u128::from(high) << 64
}

/// A table index from a packed name.
#[inline]
fn spread(packed: u128, length: usize) -> usize {
    // Truncations are the point: both halves and the length are folded into one word.
    #[allow(clippy::cast_possible_truncation)]
    let folded = (packed as u64) ^ ((packed >> 64) as u64).rotate_left(29) ^ (length as u64);
    #[allow(clippy::cast_possible_truncation)]
    let index = (folded.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize;
    index
}

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

/// What one payload has been read into so far. Fields are checked as they are parsed; a
/// metric's or unknown field's rejection is held back until the identity fields have passed, so
/// a record always reports its most basic fault.
struct Reader<'v, 'de> {
    validator: &'v Validator,
    device_id: Option<Field<'de>>,
    device_ts: Option<Field<'de>>,
    seq: Option<Field<'de>>,
    /// Bit `i` is set once declared metric `i` was given (a contract declares at most 256).
    metrics_seen: [u64; 4],
    /// Metrics in payload order; sorted, and checked for repeats, once at the end.
    metrics: Vec<(MetricName, f64)>,
    attributes: BTreeMap<String, Value>,
    quality: Quality,
    /// The first metric or unknown-field rejection.
    deferred: Option<Rejection>,
    /// The first repeated field, reported once the payload has been read.
    stopped: Option<Rejection>,
}

impl<'v, 'de> Reader<'v, 'de> {
    fn new(validator: &'v Validator) -> Self {
        Reader {
            validator,
            device_id: None,
            device_ts: None,
            seq: None,
            metrics_seen: [0; 4],
            metrics: Vec::with_capacity(16),
            attributes: BTreeMap::new(),
            quality: Quality::default(),
            deferred: None,
            stopped: None,
        }
    }

    /// Takes one top-level field. Errs only for a fault that stops parsing (a duplicate).
    fn take(&mut self, field: Field<'de>) -> Result<(), Rejection> {
        let validator = self.validator;
        match validator.slots.get(field.name.as_ref()) {
            Some(Slot::DeviceId) => place(&mut self.device_id, field, fields::DEVICE_ID),
            Some(Slot::DeviceTs) => place(&mut self.device_ts, field, fields::DEVICE_TS),
            Some(Slot::Seq) => place(&mut self.seq, field, fields::SEQ),
            Some(Slot::Metric { index, conversion }) => {
                let Some(spec) = validator.metrics.get(*index) else {
                    return Ok(()); // Slots are built from `metrics`: every index is in range.
                };
                let (word, bit) = (index / 64, 1u64 << (index % 64));
                if self
                    .metrics_seen
                    .get(word)
                    .is_some_and(|seen| seen & bit != 0)
                {
                    return Err(duplicate(spec.name, &field.name));
                }
                if let Some(seen) = self.metrics_seen.get_mut(word) {
                    *seen |= bit;
                }
                if matches!(field.value, Scalar::Null) || self.deferred.is_some() {
                    return Ok(()); // No reading; or rejected already, so only duplicates matter.
                }
                match validator.metric(spec, &field, *conversion, &mut self.quality) {
                    Ok(number) => {
                        self.metrics.push((Cow::Borrowed(spec.name), number));
                    }
                    Err(rejection) => self.deferred = Some(rejection),
                }
                Ok(())
            }
            None => self.take_unknown(field),
        }
    }

    fn take_unknown(&mut self, field: Field<'de>) -> Result<(), Rejection> {
        let name = field.name;
        let repeated = match self.validator.contract.unknown_fields {
            UnknownFields::Keep => match field.value.as_number() {
                // Repeats among metrics are found when they are sorted, in `finish`.
                Some(number) => {
                    self.metrics.push((Cow::Owned(name.into_owned()), number));
                    return Ok(());
                }
                None => self
                    .attributes
                    .insert(name.to_string(), field.value.into_json())
                    .is_some(),
            },
            UnknownFields::Drop => {
                let repeated = self
                    .quality
                    .dropped_fields
                    .iter()
                    .any(|dropped| *dropped == name);
                self.quality.dropped_fields.push(name.to_string());
                repeated
            }
            UnknownFields::Reject => {
                if self.deferred.is_none() {
                    self.deferred = Some(
                        Rejection::new(
                            Code::UnknownField,
                            "unknown_fields = \"reject\"",
                            "is not in the contract",
                        )
                        .on(&name)
                        .quoting(&field.value),
                    );
                }
                false
            }
        };
        if repeated {
            return Err(duplicate(&name, &name));
        }
        Ok(())
    }

    /// Checks the identity fields, then reports held-back faults and missing metrics.
    #[inline(always)]
    fn finish(self, received_at: i64, topic_device: TopicDevice<'_>) -> Result<Event, Rejection> {
        let validator = self.validator;
        let metrics =
            Metrics::from_unsorted(self.metrics).map_err(|name| duplicate(&name, &name))?;
        if let Some(name) = self
            .attributes
            .keys()
            .find(|name| metrics.contains_key(name))
        {
            return Err(duplicate(name, name));
        }
        let mut quality = self.quality;
        let device_id = validator.device_id(self.device_id, topic_device)?;
        let device_ts = validator.device_ts(self.device_ts, received_at, &mut quality)?;
        let seq = validator.seq(self.seq, &mut quality)?;
        if let Some(rejection) = self.deferred {
            return Err(rejection);
        }
        if let Some(spec) = validator
            .metrics
            .iter()
            .find(|spec| spec.required && !metrics.contains_key(spec.name))
        {
            return Err(Rejection::new(
                Code::MissingMetric,
                format!("metrics.{}.required = true", spec.name),
                "is missing",
            )
            .on(spec.name));
        }
        quality.dropped_fields.sort_unstable();
        Ok(Event {
            device_id,
            device_ts,
            received_at,
            seq,
            metrics,
            attributes: self.attributes,
            schema_version: validator.contract.version,
            quality,
        })
    }
}

/// The rejection of a payload the bridge could not forward whole: its reason code
/// (`payload_too_large` unless the bridge said `kafka_rejected`), the original size and the
/// bridge's detail.
fn cut_rejection(cut: &Cut<'_>, kept: usize) -> Rejection {
    let (code, rule) = match cut.reason {
        Some(reason) if reason == Code::KafkaRejected.as_str() => (Code::KafkaRejected, "kafka"),
        _ => (Code::PayloadTooLarge, "bridge max_message_bytes"),
    };
    let mut problem = format!(
        "is {} bytes, more than the bridge could forward whole; {kept} bytes are kept",
        cut.original_bytes
    );
    if let Some(detail) = cut.detail {
        problem.push_str(": ");
        problem.extend(detail.chars().take(MAX_QUOTED_CHARS * 4));
    }
    Rejection::new(code, rule, problem)
}

fn seconds_to_millis(seconds: u64) -> i64 {
    i64::try_from(seconds)
        .unwrap_or(i64::MAX)
        .saturating_mul(1_000)
}

/// Reads a whole number of seconds, milliseconds, microseconds or nanoseconds since the epoch,
/// told apart by magnitude, as milliseconds. Seconds reach to the year 5138 and milliseconds
/// start in 1973, so the ranges do not overlap for any real device clock.
fn integer_epoch_to_millis(integer: u64) -> Option<i64> {
    let millis = match integer {
        0..100_000_000_000 => integer.checked_mul(1_000)?,
        100_000_000_000..100_000_000_000_000 => integer,
        100_000_000_000_000..100_000_000_000_000_000 => integer / 1_000,
        _ => integer / 1_000_000,
    };
    i64::try_from(millis).ok()
}

/// As [`integer_epoch_to_millis`] for numbers with a fraction, rounded to the millisecond.
fn float_epoch_to_millis(number: f64) -> Option<i64> {
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
    // Finite, non-negative and below 1e14 here, so the cast is exact.
    #[allow(clippy::cast_possible_truncation)]
    Some(millis.round() as i64)
}

/// A numeric string as an epoch time, when it is one.
fn coerce_epoch(text: &str) -> Option<i64> {
    let text = text.trim();
    if !text
        .bytes()
        .next()
        .is_some_and(|first| first.is_ascii_digit())
    {
        return None;
    }
    match text.parse::<u64>() {
        Ok(integer) => integer_epoch_to_millis(integer),
        Err(_) => text.parse::<f64>().ok().and_then(float_epoch_to_millis),
    }
}

// ---- Parsing: one pass, bounded, borrowing from the payload (see `json_reader`). ----

/// A top-level field of the payload, its name and value borrowed when they have no escapes.
#[derive(Debug, Clone)]
struct Field<'a> {
    name: Cow<'a, str>,
    value: Scalar<'a>,
}

impl Scalar<'_> {
    // JSON numbers above 2^53 lose precision as f64; metrics are measurements, so that is fine.
    #[allow(clippy::cast_precision_loss)]
    fn as_number(&self) -> Option<f64> {
        match self {
            Scalar::Unsigned(number) => Some(*number as f64),
            Scalar::Signed(number) => Some(*number as f64),
            Scalar::Float(number) => Some(*number),
            _ => None,
        }
    }

    /// The value as JSON text, cut to [`MAX_QUOTED_CHARS`] characters, for messages.
    fn quote(&self) -> String {
        let text = self.clone().into_json().to_string();
        match text.char_indices().nth(MAX_QUOTED_CHARS) {
            Some((cut, _)) => format!("{}…", &text[..cut]),
            None => text,
        }
    }
}

fn parse<'de>(payload: &'de [u8], reader: &mut Reader<'_, 'de>) -> Result<(), Rejection> {
    let limits = reader.validator.contract.limits;
    let read = json_reader::read_object(
        payload,
        limits.max_depth,
        limits.max_fields,
        |name, value| {
            // A repeated field is reported only once the whole payload has been read: a payload
            // that is also broken JSON is `invalid_json`, the more basic fault.
            if let Err(rejection) = reader.take(Field { name, value }) {
                reader.stopped.get_or_insert(rejection);
            }
        },
    );
    if read.is_ok() {
        if let Some(rejection) = reader.stopped.take() {
            return Err(rejection);
        }
    }
    read.map_err(|error| match error {
        ReadError::TooDeep => Rejection::new(
            Code::PayloadTooDeep,
            format!("limits.max_depth = {}", limits.max_depth),
            "nests objects or arrays too deep",
        ),
        ReadError::TooManyFields => Rejection::new(
            Code::TooManyFields,
            format!("limits.max_fields = {}", limits.max_fields),
            "has more fields than the limit",
        ),
        ReadError::NotAnObject(found) => Rejection::new(
            Code::NotAnObject,
            "json",
            format!("is a JSON {found}, expected an object"),
        ),
        ReadError::Invalid(detail) => Rejection::new(
            Code::InvalidJson,
            "json",
            format!("is not valid JSON: {detail}"),
        ),
    })
}

#[cfg(test)]
mod tests {
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
                r#"{"device_id":"d","device_ts":"2025-11-28T03:20:00","seq":1,"battery_v":3.7}"#
                    .into(),
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
        let docs = include_str!("../../../docs/contract.md");
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
}
