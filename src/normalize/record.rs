//! One usage record (`devicePromoUsageResponse[i]`) → a typed [`ParsedRecord`], or a reject naming the field.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::scan::Scan;
use super::values::{RawScalar, ValueError, parse_count, parse_timestamp};
use crate::ingest::{Iccid, IccidError};

/// A usage record that passed the value policy. Times are µs since the epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedRecord {
    pub iccid: Iccid,
    pub usage_start: i64,
    pub usage_end: i64,
    pub data_usage_bytes: i64,
    pub sms_usage: i64,
    pub mo_sms: i64,
    pub mt_sms: i64,
    /// Some value needed leniency (whitespace around digits, a JSON integer).
    pub recovered: bool,
    /// The ICCID's Luhn check digit is wrong (kept unless strict).
    pub luhn_warning: bool,
}

/// Why a record was rejected: the first field that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError {
    /// The ICCID as received, when there was one.
    pub iccid: Option<String>,
    pub field: &'static str,
    pub raw: Option<String>,
    pub code: &'static str,
    pub reason: String,
}

/// A usage record as received. `I` is how `deviceIdentifierCollection` is read: raw (so that a
/// malformed one rejects only this record) or typed (the one-pass fast path of [`Records`]).
#[derive(Clone, Deserialize)]
struct WireRecord<'a, I> {
    #[serde(rename = "deviceIdentifierCollection")]
    ids: I,
    #[serde(rename = "dataUsage", borrow, default)]
    data_usage: RawScalar<'a>,
    #[serde(rename = "smsUsage", borrow, default)]
    sms_usage: RawScalar<'a>,
    #[serde(rename = "moSms", borrow, default)]
    mo_sms: RawScalar<'a>,
    #[serde(rename = "mtSms", borrow, default)]
    mt_sms: RawScalar<'a>,
    #[serde(rename = "startDate", borrow, default)]
    start_date: RawScalar<'a>,
    #[serde(rename = "endDate", borrow, default)]
    end_date: RawScalar<'a>,
}

/// `deviceIdentifierCollection`, kept raw so a malformed one rejects the record, not the callback.
#[derive(Default)]
struct RawScalarOrList<'a>(Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for RawScalarOrList<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&'a RawValue>::deserialize(d).map(|v| RawScalarOrList(Some(v)))
    }
}

#[derive(Clone, Deserialize)]
struct WireId<'a> {
    #[serde(borrow, default)]
    id: RawScalar<'a>,
    #[serde(borrow, default)]
    kind: RawScalar<'a>,
}

/// `deviceIdentifierCollection` as the one-pass reading keeps it: nearly always one identifier,
/// held in place (a list would be an allocation and a free per record: ~2 % of an ingest's CPU).
#[derive(Clone)]
enum Ids<'a> {
    One(WireId<'a>),
    List(Vec<WireId<'a>>),
}

impl<'a> Ids<'a> {
    fn as_slice(&self) -> &[WireId<'a>] {
        match self {
            Ids::One(id) => std::slice::from_ref(id),
            Ids::List(ids) => ids,
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Ids<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let ids = Vec::<WireId<'a>>::deserialize(d)?;
        Ok(match <[WireId<'a>; 1]>::try_from(ids) {
            Ok([id]) => Ids::One(id),
            Err(ids) => Ids::List(ids),
        })
    }
}

/// A record read in the one pass over its callback: the usual shape, every field where expected.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct TypedRecord<'a>(#[serde(borrow)] WireRecord<'a, Ids<'a>>);

impl<'a> TypedRecord<'a> {
    /// A record as the hand-written reader finds it ([`super::scan`]): an object with
    /// `deviceIdentifierCollection` (a list of `{id, kind}`) and string values, each key once.
    /// `None` for anything else, which the serde readings then take.
    pub(super) fn scan(scan: &mut Scan<'a>) -> Option<Self> {
        /// The members of a record, in the order the vendor writes them: each key is first looked
        /// for as the bytes that usually come next (`"dataUsage":`), then read as any key.
        const KEYS: [&str; 7] = [
            "deviceIdentifierCollection",
            "dataUsage",
            "smsUsage",
            "moSms",
            "mtSms",
            "startDate",
            "endDate",
        ];
        const USUAL: [&[u8]; 7] = [
            b"\"deviceIdentifierCollection\":",
            b"\"dataUsage\":",
            b"\"smsUsage\":",
            b"\"moSms\":",
            b"\"mtSms\":",
            b"\"startDate\":",
            b"\"endDate\":",
        ];
        let mut ids = None;
        let mut values: [RawScalar<'a>; 6] = Default::default();
        if scan.open(b'{', b'}')? {
            return None; // no deviceIdentifierCollection
        }
        let mut next = 0;
        loop {
            let field = match USUAL.get(next) {
                Some(usual) if scan.literal(usual) => next,
                _ => {
                    let key = scan.key()?;
                    KEYS.iter().position(|k| *k == key)?
                }
            };
            next = field + 1;
            if field == 0 {
                if ids.is_some() {
                    return None;
                }
                ids = Some(scan_ids(scan)?);
            } else {
                let value = values.get_mut(field - 1)?;
                if !matches!(value, RawScalar::Missing) {
                    return None;
                }
                *value = RawScalar::Str(scan.string()?.into());
            }
            if !scan.next_or(b'}')? {
                break;
            }
        }
        let [data_usage, sms_usage, mo_sms, mt_sms, start_date, end_date] = values;
        Some(TypedRecord(WireRecord {
            ids: ids?,
            data_usage,
            sms_usage,
            mo_sms,
            mt_sms,
            start_date,
            end_date,
        }))
    }
}

/// `deviceIdentifierCollection` for [`TypedRecord::scan`]: `{id, kind}` objects with string values.
fn scan_ids<'a>(scan: &mut Scan<'a>) -> Option<Ids<'a>> {
    let mut ids = Vec::new();
    if scan.open(b'[', b']')? {
        return Some(Ids::List(ids));
    }
    loop {
        let mut id = WireId {
            id: RawScalar::Missing,
            kind: RawScalar::Missing,
        };
        if !scan.open(b'{', b'}')? {
            loop {
                let slot = if scan.literal(b"\"id\":") {
                    &mut id.id
                } else if scan.literal(b"\"kind\":") {
                    &mut id.kind
                } else {
                    match scan.key()? {
                        "id" => &mut id.id,
                        "kind" => &mut id.kind,
                        _ => return None,
                    }
                };
                if !matches!(slot, RawScalar::Missing) {
                    return None;
                }
                *slot = RawScalar::Str(scan.string()?.into());
                if !scan.next_or(b'}')? {
                    break;
                }
            }
        }
        // The list's last identifier: the only one (held in place, the usual case), or pushed.
        if !scan.next_or(b']')? {
            if ids.is_empty() {
                return Some(Ids::One(id));
            }
            ids.push(id);
            return Some(Ids::List(ids));
        }
        ids.push(id);
    }
}

/// The usage records of a callback (`deviceResponse.devicePromoUsageResponse`).
///
/// Read in one pass into typed fields when every record has the usual shape ([`Records::Typed`]);
/// otherwise each record is kept raw and read on its own ([`Records::Raw`]), so that one malformed
/// record is rejected alone. Both give the same results: the typed form is only a faster road to them.
#[derive(Debug)]
pub enum Records<'a> {
    Typed(Vec<TypedRecord<'a>>),
    Raw(Vec<&'a RawValue>),
}

impl std::fmt::Debug for TypedRecord<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TypedRecord")
    }
}

impl Records<'_> {
    pub fn len(&self) -> usize {
        match self {
            Records::Typed(r) => r.len(),
            Records::Raw(r) => r.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each record through the value policy, in order.
    pub fn parsed(
        &self,
        strict_luhn: bool,
    ) -> impl Iterator<Item = Result<ParsedRecord, RecordError>> + '_ {
        let n = self.len();
        let mut window = Window::default();
        (0..n).map(move |i| match self {
            Records::Typed(r) => {
                let wire = &r[i].0;
                iccid_of(wire.ids.as_slice())
                    .and_then(|iccid| check(wire, iccid, strict_luhn, &mut window))
            }
            Records::Raw(r) => parse_record(r[i], strict_luhn),
        })
    }
}

/// Applies the value policy to one record. `strict_luhn` turns a failed Luhn check into a reject.
pub fn parse_record(raw: &RawValue, strict_luhn: bool) -> Result<ParsedRecord, RecordError> {
    let wire: WireRecord<'_, RawScalarOrList<'_>> =
        serde_json::from_str(raw.get()).map_err(|e| RecordError {
            iccid: None,
            field: "(record)",
            raw: None,
            code: "record_malformed",
            reason: format!("not a usage record object: {e}"),
        })?;
    let iccid = parse_iccid(wire.ids.0)?;
    check(&wire, iccid, strict_luhn, &mut Window::default())
}

/// The last `startDate` and `endDate` texts read, with their values: the records of a callback
/// nearly always share one window, so each text is parsed once per callback, not once per record.
#[derive(Default)]
struct Window<'a> {
    start: Option<(&'a str, i64)>,
    end: Option<(&'a str, i64)>,
}

/// [`parse_timestamp`], or the value of `last` when `raw` is its text; remembers what it parsed.
fn timestamp<'a>(
    raw: &RawScalar<'a>,
    last: &mut Option<(&'a str, i64)>,
) -> Result<i64, ValueError> {
    if let (RawScalar::Str(text), Some((seen, value))) = (raw, *last)
        && text.as_ref() == seen
    {
        return Ok(value);
    }
    let value = parse_timestamp(raw)?;
    if let RawScalar::Str(std::borrow::Cow::Borrowed(text)) = raw {
        *last = Some((text, value));
    }
    Ok(value)
}

fn check<'a, I>(
    wire: &WireRecord<'a, I>,
    iccid: Iccid,
    strict_luhn: bool,
    window: &mut Window<'a>,
) -> Result<ParsedRecord, RecordError> {
    let fail = |field: &'static str, raw: &RawScalar<'_>, e: ValueError| RecordError {
        iccid: Some(iccid.to_string()),
        field,
        raw: raw.raw_text(),
        code: e.code,
        reason: e.reason,
    };
    let mut luhn_warning = false;
    if let Err(e @ IccidError::Luhn { .. }) = iccid.luhn_check() {
        if strict_luhn {
            return Err(RecordError {
                iccid: Some(iccid.to_string()),
                field: "deviceIdentifierCollection",
                raw: Some(iccid.to_string()),
                code: e.code(),
                reason: format!("ICCID {e} (input.strict_luhn = true)"),
            });
        }
        luhn_warning = true;
    }
    let usage_start = timestamp(&wire.start_date, &mut window.start)
        .map_err(|e| fail("startDate", &wire.start_date, e))?;
    let usage_end = timestamp(&wire.end_date, &mut window.end)
        .map_err(|e| fail("endDate", &wire.end_date, e))?;
    if usage_start >= usage_end {
        return Err(fail(
            "endDate",
            &wire.end_date,
            ValueError {
                code: "window_not_increasing",
                reason: "endDate is not after startDate".into(),
            },
        ));
    }
    let mut recovered = false;
    let mut count = |field: &'static str, raw: &RawScalar<'_>| {
        parse_count(raw)
            .map(|c| {
                recovered |= c.recovered;
                c.value
            })
            .map_err(|e| fail(field, raw, e))
    };
    let data_usage_bytes = count("dataUsage", &wire.data_usage)?;
    let sms_usage = count("smsUsage", &wire.sms_usage)?;
    let mo_sms = count("moSms", &wire.mo_sms)?;
    let mt_sms = count("mtSms", &wire.mt_sms)?;
    Ok(ParsedRecord {
        iccid,
        usage_start,
        usage_end,
        data_usage_bytes,
        sms_usage,
        mo_sms,
        mt_sms,
        recovered,
        luhn_warning,
    })
}

fn iccid_reject(
    iccid: Option<String>,
    raw: Option<String>,
    code: &'static str,
    reason: String,
) -> RecordError {
    RecordError {
        iccid,
        field: "deviceIdentifierCollection",
        raw,
        code,
        reason,
    }
}

/// Reads `deviceIdentifierCollection` from its raw text, then [`iccid_of`].
fn parse_iccid(ids: Option<&RawValue>) -> Result<Iccid, RecordError> {
    let Some(ids) = ids else {
        return Err(iccid_reject(
            None,
            None,
            "iccid_missing",
            "no deviceIdentifierCollection".into(),
        ));
    };
    let list: Vec<WireId<'_>> = serde_json::from_str(ids.get()).map_err(|_| {
        iccid_reject(
            None,
            Some(super::record_raw(ids.get())),
            "iccid_missing",
            "deviceIdentifierCollection is not a list of {id, kind}".into(),
        )
    })?;
    iccid_of(&list)
}

/// Finds the `kind: "ICCID"` entry (any case) and validates its id.
fn iccid_of(list: &[WireId<'_>]) -> Result<Iccid, RecordError> {
    let reject = iccid_reject;
    let entry = list.iter().find(|id| match &id.kind {
        RawScalar::Str(k) => k.eq_ignore_ascii_case("iccid"),
        _ => false,
    });
    let Some(entry) = entry else {
        return Err(reject(
            None,
            None,
            "iccid_missing",
            "no identifier of kind ICCID".into(),
        ));
    };
    let RawScalar::Str(text) = &entry.id else {
        return Err(reject(
            None,
            entry.id.raw_text(),
            "iccid_not_digits",
            "the ICCID is not a string".into(),
        ));
    };
    match Iccid::parse(text) {
        Ok(iccid) => Ok(iccid),
        Err(e) => Err(reject(
            Some(text.to_string()),
            Some(text.to_string()),
            e.code(),
            format!("ICCID {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(fields: &str) -> Result<ParsedRecord, RecordError> {
        let json = format!(
            r#"{{"deviceIdentifierCollection":[{{"id":"89148000000800139702","kind":"ICCID"}}],{fields}}}"#
        );
        let raw: Box<RawValue> = serde_json::from_str(&json).expect("test json");
        parse_record(&raw, false)
    }

    const DATES: &str =
        r#""startDate":"2021-08-15T00:00:00.0000000","endDate":"2021-08-16T00:00:00.0000000""#;

    #[test]
    fn parses_a_clean_record() {
        let r = record(&format!(
            r#""dataUsage":"3072","smsUsage":"4","moSms":"1","mtSms":"3",{DATES}"#
        ))
        .expect("clean");
        assert_eq!(r.iccid.to_string(), "89148000000800139702");
        assert_eq!(
            (r.data_usage_bytes, r.sms_usage, r.mo_sms, r.mt_sms),
            (3072, 4, 1, 3)
        );
        assert_eq!(r.usage_end - r.usage_start, 86_400_000_000);
        assert!(!r.recovered && !r.luhn_warning);
    }

    #[test]
    fn names_the_failing_field() {
        let err = record(&format!(
            r#""dataUsage":"-1","smsUsage":"4","moSms":"1","mtSms":"3",{DATES}"#
        ))
        .expect_err("signed");
        assert_eq!(
            (err.field, err.code, err.raw.as_deref()),
            ("dataUsage", "value_signed", Some("-1"))
        );
        assert_eq!(err.iccid.as_deref(), Some("89148000000800139702"));
        let err = record(r#""dataUsage":"1","smsUsage":"4","moSms":"1","mtSms":"3","startDate":"2021-08-16T00:00:00","endDate":"2021-08-15T00:00:00""#)
            .expect_err("backwards");
        assert_eq!((err.field, err.code), ("endDate", "window_not_increasing"));
        let err = record(&format!(
            r#""dataUsage":"1","smsUsage":"4","moSms":"1",{DATES}"#
        ))
        .expect_err("missing");
        assert_eq!((err.field, err.code), ("mtSms", "value_missing"));
    }

    #[test]
    fn luhn_failure_warns_unless_strict() {
        let json = format!(
            r#"{{"deviceIdentifierCollection":[{{"id":"89148000000800139708","kind":"iccid"}}],"dataUsage":"1","smsUsage":"0","moSms":"0","mtSms":"0",{DATES}}}"#
        );
        let raw: Box<RawValue> = serde_json::from_str(&json).expect("test json");
        assert!(parse_record(&raw, false).expect("kept").luhn_warning);
        assert_eq!(
            parse_record(&raw, true).expect_err("strict").code,
            "iccid_luhn"
        );
    }
}
