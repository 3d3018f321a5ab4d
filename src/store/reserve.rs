//! The space reserve of the database: a preallocated file next to it
//! (`{db}-reserve`, `VMAN_DB_RESERVE_MIB`). When a write that records what
//! already happened (a QEMU that is gone) meets a full filesystem, the
//! reserve is deleted and the write tried once more, so the recorded state
//! stays true. The observer puts the reserve back once the filesystem has
//! room for it twice over.

use std::fs::File;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{Store, StoreError};
use crate::sync::LockExt;

pub(super) struct Reserve {
    path: Option<PathBuf>,
    bytes: u64,
    /// Why the reserve is not in place, when it is not.
    missing: Mutex<Option<String>>,
}

impl Reserve {
    pub(super) fn none() -> Self {
        Self {
            path: None,
            bytes: 0,
            missing: Mutex::new(None),
        }
    }

    pub(super) fn new(path: PathBuf, bytes: u64) -> Self {
        let missing = fill(&path, bytes)
            .err()
            .map(|e| format!("cannot set aside {bytes} bytes at {}: {e}", path.display()));
        if let Some(m) = &missing {
            tracing::warn!("database space reserve: {m}");
        }
        Self {
            path: Some(path),
            bytes,
            missing: Mutex::new(missing),
        }
    }

    fn missing(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.missing.lock_or_recover()
    }
}

/// Allocates `bytes` of real blocks at `path` (fallocate, else zeros).
fn fill(path: &Path, bytes: u64) -> std::io::Result<()> {
    let mut file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    let len = libc::off_t::try_from(bytes).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: fallocate(2) on a file descriptor we own; no memory is shared.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    let done = if rc == 0 {
        Ok(())
    } else {
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) => {
                let zeros = vec![0u8; 64 * 1024];
                let mut left = bytes;
                let mut r = Ok(());
                while left > 0 && r.is_ok() {
                    let n = left.min(zeros.len() as u64) as usize;
                    r = file.write_all(&zeros[..n]);
                    left -= n as u64;
                }
                r
            }
            _ => Err(err),
        }
    };
    match done.and_then(|()| file.sync_all()) {
        Ok(()) => Ok(()),
        Err(e) => {
            drop(file);
            let _ = std::fs::remove_file(path);
            Err(e)
        }
    }
}

/// Free bytes for unprivileged users on the filesystem of `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs(2) fills the struct we pass; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

impl Store {
    /// Runs `f`, a write that records what already happened. On a full
    /// filesystem the space reserve is given up and `f` is tried once more.
    pub fn reserved<T>(
        &self,
        f: impl Fn(&Store) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match f(self) {
            Err(StoreError::Full(e)) => {
                let Some(path) = &self.reserve.path else {
                    return Err(StoreError::Full(e));
                };
                let mut missing = self.reserve.missing();
                if missing.is_some() {
                    drop(missing);
                    return f(self);
                }
                match std::fs::remove_file(path) {
                    Ok(()) => tracing::warn!(
                        "the filesystem of the database is full: gave up its {} byte space \
                         reserve to record a state change; free some space",
                        self.reserve.bytes
                    ),
                    Err(err) => tracing::error!("cannot remove {}: {err}", path.display()),
                }
                *missing = Some("given up on a full filesystem to record a state change".into());
                drop(missing);
                f(self)
            }
            other => other,
        }
    }

    /// Puts the space reserve back when the filesystem has room for it
    /// twice over (observer pass). Returns why it is still missing.
    pub fn refill_reserve(&self) -> Option<String> {
        let path = self.reserve.path.as_ref()?;
        let mut missing = self.reserve.missing();
        missing.as_ref()?;
        let dir = path.parent().unwrap_or(Path::new("."));
        if free_bytes(dir).is_some_and(|free| free >= 2 * self.reserve.bytes) {
            match fill(path, self.reserve.bytes) {
                Ok(()) => {
                    tracing::info!("database space reserve back in place ({})", path.display());
                    *missing = None;
                }
                Err(e) => *missing = Some(format!("cannot set aside its space again: {e}")),
            }
        }
        missing.clone()
    }

    /// Why the space reserve is not in place, if it is not.
    pub fn reserve_missing(&self) -> Option<String> {
        self.reserve.missing().clone()
    }
}
