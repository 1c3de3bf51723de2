//! A hand-written reader for the usual callback: the fastest of the readings of
//! [`super::payload::Body::parse`], and the narrowest.
//!
//! It reads the body byte by byte into the same structures the serde reading gives, and gives up
//! (`None`) at anything it was not written for: an escaped or non-string value where a string is
//! expected, a member a record does not usually have, a duplicate key, a `null` record list. Then
//! the serde readings take the body, with their errors. It never accepts what they reject: every
//! member it does not read itself is handed to serde_json whole, and what it reads itself is checked
//! against the JSON grammar (strings without control characters, only JSON whitespace, nothing after
//! the object). The fuzz harness holds it to the same results (`fuzzing::callback_body`).

/// JSON insignificant whitespace.
pub(super) fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// How many leading bytes of `bytes`, in whole words of eight, hold no `"`, no `\` and no
/// control character: a string's end is not among them. A word with one of them (or a false
/// alarm from a byte above 0x7f, which the byte loop after it takes) ends the count.
fn plain_prefix(bytes: &[u8]) -> usize {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // High bit of each byte of `w` that is below `n` (n ≤ 0x80), and of any byte ≥ 0x80.
    let below = |w: u64, n: u8| w.wrapping_sub(ONES * u64::from(n)) & HIGHS;
    let equal = |w: u64, b: u8| below(w ^ (ONES * u64::from(b)), 1);
    let mut at = 0;
    while let Some(word) = bytes.get(at..at + 8) {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        let w = u64::from_ne_bytes(w);
        if below(w, 0x20) | equal(w, b'"') | equal(w, b'\\') | (w & HIGHS) != 0 {
            break;
        }
        at += 8;
    }
    at
}

/// Whether `text` starts with `prefix`, compared a word of eight bytes at a time (the last word
/// overlapping the one before): the keys [`Scan::literal`] looks for are 8 to 29 bytes, whose
/// lengths are only known at run time, and a call to `memcmp` for each was ~5 % of a parse.
fn starts_with(text: &[u8], prefix: &[u8]) -> bool {
    let n = prefix.len();
    let Some(text) = text.get(..n) else {
        return false;
    };
    if n < 8 {
        return text.iter().zip(prefix).all(|(a, b)| a == b);
    }
    let word = |bytes: &[u8], at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[at..at + 8]);
        u64::from_ne_bytes(w)
    };
    let mut at = 0;
    while at + 8 < n {
        if word(text, at) != word(prefix, at) {
            return false;
        }
        at += 8;
    }
    word(text, n - 8) == word(prefix, n - 8)
}

/// A position in a body's text.
pub(super) struct Scan<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Scan<'a> {
    pub fn new(text: &'a str) -> Self {
        Scan { text, at: 0 }
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    /// Skips whitespace; the next byte, if any.
    pub fn peek(&mut self) -> Option<u8> {
        let bytes = self.bytes();
        while let Some(&b) = bytes.get(self.at) {
            if !is_ws(b) {
                return Some(b);
            }
            self.at += 1;
        }
        None
    }

    /// Skips whitespace, then `b`.
    pub fn eat(&mut self, b: u8) -> Option<()> {
        (self.peek()? == b).then(|| self.at += 1)
    }

    /// After whitespace: `,` (true: another member or element follows) or `close` (false).
    pub fn next_or(&mut self, close: u8) -> Option<bool> {
        match self.peek()? {
            b',' => {
                self.at += 1;
                Some(true)
            }
            b if b == close => {
                self.at += 1;
                Some(false)
            }
            _ => None,
        }
    }

    /// After whitespace: `open`, then whether the object or list is empty (its `close` is taken).
    pub fn open(&mut self, open: u8, close: u8) -> Option<bool> {
        self.eat(open)?;
        if self.peek()? == close {
            self.at += 1;
            return Some(true);
        }
        Some(false)
    }

    /// After whitespace: a string without escapes, its text between the quotes.
    pub fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let (bytes, start) = (self.bytes(), self.at);
        // One pass finds the end and checks there is no escape and no raw control character (not
        // JSON): eight bytes at a time past the plain ones (ICCIDs and dates are 20-27 bytes),
        // then byte by byte from the first word that holds one of them.
        let mut end = start + plain_prefix(bytes.get(start..)?);
        loop {
            match *bytes.get(end)? {
                b'"' => break,
                b'\\' => return None,
                b if b < 0x20 => return None,
                _ => end += 1,
            }
        }
        self.at = end + 1;
        self.text.get(start..end)
    }

    /// After whitespace: a key and its colon.
    pub fn key(&mut self) -> Option<&'a str> {
        let key = self.string()?;
        self.eat(b':')?;
        Some(key)
    }

    /// After whitespace: exactly `quoted` (a key with its quotes and colon, `"id":`), taken if it
    /// is there. The same as [`Scan::key`] giving that key, for the keys expected next.
    pub fn literal(&mut self, quoted: &[u8]) -> bool {
        if self.peek().is_none() {
            return false;
        }
        let found = self
            .bytes()
            .get(self.at..)
            .is_some_and(|rest| starts_with(rest, quoted));
        if found {
            self.at += quoted.len();
        }
        found
    }

    /// After whitespace: the text of one value of any kind, found by its delimiters only. The
    /// caller has serde_json check it (a wrong span fails there, or leaves a wrong byte after it).
    pub fn value_span(&mut self) -> Option<&'a str> {
        let first = self.peek()?;
        let start = self.at;
        let bytes = self.bytes();
        let mut depth = 0usize;
        loop {
            let b = *bytes.get(self.at)?;
            match b {
                b'"' => {
                    // To the closing quote, over escapes.
                    self.at += 1;
                    loop {
                        let n = memchr::memchr2(b'"', b'\\', bytes.get(self.at..)?)?;
                        self.at += n;
                        if bytes[self.at] == b'"' {
                            break;
                        }
                        self.at += 2;
                    }
                    self.at += 1;
                }
                b'{' | b'[' => {
                    depth += 1;
                    self.at += 1;
                }
                b'}' | b']' if depth > 0 => {
                    depth -= 1;
                    self.at += 1;
                }
                b',' | b'}' | b']' if depth == 0 => break,
                b if depth == 0 && is_ws(b) => break,
                _ => self.at += 1,
            }
            if depth == 0 && matches!(first, b'"' | b'{' | b'[') {
                break;
            }
        }
        self.text.get(start..self.at)
    }

    /// Whether only whitespace is left.
    pub fn at_end(&mut self) -> bool {
        self.peek().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_prefixes_end_before_the_first_word_with_a_quote_escape_or_control() {
        assert_eq!(plain_prefix(b"89148000000000000001\",rest"), 16);
        assert_eq!(plain_prefix(b"2021-08-15T00:00:00.0000000\""), 24);
        assert_eq!(plain_prefix(b"short\""), 0);
        assert_eq!(plain_prefix(b"abcdefg\\hijklmnop"), 0);
        assert_eq!(plain_prefix(b"abcdefgh\x1fijklmnop"), 8);
        assert_eq!(plain_prefix("abcdefghé......".as_bytes()), 8);
        assert_eq!(plain_prefix(b"abcdefgh ~ ~ ~ ~ "), 16);
    }

    proptest::proptest! {
        /// Any text: the words skipped hold none of the bytes a string ends or fails at.
        #[test]
        fn plain_prefixes_skip_only_plain_bytes(text in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let n = plain_prefix(&text);
            proptest::prop_assert_eq!(n % 8, 0);
            proptest::prop_assert!(text[..n].iter().all(|&b| b >= 0x20 && b != b'"' && b != b'\\'));
        }
    }

    proptest::proptest! {
        /// Any text and prefix (of any length, equal or one byte off): the same answer as the
        /// standard library's.
        #[test]
        fn prefixes_are_found_as_the_standard_library_finds_them(
            text in proptest::collection::vec(b'a'..=b'c', 0..40),
            cut in 0usize..40,
            flip in proptest::option::of(0usize..40),
        ) {
            let mut prefix = text[..cut.min(text.len())].to_vec();
            if let Some(at) = flip.filter(|&at| at < prefix.len()) {
                prefix[at] ^= 1;
            }
            proptest::prop_assert_eq!(starts_with(&text, &prefix), text.starts_with(&prefix));
            // A prefix longer than the text is never found.
            let mut longer = text.clone();
            longer.push(b'a');
            proptest::prop_assert!(!starts_with(&text, &longer));
        }
    }

    #[test]
    fn strings_with_escapes_or_control_characters_are_left_to_serde() {
        assert_eq!(Scan::new(r#" "abc" "#).string(), Some("abc"));
        assert_eq!(Scan::new(r#""a\"b""#).string(), None);
        assert_eq!(Scan::new("\"a\tb\"").string(), None);
        assert_eq!(Scan::new(r#""open"#).string(), None);
        assert_eq!(Scan::new("x").string(), None);
    }

    #[test]
    fn value_spans_end_at_their_delimiters() {
        let span = |t: &str| {
            let mut s = Scan::new(t);
            s.value_span().map(|v| (v.to_owned(), s.peek()))
        };
        assert_eq!(
            span(r#" "a\"}" , 1"#),
            Some((r#""a\"}""#.into(), Some(b',')))
        );
        assert_eq!(
            span(r#"{"a":[1,{"b":"]"}]} }"#),
            Some((r#"{"a":[1,{"b":"]"}]}"#.into(), Some(b'}')))
        );
        assert_eq!(span("12.5e3}"), Some(("12.5e3".into(), Some(b'}'))));
        assert_eq!(span("true ,"), Some(("true".into(), Some(b','))));
        assert_eq!(span(r#"{"a":1"#), None, "unterminated");
    }
}
