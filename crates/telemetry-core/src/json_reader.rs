//! A JSON reader made for telemetry payloads: one pass over the bytes, straight into the top-level
//! fields, names and strings borrowed from the payload, numbers as integers when they are whole,
//! nesting depth and field count bounded while reading.
//!
//! Why not serde: a serde visitor over `serde_json` (and then `sonic-rs`) spent most of the time
//! per record in generic dispatch, and reached 0.5 (0.9) million records per second on this
//! machine, against a target of 1.5 (`docs/benchmarks.md`). Telemetry payloads are flat objects
//! of short names and numbers; this reader does only that work. It accepts exactly the JSON that
//! `serde_json` accepts (RFC 8259; a differential property test and the fuzz target hold it to
//! that), except that numbers too large for an f64 are refused, as `serde_json` does.

use std::borrow::Cow;

use serde_json::{Map, Value};

/// A top-level value. Nested objects and arrays are rare in telemetry and only ever kept as
/// attributes, so they are built as JSON values; everything else stays cheap.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Scalar<'a> {
    Null,
    Bool(bool),
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Text(Cow<'a, str>),
    Nested(Value),
}

/// Why reading stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReadError {
    /// Nested deeper than allowed.
    TooDeep,
    /// More object members and array elements than allowed.
    TooManyFields,
    /// Valid JSON, but not an object: the type found.
    NotAnObject(&'static str),
    /// Not JSON: what is wrong, and where (byte offset).
    Invalid(String),
}

/// Reads `payload`, which must be a JSON object, calling `on_field` with each top-level member in
/// order. Objects and arrays nest at most `max_depth` deep (the payload object is depth 1), and
/// there are at most `max_fields` members and elements in all.
pub(crate) fn read_object<'a>(
    payload: &'a [u8],
    max_depth: usize,
    max_fields: usize,
    mut on_field: impl FnMut(Cow<'a, str>, Scalar<'a>),
) -> Result<(), ReadError> {
    let text = std::str::from_utf8(payload).map_err(|error| {
        ReadError::Invalid(format!("not UTF-8 at byte {}", error.valid_up_to()))
    })?;
    let mut reader = JsonReader {
        text,
        bytes: payload,
        position: 0,
        fields_left: max_fields,
        max_depth,
    };
    reader.skip_whitespace();
    if reader.peek() != Some(b'{') {
        // Not an object: tell "valid JSON of another type" from "not JSON at all".
        let found = match reader.peek() {
            Some(b'[') => "array",
            Some(b'"') => "string",
            Some(b't' | b'f') => "boolean",
            Some(b'n') => "null",
            Some(b'-' | b'0'..=b'9') => "number",
            _ => return Err(reader.invalid("expected a JSON value")),
        };
        reader.fields_left = usize::MAX;
        reader.max_depth = usize::MAX;
        reader.value(0)?;
        reader.end()?;
        return Err(ReadError::NotAnObject(found));
    }
    reader.position += 1;
    reader.enter(1)?;
    reader.skip_whitespace();
    if reader.peek() == Some(b'}') {
        reader.position += 1;
        return reader.end();
    }
    loop {
        reader.skip_whitespace();
        let name = reader.string()?;
        reader.take_field()?;
        reader.colon()?;
        let value = reader.value(1)?;
        on_field(name, value);
        if reader.object_continues()? {
            continue;
        }
        return reader.end();
    }
}

/// The index of the first `"`, `\\` or control character at or after `from` (or the length).
/// Strings are most of a payload's bytes, so they are scanned eight bytes at a time: a word has
/// a byte equal to `b` when `(w ^ b…) - 0x01…` borrows into a byte whose top bit was clear, and
/// a byte below 0x20 when `w - 0x20…` does. The lowest flagged byte is always a true match.
#[inline(always)]
fn special_byte(bytes: &[u8], from: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |word: u64| word.wrapping_sub(ONES) & !word & HIGH;
    let mut position = from;
    while let Some(chunk) = bytes.get(position..position + 8) {
        let word = <[u8; 8]>::try_from(chunk).map_or(0, u64::from_le_bytes);
        let found = has_zero(word ^ (ONES * u64::from(b'"')))
            | has_zero(word ^ (ONES * u64::from(b'\\')))
            | (word.wrapping_sub(ONES * 0x20) & !word & HIGH);
        if found != 0 {
            return position + (found.trailing_zeros() / 8) as usize;
        }
        position += 8;
    }
    while let Some(byte) = bytes.get(position) {
        if *byte == b'"' || *byte == b'\\' || *byte < 0x20 {
            break;
        }
        position += 1;
    }
    position
}

/// 10^0 to 10^22: every one an exact double.
const POWERS_OF_TEN: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// Most nesting any contract may allow: it bounds the reader's recursion, so the stack.
pub const MAX_DEPTH_LIMIT: usize = 128;

struct JsonReader<'a> {
    /// The payload, known to be UTF-8.
    text: &'a str,
    bytes: &'a [u8],
    position: usize,
    fields_left: usize,
    max_depth: usize,
}

impl<'a> JsonReader<'a> {
    #[inline(always)]
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.position).copied()
    }

    #[cold]
    fn invalid(&self, problem: &str) -> ReadError {
        match self.peek() {
            Some(_) => ReadError::Invalid(format!("{problem} at byte {}", self.position)),
            None => ReadError::Invalid(format!("{problem}, found the end of the payload")),
        }
    }

    #[inline(always)]
    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.position += 1;
        }
    }

    #[inline(always)]
    fn take_field(&mut self) -> Result<(), ReadError> {
        self.fields_left = self
            .fields_left
            .checked_sub(1)
            .ok_or(ReadError::TooManyFields)?;
        Ok(())
    }

    fn enter(&self, depth: usize) -> Result<(), ReadError> {
        if depth > self.max_depth.min(MAX_DEPTH_LIMIT) {
            Err(ReadError::TooDeep)
        } else {
            Ok(())
        }
    }

    /// Only whitespace may follow the payload's value.
    fn end(&mut self) -> Result<(), ReadError> {
        self.skip_whitespace();
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.invalid("trailing characters")),
        }
    }

    #[inline(always)]
    fn colon(&mut self) -> Result<(), ReadError> {
        self.skip_whitespace();
        if self.peek() != Some(b':') {
            return Err(self.invalid("expected `:`"));
        }
        self.position += 1;
        Ok(())
    }

    /// After a member: `true` for `,` (another member follows), `false` for `}`.
    #[inline(always)]
    fn object_continues(&mut self) -> Result<bool, ReadError> {
        self.skip_whitespace();
        match self.peek() {
            Some(b',') => {
                self.position += 1;
                Ok(true)
            }
            Some(b'}') => {
                self.position += 1;
                Ok(false)
            }
            _ => Err(self.invalid("expected `,` or `}`")),
        }
    }

    /// A value whose container is at `depth`.
    #[inline(always)]
    fn value(&mut self, depth: usize) -> Result<Scalar<'a>, ReadError> {
        self.skip_whitespace();
        match self.peek() {
            Some(b'"') => Ok(Scalar::Text(self.string()?)),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.literal("true", Scalar::Bool(true)),
            Some(b'f') => self.literal("false", Scalar::Bool(false)),
            Some(b'n') => self.literal("null", Scalar::Null),
            Some(b'{' | b'[') => Ok(Scalar::Nested(self.nested(depth + 1)?)),
            _ => Err(self.invalid("expected a JSON value")),
        }
    }

    #[inline(always)]
    fn literal(&mut self, word: &str, value: Scalar<'a>) -> Result<Scalar<'a>, ReadError> {
        let matches = self
            .bytes
            .get(self.position..)
            .is_some_and(|rest| rest.starts_with(word.as_bytes()));
        if matches {
            self.position += word.len();
            Ok(value)
        } else {
            Err(self.invalid("expected a JSON value"))
        }
    }

    /// An object or array at `depth`, as a JSON value. Rare in telemetry: kept out of line so
    /// the common path stays small.
    #[inline(never)]
    fn nested(&mut self, depth: usize) -> Result<Value, ReadError> {
        self.enter(depth)?;
        let opening = self.peek();
        self.position += 1;
        self.skip_whitespace();
        if opening == Some(b'[') {
            let mut array = Vec::new();
            if self.peek() == Some(b']') {
                self.position += 1;
                return Ok(Value::Array(array));
            }
            loop {
                self.take_field()?;
                array.push(self.value(depth)?.into_json());
                self.skip_whitespace();
                match self.peek() {
                    Some(b',') => self.position += 1,
                    Some(b']') => {
                        self.position += 1;
                        return Ok(Value::Array(array));
                    }
                    _ => return Err(self.invalid("expected `,` or `]`")),
                }
            }
        }
        let mut object = Map::new();
        if self.peek() == Some(b'}') {
            self.position += 1;
            return Ok(Value::Object(object));
        }
        loop {
            self.skip_whitespace();
            let name = self.string()?;
            self.take_field()?;
            self.colon()?;
            let value = self.value(depth)?.into_json();
            object.insert(name.into_owned(), value);
            if !self.object_continues()? {
                return Ok(Value::Object(object));
            }
        }
    }

    /// A string, borrowed from the payload when it has no escapes.
    #[inline(always)]
    fn string(&mut self) -> Result<Cow<'a, str>, ReadError> {
        if self.peek() != Some(b'"') {
            return Err(self.invalid("expected a string"));
        }
        self.position += 1;
        let start = self.position;
        self.position = special_byte(self.bytes, self.position);
        match self.peek() {
            Some(b'"') => {
                let text = self.text.get(start..self.position).unwrap_or_default();
                self.position += 1;
                Ok(Cow::Borrowed(text))
            }
            Some(b'\\') => self.escaped_string(start),
            Some(_) => Err(self.invalid("control character in a string")),
            None => Err(self.invalid("unterminated string")),
        }
    }

    /// The rest of a string that has escapes, from its first character at `start`.
    #[inline(never)]
    fn escaped_string(&mut self, start: usize) -> Result<Cow<'a, str>, ReadError> {
        let mut text = String::from(self.text.get(start..self.position).unwrap_or_default());
        loop {
            let run_start = self.position;
            while let Some(byte) = self.peek() {
                if byte == b'"' || byte == b'\\' || byte < 0x20 {
                    break;
                }
                self.position += 1;
            }
            text.push_str(self.text.get(run_start..self.position).unwrap_or_default());
            match self.peek() {
                Some(b'"') => {
                    self.position += 1;
                    return Ok(Cow::Owned(text));
                }
                Some(b'\\') => {
                    self.position += 1;
                    let Some(escape) = self.peek() else {
                        return Err(self.invalid("unterminated string"));
                    };
                    self.position += 1;
                    match escape {
                        b'"' => text.push('"'),
                        b'\\' => text.push('\\'),
                        b'/' => text.push('/'),
                        b'b' => text.push('\u{8}'),
                        b'f' => text.push('\u{c}'),
                        b'n' => text.push('\n'),
                        b'r' => text.push('\r'),
                        b't' => text.push('\t'),
                        b'u' => text.push(self.unicode_escape()?),
                        _ => {
                            self.position -= 1;
                            return Err(self.invalid("invalid escape"));
                        }
                    }
                }
                Some(_) => return Err(self.invalid("control character in a string")),
                None => return Err(self.invalid("unterminated string")),
            }
        }
    }

    /// The character of a `\uXXXX` escape (after the `u`), with a surrogate pair's second half.
    fn unicode_escape(&mut self) -> Result<char, ReadError> {
        let first = self.hex4()?;
        let code = match first {
            0xD800..=0xDBFF => {
                let paired = self
                    .bytes
                    .get(self.position..)
                    .is_some_and(|rest| rest.starts_with(b"\\u"));
                if !paired {
                    return Err(self.invalid("unpaired surrogate in a \\u escape"));
                }
                self.position += 2;
                let second = self.hex4()?;
                if !(0xDC00..=0xDFFF).contains(&second) {
                    return Err(self.invalid("unpaired surrogate in a \\u escape"));
                }
                0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
            }
            0xDC00..=0xDFFF => return Err(self.invalid("unpaired surrogate in a \\u escape")),
            code => code,
        };
        char::from_u32(code).ok_or_else(|| self.invalid("invalid \\u escape"))
    }

    fn hex4(&mut self) -> Result<u32, ReadError> {
        let digits = self
            .text
            .get(self.position..self.position + 4)
            .filter(|digits| digits.bytes().all(|byte| byte.is_ascii_hexdigit()))
            .ok_or_else(|| self.invalid("expected four hex digits"))?;
        let value =
            u32::from_str_radix(digits, 16).map_err(|_| self.invalid("invalid \\u escape"))?;
        self.position += 4;
        Ok(value)
    }

    /// A number in JSON's grammar: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
    /// The digits are accumulated while the grammar is checked, so most numbers need no second
    /// pass: whole numbers that fit are exact, and decimals with at most 15 significant digits
    /// and a small exponent take the exact fast path (Clinger: both operands are exact doubles,
    /// so one multiplication or division rounds correctly). The rest go to the standard parser.
    #[inline(always)]
    fn number(&mut self) -> Result<Scalar<'a>, ReadError> {
        let start = self.position;
        let negative = self.peek() == Some(b'-');
        if negative {
            self.position += 1;
        }
        let mut mantissa: u64 = 0;
        let mut significant = 0usize;
        match self.peek() {
            Some(b'0') => self.position += 1,
            Some(b'1'..=b'9') => self.digits(&mut mantissa, &mut significant),
            _ => return Err(self.invalid("expected a digit")),
        }
        let mut whole = true;
        let mut exponent: i64 = 0;
        if self.peek() == Some(b'.') {
            whole = false;
            self.position += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.invalid("expected a digit after `.`"));
            }
            let before = self.position;
            self.digits(&mut mantissa, &mut significant);
            exponent -= i64::try_from(self.position - before).unwrap_or(i64::MAX);
        }
        if let Some(b'e' | b'E') = self.peek() {
            whole = false;
            self.position += 1;
            let negative_exponent = match self.peek() {
                Some(b'-') => {
                    self.position += 1;
                    true
                }
                Some(b'+') => {
                    self.position += 1;
                    false
                }
                _ => false,
            };
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.invalid("expected a digit in the exponent"));
            }
            let mut written: i64 = 0;
            while let Some(digit @ b'0'..=b'9') = self.peek() {
                written = written
                    .saturating_mul(10)
                    .saturating_add(i64::from(digit - b'0'));
                self.position += 1;
            }
            exponent = if negative_exponent {
                exponent.saturating_sub(written)
            } else {
                exponent.saturating_add(written)
            };
        }
        if whole {
            // Whole numbers stay exact when they fit, as serde_json keeps them. Up to 19 digits
            // always fit the u64 accumulator; longer ones are parsed again.
            let magnitude = if significant <= 19 {
                Some(mantissa)
            } else {
                let digits = self.text.get(start..self.position).unwrap_or_default();
                digits.trim_start_matches('-').parse::<u64>().ok()
            };
            match (negative, magnitude) {
                (false, Some(value)) => return Ok(Scalar::Unsigned(value)),
                // `-0` keeps its sign, as a float, as serde_json reads it.
                (true, Some(0)) => return Ok(Scalar::Float(-0.0)),
                (true, Some(value)) if value <= 1 << 63 => {
                    return Ok(Scalar::Signed(0i64.wrapping_sub_unsigned(value)));
                }
                _ => {}
            }
        }
        if significant <= 15 && (-22..=22).contains(&exponent) {
            // `mantissa` < 10^15 < 2^53 and 10^|exponent| are exact doubles.
            #[allow(clippy::cast_precision_loss)]
            let value = mantissa as f64;
            let power = POWERS_OF_TEN[usize::try_from(exponent.unsigned_abs()).unwrap_or(0)];
            let value = if exponent < 0 {
                value / power
            } else {
                value * power
            };
            return Ok(Scalar::Float(if negative { -value } else { value }));
        }
        let literal = self.text.get(start..self.position).unwrap_or_default();
        match literal.parse::<f64>() {
            Ok(number) if number.is_finite() => Ok(Scalar::Float(number)),
            _ => {
                self.position = start;
                Err(self.invalid("number out of range"))
            }
        }
    }

    /// Reads digits into `mantissa`, counting the significant ones (leading zeros are not).
    #[inline(always)]
    fn digits(&mut self, mantissa: &mut u64, significant: &mut usize) {
        while let Some(digit @ b'0'..=b'9') = self.peek() {
            if *significant > 0 || digit != b'0' {
                *significant += 1;
            }
            *mantissa = mantissa
                .wrapping_mul(10)
                .wrapping_add(u64::from(digit - b'0'));
            self.position += 1;
        }
    }
}

impl Scalar<'_> {
    /// The value as JSON.
    pub(crate) fn into_json(self) -> Value {
        match self {
            Scalar::Null => Value::Null,
            Scalar::Bool(flag) => Value::Bool(flag),
            Scalar::Unsigned(number) => Value::from(number),
            Scalar::Signed(number) => Value::from(number),
            Scalar::Float(number) => Value::from(number),
            Scalar::Text(text) => Value::String(text.into_owned()),
            Scalar::Nested(value) => value,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The payload as one JSON value, read the way [`read_object`] reads it.
    fn read(payload: &[u8]) -> Result<Value, ReadError> {
        let mut object = Map::new();
        read_object(payload, MAX_DEPTH_LIMIT, usize::MAX, |name, value| {
            object.insert(name.into_owned(), value.into_json());
        })?;
        Ok(Value::Object(object))
    }

    #[test]
    fn reads_what_serde_json_reads() {
        let cases: &[&str] = &[
            r#"{}"#,
            r#" { "a" : 1 , "b":[1, 2.5, -3, {"c": null}], "d": true, "e": false } "#,
            r#"{"s":"caf\u00e9 \ud83d\ude00 \"q\" \\ \/ \b\f\n\r\t","é":"ü"}"#,
            r#"{"n":-0,"m":0.5e-3,"o":1E+2,"p":18446744073709551615,"q":-9223372036854775808}"#,
            r#"{"big":18446744073709551616,"neg":-9223372036854775809}"#,
        ];
        for case in cases {
            let expected: Value = serde_json::from_str(case).unwrap();
            assert_eq!(read(case.as_bytes()).unwrap(), expected, "{case}");
        }
    }

    #[test]
    fn refuses_what_serde_json_refuses() {
        let cases: &[&[u8]] = &[
            b"",
            b"{",
            b"{\"a\"}",
            b"{\"a\":}",
            b"{\"a\":1,}",
            b"{\"a\":01}",
            b"{\"a\":1.}",
            b"{\"a\":.5}",
            b"{\"a\":1e}",
            b"{\"a\":+1}",
            b"{\"a\":tru}",
            b"{\"a\":\"\x01\"}",
            b"{\"a\":\"\\x\"}",
            b"{\"a\":\"\\ud800\"}",
            b"{\"a\":\"\\udc00x\"}",
            b"{\"a\":1} x",
            b"{'a':1}",
            b"{\"a\":1e400}",
            b"\xff",
            b"{\"a\":[1,]}",
            b"{\"a\":NaN}",
        ];
        for case in cases {
            assert!(
                serde_json::from_slice::<Value>(case).is_err(),
                "serde accepts {case:?}"
            );
            assert!(
                matches!(read(case), Err(ReadError::Invalid(_))),
                "{:?}: {:?}",
                String::from_utf8_lossy(case),
                read(case)
            );
        }
    }

    #[test]
    fn other_json_types_are_told_apart_from_broken_json() {
        assert_eq!(read(b" [1, {}] "), Err(ReadError::NotAnObject("array")));
        assert_eq!(read(b"42"), Err(ReadError::NotAnObject("number")));
        assert_eq!(read(b"\"x\""), Err(ReadError::NotAnObject("string")));
        assert_eq!(read(b"null"), Err(ReadError::NotAnObject("null")));
        assert!(matches!(read(b"[1, 2"), Err(ReadError::Invalid(_))));
    }

    #[test]
    fn limits_stop_reading() {
        let deep = format!("{{\"a\":{}", "[".repeat(100_000));
        assert_eq!(
            read_object(deep.as_bytes(), 8, usize::MAX, |_, _| {}),
            Err(ReadError::TooDeep)
        );
        assert_eq!(
            read_object(b"{\"a\":[1,2,3]}", 8, 3, |_, _| {}),
            Err(ReadError::TooManyFields)
        );
        assert_eq!(read_object(b"{\"a\":[1,2]}", 8, 3, |_, _| {}), Ok(()));
        assert_eq!(
            read_object(b"{\"a\":[]}", 1, 3, |_, _| {}),
            Err(ReadError::TooDeep)
        );
    }

    /// JSON-like text built from the pieces that break parsers.
    fn jsonish() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("{"),
            Just("}"),
            Just("["),
            Just("]"),
            Just(","),
            Just(":"),
            Just("\""),
            Just("\\"),
            Just("\\u"),
            Just("d83d"),
            Just("\\n"),
            Just("a"),
            Just("é"),
            Just("0"),
            Just("-"),
            Just("1"),
            Just("."),
            Just("e"),
            Just("+"),
            Just(" "),
            Just("true"),
            Just("null"),
            Just("\"k\":"),
            Just("1e999"),
            Just("\u{1}"),
        ];
        proptest::collection::vec(piece, 0..24).prop_map(|pieces| pieces.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4_000))]

        /// Numbers read exactly as the standard library's correctly rounded parser reads them.
        #[test]
        fn numbers_match_the_standard_parser(
            text in r"-?(0|[1-9][0-9]{0,21})(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,3})?"
        ) {
            let payload = format!("{{\"n\":{text}}}");
            let mut read_value = None;
            let result = read_object(payload.as_bytes(), 8, 8, |_, value| {
                read_value = Some(value);
            });
            let expected = text.parse::<f64>().unwrap();
            if !expected.is_finite() {
                prop_assert!(matches!(result, Err(ReadError::Invalid(_))));
                return Ok(());
            }
            prop_assert_eq!(result, Ok(()));
            let got = match read_value {
                Some(Scalar::Float(number)) => number,
                Some(Scalar::Unsigned(number)) => {
                    prop_assert_eq!(Ok(number), text.parse::<u64>());
                    return Ok(());
                }
                Some(Scalar::Signed(number)) => {
                    prop_assert_eq!(Ok(number), text.parse::<i64>());
                    return Ok(());
                }
                other => return Err(TestCaseError::fail(format!("{other:?}"))),
            };
            prop_assert_eq!(got.to_bits(), expected.to_bits(), "{}", text);
        }

        /// Differential: valid JSON to serde_json is valid here, with the same value, and the
        /// other way round.
        #[test]
        fn agrees_with_serde_json(text in jsonish()) {
            let ours = read(text.as_bytes());
            match serde_json::from_str::<Value>(&text) {
                Ok(Value::Object(object)) => prop_assert_eq!(ours, Ok(Value::Object(object))),
                Ok(_) => prop_assert!(matches!(ours, Err(ReadError::NotAnObject(_)))),
                Err(_) => prop_assert!(matches!(ours, Err(ReadError::Invalid(_))), "{:?}", ours),
            }
        }
    }
}
