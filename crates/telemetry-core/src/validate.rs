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
//!    (`duplicate_field` when two land on one field), then the rules run in a fixed order:
//!    `device_id`, `device_ts`, `seq`, metrics by name, unknown fields. The first rule that fails
//!    decides the code, so a payload always gets the same code.
//!
//! Nothing here panics on any input: the fuzz target (`fuzz/`) and the property tests hold it to
//! that.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, OnceLock};

use rustc_hash::FxHashMap;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::contract::{fields, AllowedCharacters, Contract, Conversion, UnknownFields};
use crate::event::{Event, MetricName, Quality};

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
}

impl Code {
    /// Every code, in documentation order.
    pub const ALL: [Code; 20] = [
        Code::EmptyPayload,
        Code::PayloadTooLarge,
        Code::PayloadTooDeep,
        Code::TooManyFields,
        Code::InvalidJson,
        Code::NotAnObject,
        Code::DuplicateField,
        Code::MissingDeviceId,
        Code::InvalidDeviceId,
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
    slots: FxHashMap<Box<str>, Slot>,
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
        let mut slots = FxHashMap::default();
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
            slots.insert(name.into(), slot);
            for alias in aliases {
                slots.insert(alias.as_str().into(), slot);
            }
        }
        let mut metrics = Vec::with_capacity(contract.metrics.len());
        for (index, (name, rule)) in contract.metrics.iter().enumerate() {
            let plain = Slot::Metric {
                index,
                conversion: None,
            };
            slots.insert(name.as_str().into(), plain);
            for alias in &rule.aliases {
                slots.insert(alias.as_str().into(), plain);
            }
            for (source, conversion) in &rule.convert_from {
                let converted = Slot::Metric {
                    index,
                    conversion: Some(*conversion),
                };
                slots.insert(source.as_str().into(), converted);
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

    /// Validates and normalizes one raw payload received at `received_at` (UTC milliseconds).
    pub fn validate(&self, payload: &[u8], received_at: i64) -> Outcome {
        match self.validate_inner(payload, received_at) {
            Ok(event) => Outcome::Accepted(event),
            Err(rejection) => Outcome::Rejected(rejection),
        }
    }

    fn validate_inner(&self, payload: &[u8], received_at: i64) -> Result<Event, Rejection> {
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
        reader.finish(received_at)
    }

    fn device_id(&self, field: Option<Field<'_>>) -> Result<String, Rejection> {
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
        Ok(id.to_string())
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
        if let Some(min) = spec.min.filter(|min| number < *min) {
            return reject(
                Code::MetricOutOfRange,
                format!("metrics.{}.min = {min}", spec.name),
                &format!("is {number} {}, below the minimum", spec.name),
            );
        }
        if let Some(max) = spec.max.filter(|max| number > *max) {
            return reject(
                Code::MetricOutOfRange,
                format!("metrics.{}.max = {max}", spec.name),
                &format!("is {number} {}, above the maximum", spec.name),
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
    budget: Budget,
    device_id: Option<Field<'de>>,
    device_ts: Option<Field<'de>>,
    seq: Option<Field<'de>>,
    /// Bit `i` is set once declared metric `i` was given (a contract declares at most 256).
    metrics_seen: [u64; 4],
    metrics: BTreeMap<MetricName, f64>,
    attributes: BTreeMap<String, Value>,
    quality: Quality,
    /// The first metric or unknown-field rejection.
    deferred: Option<Rejection>,
    /// Why parsing stopped early (a duplicate field), when it did.
    stopped: Option<Rejection>,
}

impl<'v, 'de> Reader<'v, 'de> {
    fn new(validator: &'v Validator) -> Self {
        let limits = &validator.contract.limits;
        Reader {
            validator,
            budget: Budget {
                fields_left: Cell::new(limits.max_fields),
                max_depth: limits.max_depth,
                max_fields: limits.max_fields,
                stopped: Cell::new(None),
            },
            device_id: None,
            device_ts: None,
            seq: None,
            metrics_seen: [0; 4],
            metrics: BTreeMap::new(),
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
                        self.metrics.insert(Cow::Borrowed(spec.name), number);
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
                Some(number) => {
                    self.attributes.contains_key(name.as_ref())
                        || self
                            .metrics
                            .insert(Cow::Owned(name.to_string()), number)
                            .is_some()
                }
                None => {
                    self.metrics.contains_key(name.as_ref())
                        || self
                            .attributes
                            .insert(name.to_string(), field.value.into_json())
                            .is_some()
                }
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
    fn finish(self, received_at: i64) -> Result<Event, Rejection> {
        let validator = self.validator;
        let mut quality = self.quality;
        let device_id = validator.device_id(self.device_id)?;
        let device_ts = validator.device_ts(self.device_ts, received_at, &mut quality)?;
        let seq = validator.seq(self.seq, &mut quality)?;
        if let Some(rejection) = self.deferred {
            return Err(rejection);
        }
        if let Some(spec) = validator
            .metrics
            .iter()
            .find(|spec| spec.required && !self.metrics.contains_key(spec.name))
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
            metrics: self.metrics,
            attributes: self.attributes,
            schema_version: validator.contract.version,
            quality,
        })
    }
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

// ---- Parsing: one pass, bounded, borrowing from the payload. ----

/// A top-level field of the payload, its name and value borrowed when they have no escapes.
#[derive(Debug, Clone)]
struct Field<'a> {
    name: Cow<'a, str>,
    value: Scalar<'a>,
}

/// A top-level value. Nested objects and arrays are rare in telemetry and only ever kept as
/// attributes, so they are built as JSON values; everything else stays cheap.
#[derive(Debug, Clone)]
enum Scalar<'a> {
    Null,
    Bool(bool),
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Text(Cow<'a, str>),
    Nested(Value),
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

    fn into_json(self) -> Value {
        match self {
            Scalar::Null => Value::Null,
            Scalar::Bool(flag) => Value::Bool(flag),
            Scalar::Unsigned(number) => Value::from(number),
            Scalar::Signed(number) => Value::from(number),
            Scalar::Float(number) => Value::from(number),
            Scalar::Text(text) => Value::String(text.into_owned()),
            Scalar::Nested(value) => value,
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

/// Counts fields and watches depth while parsing; remembers which limit stopped it.
struct Budget {
    fields_left: Cell<usize>,
    max_depth: usize,
    max_fields: usize,
    stopped: Cell<Option<Stop>>,
}

#[derive(Debug, Clone, Copy)]
enum Stop {
    TooDeep,
    TooManyFields,
    NotAnObject(&'static str),
}

impl Budget {
    fn stop<E: de::Error>(&self, stop: Stop) -> E {
        self.stopped.set(Some(stop));
        E::custom("stopped by a payload limit")
    }

    fn take_field<E: de::Error>(&self) -> Result<(), E> {
        match self.fields_left.get().checked_sub(1) {
            Some(left) => {
                self.fields_left.set(left);
                Ok(())
            }
            None => Err(self.stop(Stop::TooManyFields)),
        }
    }

    fn enter<E: de::Error>(&self, depth: usize) -> Result<(), E> {
        if depth > self.max_depth {
            Err(self.stop(Stop::TooDeep))
        } else {
            Ok(())
        }
    }
}

fn parse<'de>(payload: &'de [u8], reader: &mut Reader<'_, 'de>) -> Result<(), Rejection> {
    let mut deserializer = sonic_rs::Deserializer::from_slice(payload);
    let parsed = PayloadSeed(&mut *reader)
        .deserialize(&mut deserializer)
        .and_then(|()| deserializer.end());
    parsed.map_err(|error| {
        if let Some(rejection) = reader.stopped.take() {
            return rejection;
        }
        let budget = &reader.budget;
        match budget.stopped.get() {
            Some(Stop::TooDeep) => Rejection::new(
                Code::PayloadTooDeep,
                format!("limits.max_depth = {}", budget.max_depth),
                "nests objects or arrays too deep",
            ),
            Some(Stop::TooManyFields) => Rejection::new(
                Code::TooManyFields,
                format!("limits.max_fields = {}", budget.max_fields),
                "has more fields than the limit",
            ),
            Some(Stop::NotAnObject(found)) => Rejection::new(
                Code::NotAnObject,
                "json",
                format!("is a JSON {found}, expected an object"),
            ),
            None => Rejection::new(
                Code::InvalidJson,
                "json",
                format!(
                    "is not valid JSON: {}",
                    error.to_string().lines().next().unwrap_or_default()
                ),
            ),
        }
    })
}

/// The payload: an object, read field by field into the [`Reader`].
struct PayloadSeed<'r, 'v, 'de>(&'r mut Reader<'v, 'de>);

impl<'de> DeserializeSeed<'de> for PayloadSeed<'_, '_, 'de> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PayloadSeed<'_, '_, 'de> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let reader = self.0;
        reader.budget.enter(1)?;
        while let Some(name) = map.next_key_seed(NameSeed)? {
            reader.budget.take_field()?;
            let value = map.next_value_seed(ScalarSeed {
                budget: &reader.budget,
                depth: 1,
            })?;
            if let Err(rejection) = reader.take(Field { name, value }) {
                reader.stopped = Some(rejection);
                return Err(de::Error::custom("stopped by a duplicate field"));
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(self.0.budget.stop(Stop::NotAnObject("array")))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(self.0.budget.stop(Stop::NotAnObject("boolean")))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(self.0.budget.stop(Stop::NotAnObject("number")))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(self.0.budget.stop(Stop::NotAnObject("number")))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(self.0.budget.stop(Stop::NotAnObject("number")))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(self.0.budget.stop(Stop::NotAnObject("string")))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(self.0.budget.stop(Stop::NotAnObject("null")))
    }
}

/// A member name, borrowed from the payload when it has no escapes.
struct NameSeed;

impl<'de> DeserializeSeed<'de> for NameSeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for NameSeed {
    type Value = Cow<'de, str>;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a member name")
    }

    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(text))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(text.to_string()))
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(text))
    }
}

/// A top-level member's value at `depth` (the payload object's members are at depth 1).
struct ScalarSeed<'b> {
    budget: &'b Budget,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for ScalarSeed<'_> {
    type Value = Scalar<'de>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ScalarSeed<'_> {
    type Value = Scalar<'de>;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }
    fn visit_bool<E: de::Error>(self, flag: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Bool(flag))
    }
    fn visit_u64<E: de::Error>(self, number: u64) -> Result<Self::Value, E> {
        Ok(Scalar::Unsigned(number))
    }
    fn visit_i64<E: de::Error>(self, number: i64) -> Result<Self::Value, E> {
        Ok(Scalar::Signed(number))
    }
    fn visit_f64<E: de::Error>(self, number: f64) -> Result<Self::Value, E> {
        Ok(Scalar::Float(number))
    }
    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Text(Cow::Borrowed(text)))
    }
    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Text(Cow::Owned(text.to_string())))
    }
    fn visit_string<E: de::Error>(self, text: String) -> Result<Self::Value, E> {
        Ok(Scalar::Text(Cow::Owned(text)))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        NestedSeed {
            budget: self.budget,
            depth: self.depth,
        }
        .visit_map(map)
        .map(Scalar::Nested)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        NestedSeed {
            budget: self.budget,
            depth: self.depth,
        }
        .visit_seq(seq)
        .map(Scalar::Nested)
    }
}

/// A value inside a nested object or array, whose container is at `depth`.
struct NestedSeed<'b> {
    budget: &'b Budget,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for NestedSeed<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NestedSeed<'_> {
    type Value = Value;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_bool<E: de::Error>(self, flag: bool) -> Result<Value, E> {
        Ok(Value::Bool(flag))
    }
    fn visit_u64<E: de::Error>(self, number: u64) -> Result<Value, E> {
        Ok(Value::from(number))
    }
    fn visit_i64<E: de::Error>(self, number: i64) -> Result<Value, E> {
        Ok(Value::from(number))
    }
    fn visit_f64<E: de::Error>(self, number: f64) -> Result<Value, E> {
        Ok(Value::from(number))
    }
    fn visit_str<E: de::Error>(self, text: &str) -> Result<Value, E> {
        Ok(Value::String(text.to_string()))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let depth = self.depth + 1;
        self.budget.enter(depth)?;
        let mut object = Map::new();
        while let Some(name) = map.next_key::<String>()? {
            self.budget.take_field()?;
            let value = map.next_value_seed(NestedSeed {
                budget: self.budget,
                depth,
            })?;
            object.insert(name, value);
        }
        Ok(Value::Object(object))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let depth = self.depth + 1;
        self.budget.enter(depth)?;
        let mut array = Vec::new();
        while let Some(value) = seq.next_element_seed(NestedSeed {
            budget: self.budget,
            depth,
        })? {
            self.budget.take_field()?;
            array.push(value);
        }
        Ok(Value::Array(array))
    }
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
        let metrics: Vec<(&str, f64)> = event
            .metrics
            .iter()
            .map(|(name, value)| (&**name, *value))
            .collect();
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
            "field `temp` is 900 temperature_c, above the maximum: 900 (rule metrics.temperature_c.max = 125)"
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
                                prop_assert!(rule.min.is_none_or(|min| *value >= min), "{name} {value}");
                                prop_assert!(rule.max.is_none_or(|max| *value <= max), "{name} {value}");
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
