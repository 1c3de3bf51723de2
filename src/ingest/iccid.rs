//! `Iccid`: a SIM card id (ITU-T E.118), validated once at the edge and then passed around as a value.

use std::fmt;

/// A validated ICCID: 19 or 20 ASCII digits starting with `89`.
///
/// Kept as its digits (21 bytes, `Copy`, cheap to hash and compare): ICCIDs can exceed `u64`, and the
/// text is what every output wants. Ordered as text.
#[derive(Clone, Copy)]
pub struct Iccid {
    /// ASCII digits, zero bytes after `len`.
    digits: [u8; 20],
    len: u8,
}

/// Why a text is not an ICCID. The messages are what a user reads in the rejects file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IccidError {
    #[error("empty ICCID")]
    Empty,
    #[error(
        "looks like a spreadsheet number in scientific notation ({0}): its trailing digits are lost; export the column as text"
    )]
    SpreadsheetNumber(String),
    #[error("contains {what} at position {position}; an ICCID is ASCII digits only")]
    NotDigits { what: String, position: usize },
    #[error("has {0} digits; an ICCID has 19 or 20")]
    Length(usize),
    #[error("does not start with 89 (the telecom prefix every ICCID has)")]
    Prefix,
    #[error("fails the Luhn check (last digit should be {expected})")]
    Luhn { expected: u8 },
}

impl IccidError {
    /// A short stable code for counting rejects by reason.
    pub fn code(&self) -> &'static str {
        match self {
            IccidError::Empty => "iccid_empty",
            IccidError::SpreadsheetNumber(_) => "iccid_spreadsheet_number",
            IccidError::NotDigits { .. } => "iccid_not_digits",
            IccidError::Length(_) => "iccid_length",
            IccidError::Prefix => "iccid_prefix",
            IccidError::Luhn { .. } => "iccid_luhn",
        }
    }
}

impl Iccid {
    /// Parses an ICCID strictly: ASCII digits only, 19 or 20 of them, `89` first.
    ///
    /// The Luhn check is separate ([`Iccid::luhn_check`]) because some real ICCIDs fail it: the caller
    /// decides whether that is a warning or a reject.
    ///
    /// ```
    /// use tsusage::ingest::Iccid;
    /// let id = Iccid::parse("8914800000080013970").unwrap();
    /// assert_eq!(id.to_string(), "8914800000080013970");
    /// assert!(Iccid::parse("8.91480E+19").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<Iccid, IccidError> {
        let bytes = text.as_bytes();
        if (19..=20).contains(&bytes.len())
            && bytes.starts_with(b"89")
            && bytes.iter().all(u8::is_ascii_digit)
        {
            let mut digits = [0u8; 20];
            digits[..bytes.len()].copy_from_slice(bytes);
            return Ok(Iccid {
                digits,
                len: bytes.len() as u8,
            });
        }
        // Not an ICCID: which rule it breaks, first to last.
        if text.is_empty() {
            return Err(IccidError::Empty);
        }
        if let Some((position, c)) = text.chars().enumerate().find(|(_, c)| !c.is_ascii_digit()) {
            if looks_like_scientific(text) {
                return Err(IccidError::SpreadsheetNumber(text.to_owned()));
            }
            return Err(IccidError::NotDigits {
                what: describe_char(c),
                position: position + 1,
            });
        }
        if !(19..=20).contains(&text.len()) {
            return Err(IccidError::Length(text.len()));
        }
        if !text.starts_with("89") {
            return Err(IccidError::Prefix);
        }
        let mut digits = [0u8; 20];
        digits[..text.len()].copy_from_slice(text.as_bytes());
        Ok(Iccid {
            digits,
            len: text.len() as u8,
        })
    }

    /// The ICCID's digits.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.digits[..usize::from(self.len)]).unwrap_or_default()
    }

    /// `Ok` when the last digit is the Luhn check digit of the others.
    pub fn luhn_check(self) -> Result<(), IccidError> {
        let (last, body) = match self.digits[..usize::from(self.len)].split_last() {
            Some(split) => split,
            None => return Err(IccidError::Empty),
        };
        let expected = luhn_check_digit(body);
        if last - b'0' == expected {
            Ok(())
        } else {
            Err(IccidError::Luhn { expected })
        }
    }
}

/// 11^9: [`Iccid::key`] is `high * KEY_HALF + low`, nine base-11 symbols in each.
const KEY_HALF: u64 = 2_357_947_691;

impl Iccid {
    /// The ICCID packed in one word, ordered as the text: the digits after the `89` every ICCID
    /// starts with, in base 11 (a digit `d` as `d + 1`, the missing 20th digit of a 19-digit ICCID
    /// as 0, which sorts first as the text's end does). 11^18 < 2^64.
    pub fn key(&self) -> u64 {
        // Two halves of nine symbols, each in 32 bits: two short chains instead of one long one.
        let half = |symbols: &[u8]| {
            symbols.iter().fold(0u32, |key, &b| {
                key * 11 + u32::from(b.saturating_sub(b'0' - 1))
            })
        };
        u64::from(half(&self.digits[2..11])) * KEY_HALF + u64::from(half(&self.digits[11..20]))
    }

    /// The ICCID of a [`Iccid::key`]; `None` for a word no ICCID packs to.
    pub fn from_key(key: u64) -> Option<Iccid> {
        let Ok(mut high) = u32::try_from(key / KEY_HALF) else {
            return None;
        };
        let mut low = (key % KEY_HALF) as u32;
        let digit = |symbol: u32| {
            if symbol == 0 {
                0
            } else {
                b'0' + symbol as u8 - 1
            }
        };
        let mut digits = [0u8; 20];
        for at in (2..11).rev() {
            digits[at] = digit(high % 11);
            digits[at + 9] = digit(low % 11);
            (high, low) = (high / 11, low / 11);
        }
        let key = high;
        digits[..2].copy_from_slice(b"89");
        let len = digits.iter().position(|&b| b == 0).unwrap_or(20);
        // Only a 19-digit ICCID has a zero symbol, and only last.
        if key != 0 || !(19..=20).contains(&len) || digits[len..].iter().any(|&b| b != 0) {
            return None;
        }
        Some(Iccid {
            digits,
            len: len as u8,
        })
    }

    /// The digits as two big-endian words: comparing them compares the text (a 19-digit ICCID has a
    /// zero byte last, which sorts before any digit).
    fn words(&self) -> (u128, u32) {
        let (head, tail) = self.digits.split_at(16);
        let mut h = [0u8; 16];
        h.copy_from_slice(head);
        let mut t = [0u8; 4];
        t.copy_from_slice(tail);
        (u128::from_be_bytes(h), u32::from_be_bytes(t))
    }
}

impl PartialEq for Iccid {
    fn eq(&self, other: &Self) -> bool {
        self.words() == other.words()
    }
}

impl Eq for Iccid {}

impl std::hash::Hash for Iccid {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let (h, t) = self.words();
        state.write_u128(h);
        state.write_u32(t);
    }
}

impl PartialOrd for Iccid {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Iccid {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.words().cmp(&other.words())
    }
}

impl fmt::Display for Iccid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Iccid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Iccid({})", self.as_str())
    }
}

/// The Luhn check digit for `body` (ASCII digits): the digit an ICCID ending in it must have last.
///
/// ```
/// assert_eq!(tsusage::ingest::luhn_check_digit(b"8914800000080013970"), 2);
/// ```
pub fn luhn_check_digit(body: &[u8]) -> u8 {
    let sum: u32 = body
        .iter()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b.wrapping_sub(b'0') % 10);
            if i % 2 == 0 {
                let d2 = d * 2;
                if d2 > 9 { d2 - 9 } else { d2 }
            } else {
                d
            }
        })
        .sum();
    ((10 - sum % 10) % 10) as u8
}

/// `8.91480E+19`, `8.9148E19`, `89148000000800000000.0`: what a spreadsheet makes of a long number.
fn looks_like_scientific(text: &str) -> bool {
    let (mantissa, exponent) = match text.split_once(['e', 'E']) {
        Some(split) => split,
        None => {
            return text.contains('.')
                && text
                    .replacen('.', "", 1)
                    .bytes()
                    .all(|b| b.is_ascii_digit());
        }
    };
    let exponent = exponent.strip_prefix('+').unwrap_or(exponent);
    !exponent.is_empty()
        && exponent.bytes().all(|b| b.is_ascii_digit())
        && !mantissa.is_empty()
        && mantissa.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

/// A character as a user can see it in a message, even when it is invisible.
pub(crate) fn describe_char(c: char) -> String {
    match c {
        ' ' => "a space".to_owned(),
        '\t' => "a tab".to_owned(),
        c if c.is_ascii_graphic() => format!("'{c}'"),
        c if c.is_numeric() => format!("the non-ASCII digit '{c}' (U+{:04X})", u32::from(c)),
        c => format!("U+{:04X}", u32::from(c)),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn keys_round_trip_and_order_as_the_text() {
        let texts = [
            "8900000000000000000",
            "89000000000000000000",
            "8914800000015715804",
            "89148000000010888700",
            "89148000000015715804",
            "8914800000080013970",
            "89999999999999999999",
            "8999999999999999999",
        ];
        let mut ids: Vec<Iccid> = texts.iter().map(|t| Iccid::parse(t).expect(t)).collect();
        for id in &ids {
            assert_eq!(Iccid::from_key(id.key()), Some(*id), "{id}");
        }
        ids.sort();
        let by_key: Vec<u64> = ids.iter().map(Iccid::key).collect();
        assert!(by_key.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        assert_eq!(Iccid::from_key(u64::MAX), None);
        assert_eq!(Iccid::from_key(0), None, "an 18-digit text is no ICCID");
    }

    use super::*;

    #[test]
    fn accepts_19_and_20_digit_iccids() {
        assert_eq!(
            Iccid::parse("8914800000080013970")
                .map(|i| i.to_string())
                .as_deref(),
            Ok("8914800000080013970")
        );
        assert_eq!(
            Iccid::parse("89148000000800139708")
                .map(|i| i.to_string())
                .as_deref(),
            Ok("89148000000800139708")
        );
    }

    #[test]
    fn rejects_wrong_length_prefix_and_characters() {
        assert_eq!(
            Iccid::parse("891480000008001397"),
            Err(IccidError::Length(18))
        );
        assert_eq!(
            Iccid::parse("891480000008001397081"),
            Err(IccidError::Length(21))
        );
        assert_eq!(
            Iccid::parse("79148000000800139708"),
            Err(IccidError::Prefix)
        );
        let err = Iccid::parse("8914 8000000800139708")
            .expect_err("space")
            .to_string();
        assert_eq!(
            err,
            "contains a space at position 5; an ICCID is ASCII digits only"
        );
        let err = Iccid::parse("8914800000080013970\u{200b}")
            .expect_err("zero width")
            .to_string();
        assert!(err.contains("U+200B"), "{err}");
        let err = Iccid::parse("８9148000000800139708")
            .expect_err("fullwidth")
            .to_string();
        assert!(err.contains("non-ASCII digit"), "{err}");
    }

    #[test]
    fn explains_spreadsheet_scientific_notation() {
        let err = Iccid::parse("8.91480E+19").expect_err("excel");
        assert_eq!(err, IccidError::SpreadsheetNumber("8.91480E+19".into()));
        assert!(err.to_string().contains("export the column as text"));
    }

    #[test]
    fn orders_and_compares_as_text() {
        let a = Iccid::parse("8914800000080013970").expect("19 digits");
        let b = Iccid::parse("89148000000800139700").expect("20 digits");
        let c = Iccid::parse("89148000000800139701").expect("20 digits");
        assert!(a < b && b < c);
        assert_eq!(a.cmp(&b), a.as_str().cmp(b.as_str()));
        assert_ne!(a, b);
        assert_eq!(b, Iccid::parse("89148000000800139700").expect("same"));
    }

    #[test]
    fn luhn_check_finds_the_wrong_check_digit() {
        // The vendor's own example ICCID fails Luhn; 8914800000080013970 + check digit 2 passes.
        let vendor = Iccid::parse("89148000000800139708").expect("valid shape");
        assert_eq!(vendor.luhn_check(), Err(IccidError::Luhn { expected: 2 }));
        let good = Iccid::parse("89148000000800139702").expect("valid shape");
        assert_eq!(good.luhn_check(), Ok(()));
    }
}
