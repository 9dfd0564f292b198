//! How a device's health is judged from its message and DLQ counts.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use telemetry_store::DeviceSummary;

/// A device's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Sending, and mostly valid records.
    Ok,
    /// Nothing arrived for longer than the stale threshold.
    Stale,
    /// Sending, but too much of it is rejected.
    Failing,
}

/// When a device counts as stale or failing (`TELEMETRY_HEALTH_*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthThresholds {
    /// Silent for longer than this: stale.
    pub stale_after: Duration,
    /// At least this share of the last hour's records rejected...
    pub failing_dlq_ratio: f64,
    /// ...and at least this many of them: failing.
    pub failing_min_rejections: u64,
}

impl HealthThresholds {
    /// The device's health at `now`. Silence wins: a silent device is stale whatever it sent
    /// before.
    pub fn judge(&self, device: &DeviceSummary, now: DateTime<Utc>) -> Health {
        let silent = (now - device.last_seen).to_std().unwrap_or(Duration::ZERO);
        if silent > self.stale_after {
            return Health::Stale;
        }
        let rejected = device.dlq_last_hour;
        if rejected >= self.failing_min_rejections.max(1)
            && dlq_rate(device) >= self.failing_dlq_ratio
        {
            return Health::Failing;
        }
        Health::Ok
    }
}

/// The share of the last hour's records that went to the DLQ; 0 when there were none.
// Counts are far below 2^52, where f64 stops being exact.
#[allow(clippy::cast_precision_loss)]
pub fn dlq_rate(device: &DeviceSummary) -> f64 {
    let total = device.events_last_hour + device.dlq_last_hour;
    if total == 0 {
        0.0
    } else {
        device.dlq_last_hour as f64 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(seconds_ago: i64, events: u64, rejected: u64, now: DateTime<Utc>) -> DeviceSummary {
        let seen = now - chrono::Duration::seconds(seconds_ago);
        DeviceSummary {
            device_id: "pico-1".into(),
            first_seen: seen,
            last_seen: seen,
            last_accepted: Some(seen),
            last_rejected: None,
            events_last_hour: events,
            events_last_day: events,
            dlq_last_hour: rejected,
            dlq_last_day: rejected,
            metrics: Vec::new(),
        }
    }

    #[test]
    fn health_follows_silence_then_the_dlq_share() {
        let now = Utc::now();
        let thresholds = HealthThresholds {
            stale_after: Duration::from_secs(300),
            failing_dlq_ratio: 0.5,
            failing_min_rejections: 3,
        };
        let cases = [
            ("sending, all valid", device(10, 100, 0, now), Health::Ok),
            (
                "sending, a few rejected",
                device(10, 100, 20, now),
                Health::Ok,
            ),
            ("half rejected", device(10, 5, 5, now), Health::Failing),
            ("only rejected", device(10, 0, 4, now), Health::Failing),
            (
                "too few rejections to judge",
                device(10, 0, 2, now),
                Health::Ok,
            ),
            (
                "silent past the threshold",
                device(301, 0, 50, now),
                Health::Stale,
            ),
            (
                "silent up to the threshold",
                device(300, 1, 0, now),
                Health::Ok,
            ),
        ];
        for (case, device, expected) in cases {
            assert_eq!(thresholds.judge(&device, now), expected, "{case}");
        }
    }

    #[test]
    fn the_dlq_rate_is_the_rejected_share() {
        let now = Utc::now();
        assert!((dlq_rate(&device(0, 3, 1, now)) - 0.25).abs() < 1e-12);
        assert!(dlq_rate(&device(0, 0, 0, now)).abs() < f64::EPSILON);
    }
}
