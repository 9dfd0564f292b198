//! Device times to UTC milliseconds: whole or fractional seconds, milliseconds, microseconds or
//! nanoseconds since the epoch, as numbers or numeric strings.

pub(super) fn seconds_to_millis(seconds: u64) -> i64 {
    i64::try_from(seconds)
        .unwrap_or(i64::MAX)
        .saturating_mul(1_000)
}

/// Reads a whole number of seconds, milliseconds, microseconds or nanoseconds since the epoch,
/// told apart by magnitude, as milliseconds. Seconds reach to the year 5138 and milliseconds
/// start in 1973, so the ranges do not overlap for any real device clock.
pub(super) fn integer_epoch_to_millis(integer: u64) -> Option<i64> {
    let millis = match integer {
        0..100_000_000_000 => integer.checked_mul(1_000)?,
        100_000_000_000..100_000_000_000_000 => integer,
        100_000_000_000_000..100_000_000_000_000_000 => integer / 1_000,
        _ => integer / 1_000_000,
    };
    i64::try_from(millis).ok()
}

/// As [`integer_epoch_to_millis`] for numbers with a fraction, rounded to the millisecond.
pub(super) fn float_epoch_to_millis(number: f64) -> Option<i64> {
    if !number.is_finite() || number < 0.0 {
        return None;
    }
    let millis = if number < 1e11 {
        number * 1e3
    } else if number < 1e14 {
        number
    } else if number < 1e17 {
        number / 1e3
    } else if number < 1e20 {
        number / 1e6
    } else {
        return None;
    };
    // Finite, non-negative and below 1e14 here, so the cast is exact.
    #[allow(clippy::cast_possible_truncation)]
    Some(millis.round() as i64)
}

/// A numeric string as an epoch time, when it is one.
pub(super) fn coerce_epoch(text: &str) -> Option<i64> {
    let text = text.trim();
    if !text
        .bytes()
        .next()
        .is_some_and(|first| first.is_ascii_digit())
    {
        return None;
    }
    match text.parse::<u64>() {
        Ok(integer) => integer_epoch_to_millis(integer),
        Err(_) => text.parse::<f64>().ok().and_then(float_epoch_to_millis),
    }
}
