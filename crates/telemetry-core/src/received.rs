//! What the pipeline knows about a raw record besides its payload: when the bridge received it,
//! which device its MQTT topic names, and whether the bridge had to cut it. The
//! [`Validator`](crate::Validator) judges a [`Received`] record with all of that, so every stage
//! that reads the raw topic (the audit service, replays, the live view) applies the same rules.

/// Device ids of records whose MQTT topic names no usable device (characters outside the
/// contract's `allowed_characters`, too long, not UTF-8) are indexed under this name. It starts
/// with `#`, which no device id may contain (a contract cannot allow it: `#` is an MQTT wildcard),
/// so such records are never merged with a real device's, and a flood of made-up topics is one
/// entry, not one per topic.
pub const UNUSABLE_TOPIC_DEVICE: &str = "#unusable";

/// Most bytes of a payload kept when the whole cannot be forwarded (the bridge) or dead-lettered
/// (the audit service): the first 64 KiB, as the DLQ index keeps.
pub const KEPT_PAYLOAD_BYTES: usize = 64 * 1024;

/// A raw record as the pipeline received it.
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    /// The payload bytes (the first [`KEPT_PAYLOAD_BYTES`] of it when [`Received::cut`] is set).
    pub payload: &'a [u8],
    /// When the bridge received it, UTC milliseconds since the Unix epoch.
    pub received_at: i64,
    /// The device id the MQTT topic names (the raw record's key), when the topic names one.
    pub topic_device: Option<&'a [u8]>,
    /// Set when the bridge could not forward the payload whole.
    pub cut: Option<Cut<'a>>,
}

impl<'a> Received<'a> {
    /// A whole payload with no topic: what `telemetry contract validate` and tests judge.
    pub fn payload(payload: &'a [u8], received_at: i64) -> Self {
        Received {
            payload,
            received_at,
            topic_device: None,
            cut: None,
        }
    }
}

/// What the bridge says about a payload it could not forward whole.
#[derive(Debug, Clone, Copy)]
pub struct Cut<'a> {
    /// The payload's size as the device sent it.
    pub original_bytes: u64,
    /// The reason code the bridge gave (`payload_too_large`, `kafka_rejected`).
    pub reason: Option<&'a str>,
    /// The bridge's sentence about it (the limit, or Kafka's error).
    pub detail: Option<&'a str>,
}

/// The device a record's MQTT topic names, as the contract sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicDevice<'a> {
    /// The topic names no device (the bridge's topic filter has no `+`, or another producer).
    Absent,
    /// A device id the contract allows.
    Usable(&'a str),
    /// Something the contract does not allow as a device id.
    Unusable,
}

impl<'a> TopicDevice<'a> {
    /// The name to index and count the record under: the id, [`UNUSABLE_TOPIC_DEVICE`], or none.
    pub fn name(self) -> Option<&'a str> {
        match self {
            TopicDevice::Absent => None,
            TopicDevice::Usable(id) => Some(id),
            TopicDevice::Unusable => Some(UNUSABLE_TOPIC_DEVICE),
        }
    }
}
