//! The decide stage: every record of a batch validated against the contract, accepted (cleaned,
//! with its `seq` checked per device) or rejected with a reason. Pure: no I/O, so the whole
//! stage is tested here.

use rdkafka::message::{Message, OwnedMessage};
use telemetry_core::event::{CleanedRecord, SequenceCheck};
use telemetry_core::{Outcome, Rejection, SequenceTracker, SourcePosition, Validator};
use telemetry_metrics::{series, Metric, EVENTS_RECEIVED, EVENTS_REJECTED};

use crate::instruments::{
    self, EVENTS_LATE, FIELDS_COERCED, FIELDS_CONVERTED, FIELDS_DROPPED, SEQ_GAPS, SEQ_MISSING,
    SEQ_REGRESSIONS, SEQ_REPEATS, SERVICE,
};

/// What one batch turns into.
pub(crate) struct Decided {
    /// Accepted events, in batch order.
    pub accepted: Vec<CleanedRecord>,
    /// For each accepted event, the index of its record in the batch.
    pub accepted_index: Vec<usize>,
    /// Rejected records: index in the batch and reason.
    pub rejected: Vec<(usize, Rejection)>,
}

/// Validates every record of the batch, and flags `seq` gaps per device.
pub(crate) fn decide(
    batch: &[OwnedMessage],
    validator: &Validator,
    sequences: &mut SequenceTracker,
) -> Decided {
    let mut decided = Decided {
        accepted: Vec::with_capacity(batch.len()),
        accepted_index: Vec::with_capacity(batch.len()),
        rejected: Vec::new(),
    };
    instruments::counter(&EVENTS_RECEIVED).increment(batch.len() as u64);
    for (index, message) in batch.iter().enumerate() {
        match validator.validate_received(&telemetry_kafka::received(message)) {
            Outcome::Accepted(mut event) => {
                sequences.observe(&mut event);
                count_quality(&event);
                let source = SourcePosition {
                    topic: message.topic().to_string(),
                    partition: message.partition(),
                    offset: message.offset(),
                };
                decided.accepted.push(CleanedRecord { event, source });
                decided.accepted_index.push(index);
            }
            Outcome::Rejected(rejection) => {
                EVENTS_REJECTED
                    .counter_of(series!(SERVICE, rejection.code()))
                    .increment(1);
                tracing::debug!(
                    partition = message.partition(),
                    offset = message.offset(),
                    code = rejection.code(),
                    "Rejected a record."
                );
                decided.rejected.push((index, rejection));
            }
        }
    }
    decided
}

/// Counts what normalization did to an accepted event.
fn count_quality(event: &telemetry_core::Event) {
    let quality = &event.quality;
    if quality.is_clean() {
        return;
    }
    let count = |metric: &Metric, value: usize| {
        if value > 0 {
            instruments::counter(metric).increment(value as u64);
        }
    };
    count(&FIELDS_COERCED, quality.coerced_fields.len());
    count(&FIELDS_CONVERTED, quality.converted_fields.len());
    count(&FIELDS_DROPPED, quality.dropped_fields.len());
    count(&EVENTS_LATE, usize::from(quality.late));
    match quality.sequence {
        Some(SequenceCheck::Gap { missing, .. }) => {
            count(&SEQ_GAPS, 1);
            count(&SEQ_MISSING, usize::try_from(missing).unwrap_or(usize::MAX));
        }
        Some(SequenceCheck::Regression { .. }) => count(&SEQ_REGRESSIONS, 1),
        Some(SequenceCheck::Repeat) => count(&SEQ_REPEATS, 1),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{raw, validator};

    #[test]
    fn accepted_and_rejected_records_keep_their_place_in_the_batch() {
        let batch = vec![
            raw(
                0,
                "pico-1",
                br#"{"device_id":"pico-1","ts":"now","seq":1,"temp":21.5}"#,
            ),
            raw(1, "pico-1", b"not json"),
            raw(
                2,
                "pico-2",
                br#"{"device_id":"pico-1","ts":"now","seq":1,"temp":21.5}"#,
            ),
            raw(
                3,
                "pico-2",
                br#"{"device_id":"pico-2","ts":"now","seq":7,"humidity":"40"}"#,
            ),
        ];
        let decided = decide(&batch, &validator(), &mut SequenceTracker::new());

        assert_eq!(decided.accepted_index, [0, 3]);
        let devices: Vec<_> = decided
            .accepted
            .iter()
            .map(|record| (record.event.device_id.as_str(), record.source.offset))
            .collect();
        assert_eq!(devices, [("pico-1", 0), ("pico-2", 3)]);
        // Numbers sent as strings are coerced, and the event says so.
        let event = &decided.accepted[1].event;
        assert_eq!(event.quality.coerced_fields, ["humidity"]);
        assert_eq!(event.metrics.get("humidity_pct"), Some(40.0));
        let rejected: Vec<_> = decided
            .rejected
            .iter()
            .map(|(index, rejection)| (*index, rejection.code()))
            .collect();
        // A device writing as another is refused: its topic names pico-2.
        assert_eq!(rejected, [(1, "invalid_json"), (2, "device_id_mismatch")]);
    }

    #[test]
    fn sequence_gaps_are_flagged_across_batches_of_one_device() {
        let validator = validator();
        let mut sequences = SequenceTracker::new();
        let event = |offset, seq: u64| {
            let payload = format!(r#"{{"device_id":"pico-1","ts":"now","seq":{seq},"temp":20}}"#);
            raw(offset, "pico-1", payload.as_bytes())
        };
        decide(&[event(0, 1), event(1, 2)], &validator, &mut sequences);
        let later = decide(&[event(2, 5)], &validator, &mut sequences);

        assert!(matches!(
            later.accepted[0].event.quality.sequence,
            Some(SequenceCheck::Gap { missing: 2, .. })
        ));
    }
}
