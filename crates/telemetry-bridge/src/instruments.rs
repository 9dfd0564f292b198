//! The bridge's metrics, each declared once (see `telemetry_metrics`).

use telemetry_metrics::{
    Metric, EVENTS_RECEIVED, KAFKA_RECORDS_REFUSED, PRODUCE_RETRIES, RECORDS_PRODUCED,
};

/// The `service` label of everything the bridge records.
pub(crate) const SERVICE: &str = "bridge";

/// PUBACKs not sent because the connection was lost (the broker redelivers).
pub const MQTT_ACKS_SKIPPED: Metric =
    Metric::counter("mqtt_acks_skipped_total", &["service", "cause"]);
/// MQTT connection losses.
pub const MQTT_CONNECTION_ERRORS: Metric =
    Metric::counter("mqtt_connection_errors_total", &["service"]);
/// MQTT messages larger than `--mqtt-max-packet-bytes`, read through keeping their first bytes.
pub const MQTT_MESSAGES_READ_THROUGH: Metric =
    Metric::counter("mqtt_messages_read_through_total", &["service"]);
/// Messages received and not yet handed to Kafka.
pub const MESSAGES_QUEUED: Metric = Metric::gauge("bridge_messages_queued", &["service"]);
/// Messages handed to Kafka and awaiting its acknowledgement.
pub const MESSAGES_IN_FLIGHT: Metric = Metric::gauge("bridge_messages_in_flight", &["service"]);
/// Payload bytes received and not yet handed to Kafka.
pub const QUEUED_BYTES: Metric = Metric::gauge("bridge_queued_bytes", &["service"]);
/// Payload bytes handed to Kafka and awaiting its acknowledgement.
pub const IN_FLIGHT_BYTES: Metric = Metric::gauge("bridge_in_flight_bytes", &["service"]);
/// Times a bound was reached: the bridge stopped reading MQTT, or producing.
pub const BACKPRESSURE: Metric =
    Metric::counter("bridge_backpressure_total", &["service", "bound"]);
/// Raw records produced with only the first bytes of their payload.
pub const RECORDS_CUT: Metric = Metric::counter("records_cut_total", &["service", "reason"]);
/// Live frames whose payload was cut to `--ws-max-payload-bytes`.
pub const WEBSOCKET_FRAMES_CUT: Metric =
    Metric::counter("websocket_frames_cut_total", &["service"]);
/// Live-view upgrades refused for an origin not allowed.
pub const WEBSOCKET_ORIGINS_REFUSED: Metric =
    Metric::counter("websocket_origins_refused_total", &["service"]);
/// Connected live-view clients.
pub const WEBSOCKET_CLIENTS: Metric = Metric::gauge("websocket_clients", &["service"]);
/// Frames slow live-view clients skipped.
pub const WEBSOCKET_FRAMES_MISSED: Metric =
    Metric::counter("websocket_frames_missed_total", &["service"]);
/// Live-view clients dropped, by cause.
pub const WEBSOCKET_CLIENTS_DROPPED: Metric =
    Metric::counter("websocket_clients_dropped_total", &["service", "cause"]);

/// Everything the bridge records.
pub const ALL: &[Metric] = &[
    EVENTS_RECEIVED,
    RECORDS_PRODUCED,
    PRODUCE_RETRIES,
    KAFKA_RECORDS_REFUSED,
    MQTT_ACKS_SKIPPED,
    MQTT_CONNECTION_ERRORS,
    MQTT_MESSAGES_READ_THROUGH,
    MESSAGES_QUEUED,
    MESSAGES_IN_FLIGHT,
    QUEUED_BYTES,
    IN_FLIGHT_BYTES,
    BACKPRESSURE,
    RECORDS_CUT,
    WEBSOCKET_FRAMES_CUT,
    WEBSOCKET_ORIGINS_REFUSED,
    WEBSOCKET_CLIENTS,
    WEBSOCKET_FRAMES_MISSED,
    WEBSOCKET_CLIENTS_DROPPED,
];

/// The bridge's series of a counter labelled by the service alone.
pub(crate) fn counter(metric: &Metric) -> metrics::Counter {
    metric.counter_of(telemetry_metrics::series!(SERVICE))
}

/// The bridge's series of a gauge labelled by the service alone.
pub(crate) fn gauge(metric: &Metric) -> metrics::Gauge {
    metric.gauge_of(telemetry_metrics::series!(SERVICE))
}
