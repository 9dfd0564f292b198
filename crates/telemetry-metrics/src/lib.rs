//! Metrics as declarations: each one's name, kind and label names written once, in the
//! `instruments` module of the crate that records it (this crate holds those several services
//! record), and recorded only through them; `telemetry-ops` renders them on `/metrics`. `docs/architecture.md` lists them; a test
//! (`crates/telemetry/tests/metrics_documented.rs`) checks the list against the declarations, and
//! that no code names a metric with a literal.

use std::sync::atomic::{AtomicU64, Ordering};

pub use metrics::SharedString;
use metrics::{Counter, Gauge, Histogram, Label};

/// What a metric measures over time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up: a count of things that happened (`_total`).
    Counter,
    /// Goes up and down: how much of something there is now.
    Gauge,
    /// A distribution of observations (durations, sizes).
    Histogram,
}

/// A metric: its name, kind and the names of its labels, in the order their values are given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    /// The Prometheus name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// Label names; every series of the metric has these, no others.
    pub labels: &'static [&'static str],
}

impl Metric {
    /// A counter named `name` with `labels`.
    pub const fn counter(name: &'static str, labels: &'static [&'static str]) -> Self {
        Metric {
            name,
            kind: Kind::Counter,
            labels,
        }
    }

    /// A gauge named `name` with `labels`.
    pub const fn gauge(name: &'static str, labels: &'static [&'static str]) -> Self {
        Metric {
            name,
            kind: Kind::Gauge,
            labels,
        }
    }

    /// A histogram named `name` with `labels`.
    pub const fn histogram(name: &'static str, labels: &'static [&'static str]) -> Self {
        Metric {
            name,
            kind: Kind::Histogram,
            labels,
        }
    }

    /// The counter's series with these label values (in the order of [`Metric::labels`]); a
    /// handle to keep where it is recorded often.
    pub fn counter_of<const N: usize>(&self, values: [SharedString; N]) -> Counter {
        debug_assert_eq!(self.kind, Kind::Counter, "{} is not a counter", self.name);
        metrics::counter!(self.name, self.series(values))
    }

    /// The gauge's series with these label values (see [`Metric::counter_of`]).
    pub fn gauge_of<const N: usize>(&self, values: [SharedString; N]) -> Gauge {
        debug_assert_eq!(self.kind, Kind::Gauge, "{} is not a gauge", self.name);
        metrics::gauge!(self.name, self.series(values))
    }

    /// The histogram's series with these label values (see [`Metric::counter_of`]).
    pub fn histogram_of<const N: usize>(&self, values: [SharedString; N]) -> Histogram {
        debug_assert_eq!(
            self.kind,
            Kind::Histogram,
            "{} is not a histogram",
            self.name
        );
        metrics::histogram!(self.name, self.series(values))
    }

    /// Reads the metric back from Prometheus text (a service's `/metrics`): the sum of its
    /// series whose labels include every one of `labels` (name, value); for a histogram, the sum
    /// of its observations. `None` when no series matches. For tools reading a service from
    /// outside (the load harness, tests); in one process, [`Progress`] says the same.
    pub fn total_in(&self, text: &str, labels: &[(&str, &str)]) -> Option<f64> {
        match self.kind {
            Kind::Histogram => sum_series(text, &format!("{}_sum", self.name), labels),
            Kind::Counter | Kind::Gauge => sum_series(text, self.name, labels),
        }
    }

    /// A histogram's number of observations, read back as [`Metric::total_in`] reads.
    pub fn count_in(&self, text: &str, labels: &[(&str, &str)]) -> Option<f64> {
        debug_assert_eq!(
            self.kind,
            Kind::Histogram,
            "{} is not a histogram",
            self.name
        );
        sum_series(text, &format!("{}_count", self.name), labels)
    }

    /// The series' labels: each name with its value.
    fn series<const N: usize>(&self, values: [SharedString; N]) -> Vec<Label> {
        debug_assert_eq!(
            N,
            self.labels.len(),
            "{} has the labels {:?}",
            self.name,
            self.labels
        );
        self.labels
            .iter()
            .zip(values)
            .map(|(name, value)| Label::new(*name, value))
            .collect()
    }
}

/// The sum of the series named `name` in Prometheus text whose labels include `labels`.
fn sum_series(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: Vec<String> = labels
        .iter()
        .map(|(label, value)| format!("{label}=\"{value}\""))
        .collect();
    let mut total = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let Some(series) = rest
            .strip_prefix('{')
            .and_then(|rest| rest.split('}').next())
        else {
            continue;
        };
        let has = |label: &String| series.split(',').any(|pair| pair == label);
        if !wanted.iter().all(has) {
            continue;
        }
        if let Some(value) = rest
            .rsplit(' ')
            .next()
            .and_then(|value| value.parse::<f64>().ok())
        {
            total = Some(total.unwrap_or(0.0) + value);
        }
    }
    total
}

/// What a service instance has done so far, counted beside its metrics for the process that
/// runs it: `telemetry up` decides its drains and prints its status line from these, without
/// rendering and parsing `/metrics` (whose series every service of a process shares). Each count
/// is the one of the metric it names, for this instance alone.
#[derive(Debug, Default)]
pub struct Progress {
    /// As [`EVENTS_RECEIVED`].
    pub received: AtomicU64,
    /// As [`RECORDS_PRODUCED`] (the bridge: raw records).
    pub produced: AtomicU64,
    /// As [`EVENTS_WRITTEN`].
    pub written: AtomicU64,
    /// As [`EVENTS_REJECTED`].
    pub rejected: AtomicU64,
}

impl Progress {
    /// Adds `count` to `counter` (one of this progress' counts).
    pub fn add(counter: &AtomicU64, count: u64) {
        counter.fetch_add(count, Ordering::Relaxed);
    }

    /// The value of `counter` (one of this progress' counts).
    pub fn read(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Label values for [`Metric::counter_of`] and its kin, from `&'static str` or `String`.
#[macro_export]
macro_rules! series {
    ($($value:expr),* $(,)?) => {
        [$($crate::SharedString::from($value)),*]
    };
}

// Metrics several services record, each under its own `service` label, and those tools read back
// (`telemetry up`, the load harness).

/// Records taken in: MQTT messages (bridge), raw records (audit), cleaned records (rollup),
/// cleaned and DLQ records (alert).
pub const EVENTS_RECEIVED: Metric = Metric::counter("events_received_total", &["service"]);
/// Records Kafka acknowledged, by topic role.
pub const RECORDS_PRODUCED: Metric =
    Metric::counter("records_produced_total", &["service", "topic"]);
/// Produces that failed and were produced again.
pub const PRODUCE_RETRIES: Metric = Metric::counter("produce_retries_total", &["service"]);
/// Records Kafka refused for good (then produced in a form it takes).
pub const KAFKA_RECORDS_REFUSED: Metric =
    Metric::counter("kafka_records_refused_total", &["service", "reason"]);
/// Records the audit service sent to the DLQ, by reason code.
pub const EVENTS_REJECTED: Metric =
    Metric::counter("events_rejected_total", &["service", "error_code"]);
/// Rows the audit service inserted or found already present.
pub const EVENTS_WRITTEN: Metric = Metric::counter("events_written_total", &["service"]);
/// Records per audit batch.
pub const AUDIT_BATCH_RECORDS: Metric = Metric::histogram("audit_batch_records", &["service"]);
/// Database writes retried because the database was unavailable.
pub const DB_WRITE_RETRIES: Metric = Metric::counter("db_write_retries_total", &["service"]);
/// Time per database write.
pub const DB_WRITE_DURATION: Metric = Metric::histogram("db_write_duration_seconds", &["service"]);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_back_adds_the_matching_series_only() {
        let text = "# TYPE events_rejected_total counter\n\
                    events_rejected_total{service=\"audit\",error_code=\"a\"} 3\n\
                    events_rejected_total{service=\"audit\",error_code=\"b\"} 4\n\
                    events_rejected_total_other{service=\"audit\"} 100\n\
                    events_received_total{service=\"bridge\"} 10\n\
                    events_received_total{service=\"bridge-2\"} 5\n\
                    events_received_total{service=\"audit\"} 9\n\
                    db_write_duration_seconds{service=\"audit\",quantile=\"0.5\"} 0.25\n\
                    db_write_duration_seconds_sum{service=\"audit\"} 1.5\n\
                    db_write_duration_seconds_count{service=\"audit\"} 6\n";
        let audit = [("service", "audit")];
        assert_eq!(EVENTS_REJECTED.total_in(text, &audit), Some(7.0));
        let bridge = [("service", "bridge")];
        assert_eq!(EVENTS_RECEIVED.total_in(text, &bridge), Some(10.0));
        assert_eq!(EVENTS_WRITTEN.total_in(text, &audit), None);
        assert_eq!(DB_WRITE_DURATION.total_in(text, &audit), Some(1.5));
        assert_eq!(DB_WRITE_DURATION.count_in(text, &audit), Some(6.0));
    }
}
