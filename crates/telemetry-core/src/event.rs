//! The normalized telemetry event.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A validated, normalized telemetry event: what lands in the `telemetry` table and, as JSON, on
/// the cleaned topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The device that produced the event (non-empty, at most [`crate::Limits::max_device_id_len`]).
    pub device_id: String,
    /// Device time, UTC milliseconds since the Unix epoch.
    pub device_ts: i64,
    /// When the bridge received the event, UTC milliseconds since the Unix epoch.
    pub received_at: i64,
    /// The device's sequence number, when it sends one; part of the event's identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
    /// Numeric metrics by name, in name order.
    pub metrics: BTreeMap<String, f64>,
    /// Fields of the payload that were neither identity nor numeric, so not stored as metrics.
    /// Listed so that nothing is dropped silently; the raw topic keeps their values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignored_fields: Vec<String>,
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
