//! What a validation decides: [`Outcome`], the stable reason [`Code`]s, and the [`Rejection`]
//! that carries one with its field, value and rule.

use super::*;

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
    pub(super) fn new(code: Code, rule: impl Into<String>, problem: impl Into<String>) -> Self {
        Rejection {
            code,
            field: None,
            value: None,
            rule: rule.into(),
            problem: problem.into(),
        }
    }

    pub(super) fn on(mut self, field: &str) -> Self {
        self.field = Some(field.to_string());
        self
    }

    pub(super) fn quoting(mut self, value: &Scalar<'_>) -> Self {
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
