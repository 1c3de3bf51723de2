//! Reading ICCID lists from CSV: header or not, any delimiter of `,` `;` tab, BOM, CRLF, quotes.
//!
//! Memory holds the set of distinct ICCIDs and one record at a time, whatever the file size.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{Iccid, IccidError, IngestError};
use crate::output::rejects::IccidRejects;

/// How strictly to validate.
#[derive(Debug, Clone, Copy, Default)]
pub struct IngestOptions {
    /// Reject (instead of warn about) ICCIDs that fail the Luhn check.
    pub strict_luhn: bool,
}

/// Counts for the run report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IngestStats {
    /// Files read.
    pub files: u64,
    /// Data rows seen (header and blank lines not counted).
    pub rows: u64,
    /// Distinct valid ICCIDs kept.
    pub accepted: u64,
    /// Rows that repeated an ICCID already kept.
    pub duplicates: u64,
    /// Rows rejected (see the rejects file).
    pub rejected: u64,
    /// Files skipped whole (no ICCID column), also listed in the rejects file.
    pub files_rejected: u64,
    /// ICCIDs kept although their Luhn check digit is wrong.
    pub luhn_warnings: u64,
    pub rejected_by_reason: BTreeMap<String, u64>,
}

/// The validated, deduplicated ICCIDs in first-seen order.
#[derive(Debug, Clone, Default)]
pub struct IccidList {
    pub iccids: Vec<Iccid>,
    pub stats: IngestStats,
}

/// How many Luhn warnings are logged one by one before only the count goes on.
const LUHN_WARNINGS_LOGGED: u64 = 10;

/// Reads every file in `paths`; bad rows go to `rejects` with file, line, raw value and reason.
pub fn read_iccid_files(
    paths: &[PathBuf],
    options: IngestOptions,
    rejects: &mut IccidRejects,
) -> Result<IccidList, IngestError> {
    let mut list = IccidList::default();
    let mut seen = HashSet::new();
    for path in paths {
        let file = File::open(path).map_err(|source| IngestError::Read {
            path: path.to_owned(),
            source,
        })?;
        read_one(path, file, options, rejects, &mut seen, &mut list)?;
    }
    list.stats.accepted = list.iccids.len() as u64;
    Ok(list)
}

/// Reads one ICCID list from any byte source; `name` stands for it in rejects and errors.
pub fn read_iccid_source<R: Read>(
    name: &Path,
    input: R,
    options: IngestOptions,
    rejects: &mut IccidRejects,
) -> Result<IccidList, IngestError> {
    let mut list = IccidList::default();
    read_one(
        name,
        input,
        options,
        rejects,
        &mut HashSet::new(),
        &mut list,
    )?;
    list.stats.accepted = list.iccids.len() as u64;
    Ok(list)
}

fn read_one<R: Read>(
    path: &Path,
    input: R,
    options: IngestOptions,
    rejects: &mut IccidRejects,
    seen: &mut HashSet<Iccid>,
    list: &mut IccidList,
) -> Result<(), IngestError> {
    let read_err = |source| IngestError::Read {
        path: path.to_owned(),
        source,
    };
    let mut input = BufReader::new(input);
    let delimiter = sniff_delimiter(&mut input).map_err(read_err)?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .delimiter(delimiter)
        .from_reader(input);
    list.stats.files += 1;

    let stats = &mut list.stats;
    let mut reject = |line: u64, raw: &str, code: &str, reason: &str| {
        stats.rejected += 1;
        *stats.rejected_by_reason.entry(code.to_owned()).or_default() += 1;
        rejects.push(path, line, raw, reason)
    };

    let mut column: Option<usize> = None;
    let mut record = csv::ByteRecord::new();
    let mut first = true;
    let mut rows = 0u64;
    let mut luhn_warnings = 0u64;
    let mut duplicates = 0u64;
    loop {
        match reader.read_byte_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                match e.into_kind() {
                    csv::ErrorKind::Io(source) => return Err(read_err(source)),
                    other => {
                        reject(
                            line,
                            "",
                            "csv_malformed",
                            &format!("malformed CSV: {other:?}"),
                        )?;
                        continue;
                    }
                }
            }
        }
        let line = record.position().map_or(0, csv::Position::line);
        if first {
            first = false;
            if let Some(first_field) = record.get(0) {
                let stripped = first_field
                    .strip_prefix(b"\xEF\xBB\xBF")
                    .unwrap_or(first_field)
                    .to_vec();
                let mut fixed = csv::ByteRecord::new();
                fixed.push_field(&stripped);
                for field in record.iter().skip(1) {
                    fixed.push_field(field);
                }
                fixed.set_position(record.position().cloned());
                record = fixed;
            }
            match header_column(&record) {
                Header::Named(i) | Header::Unnamed(i) => {
                    column = Some(i);
                    continue;
                }
                Header::None(i) => column = Some(i),
                Header::Missing(names) => {
                    reject(
                        line,
                        &names,
                        "csv_no_iccid_column",
                        &format!(
                            "no column named iccid among the {} columns of the header; the file was skipped",
                            record.len()
                        ),
                    )?;
                    // The whole file is skipped: a rejected file, not a rejected row.
                    list.stats.rejected -= 1;
                    list.stats.files_rejected += 1;
                    return Ok(());
                }
            }
        }
        let Some(raw) = column.and_then(|i| record.get(i)) else {
            if record.iter().all(|f| f.iter().all(u8::is_ascii_whitespace)) {
                continue;
            }
            rows += 1;
            let raw = String::from_utf8_lossy(record.as_slice()).into_owned();
            reject(
                line,
                &raw,
                "csv_missing_column",
                "the row has no value in the ICCID column",
            )?;
            continue;
        };
        let text = match std::str::from_utf8(raw) {
            Ok(text) => text.trim_matches(|c: char| c.is_ascii_whitespace()),
            Err(_) => {
                rows += 1;
                reject(
                    line,
                    &String::from_utf8_lossy(raw),
                    "csv_not_utf8",
                    "not UTF-8 (the file may be Latin-1 or UTF-16: save it as UTF-8)",
                )?;
                continue;
            }
        };
        if text.is_empty() && record.len() <= 1 {
            continue; // a blank line
        }
        rows += 1;
        let iccid = match Iccid::parse(text) {
            Ok(iccid) => iccid,
            Err(e) => {
                reject(line, text, e.code(), &format!("ICCID {}", e))?;
                continue;
            }
        };
        if let Err(e @ IccidError::Luhn { .. }) = iccid.luhn_check() {
            if options.strict_luhn {
                reject(
                    line,
                    text,
                    e.code(),
                    &format!("ICCID {e} (input.strict_luhn = true)"),
                )?;
                continue;
            }
            luhn_warnings += 1;
            if luhn_warnings <= LUHN_WARNINGS_LOGGED {
                tracing::warn!(file = %path.display(), line, "ICCID {text} {e}; kept (set input.strict_luhn to reject)");
            }
        }
        if seen.insert(iccid) {
            list.iccids.push(iccid);
        } else {
            duplicates += 1;
        }
    }
    list.stats.rows += rows;
    list.stats.luhn_warnings += luhn_warnings;
    list.stats.duplicates += duplicates;
    Ok(())
}

enum Header {
    /// A header with a column named `iccid` (any case) at this index.
    Named(usize),
    /// A one-column header with another name: that column.
    Unnamed(usize),
    /// No header: the first row is data; the ICCID is in this column (the first that holds one).
    None(usize),
    /// A header of several columns, none named `iccid` (their names joined).
    Missing(String),
}

fn header_column(first: &csv::ByteRecord) -> Header {
    let fields: Vec<String> = first
        .iter()
        .map(|f| String::from_utf8_lossy(f).trim().to_owned())
        .collect();
    if let Some(i) = fields.iter().position(|f| f.eq_ignore_ascii_case("iccid")) {
        return Header::Named(i);
    }
    let has_digit = |f: &String| f.bytes().any(|b| b.is_ascii_digit());
    match fields.as_slice() {
        [only] if !has_digit(only) && !only.is_empty() => Header::Unnamed(0),
        [_] | [] => Header::None(0),
        _ if fields.iter().any(has_digit) => Header::None(
            fields
                .iter()
                .position(|f| Iccid::parse(f).is_ok())
                .unwrap_or(0),
        ),
        _ => Header::Missing(fields.join(",")),
    }
}

/// Picks `,`, `;` or tab, whichever the first line has most of (`,` when it has none).
fn sniff_delimiter<R: Read>(input: &mut BufReader<R>) -> std::io::Result<u8> {
    let buf = input.fill_buf()?;
    let window = &buf[..buf.len().min(64 * 1024)];
    let first_line = window.split(|&b| b == b'\n').next().unwrap_or(window);
    let count = |d: u8| first_line.iter().filter(|&&b| b == d).count();
    let mut best = (b',', count(b','));
    for d in [b';', b'\t'] {
        let n = count(d);
        if n > best.1 {
            best = (d, n);
        }
    }
    Ok(best.0)
}
