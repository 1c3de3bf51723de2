//! `RunLock`: one run at a time per state store, held with `flock` on `<state>.lock`.
//!
//! The kernel drops the lock when the holder's process dies, however it dies, so a lock left by a
//! killed run never blocks the next one: the next run takes it over and says so. The file holds the
//! holder's run id, command, pid and start time, so a refused run can name who holds it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::StateError;

/// Held for a run's lifetime; released (and the file emptied) on drop.
#[derive(Debug)]
pub struct RunLock {
    file: File,
    path: PathBuf,
}

impl RunLock {
    /// Takes the lock of the store at `state_path`, or says who holds it.
    pub fn acquire(state_path: &Path, run_id: &str, command: &str) -> Result<RunLock, StateError> {
        let mut name = state_path.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        let io = |source| StateError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        // SAFETY: flock on a file descriptor we own, for as long as `file` lives.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        let mut previous = String::new();
        file.read_to_string(&mut previous).map_err(io)?;
        let previous = previous.trim().to_owned();
        if !locked {
            let holder = if previous.is_empty() {
                "another tsusage process".to_owned()
            } else {
                previous
            };
            return Err(StateError::Invalid {
                path: state_path.display().to_string(),
                message: format!(
                    "in use by {holder}; wait for it to finish (the lock is {})",
                    path.display()
                ),
            });
        }
        if !previous.is_empty() {
            tracing::warn!(
                previous = %previous,
                "taking over the state store lock left by a run that did not finish (it is no longer running)"
            );
        }
        let me = format!(
            "tsusage {command} (run {run_id}, pid {}, started {})",
            std::process::id(),
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(me.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(RunLock { file, path })
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Emptied so that the next run does not think this one was killed; the lock itself is
        // released when the file closes.
        if let Err(e) = self.file.set_len(0) {
            tracing::debug!(path = %self.path.display(), error = %e, "cannot empty the lock file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_by_name_and_a_released_lock_is_free() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("s/t.db");
        let first = RunLock::acquire(&state, "run-1", "run").expect("first");
        let err = RunLock::acquire(&state, "run-2", "run")
            .expect_err("held")
            .to_string();
        assert!(
            err.contains("in use by tsusage run (run run-1, pid"),
            "{err}"
        );
        drop(first);
        let second = RunLock::acquire(&state, "run-3", "ingest").expect("free again");
        drop(second);
    }
}
