//! Fuzzing harnesses: what the cargo-fuzz targets in `fuzz/` run, and what the test suite replays
//! over the committed corpus (`fuzz/corpus/`). Each takes arbitrary bytes, must never panic on its
//! own, and asserts the invariants a user relies on (a violated one panics, which is the finding).
//! Not for the data path.

use std::borrow::Cow;
use std::path::Path;

use crate::ingest::{IngestOptions, read_iccid_source};
use crate::normalize::payload::{Body, CREDENTIAL_KEYS, CallbackKind};
use crate::normalize::record::parse_record;
use crate::normalize::values::{RawScalar, parse_count, parse_timestamp};
use crate::output::rejects::IccidRejects;

/// The callback parser: body → credentials stripped → callback → records.
pub fn callback_body(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(body) = Body::parse(text) else {
        return;
    };
    // Invariant: the hand-written and the serde one-pass readings are only faster roads to what
    // the older reading gives.
    let two_pass = Body::parse_two_pass(text)
        .unwrap_or_else(|e| panic!("the one pass read what the older reading rejects: {e}"));
    let serde = Body::parse_serde(text)
        .unwrap_or_else(|e| panic!("the hand-written reading read what serde rejects: {e}"));
    let summary = |b: &Body<'_>| {
        let strings: Vec<Option<String>> = CREDENTIAL_KEYS
            .iter()
            .map(|k| b.string(k).map(Cow::into_owned))
            .collect();
        let cb = b.callback().map(|c| {
            let records = match &c.kind {
                CallbackKind::Usage(r) => Some(r.parsed(false).collect::<Vec<_>>()),
                _ => None,
            };
            (
                c.request_id.to_string(),
                c.callback_count,
                format!("{:?}", c.kind.name()),
                records,
            )
        });
        (strings, cb)
    };
    assert_eq!(
        summary(&body),
        summary(&two_pass),
        "the two readings differ"
    );
    assert_eq!(
        summary(&serde),
        summary(&two_pass),
        "the serde readings differ"
    );
    assert_eq!(
        body.stripped(),
        serde.stripped(),
        "the readings strip differently"
    );
    // Invariant: the stripped body is a JSON object without credentials, and means the same.
    let stripped = body.stripped();
    // Invariant: stripping by span cuts out exactly the credential members and keeps every other
    // member byte for byte, in order.
    if let Some(cuts) = body.credential_cuts() {
        let mut kept = String::new();
        let mut at = 0;
        for cut in &cuts {
            assert!(
                at <= cut.start && cut.start < cut.end,
                "cuts out of order: {cuts:?}"
            );
            kept.push_str(&text[at..cut.start]);
            at = cut.end;
        }
        kept.push_str(&text[at..]);
        assert_eq!(kept, stripped, "stripped is not the text without the cuts");
        let members = two_pass
            .raw_members()
            .expect("the older reading keeps members");
        let want: Vec<_> = members
            .into_iter()
            .filter(|(k, _)| !CREDENTIAL_KEYS.contains(k))
            .collect();
        let got = Body::parse_two_pass(&stripped)
            .unwrap_or_else(|e| panic!("stripped body does not parse: {e}"));
        assert_eq!(got.raw_members(), Some(want), "stripping changed a member");
    }
    let again =
        Body::parse(&stripped).unwrap_or_else(|e| panic!("stripped body does not parse: {e}"));
    for key in CREDENTIAL_KEYS {
        assert!(
            again.string(key).is_none(),
            "credential {key} survived stripping"
        );
    }
    let original = body
        .callback()
        .map(|c| (c.request_id.to_string(), c.kind.name()));
    let reparsed = again
        .callback()
        .map(|c| (c.request_id.to_string(), c.kind.name()));
    assert_eq!(
        original.ok(),
        reparsed.ok(),
        "stripping changed the callback"
    );
    if let Ok(cb) = body.callback()
        && let CallbackKind::Usage(records) = &cb.kind
    {
        let parsed: Vec<_> = records.parsed(false).collect();
        // Invariant: the one-pass typed reading and the record-by-record one agree.
        if let Some(raw) = body.raw_records() {
            let one_by_one: Vec<_> = raw.iter().map(|r| parse_record(r, false)).collect();
            assert_eq!(parsed, one_by_one, "typed and raw record readings differ");
        }
        for r in parsed.into_iter().flatten() {
            assert!(r.usage_start < r.usage_end);
            assert!(r.data_usage_bytes >= 0 && r.sms_usage >= 0 && r.mo_sms >= 0 && r.mt_sms >= 0);
        }
    }
}

/// The ICCID list reader; rejects go to /dev/null.
pub fn csv_list(data: &[u8]) {
    let mut rejects = IccidRejects::new("/dev/null".into());
    if let Ok(list) = read_iccid_source(
        Path::new("fuzz.csv"),
        data,
        IngestOptions::default(),
        &mut rejects,
    ) {
        let s = &list.stats;
        // Invariant: every data row is accepted, a duplicate or rejected; kept ICCIDs are valid.
        assert_eq!(s.rows, s.accepted + s.duplicates + s.rejected, "{s:?}");
        for iccid in &list.iccids {
            let text = iccid.as_str();
            assert!(
                (19..=20).contains(&text.len())
                    && text.starts_with("89")
                    && text.bytes().all(|b| b.is_ascii_digit())
            );
        }
    }
}

/// The count and timestamp parsers on one string.
pub fn values(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let raw = RawScalar::Str(Cow::Borrowed(text));
    if let Ok(count) = parse_count(&raw) {
        // Invariant: only ASCII digits (with surrounding whitespace when recovered) make a count.
        let digits = text.trim_matches(|c: char| c.is_ascii_whitespace());
        assert!(
            !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()),
            "{text:?}"
        );
        assert_eq!(count.recovered, digits.len() != text.len());
        assert_eq!(
            digits.trim_start_matches('0').parse::<i64>().unwrap_or(0),
            count.value
        );
    }
    if let Ok(micros) = parse_timestamp(&raw) {
        // Invariant: what parses prints back to the same instant.
        let when = chrono::DateTime::from_timestamp_micros(micros)
            .unwrap_or_else(|| panic!("{micros} out of range"));
        let shown = when.format("%Y-%m-%dT%H:%M:%S").to_string();
        assert!(text.starts_with(&shown), "{text:?} parsed as {shown}");
    }
}
