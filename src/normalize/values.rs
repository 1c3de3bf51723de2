//! The value policy (docs/operations.md, "The value policy"): ThingSpace's string counts and
//! .NET-style timestamps, parsed strictly.
//!
//! Accepted: `"3072"`. Recovered (accepted, counted apart): `" 3072 "` and the JSON integer `3072`.
//! Rejected, with a reason: `""`, `"null"`, `null`, a missing field, signs, fractions and exponents,
//! non-ASCII digits, thousands separators, hex, anything above `i64::MAX`, any other JSON type.

use std::borrow::Cow;
use std::fmt;

use chrono::NaiveDate;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// A JSON value as received, before the policy decides what it means. `Missing` when the key is absent.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum RawScalar<'a> {
    #[default]
    Missing,
    Null,
    Str(Cow<'a, str>),
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Bool(bool),
    /// An array or an object.
    Compound,
}

impl RawScalar<'_> {
    /// The value as text for a rejects file; `None` when the field was absent.
    pub fn raw_text(&self) -> Option<String> {
        match self {
            RawScalar::Missing => None,
            RawScalar::Null => Some("null".into()),
            RawScalar::Str(s) => Some(s.to_string()),
            RawScalar::Unsigned(n) => Some(n.to_string()),
            RawScalar::Signed(n) => Some(n.to_string()),
            RawScalar::Float(f) => Some(f.to_string()),
            RawScalar::Bool(b) => Some(b.to_string()),
            RawScalar::Compound => Some("(an array or object)".into()),
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawScalar<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = RawScalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(RawScalar::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(RawScalar::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(RawScalar::Str(Cow::Owned(v)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(RawScalar::Unsigned(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(RawScalar::Signed(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(RawScalar::Float(v))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(RawScalar::Bool(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(RawScalar::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(RawScalar::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(RawScalar::Compound)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(RawScalar::Compound)
    }
}

/// Why a value was rejected: a stable code for counting and a sentence for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueError {
    pub code: &'static str,
    pub reason: String,
}

impl ValueError {
    fn new(code: &'static str, reason: impl Into<String>) -> Self {
        ValueError {
            code,
            reason: reason.into(),
        }
    }
}

/// A count that passed the policy; `recovered` when it needed leniency (whitespace, a JSON integer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    pub value: i64,
    pub recovered: bool,
}

/// Applies the value policy to a usage count.
///
/// ```
/// use std::borrow::Cow;
/// use tsusage::normalize::values::{parse_count, RawScalar};
/// let ok = parse_count(&RawScalar::Str(Cow::Borrowed("3072"))).unwrap();
/// assert_eq!((ok.value, ok.recovered), (3072, false));
/// let err = parse_count(&RawScalar::Str(Cow::Borrowed("-1"))).unwrap_err();
/// assert_eq!(err.code, "value_signed");
/// ```
pub fn parse_count(raw: &RawScalar<'_>) -> Result<Count, ValueError> {
    match raw {
        RawScalar::Str(s) => {
            if let Some(value) = ascii_decimal(s)? {
                return Ok(Count {
                    value,
                    recovered: false,
                });
            }
            let trimmed = s.trim_matches(|c: char| c.is_ascii_whitespace());
            if trimmed.len() != s.len()
                && let Some(value) = ascii_decimal(trimmed)?
            {
                return Ok(Count {
                    value,
                    recovered: true,
                });
            }
            Err(classify_bad_count(s))
        }
        RawScalar::Unsigned(n) => match i64::try_from(*n) {
            Ok(value) => Ok(Count {
                value,
                recovered: true,
            }),
            Err(_) => Err(ValueError::new(
                "value_out_of_range",
                "above the largest 64-bit integer",
            )),
        },
        RawScalar::Signed(_) => Err(ValueError::new("value_signed", "negative count")),
        RawScalar::Float(_) => Err(ValueError::new(
            "value_fraction_or_exponent",
            "a JSON number with a fraction or exponent (or too large for an integer); counts are whole numbers",
        )),
        RawScalar::Missing => Err(ValueError::new("value_missing", "the field is missing")),
        RawScalar::Null => Err(ValueError::new("value_null", "null instead of a count")),
        RawScalar::Bool(_) | RawScalar::Compound => Err(ValueError::new(
            "value_wrong_type",
            "not a string or a number",
        )),
    }
}

/// `Some(n)` for a non-empty run of ASCII digits that fits `i64`, `None` when not all digits.
fn ascii_decimal(s: &str) -> Result<Option<i64>, ValueError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    let mut value: i64 = 0;
    for b in s.bytes() {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(i64::from(b - b'0')))
            .ok_or_else(|| {
                ValueError::new("value_out_of_range", "above the largest 64-bit integer")
            })?;
    }
    Ok(Some(value))
}

fn classify_bad_count(s: &str) -> ValueError {
    let t = s.trim_matches(|c: char| c.is_ascii_whitespace());
    let has_digit = t.bytes().any(|b| b.is_ascii_digit());
    if s.is_empty() {
        ValueError::new("value_empty", "empty string instead of a count")
    } else if t.is_empty() {
        ValueError::new("value_empty", "only whitespace instead of a count")
    } else if t.eq_ignore_ascii_case("null") {
        ValueError::new("value_null", "the string \"null\" instead of a count")
    } else if t.starts_with(['-', '+']) {
        ValueError::new("value_signed", "a count with a sign")
    } else if t.len() > 2 && (t.starts_with("0x") || t.starts_with("0X")) {
        ValueError::new("value_hex", "a hexadecimal number; counts are decimal")
    } else if let Some(c) = t.chars().find(|c| !c.is_ascii() && c.is_numeric()) {
        ValueError::new(
            "value_non_ascii_digits",
            format!(
                "holds {}; counts are ASCII digits only",
                crate::ingest::describe_char(c)
            ),
        )
    } else if has_digit
        && t.bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
    {
        ValueError::new(
            "value_fraction_or_exponent",
            "a fraction or exponent; counts are whole numbers",
        )
    } else if has_digit
        && t.bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b',' | b'_' | b'\'' | b' '))
    {
        ValueError::new(
            "value_thousands_separator",
            "digits with separators; counts are plain digits",
        )
    } else {
        ValueError::new("value_not_a_number", "not a decimal number")
    }
}

/// Parses a ThingSpace timestamp into microseconds since the Unix epoch, UTC.
///
/// The vendor sends `2021-08-15T00:00:00.0000000`: no offset, meaning UTC, 7 fractional digits. Also
/// accepted: 0 to 9 fractional digits, and a `Z` or `+00:00` suffix. Rejected: any other offset (the
/// instant would be a guess), digits finer than a microsecond that are not zero (they would be lost),
/// impossible dates such as `2024-02-30`, and every other shape.
///
/// ```
/// use std::borrow::Cow;
/// use tsusage::normalize::values::{parse_timestamp, RawScalar};
/// let us = parse_timestamp(&RawScalar::Str(Cow::Borrowed("2021-08-15T00:00:00.0000000"))).unwrap();
/// assert_eq!(us, 1_628_985_600_000_000);
/// ```
pub fn parse_timestamp(raw: &RawScalar<'_>) -> Result<i64, ValueError> {
    let s = match raw {
        RawScalar::Str(s) => s.as_ref(),
        RawScalar::Missing => {
            return Err(ValueError::new("timestamp_missing", "the field is missing"));
        }
        RawScalar::Null => {
            return Err(ValueError::new(
                "timestamp_null",
                "null instead of a timestamp",
            ));
        }
        _ => return Err(ValueError::new("timestamp_wrong_type", "not a string")),
    };
    let bad_shape = || {
        ValueError::new(
            "timestamp_format",
            "not a timestamp like 2021-08-15T00:00:00.0000000",
        )
    };
    let b = s.as_bytes();
    if b.len() < 19 {
        return Err(bad_shape());
    }
    let num = |range: std::ops::Range<usize>| -> Option<u32> {
        let part = b.get(range)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(
            part.iter()
                .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0')),
        )
    };
    if b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return Err(bad_shape());
    }
    let (Some(year), Some(month), Some(day), Some(hour), Some(minute), Some(second)) = (
        num(0..4),
        num(5..7),
        num(8..10),
        num(11..13),
        num(14..16),
        num(17..19),
    ) else {
        return Err(bad_shape());
    };
    let mut rest = &b[19..];
    let mut micros: i64 = 0;
    if let Some(frac) = rest.strip_prefix(b".") {
        let digits = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 || digits > 9 {
            return Err(bad_shape());
        }
        for (i, d) in frac[..digits].iter().enumerate() {
            let d = i64::from(d - b'0');
            if i < 6 {
                micros = micros * 10 + d;
            } else if d != 0 {
                return Err(ValueError::new(
                    "timestamp_precision",
                    "finer than a microsecond; the output keeps microseconds",
                ));
            }
        }
        micros *= 10i64.pow(6u32.saturating_sub(digits as u32));
        rest = &frac[digits..];
    }
    match rest {
        b"" | b"Z" | b"+00:00" => {}
        [b'+' | b'-', ..] => {
            return Err(ValueError::new(
                "timestamp_offset",
                "has a UTC offset other than +00:00; ThingSpace sends UTC without one",
            ));
        }
        _ => return Err(bad_shape()),
    }
    let impossible = || ValueError::new("timestamp_impossible", "no such date or time");
    let date = NaiveDate::from_ymd_opt(year as i32, month, day).ok_or_else(impossible)?;
    let time = date
        .and_hms_opt(hour, minute, second)
        .ok_or_else(impossible)?;
    Ok(time.and_utc().timestamp() * 1_000_000 + micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &str) -> RawScalar<'_> {
        RawScalar::Str(Cow::Borrowed(text))
    }

    #[test]
    fn counts_follow_the_value_policy() {
        type Case<'a> = (RawScalar<'a>, Result<(i64, bool), &'a str>);
        let cases: &[Case<'_>] = &[
            (s("3072"), Ok((3072, false))),
            (s("0"), Ok((0, false))),
            (s("9223372036854775807"), Ok((i64::MAX, false))),
            (s(" 3072 "), Ok((3072, true))),
            (s("\t7\n"), Ok((7, true))),
            (RawScalar::Unsigned(3072), Ok((3072, true))),
            (s(""), Err("value_empty")),
            (s("   "), Err("value_empty")),
            (s("null"), Err("value_null")),
            (RawScalar::Null, Err("value_null")),
            (RawScalar::Missing, Err("value_missing")),
            (s("-1"), Err("value_signed")),
            (s("+5"), Err("value_signed")),
            (RawScalar::Signed(-1), Err("value_signed")),
            (s("1.5E3"), Err("value_fraction_or_exponent")),
            (s("3072.0"), Err("value_fraction_or_exponent")),
            (RawScalar::Float(3072.0), Err("value_fraction_or_exponent")),
            (s("３０７２"), Err("value_non_ascii_digits")),
            (s("1,024"), Err("value_thousands_separator")),
            (s("1 024"), Err("value_thousands_separator")),
            (s("0x10"), Err("value_hex")),
            (s("9223372036854775808"), Err("value_out_of_range")),
            (RawScalar::Unsigned(u64::MAX), Err("value_out_of_range")),
            (s("abc"), Err("value_not_a_number")),
            (RawScalar::Bool(true), Err("value_wrong_type")),
            (RawScalar::Compound, Err("value_wrong_type")),
        ];
        for (raw, expected) in cases {
            let got = parse_count(raw)
                .map(|c| (c.value, c.recovered))
                .map_err(|e| e.code);
            assert_eq!(&got, expected, "for {raw:?}");
        }
    }

    #[test]
    fn timestamps_are_utc_microseconds() {
        let day = 1_628_985_600_000_000; // 2021-08-15T00:00:00Z
        let cases: &[(&str, Result<i64, &str>)] = &[
            ("2021-08-15T00:00:00.0000000", Ok(day)),
            ("2021-08-15T00:00:00", Ok(day)),
            ("2021-08-15T00:00:00Z", Ok(day)),
            ("2021-08-15T00:00:00.000000000", Ok(day)),
            ("2021-08-15T00:00:00.5", Ok(day + 500_000)),
            ("2021-08-15T00:00:01.0000010", Ok(day + 1_000_001)),
            ("2021-08-15T00:00:00.0000001", Err("timestamp_precision")),
            ("2021-08-15T00:00:00+02:00", Err("timestamp_offset")),
            ("2024-02-30T00:00:00.0000000", Err("timestamp_impossible")),
            ("2021-08-15T24:00:00", Err("timestamp_impossible")),
            ("2021-08-15 00:00:00", Err("timestamp_format")),
            ("15/08/2021", Err("timestamp_format")),
            ("2021-08-15T00:00:00.", Err("timestamp_format")),
            ("2021-08-15T00:00:00.0000000000", Err("timestamp_format")),
        ];
        for (text, expected) in cases {
            let got = parse_timestamp(&s(text)).map_err(|e| e.code);
            assert_eq!(&got, expected, "for {text}");
        }
        assert_eq!(
            parse_timestamp(&RawScalar::Missing).map_err(|e| e.code),
            Err("timestamp_missing")
        );
    }
}
