//! A run folder's claim by one process, so that several `flowlab run`s of one sweep (one
//! per GPU, or started twice by mistake) share its runs instead of training each twice.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::ErrorKind;
use std::path::Path;

use crate::{Error, Result};

/// The claim's file inside a run folder.
pub const LOCK_FILE: &str = ".lock";

/// An exclusive OS lock on a file (`flock`), released when this is dropped or the process
/// ends, however it ends (no stale claims after a crash or kill). On a filesystem without
/// file locks it is granted unguarded.
#[derive(Debug)]
pub struct FileLock {
    _file: Option<File>,
}

impl FileLock {
    /// Claims `run_dir` (created if missing) with a lock on `<run>/.lock`; `None` while
    /// another process holds it.
    pub fn try_claim(run_dir: &Path) -> Result<Option<FileLock>> {
        std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
        let path = run_dir.join(LOCK_FILE);
        let file = open(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(FileLock { _file: Some(file) })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) if e.kind() == ErrorKind::Unsupported => {
                tracing::warn!(path = %path.display(), "no file locks here: runs are not guarded against a second flowlab process");
                Ok(Some(FileLock { _file: None }))
            }
            Err(TryLockError::Error(e)) => Err(Error::io(&path, e)),
        }
    }

    /// Waits for and takes the lock on `path` (created if missing): one process at a
    /// time writes an experiment's tables.
    pub fn hold(path: &Path) -> Result<FileLock> {
        let file = open(path)?;
        match file.lock() {
            Ok(()) => Ok(FileLock { _file: Some(file) }),
            Err(e) if e.kind() == ErrorKind::Unsupported => Ok(FileLock { _file: None }),
            Err(e) => Err(Error::io(path, e)),
        }
    }
}

/// The lock file at `path`, created if missing, its contents left alone.
fn open(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))
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
        let first = FileLock::try_claim(&run).unwrap();
        assert!(first.is_some());
        // A second claim (another open file description, as another process has) waits.
        assert!(FileLock::try_claim(&run).unwrap().is_none());
        drop(first);
        assert!(FileLock::try_claim(&run).unwrap().is_some());
    }

    #[test]
    fn clearing_keeps_only_the_claim() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("r");
        let _claim = FileLock::try_claim(&run).unwrap().unwrap();
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
