//! Making a file appear complete or not at all: a hidden
//! `.<name>.partial-<random>` file next to the destination, fsynced and
//! renamed onto it without replacing anything; and the fast copy engine
//! (reflink clone, `copy_file_range` over data extents, read/write).

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::progress::Progress;
use super::{absolute, io_err, ImageError};

/// Bytes per `copy_file_range` call; each chunk's writeback is started at
/// once so the final fsync has little left to do (measured best at 4-32 MiB).
const COPY_CHUNK: u64 = 8 << 20;
/// Buffer of the read/write fallback.
const RW_BUFFER: usize = 4 << 20;

pub(super) fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

// ---------------------------------------------------------------------------
// temporary files and atomic rename

fn random_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut buf = [0u8; 8];
    // SAFETY: buf is valid for 8 bytes.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), libc::GRND_NONBLOCK) };
    let mut v = u64::from_ne_bytes(buf);
    if n != buf.len() as isize {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        v = nanos ^ (u64::from(std::process::id()) << 32);
    }
    v ^= COUNTER
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    format!("{v:016x}")
}

fn partial_prefix(name: &OsStr) -> OsString {
    let mut p = OsString::from(".");
    p.push(name);
    p.push(".partial-");
    p
}

/// Splits an absolute destination into its folder and file name.
pub(super) fn split_dest(dest: &Path) -> Result<(PathBuf, PathBuf, OsString), ImageError> {
    let abs = absolute(dest)?;
    let (Some(dir), Some(name)) = (abs.parent(), abs.file_name()) else {
        return Err(ImageError::NotAFile { path: abs });
    };
    Ok((dir.to_path_buf(), abs.clone(), name.to_os_string()))
}

/// Removes `.<name>.partial-*` left in `dir` by a crash.
pub(super) fn remove_stale_partials(dir: &Path, name: &OsStr) {
    let prefix = partial_prefix(name);
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().as_bytes().starts_with(prefix.as_bytes()) {
            let p = entry.path();
            match fs::remove_file(&p) {
                Ok(()) => tracing::info!("removed {} left by an interrupted copy", p.display()),
                Err(e) => tracing::warn!("cannot remove stale {}: {e}", p.display()),
            }
        }
    }
}

/// A `.<name>.partial-<random>` file, removed on drop unless `persist`ed.
pub(crate) struct Partial {
    pub(super) path: PathBuf,
    armed: bool,
}

impl Partial {
    pub(crate) fn create(dir: &Path, name: &OsStr) -> Result<(Partial, File), ImageError> {
        let mut file_name = partial_prefix(name);
        file_name.push(random_suffix());
        let path = dir.join(file_name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(format!(
                "cannot create a temporary file in {}",
                dir.display()
            )))?;
        Ok((Partial { path, armed: true }, file))
    }

    /// fsyncs the file (reopened: qemu-img may have written it), renames it
    /// onto `dest` without replacing anything, and fsyncs the folder.
    pub(crate) fn persist(mut self, dest: &Path) -> Result<(), ImageError> {
        let f = File::open(&self.path)
            .map_err(io_err(format!("cannot reopen {}", self.path.display())))?;
        f.sync_all().map_err(io_err(format!(
            "cannot flush {} to disk",
            self.path.display()
        )))?;
        drop(f);
        rename_noreplace(&self.path, dest)?;
        self.armed = false;
        if let Some(dir) = dest.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(format!("cannot flush folder {}", dir.display())))?;
        }
        Ok(())
    }
}

impl Partial {
    /// Where the temporary file is.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// fsyncs the file and renames it onto `dest`, replacing what is there
    /// (rename(2) is atomic: `dest` is the old file or the new one); the
    /// caller fsyncs the folder.
    pub(super) fn persist_replacing(mut self, dest: &Path) -> Result<(), ImageError> {
        File::open(&self.path)
            .and_then(|f| f.sync_all())
            .map_err(io_err(format!(
                "cannot flush {} to disk",
                self.path.display()
            )))?;
        fs::rename(&self.path, dest).map_err(io_err(format!(
            "cannot rename {} to {}",
            self.path.display(),
            dest.display()
        )))?;
        self.armed = false;
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = fs::remove_file(&self.path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!("cannot remove {}: {e}", self.path.display());
                }
            }
        }
    }
}

fn cstring(p: &Path) -> Result<CString, ImageError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| ImageError::Io {
        what: format!("bad path {}", p.display()),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })
}

/// rename(2) that fails if `to` exists (RENAME_NOREPLACE; checked by hand on
/// filesystems without it).
fn rename_noreplace(from: &Path, to: &Path) -> Result<(), ImageError> {
    let (cf, ct) = (cstring(from)?, cstring(to)?);
    // SAFETY: both are valid NUL-terminated strings.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cf.as_ptr(),
            libc::AT_FDCWD,
            ct.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    let what = || format!("cannot rename {} to {}", from.display(), to.display());
    match err.raw_os_error() {
        Some(libc::EEXIST) => Err(ImageError::Exists {
            path: to.to_path_buf(),
        }),
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            if fs::symlink_metadata(to).is_ok() {
                return Err(ImageError::Exists {
                    path: to.to_path_buf(),
                });
            }
            fs::rename(from, to).map_err(io_err(what()))
        }
        _ => Err(ImageError::Io {
            what: what(),
            source: err,
        }),
    }
}

/// Like `cp -p` for mode and times; the owner may always read and write, and
/// set-id bits are dropped (the copy belongs to vman's user, not the source's).
pub(super) fn keep_mode_and_times(file: &File, meta: &fs::Metadata) -> io::Result<()> {
    let mode = (meta.permissions().mode() & 0o777) | 0o600;
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    let times = [
        libc::timespec {
            tv_sec: meta.atime() as libc::time_t,
            tv_nsec: meta.atime_nsec() as libc::c_long,
        },
        libc::timespec {
            tv_sec: meta.mtime() as libc::time_t,
            tv_nsec: meta.mtime_nsec() as libc::c_long,
        },
    ];
    // SAFETY: valid fd and a two-element timespec array.
    if unsafe { libc::futimens(file.as_raw_fd(), times.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn errno_in(e: &io::Error, set: &[i32]) -> bool {
    e.raw_os_error().is_some_and(|n| set.contains(&n))
}

/// Errors that mean "this filesystem/kernel cannot do that", not "it failed".
const UNSUPPORTED: &[i32] = &[
    libc::EOPNOTSUPP,
    libc::ENOTSUP,
    libc::EXDEV,
    libc::EINVAL,
    libc::ENOSYS,
    libc::ENOTTY,
];

/// Copies `len` bytes of `src` into the empty `dst`. `fast` allows reflink
/// and copy_file_range (tests turn it off to check the fallback).
/// `progress` gets the method and, after every chunk, the offset reached in
/// the source (holes count as done: they are skipped, not copied).
pub(super) fn copy_contents(
    src: &File,
    dst: &File,
    len: u64,
    fast: bool,
    progress: &Progress,
) -> io::Result<&'static str> {
    progress.begin(len);
    if fast {
        progress.set_method("reflink");
        // SAFETY: both fds are open for the duration of the call.
        let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
        if rc == 0 {
            progress.finish();
            return Ok("reflink");
        }
        let e = io::Error::last_os_error();
        if !errno_in(&e, UNSUPPORTED) && !errno_in(&e, &[libc::EPERM, libc::EBADF]) {
            return Err(e);
        }
    }
    dst.set_len(len)?;
    let mut use_cfr = fast;
    progress.set_method(if fast {
        "copy_file_range"
    } else {
        "read_write"
    });
    let mut pos = 0;
    while pos < len {
        let Some((data, end)) = next_data(src, pos, len)? else {
            break;
        };
        progress.advance_to(data);
        copy_range(src, dst, data, end - data, &mut use_cfr, progress)?;
        pos = end;
    }
    progress.finish();
    Ok(if use_cfr {
        "copy_file_range"
    } else {
        "read_write"
    })
}

/// The next data extent at or after `pos`: SEEK_DATA/SEEK_HOLE, or all of
/// the rest where the filesystem cannot tell.
fn next_data(src: &File, pos: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
    let fd = src.as_raw_fd();
    // SAFETY: plain lseek on an open fd.
    let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some((pos, len))),
            _ => Err(e),
        };
    }
    let data = (data as u64).min(len);
    if data >= len {
        return Ok(None);
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
    let end = if hole < 0 {
        len
    } else {
        (hole as u64).min(len)
    };
    Ok(Some((data, end.max(data))))
}

/// Starts writing `len` bytes at `offset` of `dst` to disk now, so that the
/// final fsync overlaps the copy instead of following it. Advisory only.
fn start_writeback(dst: &File, offset: u64, len: u64) {
    // SAFETY: plain syscall on an open fd; failure is harmless.
    unsafe {
        libc::sync_file_range(
            dst.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

fn copy_range(
    src: &File,
    dst: &File,
    offset: u64,
    count: u64,
    use_cfr: &mut bool,
    progress: &Progress,
) -> io::Result<()> {
    let mut off = offset;
    let end = offset + count;
    while *use_cfr && off < end {
        let mut off_in = off as libc::loff_t;
        let mut off_out = off as libc::loff_t;
        let want = (end - off).min(COPY_CHUNK) as usize;
        // SAFETY: valid fds and offset pointers.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        if n > 0 {
            start_writeback(dst, off, n as u64);
            off += n as u64;
            progress.advance_to(off);
        } else if n == 0 {
            return Ok(()); // the source got shorter
        } else {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if errno_in(&e, UNSUPPORTED) {
                *use_cfr = false;
                progress.set_method("read_write");
            } else {
                return Err(e);
            }
        }
    }
    let mut buf = vec![0u8; RW_BUFFER.min((end - off) as usize)];
    while off < end {
        let want = ((end - off) as usize).min(buf.len());
        let n = read_full_at(src, &mut buf[..want], off)?;
        if n == 0 {
            return Ok(());
        }
        dst.write_all_at(&buf[..n], off)?;
        off += n as u64;
        progress.advance_to(off);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::image::testutil::*;

    #[test]
    fn read_write_fallback_copies_sparse_files() {
        let d = TempDir::new().unwrap();
        let src = d.path().join("sparse");
        let f = File::create(&src).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&random_bytes(100_000), 3 << 20).unwrap();
        f.write_all_at(b"end", (8 << 20) - 3).unwrap();
        let dst_path = d.path().join("copy");
        let dst = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&dst_path)
            .unwrap();
        let progress = Progress::new();
        let method =
            copy_contents(&File::open(&src).unwrap(), &dst, 8 << 20, false, &progress).unwrap();
        assert_eq!(method, "read_write");
        let seen = progress.snapshot();
        assert_eq!(
            (seen.method, seen.bytes_done, seen.bytes_total),
            ("read_write", 8 << 20, 8 << 20)
        );
        assert_eq!(fs::read(&dst_path).unwrap(), fs::read(&src).unwrap());
        let dst2_path = d.path().join("copy2");
        let dst2 = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&dst2_path)
            .unwrap();
        let progress = Progress::new();
        copy_contents(&File::open(&src).unwrap(), &dst2, 8 << 20, true, &progress).unwrap();
        assert_eq!(progress.snapshot().bytes_done, 8 << 20);
        assert_eq!(fs::read(&dst2_path).unwrap(), fs::read(&src).unwrap());
        // Holes stay holes.
        assert!(fs::metadata(&dst2_path).unwrap().blocks() * 512 < 2 << 20);
    }
}
