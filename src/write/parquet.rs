//! Parquet schema v1 and the partition writer: zstd, statistics, key-value metadata, atomic publish.
//!
//! A partition (`usage/usage_date=2021-08-15/`) is always written whole: its files are built in
//! `{out}/.staging/`, fsynced, and swapped in with one `renameat2(RENAME_EXCHANGE)` (or a plain rename
//! when the partition is new), then the directory is fsynced. A reader lists either the old partition
//! or the new one, never a mix, never a half-written file. File names are deterministic:
//! `part-00000.parquet`, `part-00001.parquet`, ... (a new file past `output.max_rows_per_file` rows).
//! With `output.url` the same bytes are uploaded instead, one object per partition
//! ([`crate::output::bucket`] says why).
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use tsusage::ingest::Iccid;
//! use tsusage::normalize::UsageRow;
//! use tsusage::write::parquet::{PartitionWriter, WriterOptions};
//! let out = tempfile::tempdir()?;
//! let row = UsageRow {
//!     account_name: Arc::from("0000123456-00001"),
//!     iccid: Iccid::parse("89148000000800139702")?,
//!     usage_start: 1_628_985_600_000_000,
//!     usage_end: 1_629_072_000_000_000,
//!     data_usage_bytes: 3072, sms_usage: 0, mo_sms: 0, mt_sms: 0,
//!     request_id: Arc::from("595f5c44-c31c-4552-8670-020a1545a84d"),
//!     received_at: 1_629_072_100_000_000,
//! };
//! let writer = PartitionWriter::new(out.path(), WriterOptions::new("run-1"));
//! let written = writer.write("usage_date=2021-08-15", &[row])?;
//! assert_eq!((written.rows, written.files), (1, 1));
//! assert!(out.path().join("usage/usage_date=2021-08-15/part-00000.parquet").exists());
//! # Ok(()) }
//! ```

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{Int64Builder, StringBuilder, TimestampMicrosecondBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_writer::{ArrowColumnChunk, ArrowColumnWriter, compute_leaves};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use super::{WriteError, sync_dir};
use crate::normalize::UsageRow;
use crate::normalize::collapse::{Origin, Row};
use crate::output::bucket::Bucket;

/// Version of the output schema, stored in each file's key-value metadata.
pub const SCHEMA_VERSION: &str = "1";
/// Metadata keys on every file.
pub const META_SCHEMA_VERSION: &str = "tsusage.schema_version";
pub const META_TOOL_VERSION: &str = "tsusage.tool_version";
pub const META_RUN_ID: &str = "tsusage.run_id";
/// Rows per Arrow batch handed to the Parquet writer (bounds the memory of one write step). Small
/// enough (about 1 MB of buffers) that the allocator hands the same memory to batch after batch: at
/// 64 Ki rows each batch's 8 MB were mapped fresh, a quarter of an ingest's page faults.
const BATCH_ROWS: usize = 8 * 1024;
/// Rows per row group (the size Parquet readers parallelize over; the writer's default).
const ROW_GROUP_ROWS: u64 = 1024 * 1024;
/// Threads encoding the columns of a row group.
const ENCODE_LANES: usize = 2;

/// Schema v1 (README, "The output"). Timestamps are µs, UTC; counts are Int64; `data_usage_bytes`
/// is bytes.
pub fn schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("account_name", DataType::Utf8, false),
        Field::new("iccid", DataType::Utf8, false),
        Field::new("usage_start", ts.clone(), false),
        Field::new("usage_end", ts.clone(), false),
        Field::new("data_usage_bytes", DataType::Int64, false),
        Field::new("sms_usage", DataType::Int64, false),
        Field::new("mo_sms", DataType::Int64, false),
        Field::new("mt_sms", DataType::Int64, false),
        Field::new("request_id", DataType::Utf8, false),
        Field::new("received_at", ts, false),
    ]))
}

/// How files are written.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    pub run_id: String,
    pub zstd_level: i32,
    pub max_rows_per_file: u64,
}

impl WriterOptions {
    pub fn new(run_id: &str) -> Self {
        WriterOptions {
            run_id: run_id.to_owned(),
            zstd_level: crate::config::DEFAULT_ZSTD_LEVEL,
            max_rows_per_file: crate::config::DEFAULT_MAX_ROWS_PER_FILE,
        }
    }
}

/// What a partition write produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub rows: u64,
    pub files: u64,
}

/// Writes whole partitions under `{out}/usage/`, or, with a bucket, under `{prefix}/usage/` on
/// object storage (one object per partition, see [`crate::output::bucket`]).
#[derive(Debug)]
pub struct PartitionWriter {
    usage_dir: PathBuf,
    staging_dir: PathBuf,
    options: WriterOptions,
    bucket: Option<Arc<Bucket>>,
}

impl PartitionWriter {
    pub fn new(out_dir: &Path, options: WriterOptions) -> Self {
        PartitionWriter {
            usage_dir: out_dir.join("usage"),
            staging_dir: out_dir.join(".staging"),
            options,
            bucket: None,
        }
    }

    /// Publishes to `bucket` instead of `{out}/usage/`; files are still encoded in `{out}/.staging/`.
    pub fn with_bucket(mut self, bucket: Option<Arc<Bucket>>) -> Self {
        self.bucket = bucket;
        self
    }

    /// Removes what an interrupted write left in the staging area (never visible to readers).
    pub fn clean_staging(&self) -> Result<(), WriteError> {
        match std::fs::remove_dir_all(&self.staging_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(WriteError::io(&self.staging_dir, e)),
        }
    }

    /// Replaces partition `name` (e.g. `usage_date=2021-08-15`) with `rows`, atomically.
    pub fn write(&self, name: &str, rows: &[UsageRow]) -> Result<Written, WriteError> {
        self.write_rows(name, rows.iter().cloned().map(Ok))
    }

    /// Replaces partition `name` with the rows of an iterator (streamed: a batch at a time), atomically.
    /// An error from the iterator abandons the write; the previous partition stays as it was.
    pub fn write_rows(
        &self,
        name: &str,
        rows: impl Iterator<Item = Result<UsageRow, WriteError>>,
    ) -> Result<Written, WriteError> {
        self.write_source(name, UsageRows(rows.peekable()))
    }

    /// [`PartitionWriter::write_rows`] for collapsed rows (in their order) and the callbacks they
    /// came from: the columns are filled from them directly, with no [`UsageRow`] in between. A row
    /// whose origin is not in `origins` abandons the write.
    pub fn write_collapsed(
        &self,
        name: &str,
        rows: impl Iterator<Item = Result<Row, WriteError>>,
        origins: &[Origin],
    ) -> Result<Written, WriteError> {
        self.write_source(
            name,
            CollapsedRows {
                rows: rows.peekable(),
                origins,
            },
        )
    }

    fn write_source(&self, name: &str, mut rows: impl RowSource) -> Result<Written, WriteError> {
        let stage = self
            .staging_dir
            .join(format!("{name}.{}", self.options.run_id));
        if stage.exists() {
            std::fs::remove_dir_all(&stage).map_err(|e| WriteError::io(&stage, e))?;
        }
        std::fs::create_dir_all(&stage).map_err(|e| WriteError::io(&stage, e))?;
        // On object storage a partition is one object (the atomic unit there).
        let per_file = match self.bucket {
            Some(_) => u64::MAX,
            None => self.options.max_rows_per_file.max(1),
        };
        let schema = schema();
        let (mut files, mut total) = (0u64, 0u64);
        while rows.has_more() {
            let path = stage.join(format!("part-{files:05}.parquet"));
            files += 1;
            let (mut writer, factory) = self
                .open_file(&path)?
                .into_serialized_writer()
                .map_err(parquet_err(&path))?;
            let mut in_file = 0u64;
            let mut row_group = 0usize;
            while in_file < per_file && rows.has_more() {
                let take = usize::try_from((per_file - in_file).min(ROW_GROUP_ROWS))
                    .unwrap_or(ROW_GROUP_ROWS as usize);
                let columns = factory
                    .create_column_writers(row_group)
                    .map_err(parquet_err(&path))?;
                let (chunks, n) = encode_row_group(&schema, columns, &mut rows, take, &path)?;
                let mut group = writer.next_row_group().map_err(parquet_err(&path))?;
                for chunk in chunks {
                    chunk
                        .append_to_row_group(&mut group)
                        .map_err(parquet_err(&path))?;
                }
                group.close().map_err(parquet_err(&path))?;
                in_file += n;
                total += n;
                row_group += 1;
            }
            let file = writer.into_inner().map_err(parquet_err(&path))?;
            file.sync_all().map_err(|e| WriteError::io(&path, e))?;
        }
        sync_dir(&stage)?;
        crate::failpoint::pause(crate::failpoint::PARQUET_PUBLISH);
        if let Some(bucket) = &self.bucket {
            let staged: Vec<PathBuf> = (0..files)
                .map(|i| stage.join(format!("part-{i:05}.parquet")))
                .collect();
            bucket.replace_partition(name, &staged)?;
            std::fs::remove_dir_all(&stage).map_err(|e| WriteError::io(&stage, e))?;
            return Ok(Written { rows: total, files });
        }
        std::fs::create_dir_all(&self.usage_dir).map_err(|e| WriteError::io(&self.usage_dir, e))?;
        let target = self.usage_dir.join(name);
        publish(&stage, &target)?;
        sync_dir(&self.usage_dir)?;
        // After the swap, `stage` holds the previous partition (if any): no reader can reach it.
        if stage.exists() {
            std::fs::remove_dir_all(&stage).map_err(|e| WriteError::io(&stage, e))?;
        }
        Ok(Written { rows: total, files })
    }

    fn open_file(&self, path: &Path) -> Result<ArrowWriter<File>, WriteError> {
        let file = File::create(path).map_err(|e| WriteError::io(path, e))?;
        let level = ZstdLevel::try_new(self.options.zstd_level).map_err(parquet_err(path))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(level))
            .set_statistics_enabled(EnabledStatistics::Page)
            // Nearly every value of these is distinct within a row group: a dictionary only costs
            // time (it is built, then abandoned past its size limit) and bytes.
            .set_column_dictionary_enabled(ColumnPath::from("iccid"), false)
            .set_column_dictionary_enabled(ColumnPath::from("request_id"), false)
            .set_column_dictionary_enabled(ColumnPath::from("data_usage_bytes"), false)
            .set_created_by(format!("tsusage {}", env!("CARGO_PKG_VERSION")))
            .set_key_value_metadata(Some(vec![
                KeyValue::new(META_SCHEMA_VERSION.to_owned(), SCHEMA_VERSION.to_owned()),
                KeyValue::new(
                    META_TOOL_VERSION.to_owned(),
                    env!("CARGO_PKG_VERSION").to_owned(),
                ),
                KeyValue::new(META_RUN_ID.to_owned(), self.options.run_id.clone()),
            ]))
            .build();
        ArrowWriter::try_new(file, schema(), Some(props)).map_err(parquet_err(path))
    }
}

fn parquet_err(path: &Path) -> impl Fn(parquet::errors::ParquetError) -> WriteError + '_ {
    move |e| WriteError::Parquet {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// Encodes one row group: the columns are split between two threads (every other column each) while
/// this thread turns rows into Arrow batches. Returns the column chunks in schema order and the rows.
fn encode_row_group(
    schema: &SchemaRef,
    writers: Vec<ArrowColumnWriter>,
    rows: &mut impl RowSource,
    take: usize,
    path: &Path,
) -> Result<(Vec<ArrowColumnChunk>, u64), WriteError> {
    let mut lanes: Vec<Vec<(usize, ArrowColumnWriter)>> =
        (0..ENCODE_LANES).map(|_| Vec::new()).collect();
    for (i, writer) in writers.into_iter().enumerate() {
        lanes[i % ENCODE_LANES].push((i, writer));
    }
    std::thread::scope(|scope| {
        let mut senders = Vec::with_capacity(ENCODE_LANES);
        let mut handles = Vec::with_capacity(ENCODE_LANES);
        for mut lane in lanes {
            let (tx, rx) = std::sync::mpsc::sync_channel::<RecordBatch>(2);
            senders.push(tx);
            handles.push(scope.spawn(move || {
                for batch in rx {
                    for (i, writer) in lane.iter_mut() {
                        for leaf in compute_leaves(batch.schema().field(*i), batch.column(*i))? {
                            writer.write(&leaf)?;
                        }
                    }
                }
                lane.into_iter()
                    .map(|(i, writer)| writer.close().map(|chunk| (i, chunk)))
                    .collect::<parquet::errors::Result<Vec<_>>>()
            }));
        }
        let mut n = 0u64;
        while n < take as u64 {
            let want = (take - n as usize).min(BATCH_ROWS);
            let Some(batch) = rows.next_batch(schema, want, path)? else {
                break;
            };
            crate::failpoint::fail(crate::failpoint::PARQUET_WRITE)
                .map_err(|e| WriteError::io(path, e))?;
            n += batch.num_rows() as u64;
            // A lane that failed has hung up: its error comes out of join below.
            if senders.iter().any(|tx| tx.send(batch.clone()).is_err()) {
                break;
            }
        }
        drop(senders);
        let mut chunks = Vec::new();
        for handle in handles {
            let lane = handle
                .join()
                .map_err(|_| WriteError::Parquet {
                    path: path.to_owned(),
                    message: "a column encoder panicked".into(),
                })?
                .map_err(parquet_err(path))?;
            chunks.extend(lane);
        }
        chunks.sort_by_key(|(i, _)| *i);
        Ok((chunks.into_iter().map(|(_, c)| c).collect(), n))
    })
}

/// Where a partition's rows come from, a batch at a time.
trait RowSource {
    /// Whether anything is left (a row, or an error to report).
    fn has_more(&mut self) -> bool;
    /// The next batch of at most `max` rows (at least one), `None` when nothing is left. An error
    /// (from the rows, or building the batch) abandons the write.
    fn next_batch(
        &mut self,
        schema: &SchemaRef,
        max: usize,
        path: &Path,
    ) -> Result<Option<RecordBatch>, WriteError>;
}

fn arrow_err(path: &Path) -> impl Fn(arrow_schema::ArrowError) -> WriteError + '_ {
    move |e| WriteError::Parquet {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// Rows as [`UsageRow`]s.
struct UsageRows<I: Iterator>(std::iter::Peekable<I>);

impl<I: Iterator<Item = Result<UsageRow, WriteError>>> RowSource for UsageRows<I> {
    fn has_more(&mut self) -> bool {
        self.0.peek().is_some()
    }

    fn next_batch(
        &mut self,
        schema: &SchemaRef,
        max: usize,
        path: &Path,
    ) -> Result<Option<RecordBatch>, WriteError> {
        let mut chunk = Vec::with_capacity(max.min(BATCH_ROWS));
        for row in self.0.by_ref().take(max) {
            chunk.push(row?);
        }
        if chunk.is_empty() {
            return Ok(None);
        }
        to_batch(schema, &chunk).map(Some).map_err(arrow_err(path))
    }
}

/// Collapsed rows and their origins, typed straight into the column builders.
struct CollapsedRows<'a, I: Iterator> {
    rows: std::iter::Peekable<I>,
    origins: &'a [Origin],
}

impl<I: Iterator<Item = Result<Row, WriteError>>> RowSource for CollapsedRows<'_, I> {
    fn has_more(&mut self) -> bool {
        self.rows.peek().is_some()
    }

    fn next_batch(
        &mut self,
        schema: &SchemaRef,
        max: usize,
        path: &Path,
    ) -> Result<Option<RecordBatch>, WriteError> {
        if self.rows.peek().is_none() {
            return Ok(None);
        }
        let mut columns = Columns::with_capacity(max);
        for row in self.rows.by_ref().take(max) {
            let row = row?;
            let origin =
                self.origins
                    .get(row.origin as usize)
                    .ok_or_else(|| WriteError::Parquet {
                        path: path.to_owned(),
                        message: "a row without its callback".into(),
                    })?;
            let iccid = row.iccid.iccid().ok_or_else(|| WriteError::Parquet {
                path: path.to_owned(),
                message: "a row with a damaged ICCID".into(),
            })?;
            columns.push(
                &origin.account_name,
                iccid.as_str(),
                row.usage_start,
                row.usage_end,
                row.counts,
                &origin.request_id,
                origin.received_at,
            );
        }
        columns.finish(schema).map(Some).map_err(arrow_err(path))
    }
}

/// The column builders of one batch of schema v1.
struct Columns {
    account: StringBuilder,
    iccid: StringBuilder,
    start: TimestampMicrosecondBuilder,
    end: TimestampMicrosecondBuilder,
    /// data_usage_bytes, sms_usage, mo_sms, mt_sms.
    counts: [Int64Builder; 4],
    request: StringBuilder,
    received: TimestampMicrosecondBuilder,
}

impl Columns {
    /// Builders sized for `n` rows (ICCIDs of 20 digits, request ids of 36 characters).
    fn with_capacity(n: usize) -> Self {
        let ts = || TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
        Columns {
            account: StringBuilder::with_capacity(n, n * 16),
            iccid: StringBuilder::with_capacity(n, n * 20),
            start: ts(),
            end: ts(),
            counts: std::array::from_fn(|_| Int64Builder::with_capacity(n)),
            request: StringBuilder::with_capacity(n, n * 36),
            received: ts(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn push(
        &mut self,
        account: &str,
        iccid: &str,
        start: i64,
        end: i64,
        counts: [i64; 4],
        request: &str,
        received: i64,
    ) {
        self.account.append_value(account);
        self.iccid.append_value(iccid);
        self.start.append_value(start);
        self.end.append_value(end);
        for (builder, count) in self.counts.iter_mut().zip(counts) {
            builder.append_value(count);
        }
        self.request.append_value(request);
        self.received.append_value(received);
    }

    fn finish(self, schema: &SchemaRef) -> Result<RecordBatch, arrow_schema::ArrowError> {
        let Columns {
            mut account,
            mut iccid,
            mut start,
            mut end,
            counts,
            mut request,
            mut received,
        } = self;
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(10);
        columns.push(Arc::new(account.finish()));
        columns.push(Arc::new(iccid.finish()));
        columns.push(Arc::new(start.finish()));
        columns.push(Arc::new(end.finish()));
        for mut count in counts {
            columns.push(Arc::new(count.finish()));
        }
        columns.push(Arc::new(request.finish()));
        columns.push(Arc::new(received.finish()));
        RecordBatch::try_new(schema.clone(), columns)
    }
}

/// Builds one Arrow batch of schema v1 from rows.
pub fn to_batch(
    schema: &SchemaRef,
    rows: &[UsageRow],
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let mut columns = Columns::with_capacity(rows.len());
    for r in rows {
        columns.push(
            &r.account_name,
            r.iccid.as_str(),
            r.usage_start,
            r.usage_end,
            [r.data_usage_bytes, r.sms_usage, r.mo_sms, r.mt_sms],
            &r.request_id,
            r.received_at,
        );
    }
    columns.finish(schema)
}

/// Puts `stage` at `target`: an atomic exchange when `target` exists (leaving the old one at `stage`),
/// a rename when it does not.
fn publish(stage: &Path, target: &Path) -> Result<(), WriteError> {
    if !target.exists() {
        return std::fs::rename(stage, target).map_err(|e| WriteError::io(target, e));
    }
    match exchange(stage, target) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) => {
            // The filesystem cannot exchange: move the old partition aside, then the new one in.
            // Readers may briefly see no partition, but never a mixed or half-written one.
            let aside = stage.with_extension("old");
            std::fs::rename(target, &aside).map_err(|e| WriteError::io(target, e))?;
            std::fs::rename(stage, target).map_err(|e| WriteError::io(target, e))?;
            std::fs::rename(&aside, stage).map_err(|e| WriteError::io(&aside, e))
        }
        Err(e) => Err(WriteError::io(target, e)),
    }
}

/// Swaps two paths atomically (Linux `renameat2` with `RENAME_EXCHANGE`).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    let to_c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (a, b) = (to_c(a)?, to_c(b)?);
    // SAFETY: both pointers are valid NUL-terminated strings that live across the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
