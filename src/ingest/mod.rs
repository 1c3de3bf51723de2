//! Stage 1, ingest: ICCID lists from CSV files → a deduplicated `Vec<Iccid>`, bad rows to the rejects file.

mod csv_list;
mod iccid;

pub use csv_list::{IccidList, IngestOptions, IngestStats, read_iccid_files, read_iccid_source};
pub(crate) use iccid::describe_char;
pub use iccid::{Iccid, IccidError, luhn_check_digit};

/// An input file that cannot be read at all (a bad row is a reject, not an error).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Rejects(#[from] crate::output::WriteError),
}
