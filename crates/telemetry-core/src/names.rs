//! Kafka topic names and record header keys. Every service spells them from here.

/// Default topic names; each can be overridden by configuration (tests use their own).
pub mod topics {
    /// Raw MQTT payloads exactly as received, produced by the bridge.
    pub const RAW: &str = "telemetry.raw";
    /// Validated, normalized events as JSON, produced by the audit service.
    pub const CLEANED: &str = "telemetry.cleaned";
    /// Rejected records: original bytes plus the reason, produced by the audit service.
    pub const DLQ: &str = "telemetry.dlq";
    /// Alerts fired and resolved, produced by the alerter.
    pub const ALERTS: &str = "telemetry.alerts";
}

/// Header keys on Kafka records.
pub mod headers {
    /// On raw records: the MQTT topic the payload was published to.
    pub const MQTT_TOPIC: &str = "mqtt.topic";
    /// On raw records: when the bridge received the payload, milliseconds since the Unix epoch (UTC),
    /// as decimal ASCII.
    pub const RECEIVED_AT: &str = "received_at";
    /// On raw records: the id of the bridge instance that received the payload.
    pub const BRIDGE_ID: &str = "bridge.id";
    /// On raw (and DLQ) records whose value is not the whole payload: the payload's size as the
    /// device sent it (decimal ASCII). The value then holds its first 64 KiB at most.
    pub const PAYLOAD_ORIGINAL_BYTES: &str = "payload.original_bytes";
    /// With `payload.original_bytes`: why the payload was cut, a reason code
    /// (`payload_too_large`, or `kafka_rejected` when Kafka refused it for another reason).
    pub const PAYLOAD_CUT_REASON: &str = "payload.cut_reason";
    /// With `payload.original_bytes`: a sentence saying which limit it passed, or Kafka's error.
    pub const PAYLOAD_CUT_DETAIL: &str = "payload.cut_detail";
    /// On DLQ records: the stable reason code, e.g. `invalid_json`.
    pub const ERROR_CODE: &str = "error.code";
    /// On DLQ records: a human-readable explanation naming the field and value.
    pub const ERROR_MESSAGE: &str = "error.message";
    /// On DLQ records: the device the record counts against (in the DLQ index, device health
    /// and alerts): its topic's device as the contract allows it, or `#unusable`
    /// ([`crate::received::UNUSABLE_TOPIC_DEVICE`]); absent when its topic names no device.
    pub const DEVICE_ID: &str = "device.id";
    /// On DLQ records: the payload field at fault, as the device named it (when one is).
    pub const ERROR_FIELD: &str = "error.field";
    /// On DLQ records: the contract rule that failed, e.g. `metrics.temperature_c.max = 125`.
    pub const ERROR_RULE: &str = "error.rule";
    /// On DLQ records: the version of the contract the record was checked against.
    pub const CONTRACT_VERSION: &str = "contract.version";
    /// On DLQ records: the topic the rejected record was read from.
    pub const SOURCE_TOPIC: &str = "source.topic";
    /// On DLQ records: the partition the rejected record was read from (decimal ASCII).
    pub const SOURCE_PARTITION: &str = "source.partition";
    /// On DLQ records: the offset of the rejected record (decimal ASCII).
    pub const SOURCE_OFFSET: &str = "source.offset";
}
