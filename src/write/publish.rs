//! Publishing: every partition the journal has news for, written whole and swapped in atomically
//! (docs/architecture.md, invariants 3 and 5). A partition is written from the rows a command kept
//! of the callbacks it journaled when they are all of it, otherwise rebuilt from its archive files
//! and the journal.

use std::path::PathBuf;
use std::sync::Arc;

use crate::collect::archive;
use crate::config::Config;
use crate::normalize::collapse::{Origin, PartitionRows, RowSet};
use crate::normalize::payload::{CallbackKind, parse_callback};
use crate::normalize::{partition_key, partition_of};
use crate::output::WriteError;
use crate::state::{PendingPartition, Store, StoredCallback};
use crate::write::parquet::{PartitionWriter, WriterOptions};

/// What stops publishing.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Output(#[from] WriteError),
    /// An archive file of a partition being rebuilt cannot be read.
    #[error(transparent)]
    Archive(#[from] crate::collect::CollectError),
}

pub type Result<T, E = PublishError> = std::result::Result<T, E>;

/// One partition written by this run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionReport {
    /// e.g. `usage_date=2021-08-15`
    pub partition: String,
    /// Rows in the partition now (it is rewritten whole).
    pub rows: u64,
    pub files: u64,
    /// Usage records read from the journal for it, before collapsing.
    pub records_in: u64,
    /// Records replaced by a newer one for the same (iccid, usage_start, usage_end).
    pub collapsed: u64,
}

/// What the write stage did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct OutputReport {
    pub partitions: Vec<PartitionReport>,
    pub rows_written: u64,
    pub files_written: u64,
    pub collapsed: u64,
    /// Where the partitions are when not below `output.dir`: `s3://bucket/prefix/usage/`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
}

/// Memory for usage rows while partitions are built; past it, rows are sorted and spilled to disk.
pub const ROW_MEMORY_BYTES: usize = 64 * 1024 * 1024;

/// Where rows spill: beside the output, never inside `usage/`.
fn spill_dir(config: &Config) -> PathBuf {
    config.output.dir.join(".spill")
}

/// An empty set for the rows of the callbacks a command journals (left-overs of a crashed run are
/// removed: the command holds the run lock).
pub fn fresh_rows(config: &Config) -> Result<RowSet> {
    let dir = spill_dir(config);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(WriteError::io(&dir, e).into()),
    }
    Ok(RowSet::new(
        config.output.partition_by,
        Arc::from(config.account_name.as_str()),
        ROW_MEMORY_BYTES,
        &dir,
    ))
}

/// Rewrites every partition whose journal has callbacks newer than its last write
/// (docs/architecture.md, invariant 3: the output is a function of the journal, so this can run at
/// any time).
///
/// `fresh` holds the rows of the callbacks this command journaled. A partition whose every journaled
/// callback is among them is written from them directly; any other is rebuilt from the journal.
pub fn publish<S: Store + ?Sized>(
    config: &Config,
    store: &mut S,
    run_id: &str,
    mut fresh: Option<RowSet>,
) -> Result<OutputReport> {
    let bucket = crate::output::bucket::Bucket::open(&config.output)?.map(Arc::new);
    let writer = PartitionWriter::new(
        &config.output.dir,
        WriterOptions {
            run_id: run_id.to_owned(),
            zstd_level: config.output.zstd_level,
            max_rows_per_file: config.output.max_rows_per_file,
        },
    )
    .with_bucket(bucket.clone());
    writer.clean_staging()?;
    // Partitions whose every journaled callback this command holds the rows of are written from
    // them; the others are rebuilt from the journal (each writer thread with its own connection).
    let mut plan = std::collections::VecDeque::new();
    for pending in store.pending_partitions()? {
        // A partition whose older callbacks are archived is rebuilt from its archive and journal.
        let archives = store.partition_archives(&pending.partition)?;
        let mine = match fresh.as_mut().and_then(|f| f.take(&pending.partition)) {
            Some(part)
                if archives.is_empty()
                    && part.origins
                        == store.partition_callbacks(&pending.partition, pending.through_id)? =>
            {
                Some(part)
            }
            _ => None,
        };
        plan.push_back((pending, mine, archives));
    }
    let fresh_origins = fresh.as_ref().map_or(&[][..], RowSet::origins);
    let plan = std::sync::Mutex::new(plan);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut output = OutputReport {
        location: bucket
            .as_ref()
            .map(|b| b.url_of(&format!("{}/", crate::output::bucket::USAGE_DIR))),
        ..OutputReport::default()
    };
    std::thread::scope(|scope| -> Result<()> {
        // Two partitions at a time: one's fsyncs and renames overlap the other's encoding.
        let (done_tx, done) = std::sync::mpsc::channel::<Result<PartitionDone>>();
        for _ in 0..PARTITION_WRITERS {
            let done_tx = done_tx.clone();
            let (plan, stop, writer) = (&plan, &stop, &writer);
            scope.spawn(move || {
                let mut reader = None;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let next = plan.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                    let Some((pending, mine, archives)) = next else {
                        break;
                    };
                    let result = write_partition(
                        config,
                        writer,
                        &mut reader,
                        (pending, mine, archives),
                        fresh_origins,
                    );
                    if done_tx.send(result).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        let mut first_error = None;
        for result in done {
            match result {
                Ok(p) => {
                    store.mark_written(
                        &p.partition,
                        p.through_id,
                        p.written.rows,
                        p.written.files,
                        run_id,
                    )?;
                    tracing::info!(
                        partition = p.partition,
                        rows = p.written.rows,
                        files = p.written.files,
                        rebuilt = p.rebuilt,
                        "partition written"
                    );
                    output.rows_written += p.written.rows;
                    output.files_written += p.written.files;
                    output.collapsed += p.collapsed;
                    output.partitions.push(PartitionReport {
                        partition: p.partition,
                        rows: p.written.rows,
                        files: p.written.files,
                        records_in: p.records_in,
                        collapsed: p.collapsed,
                    });
                }
                Err(e) => {
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    })?;
    output
        .partitions
        .sort_by(|a, b| a.partition.cmp(&b.partition));
    let _ = std::fs::remove_dir_all(spill_dir(config));
    Ok(output)
}

/// Partitions written at the same time.
const PARTITION_WRITERS: usize = 2;

/// A partition written and published, to be recorded in the store.
struct PartitionDone {
    partition: String,
    through_id: i64,
    written: crate::write::parquet::Written,
    records_in: u64,
    collapsed: u64,
    rebuilt: bool,
}

/// A partition to write: what is pending, this command's rows of it if they are all of it, and the
/// archive files holding its older callbacks.
type PartitionPlan = (PendingPartition, Option<PartitionRows>, Vec<String>);

/// Writes one partition: from this command's rows (`mine`) or rebuilt from its archive files and the
/// journal through `reader` (opened on first use).
fn write_partition(
    config: &Config,
    writer: &PartitionWriter,
    reader: &mut Option<Box<dyn Store + Send>>,
    (pending, mine, archives): PartitionPlan,
    fresh_origins: &[Origin],
) -> Result<PartitionDone> {
    let (part, rebuilt) = match mine {
        Some(part) => (part, None),
        None => {
            let store = match reader {
                Some(store) => store,
                None => reader.insert(crate::state::open(&config.state)?),
            };
            let mut set = rebuild(
                config,
                &**store,
                &pending.partition,
                pending.through_id,
                &archives,
            )?;
            let part = set
                .take(&pending.partition)
                .unwrap_or_else(|| PartitionRows::empty(&pending.partition));
            (part, Some(set))
        }
    };
    let origins = rebuilt.as_ref().map_or(fresh_origins, RowSet::origins);
    let records_in = part.records_in;
    let mut merged = part.collapsed()?;
    let written = writer.write_collapsed(&pending.partition, merged.by_ref(), origins)?;
    Ok(PartitionDone {
        partition: pending.partition,
        through_id: pending.through_id,
        written,
        records_in,
        collapsed: merged.collapsed,
        rebuilt: rebuilt.is_some(),
    })
}

/// The rows of `partition` from its archived callbacks (in `archives`) and every journaled callback
/// with id ≤ `through_id`, all oldest received first (ties by journal id), so that the newest wins
/// when collapsed.
fn rebuild<S: Store + ?Sized>(
    config: &Config,
    store: &S,
    partition: &str,
    through_id: i64,
    archives: &[String],
) -> Result<RowSet> {
    let by = config.output.partition_by;
    let strict = config.input.strict_luhn;
    // Each writer thread rebuilds one partition at a time: the budget is shared between them.
    let mut set = RowSet::new(
        by,
        Arc::from(config.account_name.as_str()),
        ROW_MEMORY_BYTES / PARTITION_WRITERS,
        &spill_dir(config),
    );
    // Whether a partition key is this partition's, for the last key seen (records come in runs).
    let mut last: Option<(i64, bool)> = None;
    let mut add = |set: &mut RowSet, cb: StoredCallback| -> Result<()> {
        let Ok(parsed) = parse_callback(&cb.body) else {
            return Ok(());
        };
        let CallbackKind::Usage(records) = &parsed.kind else {
            return Ok(());
        };
        let origin = set.add_origin(
            &parsed.request_id,
            cb.account_name.as_deref(),
            cb.received_at,
        );
        for r in records.parsed(strict).flatten() {
            let key = partition_key(r.usage_start, by);
            let mine = match last {
                Some((k, mine)) if k == key => mine,
                _ => {
                    let mine = partition_of(r.usage_start, by) == partition;
                    last = Some((key, mine));
                    mine
                }
            };
            if mine {
                set.push(origin, &r)?;
            }
        }
        Ok(())
    };
    let mut archived = archived_callbacks(config, partition, archives)?
        .into_iter()
        .peekable();
    crate::state::try_each(
        |each| store.callbacks_for_partition(partition, through_id, each),
        |cb| {
            while let Some(older) =
                archived.next_if(|a| (a.received_at, a.id) < (cb.received_at, cb.id))
            {
                add(&mut set, older.stored()?)?;
            }
            add(&mut set, cb)
        },
    )?;
    for older in archived {
        add(&mut set, older.stored()?)?;
    }
    Ok(set)
}

/// An archived callback of a partition being rebuilt, its body compressed while it waits its turn.
struct Archived {
    id: i64,
    received_at: i64,
    request_id: String,
    account_name: Option<String>,
    body: Vec<u8>,
    encoding: &'static str,
}

impl Archived {
    fn stored(self) -> Result<StoredCallback> {
        let text = if self.encoding == "zstd" {
            zstd::stream::decode_all(self.body.as_slice())
                .map_err(|e| WriteError::io(std::path::Path::new(ARCHIVE_MEMORY), e))?
        } else {
            self.body
        };
        Ok(StoredCallback {
            id: self.id,
            request_id: self.request_id,
            received_at: self.received_at,
            body: String::from_utf8(text).map_err(|e| {
                WriteError::io(
                    std::path::Path::new(ARCHIVE_MEMORY),
                    std::io::Error::other(e),
                )
            })?,
            account_name: self.account_name,
        })
    }
}

/// Names the in-memory copy of archived bodies in errors.
const ARCHIVE_MEMORY: &str = "(archived callbacks in memory)";

/// The archived callbacks of `partition` in `archives`, oldest received first.
fn archived_callbacks(
    config: &Config,
    partition: &str,
    archives: &[String],
) -> Result<Vec<Archived>> {
    let root = archive::archive_dir(&config.output.dir);
    let mut out = Vec::new();
    for file in archives {
        archive::read(&root.join(file), &mut |cb| {
            if cb.partitions.iter().any(|p| p == partition) {
                let (body, encoding) = crate::state::encode_body(&cb.body);
                out.push(Archived {
                    id: cb.id,
                    received_at: cb.received_at,
                    request_id: cb.request_id,
                    account_name: cb.account_name,
                    body,
                    encoding,
                });
            }
            Ok(())
        })?;
    }
    out.sort_by_key(|a| (a.received_at, a.id));
    Ok(out)
}
