//! The SQLite store's callback bodies, in append-only segment files next to the database; the
//! `callbacks` table is their index (segment, frame, place in the frame, digest).
//!
//! A journal commit writes its new bodies at the end of the process's own segment, as frames (one
//! LZ4 or zstd frame per MiB of bodies, or each body as it is), fsyncs the segment, and only then
//! commits the index rows and the segment's new committed length in one SQLite transaction. A crash between
//! the two leaves bytes past the committed length that nothing refers to: the next writer truncates
//! them ([`Recovery`]). Nothing acknowledged is ever in that tail, since a callback is acknowledged
//! only after its commit.
//!
//! Each process appends to a segment of its own (created with a fresh name, held with an exclusive
//! `flock`), so a `tsusage listen` and a `tsusage run` on one store never write the same file, and a
//! segment whose lock can be taken belongs to a process that is gone. Segments are never rewritten:
//! once no index row refers to one (a prune archived its callbacks), it is deleted.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::config::JournalCompression;

/// The segment directory is the database's path with this extension (`state/tsusage.segments/`).
pub const SEGMENT_DIR_EXTENSION: &str = "segments";
/// Segment files are named `<unique>.seg`.
const SEGMENT_SUFFIX: &str = ".seg";
/// Bodies per compressed frame, at most (a body larger than this is a frame of its own): large
/// enough to compress well, small enough that reading one body back decompresses little.
const FRAME_BYTES: usize = 1 << 20;
/// A segment past this size is closed and the next commit starts a new one (a listener up for
/// weeks does not grow one file without end, and a prune can delete whole old segments).
pub const ROLL_BYTES: u64 = 256 << 20;
/// zstd level of compressed frames.
const ZSTD_LEVEL: i32 = 1;

/// `body_encoding` of a body in a segment, by how its frame is compressed.
pub const ENCODING_LZ4: &str = "segment-lz4";
pub const ENCODING_ZSTD: &str = "segment-zstd";
pub const ENCODING_RAW: &str = "segment";

/// The `body_encoding` of a body in a frame compressed with `compression`.
pub fn encoding(compression: JournalCompression) -> &'static str {
    match compression {
        JournalCompression::Lz4 => ENCODING_LZ4,
        JournalCompression::Zstd => ENCODING_ZSTD,
        JournalCompression::None => ENCODING_RAW,
    }
}

/// How the frame of a body with `body_encoding` `encoding` is compressed; `None` when the body is
/// not in a segment (rows older than segments, and small commits, hold it themselves).
pub fn compression_of(encoding: &str) -> Option<JournalCompression> {
    match encoding {
        ENCODING_LZ4 => Some(JournalCompression::Lz4),
        ENCODING_ZSTD => Some(JournalCompression::Zstd),
        ENCODING_RAW => Some(JournalCompression::None),
        _ => None,
    }
}

/// An LZ4 frame is the length of its bodies (u32, little-endian), then one LZ4 block of them.
const LZ4_LEN_BYTES: usize = 4;
/// LZ4 expands at most about 255 times: a frame claiming more is damaged (and is not decoded into
/// a buffer that large).
const LZ4_MAX_RATIO: u64 = 255;

/// Where a journaled body is: its segment file, its frame, and its place in the decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyRef {
    pub file: String,
    pub frame_offset: u64,
    pub frame_len: u64,
    pub body_offset: u64,
    pub body_len: u64,
    pub compression: JournalCompression,
}

/// The directory of the segments of the store at `db`.
pub fn dir_for(db: &Path) -> PathBuf {
    db.with_extension(SEGMENT_DIR_EXTENSION)
}

/// Where one body of a commit goes: frame `frame` of the commit's bytes, at `offset` in it.
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    frame: usize,
    offset: usize,
    len: usize,
}

impl Placement {
    /// Where the body is once its frame (`frame_len` bytes) is at `frame_offset` of segment `file`.
    fn body_ref(
        &self,
        file: &str,
        frame_offset: u64,
        frame_len: usize,
        compression: JournalCompression,
    ) -> BodyRef {
        BodyRef {
            file: file.to_owned(),
            frame_offset,
            frame_len: frame_len as u64,
            body_offset: self.offset as u64,
            body_len: self.len as u64,
            compression,
        }
    }
}

/// Bodies packed into frames ahead of a commit, as [`Frames`] would write them: the drop
/// directory's workers compress the bodies of what they read, in parallel, and the one thread that
/// commits only appends the frames. Each body of it is a [`Placement`] in these frames.
#[derive(Debug)]
pub struct Packed {
    /// The frames, back to back.
    bytes: Vec<u8>,
    /// `(start in bytes, length)` of each frame.
    spans: Vec<(usize, usize)>,
    compression: JournalCompression,
}

impl Packed {
    /// How its frames are compressed (a store writing another kind ignores them).
    pub fn compression(&self) -> JournalCompression {
        self.compression
    }
}

/// What compresses a [`Frames`]' frames.
enum Packer {
    Plain,
    Lz4(Box<lz4_flex::block::CompressTable>),
    Zstd(zstd::bulk::Compressor<'static>),
}

/// The bytes one commit appends: its bodies packed in frames. Kept by the store and reused from
/// commit to commit (a listener commits small groups often: a new compressor and new buffers each
/// time cost more than the compression).
pub struct Frames {
    packer: Packer,
    /// What is written: the finished frames, back to back.
    out: Vec<u8>,
    /// `(start in out, length)` of each finished frame.
    spans: Vec<(usize, usize)>,
    /// The frame being filled (compressed mode only).
    open: Vec<u8>,
    /// Scratch space for one compressed frame.
    packed: Vec<u8>,
}

impl std::fmt::Debug for Frames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frames")
            .field("compression", &self.compression())
            .field("bytes", &self.out.len())
            .field("frames", &self.spans.len())
            .finish()
    }
}

impl Frames {
    pub fn new(compression: JournalCompression) -> std::io::Result<Frames> {
        let packer = match compression {
            JournalCompression::Lz4 => {
                Packer::Lz4(Box::new(lz4_flex::block::CompressTable::large()))
            }
            JournalCompression::Zstd => Packer::Zstd(zstd::bulk::Compressor::new(ZSTD_LEVEL)?),
            JournalCompression::None => Packer::Plain,
        };
        Ok(Frames {
            out: Vec::new(),
            packer,
            spans: Vec::new(),
            open: Vec::new(),
            packed: Vec::new(),
        })
    }

    /// How it compresses its frames.
    pub fn compression(&self) -> JournalCompression {
        match self.packer {
            Packer::Plain => JournalCompression::None,
            Packer::Lz4(_) => JournalCompression::Lz4,
            Packer::Zstd(_) => JournalCompression::Zstd,
        }
    }

    /// Empties it for the next commit (keeping its buffers).
    pub fn clear(&mut self) {
        self.out.clear();
        self.spans.clear();
        self.open.clear();
    }

    /// Adds a body; where it lands is known once [`Frames::finish`] has placed the frames.
    pub fn push(&mut self, body: &[u8]) -> std::io::Result<Placement> {
        if matches!(self.packer, Packer::Plain) {
            self.spans.push((self.out.len(), body.len()));
            self.out.extend_from_slice(body);
            return Ok(Placement {
                frame: self.spans.len() - 1,
                offset: 0,
                len: body.len(),
            });
        }
        if !self.open.is_empty() && self.open.len() + body.len() > FRAME_BYTES {
            self.close_frame()?;
        }
        let placement = Placement {
            frame: self.spans.len(),
            offset: self.open.len(),
            len: body.len(),
        };
        self.open.extend_from_slice(body);
        Ok(placement)
    }

    fn close_frame(&mut self) -> std::io::Result<()> {
        let start = self.out.len();
        let n = match &mut self.packer {
            Packer::Plain => return Ok(()),
            Packer::Zstd(zstd) => {
                self.packed.clear();
                self.packed
                    .reserve(zstd::zstd_safe::compress_bound(self.open.len()));
                // Writes into `packed` from its start (it is empty), up to its capacity.
                zstd.compress_to_buffer(&self.open, &mut self.packed)?
            }
            Packer::Lz4(table) => {
                let len = u32::try_from(self.open.len()).map_err(std::io::Error::other)?;
                let bound =
                    LZ4_LEN_BYTES + lz4_flex::block::get_maximum_output_size(self.open.len());
                // Grown once and kept: only the bytes written are read.
                if self.packed.len() < bound {
                    self.packed.resize(bound, 0);
                }
                self.packed[..LZ4_LEN_BYTES].copy_from_slice(&len.to_le_bytes());
                let block = &mut self.packed[LZ4_LEN_BYTES..bound];
                LZ4_LEN_BYTES
                    + lz4_flex::block::compress_into_with_table(&self.open, block, table)
                        .map_err(std::io::Error::other)?
            }
        };
        self.out.extend_from_slice(&self.packed[..n]);
        self.spans.push((start, n));
        self.open.clear();
        Ok(())
    }

    /// Closes the open frame and hands over the frames of the bodies pushed so far (then empty).
    pub fn pack(&mut self) -> std::io::Result<Packed> {
        if !self.open.is_empty() {
            self.close_frame()?;
        }
        Ok(Packed {
            bytes: std::mem::take(&mut self.out),
            spans: std::mem::take(&mut self.spans),
            compression: self.compression(),
        })
    }

    /// The bytes to append at `base` for bodies packed ahead ([`Frames::pack`]), and each body's
    /// place: every frame that holds one of them, once, in the order the bodies come. A frame none
    /// of them is in (its bodies were all journaled before) is left out.
    pub fn adopt(
        &mut self,
        base: u64,
        bodies: &[(&Packed, Placement)],
        file: &str,
    ) -> (&[u8], Vec<BodyRef>) {
        self.clear();
        // (which Packed, which frame) → where it starts in `out`.
        let mut placed: HashMap<(*const Packed, usize), usize> = HashMap::new();
        let refs = bodies
            .iter()
            .map(|&(packed, p)| {
                let (from, len) = packed.spans[p.frame];
                let start = *placed
                    .entry((std::ptr::from_ref(packed), p.frame))
                    .or_insert_with(|| {
                        let start = self.out.len();
                        self.out.extend_from_slice(&packed.bytes[from..from + len]);
                        start
                    });
                p.body_ref(file, base + start as u64, len, packed.compression)
            })
            .collect();
        (&self.out, refs)
    }

    /// The bytes to append at `base`, and each body's place.
    pub fn finish(
        &mut self,
        base: u64,
        placements: &[Placement],
        file: &str,
    ) -> std::io::Result<(&[u8], Vec<BodyRef>)> {
        if !self.open.is_empty() {
            self.close_frame()?;
        }
        let compression = self.compression();
        let refs = placements
            .iter()
            .map(|p| {
                let (start, len) = self.spans[p.frame];
                p.body_ref(file, base + start as u64, len, compression)
            })
            .collect();
        Ok((&self.out, refs))
    }
}

/// The segment this process appends to, held with an exclusive `flock` while it is open.
#[derive(Debug)]
pub struct Appender {
    pub id: i64,
    pub name: String,
    file: File,
    /// The committed length: the next commit's bytes go here.
    end: u64,
}

impl Appender {
    /// Creates a segment file with a name no other process has (the caller then records it).
    pub fn create(dir: &Path) -> std::io::Result<(String, File)> {
        std::fs::create_dir_all(dir)?;
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%6f");
        let pid = std::process::id();
        for n in 0u32.. {
            let name = format!("{stamp}-{pid}-{n}{SEGMENT_SUFFIX}");
            let created = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(dir.join(&name));
            match created {
                Ok(file) => {
                    if !try_lock(&file)? {
                        return Err(std::io::Error::other(format!(
                            "{}: new segment is locked by another process",
                            dir.join(&name).display()
                        )));
                    }
                    crate::output::sync_dir(dir).map_err(std::io::Error::other)?;
                    return Ok((name, file));
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other("no free segment name"))
    }

    pub fn new(id: i64, name: String, file: File) -> Appender {
        Appender {
            id,
            name,
            file,
            end: 0,
        }
    }

    /// Writes `bytes` after the committed length and makes them durable. Until the index rows
    /// that refer to them commit ([`Appender::committed`]), they are an unreferenced tail.
    pub fn append(&mut self, bytes: &[u8]) -> std::io::Result<u64> {
        self.file.write_all_at(bytes, self.end)?;
        crate::failpoint::pause(crate::failpoint::JOURNAL_APPEND);
        crate::failpoint::fail(crate::failpoint::JOURNAL_APPEND)?;
        self.file.sync_data()?;
        Ok(self.end + bytes.len() as u64)
    }

    /// The index rows up to `end` are committed.
    pub fn committed(&mut self, end: u64) {
        self.end = end;
    }

    /// The committed length.
    pub fn end(&self) -> u64 {
        self.end
    }
}

/// Takes an exclusive `flock` on `file` without waiting; false when another process holds it.
fn try_lock(file: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor this `File` owns; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// What recovery does with a segment of the `segments` table that is not sealed.
#[derive(Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Another live process appends to it: left alone.
    InUse,
    /// Its writer is gone: cut back to the committed length (`truncated` bytes were an
    /// unreferenced tail), now sealed.
    Sealed { truncated: u64 },
    /// The file was never created or holds nothing committed: the row can go.
    Missing,
}

/// Recovers segment `name` of `dir` whose committed length is `committed`.
pub fn recover(dir: &Path, name: &str, committed: u64) -> std::io::Result<Recovery> {
    let path = dir.join(name);
    let file = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound && committed == 0 => {
            return Ok(Recovery::Missing);
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(std::io::Error::new(
                ErrorKind::NotFound,
                format!(
                    "journal segment {} is missing ({committed} bytes of journaled bodies)",
                    path.display()
                ),
            ));
        }
        Err(e) => return Err(e),
    };
    if !try_lock(&file)? {
        return Ok(Recovery::InUse);
    }
    let len = file.metadata()?.len();
    if len < committed {
        return Err(std::io::Error::other(format!(
            "journal segment {} is {len} bytes, shorter than its {committed} committed bytes",
            path.display()
        )));
    }
    if len > committed {
        file.set_len(committed)?;
        file.sync_all()?;
    }
    Ok(Recovery::Sealed {
        truncated: len - committed,
    })
}

/// Deletes the segment files in `dir` that the `segments` table does not know (`known`) and that
/// no process holds: left by a crash between creating a segment and recording it. Returns them.
pub fn remove_strays(dir: &Path, known: &[String]) -> std::io::Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if !name.ends_with(SEGMENT_SUFFIX) || known.contains(&name) {
            continue;
        }
        let path = dir.join(&name);
        let Ok(file) = File::open(&path) else {
            continue;
        };
        if try_lock(&file)? {
            std::fs::remove_file(&path)?;
            removed.push(name);
        }
    }
    Ok(removed)
}

/// Deletes segment `name` (no index row refers to it any more).
pub fn remove(dir: &Path, name: &str) -> std::io::Result<()> {
    match std::fs::remove_file(dir.join(name)) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Reads bodies back: open segment files and the last decoded frame are kept, so reading the
/// bodies of one commit in order decompresses each frame once.
#[derive(Debug, Default)]
pub struct Reader {
    files: RefCell<HashMap<String, File>>,
    frame: RefCell<Option<(String, u64, Vec<u8>)>>,
}

impl Reader {
    /// The body at `r` in the segments of `dir`, checked against its digest.
    pub fn read(
        &self,
        dir: &Path,
        r: &BodyRef,
        digest: &[u8],
    ) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
        let at = |what: &str| {
            format!(
                "journal segment {} at {}: {what}",
                dir.join(&r.file).display(),
                r.frame_offset
            )
        };
        let start = usize::try_from(r.body_offset)?;
        let end = start + usize::try_from(r.body_len)?;
        let bytes = if r.compression != JournalCompression::None {
            let mut frame = self.frame.borrow_mut();
            let cached = matches!(&*frame, Some((f, o, _)) if *f == r.file && *o == r.frame_offset);
            if !cached {
                let raw = self.read_span(dir, &r.file, r.frame_offset, r.frame_len)?;
                let decoded = decode_frame(r.compression, &raw)
                    .map_err(|e| at(&format!("cannot decompress: {e}")))?;
                *frame = Some((r.file.clone(), r.frame_offset, decoded));
            }
            let Some((_, _, decoded)) = frame.as_ref() else {
                return Err(at("no frame").into());
            };
            decoded
                .get(start..end)
                .ok_or_else(|| at("body past the end of its frame"))?
                .to_vec()
        } else {
            self.read_span(dir, &r.file, r.frame_offset + r.body_offset, r.body_len)?
        };
        let text = String::from_utf8(bytes).map_err(|e| at(&format!("not UTF-8: {e}")))?;
        if super::body_digest(&text).as_slice() != digest {
            return Err(at("the body does not match its digest (the file is damaged)").into());
        }
        Ok(text)
    }

    fn read_span(
        &self,
        dir: &Path,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
        let mut files = self.files.borrow_mut();
        if !files.contains_key(name) {
            let file = File::open(dir.join(name))
                .map_err(|e| format!("journal segment {}: {e}", dir.join(name).display()))?;
            files.insert(name.to_owned(), file);
        }
        let file = files
            .get(name)
            .ok_or_else(|| format!("journal segment {name}: not open"))?;
        let mut buf = vec![0u8; usize::try_from(len)?];
        file.read_exact_at(&mut buf, offset).map_err(|e| {
            format!(
                "journal segment {} at {offset}: {e}",
                dir.join(name).display()
            )
        })?;
        Ok(buf)
    }
}

/// The bodies of a compressed frame.
fn decode_frame(compression: JournalCompression, raw: &[u8]) -> std::io::Result<Vec<u8>> {
    match compression {
        JournalCompression::None => Ok(raw.to_vec()),
        JournalCompression::Zstd => zstd::stream::decode_all(raw),
        JournalCompression::Lz4 => {
            let (len, block) = raw
                .split_first_chunk::<LZ4_LEN_BYTES>()
                .ok_or_else(|| std::io::Error::other("shorter than its length"))?;
            let len = u32::from_le_bytes(*len);
            if u64::from(len) > (block.len() as u64 + 1) * LZ4_MAX_RATIO {
                return Err(std::io::Error::other(format!(
                    "claims {len} bytes from {} compressed",
                    block.len()
                )));
            }
            let mut decoded = vec![0; len as usize];
            let n = lz4_flex::block::decompress_into(block, &mut decoded)
                .map_err(std::io::Error::other)?;
            if n != decoded.len() {
                return Err(std::io::Error::other(format!(
                    "holds {n} bytes, not the {len} it claims"
                )));
            }
            Ok(decoded)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(compression: JournalCompression) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (name, file) = Appender::create(dir.path()).expect("create");
        let mut appender = Appender::new(1, name.clone(), file);
        // Bodies of many sizes, one larger than a frame.
        let bodies: Vec<String> = (0..300)
            .map(|i| format!(r#"{{"requestId":"r{i}","pad":"{}"}}"#, "x".repeat(i * 97)))
            .chain(std::iter::once("y".repeat(FRAME_BYTES + 5)))
            .collect();
        let mut frames = Frames::new(compression).expect("frames");
        let placements: Vec<Placement> = bodies
            .iter()
            .map(|b| frames.push(b.as_bytes()).expect("push"))
            .collect();
        let (bytes, refs) = frames
            .finish(appender.end, &placements, &name)
            .expect("finish");
        let end = appender.append(bytes).expect("append");
        appender.committed(end);
        // Reused for a second commit: it starts empty.
        frames.clear();
        let p = frames.push(b"second").expect("push");
        let (bytes, second) = frames.finish(end, &[p], &name).expect("finish");
        let end = appender.append(bytes).expect("append");
        appender.committed(end);
        let reader = Reader::default();
        let digest = super::super::body_digest("second");
        assert_eq!(
            reader.read(dir.path(), &second[0], &digest).expect("read"),
            "second"
        );
        // Backwards, so that frames are decoded more than once.
        for (body, r) in bodies.iter().zip(&refs).rev() {
            let digest = super::super::body_digest(body);
            assert_eq!(&reader.read(dir.path(), r, &digest).expect("read"), body);
        }
        let wrong = super::super::body_digest("something else");
        let err = reader
            .read(dir.path(), &refs[3], &wrong)
            .expect_err("digest checked");
        assert!(
            err.to_string().contains("does not match its digest"),
            "{err}"
        );
    }

    #[test]
    fn packed_frames_are_appended_once_each_and_frames_left_unused_are_skipped() {
        packed_frames(JournalCompression::Lz4);
        packed_frames(JournalCompression::Zstd);
    }

    fn packed_frames(compression: JournalCompression) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (name, file) = Appender::create(dir.path()).expect("create");
        let mut appender = Appender::new(1, name.clone(), file);
        // Two groups packed apart (two workers' units); the first spans two frames.
        let mut worker = Frames::new(compression).expect("frames");
        let big = |i: usize| {
            format!(
                r#"{{"requestId":"a{i}","pad":"{}"}}"#,
                "p".repeat(FRAME_BYTES / 3)
            )
        };
        let first: Vec<String> = (0..4).map(big).collect();
        let at_first: Vec<Placement> = first
            .iter()
            .map(|b| worker.push(b.as_bytes()).expect("push"))
            .collect();
        let first_packed = worker.pack().expect("pack");
        assert_eq!(
            first_packed.spans.len(),
            2,
            "a frame holds at most {FRAME_BYTES} bytes"
        );
        let second: Vec<String> = (0..3)
            .map(|i| format!(r#"{{"requestId":"b{i}"}}"#))
            .collect();
        let at_second: Vec<Placement> = second
            .iter()
            .map(|b| worker.push(b.as_bytes()).expect("push"))
            .collect();
        let second_packed = worker.pack().expect("pack");
        assert_eq!(first_packed.compression(), compression);
        assert_eq!(second_packed.compression(), compression);
        // The commit keeps bodies 0 and 3 of the first group (in different frames) and all of the
        // second: three frames are written, each once; the first group's bodies 1 and 2 are dead
        // bytes in those frames, like bodies of an earlier commit.
        let kept: Vec<(&str, (&Packed, Placement))> = [0, 3]
            .iter()
            .map(|&i| (first[i].as_str(), (&first_packed, at_first[i])))
            .chain(
                second
                    .iter()
                    .zip(&at_second)
                    .map(|(b, &p)| (b.as_str(), (&second_packed, p))),
            )
            .collect();
        let bodies: Vec<(&Packed, Placement)> = kept.iter().map(|k| k.1).collect();
        let mut frames = Frames::new(compression).expect("frames");
        let (bytes, refs) = frames.adopt(appender.end, &bodies, &name);
        assert_eq!(
            bytes.len(),
            first_packed.bytes.len() + second_packed.bytes.len(),
            "every frame once"
        );
        let end = appender.append(bytes).expect("append");
        appender.committed(end);
        assert_eq!(refs[2].frame_offset, refs[3].frame_offset, "one frame");
        let reader = Reader::default();
        for ((body, _), r) in kept.iter().zip(&refs) {
            let digest = super::super::body_digest(body);
            assert_eq!(&reader.read(dir.path(), r, &digest).expect("read"), body);
        }
        // Only the second group: the first group's frames are not written at all.
        let (bytes, refs) = frames.adopt(end, &bodies[2..], &name);
        assert_eq!(bytes.len(), second_packed.bytes.len());
        assert_eq!(refs[0].frame_offset, end);
    }

    #[test]
    fn bodies_read_back_from_compressed_and_plain_segments() {
        roundtrip(JournalCompression::Lz4);
        roundtrip(JournalCompression::Zstd);
        roundtrip(JournalCompression::None);
    }

    /// A damaged compressed frame is an error naming the segment and the frame, whatever the
    /// damage: a length that does not fit, bytes that do not decode, or a body that decodes wrong.
    #[test]
    fn a_damaged_frame_is_an_error_naming_its_segment() {
        for compression in [JournalCompression::Lz4, JournalCompression::Zstd] {
            for damage in [0usize, 1, 3, 8, 40, 200] {
                let dir = tempfile::tempdir().expect("tempdir");
                let (name, file) = Appender::create(dir.path()).expect("create");
                let mut appender = Appender::new(1, name.clone(), file);
                let body = format!(r#"{{"requestId":"r","pad":"{}"}}"#, "ab".repeat(400));
                let mut frames = Frames::new(compression).expect("frames");
                let p = frames.push(body.as_bytes()).expect("push");
                let (bytes, refs) = frames.finish(0, &[p], &name).expect("finish");
                let mut bytes = bytes.to_vec();
                let at = damage.min(bytes.len() - 1);
                bytes[at] ^= 0x5a;
                appender.append(&bytes).expect("append");
                let digest = super::super::body_digest(&body);
                let err = Reader::default()
                    .read(dir.path(), &refs[0], &digest)
                    .expect_err("damage is found");
                let text = err.to_string();
                assert!(
                    text.contains(&name) && text.contains(" at 0: "),
                    "{compression:?} byte {at}: {text}"
                );
            }
        }
    }

    #[test]
    fn recovery_truncates_an_unreferenced_tail_and_leaves_live_segments_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (name, file) = Appender::create(dir.path()).expect("create");
        let mut appender = Appender::new(1, name.clone(), file);
        let end = appender.append(b"committed").expect("append");
        appender.committed(end);
        appender
            .append(b"-tail that never committed")
            .expect("append");
        // Its writer holds the lock: in use.
        assert_eq!(
            recover(dir.path(), &name, end).expect("recover"),
            Recovery::InUse
        );
        assert!(
            remove_strays(dir.path(), &[]).expect("strays").is_empty(),
            "a held segment is not a stray"
        );
        drop(appender);
        assert_eq!(
            recover(dir.path(), &name, end).expect("recover"),
            Recovery::Sealed { truncated: 26 }
        );
        assert_eq!(
            std::fs::read(dir.path().join(&name)).expect("read"),
            b"committed"
        );
        assert_eq!(
            recover(dir.path(), "never-created.seg", 0).expect("recover"),
            Recovery::Missing
        );
        let missing = recover(dir.path(), "lost.seg", 10).expect_err("committed bytes missing");
        assert!(missing.to_string().contains("is missing"), "{missing}");
        // A file nobody recorded and nobody holds is removed; a recorded one stays.
        std::fs::write(dir.path().join("stray.seg"), b"x").expect("write");
        assert_eq!(
            remove_strays(dir.path(), std::slice::from_ref(&name)).expect("strays"),
            vec!["stray.seg".to_owned()]
        );
        assert!(dir.path().join(&name).exists());
    }
}
