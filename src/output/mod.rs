//! Files the stages write besides Parquet, and the durability helpers they share: the rejects files
//! ([`rejects`]), the output error ([`WriteError`]), atomic whole-file writes and directory fsyncs,
//! and object storage when `output.url` is set ([`bucket`]).
//! Below every stage, so that each one can reject input and write durably.

pub mod bucket;
pub mod rejects;

use std::path::{Path, PathBuf};

/// A failure to write output. The previous output stays as it was.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: writing Parquet: {message}")]
    Parquet { path: PathBuf, message: String },
    #[error("{path}: writing CSV: {message}")]
    Csv { path: PathBuf, message: String },
    /// Object storage (`output.url`): `url` is the `s3://` URL concerned, never a credential.
    #[error("{url}: {message}")]
    Bucket { url: String, message: String },
}

impl WriteError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        WriteError::Io {
            path: path.to_owned(),
            source,
        }
    }

    pub(crate) fn csv(path: &Path, e: csv::Error) -> Self {
        WriteError::Csv {
            path: path.to_owned(),
            message: e.to_string(),
        }
    }
}

/// Syncs a directory so that a rename or a new entry in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), WriteError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| WriteError::io(dir, e))
}

/// Writes `bytes` to `path` atomically: a temp file beside it, fsync, rename, fsync the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    write_atomic_with(path, |out| {
        use std::io::Write;
        out.write_all(bytes)
    })
}

/// [`write_atomic`] for content produced by `fill` as it goes (never held whole in memory).
pub(crate) fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<(), WriteError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| WriteError::io(dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let file = std::fs::File::create(&tmp).map_err(|e| WriteError::io(&tmp, e))?;
    let mut out = std::io::BufWriter::new(file);
    fill(&mut out)
        .and_then(|()| out.into_inner().map_err(|e| e.into_error()))
        .and_then(|file| file.sync_all())
        .map_err(|e| WriteError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| WriteError::io(path, e))?;
    sync_dir(dir)
}
