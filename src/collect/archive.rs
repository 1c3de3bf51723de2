//! The journal's cold archive: callbacks moved out of the state store by a prune, as
//! zstd-compressed NDJSON under `output.dir/archive/YYYY-MM/` (the month of the usage they hold,
//! or of their receipt for completion and fault messages).
//!
//! One line per callback: `{"id","received_at","request_id","kind","source","account_name",
//! "partitions","body"}`, `body` being the callback as journaled (credentials already removed), in
//! journal order. `zstd -dc FILE | jq` reads it; `tsusage ingest DIR` journals it back with its
//! original receipt time, so that a rebuild from the archive gives the same Parquet; a partition
//! asked for again after its callbacks were archived is rebuilt from its archive and its journal.
//!
//! A file is written to a temporary name, fsynced and renamed before the store records it; a file
//! the store does not record is a prune that did not commit, and the next prune removes it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{CollectError, Result};
use super::{Intake, Prepared, now_micros};
use crate::normalize::collapse::RowSet;
use crate::output::rejects::RecordRejects;
use crate::output::sync_dir;
use crate::state::{ArchiveFile, ArchivedCallback, Store};

/// What journaling archive files back did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RestoreReport {
    pub files: u64,
    pub callbacks: u64,
    /// Newly journaled (the others were still in the journal).
    pub journaled: u64,
    pub already_journaled: u64,
}

/// The archive's directory below `output.dir`.
pub const ARCHIVE_DIR: &str = "archive";
/// How archive files end.
pub const EXTENSION: &str = ".ndjson.zst";
/// zstd level of archive files: the nightly prune runs inside `run`, so the fast default level (a
/// night's callbacks compress ~10x at it; level 9 took ~0.5 s and ~15 MB more per night).
const ZSTD_LEVEL: i32 = 3;

/// One line of an archive file.
#[derive(Serialize, Deserialize)]
struct Line<'a> {
    id: i64,
    received_at: i64,
    request_id: &'a str,
    kind: &'a str,
    source: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    account_name: Option<&'a str>,
    partitions: Vec<&'a str>,
    #[serde(borrow)]
    body: &'a RawValue,
}

/// The archive directory of `out_dir`.
pub fn archive_dir(out_dir: &Path) -> PathBuf {
    out_dir.join(ARCHIVE_DIR)
}

/// The month an archived callback is filed under: its first partition's (`usage_date=2021-09-01`
/// and `usage_month=2021-09` both give `2021-09`), else its receipt's.
fn month_of(cb: &ArchivedCallback) -> String {
    let from_partition = cb
        .partitions
        .first()
        .and_then(|p| p.split_once('='))
        .map(|(_, value)| value.get(..7).unwrap_or(value).to_owned());
    from_partition.unwrap_or_else(|| {
        chrono::DateTime::from_timestamp_micros(cb.received_at)
            .unwrap_or_default()
            .format("%Y-%m")
            .to_string()
    })
}

struct OpenFile {
    tmp: PathBuf,
    encoder: zstd::Encoder<'static, BufWriter<File>>,
    meta: ArchiveFile,
}

/// Writes the archive files of one prune, one per month.
pub struct ArchiveWriter {
    root: PathBuf,
    open: BTreeMap<String, OpenFile>,
}

impl std::fmt::Debug for ArchiveWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveWriter")
            .field("root", &self.root)
            .field("months", &self.open.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ArchiveWriter {
    pub fn new(out_dir: &Path) -> Self {
        ArchiveWriter {
            root: archive_dir(out_dir),
            open: BTreeMap::new(),
        }
    }

    /// Appends `cb` to its month's file (callbacks come oldest received first).
    pub fn add(&mut self, cb: &ArchivedCallback) -> Result<()> {
        let month = month_of(cb);
        if !self.open.contains_key(&month) {
            let dir = self.root.join(&month);
            std::fs::create_dir_all(&dir).map_err(|e| CollectError::io(&dir, e))?;
            let tmp = dir.join(format!(".journal-{}.tmp", std::process::id()));
            let file = File::create(&tmp).map_err(|e| CollectError::io(&tmp, e))?;
            let encoder = zstd::Encoder::new(BufWriter::new(file), ZSTD_LEVEL)
                .map_err(|e| CollectError::io(&tmp, e))?;
            let meta = ArchiveFile {
                file: String::new(),
                callbacks: 0,
                first_id: cb.id,
                last_id: cb.id,
                bytes: 0,
                partitions: BTreeMap::new(),
            };
            self.open
                .insert(month.clone(), OpenFile { tmp, encoder, meta });
        }
        let Some(open) = self.open.get_mut(&month) else {
            return Ok(());
        };
        let body = RawValue::from_string(cb.body.clone()).map_err(|e| {
            CollectError::io(
                &open.tmp,
                std::io::Error::other(format!("callback {} is not JSON: {e}", cb.id)),
            )
        })?;
        let line = Line {
            id: cb.id,
            received_at: cb.received_at,
            request_id: &cb.request_id,
            kind: &cb.kind,
            source: &cb.source,
            account_name: cb.account_name.as_deref(),
            partitions: cb.partitions.iter().map(String::as_str).collect(),
            body: &body,
        };
        let write = |encoder: &mut zstd::Encoder<'static, BufWriter<File>>| {
            serde_json::to_writer(&mut *encoder, &line).map_err(std::io::Error::other)?;
            encoder.write_all(b"\n")
        };
        write(&mut open.encoder).map_err(|e| CollectError::io(&open.tmp, e))?;
        let meta = &mut open.meta;
        meta.callbacks += 1;
        meta.first_id = meta.first_id.min(cb.id);
        meta.last_id = meta.last_id.max(cb.id);
        for p in &cb.partitions {
            *meta.partitions.entry(p.clone()).or_default() += 1;
        }
        Ok(())
    }

    /// Finishes every file: compressed, fsynced, renamed to its final name, directory fsynced.
    pub fn finish(self) -> Result<Vec<ArchiveFile>> {
        let mut files = Vec::with_capacity(self.open.len());
        for (month, open) in self.open {
            let OpenFile {
                tmp,
                encoder,
                mut meta,
            } = open;
            let writer = encoder.finish().map_err(|e| CollectError::io(&tmp, e))?;
            let file = writer
                .into_inner()
                .map_err(|e| CollectError::io(&tmp, e.into_error()))?;
            file.sync_all().map_err(|e| CollectError::io(&tmp, e))?;
            meta.bytes = file
                .metadata()
                .map_err(|e| CollectError::io(&tmp, e))?
                .len();
            let name = format!(
                "journal-{:012}-{:012}{EXTENSION}",
                meta.first_id, meta.last_id
            );
            let dir = self.root.join(&month);
            let path = dir.join(&name);
            std::fs::rename(&tmp, &path).map_err(|e| CollectError::io(&path, e))?;
            sync_dir(&dir)?;
            meta.file = format!("{month}/{name}");
            files.push(meta);
        }
        if !files.is_empty() {
            sync_dir(&self.root)?;
        }
        Ok(files)
    }
}

/// Removes what an interrupted prune left: temporary files, and archive files the store does not
/// record (their callbacks are still in the journal). Returns how many files were removed.
pub fn clean_orphans(out_dir: &Path, recorded: &BTreeSet<String>) -> Result<u64> {
    let root = archive_dir(out_dir);
    let mut removed = 0;
    for path in files_in(&root, true, &[], |_| true)? {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let relative = path
            .strip_prefix(&root)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temporary = name.as_deref().is_some_and(|n| n.ends_with(".tmp"));
        let unrecorded = relative.ends_with(EXTENSION) && !recorded.contains(&relative);
        if temporary || unrecorded {
            tracing::info!(file = %path.display(), "removing what an interrupted prune left");
            std::fs::remove_file(&path).map_err(|e| CollectError::io(&path, e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Archive files under `dir` (and its month directories), sorted by path. A drop directory's
/// `processed/` and `rejected/` are not looked into: archive files are never moved there, and
/// `processed/` grows by every file ever ingested (listing it made each ingest slower than the
/// last).
pub fn archive_files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let skip = [
        super::drop_dir::PROCESSED_DIR,
        super::drop_dir::REJECTED_DIR,
    ];
    files_in(dir, false, &skip, |name| {
        name.as_encoded_bytes().ends_with(EXTENSION.as_bytes())
    })
}

/// Regular files under `dir`, one level of subdirectories deep (but for those named in `skip`),
/// whose names `wanted` takes, sorted; with `dotfiles`, hidden ones too.
fn files_in(
    dir: &Path,
    dotfiles: bool,
    skip: &[&str],
    wanted: impl Fn(&std::ffi::OsStr) -> bool,
) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let visit = |dir: &Path, out: &mut Vec<PathBuf>, subdirs: &mut Vec<PathBuf>| -> Result<()> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(CollectError::io(dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| CollectError::io(dir, e))?;
            let kind = entry
                .file_type()
                .map_err(|e| CollectError::io(entry.path(), e))?;
            let name = entry.file_name();
            let hidden = name.as_encoded_bytes().starts_with(b".");
            if kind.is_dir() && !hidden {
                if !skip.iter().any(|s| name == *s) {
                    subdirs.push(entry.path());
                }
            } else if kind.is_file() && (dotfiles || !hidden) && wanted(&name) {
                out.push(entry.path());
            }
        }
        Ok(())
    };
    let mut subdirs = Vec::new();
    visit(dir, &mut out, &mut subdirs)?;
    for sub in subdirs {
        visit(&sub, &mut out, &mut Vec::new())?;
    }
    out.sort();
    Ok(out)
}

/// Reads an archive file, calling `each` per callback in file order. A line that cannot be read
/// stops it with an error naming the file and line: archives are written by tsusage, so a bad
/// line is damage, not input to skip.
pub fn read(path: &Path, each: &mut dyn FnMut(ArchivedCallback) -> Result<()>) -> Result<()> {
    let file = File::open(path).map_err(|e| CollectError::io(path, e))?;
    let decoder = zstd::Decoder::new(file).map_err(|e| CollectError::io(path, e))?;
    let mut reader = BufReader::new(decoder);
    let mut text = String::new();
    let mut number = 0u64;
    loop {
        text.clear();
        number += 1;
        if reader
            .read_line(&mut text)
            .map_err(|e| CollectError::io(path, e))?
            == 0
        {
            return Ok(());
        }
        if text.trim().is_empty() {
            continue;
        }
        let line: Line<'_> = serde_json::from_str(&text).map_err(|e| {
            CollectError::io(
                path,
                std::io::Error::other(format!("line {number}: not an archive line: {e}")),
            )
        })?;
        each(ArchivedCallback {
            id: line.id,
            request_id: line.request_id.to_owned(),
            kind: line.kind.to_owned(),
            received_at: line.received_at,
            source: line.source.to_owned(),
            account_name: line.account_name.map(str::to_owned),
            partitions: line.partitions.iter().map(|p| (*p).to_owned()).collect(),
            body: line.body.get().to_owned(),
        })?;
    }
}

/// Callbacks journaled back per commit.
const RESTORE_BATCH: usize = 4096;

/// Journals the callbacks of archive `files` back through `intake`, each with its original receipt
/// time (so that a rebuild gives the same Parquet); with `rows`, their records are kept for the
/// write. Callbacks still in the journal are recognized by content and added once.
pub fn restore<S: Store + ?Sized>(
    files: &[PathBuf],
    intake: &mut Intake,
    store: &mut S,
    rejects: &mut RecordRejects,
    mut rows: Option<&mut RowSet>,
) -> Result<RestoreReport> {
    let mut report = RestoreReport::default();
    let before = (
        intake.callbacks.journaled,
        intake.callbacks.already_journaled,
    );
    let mut batch: Vec<Prepared> = Vec::with_capacity(RESTORE_BATCH);
    let mut record_rejects = Vec::new();
    for path in files {
        report.files += 1;
        read(path, &mut |cb| {
            report.callbacks += 1;
            let source = format!("{} (archived from {})", path.display(), cb.source);
            match intake.prepare(&cb.body, source, &mut record_rejects) {
                Ok(mut prepared) => {
                    prepared.received_at = Some(cb.received_at);
                    batch.push(prepared);
                }
                Err(reject) => record_rejects.push(*reject),
            }
            for reject in record_rejects.drain(..) {
                rejects.push(&reject)?;
            }
            if batch.len() >= RESTORE_BATCH {
                intake.commit(store, &batch, now_micros(), rows.as_deref_mut())?;
                batch.clear();
            }
            Ok(())
        })?;
    }
    intake.commit(store, &batch, now_micros(), rows)?;
    report.journaled = intake.callbacks.journaled - before.0;
    report.already_journaled = intake.callbacks.already_journaled - before.1;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Archive files are found at the top and in month directories, never in a drop directory's
    /// `processed/` or `rejected/` (which only grow) nor among hidden or other files.
    #[test]
    fn archive_files_are_looked_for_where_they_can_be() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        for sub in ["2021-08", "processed", "rejected"] {
            std::fs::create_dir(root.join(sub)).expect("mkdir");
        }
        for file in [
            "2021-07.ndjson.zst",
            "2021-08/2021-08-15.ndjson.zst",
            "processed/2021-06.ndjson.zst",
            "rejected/2021-05.ndjson.zst",
            ".2021-04.ndjson.zst",
            "usage-000001.json",
            "2021-08/notes.txt",
        ] {
            std::fs::write(root.join(file), "x").expect("write");
        }
        let found = archive_files_under(root).expect("listing");
        let relative: Vec<String> = found
            .iter()
            .map(|p| {
                p.strip_prefix(root)
                    .expect("under root")
                    .display()
                    .to_string()
            })
            .collect();
        assert_eq!(
            relative,
            ["2021-07.ndjson.zst", "2021-08/2021-08-15.ndjson.zst"]
        );
    }

    fn callback(id: i64, partition: Option<&str>) -> ArchivedCallback {
        ArchivedCallback {
            id,
            request_id: format!("r{id}"),
            kind: if partition.is_some() {
                "usage"
            } else {
                "completion"
            }
            .into(),
            received_at: 1_630_454_400_000_000 + id,
            source: "listener".into(),
            account_name: Some("0000123456-00001".into()),
            partitions: partition.map(str::to_owned).into_iter().collect(),
            body: format!(r#"{{"requestId":"r{id}","deviceResponse":{{}}}}"#),
        }
    }

    #[test]
    fn archive_files_read_back_exactly_and_unrecorded_ones_are_orphans() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut writer = ArchiveWriter::new(dir.path());
        let written = [
            callback(3, Some("usage_date=2021-09-01")),
            callback(5, Some("usage_date=2021-10-01")),
            callback(7, None),
            callback(9, Some("usage_date=2021-09-02")),
        ];
        for cb in &written {
            writer.add(cb).expect("add");
        }
        let files = writer.finish().expect("finish");
        let names: Vec<&str> = files.iter().map(|f| f.file.as_str()).collect();
        assert_eq!(
            names,
            [
                "2021-09/journal-000000000003-000000000009.ndjson.zst",
                "2021-10/journal-000000000005-000000000005.ndjson.zst",
            ],
            "the completion received in 2021-09 is filed with September"
        );
        assert_eq!(files[0].callbacks, 3);
        assert_eq!(files[0].partitions.len(), 2);

        let mut back = Vec::new();
        for path in archive_files_under(&archive_dir(dir.path())).expect("list") {
            read(&path, &mut |cb| {
                back.push(cb);
                Ok(())
            })
            .expect("read");
        }
        back.sort_by_key(|cb| cb.id);
        assert_eq!(back, written);

        // Only the first is recorded: the second is what a prune that did not commit left.
        let recorded: BTreeSet<String> = [files[0].file.clone()].into();
        std::fs::write(archive_dir(dir.path()).join("2021-09/.journal-1.tmp"), "x").expect("tmp");
        assert_eq!(clean_orphans(dir.path(), &recorded).expect("clean"), 2);
        let left = archive_files_under(&archive_dir(dir.path())).expect("list");
        assert_eq!(left.len(), 1);
        assert!(left[0].ends_with(&files[0].file));
    }
}
