//! Partition rows in bounded memory: one row per (iccid, usage_start, usage_end), the newest wins.
//!
//! Records come in as [`ParsedRecord`]s tagged with their [`Origin`] (the callback they came from).
//! Origins are numbered in "newest wins" order: a higher number was received later (ties broken by
//! journal id), so collapsing keeps, per key, the row with the highest origin.
//!
//! Rows are kept in memory as 64-byte [`Row`]s. Past the memory budget, the largest partition's rows
//! are sorted and spilled to a run file; [`PartitionRows::collapsed`] merges the runs and the rows still
//! in memory (a k-way merge over sorted inputs), so memory stays flat however large the input is, and
//! the output comes out sorted by (iccid, usage_start, usage_end).

use std::collections::{BTreeMap, BinaryHeap};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::record::ParsedRecord;
use super::{UsageRow, partition_key, partition_of};
use crate::config::PartitionBy;
use crate::ingest::Iccid;
use crate::output::WriteError;

/// The callback a row came from.
#[derive(Debug, Clone)]
pub struct Origin {
    pub request_id: Arc<str>,
    pub account_name: Arc<str>,
    /// µs since the epoch, UTC.
    pub received_at: i64,
}

fixed_layout! {
    /// One usage row, compact: the callback's fields live once in its [`Origin`]. Spill files hold
    /// rows in the fixed-size encoding the macro derives from these fields, in this order: a new
    /// column is a new field here, and nothing else in this file.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    pub struct Row {
        pub iccid: IccidKey,
        pub usage_start: i64,
        pub usage_end: i64,
        /// data_usage_bytes, sms_usage, mo_sms, mt_sms.
        pub counts: [i64; 4],
        /// Index into the origins: higher is newer.
        pub origin: u32,
    }
}

/// An ICCID as a [`Row`] holds it: [`Iccid::key`], one word ordered as the text (a row is 64
/// bytes, not 80 with the digits: a fifth more rows fit in memory before a spill, and sorting
/// compares integers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct IccidKey(u64);

impl From<Iccid> for IccidKey {
    fn from(iccid: Iccid) -> Self {
        IccidKey(iccid.key())
    }
}

impl IccidKey {
    /// The ICCID; `None` only for a key read from a damaged spill file.
    pub fn iccid(self) -> Option<Iccid> {
        Iccid::from_key(self.0)
    }
}

impl Row {
    fn sort_key(&self) -> (IccidKey, i64, i64, u32) {
        (self.iccid, self.usage_start, self.usage_end, self.origin)
    }

    fn same_key(&self, other: &Row) -> bool {
        self.iccid == other.iccid
            && self.usage_start == other.usage_start
            && self.usage_end == other.usage_end
    }
}

/// Rows a partition's buffer first grows by (then it doubles, within the budget).
const MIN_GROW_ROWS: usize = 1024;

/// Bytes of one spilled row.
const SPILL_ROW_BYTES: usize = <Row as Fixed>::BYTES;

/// Rows of every partition seen so far, within a memory budget.
#[derive(Debug)]
pub struct RowSet {
    by: PartitionBy,
    /// Accounts seen, the configured one first (for callbacks of requests this store did not send).
    accounts: Vec<Arc<str>>,
    origins: Vec<Origin>,
    parts: BTreeMap<i64, PartitionRows>,
    /// Row slots allocated in memory over all partitions (capacity, not length: what memory
    /// holds), and the most allowed.
    in_memory: usize,
    max_in_memory: usize,
    spill_dir: PathBuf,
}

/// The rows of one partition: sorted runs on disk plus the rows still in memory.
#[derive(Debug)]
pub struct PartitionRows {
    pub name: String,
    rows: Vec<Row>,
    runs: Vec<PathBuf>,
    /// Records added (before collapsing).
    pub records_in: u64,
    /// Distinct origins that added rows.
    pub origins: u64,
    last_origin: Option<u32>,
}

impl RowSet {
    /// `memory_bytes` bounds the rows held in memory; run files go to `spill_dir` (created when needed).
    pub fn new(
        by: PartitionBy,
        default_account: Arc<str>,
        memory_bytes: usize,
        spill_dir: &Path,
    ) -> Self {
        RowSet {
            by,
            accounts: vec![default_account],
            origins: Vec::new(),
            parts: BTreeMap::new(),
            in_memory: 0,
            max_in_memory: (memory_bytes / std::mem::size_of::<Row>()).max(1024),
            spill_dir: spill_dir.to_owned(),
        }
    }

    /// Registers a callback; rows added with the returned number come from it. Call in "newest
    /// wins" order (received time, then journal id). `account` is its job's account (the configured
    /// one when `None`: a request this store did not send).
    pub fn add_origin(&mut self, request_id: &str, account: Option<&str>, received_at: i64) -> u32 {
        let account_name = match account {
            None => self.accounts[0].clone(),
            Some(a) => match self.accounts.iter().find(|known| ***known == *a) {
                Some(known) => known.clone(),
                None => {
                    let new: Arc<str> = Arc::from(a);
                    self.accounts.push(new.clone());
                    new
                }
            },
        };
        self.origins.push(Origin {
            request_id: Arc::from(request_id),
            account_name,
            received_at,
        });
        u32::try_from(self.origins.len() - 1).unwrap_or(u32::MAX)
    }

    pub fn origins(&self) -> &[Origin] {
        &self.origins
    }

    /// Adds one accepted record of `origin`.
    pub fn push(&mut self, origin: u32, r: &ParsedRecord) -> Result<(), WriteError> {
        let key = partition_key(r.usage_start, self.by);
        let by = self.by;
        // Room is made before the row goes in: a partition's rows grow (doubling) only within the
        // budget, and past it the largest partition is spilled first. Memory never overshoots the
        // budget by a doubling.
        let part = loop {
            let part = self
                .parts
                .entry(key)
                .or_insert_with(|| PartitionRows::empty(&partition_of(r.usage_start, by)));
            let capacity = part.rows.capacity();
            if part.rows.len() < capacity {
                break part;
            }
            let room = self.max_in_memory.saturating_sub(self.in_memory);
            if room == 0 {
                self.spill_largest()?;
                continue;
            }
            part.rows
                .reserve_exact(capacity.max(MIN_GROW_ROWS).min(room));
            self.in_memory += part.rows.capacity() - capacity;
            break part;
        };
        part.rows.push(Row {
            iccid: r.iccid.into(),
            usage_start: r.usage_start,
            usage_end: r.usage_end,
            counts: [r.data_usage_bytes, r.sms_usage, r.mo_sms, r.mt_sms],
            origin,
        });
        part.records_in += 1;
        if part.last_origin != Some(origin) {
            part.last_origin = Some(origin);
            part.origins += 1;
        }
        Ok(())
    }

    fn spill_largest(&mut self) -> Result<(), WriteError> {
        let Some(part) = self.parts.values_mut().max_by_key(|p| p.rows.capacity()) else {
            self.in_memory = 0;
            return Ok(());
        };
        if part.rows.is_empty() {
            // Room held but no rows (cannot happen past the budget floor): released, not spilled.
            self.in_memory -= part.rows.capacity();
            part.rows = Vec::new();
            return Ok(());
        }
        std::fs::create_dir_all(&self.spill_dir).map_err(|e| WriteError::io(&self.spill_dir, e))?;
        // Unique among the sets of this process (several may spill into the same directory).
        static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self
            .spill_dir
            .join(format!("rows-{}-{run}.run", std::process::id()));
        tracing::debug!(partition = part.name, rows = part.rows.len(), run = %path.display(), "spilling rows");
        self.in_memory -= part.rows.capacity();
        part.spill(&path)?;
        Ok(())
    }

    /// The partitions with rows, by name.
    pub fn partition_names(&self) -> Vec<String> {
        self.parts.values().map(|p| p.name.clone()).collect()
    }

    /// Takes the rows of partition `name` out of the set.
    pub fn take(&mut self, name: &str) -> Option<PartitionRows> {
        let key = self
            .parts
            .iter()
            .find(|(_, p)| p.name == name)
            .map(|(k, _)| *k)?;
        let part = self.parts.remove(&key)?;
        self.in_memory -= part.rows.capacity();
        Some(part)
    }
}

impl PartitionRows {
    /// A partition without rows (all its records were superseded or rejected).
    pub fn empty(name: &str) -> Self {
        PartitionRows {
            name: name.to_owned(),
            rows: Vec::new(),
            runs: Vec::new(),
            records_in: 0,
            origins: 0,
            last_origin: None,
        }
    }

    fn spill(&mut self, path: &Path) -> Result<(), WriteError> {
        self.rows.sort_unstable_by_key(Row::sort_key);
        let file = File::create(path).map_err(|e| WriteError::io(path, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let mut buf = [0u8; SPILL_ROW_BYTES];
        for row in self.rows.drain(..) {
            row.put(&mut buf);
            out.write_all(&buf).map_err(|e| WriteError::io(path, e))?;
        }
        out.flush().map_err(|e| WriteError::io(path, e))?;
        self.rows = Vec::new();
        self.runs.push(path.to_owned());
        Ok(())
    }

    /// The collapsed rows in (iccid, usage_start, usage_end) order: per key, the newest origin's.
    /// Returns them with the number of records superseded. Run files are removed when done.
    pub fn collapsed(mut self) -> Result<Collapsed, WriteError> {
        if self.runs.is_empty() {
            // All in memory: sorted in two halves at once, merged as they are read.
            return Ok(Collapsed {
                only: Some(Halves::sort(std::mem::take(&mut self.rows))),
                sources: Vec::new(),
                heap: BinaryHeap::new(),
                pending: None,
                runs: Vec::new(),
                collapsed: 0,
            });
        }
        self.rows.sort_unstable_by_key(Row::sort_key);
        let mut sources = Vec::with_capacity(self.runs.len() + 1);
        for path in &self.runs {
            let file = File::open(path).map_err(|e| WriteError::io(path, e))?;
            sources.push(Source::Run {
                reader: BufReader::with_capacity(256 * 1024, file),
                path: path.clone(),
            });
        }
        sources.push(Source::Memory(std::mem::take(&mut self.rows).into_iter()));
        let mut heap = BinaryHeap::with_capacity(sources.len());
        for (i, source) in sources.iter_mut().enumerate() {
            if let Some(row) = source.next_row()? {
                heap.push(std::cmp::Reverse((row.sort_key(), i, row)));
            }
        }
        Ok(Collapsed {
            only: None,
            sources,
            heap,
            pending: None,
            runs: std::mem::take(&mut self.runs),
            collapsed: 0,
        })
    }
}

/// A sorted input of the merge.
#[derive(Debug)]
enum Source {
    Memory(std::vec::IntoIter<Row>),
    Run {
        reader: BufReader<File>,
        path: PathBuf,
    },
}

impl Source {
    fn next_row(&mut self) -> Result<Option<Row>, WriteError> {
        match self {
            Source::Memory(rows) => Ok(rows.next()),
            Source::Run { reader, path } => {
                let mut buf = [0u8; SPILL_ROW_BYTES];
                match reader.read_exact(&mut buf) {
                    Ok(()) => Row::get(&buf).map(Some).ok_or_else(|| {
                        WriteError::io(path, std::io::Error::other("corrupt row in spill file"))
                    }),
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
                    Err(e) => Err(WriteError::io(path, e)),
                }
            }
        }
    }
}

type HeapItem = std::cmp::Reverse<((IccidKey, i64, i64, u32), usize, Row)>;

/// Rows from this many on are sorted on two threads.
const PARALLEL_SORT_ROWS: usize = 1 << 16;

/// The rows of a partition that never spilled, sorted as two halves (on two threads: the sort is
/// most of the work before the Parquet encoders have anything to do), merged as they are read.
#[derive(Debug)]
struct Halves {
    rows: Vec<Row>,
    left: std::ops::Range<usize>,
    right: std::ops::Range<usize>,
}

impl Halves {
    fn sort(mut rows: Vec<Row>) -> Halves {
        let n = rows.len();
        let mid = if n >= PARALLEL_SORT_ROWS { n / 2 } else { n };
        let (left, right) = rows.split_at_mut(mid);
        std::thread::scope(|scope| {
            if !right.is_empty() {
                scope.spawn(|| right.sort_unstable_by_key(Row::sort_key));
            }
            left.sort_unstable_by_key(Row::sort_key);
        });
        Halves {
            rows,
            left: 0..mid,
            right: mid..n,
        }
    }

    fn head(&self, range: &std::ops::Range<usize>) -> Option<&Row> {
        if range.is_empty() {
            None
        } else {
            self.rows.get(range.start)
        }
    }

    fn next(&mut self) -> Option<Row> {
        let right = match (self.head(&self.left), self.head(&self.right)) {
            (Some(l), Some(r)) => r.sort_key() < l.sort_key(),
            (None, r) => r.is_some(),
            (Some(_), None) => false,
        };
        let at = if right {
            self.right.next()
        } else {
            self.left.next()
        }?;
        self.rows.get(at).copied()
    }
}

/// The merge of a partition's sorted inputs, collapsed: an iterator of rows.
#[derive(Debug)]
pub struct Collapsed {
    /// The only input, when nothing was spilled (then `sources` and `heap` are empty).
    only: Option<Halves>,
    sources: Vec<Source>,
    heap: BinaryHeap<HeapItem>,
    /// The newest row seen so far for the current key.
    pending: Option<Row>,
    runs: Vec<PathBuf>,
    /// Records superseded by a newer one for the same key.
    pub collapsed: u64,
}

impl Collapsed {
    fn next_sorted(&mut self) -> Result<Option<Row>, WriteError> {
        if let Some(rows) = self.only.as_mut() {
            return Ok(rows.next());
        }
        let Some(std::cmp::Reverse((_, i, row))) = self.heap.pop() else {
            return Ok(None);
        };
        if let Some(next) = self.sources[i].next_row()? {
            self.heap
                .push(std::cmp::Reverse((next.sort_key(), i, next)));
        }
        Ok(Some(row))
    }
}

impl Iterator for Collapsed {
    type Item = Result<Row, WriteError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.next_sorted() {
                Err(e) => return Some(Err(e)),
                Ok(None) => return self.pending.take().map(Ok),
                Ok(Some(row)) => match self.pending {
                    // Same key, higher origin (the merge yields a key's rows oldest first).
                    Some(p) if p.same_key(&row) => {
                        self.collapsed += 1;
                        self.pending = Some(row);
                    }
                    Some(p) => {
                        self.pending = Some(row);
                        return Some(Ok(p));
                    }
                    None => self.pending = Some(row),
                },
            }
        }
    }
}

impl Drop for Collapsed {
    fn drop(&mut self) {
        for path in &self.runs {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for PartitionRows {
    fn drop(&mut self) {
        for path in &self.runs {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The output row for `row`.
pub fn usage_row(row: &Row, origins: &[Origin]) -> Option<UsageRow> {
    let origin = origins.get(row.origin as usize)?;
    Some(UsageRow {
        account_name: origin.account_name.clone(),
        iccid: row.iccid.iccid()?,
        usage_start: row.usage_start,
        usage_end: row.usage_end,
        data_usage_bytes: row.counts[0],
        sms_usage: row.counts[1],
        mo_sms: row.counts[2],
        mt_sms: row.counts[3],
        request_id: origin.request_id.clone(),
        received_at: origin.received_at,
    })
}

/// A value with a fixed-size binary encoding (little-endian numbers), for spill files.
trait Fixed: Sized {
    const BYTES: usize;
    /// Writes `self` into `out`, exactly [`Fixed::BYTES`] long.
    fn put(&self, out: &mut [u8]);
    /// Reads a value from `from`, exactly [`Fixed::BYTES`] long; `None` if it is not one.
    fn get(from: &[u8]) -> Option<Self>;
}

macro_rules! fixed_number {
    ($($t:ty),*) => {$(
        impl Fixed for $t {
            const BYTES: usize = std::mem::size_of::<$t>();
            fn put(&self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_le_bytes());
            }
            fn get(from: &[u8]) -> Option<Self> {
                Some(<$t>::from_le_bytes(from.try_into().ok()?))
            }
        }
    )*};
}
fixed_number!(i64, u32, u64);

impl<T: Fixed + Copy + Default, const N: usize> Fixed for [T; N] {
    const BYTES: usize = N * T::BYTES;
    fn put(&self, out: &mut [u8]) {
        for (value, out) in self.iter().zip(out.chunks_exact_mut(T::BYTES)) {
            value.put(out);
        }
    }
    fn get(from: &[u8]) -> Option<Self> {
        let mut values = [T::default(); N];
        for (value, from) in values.iter_mut().zip(from.chunks_exact(T::BYTES)) {
            *value = T::get(from)?;
        }
        Some(values)
    }
}

/// [`Iccid::key`], checked when read back.
impl Fixed for IccidKey {
    const BYTES: usize = 8;
    fn put(&self, out: &mut [u8]) {
        self.0.put(out);
    }
    fn get(from: &[u8]) -> Option<Self> {
        let key = u64::get(from)?;
        Iccid::from_key(key).map(|_| IccidKey(key))
    }
}

macro_rules! fixed_layout {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $($(#[$field_meta:meta])* pub $field:ident: $ty:ty,)*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $($(#[$field_meta])* pub $field: $ty,)*
        }

        impl Fixed for $name {
            const BYTES: usize = 0 $(+ <$ty as Fixed>::BYTES)*;
            fn put(&self, out: &mut [u8]) {
                let mut at = 0;
                $(
                    self.$field.put(&mut out[at..at + <$ty as Fixed>::BYTES]);
                    at += <$ty as Fixed>::BYTES;
                )*
                debug_assert_eq!(at, Self::BYTES);
            }
            fn get(from: &[u8]) -> Option<Self> {
                let mut at = 0;
                $(
                    let $field = <$ty as Fixed>::get(from.get(at..at + <$ty as Fixed>::BYTES)?)?;
                    at += <$ty as Fixed>::BYTES;
                )*
                debug_assert_eq!(at, Self::BYTES);
                Some($name { $($field),* })
            }
        }
    };
}
use fixed_layout;

#[cfg(test)]
mod tests {
    use super::*;

    fn record(iccid: &str, day: i64, minute: i64, data: i64) -> ParsedRecord {
        let start = 1_628_985_600_000_000 + day * 86_400_000_000 + minute * 60_000_000;
        ParsedRecord {
            iccid: Iccid::parse(iccid).expect("iccid"),
            usage_start: start,
            usage_end: start + 60_000_000,
            data_usage_bytes: data,
            sms_usage: 1,
            mo_sms: 0,
            mt_sms: 1,
            recovered: false,
            luhn_warning: false,
        }
    }

    /// Same rows, newest wins, whether everything fits in memory or most rows were spilled.
    #[test]
    fn a_row_reads_back_from_its_spill_encoding() {
        let rows = [
            Row {
                iccid: Iccid::parse("89148000000000000012").expect("iccid").into(),
                usage_start: -1,
                usage_end: i64::MAX,
                counts: [0, 1, i64::MIN, 3],
                origin: u32::MAX,
            },
            Row {
                iccid: Iccid::parse("8914800000000000001").expect("iccid").into(),
                usage_start: 1_628_985_600_000_000,
                usage_end: 1_629_072_000_000_000,
                counts: [3072, 2, 1, 1],
                origin: 7,
            },
        ];
        // The ICCID's key, six i64, one u32.
        assert_eq!(SPILL_ROW_BYTES, 60);
        assert_eq!(std::mem::size_of::<Row>(), 64);
        for row in rows {
            let mut buf = [0u8; SPILL_ROW_BYTES];
            row.put(&mut buf);
            assert_eq!(Row::get(&buf), Some(row));
        }
        assert_eq!(Row::get(&[0u8; 10]), None, "a short row is not a row");
    }

    #[test]
    fn spilling_changes_nothing_in_the_result() {
        // 19- and 20-digit ICCIDs, so that the row key's order is checked against the text's; and
        // enough rows that the in-memory sort takes two threads.
        let iccids: Vec<String> = (0..30)
            .map(|k| match k % 2 {
                0 => format!("89148000000800139{k:03}"),
                _ => format!("8914800000080013{k:03}"),
            })
            .collect();
        let keys = iccids.len() as i64 * 1000;
        let collect = |memory_bytes: usize| {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut set = RowSet::new(PartitionBy::Day, Arc::from("a"), memory_bytes, dir.path());
            for round in 0..3i64 {
                for day in 0..2i64 {
                    let n = round * 10 + day;
                    let o = set.add_origin(&format!("r{n}"), None, n);
                    for i in 0..keys {
                        let iccid = &iccids[(i % 30) as usize];
                        // Keys repeat across rounds: the last round's value must win.
                        let r = record(iccid, day, i / 30, i / 30 * 1000 + round);
                        set.push(o, &r).expect("push");
                    }
                }
            }
            let mut out = Vec::new();
            for name in set.partition_names() {
                let part = set.take(&name).expect("part");
                let records_in = part.records_in;
                let mut rows = part.collapsed().expect("merge");
                let mut got = Vec::new();
                for row in rows.by_ref() {
                    got.push(usage_row(&row.expect("row"), set.origins()).expect("origin"));
                }
                out.push((name, records_in, rows.collapsed, got));
            }
            let leftovers = std::fs::read_dir(dir.path()).map_or(0, |d| d.count());
            (out, leftovers)
        };
        let (in_memory, _) = collect(1 << 30);
        let (spilled, leftovers) = collect(0); // the budget floor: 1,024 rows
        assert_eq!(leftovers, 0, "run files are removed");
        assert_eq!(in_memory.len(), 2);
        for (name, records_in, collapsed, rows) in &in_memory {
            assert_eq!(*records_in as usize, 3 * keys as usize, "{name}");
            assert!(*records_in as usize >= PARALLEL_SORT_ROWS);
            // 30 ICCIDs x 1,000 minutes, each key received in 3 rounds.
            assert_eq!(rows.len(), keys as usize);
            assert_eq!(*collapsed, 2 * keys as u64);
            assert!(
                rows.iter().all(|r| r.data_usage_bytes % 1000 == 2),
                "last round wins"
            );
            assert!(
                rows.windows(2)
                    .all(|w| (w[0].iccid, w[0].usage_start) < (w[1].iccid, w[1].usage_start))
            );
        }
        assert_eq!(in_memory, spilled);
    }
}
