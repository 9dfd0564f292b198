//! The normalized telemetry event.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::contract::fields;

/// A metric's name: borrowed from the contract for declared metrics, owned for others.
pub type MetricName = Cow<'static, str>;

/// Numeric metrics by name, sorted by name, unique: a small map in one allocation, which costs
/// far less to build per event than a `BTreeMap` (`docs/benchmarks.md`). Serializes as a JSON
/// object, `{"battery_v": 3.7, "temperature_c": 21.5}`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics(Vec<(MetricName, f64)>);

impl Metrics {
    /// No metrics.
    pub fn new() -> Self {
        Metrics(Vec::new())
    }

    fn position(&self, name: &str) -> Result<usize, usize> {
        self.0
            .binary_search_by(|(metric, _)| metric.as_ref().cmp(name))
    }

    /// The value of metric `name`.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.position(name)
            .ok()
            .and_then(|index| self.0.get(index))
            .map(|(_, value)| *value)
    }

    /// Whether there is a metric `name`.
    pub fn contains_key(&self, name: &str) -> bool {
        self.position(name).is_ok()
    }

    /// Sets metric `name`, returning its previous value.
    pub fn insert(&mut self, name: impl Into<MetricName>, value: f64) -> Option<f64> {
        let name = name.into();
        match self.position(&name) {
            Ok(index) => self
                .0
                .get_mut(index)
                .map(|slot| std::mem::replace(&mut slot.1, value)),
            Err(index) => {
                self.0.insert(index, (name, value));
                None
            }
        }
    }

    /// Metrics in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, f64)> {
        self.0.iter().map(|(name, value)| (name.as_ref(), *value))
    }

    /// How many metrics there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Builds from metrics in any order; returns the first name given twice instead, if any.
    pub(crate) fn from_unsorted(mut metrics: Vec<(MetricName, f64)>) -> Result<Self, MetricName> {
        metrics.sort_unstable_by(|left, right| left.0.cmp(&right.0));
        if let Some(pair) = metrics.windows(2).find(|pair| pair[0].0 == pair[1].0) {
            return Err(pair[0].0.clone());
        }
        Ok(Metrics(metrics))
    }
}

impl std::ops::Index<&str> for Metrics {
    type Output = f64;

    /// The value of metric `name`. Panics when there is none, as `BTreeMap` does; use
    /// [`Metrics::get`] for names that may be missing.
    fn index(&self, name: &str) -> &f64 {
        match self.position(name) {
            Ok(index) => &self.0[index].1,
            Err(_) => panic!("no metric named {name}"),
        }
    }
}

impl FromIterator<(MetricName, f64)> for Metrics {
    /// Later values win over earlier ones of the same name.
    fn from_iter<T: IntoIterator<Item = (MetricName, f64)>>(iter: T) -> Self {
        let mut metrics = Metrics::new();
        for (name, value) in iter {
            metrics.insert(name, value);
        }
        metrics
    }
}

impl Serialize for Metrics {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Metrics {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<String, f64>::deserialize(deserializer)?;
        Ok(Metrics(
            map.into_iter()
                .map(|(name, value)| (MetricName::Owned(name), value))
                .collect(),
        ))
    }
}

/// A validated, normalized telemetry event: what lands in the `telemetry` table and, as JSON, on
/// the cleaned topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The device that produced the event.
    pub device_id: String,
    /// Device time, UTC milliseconds since the Unix epoch.
    pub device_ts: i64,
    /// When the bridge received the event, UTC milliseconds since the Unix epoch.
    pub received_at: i64,
    /// The device's sequence number, when it sends one; part of the event's identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
    /// Numeric metrics by canonical name, in the contract's units, in name order.
    pub metrics: Metrics,
    /// Fields the contract does not declare and that are not numbers, kept as sent (when the
    /// contract keeps unknown fields).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, Value>,
    /// The version of the contract that accepted the event; 0 for events from before contracts.
    #[serde(default)]
    pub schema_version: u32,
    /// What normalization did and noticed, beyond accepting the event.
    #[serde(default, skip_serializing_if = "Quality::is_clean")]
    pub quality: Quality,
}

/// What normalization did to an event and what it noticed, so nothing changes silently.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quality {
    /// Device time is behind the receive time by more than the contract's `late_after_seconds`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub late: bool,
    /// Payload fields whose numbers were sent as strings and coerced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub coerced_fields: Vec<String>,
    /// Payload fields converted from another unit (e.g. `temperature_f`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub converted_fields: Vec<String>,
    /// Payload fields removed because the contract drops unknown fields.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropped_fields: Vec<String>,
    /// How `seq` relates to the device's previous event, when it is not the next number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<SequenceCheck>,
}

impl Quality {
    /// Whether there is nothing to report.
    pub fn is_clean(&self) -> bool {
        *self == Quality::default()
    }
}

/// A device's `seq` compared with the one before it, as the audit service saw them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum SequenceCheck {
    /// Numbers were skipped: `missing` events between `previous` and this one never arrived (yet).
    Gap {
        /// The device's previous `seq`.
        previous: i64,
        /// How many numbers were skipped.
        missing: i64,
    },
    /// The number went backwards: the device restarted its counter, or events were reordered.
    Regression {
        /// The device's previous `seq`.
        previous: i64,
    },
    /// The same number again: a redelivery, or a device that does not count.
    Repeat,
}

impl Event {
    /// The event as the canonical payload a device following the contract would send: identity
    /// fields, metrics and attributes flat, `device_ts` as RFC 3339 UTC (unambiguous at any
    /// magnitude). Validating it again gives back the same event: normalization is idempotent.
    pub fn canonical_payload(&self) -> Value {
        let mut payload = Map::new();
        payload.insert(
            fields::DEVICE_ID.into(),
            Value::from(self.device_id.clone()),
        );
        let device_ts = chrono::DateTime::from_timestamp_millis(self.device_ts)
            .map(|time| Value::from(time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
            .unwrap_or_else(|| Value::from(self.device_ts));
        payload.insert(fields::DEVICE_TS.into(), device_ts);
        if let Some(seq) = self.seq {
            payload.insert(fields::SEQ.into(), Value::from(seq));
        }
        for (name, value) in self.metrics.iter() {
            payload.insert(name.to_string(), Value::from(value));
        }
        for (name, value) in &self.attributes {
            payload.insert(name.clone(), value.clone());
        }
        Value::Object(payload)
    }
}

/// Where a record sits in Kafka. Stored with each row so any row can be traced to its raw record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcePosition {
    /// Topic the record was read from.
    pub topic: String,
    /// Partition of that topic.
    pub partition: i32,
    /// Offset within that partition.
    pub offset: i64,
}

/// The JSON value of a record on the cleaned topic: the event plus where its raw record is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CleanedRecord {
    /// The normalized event.
    #[serde(flatten)]
    pub event: Event,
    /// The raw record this event was read from.
    pub source: SourcePosition,
}
