//! A run folder's claim by one process, so that several `flowlab run`s of one sweep (one
//! per GPU, or started twice by mistake) share its runs instead of training each twice.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;

use crate::{Error, Result};

/// The claim's file inside a run folder.
pub const LOCK_FILE: &str = ".lock";

/// An exclusive claim on a run folder: an OS lock on `<run>/.lock`, released when this is
/// dropped or the process ends, however it ends (no stale claims after a crash or kill).
#[derive(Debug)]
pub struct RunLock {
    _file: Option<File>,
}

impl RunLock {
    /// Claims `run_dir` (created if missing); `None` while another process holds it.
    /// On a filesystem without file locks the claim is granted unguarded.
    pub fn try_claim(run_dir: &Path) -> Result<Option<RunLock>> {
        std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
        let path = run_dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(RunLock { _file: Some(file) })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported => {
                tracing::warn!(path = %path.display(), "no file locks here: runs are not guarded against a second flowlab process");
                Ok(Some(RunLock { _file: None }))
            }
            Err(TryLockError::Error(e)) => Err(Error::io(&path, e)),
        }
    }
}

/// A blocking exclusive lock on a file, held until dropped: one process at a time writes
/// an experiment's tables.
#[derive(Debug)]
pub struct Held {
    _file: Option<File>,
}

/// Waits for and takes the exclusive lock on `path` (created if missing).
pub fn hold(path: &Path) -> Result<Held> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    match file.lock() {
        Ok(()) => Ok(Held { _file: Some(file) }),
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => Ok(Held { _file: None }),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Removes everything in `run_dir` but its claim (a forced rerun starts from nothing).
pub fn clear_run_dir(run_dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(run_dir).map_err(|e| Error::io(run_dir, e))?;
    for e in entries {
        let p = e.map_err(|e| Error::io(run_dir, e))?.path();
        if p.file_name().is_some_and(|n| n == LOCK_FILE) {
            continue;
        }
        let removed = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        removed.map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_claim_at_a_time_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("runs/a-1");
        let first = RunLock::try_claim(&run).unwrap();
        assert!(first.is_some());
        // A second claim (another open file description, as another process has) waits.
        assert!(RunLock::try_claim(&run).unwrap().is_none());
        drop(first);
        assert!(RunLock::try_claim(&run).unwrap().is_some());
    }

    #[test]
    fn clearing_keeps_only_the_claim() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("r");
        let _claim = RunLock::try_claim(&run).unwrap().unwrap();
        std::fs::write(run.join("result.json"), "{}").unwrap();
        std::fs::create_dir(run.join("sub")).unwrap();
        std::fs::write(run.join("sub/x"), "x").unwrap();
        clear_run_dir(&run).unwrap();
        let left: Vec<_> = std::fs::read_dir(&run)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![LOCK_FILE]);
    }
}
