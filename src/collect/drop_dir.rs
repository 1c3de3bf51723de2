//! Collecting callbacks from a drop directory: `*.json` (one callback or an array of them) and
//! `*.ndjson` / `*.jsonl` (one per line).
//!
//! Each file's callbacks are journaled durably before the file moves to `DIR/processed/` (or
//! `DIR/rejected/` when nothing in it is a callback), so a crash between the two only means the file
//! is read again, and the journal, keyed by content, adds nothing twice. Symlinks are never followed;
//! FIFOs, sockets, directories, dotfiles and `*.tmp` / `*.part` uploads are left alone.

use std::ffi::CString;
use std::fs::File;
use std::io::Read as _;
use std::os::fd::{AsRawFd as _, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use serde::Serialize;
use serde_json::value::RawValue;

use super::{CollectError, Result};
use super::{Intake, Prepared, now_micros};
use crate::config::JournalCompression;
use crate::normalize::collapse::RowSet;
use crate::output::rejects::{RecordReject, RecordRejects};
use crate::state::{Frames, Store};

/// Files whose callbacks are journaled before the batch is committed and the files moved.
const BATCH_FILES: usize = 4096;
/// Body bytes (as text) journaled per commit at most; a large NDJSON file is committed in parts.
/// One batch commits while the next is gathered: 8 MiB each holds as much in memory as one batch
/// of 16 MiB did before the commit had its own thread, and measured as fast as 16 MiB (4 MiB: a
/// commit's fixed costs begin to show on the 20,000 files).
const BATCH_BYTES: usize = 8 * 1024 * 1024;

/// A batch for the committing thread: its callbacks, and the files to move once they are committed.
type Batch = (Vec<Prepared>, Vec<(PathBuf, &'static str)>);

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
    /// The parsing threads compress the bodies into segment frames of this kind (see
    /// [`super::pack`]): for a SQLite store whose `state.journal_compression` compresses, which
    /// appends them as they are.
    pub pack_frames: Option<JournalCompression>,
}

impl DropDirOptions {
    /// The options `config` asks for, files moved once journaled.
    pub fn new(config: &crate::config::Config) -> Self {
        DropDirOptions {
            keep_files: false,
            max_file_bytes: config.callbacks.max_file_bytes,
            pack_frames: (config.state.url.is_none()
                && config.state.journal_compression != JournalCompression::None)
                .then_some(config.state.journal_compression),
        }
    }
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

impl std::ops::AddAssign for DropDirStats {
    fn add_assign(&mut self, other: DropDirStats) {
        // Destructured without `..`: a new counter does not compile until it is added here.
        let DropDirStats {
            files,
            processed,
            rejected,
            too_large,
            skipped,
        } = other;
        self.files += files;
        self.processed += processed;
        self.rejected += rejected;
        self.too_large += too_large;
        self.skipped += skipped;
    }
}

enum Format {
    Json,
    Lines,
}

/// Reads every callback file in `dir` once, journaling what it finds through `intake`. With `rows`,
/// the records of newly journaled callbacks are added to it.
///
/// Files are read and parsed on every core (workers get the work in turns, and their results are
/// taken in the same turns, so callbacks are journaled in file-name order whatever the timing); the
/// calling thread gathers them in batches, which a committing thread journals in order while the
/// next is gathered, and each file moves once all its callbacks are committed.
/// Large NDJSON files are read in slices, so memory does not grow with file size.
#[allow(clippy::too_many_arguments)]
pub fn collect<S: Store + Send + ?Sized>(
    dir: &Path,
    options: DropDirOptions,
    intake: &mut Intake,
    store: &mut S,
    rejects: &mut RecordRejects,
    progress: &indicatif::ProgressBar,
    mut rows: Option<&mut RowSet>,
) -> Result<DropDirStats> {
    let mut stats = DropDirStats::default();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| CollectError::io(dir, e))? {
        let entry = entry.map_err(|e| CollectError::io(dir, e))?;
        // The entry's type comes with the listing (no stat per file); a symlink is a symlink here.
        let kind = entry
            .file_type()
            .map_err(|e| CollectError::io(entry.path(), e))?;
        names.push((entry.file_name(), kind));
    }
    names.sort_by(|a, b| a.0.cmp(&b.0));
    progress.set_length(names.len() as u64);
    let mut files = Vec::new();
    for (name, kind) in names {
        let path = dir.join(&name);
        match candidate(&path, &name, kind, &mut stats)? {
            Some(format) => files.push((path, format)),
            None => progress.inc(1),
        }
    }
    stats.files = files.len() as u64;

    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let limit = options.max_file_bytes;
    std::thread::scope(|scope| -> Result<DropDirStats> {
        // NDJSON slice buffers go back to the dispatcher once parsed: a few buffers, reused.
        let (spare_tx, spare_rx) = mpsc::channel::<Vec<u8>>();
        let mut inputs = Vec::with_capacity(workers);
        let mut outputs = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (unit_tx, unit_rx) = mpsc::sync_channel::<Unit>(2);
            let (out_tx, out_rx) = mpsc::sync_channel::<Vec<FileOut>>(2);
            let mut worker = intake.worker();
            let spare_tx = spare_tx.clone();
            let mut frames = options
                .pack_frames
                .and_then(|compression| Frames::new(compression).ok());
            handles.push(scope.spawn(move || {
                for unit in unit_rx {
                    let (mut out, spare) = unit.prepare(&mut worker, limit);
                    if let Some(frames) = frames.as_mut() {
                        super::pack(
                            frames,
                            out.iter_mut().flat_map(|o| &mut o.prepared).collect(),
                        );
                    }
                    if let Some(buffer) = spare {
                        let _ = spare_tx.send(buffer);
                    }
                    if out_tx.send(out).is_err() {
                        break;
                    }
                }
                worker
            }));
            inputs.push(unit_tx);
            outputs.push(out_rx);
        }
        drop(spare_tx);
        scope.spawn(move || dispatch(files, limit, &inputs, &spare_rx));

        // Files move out of the way on their own thread once their callbacks are committed (a crash
        // before a move only means the file is read again, adding nothing to the journal).
        let (mover, to_move) = mpsc::channel::<Vec<(PathBuf, &'static str)>>();
        let moved = scope.spawn(move || -> Result<()> {
            for files in to_move {
                move_files(dir, files)?;
            }
            Ok(())
        });
        // Batches commit on their own thread, in order, while this one gathers the next: the
        // parsing threads go on while a batch is journaled (with the commit on this thread, they
        // stood still once their few results waited). At most one batch waits for the commit.
        let (to_commit, batches) = mpsc::sync_channel::<Batch>(0);
        let committer = scope.spawn(move || -> Result<&mut Intake> {
            for (batch, moves) in batches {
                intake.commit(store, &batch, now_micros(), rows.as_deref_mut())?;
                drop(batch);
                if !options.keep_files && !moves.is_empty() {
                    // The mover only stops early on an error, which `collect` gets when it joins it.
                    let _ = mover.send(moves);
                }
            }
            Ok(intake)
        });
        let mut batch: Vec<Prepared> = Vec::new();
        let mut batch_bytes = 0usize;
        let mut moves: Vec<(PathBuf, &'static str)> = Vec::new();
        // Good callbacks and NDJSON bodies so far in the file being read (it may come in slices).
        let (mut open_good, mut open_bodies) = (0u64, 0usize);
        'units: for turn in 0usize.. {
            let Ok(outs) = outputs[turn % workers].recv() else {
                break 'units; // the dispatcher is done
            };
            for out in outs {
                for reject in &out.rejects {
                    rejects.push(reject)?;
                }
                let FileOut {
                    path,
                    prepared,
                    read,
                    last,
                    lines,
                    bodies,
                    ..
                } = out;
                open_good += prepared.len() as u64;
                open_bodies += bodies;
                batch_bytes += prepared.iter().map(|p| p.body.len()).sum::<usize>();
                batch.extend(prepared);
                match read {
                    Read::Done => {}
                    Read::TooLarge => {
                        stats.too_large += 1;
                        tracing::warn!(file = %path.display(), limit, "file over callbacks.max_file_bytes left in place");
                    }
                    Read::Failed => stats.skipped += 1,
                }
                if !last {
                    continue;
                }
                progress.inc(1);
                if lines && open_bodies == 0 && matches!(read, Read::Done) {
                    rejects.push(&file_reject(
                        &path,
                        "file_empty",
                        "no callbacks in the file".into(),
                    ))?;
                }
                if matches!(read, Read::Done) {
                    if open_good > 0 {
                        stats.processed += 1;
                        moves.push((path, PROCESSED_DIR));
                    } else {
                        stats.rejected += 1;
                        moves.push((path, REJECTED_DIR));
                    }
                }
                (open_good, open_bodies) = (0, 0);
            }
            // Checked once per unit (at most 32 files or one slice). A large NDJSON file is
            // committed in parts; it stays put until its last slice is committed.
            if moves.len() >= BATCH_FILES || batch_bytes >= BATCH_BYTES {
                let full = (std::mem::take(&mut batch), std::mem::take(&mut moves));
                if to_commit.send(full).is_err() {
                    break 'units; // the commit failed: its error comes with the join below
                }
                batch_bytes = 0;
            }
        }
        // The last batch; a failed send means an earlier commit failed, and says why below.
        let _ = to_commit.send((batch, moves));
        drop(to_commit);
        let intake = committer
            .join()
            .map_err(|_| CollectError::io(dir, std::io::Error::other("committing panicked")))??;
        moved
            .join()
            .map_err(|_| CollectError::io(dir, std::io::Error::other("moving files panicked")))??;
        drop(outputs);
        for handle in handles {
            // A worker that panicked hung up early: the files after it were neither journaled nor
            // moved (they are read next time), but this run must not look complete.
            let worker = handle.join().map_err(|_| {
                CollectError::io(
                    dir,
                    std::io::Error::other("a parsing thread failed; unread files stay in place"),
                )
            })?;
            intake.absorb(worker);
        }
        Ok(stats)
    })
}

/// Work for a worker: whole `.json` files, or a slice of lines of an NDJSON file.
enum Unit {
    Files(Vec<PathBuf>),
    Lines {
        path: PathBuf,
        bytes: Vec<u8>,
        /// Line number of the first line in `bytes` (1-based).
        first_line: usize,
        last: bool,
    },
    /// A file the dispatcher could not read whole (over the size limit, or unreadable).
    Unread {
        path: PathBuf,
        read: Read,
    },
}

/// How reading a file went.
#[derive(Debug, Clone, Copy)]
enum Read {
    Done,
    TooLarge,
    Failed,
}

/// What a worker made of one file (or one slice of it).
struct FileOut {
    path: PathBuf,
    prepared: Vec<Prepared>,
    rejects: Vec<RecordReject>,
    read: Read,
    /// The file's last slice (always, for whole files).
    last: bool,
    /// An NDJSON file (read in slices), and the lines with a body in this slice.
    lines: bool,
    bodies: usize,
}

impl FileOut {
    fn new(path: PathBuf, read: Read, last: bool, lines: bool) -> Self {
        FileOut {
            path,
            prepared: Vec::new(),
            rejects: Vec::new(),
            read,
            last,
            lines,
            bodies: 0,
        }
    }
}

/// `.json` files per unit, and the NDJSON slice size.
const FILES_PER_UNIT: usize = 32;
const SLICE_BYTES: usize = 4 * 1024 * 1024;

/// Hands out the files in order, in turns: unit `k` goes to worker `k % workers`.
fn dispatch(
    files: Vec<(PathBuf, Format)>,
    limit: u64,
    inputs: &[mpsc::SyncSender<Unit>],
    spare: &mpsc::Receiver<Vec<u8>>,
) {
    let mut turn = 0usize;
    let mut send = |unit: Unit| {
        let sent = inputs[turn % inputs.len()].send(unit).is_ok();
        turn += 1;
        sent
    };
    let mut group = Vec::new();
    for (path, format) in files {
        match format {
            Format::Json => {
                group.push(path);
                if group.len() == FILES_PER_UNIT && !send(Unit::Files(std::mem::take(&mut group))) {
                    return;
                }
            }
            Format::Lines => {
                if !group.is_empty() && !send(Unit::Files(std::mem::take(&mut group))) {
                    return;
                }
                if !send_lines(path, limit, &mut send, spare) {
                    return;
                }
            }
        }
    }
    if !group.is_empty() {
        send(Unit::Files(group));
    }
}

/// Sends an NDJSON file as slices of whole lines; false when the workers are gone.
fn send_lines(
    path: PathBuf,
    limit: u64,
    send: &mut impl FnMut(Unit) -> bool,
    spare: &mpsc::Receiver<Vec<u8>>,
) -> bool {
    let mut file = match open_regular(&path) {
        Ok((file, len)) if len <= limit => file,
        Ok(_) => {
            return send(Unit::Unread {
                path,
                read: Read::TooLarge,
            });
        }
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "file not read");
            return send(Unit::Unread {
                path,
                read: Read::Failed,
            });
        }
    };
    let (mut first_line, mut total) = (1usize, 0u64);
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let mut bytes = spare.try_recv().unwrap_or_default();
        bytes.clear();
        bytes.append(&mut carry);
        // Read into the spare capacity (no zeroing of 4 MiB per slice first), to the slice's end
        // or the file's: `read_to_end` stops short only at the end of the file.
        bytes.reserve(SLICE_BYTES);
        let n = match (&mut file).take(SLICE_BYTES as u64).read_to_end(&mut bytes) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "file not read");
                return send(Unit::Unread {
                    path,
                    read: Read::Failed,
                });
            }
        };
        total += n as u64;
        if total > limit {
            // It grew past the limit while being read: left in place (what was journaled stays,
            // and is recognized when the file is read again).
            return send(Unit::Unread {
                path,
                read: Read::TooLarge,
            });
        }
        let last = n < SLICE_BYTES;
        if !last {
            match memchr::memrchr(b'\n', &bytes) {
                Some(cut) => {
                    carry.extend_from_slice(&bytes[cut + 1..]);
                    bytes.truncate(cut + 1);
                }
                None => {
                    carry = bytes; // one line longer than a slice: read on
                    continue;
                }
            }
        }
        let lines = memchr::memchr_iter(b'\n', &bytes).count();
        let unit = Unit::Lines {
            path: path.clone(),
            bytes,
            first_line,
            last,
        };
        if !send(unit) {
            return false;
        }
        if last {
            return true;
        }
        first_line += lines;
    }
}

impl Unit {
    /// What the files hold; with the slice buffer to reuse, for NDJSON.
    fn prepare(self, intake: &mut Intake, limit: u64) -> (Vec<FileOut>, Option<Vec<u8>>) {
        match self {
            Unit::Files(paths) => (paths
                .into_iter()
                .map(|path| {
                    let mut out = FileOut::new(path, Read::Done, true, false);
                    match read_regular(&out.path, limit) {
                        Ok(Some(bytes)) => {
                            prepare_json(&out.path.clone(), &bytes, intake, &mut out)
                        }
                        Ok(None) => {
                            out.read = Read::TooLarge;
                            out.rejects.push(too_large(&out.path, limit));
                        }
                        Err(e) => {
                            tracing::warn!(file = %out.path.display(), error = %e, "file not read");
                            out.read = Read::Failed;
                        }
                    }
                    out
                })
                .collect(), None),
            Unit::Lines {
                path,
                bytes,
                first_line,
                last,
            } => {
                let mut out = FileOut::new(path, Read::Done, last, true);
                out.bodies = prepare_lines(&out.path.clone(), &bytes, first_line, intake, &mut out);
                (vec![out], Some(bytes))
            }
            Unit::Unread { path, read } => {
                let mut out = FileOut::new(path, read, true, true);
                if matches!(read, Read::TooLarge) {
                    out.rejects.push(too_large(&out.path, limit));
                }
                (vec![out], None)
            }
        }
    }
}

fn too_large(path: &Path, limit: u64) -> RecordReject {
    file_reject(
        path,
        "file_too_large",
        format!("larger than callbacks.max_file_bytes ({limit} bytes); left in place"),
    )
}

/// Moves committed files to `processed/` or `rejected/`, durably: each rename is relative to
/// directories opened once per batch (no path walk per file), never replaces a file already there
/// (`renameat2(RENAME_NOREPLACE)` finds a free name without a `stat` per file), and each directory
/// touched is fsynced once.
fn move_files(dir: &Path, files: Vec<(PathBuf, &'static str)>) -> Result<()> {
    if files.is_empty() {
        return Ok(());
    }
    let from = open_dir(dir)?;
    // At most two: processed/ and rejected/.
    let mut targets: Vec<(&'static str, PathBuf, File)> = Vec::new();
    for (path, sub) in files {
        let at = match targets.iter().position(|(s, _, _)| *s == sub) {
            Some(at) => at,
            None => {
                let target_dir = dir.join(sub);
                std::fs::create_dir_all(&target_dir)
                    .map_err(|e| CollectError::io(&target_dir, e))?;
                let fd = open_dir(&target_dir)?;
                targets.push((sub, target_dir, fd));
                targets.len() - 1
            }
        };
        let (_, _, to) = &targets[at];
        let name = path.file_name().unwrap_or_default();
        // Files come from `dir` itself; anything else is renamed by its full path.
        let from_fd = if path.parent() == Some(dir) {
            from.as_raw_fd()
        } else {
            libc::AT_FDCWD
        };
        let source = if from_fd == libc::AT_FDCWD {
            c_path(path.as_os_str())
        } else {
            c_path(name)
        }
        .map_err(|e| CollectError::io(&path, e))?;
        rename_free(from_fd, &source, to.as_raw_fd(), name)
            .map_err(|e| CollectError::io(&path, e))?;
    }
    from.sync_all().map_err(|e| CollectError::io(dir, e))?;
    for (_, path, fd) in &targets {
        fd.sync_all().map_err(|e| CollectError::io(path, e))?;
    }
    Ok(())
}

fn open_dir(dir: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)
        .map_err(|e| CollectError::io(dir, e))
}

fn c_path(name: &std::ffi::OsStr) -> std::io::Result<CString> {
    CString::new(name.as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

/// Renames `source` (relative to `from`) into directory `to` as `name`, or `stem-1.ext`,
/// `stem-2.ext`, ... when taken; never replaces a file.
fn rename_free(
    from: RawFd,
    source: &CString,
    to: RawFd,
    name: &std::ffi::OsStr,
) -> std::io::Result<()> {
    let shown = name.to_string_lossy();
    let (stem, ext) = match shown.rsplit_once('.') {
        Some((stem, ext)) => (stem.to_owned(), format!(".{ext}")),
        None => (shown.clone().into_owned(), String::new()),
    };
    for n in 0u64.. {
        let target = if n == 0 {
            c_path(name)?
        } else {
            c_path(std::ffi::OsStr::new(&format!("{stem}-{n}{ext}")))?
        };
        match rename_noreplace(from, source, to, &target) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free name"))
}

/// `renameat2(RENAME_NOREPLACE)`; where the filesystem cannot (`EINVAL`), a check then a rename
/// (the drop directory has one mover: nothing else names files in `processed/`).
fn rename_noreplace(
    from: RawFd,
    source: &CString,
    to: RawFd,
    target: &CString,
) -> std::io::Result<()> {
    // SAFETY: valid NUL-terminated strings and open directory descriptors (or AT_FDCWD) for the
    // duration of the call.
    let rc = unsafe {
        libc::renameat2(
            from,
            source.as_ptr(),
            to,
            target.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
        return Err(e);
    }
    // SAFETY: as above; `stat` is a plain out-parameter.
    let taken = unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        libc::fstatat(to, target.as_ptr(), &mut stat, libc::AT_SYMLINK_NOFOLLOW) == 0
    };
    if taken {
        return Err(std::io::ErrorKind::AlreadyExists.into());
    }
    // SAFETY: as above.
    let rc = unsafe { libc::renameat(from, source.as_ptr(), to, target.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Decides whether an entry is a callback file to read.
fn candidate(
    path: &Path,
    name: &std::ffi::OsStr,
    meta: std::fs::FileType,
    stats: &mut DropDirStats,
) -> Result<Option<Format>> {
    if meta.is_dir() {
        return Ok(None); // processed/, rejected/ and anything else: not ours to read
    }
    let name = name.to_string_lossy();
    let skip = |why: &str, stats: &mut DropDirStats| {
        stats.skipped += 1;
        tracing::info!(file = %path.display(), "skipped: {why}");
        Ok(None)
    };
    if meta.is_symlink() {
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

/// Opens a regular file without following symlinks (nor blocking on a FIFO); returns its size.
fn open_regular(path: &Path) -> std::io::Result<(File, u64)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok((file, meta.len()))
}

/// Reads a regular file without following symlinks; `None` when it is over `limit` bytes.
fn read_regular(path: &Path, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    let (file, len) = open_regular(path)?;
    if len > limit {
        return Ok(None);
    }
    let mut bytes = Vec::with_capacity(len as usize + 1);
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Ok(None);
    }
    Ok(Some(bytes))
}

/// Prepares each line of an NDJSON slice; returns how many lines held a body.
fn prepare_lines(
    path: &Path,
    bytes: &[u8],
    first_line: usize,
    intake: &mut Intake,
    out: &mut FileOut,
) -> usize {
    let shown = path.display();
    let mut bodies = 0usize;
    // Lines found with memchr (a byte-at-a-time split cost a tenth of the whole ingest).
    let mut start = 0usize;
    let ends = memchr::memchr_iter(b'\n', bytes).chain(std::iter::once(bytes.len()));
    for (i, end) in ends.enumerate() {
        let Some(line) = bytes.get(start..end) else {
            break;
        };
        start = end + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        bodies += 1;
        let source = format!("{shown}:{}", first_line + i);
        match std::str::from_utf8(line) {
            Ok(text) => take(intake, text, source, out),
            Err(e) => out.rejects.push(text_reject(
                source,
                "body_not_utf8",
                format!("not UTF-8: {e}"),
            )),
        }
    }
    bodies
}

/// Prepares a `.json` file: one callback, or an array of them.
fn prepare_json(path: &Path, bytes: &[u8], intake: &mut Intake, out: &mut FileOut) {
    let shown = path.display();
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text.trim_start_matches('\u{feff}'),
        Err(e) => {
            out.rejects.push(file_reject(
                path,
                "body_not_utf8",
                format!("not UTF-8: {e}"),
            ));
            return;
        }
    };
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        out.rejects
            .push(file_reject(path, "file_empty", "the file is empty".into()));
    } else if trimmed.starts_with('[') {
        match serde_json::from_str::<Vec<&RawValue>>(text) {
            Ok(items) if items.is_empty() => {
                out.rejects.push(file_reject(
                    path,
                    "file_empty",
                    "an empty JSON array".into(),
                ));
            }
            Ok(items) => {
                for (i, item) in items.iter().enumerate() {
                    take(intake, item.get(), format!("{shown}[{i}]"), out);
                }
            }
            Err(e) => out.rejects.push(file_reject(
                path,
                "body_not_json",
                format!("not valid JSON: {e}"),
            )),
        }
    } else {
        take(intake, text, shown.to_string(), out);
    }
}

/// Prepares one body: a good one joins `out.prepared`, a bad one `out.rejects`.
fn take(intake: &mut Intake, body: &str, source: String, out: &mut FileOut) {
    match intake.prepare(body, source, &mut out.rejects) {
        Ok(p) => out.prepared.push(p),
        Err(r) => out.rejects.push(*r),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_never_replace_a_file_and_take_the_next_free_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let processed = root.join(PROCESSED_DIR);
        std::fs::create_dir_all(&processed).expect("mkdir");
        std::fs::write(processed.join("a.json"), "old a").expect("write");
        std::fs::write(processed.join("a-1.json"), "old a-1").expect("write");
        std::fs::write(processed.join("noext"), "old noext").expect("write");
        for (name, body) in [
            ("a.json", "new a"),
            ("b.json", "b"),
            ("noext", "new noext"),
            ("r.json", "r"),
        ] {
            std::fs::write(root.join(name), body).expect("write");
        }
        let files = vec![
            (root.join("a.json"), PROCESSED_DIR),
            (root.join("b.json"), PROCESSED_DIR),
            (root.join("noext"), PROCESSED_DIR),
            (root.join("r.json"), REJECTED_DIR),
        ];
        move_files(root, files).expect("move");
        let read = |p: &Path| std::fs::read_to_string(p).expect("read");
        assert_eq!(read(&processed.join("a.json")), "old a");
        assert_eq!(read(&processed.join("a-1.json")), "old a-1");
        assert_eq!(read(&processed.join("a-2.json")), "new a");
        assert_eq!(read(&processed.join("b.json")), "b");
        assert_eq!(read(&processed.join("noext")), "old noext");
        assert_eq!(read(&processed.join("noext-1")), "new noext");
        assert_eq!(read(&root.join(REJECTED_DIR).join("r.json")), "r");
        for name in ["a.json", "b.json", "noext", "r.json"] {
            assert!(!root.join(name).exists(), "{name} moved");
        }
        // A second batch with the same name again.
        std::fs::write(root.join("a.json"), "newer a").expect("write");
        move_files(root, vec![(root.join("a.json"), PROCESSED_DIR)]).expect("move");
        assert_eq!(read(&processed.join("a-3.json")), "newer a");
    }

    #[test]
    fn a_missing_file_fails_the_move() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let err = move_files(root, vec![(root.join("gone.json"), PROCESSED_DIR)]);
        assert!(err.is_err());
    }
}
