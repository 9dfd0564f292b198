//! [`Reachability`]: whether a client of ours reaches its Kafka brokers, said once per outage.
//!
//! librdkafka reports a broker outage many times over: a log line (facility `FAIL`, level error)
//! per failed connection attempt and broker thread, and an error event (`AllBrokersDown`,
//! `BrokerTransportFailure`) per attempt, which rdkafka's default context logs at ERROR again, and
//! which a consumer also returns from every read. With a single broker down that was two or more
//! ERROR lines a second per client, for the whole outage. Nothing in them calls for action: the
//! client reconnects by itself. So each client's context hands them here, and the outage becomes
//! one WARN line when all brokers are unreachable, one INFO line when one answers again (from the
//! client's statistics, every second), and two series in `/metrics`:
//! `kafka_outages_total` and `kafka_brokers_reachable`.

use std::sync::Mutex;
use std::time::Instant;

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;

use crate::instruments;

/// How often every client of ours reports its statistics, in ms: how soon a reachable broker
/// again is noticed (and the consumer lag gauge refreshed).
pub(crate) const STATISTICS_INTERVAL_MS: &str = "1000";

/// Whether one client reaches its brokers; see the module documentation.
pub(crate) struct Reachability {
    /// `producer` or `consumer`, and the service or group it works for: the metrics' labels and
    /// the log lines' fields.
    client: &'static str,
    name: String,
    /// Since when no broker has been reachable; `None` while one is.
    down_since: Mutex<Option<Instant>>,
    outages: metrics::Counter,
    reachable: metrics::Gauge,
}

impl Reachability {
    pub(crate) fn new(client: &'static str, name: &str) -> Self {
        let labels = || telemetry_metrics::series!(client, name.to_string());
        let reachable = instruments::KAFKA_BROKERS_REACHABLE.gauge_of(labels());
        reachable.set(1.0);
        Reachability {
            client,
            name: name.to_string(),
            down_since: Mutex::new(None),
            outages: instruments::KAFKA_OUTAGES.counter_of(labels()),
            reachable,
        }
    }

    /// Whether the client's brokers were all unreachable when it last knew.
    #[cfg(test)]
    fn is_down(&self) -> bool {
        self.lock().is_some()
    }

    /// librdkafka's error callback. Whether the error was about reaching the brokers (then
    /// nothing more needs to be said about it).
    pub(crate) fn error(&self, error: &KafkaError, reason: &str) -> bool {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::AllBrokersDown) => {
                self.down(reason);
                true
            }
            // One broker of several (or the one, between `AllBrokersDown` reports): librdkafka
            // reconnects with backoff; the cluster may well be serving through the others.
            Some(RDKafkaErrorCode::BrokerTransportFailure) => {
                tracing::debug!(client = self.client, name = %self.name, reason, "A Kafka broker connection failed; reconnecting.");
                true
            }
            _ => {
                tracing::error!(client = self.client, name = %self.name, %error, reason, "Kafka client error.");
                false
            }
        }
    }

    /// librdkafka's log callback: as rdkafka's default (its levels on `tracing`'s), except that
    /// failed connection attempts (facility `FAIL`) are debug lines: the error callback reports
    /// the same, once per outage.
    pub(crate) fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        let (client, name) = (self.client, self.name.as_str());
        match level {
            _ if facility == "FAIL" => {
                tracing::debug!(target: "librdkafka", client, name, "{facility} {message}");
            }
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", client, name, "{facility} {message}");
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", client, name, "{facility} {message}");
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", client, name, "{facility} {message}");
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", client, name, "{facility} {message}");
            }
        }
    }

    /// librdkafka's statistics: a broker connection that is up means the brokers are reachable.
    pub(crate) fn statistics(&self, statistics: &Statistics) {
        if statistics
            .brokers
            .values()
            .any(|broker| broker.state == "UP")
        {
            self.up();
        }
    }

    /// A broker connection is up again.
    fn up(&self) {
        let Some(since) = self.lock().take() else {
            return;
        };
        self.reachable.set(1.0);
        tracing::info!(
            client = self.client,
            name = %self.name,
            down_for = ?since.elapsed(),
            "Kafka is reachable again."
        );
    }

    fn down(&self, reason: &str) {
        let mut down_since = self.lock();
        if down_since.is_some() {
            return;
        }
        *down_since = Some(Instant::now());
        drop(down_since);
        self.outages.increment(1);
        self.reachable.set(0.0);
        tracing::warn!(
            client = self.client,
            name = %self.name,
            reason,
            "Kafka is unreachable; reconnecting (one line when it is back)."
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        match self.down_since.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_counted_once_and_ends_when_a_broker_answers() {
        let reachability = Reachability::new("consumer", "reachability-test");
        let all_down = KafkaError::Global(RDKafkaErrorCode::AllBrokersDown);
        let one_down = KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure);
        assert!(!reachability.is_down());
        assert!(reachability.error(&one_down, "127.0.0.1:9092/1: Connect failed"));
        assert!(!reachability.is_down(), "one broker down is not an outage");
        for _ in 0..5 {
            assert!(reachability.error(&all_down, "1/1 brokers are down"));
        }
        assert!(reachability.is_down());
        reachability.up();
        assert!(!reachability.is_down());
        assert!(reachability.error(&all_down, "1/1 brokers are down"));
        assert!(reachability.is_down());
        let other = KafkaError::Global(RDKafkaErrorCode::SaslAuthenticationFailed);
        assert!(!reachability.error(&other, "authentication failed"));
    }
}
