//! SQL literals for statements sent as text (the MySQL store's one-round-trip batch write): the
//! values are written into the statement instead of bound, so nothing of a value may be read as
//! SQL, whatever the server's `sql_mode`.

use std::fmt::Write as _;

/// `value` as a string literal. Quoted (`'...'`, a quote doubled) when it holds no backslash and
/// no NUL, the common case; else hexadecimal (`_utf8mb4 X'...'`), because what a backslash means
/// in a quoted literal depends on the server's `sql_mode` (`NO_BACKSLASH_ESCAPES`). Either way
/// nothing in the value can end the literal.
pub(crate) fn text(sql: &mut String, value: &str) {
    if !value.bytes().any(|byte| byte == b'\\' || byte == 0) {
        sql.reserve(value.len() + 2);
        sql.push('\'');
        for (place, part) in value.split('\'').enumerate() {
            if place > 0 {
                sql.push_str("''");
            }
            sql.push_str(part);
        }
        sql.push('\'');
        return;
    }
    sql.reserve(value.len() * 2 + 12);
    sql.push_str("_utf8mb4 X'");
    push_hex(sql, value.as_bytes());
    sql.push('\'');
}

/// Bytes as a binary string literal, `X'...'` (an empty one is `''`).
pub(crate) fn bytes(sql: &mut String, value: &[u8]) {
    if value.is_empty() {
        sql.push_str("''");
        return;
    }
    sql.reserve(value.len() * 2 + 3);
    sql.push_str("X'");
    push_hex(sql, value);
    sql.push('\'');
}

fn push_hex(sql: &mut String, value: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for byte in value {
        sql.push(char::from(HEX[usize::from(byte >> 4)]));
        sql.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
}

/// [`text`], or `NULL`.
pub(crate) fn optional_text(sql: &mut String, value: Option<&str>) {
    match value {
        Some(value) => text(sql, value),
        None => sql.push_str("NULL"),
    }
}

/// A `DATETIME(3)` literal, `'YYYY-MM-DD hh:mm:ss.fff'` (years 0 to 9999, as the store keeps
/// them).
pub(crate) fn datetime(sql: &mut String, time: chrono::NaiveDateTime) {
    use chrono::{Datelike as _, Timelike as _};
    // Written digit by digit: chrono's `format` parses its pattern for every value, which was 5%
    // of the audit service's CPU at full rate (two times per row).
    let Ok(year) = u32::try_from(time.year()) else {
        let _ = write!(sql, "'{}'", time.format("%Y-%m-%d %H:%M:%S%.3f"));
        return;
    };
    let nanosecond = time.nanosecond();
    sql.push('\'');
    for (value, width, after) in [
        (year, 4, '-'),
        (time.month(), 2, '-'),
        (time.day(), 2, ' '),
        (time.hour(), 2, ':'),
        (time.minute(), 2, ':'),
        // A leap second (never made from milliseconds since the epoch) as chrono writes it.
        (time.second() + nanosecond / 1_000_000_000, 2, '.'),
        (nanosecond % 1_000_000_000 / 1_000_000, 3, '\''),
    ] {
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(value);
        for _ in digits.len()..width {
            sql.push('0');
        }
        sql.push_str(digits);
        sql.push(after);
    }
}

/// [`datetime`], or `NULL`.
pub(crate) fn optional_datetime(sql: &mut String, time: Option<chrono::NaiveDateTime>) {
    match time {
        Some(time) => datetime(sql, time),
        None => sql.push_str("NULL"),
    }
}

/// An integer literal.
pub(crate) fn integer(sql: &mut String, value: impl itoa::Integer) {
    sql.push_str(itoa::Buffer::new().format(value));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_become_literals_nothing_in_them_can_end() {
        let mut sql = String::new();
        text(&mut sql, "it's");
        sql.push(',');
        text(&mut sql, r"back\slash");
        sql.push(',');
        text(&mut sql, "nul\u{0}");
        sql.push(',');
        optional_text(&mut sql, None);
        sql.push(',');
        bytes(&mut sql, b"\xff'");
        sql.push(',');
        bytes(&mut sql, b"");
        sql.push(',');
        integer(&mut sql, -42_i64);
        assert_eq!(
            sql,
            r"'it''s',_utf8mb4 X'6261636B5C736C617368',_utf8mb4 X'6E756C00',NULL,X'FF27','',-42"
        );
        let mut time = String::new();
        let at = chrono::DateTime::from_timestamp_millis(1_764_000_000_123)
            .map(|at| at.naive_utc())
            .unwrap_or_default();
        datetime(&mut time, at);
        optional_datetime(&mut time, None);
        assert_eq!(time, "'2025-11-24 16:00:00.123'NULL");
        // Every digit padded, at both ends of the range the store keeps, as chrono writes them.
        for (millis, written) in [
            (-62_167_219_200_000, "'0000-01-01 00:00:00.000'"),
            (253_402_300_799_999, "'9999-12-31 23:59:59.999'"),
            (1_000_000_007, "'1970-01-12 13:46:40.007'"),
        ] {
            let at = chrono::DateTime::from_timestamp_millis(millis)
                .map(|at| at.naive_utc())
                .unwrap_or_default();
            let mut time = String::new();
            datetime(&mut time, at);
            assert_eq!(time, written);
            assert_eq!(time, format!("'{}'", at.format("%Y-%m-%d %H:%M:%S%.3f")));
        }
    }
}
