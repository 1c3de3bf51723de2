//! Rejects files: every bad CSV row and every bad callback record, with where it came from and why.
//!
//! A file is created only when the first reject arrives, so a clean run leaves no empty rejects file.
//! Raw values are cut to [`MAX_RAW_CHARS`] characters so a 100 MB garbage line cannot flood the file.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::WriteError;

/// Longest raw value kept in a rejects file; longer ones are cut and marked with their full length.
pub const MAX_RAW_CHARS: usize = 200;

/// Rejected ICCID list rows, as CSV: `file,line,raw_value,reason`.
#[derive(Debug)]
pub struct IccidRejects {
    path: PathBuf,
    out: Option<csv::Writer<File>>,
    count: u64,
    /// `(raw value as written, reason)` of each, for the run's completeness.
    rows: Vec<(String, String)>,
}

impl IccidRejects {
    pub fn new(path: PathBuf) -> Self {
        IccidRejects {
            path,
            out: None,
            count: 0,
            rows: Vec::new(),
        }
    }

    pub fn push(
        &mut self,
        file: &Path,
        line: u64,
        raw: &str,
        reason: &str,
    ) -> Result<(), WriteError> {
        let out = match &mut self.out {
            Some(out) => out,
            None => {
                let mut out = csv::Writer::from_writer(create(&self.path)?);
                out.write_record(["file", "line", "raw_value", "reason"])
                    .map_err(|e| WriteError::csv(&self.path, e))?;
                self.out.insert(out)
            }
        };
        let line = line.to_string();
        let file = file.display().to_string();
        let raw = shorten(raw);
        out.write_record([file.as_str(), line.as_str(), raw.as_str(), reason])
            .map_err(|e| WriteError::csv(&self.path, e))?;
        self.count += 1;
        self.rows.push((raw, reason.to_owned()));
        Ok(())
    }

    /// The rejected rows so far: `(raw value as written, reason)`.
    pub fn rows(&self) -> &[(String, String)] {
        &self.rows
    }

    /// Flushes and syncs; returns the file's path if anything was rejected.
    pub fn finish(self) -> Result<Option<PathBuf>, WriteError> {
        let file = self
            .out
            .map(|out| out.into_inner().map_err(|e| e.into_error()));
        synced(self.path, file)
    }
}

/// One rejected callback record or body, a JSON line in the callbacks rejects file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RecordReject {
    /// Where it came from: `path/to/file.ndjson:12`, `file.json[3]`, or `listener`.
    pub source: String,
    /// The callback's requestId, when it could be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Index of the record in `devicePromoUsageResponse`, for record-level rejects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iccid: Option<String>,
    /// The field that failed, e.g. `dataUsage`; absent when the whole body was rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The offending value as received (cut to [`MAX_RAW_CHARS`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
    /// Stable code for counting, e.g. `value_signed`.
    pub code: String,
    /// What is wrong, for a person.
    pub reason: String,
}

/// Rejected callback records and bodies, as JSON lines.
#[derive(Debug)]
pub struct RecordRejects {
    path: PathBuf,
    out: Option<BufWriter<File>>,
    count: u64,
}

impl RecordRejects {
    pub fn new(path: PathBuf) -> Self {
        RecordRejects {
            path,
            out: None,
            count: 0,
        }
    }

    pub fn push(&mut self, reject: &RecordReject) -> Result<(), WriteError> {
        let out = match &mut self.out {
            Some(out) => out,
            None => self.out.insert(BufWriter::new(create(&self.path)?)),
        };
        let mut reject = reject.clone();
        reject.raw = reject.raw.as_deref().map(shorten);
        serde_json::to_writer(&mut *out, &reject)
            .map_err(|e| WriteError::io(&self.path, e.into()))?;
        out.write_all(b"\n")
            .map_err(|e| WriteError::io(&self.path, e))?;
        self.count += 1;
        Ok(())
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Flushes and syncs; returns the file's path if anything was rejected.
    pub fn finish(self) -> Result<Option<PathBuf>, WriteError> {
        let file = self
            .out
            .map(|out| out.into_inner().map_err(|e| e.into_error()));
        synced(self.path, file)
    }
}

fn create(path: &Path) -> Result<File, WriteError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| WriteError::io(dir, e))?;
    }
    File::create(path).map_err(|e| WriteError::io(path, e))
}

/// Cuts `raw` to [`MAX_RAW_CHARS`] characters, saying how long it was.
pub fn shorten(raw: &str) -> String {
    match raw.char_indices().nth(MAX_RAW_CHARS) {
        None => raw.to_owned(),
        Some((cut, _)) => format!("{}… ({} bytes in all)", &raw[..cut], raw.len()),
    }
}

/// The path of a rejects file once `file` (closed from its writer; `None` when nothing was
/// rejected) is on disk.
fn synced(
    path: PathBuf,
    file: Option<Result<File, std::io::Error>>,
) -> Result<Option<PathBuf>, WriteError> {
    let Some(file) = file else {
        return Ok(None);
    };
    let file = file.map_err(|e| WriteError::io(&path, e))?;
    file.sync_all().map_err(|e| WriteError::io(&path, e))?;
    Ok(Some(path))
}
