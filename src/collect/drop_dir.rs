//! Collecting callbacks from a drop directory: `*.json` (one callback or an array of them) and
//! `*.ndjson` / `*.jsonl` (one per line).
//!
//! Each file's callbacks are journaled durably before the file moves to `DIR/processed/` (or
//! `DIR/rejected/` when nothing in it is a callback), so a crash between the two only means the file
//! is read again, and the journal, keyed by content, adds nothing twice. Symlinks are never followed;
//! FIFOs, sockets, directories, dotfiles and `*.tmp` / `*.part` uploads are left alone.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::value::RawValue;

use super::{Intake, Prepared, now_micros};
use crate::state::Store;
use crate::write::rejects::{RecordReject, RecordRejects};
use crate::write::sync_dir;
use crate::{Error, Result};

/// Files whose callbacks are journaled before the batch is committed and the files moved.
const BATCH_FILES: usize = 512;
/// Body bytes journaled per commit at most (a bigger single file is still one commit).
const BATCH_BYTES: usize = 16 * 1024 * 1024;

/// Where processed and rejected files go, inside the drop directory.
pub const PROCESSED_DIR: &str = "processed";
pub const REJECTED_DIR: &str = "rejected";

/// How to treat the drop directory.
#[derive(Debug, Clone, Copy)]
pub struct DropDirOptions {
    /// Leave files where they are (an archive, a read-only directory). Re-reading them is harmless.
    pub keep_files: bool,
    /// Files larger than this are skipped and reported.
    pub max_file_bytes: u64,
}

/// File counts for the run report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DropDirStats {
    /// Candidate files read (`*.json`, `*.ndjson`, `*.jsonl`).
    pub files: u64,
    /// Files with at least one callback, moved to `processed/` (or kept).
    pub processed: u64,
    /// Files with no callback in them, moved to `rejected/` (or kept).
    pub rejected: u64,
    /// Files over `callbacks.max_file_bytes`, left in place.
    pub too_large: u64,
    /// Entries not read: symlinks, FIFOs and other non-regular files, dotfiles, `*.tmp`, `*.part`,
    /// other extensions.
    pub skipped: u64,
}

enum Format {
    Json,
    Lines,
}

/// Reads every callback file in `dir` once, journaling what it finds through `intake`.
pub fn collect<S: Store + ?Sized>(
    dir: &Path,
    options: DropDirOptions,
    intake: &mut Intake,
    store: &mut S,
    rejects: &mut RecordRejects,
    progress: &indicatif::ProgressBar,
) -> Result<DropDirStats> {
    let mut stats = DropDirStats::default();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        names.push(entry.file_name());
    }
    names.sort();
    progress.set_length(names.len() as u64);

    let mut batch: Vec<Prepared> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut moves: Vec<(PathBuf, &'static str)> = Vec::new();
    let mut record_rejects = Vec::new();
    for name in names {
        progress.inc(1);
        let path = dir.join(&name);
        let Some(format) = candidate(&path, &name, &mut stats)? else {
            continue;
        };
        stats.files += 1;
        let bytes = match read_regular(&path, options.max_file_bytes) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                stats.too_large += 1;
                tracing::warn!(file = %path.display(), limit = options.max_file_bytes, "file over callbacks.max_file_bytes left in place");
                rejects.push(&file_reject(
                    &path,
                    "file_too_large",
                    format!(
                        "larger than callbacks.max_file_bytes ({} bytes); left in place",
                        options.max_file_bytes
                    ),
                ))?;
                continue;
            }
            Err(e) => {
                stats.skipped += 1;
                tracing::warn!(file = %path.display(), error = %e, "file not read");
                continue;
            }
        };
        let before = batch.len();
        let bodies_rejected = split_and_prepare(
            &path,
            &bytes,
            format,
            intake,
            &mut batch,
            &mut record_rejects,
        );
        for reject in record_rejects.drain(..).chain(bodies_rejected) {
            rejects.push(&reject)?;
        }
        let good = batch.len() - before;
        batch_bytes += batch[before..].iter().map(|p| p.body.len()).sum::<usize>();
        if good > 0 {
            stats.processed += 1;
            moves.push((path, PROCESSED_DIR));
        } else {
            stats.rejected += 1;
            moves.push((path, REJECTED_DIR));
        }
        if moves.len() >= BATCH_FILES || batch_bytes >= BATCH_BYTES {
            flush(dir, options, intake, store, &mut batch, &mut moves)?;
            batch_bytes = 0;
        }
    }
    flush(dir, options, intake, store, &mut batch, &mut moves)?;
    Ok(stats)
}

/// Journals the batch (durably), then moves its files out of the way.
fn flush<S: Store + ?Sized>(
    dir: &Path,
    options: DropDirOptions,
    intake: &mut Intake,
    store: &mut S,
    batch: &mut Vec<Prepared>,
    moves: &mut Vec<(PathBuf, &'static str)>,
) -> Result<()> {
    intake.commit(store, batch, now_micros())?;
    batch.clear();
    if options.keep_files {
        moves.clear();
        return Ok(());
    }
    let mut touched = std::collections::BTreeSet::new();
    for (path, sub) in moves.drain(..) {
        let target_dir = dir.join(sub);
        std::fs::create_dir_all(&target_dir).map_err(|e| Error::io(&target_dir, e))?;
        let target = free_name(&target_dir, &path);
        std::fs::rename(&path, &target).map_err(|e| Error::io(&path, e))?;
        touched.insert(target_dir);
    }
    if !touched.is_empty() {
        sync_dir(dir)?;
        for d in touched {
            sync_dir(&d)?;
        }
    }
    Ok(())
}

/// Decides whether an entry is a callback file to read.
fn candidate(
    path: &Path,
    name: &std::ffi::OsStr,
    stats: &mut DropDirStats,
) -> Result<Option<Format>> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Ok(None); // processed/, rejected/ and anything else: not ours to read
    }
    let name = name.to_string_lossy();
    let skip = |why: &str, stats: &mut DropDirStats| {
        stats.skipped += 1;
        tracing::info!(file = %path.display(), "skipped: {why}");
        Ok(None)
    };
    if meta.file_type().is_symlink() {
        return skip("a symlink (never followed)", stats);
    }
    if !meta.is_file() {
        return skip("not a regular file", stats);
    }
    if name.starts_with('.') || name.ends_with(".tmp") || name.ends_with(".part") {
        return skip("an unfinished upload", stats);
    }
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".json") {
        Ok(Some(Format::Json))
    } else if lower.ends_with(".ndjson") || lower.ends_with(".jsonl") {
        Ok(Some(Format::Lines))
    } else {
        skip("not .json, .ndjson or .jsonl", stats)
    }
}

/// Reads a regular file without following symlinks; `None` when it is over `limit` bytes.
fn read_regular(path: &Path, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if meta.len() > limit {
        return Ok(None);
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Ok(None);
    }
    Ok(Some(bytes))
}

/// Splits a file into bodies and prepares each; returns the whole-file or whole-line rejects.
fn split_and_prepare(
    path: &Path,
    bytes: &[u8],
    format: Format,
    intake: &mut Intake,
    batch: &mut Vec<Prepared>,
    record_rejects: &mut Vec<RecordReject>,
) -> Vec<RecordReject> {
    let shown = path.display();
    let mut body_rejects = Vec::new();
    let mut take = |body: &str, source: String, body_rejects: &mut Vec<RecordReject>| match intake
        .prepare(body, source, record_rejects)
    {
        Ok(p) => batch.push(p),
        Err(r) => body_rejects.push(*r),
    };
    match format {
        Format::Lines => {
            let mut bodies = 0usize;
            for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
                let source = format!("{shown}:{}", i + 1);
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                bodies += 1;
                match std::str::from_utf8(line) {
                    Ok(text) => take(text, source, &mut body_rejects),
                    Err(e) => body_rejects.push(text_reject(
                        source,
                        "body_not_utf8",
                        format!("not UTF-8: {e}"),
                    )),
                }
            }
            if bodies == 0 {
                body_rejects.push(file_reject(
                    path,
                    "file_empty",
                    "no callbacks in the file".into(),
                ));
            }
        }
        Format::Json => {
            let text = match std::str::from_utf8(bytes) {
                Ok(text) => text.trim_start_matches('\u{feff}'),
                Err(e) => {
                    body_rejects.push(file_reject(
                        path,
                        "body_not_utf8",
                        format!("not UTF-8: {e}"),
                    ));
                    return body_rejects;
                }
            };
            let trimmed = text.trim_start();
            if trimmed.is_empty() {
                body_rejects.push(file_reject(path, "file_empty", "the file is empty".into()));
            } else if trimmed.starts_with('[') {
                match serde_json::from_str::<Vec<&RawValue>>(text) {
                    Ok(items) if items.is_empty() => {
                        body_rejects.push(file_reject(
                            path,
                            "file_empty",
                            "an empty JSON array".into(),
                        ));
                    }
                    Ok(items) => {
                        for (i, item) in items.iter().enumerate() {
                            take(item.get(), format!("{shown}[{i}]"), &mut body_rejects);
                        }
                    }
                    Err(e) => body_rejects.push(file_reject(
                        path,
                        "body_not_json",
                        format!("not valid JSON: {e}"),
                    )),
                }
            } else {
                take(text, shown.to_string(), &mut body_rejects);
            }
        }
    }
    body_rejects
}

fn file_reject(path: &Path, code: &str, reason: String) -> RecordReject {
    text_reject(path.display().to_string(), code, reason)
}

fn text_reject(source: String, code: &str, reason: String) -> RecordReject {
    RecordReject {
        source,
        request_id: None,
        record: None,
        iccid: None,
        field: None,
        raw: None,
        code: code.to_owned(),
        reason,
    }
}

/// `dir/name`, or `dir/stem-1.ext`, `dir/stem-2.ext`, ... when taken.
fn free_name(dir: &Path, path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let first = dir.join(&name);
    if !first.exists() {
        return first;
    }
    let (stem, ext) = match name.rsplit_once('.') {
        Some((stem, ext)) => (stem.to_owned(), format!(".{ext}")),
        None => (name.clone(), String::new()),
    };
    (1u64..)
        .map(|n| dir.join(format!("{stem}-{n}{ext}")))
        .find(|p| !p.exists())
        .unwrap_or(first)
}
