//! The metrics the Kafka clients record (see `telemetry_metrics`).

use telemetry_metrics::Metric;

/// From handing a record to librdkafka to the brokers' acknowledgement, per topic.
pub const KAFKA_PRODUCE_DURATION: Metric =
    Metric::histogram("kafka_produce_duration_seconds", &["service", "topic"]);
/// Produces that failed (each is produced again), per topic.
pub const KAFKA_PRODUCE_ERRORS: Metric =
    Metric::counter("kafka_produce_errors_total", &["service", "topic"]);
/// Records between what a group's member has processed and the end of each partition it reads.
pub const KAFKA_CONSUMER_LAG: Metric =
    Metric::gauge("kafka_consumer_lag", &["group", "topic", "partition"]);

/// Times a client found none of its Kafka brokers reachable (`client`: producer or consumer;
/// `name`: the service or consumer group it works for).
pub const KAFKA_OUTAGES: Metric = Metric::counter("kafka_outages_total", &["client", "name"]);
/// 1 while a client reaches at least one Kafka broker, 0 from when it reached none until one
/// answers again.
pub const KAFKA_BROKERS_REACHABLE: Metric =
    Metric::gauge("kafka_brokers_reachable", &["client", "name"]);

/// Everything this crate records.
pub const ALL: &[Metric] = &[
    KAFKA_PRODUCE_DURATION,
    KAFKA_PRODUCE_ERRORS,
    KAFKA_CONSUMER_LAG,
    KAFKA_OUTAGES,
    KAFKA_BROKERS_REACHABLE,
];
