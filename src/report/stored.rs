//! Stored run reports: `tsusage report [RUN_ID|latest]` finds `{output.dir}/runs/{run_id}.json`.

use std::path::{Path, PathBuf};

/// A stored report that cannot be shown.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The run id asked for is not one, or has no report (exit code 2).
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ReportError {
    fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ReportError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = ReportError> = std::result::Result<T, E>;

/// The report of `run_id` (or of the most recent run for `latest`) under `out_dir/runs/`: its path
/// and its JSON.
pub fn load(out_dir: &Path, run_id: &str) -> Result<(PathBuf, serde_json::Value)> {
    let runs = out_dir.join("runs");
    let path = if run_id == "latest" {
        latest(&runs)?
    } else {
        if run_id.is_empty() || run_id.contains(['/', '\\']) || run_id.starts_with('.') {
            return Err(ReportError::Usage(format!("{run_id:?} is not a run id")));
        }
        let path = runs.join(format!("{run_id}.json"));
        if !path.is_file() {
            return Err(ReportError::Usage(format!(
                "no report for run {run_id}: {} does not exist (`tsusage report latest` shows the last one)",
                path.display()
            )));
        }
        path
    };
    let text = std::fs::read_to_string(&path).map_err(|e| ReportError::io(&path, e))?;
    let value = serde_json::from_str(&text)
        .map_err(|e| ReportError::Usage(format!("{}: not a run report: {e}", path.display())))?;
    Ok((path, value))
}

/// The newest report in `runs`: run ids start with their UTC start time, so the greatest name is
/// the latest run.
fn latest(runs: &Path) -> Result<PathBuf> {
    let none = || {
        ReportError::Usage(format!(
            "no run report in {}: no command has finished with this output.dir yet",
            runs.display()
        ))
    };
    let entries = match std::fs::read_dir(runs) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(none()),
        Err(e) => return Err(ReportError::io(runs, e)),
    };
    let mut newest: Option<PathBuf> = None;
    for entry in entries {
        let path = entry.map_err(|e| ReportError::io(runs, e))?.path();
        let is_report = path.extension().is_some_and(|e| e == "json")
            && path
                .file_name()
                .is_some_and(|n| !n.to_string_lossy().starts_with('.'));
        if is_report
            && newest
                .as_ref()
                .is_none_or(|n| path.file_name() > n.file_name())
        {
            newest = Some(path);
        }
    }
    newest.ok_or_else(none)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_is_the_greatest_run_id_and_an_unknown_id_is_a_usage_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(
            load(dir.path(), "latest")
                .expect_err("empty")
                .to_string()
                .contains("no run report in")
        );
        let runs = dir.path().join("runs");
        std::fs::create_dir_all(&runs).expect("runs");
        for id in ["20260101T000000Z-00001", "20260102T000000Z-00002"] {
            std::fs::write(
                runs.join(format!("{id}.json")),
                format!("{{\"run_id\":\"{id}\"}}"),
            )
            .expect("write");
        }
        std::fs::write(runs.join("20260103T000000Z-00003-completeness.csv"), "x").expect("csv");
        let (path, value) = load(dir.path(), "latest").expect("latest");
        assert_eq!(value["run_id"], "20260102T000000Z-00002");
        assert!(path.ends_with("20260102T000000Z-00002.json"));
        let (_, value) = load(dir.path(), "20260101T000000Z-00001").expect("by id");
        assert_eq!(value["run_id"], "20260101T000000Z-00001");
        let err = load(dir.path(), "nope").expect_err("unknown").to_string();
        assert!(err.contains("no report for run nope"), "{err}");
        assert!(load(dir.path(), "../x").is_err());
    }
}
