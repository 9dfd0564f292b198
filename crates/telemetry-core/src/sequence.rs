//! Per-device `seq` tracking: flags gaps, regressions and repeats on the cleaned event.
//!
//! The state is each device's last `seq`, in memory. It is rebuilt from the stream as events
//! arrive, so after a restart or a partition moving to another audit instance the first event of
//! each device is not compared with anything. Records of one device are keyed to one partition,
//! so one instance sees them in order.

use std::collections::HashMap;

use crate::event::{Event, SequenceCheck};

/// Devices remembered before the memory is cleared and rebuilt; bounds memory against a flood
/// of made-up device ids.
pub const MAX_TRACKED_DEVICES: usize = 1_000_000;

/// The last `seq` of every device seen.
#[derive(Debug, Default)]
pub struct SequenceTracker {
    last: HashMap<String, i64>,
}

impl SequenceTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        SequenceTracker::default()
    }

    /// Compares the event's `seq` with its device's previous one, records the result in
    /// `event.quality.sequence` (left `None` when it is the next number or the first seen), and
    /// remembers it.
    pub fn observe(&mut self, event: &mut Event) {
        let Some(seq) = event.seq else {
            return;
        };
        if self.last.len() >= MAX_TRACKED_DEVICES && !self.last.contains_key(&event.device_id) {
            self.last.clear();
        }
        let previous = self.last.insert(event.device_id.clone(), seq);
        event.quality.sequence = match previous {
            None => None,
            Some(previous) if seq == previous.saturating_add(1) => None,
            Some(previous) if seq > previous => Some(SequenceCheck::Gap {
                previous,
                missing: seq - previous - 1,
            }),
            Some(previous) if seq == previous => Some(SequenceCheck::Repeat),
            Some(previous) => Some(SequenceCheck::Regression { previous }),
        };
    }

    /// Forgets every device, e.g. when partitions are reassigned.
    pub fn clear(&mut self) {
        self.last.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Quality;

    fn event(device_id: &str, seq: i64) -> Event {
        Event {
            device_id: device_id.into(),
            device_ts: 0,
            received_at: 0,
            seq: Some(seq),
            metrics: Default::default(),
            attributes: Default::default(),
            schema_version: 1,
            quality: Quality::default(),
        }
    }

    #[test]
    fn flags_gaps_regressions_and_repeats_per_device() {
        let mut tracker = SequenceTracker::new();
        let mut checks = Vec::new();
        for (device, seq) in [
            ("a", 1),
            ("a", 2),
            ("b", 9),
            ("a", 5),
            ("a", 5),
            ("a", 0),
            ("b", 10),
        ] {
            let mut event = event(device, seq);
            tracker.observe(&mut event);
            checks.push(event.quality.sequence);
        }
        assert_eq!(
            checks,
            vec![
                None,
                None,
                None,
                Some(SequenceCheck::Gap {
                    previous: 2,
                    missing: 2
                }),
                Some(SequenceCheck::Repeat),
                Some(SequenceCheck::Regression { previous: 5 }),
                None,
            ]
        );
    }
}
