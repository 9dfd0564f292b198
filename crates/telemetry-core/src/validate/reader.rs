//! Reading a payload: one pass, bounded, borrowing from the payload (see `json_reader`), each
//! field checked as it is read.

use super::*;

/// What one payload has been read into so far. Fields are checked as they are parsed; a
/// metric's or unknown field's rejection is held back until the identity fields have passed, so
/// a record always reports its most basic fault.
pub(super) struct Reader<'v, 'de> {
    validator: &'v Validator,
    device_id: Option<Field<'de>>,
    device_ts: Option<Field<'de>>,
    seq: Option<Field<'de>>,
    /// Bit `i` is set once declared metric `i` was given (a contract declares at most 256).
    metrics_seen: [u64; 4],
    /// Metrics in payload order; sorted, and checked for repeats, once at the end.
    metrics: Vec<(MetricName, f64)>,
    attributes: BTreeMap<String, Value>,
    quality: Quality,
    /// The first metric or unknown-field rejection.
    deferred: Option<Rejection>,
    /// The first repeated field, reported once the payload has been read.
    stopped: Option<Rejection>,
}

impl<'v, 'de> Reader<'v, 'de> {
    pub(super) fn new(validator: &'v Validator) -> Self {
        Reader {
            validator,
            device_id: None,
            device_ts: None,
            seq: None,
            metrics_seen: [0; 4],
            metrics: Vec::with_capacity(16),
            attributes: BTreeMap::new(),
            quality: Quality::default(),
            deferred: None,
            stopped: None,
        }
    }

    /// Takes one top-level field. Errs only for a fault that stops parsing (a duplicate).
    pub(super) fn take(&mut self, field: Field<'de>) -> Result<(), Rejection> {
        let validator = self.validator;
        match validator.slots.get(field.name.as_ref()) {
            Some(Slot::DeviceId) => place(&mut self.device_id, field, fields::DEVICE_ID),
            Some(Slot::DeviceTs) => place(&mut self.device_ts, field, fields::DEVICE_TS),
            Some(Slot::Seq) => place(&mut self.seq, field, fields::SEQ),
            Some(Slot::Metric { index, conversion }) => {
                let Some(spec) = validator.metrics.get(*index) else {
                    return Ok(()); // Slots are built from `metrics`: every index is in range.
                };
                let (word, bit) = (index / 64, 1u64 << (index % 64));
                if self
                    .metrics_seen
                    .get(word)
                    .is_some_and(|seen| seen & bit != 0)
                {
                    return Err(duplicate(spec.name, &field.name));
                }
                if let Some(seen) = self.metrics_seen.get_mut(word) {
                    *seen |= bit;
                }
                if matches!(field.value, Scalar::Null) || self.deferred.is_some() {
                    return Ok(()); // No reading; or rejected already, so only duplicates matter.
                }
                match validator.metric(spec, &field, *conversion, &mut self.quality) {
                    Ok(number) => {
                        self.metrics.push((Cow::Borrowed(spec.name), number));
                    }
                    Err(rejection) => self.deferred = Some(rejection),
                }
                Ok(())
            }
            None => self.take_unknown(field),
        }
    }

    pub(super) fn take_unknown(&mut self, field: Field<'de>) -> Result<(), Rejection> {
        let name = field.name;
        let repeated = match self.validator.contract.unknown_fields {
            UnknownFields::Keep => match field.value.as_number() {
                // Repeats among metrics are found when they are sorted, in `finish`.
                Some(number) => {
                    self.metrics.push((Cow::Owned(name.into_owned()), number));
                    return Ok(());
                }
                None => self
                    .attributes
                    .insert(name.to_string(), field.value.into_json())
                    .is_some(),
            },
            UnknownFields::Drop => {
                let repeated = self
                    .quality
                    .dropped_fields
                    .iter()
                    .any(|dropped| *dropped == name);
                self.quality.dropped_fields.push(name.to_string());
                repeated
            }
            UnknownFields::Reject => {
                if self.deferred.is_none() {
                    self.deferred = Some(
                        Rejection::new(
                            Code::UnknownField,
                            "unknown_fields = \"reject\"",
                            "is not in the contract",
                        )
                        .on(&name)
                        .quoting(&field.value),
                    );
                }
                false
            }
        };
        if repeated {
            return Err(duplicate(&name, &name));
        }
        Ok(())
    }

    /// Checks the identity fields, then reports held-back faults and missing metrics.
    #[inline(always)]
    pub(super) fn finish(
        self,
        received_at: i64,
        topic_device: TopicDevice<'_>,
    ) -> Result<Event, Rejection> {
        let validator = self.validator;
        let metrics =
            Metrics::from_unsorted(self.metrics).map_err(|name| duplicate(&name, &name))?;
        if let Some(name) = self
            .attributes
            .keys()
            .find(|name| metrics.contains_key(name))
        {
            return Err(duplicate(name, name));
        }
        let mut quality = self.quality;
        let device_id = validator.device_id(self.device_id, topic_device)?;
        let device_ts = validator.device_ts(self.device_ts, received_at, &mut quality)?;
        let seq = validator.seq(self.seq, &mut quality)?;
        if let Some(rejection) = self.deferred {
            return Err(rejection);
        }
        if let Some(spec) = validator
            .metrics
            .iter()
            .find(|spec| spec.required && !metrics.contains_key(spec.name))
        {
            return Err(Rejection::new(
                Code::MissingMetric,
                format!("metrics.{}.required = true", spec.name),
                "is missing",
            )
            .on(spec.name));
        }
        quality.dropped_fields.sort_unstable();
        Ok(Event {
            device_id,
            device_ts,
            received_at,
            seq,
            metrics,
            attributes: self.attributes,
            schema_version: validator.contract.version,
            quality,
        })
    }
}

/// The rejection of a payload the bridge could not forward whole: its reason code
/// (`payload_too_large` unless the bridge said `kafka_rejected`), the original size and the
/// bridge's detail.
pub(super) fn cut_rejection(cut: &Cut<'_>, kept: usize) -> Rejection {
    let (code, rule) = match cut.reason {
        Some(reason) if reason == Code::KafkaRejected.as_str() => (Code::KafkaRejected, "kafka"),
        _ => (Code::PayloadTooLarge, "bridge max_message_bytes"),
    };
    let mut problem = format!(
        "is {} bytes, more than the bridge could forward whole; {kept} bytes are kept",
        cut.original_bytes
    );
    if let Some(detail) = cut.detail {
        problem.push_str(": ");
        problem.extend(detail.chars().take(MAX_QUOTED_CHARS * 4));
    }
    Rejection::new(code, rule, problem)
}

/// A top-level field of the payload, its name and value borrowed when they have no escapes.
#[derive(Debug, Clone)]
pub(super) struct Field<'a> {
    pub(super) name: Cow<'a, str>,
    pub(super) value: Scalar<'a>,
}

impl Scalar<'_> {
    // JSON numbers above 2^53 lose precision as f64; metrics are measurements, so that is fine.
    #[allow(clippy::cast_precision_loss)]
    pub(super) fn as_number(&self) -> Option<f64> {
        match self {
            Scalar::Unsigned(number) => Some(*number as f64),
            Scalar::Signed(number) => Some(*number as f64),
            Scalar::Float(number) => Some(*number),
            _ => None,
        }
    }

    /// The value as JSON text, cut to [`MAX_QUOTED_CHARS`] characters, for messages.
    pub(super) fn quote(&self) -> String {
        let text = self.clone().into_json().to_string();
        match text.char_indices().nth(MAX_QUOTED_CHARS) {
            Some((cut, _)) => format!("{}…", &text[..cut]),
            None => text,
        }
    }
}

pub(super) fn parse<'de>(
    payload: &'de [u8],
    reader: &mut Reader<'_, 'de>,
) -> Result<(), Rejection> {
    let limits = reader.validator.contract.limits;
    let read = json_reader::read_object(
        payload,
        limits.max_depth,
        limits.max_fields,
        |name, value| {
            // A repeated field is reported only once the whole payload has been read: a payload
            // that is also broken JSON is `invalid_json`, the more basic fault.
            if let Err(rejection) = reader.take(Field { name, value }) {
                reader.stopped.get_or_insert(rejection);
            }
        },
    );
    if read.is_ok() {
        if let Some(rejection) = reader.stopped.take() {
            return Err(rejection);
        }
    }
    read.map_err(|error| match error {
        ReadError::TooDeep => Rejection::new(
            Code::PayloadTooDeep,
            format!("limits.max_depth = {}", limits.max_depth),
            "nests objects or arrays too deep",
        ),
        ReadError::TooManyFields => Rejection::new(
            Code::TooManyFields,
            format!("limits.max_fields = {}", limits.max_fields),
            "has more fields than the limit",
        ),
        ReadError::NotAnObject(found) => Rejection::new(
            Code::NotAnObject,
            "json",
            format!("is a JSON {found}, expected an object"),
        ),
        ReadError::Invalid(detail) => Rejection::new(
            Code::InvalidJson,
            "json",
            format!("is not valid JSON: {detail}"),
        ),
    })
}
