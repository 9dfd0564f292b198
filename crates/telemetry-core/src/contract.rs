//! The payload contract: a declarative, versioned description of what the audit service accepts
//! and how it normalizes it. Operators edit it as TOML (the default is
//! `contracts/telemetry.toml`, compiled into the binary); device teams get it as a JSON Schema
//! ([`Contract::to_json_schema`]), and a JSON Schema document can be loaded as a contract
//! ([`Contract::from_json_schema`]).
//!
//! A contract is checked as a whole when it is loaded ([`Contract::check`]), so a mistake in it
//! stops the service at start-up with a message naming the setting, never mid-stream.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// The contract shipped with the code: `contracts/telemetry.toml`.
pub const DEFAULT_CONTRACT_TOML: &str = include_str!("../../../contracts/telemetry.toml");

/// Where the default contract lives in the repository, for messages.
pub const DEFAULT_CONTRACT_PATH: &str = "contracts/telemetry.toml";

/// Errors in a contract: each names the setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    /// The file could not be read.
    #[error("cannot read contract {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML does not describe a contract (syntax, unknown key, wrong type).
    #[error("contract is not valid TOML for a contract: {0}")]
    Toml(#[from] toml::de::Error),
    /// The JSON Schema document could not be read as a contract.
    #[error("JSON Schema cannot be loaded as a contract: {0}")]
    JsonSchema(String),
    /// A setting has a value that cannot work.
    #[error("contract setting `{setting}` {problem}")]
    Invalid {
        /// The setting, as a TOML path.
        setting: String,
        /// What is wrong with it.
        problem: String,
    },
}

fn invalid(setting: impl Into<String>, problem: impl Into<String>) -> ContractError {
    ContractError::Invalid {
        setting: setting.into(),
        problem: problem.into(),
    }
}

/// The whole contract. Field names are the TOML keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contract {
    /// Stamped as `schema_version` on every cleaned event and table row.
    pub version: u32,
    /// Whether numbers sent as strings are coerced (and counted) rather than rejected.
    #[serde(default = "yes")]
    pub coerce_numeric_strings: bool,
    /// What happens to fields the contract does not declare.
    #[serde(default)]
    pub unknown_fields: UnknownFields,
    /// Bounds checked while parsing.
    #[serde(default)]
    pub limits: PayloadLimits,
    /// Rules for `device_id`.
    #[serde(default)]
    pub device_id: DeviceIdRule,
    /// Rules for `device_ts`.
    #[serde(default)]
    pub device_ts: DeviceTsRule,
    /// Rules for `seq`.
    #[serde(default)]
    pub seq: SeqRule,
    /// Declared metrics by canonical name.
    #[serde(default)]
    pub metrics: BTreeMap<String, MetricRule>,
}

fn yes() -> bool {
    true
}

/// The policy for fields the contract does not declare.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownFields {
    /// Numbers become metrics; other values are kept as attributes.
    #[default]
    Keep,
    /// Removed, and named on the cleaned event.
    Drop,
    /// The record is rejected as `unknown_field`.
    Reject,
}

/// Bounds on a payload, checked before and while parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadLimits {
    /// Largest payload, in bytes; checked before parsing.
    pub max_payload_bytes: usize,
    /// Deepest nesting of objects and arrays; the payload object is depth 1.
    pub max_depth: usize,
    /// Most object members plus array elements, at every depth.
    pub max_fields: usize,
}

impl Default for PayloadLimits {
    fn default() -> Self {
        PayloadLimits {
            max_payload_bytes: 64 * 1024,
            max_depth: 8,
            max_fields: 256,
        }
    }
}

/// Rules for `device_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceIdRule {
    /// Other names devices use for it.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Longest id in bytes; the table's column holds 128.
    pub max_length: usize,
    /// The characters allowed, as a regular-expression character class without brackets
    /// (`A-Za-z0-9._:-`); ASCII only, and never `/`, `+` or `#` (a device id is an MQTT topic
    /// segment).
    pub allowed_characters: String,
    /// Whether the payload's device id must be the one the MQTT topic names (the segment under
    /// the bridge's `+`): a device publishing on `devices/a/telemetry` cannot write as `b`
    /// (`device_id_mismatch`). Turn off for gateways that publish for many devices on one topic.
    #[serde(default = "yes")]
    pub bind_to_topic: bool,
}

impl Default for DeviceIdRule {
    fn default() -> Self {
        DeviceIdRule {
            aliases: Vec::new(),
            max_length: MAX_DEVICE_ID_LENGTH,
            allowed_characters: String::from("A-Za-z0-9._:-"),
            bind_to_topic: true,
        }
    }
}

/// Most metrics a contract may declare.
pub const MAX_METRICS: usize = 256;

/// The `device_id` column's width: no contract may allow longer ids.
pub const MAX_DEVICE_ID_LENGTH: usize = 128;

/// Rules for `device_ts`, checked against the time the bridge received the payload.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceTsRule {
    /// Other names devices use for it.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Reject as `device_ts_in_future` when ahead of the receive time by more than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_future_skew_seconds: Option<u64>,
    /// Flag as late when behind the receive time by more than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_after_seconds: Option<u64>,
    /// Reject as `device_ts_too_old` when behind the receive time by more than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_seconds: Option<u64>,
}

/// Rules for `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeqRule {
    /// Other names devices use for it.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Whether a payload without `seq` is rejected as `missing_seq`.
    #[serde(default)]
    pub required: bool,
}

/// Rules for one declared metric.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricRule {
    /// Other names devices use for it, in the same unit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Whether a payload without it is rejected as `missing_metric`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub required: bool,
    /// Whether it must be a whole number.
    #[serde(default, skip_serializing_if = "is_false")]
    pub integer: bool,
    /// Smallest value accepted (after unit conversion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Largest value accepted (after unit conversion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// Fields in other units, by name, and how to convert them to this metric.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub convert_from: BTreeMap<String, Conversion>,
}

// serde's `skip_serializing_if` takes a reference.
#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_false(value: &bool) -> bool {
    !*value
}

/// A linear unit conversion: `(value + add) * multiply / divide`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conversion {
    /// Added first.
    #[serde(default)]
    pub add: f64,
    /// Then multiplied by this.
    #[serde(default = "one")]
    pub multiply: f64,
    /// Then divided by this.
    #[serde(default = "one")]
    pub divide: f64,
}

fn one() -> f64 {
    1.0
}

impl Conversion {
    /// Converts a value in the source unit to the metric's unit.
    pub fn apply(&self, value: f64) -> f64 {
        (value + self.add) * self.multiply / self.divide
    }
}

/// The canonical names of the identity fields.
pub mod fields {
    /// The device's id.
    pub const DEVICE_ID: &str = "device_id";
    /// Device time.
    pub const DEVICE_TS: &str = "device_ts";
    /// The device's sequence number.
    pub const SEQ: &str = "seq";
}

impl Default for Contract {
    /// The contract shipped with the code.
    fn default() -> Self {
        // A unit test parses the shipped file, so the fallback cannot be reached in a released
        // build; falling back to the identity rules beats a panic (and `Default` would recurse).
        Contract::from_toml(DEFAULT_CONTRACT_TOML).unwrap_or_else(|_| Contract::minimal())
    }
}

impl Contract {
    /// Identity rules only, every other field kept: the contract before contracts existed.
    pub fn minimal() -> Self {
        Contract {
            version: 1,
            coerce_numeric_strings: true,
            unknown_fields: UnknownFields::Keep,
            limits: PayloadLimits::default(),
            device_id: DeviceIdRule::default(),
            device_ts: DeviceTsRule::default(),
            seq: SeqRule::default(),
            metrics: BTreeMap::new(),
        }
    }

    /// Parses and checks a TOML contract.
    pub fn from_toml(text: &str) -> Result<Self, ContractError> {
        let contract: Contract = toml::from_str(text)?;
        contract.check()?;
        Ok(contract)
    }

    /// The contract at `path`, or without one the contract compiled into the binary (a copy of
    /// `contracts/telemetry.toml`).
    pub fn load_or_builtin(path: Option<&Path>) -> Result<Self, ContractError> {
        match path {
            Some(path) => Contract::load(path),
            None => Contract::from_toml(DEFAULT_CONTRACT_TOML),
        }
    }

    /// Loads a contract file: a JSON Schema document when the name ends in `.json`, TOML otherwise.
    pub fn load(path: &Path) -> Result<Self, ContractError> {
        let text = std::fs::read_to_string(path).map_err(|source| ContractError::Read {
            path: path.display().to_string(),
            source,
        })?;
        if path
            .extension()
            .is_some_and(|extension| extension == "json")
        {
            let document: Value = serde_json::from_str(&text)
                .map_err(|error| ContractError::JsonSchema(format!("not JSON: {error}")))?;
            Contract::from_json_schema(&document)
        } else {
            Contract::from_toml(&text)
        }
    }

    /// The contract as TOML, as an operator would write it.
    pub fn to_toml(&self) -> String {
        // Every field is a plain value or table, so serialization cannot fail; an empty string
        // would fail to load, which is the safe direction.
        toml::to_string(self).unwrap_or_default()
    }

    /// Checks the contract as a whole: names unique across fields and aliases, ranges ordered,
    /// conversions invertible, limits usable.
    pub fn check(&self) -> Result<(), ContractError> {
        if self.version == 0 {
            return Err(invalid(
                "version",
                "must be 1 or more (0 marks rows from before contracts)",
            ));
        }
        let limits = &self.limits;
        if limits.max_payload_bytes == 0 || limits.max_depth == 0 || limits.max_fields == 0 {
            return Err(invalid("limits", "must all be 1 or more"));
        }
        if limits.max_depth > crate::json_reader::MAX_DEPTH_LIMIT {
            return Err(invalid(
                "limits.max_depth",
                format!("must be at most {}", crate::json_reader::MAX_DEPTH_LIMIT),
            ));
        }
        if self.device_id.max_length == 0 || self.device_id.max_length > MAX_DEVICE_ID_LENGTH {
            return Err(invalid(
                "device_id.max_length",
                format!("must be 1 to {MAX_DEVICE_ID_LENGTH} (the table's column)"),
            ));
        }
        AllowedCharacters::parse(&self.device_id.allowed_characters)
            .map_err(|problem| invalid("device_id.allowed_characters", problem))?;
        let ts = &self.device_ts;
        if let (Some(late), Some(max_age)) = (ts.late_after_seconds, ts.max_age_seconds) {
            if late > max_age {
                return Err(invalid(
                    "device_ts.late_after_seconds",
                    "must not exceed device_ts.max_age_seconds",
                ));
            }
        }
        if self.metrics.len() > MAX_METRICS {
            return Err(invalid(
                "metrics",
                format!("declares more than {MAX_METRICS} metrics"),
            ));
        }
        let mut names = BTreeSet::new();
        let mut claim = |name: &str, setting: String| {
            if name.is_empty() {
                return Err(invalid(setting, "must not be an empty name"));
            }
            if names.insert(name.to_string()) {
                Ok(())
            } else {
                Err(invalid(
                    setting,
                    format!("uses the name `{name}`, which another field or alias already has"),
                ))
            }
        };
        for (name, aliases, section) in [
            (fields::DEVICE_ID, &self.device_id.aliases, "device_id"),
            (fields::DEVICE_TS, &self.device_ts.aliases, "device_ts"),
            (fields::SEQ, &self.seq.aliases, "seq"),
        ] {
            claim(name, section.to_string())?;
            for alias in aliases {
                claim(alias, format!("{section}.aliases"))?;
            }
        }
        for (name, rule) in &self.metrics {
            claim(name, format!("metrics.{name}"))?;
            for alias in &rule.aliases {
                claim(alias, format!("metrics.{name}.aliases"))?;
            }
            for (source, conversion) in &rule.convert_from {
                let setting = format!("metrics.{name}.convert_from.{source}");
                claim(source, setting.clone())?;
                let usable = [conversion.add, conversion.multiply, conversion.divide]
                    .iter()
                    .all(|value| value.is_finite())
                    && conversion.multiply != 0.0
                    && conversion.divide != 0.0;
                if !usable {
                    return Err(invalid(
                        setting,
                        "must be finite, with multiply and divide not 0",
                    ));
                }
            }
            for (bound, value) in [("min", rule.min), ("max", rule.max)] {
                if value.is_some_and(|value| !value.is_finite()) {
                    return Err(invalid(format!("metrics.{name}.{bound}"), "must be finite"));
                }
            }
            if let (Some(min), Some(max)) = (rule.min, rule.max) {
                if min > max {
                    return Err(invalid(
                        format!("metrics.{name}.min"),
                        "must not exceed max",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The contract as a JSON Schema (draft 2020-12) of the canonical payload: what a device
    /// should send. Standard keywords carry types, ranges, lengths, the character pattern,
    /// required fields and the unknown-field policy; what JSON Schema cannot say (aliases, unit
    /// conversions, clock skew, coercion, nesting limits) is under `x-telemetry-*` keywords,
    /// which validators ignore and [`Contract::from_json_schema`] reads back.
    pub fn to_json_schema(&self) -> Value {
        let mut properties = Map::new();
        let mut required = vec![json!(fields::DEVICE_ID), json!(fields::DEVICE_TS)];
        properties.insert(
            fields::DEVICE_ID.into(),
            json!({
                "type": "string",
                "minLength": 1,
                "maxLength": self.device_id.max_length,
                "pattern": format!("^[{}]+$", self.device_id.allowed_characters),
                "x-telemetry-aliases": self.device_id.aliases,
                "x-telemetry-bind-to-topic": self.device_id.bind_to_topic,
            }),
        );
        let ts = &self.device_ts;
        let mut device_ts = json!({
            "description": "Device time: seconds, milliseconds or microseconds since the Unix epoch (told apart by magnitude), or an RFC 3339 date-time with offset.",
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "format": "date-time"}
            ],
            "x-telemetry-aliases": ts.aliases,
        });
        for (keyword, value) in [
            (
                "x-telemetry-max-future-skew-seconds",
                ts.max_future_skew_seconds,
            ),
            ("x-telemetry-late-after-seconds", ts.late_after_seconds),
            ("x-telemetry-max-age-seconds", ts.max_age_seconds),
        ] {
            if let Some(value) = value {
                device_ts[keyword] = json!(value);
            }
        }
        properties.insert(fields::DEVICE_TS.into(), device_ts);
        properties.insert(
            fields::SEQ.into(),
            json!({"type": "integer", "minimum": 0, "x-telemetry-aliases": self.seq.aliases}),
        );
        if self.seq.required {
            required.push(json!(fields::SEQ));
        }
        for (name, rule) in &self.metrics {
            let mut metric = Map::new();
            metric.insert(
                "type".into(),
                json!(if rule.integer { "integer" } else { "number" }),
            );
            if let Some(min) = rule.min {
                metric.insert("minimum".into(), json!(min));
            }
            if let Some(max) = rule.max {
                metric.insert("maximum".into(), json!(max));
            }
            if !rule.aliases.is_empty() {
                metric.insert("x-telemetry-aliases".into(), json!(rule.aliases));
            }
            if !rule.convert_from.is_empty() {
                metric.insert("x-telemetry-convert-from".into(), json!(rule.convert_from));
            }
            properties.insert(name.clone(), Value::Object(metric));
            if rule.required {
                required.push(json!(name));
            }
        }
        json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": format!("Telemetry payload, contract version {}", self.version),
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": self.unknown_fields != UnknownFields::Reject,
            "x-telemetry-contract-version": self.version,
            "x-telemetry-unknown-fields": self.unknown_fields,
            "x-telemetry-coerce-numeric-strings": self.coerce_numeric_strings,
            "x-telemetry-limits": self.limits,
        })
    }

    /// Reads a JSON Schema document as a contract: the inverse of [`Contract::to_json_schema`].
    /// A schema written by hand needs only standard keywords: `properties` with `device_id`
    /// (`maxLength`, a `^[...]+$` `pattern`), `device_ts`, `seq`, and each metric with `type`
    /// `number` or `integer` and optional `minimum`/`maximum`; `required`; and
    /// `additionalProperties` (`false` rejects unknown fields). Keywords the contract cannot
    /// express are refused by name rather than silently ignored.
    pub fn from_json_schema(document: &Value) -> Result<Self, ContractError> {
        let fail = |problem: String| ContractError::JsonSchema(problem);
        // First, is it a JSON Schema at all? The `jsonschema` crate checks the document against
        // its draft's meta-schema, so a typo gets that validator's precise message.
        if let Err(error) = jsonschema::meta::validate(document) {
            let location = error.instance_path().to_string();
            return Err(fail(format!(
                "not a valid JSON Schema at `{}`: {error}",
                if location.is_empty() {
                    "/"
                } else {
                    location.as_str()
                }
            )));
        }
        let root = document
            .as_object()
            .ok_or_else(|| fail("the document is not an object".into()))?;
        let mut contract = Contract::minimal();
        contract.metrics.clear();
        for (keyword, value) in root {
            match keyword.as_str() {
                "$schema" | "$id" | "title" | "description" | "$comment" | "type" => {}
                "properties" | "required" => {}
                "additionalProperties" => {
                    if value == &Value::Bool(false) {
                        contract.unknown_fields = UnknownFields::Reject;
                    }
                }
                "x-telemetry-contract-version" => {
                    contract.version = from_value(value, keyword)?;
                }
                "x-telemetry-unknown-fields" => {
                    contract.unknown_fields = from_value(value, keyword)?;
                }
                "x-telemetry-coerce-numeric-strings" => {
                    contract.coerce_numeric_strings = from_value(value, keyword)?;
                }
                "x-telemetry-limits" => contract.limits = from_value(value, keyword)?,
                other => {
                    return Err(fail(format!(
                        "keyword `{other}` is not supported at the top level"
                    )))
                }
            }
        }
        if root.get("type").is_some_and(|kind| kind != "object") {
            return Err(fail("`type` must be \"object\"".into()));
        }
        let required: BTreeSet<&str> = match root.get("required") {
            None => BTreeSet::new(),
            Some(list) => list
                .as_array()
                .ok_or_else(|| fail("`required` must be an array".into()))?
                .iter()
                .map(|name| {
                    name.as_str()
                        .ok_or_else(|| fail("`required` must list names".into()))
                })
                .collect::<Result<_, _>>()?,
        };
        let empty = Map::new();
        let properties = match root.get("properties") {
            None => &empty,
            Some(properties) => properties
                .as_object()
                .ok_or_else(|| fail("`properties` must be an object".into()))?,
        };
        for (name, schema) in properties {
            let schema = schema
                .as_object()
                .ok_or_else(|| fail(format!("property `{name}` must be an object")))?;
            let aliases: Vec<String> = match schema.get("x-telemetry-aliases") {
                Some(value) => from_value(value, "x-telemetry-aliases")?,
                None => Vec::new(),
            };
            match name.as_str() {
                fields::DEVICE_ID => {
                    contract.device_id.aliases = aliases;
                    if let Some(bind) = schema.get("x-telemetry-bind-to-topic") {
                        contract.device_id.bind_to_topic =
                            from_value(bind, "x-telemetry-bind-to-topic")?;
                    }
                    if let Some(length) = schema.get("maxLength") {
                        contract.device_id.max_length = from_value(length, "maxLength")?;
                    }
                    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
                        contract.device_id.allowed_characters = pattern
                            .strip_prefix("^[")
                            .and_then(|rest| rest.strip_suffix("]+$"))
                            .ok_or_else(|| {
                                fail(format!(
                                    "device_id `pattern` must look like ^[...]+$, not {pattern}"
                                ))
                            })?
                            .to_string();
                    }
                }
                fields::DEVICE_TS => {
                    contract.device_ts.aliases = aliases;
                    let read = |keyword: &str| -> Result<Option<u64>, ContractError> {
                        schema
                            .get(keyword)
                            .map(|value| from_value(value, keyword))
                            .transpose()
                    };
                    contract.device_ts.max_future_skew_seconds =
                        read("x-telemetry-max-future-skew-seconds")?;
                    contract.device_ts.late_after_seconds = read("x-telemetry-late-after-seconds")?;
                    contract.device_ts.max_age_seconds = read("x-telemetry-max-age-seconds")?;
                }
                fields::SEQ => {
                    contract.seq.aliases = aliases;
                    contract.seq.required = required.contains(fields::SEQ);
                }
                metric => {
                    let mut rule = MetricRule {
                        aliases,
                        required: required.contains(metric),
                        ..MetricRule::default()
                    };
                    for (keyword, value) in schema {
                        match keyword.as_str() {
                            "type" => match value.as_str() {
                                Some("number") => {}
                                Some("integer") => rule.integer = true,
                                _ => return Err(fail(format!(
                                    "property `{metric}`: only `number` and `integer` metrics are supported, not {value}"
                                ))),
                            },
                            "minimum" => rule.min = Some(from_value(value, "minimum")?),
                            "maximum" => rule.max = Some(from_value(value, "maximum")?),
                            "x-telemetry-convert-from" => {
                                rule.convert_from = from_value(value, keyword)?;
                            }
                            "x-telemetry-aliases" | "description" | "title" | "$comment" => {}
                            other => {
                                return Err(fail(format!(
                                    "property `{metric}`: keyword `{other}` is not supported"
                                )))
                            }
                        }
                    }
                    contract.metrics.insert(metric.to_string(), rule);
                }
            }
        }
        for name in &required {
            if !properties.contains_key(*name) {
                return Err(fail(format!(
                    "`required` names `{name}`, which has no property"
                )));
            }
        }
        contract.check()?;
        Ok(contract)
    }
}

fn from_value<T: serde::de::DeserializeOwned>(
    value: &Value,
    keyword: &str,
) -> Result<T, ContractError> {
    T::deserialize(value)
        .map_err(|error| ContractError::JsonSchema(format!("keyword `{keyword}`: {error}")))
}

/// The ASCII characters a `device_id` may contain, parsed from a character class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AllowedCharacters([bool; 128]);

impl AllowedCharacters {
    /// Parses `A-Za-z0-9._:-`: single characters and `a-z` ranges; a `-` first or last is itself.
    pub(crate) fn parse(class: &str) -> Result<Self, String> {
        if !class.is_ascii() {
            return Err("must be ASCII".into());
        }
        let bytes = class.as_bytes();
        if bytes.is_empty() {
            return Err("must allow at least one character".into());
        }
        let mut allowed = [false; 128];
        let mut index = 0;
        while index < bytes.len() {
            let first = bytes[index];
            if first == b'\\' || first == b'[' || first == b']' || first == b'^' {
                return Err(format!(
                    "`{}` is not supported; list characters and ranges only",
                    first as char
                ));
            }
            if index + 2 < bytes.len() && bytes[index + 1] == b'-' {
                let last = bytes[index + 2];
                if last < first {
                    return Err(format!(
                        "range `{}-{}` is backwards",
                        first as char, last as char
                    ));
                }
                for byte in first..=last {
                    allowed[usize::from(byte)] = true;
                }
                index += 3;
            } else {
                allowed[usize::from(first)] = true;
                index += 1;
            }
        }
        if allowed.iter().take(32).any(|control| *control) || allowed[127] {
            return Err("must not allow control characters".into());
        }
        // A device id is an MQTT topic segment: `/` separates segments and `+`, `#` are
        // wildcards, none of which a topic segment can be. Keeping them out also keeps
        // `UNUSABLE_TOPIC_DEVICE` (which starts with `#`) apart from every real device id.
        if let Some(special) = [b'/', b'+', b'#']
            .iter()
            .find(|byte| allowed[usize::from(**byte)])
        {
            return Err(format!(
                "must not allow `{}`: a device id is an MQTT topic segment",
                *special as char
            ));
        }
        Ok(AllowedCharacters(allowed))
    }

    /// Whether every character of `text` is allowed.
    pub(crate) fn allows(&self, text: &str) -> bool {
        text.bytes()
            .all(|byte| self.0.get(usize::from(byte)).copied().unwrap_or(false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_contract_loads_and_checks() {
        let contract = Contract::from_toml(DEFAULT_CONTRACT_TOML).unwrap();
        assert_eq!(contract, Contract::default());
        assert!(contract.metrics.contains_key("temperature_c"));
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../")
            .join(DEFAULT_CONTRACT_PATH);
        assert_eq!(Contract::load(&path).unwrap(), contract);
    }

    #[test]
    fn toml_round_trips() {
        let contract = Contract::default();
        assert_eq!(Contract::from_toml(&contract.to_toml()).unwrap(), contract);
    }

    #[test]
    fn json_schema_round_trips() {
        let contract = Contract::default();
        let schema = contract.to_json_schema();
        assert_eq!(Contract::from_json_schema(&schema).unwrap(), contract);
        assert_eq!(
            schema["properties"]["temperature_c"]["maximum"],
            json!(125.0)
        );
        assert_eq!(schema["properties"]["rssi_dbm"]["type"], json!("integer"));
        assert_eq!(schema["additionalProperties"], json!(true));
    }

    #[test]
    fn a_json_file_loads_as_a_json_schema() {
        let contract = Contract::default();
        let path = std::env::temp_dir().join(format!("contract-{}.json", std::process::id()));
        std::fs::write(&path, contract.to_json_schema().to_string()).unwrap();
        let loaded = Contract::load(&path);
        let _ = std::fs::remove_file(&path);
        assert_eq!(loaded.unwrap(), contract);
    }

    #[test]
    fn a_hand_written_json_schema_loads() {
        let schema = json!({
            "type": "object",
            "properties": {
                "device_id": {"type": "string", "maxLength": 32, "pattern": "^[a-z0-9-]+$"},
                "device_ts": {},
                "seq": {"type": "integer"},
                "co2_ppm": {"type": "integer", "minimum": 0, "maximum": 10000}
            },
            "required": ["device_id", "device_ts", "seq", "co2_ppm"],
            "additionalProperties": false
        });
        let contract = Contract::from_json_schema(&schema).unwrap();
        assert_eq!(contract.device_id.max_length, 32);
        assert_eq!(contract.device_id.allowed_characters, "a-z0-9-");
        assert!(contract.seq.required);
        assert_eq!(contract.unknown_fields, UnknownFields::Reject);
        let co2 = &contract.metrics["co2_ppm"];
        assert!(co2.integer && co2.required);
        assert_eq!((co2.min, co2.max), (Some(0.0), Some(10_000.0)));
    }

    #[test]
    fn a_document_that_is_not_a_json_schema_is_refused_with_the_meta_schema_message() {
        let schema = json!({"properties": {"co2_ppm": {"type": "number", "minimum": "low"}}});
        let error = Contract::from_json_schema(&schema).unwrap_err().to_string();
        assert!(error.contains("/properties/co2_ppm/minimum"), "{error}");
    }

    #[test]
    fn json_schema_keywords_the_contract_cannot_honour_are_refused() {
        let schema = json!({"properties": {"mode": {"enum": ["a", "b"]}}});
        let error = Contract::from_json_schema(&schema).unwrap_err().to_string();
        assert!(error.contains("mode"), "{error}");
    }

    #[test]
    fn mistakes_are_named_at_load_time() {
        let cases = [
            ("version = 0", "version"),
            (
                "version = 1\n[metrics.a]\nmin = 5.0\nmax = 1.0",
                "metrics.a.min",
            ),
            (
                "version = 1\n[metrics.a]\naliases = [\"ts\"]\n[device_ts]\naliases = [\"ts\"]",
                "metrics.a.aliases",
            ),
            (
                "version = 1\n[metrics.a]\nconvert_from.b = { divide = 0.0 }",
                "metrics.a.convert_from.b",
            ),
            (
                "version = 1\n[device_id]\nmax_length = 500\nallowed_characters = \"a-z\"",
                "device_id.max_length",
            ),
            (
                "version = 1\n[device_id]\nmax_length = 5\nallowed_characters = \"z-a\"",
                "device_id.allowed_characters",
            ),
            ("version = 1\ncolour = \"blue\"", "colour"),
        ];
        for (text, setting) in cases {
            let error = Contract::from_toml(text).unwrap_err().to_string();
            assert!(error.contains(setting), "{text}: {error}");
        }
    }

    #[test]
    fn allowed_characters_parse_ranges_and_literal_dashes() {
        let allowed = AllowedCharacters::parse("A-Za-z0-9._:-").unwrap();
        assert!(allowed.allows("Pico-W_1.a:b"));
        assert!(!allowed.allows("pico 1"));
        assert!(!allowed.allows("pico/1"));
        assert!(!allowed.allows("pico-é"));
    }
}
