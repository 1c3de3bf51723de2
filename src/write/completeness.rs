//! The completeness file, `out/runs/<run_id>-completeness.csv`: every planned (ICCID, window) of a
//! run that did not end as usage, with its state, reason, job and requestIds.

use std::path::{Path, PathBuf};

use super::{WriteError, write_atomic_with};
use crate::collect::tracker::CompletenessRow;

/// Writes a run's completeness file under `out_dir/runs/`; returns its path.
pub fn write_for_run(
    out_dir: &Path,
    run_id: &str,
    rows: &[CompletenessRow],
) -> Result<PathBuf, WriteError> {
    let path = out_dir
        .join("runs")
        .join(format!("{run_id}-completeness.csv"));
    write(&path, rows)?;
    Ok(path)
}

/// Writes `rows` to `path` atomically, streamed (a run over millions of ICCID-days has hundreds of
/// thousands of rows).
pub fn write(path: &Path, rows: &[CompletenessRow]) -> Result<(), WriteError> {
    write_atomic_with(path, |file| {
        let mut out = csv::Writer::from_writer(file);
        out.write_record([
            "iccid",
            "window_start",
            "window_end",
            "state",
            "reason",
            "job_id",
            "request_ids",
        ])?;
        for r in rows {
            out.write_record([
                r.iccid.as_str(),
                &r.window_start,
                &r.window_end,
                r.state.name(),
                &r.reason,
                &r.job_id,
                &r.request_ids,
            ])?;
        }
        out.flush()
    })
}
