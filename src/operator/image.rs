//! Disk image files on this host: what an image is (`qemu-img info`), which
//! paths a user may name as an image (the allowed image folders), and making a
//! VM's root disk from a boot disk — copied (reflink clone, `copy_file_range`,
//! or `qemu-img convert` for raw sources), overlaid (qcow2 linked clone), or
//! created empty — always atomically: the work happens in a hidden
//! `.<name>.partial-<random>` file next to the destination, which is fsynced
//! and renamed onto the destination only when complete, so a crash or a full
//! disk never leaves a destination that a later start would boot.
//!
//! Synchronous: the async callers run it in `tokio::task::spawn_blocking`.
//! `qemu-img` is always run with an argument vector (never a shell), with an
//! explicit `-f` whenever the format is known, and is killed if vman dies.

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Disk sizes given to qemu-img are rounded up to whole sectors.
const SECTOR: u64 = 512;
/// Bytes per `copy_file_range` call; each chunk's writeback is started at
/// once so the final fsync has little left to do (measured best at 4-32 MiB).
const COPY_CHUNK: u64 = 8 << 20;
/// Buffer of the read/write fallback.
const RW_BUFFER: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot run {}: {source}; install qemu-img (package qemu-utils) or set VMAN_QEMU_IMG", .program.display())]
    Spawn { program: PathBuf, source: io::Error },
    #[error("qemu-img {action} failed: {detail}")]
    QemuImg { action: String, detail: String },
    #[error("{} cannot be read as a disk image: {detail}", .path.display())]
    Unreadable { path: PathBuf, detail: String },
    #[error("{} is a {format} image; only qcow2 and raw are supported", .path.display())]
    UnsupportedFormat { path: PathBuf, format: String },
    #[error("{} is not a disk image ({reason}); give a qcow2 or raw image", .path.display())]
    NotAnImage { path: PathBuf, reason: String },
    #[error("{} does not exist or cannot be read: {source}", .path.display())]
    NotFound { path: PathBuf, source: io::Error },
    #[error("{} is not a regular file; give an image file", .path.display())]
    NotAFile { path: PathBuf },
    #[error("{} is outside the allowed image folders ({allowed}); put the image in one of them or add its folder to VMAN_IMAGE_DIRS", .path.display())]
    NotAllowed { path: PathBuf, allowed: String },
    #[error("none of the allowed image folders exists ({configured}); create one or set VMAN_IMAGE_DIRS")]
    NoAllowedDirs { configured: String },
    #[error("{} already exists; refusing to overwrite it", .path.display())]
    Exists { path: PathBuf },
    #[error("cannot shrink {} from {current} to {requested} bytes; disks can only grow", .path.display())]
    Shrink {
        path: PathBuf,
        current: u64,
        requested: u64,
    },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Qcow2,
    Raw,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }

    /// The format named by qemu-img, if it is one we support.
    pub fn parse(s: &str) -> Option<ImageFormat> {
        match s {
            "qcow2" => Some(ImageFormat::Qcow2),
            "raw" => Some(ImageFormat::Raw),
            _ => None,
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageInfo {
    pub format: ImageFormat,
    /// Size of the disk the guest sees, in bytes.
    pub virtual_size: u64,
    /// Bytes allocated on the host, when qemu-img knows.
    pub actual_size: Option<u64>,
    /// The backing file as written in the image header (qcow2 overlays).
    pub backing_file: Option<String>,
}

/// The part of `qemu-img info --output=json` we read.
#[derive(Deserialize)]
struct QemuInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "actual-size")]
    actual_size: Option<u64>,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
}

/// How `provision` makes the root disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provision {
    /// An independent copy (raw sources are converted to qcow2).
    Copy,
    /// A qcow2 overlay whose backing file is the source (the source must stay).
    Overlay,
}

#[derive(Debug, Clone)]
pub struct ProvisionReport {
    /// `reflink`, `copy_file_range`, `read_write`, `convert` or `overlay`.
    pub method: &'static str,
    /// Length of the file made (for a copy: the bytes copied).
    pub bytes: u64,
    pub elapsed: Duration,
    /// The image made.
    pub info: ImageInfo,
}

// ---------------------------------------------------------------------------
// qemu-img

fn qemu_img_command(qemu_img: &Path) -> Command {
    let mut cmd = Command::new(qemu_img);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // English messages ("No space left on device") whatever the host locale.
        .env("LC_ALL", "C");
    // SAFETY: prctl is async-signal-safe; the closure touches nothing else.
    // A qemu-img child must not outlive a killed vman (it would keep writing
    // a partial file the next start deletes).
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            );
            Ok(())
        });
    }
    cmd
}

/// The useful part of qemu-img's stderr: its last lines, without the prefix.
fn stderr_detail(stderr: &[u8], status: std::process::ExitStatus) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim())
        .map(|l| l.strip_prefix("qemu-img: ").unwrap_or(l))
        .filter(|l| !l.is_empty())
        .collect();
    let mut detail = lines[lines.len().saturating_sub(3)..].join("; ");
    if detail.is_empty() {
        detail = format!("exited with {status}");
    }
    if detail.len() > 600 {
        let mut cut = 600;
        while !detail.is_char_boundary(cut) {
            cut -= 1;
        }
        detail.truncate(cut);
        detail.push('…');
    }
    detail
}

/// Runs qemu-img; Ok(stdout) on success, Err(detail) when it exits non-zero.
fn run_qemu_img(qemu_img: &Path, args: &[&OsStr]) -> Result<Result<Vec<u8>, String>, ImageError> {
    let out = qemu_img_command(qemu_img)
        .args(args)
        .output()
        .map_err(|source| ImageError::Spawn {
            program: qemu_img.to_path_buf(),
            source,
        })?;
    if out.status.success() {
        Ok(Ok(out.stdout))
    } else {
        Ok(Err(stderr_detail(&out.stderr, out.status)))
    }
}

/// Runs a qemu-img command that must succeed.
fn qemu_img_do(qemu_img: &Path, action: &str, args: &[&OsStr]) -> Result<(), ImageError> {
    run_qemu_img(qemu_img, args)?
        .map(|_| ())
        .map_err(|detail| ImageError::QemuImg {
            action: action.to_string(),
            detail,
        })
}

/// An absolute path, so that qemu never reads `name:rest` as a protocol.
fn absolute(path: &Path) -> Result<PathBuf, ImageError> {
    std::path::absolute(path).map_err(io_err(format!("cannot make {} absolute", path.display())))
}

fn round_up_sector(bytes: u64) -> u64 {
    bytes.div_ceil(SECTOR).saturating_mul(SECTOR)
}

// ---------------------------------------------------------------------------
// probe: the qcow2 header read directly

/// qcow2 magic, "QFI\xfb".
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// Incompatible feature bit 2: guest data lives in an external file.
const QCOW2_EXTERNAL_DATA_FILE: u64 = 1 << 2;

/// What `info` says about a qcow2, read from its header without spawning
/// `qemu-img` (which costs more than the rest of a VM start). Format,
/// virtual size and backing file come from the same header fields QEMU
/// itself reads; anything that is not a plain qcow2 goes through `info`.
/// An external data file (a second host file QEMU would open) is refused.
pub fn probe(qemu_img: &Path, path: &Path) -> Result<ImageInfo, ImageError> {
    let file = File::open(path).map_err(|source| ImageError::NotFound {
        path: path.to_owned(),
        source,
    })?;
    let mut header = [0u8; 104];
    let n = file.read_at(&mut header, 0).unwrap_or(0);
    if n < 72 || header[..4] != QCOW2_MAGIC {
        return info(qemu_img, path);
    }
    let be64 = |at: usize| u64::from_be_bytes(header[at..at + 8].try_into().unwrap_or([0; 8]));
    let be32 = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().unwrap_or([0; 4]));
    let version = be32(4);
    if version == 3 && n >= 104 && be64(72) & QCOW2_EXTERNAL_DATA_FILE != 0 {
        return Err(ImageError::UnsupportedFormat {
            path: path.to_owned(),
            format: "qcow2 with an external data file".into(),
        });
    }
    if !(version == 2 || version == 3) {
        return info(qemu_img, path);
    }
    let (backing_offset, backing_len) = (be64(8), be32(16));
    let backing_file = if backing_offset == 0 || backing_len == 0 {
        None
    } else if backing_len > 1023 {
        return info(qemu_img, path);
    } else {
        let mut name = vec![0u8; backing_len as usize];
        file.read_exact_at(&mut name, backing_offset)
            .map_err(|e| ImageError::Unreadable {
                path: path.to_owned(),
                detail: format!("backing file name: {e}"),
            })?;
        Some(String::from_utf8_lossy(&name).into_owned())
    };
    let meta = file
        .metadata()
        .map_err(io_err(format!("stat {}", path.display())))?;
    Ok(ImageInfo {
        format: ImageFormat::Qcow2,
        virtual_size: be64(24),
        actual_size: Some(meta.blocks() * 512),
        backing_file,
    })
}

// ---------------------------------------------------------------------------
// info

/// `qemu-img info -U --output=json <path>`: the image's format and sizes.
/// Only qcow2 and raw are accepted; a raw "image" that is plainly not a disk
/// (empty, not whole sectors, or text) is refused too.
pub fn info(qemu_img: &Path, path: &Path) -> Result<ImageInfo, ImageError> {
    info_as(qemu_img, path, None)
}

/// `info` with the format given (`-f`) instead of probed.
fn info_as(
    qemu_img: &Path,
    path: &Path,
    format: Option<ImageFormat>,
) -> Result<ImageInfo, ImageError> {
    let abs = absolute(path)?;
    let meta = fs::metadata(&abs).map_err(|source| ImageError::NotFound {
        path: abs.clone(),
        source,
    })?;
    if meta.is_dir() {
        return Err(ImageError::NotAFile { path: abs });
    }
    let mut args: Vec<&OsStr> = vec!["info".as_ref(), "-U".as_ref(), "--output=json".as_ref()];
    if let Some(f) = format {
        args.push(OsStr::new("-f"));
        args.push(OsStr::new(f.as_str()));
    }
    args.push(abs.as_os_str());
    let stdout = run_qemu_img(qemu_img, &args)?.map_err(|detail| ImageError::Unreadable {
        path: abs.clone(),
        detail,
    })?;
    let raw: QemuInfo = serde_json::from_slice(&stdout).map_err(|e| ImageError::Unreadable {
        path: abs.clone(),
        detail: format!("unexpected qemu-img output: {e}"),
    })?;
    let Some(fmt) = ImageFormat::parse(&raw.format) else {
        return Err(ImageError::UnsupportedFormat {
            path: abs,
            format: raw.format,
        });
    };
    if fmt == ImageFormat::Raw && meta.is_file() {
        check_raw_looks_like_disk(&abs, meta.len())?;
    }
    Ok(ImageInfo {
        format: fmt,
        virtual_size: raw.virtual_size,
        actual_size: raw.actual_size,
        backing_file: raw.backing_filename,
    })
}

/// qemu-img calls any file "raw"; refuse what is obviously not a disk.
fn check_raw_looks_like_disk(path: &Path, len: u64) -> Result<(), ImageError> {
    let refuse = |reason: String| ImageError::NotAnImage {
        path: path.to_path_buf(),
        reason,
    };
    if len == 0 {
        return Err(refuse("the file is empty".into()));
    }
    if !len.is_multiple_of(SECTOR) {
        return Err(refuse(format!(
            "{len} bytes is not a whole number of 512-byte sectors"
        )));
    }
    let file = File::open(path).map_err(|source| ImageError::NotFound {
        path: path.to_path_buf(),
        source,
    })?;
    let mut first = vec![0u8; SECTOR as usize];
    let n = read_full_at(&file, &mut first, 0)
        .map_err(io_err(format!("cannot read {}", path.display())))?;
    if looks_like_text(&first[..n]) {
        return Err(refuse("it contains text".into()));
    }
    Ok(())
}

fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
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

/// UTF-8 text without control characters other than whitespace. A boot
/// sector, a partition table or a filesystem's first sector never is.
fn looks_like_text(buf: &[u8]) -> bool {
    if buf.is_empty() {
        return false;
    }
    let valid = match std::str::from_utf8(buf) {
        Ok(s) => s,
        // A multi-byte character cut at the end of the sector is fine.
        Err(e) if e.error_len().is_none() => match std::str::from_utf8(&buf[..e.valid_up_to()]) {
            Ok(s) => s,
            Err(_) => return false,
        },
        Err(_) => return false,
    };
    valid
        .chars()
        .all(|c| !c.is_control() || matches!(c, '\n' | '\r' | '\t' | '\x0c'))
}

// ---------------------------------------------------------------------------
// allowed folders

/// Checks that `path`, after resolving symlinks, is a regular file inside one
/// of `allowed_dirs` (each resolved too; folders that do not exist are
/// skipped). Returns the canonical path.
pub fn resolve_allowed(path: &Path, allowed_dirs: &[PathBuf]) -> Result<PathBuf, ImageError> {
    let dirs: Vec<PathBuf> = allowed_dirs
        .iter()
        .filter_map(|d| fs::canonicalize(d).ok())
        .collect();
    let list = |ds: &[PathBuf]| {
        ds.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if dirs.is_empty() {
        return Err(ImageError::NoAllowedDirs {
            configured: if allowed_dirs.is_empty() {
                "none configured".into()
            } else {
                list(allowed_dirs)
            },
        });
    }
    let not_allowed = |p: PathBuf| ImageError::NotAllowed {
        path: p,
        allowed: list(&dirs),
    };
    let inside = |p: &Path| dirs.iter().any(|d| p.starts_with(d));
    match fs::canonicalize(path) {
        Ok(canonical) => {
            if !inside(&canonical) {
                return Err(not_allowed(path.to_path_buf()));
            }
            let meta = fs::metadata(&canonical).map_err(|source| ImageError::NotFound {
                path: path.to_path_buf(),
                source,
            })?;
            if !meta.is_file() {
                return Err(ImageError::NotAFile { path: canonical });
            }
            Ok(canonical)
        }
        Err(source) => {
            // Say "not found" only inside the allowed folders: outside them,
            // the API must not tell which host files exist.
            let lexical = std::path::absolute(path)
                .map(|p| normalize(&p))
                .unwrap_or_default();
            if !lexical.as_os_str().is_empty()
                && (inside(&lexical)
                    || allowed_dirs
                        .iter()
                        .any(|d| lexical.starts_with(normalize(d))))
            {
                Err(ImageError::NotFound {
                    path: path.to_path_buf(),
                    source,
                })
            } else {
                Err(not_allowed(path.to_path_buf()))
            }
        }
    }
}

/// `a/./b/../c` -> `a/c`, without touching the filesystem.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
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
fn split_dest(dest: &Path) -> Result<(PathBuf, PathBuf, OsString), ImageError> {
    let abs = absolute(dest)?;
    let (Some(dir), Some(name)) = (abs.parent(), abs.file_name()) else {
        return Err(ImageError::NotAFile { path: abs });
    };
    Ok((dir.to_path_buf(), abs.clone(), name.to_os_string()))
}

/// Removes `.<name>.partial-*` left in `dir` by a crash.
fn remove_stale_partials(dir: &Path, name: &OsStr) {
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
struct Partial {
    path: PathBuf,
    armed: bool,
}

impl Partial {
    fn create(dir: &Path, name: &OsStr) -> Result<(Partial, File), ImageError> {
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
    fn persist(mut self, dest: &Path) -> Result<(), ImageError> {
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

// ---------------------------------------------------------------------------
// create, grow

/// Creates an empty qcow2 of `size_bytes` (rounded up to 512) at `dest`,
/// atomically. Refuses to replace an existing `dest`.
pub fn create_empty(qemu_img: &Path, dest: &Path, size_bytes: u64) -> Result<(), ImageError> {
    let (dir, dest, name) = split_dest(dest)?;
    if dest.exists() {
        return Err(ImageError::Exists { path: dest });
    }
    remove_stale_partials(&dir, &name);
    let (tmp, file) = Partial::create(&dir, &name)?;
    drop(file);
    let size = round_up_sector(size_bytes).to_string();
    qemu_img_do(
        qemu_img,
        "create",
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            tmp.path.as_os_str(),
            size.as_ref(),
        ],
    )?;
    tmp.persist(&dest)
}

/// `qemu-img resize`, grow only: a smaller size is refused, the same size is
/// a no-op. The size is rounded up to 512.
pub fn grow(
    qemu_img: &Path,
    path: &Path,
    format: ImageFormat,
    new_size: u64,
) -> Result<(), ImageError> {
    let abs = absolute(path)?;
    let current = info_as(qemu_img, &abs, Some(format))?.virtual_size;
    let new_size = round_up_sector(new_size);
    if new_size < current {
        return Err(ImageError::Shrink {
            path: abs,
            current,
            requested: new_size,
        });
    }
    if new_size == current {
        return Ok(());
    }
    resize(qemu_img, &abs, format, new_size)
}

fn resize(
    qemu_img: &Path,
    path: &Path,
    format: ImageFormat,
    new_size: u64,
) -> Result<(), ImageError> {
    let size = new_size.to_string();
    qemu_img_do(
        qemu_img,
        "resize",
        &[
            "resize".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            format.as_str().as_ref(),
            path.as_os_str(),
            size.as_ref(),
        ],
    )
}

// ---------------------------------------------------------------------------
// provision

/// Makes `dest` from `source` (whose `info` is `source_info`), atomically:
/// the work happens in `.<dest name>.partial-<random>` next to `dest`, which
/// is fsynced and renamed onto `dest` (never replacing an existing file);
/// the folder is then fsynced. On error nothing is left. Stale partial files
/// of `dest` left by a crash are removed first.
///
/// - Copy of a qcow2 without backing file: reflink (FICLONE) when the
///   filesystem can, else `copy_file_range` over the data extents (holes
///   stay holes), else read/write. Permissions (plus owner write, so the VM
///   can write its disk) and access/modification times are kept like `cp -p`.
/// - Copy of a raw image, or of a qcow2 with a backing file (flattened):
///   `qemu-img convert` to qcow2.
/// - Overlay: a qcow2 whose backing file is the absolute source.
/// - `grow_to`: the result is grown to it when smaller (never shrunk).
pub fn provision(
    qemu_img: &Path,
    source: &Path,
    source_info: &ImageInfo,
    dest: &Path,
    mode: Provision,
    grow_to: Option<u64>,
) -> Result<ProvisionReport, ImageError> {
    let started = Instant::now();
    let (dir, dest, name) = split_dest(dest)?;
    if fs::symlink_metadata(&dest).is_ok() {
        return Err(ImageError::Exists { path: dest });
    }
    let source = fs::canonicalize(source).map_err(|e| ImageError::NotFound {
        path: source.to_path_buf(),
        source: e,
    })?;
    remove_stale_partials(&dir, &name);
    let (tmp, tmp_file) = Partial::create(&dir, &name)?;
    let src_fmt = source_info.format.as_str();

    let mut copied_meta = None;
    let (method, mut result) = match mode {
        Provision::Copy
            if source_info.format == ImageFormat::Qcow2 && source_info.backing_file.is_none() =>
        {
            let src = File::open(&source).map_err(|e| ImageError::NotFound {
                path: source.clone(),
                source: e,
            })?;
            let meta = src
                .metadata()
                .map_err(io_err(format!("cannot stat {}", source.display())))?;
            if !meta.is_file() {
                return Err(ImageError::NotAFile { path: source });
            }
            let method = copy_contents(&src, &tmp_file, meta.len(), true).map_err(io_err(
                format!("cannot copy {} to {}", source.display(), dir.display()),
            ))?;
            copied_meta = Some(meta);
            // Same bytes, same image: no need to ask qemu-img again.
            (method, source_info.clone())
        }
        Provision::Copy => {
            qemu_img_do(
                qemu_img,
                "convert",
                &[
                    "convert".as_ref(),
                    "-f".as_ref(),
                    src_fmt.as_ref(),
                    "-O".as_ref(),
                    "qcow2".as_ref(),
                    source.as_os_str(),
                    tmp.path.as_os_str(),
                ],
            )?;
            (
                "convert",
                info_as(qemu_img, &tmp.path, Some(ImageFormat::Qcow2))?,
            )
        }
        Provision::Overlay => {
            // Made at its final size in one step; `-u`: the source was just
            // checked by `info`, no need for qemu-img to open it again.
            let size = grow_to
                .map(round_up_sector)
                .unwrap_or(0)
                .max(source_info.virtual_size);
            let size_arg = size.to_string();
            qemu_img_do(
                qemu_img,
                "create",
                &[
                    "create".as_ref(),
                    "-q".as_ref(),
                    "-f".as_ref(),
                    "qcow2".as_ref(),
                    "-F".as_ref(),
                    src_fmt.as_ref(),
                    "-b".as_ref(),
                    source.as_os_str(),
                    "-u".as_ref(),
                    tmp.path.as_os_str(),
                    size_arg.as_ref(),
                ],
            )?;
            let info = ImageInfo {
                format: ImageFormat::Qcow2,
                virtual_size: size,
                actual_size: None,
                backing_file: Some(source.to_string_lossy().into_owned()),
            };
            ("overlay", info)
        }
    };

    if let Some(want) = grow_to.map(round_up_sector) {
        if want > result.virtual_size {
            resize(qemu_img, &tmp.path, ImageFormat::Qcow2, want)?;
            result = info_as(qemu_img, &tmp.path, Some(ImageFormat::Qcow2))?;
        }
    }

    if let Some(meta) = &copied_meta {
        keep_mode_and_times(&tmp_file, meta).map_err(io_err(format!(
            "cannot set permissions and times of {}",
            tmp.path.display()
        )))?;
    }
    let file_meta = tmp_file
        .metadata()
        .map_err(io_err(format!("cannot stat {}", tmp.path.display())))?;
    drop(tmp_file);
    if copied_meta.is_some() || method == "overlay" {
        result.actual_size = Some(file_meta.blocks() * 512);
    }
    tmp.persist(&dest)?;
    Ok(ProvisionReport {
        method,
        bytes: file_meta.len(),
        elapsed: started.elapsed(),
        info: result,
    })
}

/// Like `cp -p` for mode and times; the owner may always read and write, and
/// set-id bits are dropped (the copy belongs to vman's user, not the source's).
fn keep_mode_and_times(file: &File, meta: &fs::Metadata) -> io::Result<()> {
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
fn copy_contents(src: &File, dst: &File, len: u64, fast: bool) -> io::Result<&'static str> {
    if fast {
        // SAFETY: both fds are open for the duration of the call.
        let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
        if rc == 0 {
            return Ok("reflink");
        }
        let e = io::Error::last_os_error();
        if !errno_in(&e, UNSUPPORTED) && !errno_in(&e, &[libc::EPERM, libc::EBADF]) {
            return Err(e);
        }
    }
    dst.set_len(len)?;
    let mut use_cfr = fast;
    let mut pos = 0;
    while pos < len {
        let Some((data, end)) = next_data(src, pos, len)? else {
            break;
        };
        copy_range(src, dst, data, end - data, &mut use_cfr)?;
        pos = end;
    }
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
        } else if n == 0 {
            return Ok(()); // the source got shorter
        } else {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if errno_in(&e, UNSUPPORTED) {
                *use_cfr = false;
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
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::symlink;
    use tempfile::TempDir;

    fn qimg() -> PathBuf {
        PathBuf::from("qemu-img")
    }

    fn qemu_img_ok(args: &[&str]) {
        let out = Command::new("qemu-img")
            .args(args)
            .output()
            .expect("run qemu-img");
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn random_bytes(n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        File::open("/dev/urandom")
            .unwrap()
            .read_exact_at(&mut v, 0)
            .unwrap();
        v
    }

    /// A qcow2 holding `mib` MiB of random data (made from a raw file).
    fn data_qcow2(dir: &Path, name: &str, mib: usize) -> PathBuf {
        let raw = dir.join(format!("{name}.raw"));
        fs::write(&raw, random_bytes(mib << 20)).unwrap();
        let q = dir.join(name);
        qemu_img_ok(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            q.to_str().unwrap(),
        ]);
        fs::remove_file(raw).unwrap();
        q
    }

    fn same_contents(a: &Path, fa: &str, b: &Path, fb: &str) -> bool {
        Command::new("qemu-img")
            .args(["compare", "-q", "-f", fa, "-F", fb])
            .arg(a)
            .arg(b)
            .status()
            .unwrap()
            .success()
    }

    fn partials(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".partial-"))
            .collect()
    }

    // ---- info

    #[test]
    fn probe_agrees_with_qemu_img_info() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.qcow2");
        let over = dir.path().join("over.qcow2");
        let raw = dir.path().join("disk.raw");
        let qemu_img = Path::new("qemu-img");
        create_empty(qemu_img, &base, 3 << 20).expect("base");
        let ok = Command::new("qemu-img")
            .args(["create", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&base)
            .arg(&over)
            .arg("5M")
            .status()
            .expect("qemu-img");
        assert!(ok.success());
        fs::write(&raw, vec![0u8; 4096]).expect("raw");
        for p in [&base, &over, &raw] {
            let fast = probe(qemu_img, p).expect("probe");
            let slow = info(qemu_img, p).expect("info");
            assert_eq!(fast.format, slow.format, "{}", p.display());
            assert_eq!(fast.virtual_size, slow.virtual_size, "{}", p.display());
            assert_eq!(fast.backing_file, slow.backing_file, "{}", p.display());
        }
        let ext = dir.path().join("ext.qcow2");
        let ok = Command::new("qemu-img")
            .args(["create", "-f", "qcow2", "-o"])
            .arg(format!(
                "data_file={}",
                dir.path().join("ext.data").display()
            ))
            .arg(&ext)
            .arg("1M")
            .status()
            .expect("qemu-img");
        assert!(ok.success());
        assert!(matches!(
            probe(qemu_img, &ext),
            Err(ImageError::UnsupportedFormat { .. })
        ));
    }

    #[test]
    fn info_qcow2() {
        let d = TempDir::new().unwrap();
        let p = d.path().join("a.qcow2");
        qemu_img_ok(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "64M"]);
        let i = info(&qimg(), &p).unwrap();
        assert_eq!(i.format, ImageFormat::Qcow2);
        assert_eq!(i.virtual_size, 64 << 20);
        assert!(i.actual_size.is_some());
        assert_eq!(i.backing_file, None);
    }

    #[test]
    fn info_raw() {
        let d = TempDir::new().unwrap();
        let p = d.path().join("a.img");
        let f = File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        let i = info(&qimg(), &p).unwrap();
        assert_eq!(i.format, ImageFormat::Raw);
        assert_eq!(i.virtual_size, 1 << 20);
    }

    #[test]
    fn info_relative_path_with_colon_is_a_file_not_a_protocol() {
        let d = TempDir::new().unwrap();
        let p = d.path().join("nbd:x.img");
        File::create(&p).unwrap().set_len(4096).unwrap();
        let i = info(&qimg(), &p).unwrap();
        assert_eq!(i.format, ImageFormat::Raw);
    }

    #[test]
    fn info_refuses_text_files() {
        let d = TempDir::new().unwrap();
        let p = d.path().join("notes.txt");
        fs::write(&p, "hello, this is not a disk\n").unwrap();
        let e = info(&qimg(), &p).unwrap_err().to_string();
        assert!(
            e.contains("is not a disk image") && e.contains("512-byte"),
            "{e}"
        );
        // Even a text file of whole sectors.
        fs::write(&p, "x".repeat(1023) + "\n").unwrap();
        let e = info(&qimg(), &p).unwrap_err().to_string();
        assert!(e.contains("is not a disk image (it contains text)"), "{e}");
        let empty = d.path().join("empty");
        File::create(&empty).unwrap();
        let e = info(&qimg(), &empty).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn info_refuses_vmdk() {
        let d = TempDir::new().unwrap();
        let p = d.path().join("a.vmdk");
        qemu_img_ok(&["create", "-q", "-f", "vmdk", p.to_str().unwrap(), "16M"]);
        let e = info(&qimg(), &p).unwrap_err();
        assert!(matches!(e, ImageError::UnsupportedFormat { .. }));
        let msg = e.to_string();
        assert!(
            msg.ends_with("is a vmdk image; only qcow2 and raw are supported"),
            "{msg}"
        );
        assert!(msg.contains(p.to_str().unwrap()), "{msg}");
    }

    #[test]
    fn info_unreadable_and_missing() {
        let d = TempDir::new().unwrap();
        let p = d.path().join("broken.qcow2");
        // A qcow2 magic with a nonsense header.
        let mut bytes = b"QFI\xfb\x00\x00\x00\x07".to_vec();
        bytes.resize(4096, 0xee);
        fs::write(&p, bytes).unwrap();
        let e = info(&qimg(), &p).unwrap_err();
        assert!(matches!(e, ImageError::Unreadable { .. }), "{e}");
        assert!(
            e.to_string().contains("cannot be read as a disk image"),
            "{e}"
        );

        let e = info(&qimg(), &d.path().join("nope.qcow2"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("does not exist") && e.contains("No such file"),
            "{e}"
        );
        let e = info(&qimg(), d.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn missing_qemu_img_is_a_clear_error() {
        let d = TempDir::new().unwrap();
        let p = d.path().join("a.img");
        File::create(&p).unwrap().set_len(4096).unwrap();
        let e = info(Path::new("/nonexistent/qemu-img"), &p)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot run /nonexistent/qemu-img: No such file"),
            "{e}"
        );
    }

    // ---- resolve_allowed

    #[test]
    fn resolve_allowed_accepts_files_inside() {
        let d = TempDir::new().unwrap();
        let images = d.path().join("images");
        fs::create_dir_all(images.join("sub")).unwrap();
        fs::write(images.join("sub/a.qcow2"), b"x").unwrap();
        // A link inside pointing inside is fine and resolved.
        symlink(images.join("sub/a.qcow2"), images.join("link.qcow2")).unwrap();
        let allowed = vec![d.path().join("missing-dir"), images.clone()];
        let canon = fs::canonicalize(images.join("sub/a.qcow2")).unwrap();
        assert_eq!(
            resolve_allowed(&images.join("sub/a.qcow2"), &allowed).unwrap(),
            canon
        );
        assert_eq!(
            resolve_allowed(&images.join("link.qcow2"), &allowed).unwrap(),
            canon
        );
        assert_eq!(
            resolve_allowed(&images.join("sub/../sub/./a.qcow2"), &allowed).unwrap(),
            canon
        );
    }

    #[test]
    fn resolve_allowed_refuses_escapes() {
        let d = TempDir::new().unwrap();
        let images = d.path().join("images");
        fs::create_dir_all(images.join("dir.qcow2")).unwrap();
        fs::write(d.path().join("secret"), b"x").unwrap();
        symlink(d.path().join("secret"), images.join("escape.qcow2")).unwrap();
        symlink("/etc/shadow", images.join("shadow.qcow2")).unwrap();
        let allowed = vec![images.clone()];

        for p in [
            PathBuf::from("/etc/shadow"),
            images.join("escape.qcow2"),
            images.join("shadow.qcow2"),
            images.join("../secret"),
            images.join("dir.qcow2/../../secret"),
        ] {
            let e = resolve_allowed(&p, &allowed).unwrap_err();
            assert!(matches!(e, ImageError::NotAllowed { .. }), "{p:?}: {e}");
            let msg = e.to_string();
            assert!(msg.contains("outside the allowed image folders"), "{msg}");
            assert!(
                msg.contains(fs::canonicalize(&images).unwrap().to_str().unwrap()),
                "{msg}"
            );
        }
        // A folder instead of a file.
        let e = resolve_allowed(&images.join("dir.qcow2"), &allowed)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        // Missing inside: "does not exist"; missing outside: not allowed
        // (no hint about which host files exist).
        let e = resolve_allowed(&images.join("nope.qcow2"), &allowed)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        let e = resolve_allowed(Path::new("/etc/nope-vman-test"), &allowed).unwrap_err();
        assert!(matches!(e, ImageError::NotAllowed { .. }), "{e}");
        let e = resolve_allowed(&images.join("../nope"), &allowed).unwrap_err();
        assert!(matches!(e, ImageError::NotAllowed { .. }), "{e}");
        // No existing allowed folder.
        let e = resolve_allowed(&images.join("x"), &[d.path().join("gone")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("none of the allowed image folders exists") && e.contains("gone"),
            "{e}"
        );
    }

    // ---- provision

    #[test]
    fn copy_qcow2_is_identical_independent_and_keeps_mode_and_times() {
        let d = TempDir::new().unwrap();
        let src = data_qcow2(d.path(), "default.qcow2", 3);
        fs::set_permissions(&src, fs::Permissions::from_mode(0o640)).unwrap();
        // Before setting the times: qemu-img reading it moves its access time.
        let src_info = info(&qimg(), &src).unwrap();
        let t = std::time::UNIX_EPOCH + Duration::new(1_600_000_000, 123_456_789);
        let ta = std::time::UNIX_EPOCH + Duration::new(1_650_000_000, 987_654_321);
        File::options()
            .write(true)
            .open(&src)
            .unwrap()
            .set_times(fs::FileTimes::new().set_modified(t).set_accessed(ta))
            .unwrap();
        let vm = d.path().join("vms/x");
        fs::create_dir_all(&vm).unwrap();
        let dest = vm.join("root.qcow2");

        let r = provision(&qimg(), &src, &src_info, &dest, Provision::Copy, None).unwrap();
        assert!(
            ["reflink", "copy_file_range"].contains(&r.method),
            "{}",
            r.method
        );
        // Times first: reading the files below moves their access times.
        let dm = fs::metadata(&dest).unwrap();
        assert_eq!(dm.permissions().mode() & 0o7777, 0o640);
        assert_eq!((dm.mtime(), dm.mtime_nsec()), (1_600_000_000, 123_456_789));
        assert_eq!((dm.atime(), dm.atime_nsec()), (1_650_000_000, 987_654_321));
        let src_bytes = fs::read(&src).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), src_bytes);
        assert_eq!(r.bytes, src_bytes.len() as u64);
        assert_eq!(r.info.format, ImageFormat::Qcow2);
        assert_eq!(r.info.virtual_size, 3 << 20);
        let (sm, dm) = (fs::metadata(&src).unwrap(), fs::metadata(&dest).unwrap());
        assert_eq!((dm.mtime(), dm.mtime_nsec()), (sm.mtime(), sm.mtime_nsec()));
        assert_ne!(dm.ino(), sm.ino());
        assert!(partials(&vm).is_empty());

        // Writing into the copy leaves the source alone.
        qemu_img_ok(&["info", dest.to_str().unwrap()]);
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x5a 0 64k"])
            .arg(&dest)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(fs::read(&src).unwrap(), src_bytes);
        assert!(!same_contents(&src, "qcow2", &dest, "qcow2"));
    }

    #[test]
    fn copy_of_a_read_only_default_is_writable_by_its_owner() {
        let d = TempDir::new().unwrap();
        let src = data_qcow2(d.path(), "ro.qcow2", 1);
        fs::set_permissions(&src, fs::Permissions::from_mode(0o444)).unwrap();
        let dest = d.path().join("root.qcow2");
        provision(
            &qimg(),
            &src,
            &info(&qimg(), &src).unwrap(),
            &dest,
            Provision::Copy,
            None,
        )
        .unwrap();
        assert_eq!(
            fs::metadata(&dest).unwrap().permissions().mode() & 0o7777,
            0o644
        );
    }

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
        let method = copy_contents(&File::open(&src).unwrap(), &dst, 8 << 20, false).unwrap();
        assert_eq!(method, "read_write");
        assert_eq!(fs::read(&dst_path).unwrap(), fs::read(&src).unwrap());
        let dst2_path = d.path().join("copy2");
        let dst2 = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&dst2_path)
            .unwrap();
        copy_contents(&File::open(&src).unwrap(), &dst2, 8 << 20, true).unwrap();
        assert_eq!(fs::read(&dst2_path).unwrap(), fs::read(&src).unwrap());
        // Holes stay holes.
        assert!(fs::metadata(&dst2_path).unwrap().blocks() * 512 < 2 << 20);
    }

    #[test]
    fn copy_raw_converts_to_qcow2() {
        let d = TempDir::new().unwrap();
        let src = d.path().join("disk.img");
        fs::write(&src, random_bytes(2 << 20)).unwrap();
        let src_info = info(&qimg(), &src).unwrap();
        assert_eq!(src_info.format, ImageFormat::Raw);
        let dest = d.path().join("root.qcow2");
        let r = provision(&qimg(), &src, &src_info, &dest, Provision::Copy, None).unwrap();
        assert_eq!(r.method, "convert");
        assert_eq!(r.info.format, ImageFormat::Qcow2);
        assert_eq!(r.info.virtual_size, 2 << 20);
        assert_eq!(info(&qimg(), &dest).unwrap().format, ImageFormat::Qcow2);
        assert!(same_contents(&src, "raw", &dest, "qcow2"));
        assert!(partials(d.path()).is_empty());
    }

    #[test]
    fn copy_of_an_overlay_is_flattened() {
        let d = TempDir::new().unwrap();
        let base = data_qcow2(d.path(), "base.qcow2", 1);
        let top = d.path().join("top.qcow2");
        // Relative backing name: would break once copied elsewhere.
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
            top.to_str().unwrap(),
        ]);
        let top_info = info(&qimg(), &top).unwrap();
        assert_eq!(top_info.backing_file.as_deref(), Some("base.qcow2"));
        let vm = d.path().join("vm");
        fs::create_dir(&vm).unwrap();
        let dest = vm.join("root.qcow2");
        let r = provision(&qimg(), &top, &top_info, &dest, Provision::Copy, None).unwrap();
        assert_eq!(r.method, "convert");
        assert_eq!(r.info.backing_file, None);
        assert!(same_contents(&base, "qcow2", &dest, "qcow2"));
    }

    #[test]
    fn overlay_has_the_absolute_source_as_backing_file() {
        let d = TempDir::new().unwrap();
        let src = data_qcow2(d.path(), "default.qcow2", 1);
        let vm = d.path().join("vm");
        fs::create_dir(&vm).unwrap();
        let dest = vm.join("root.qcow2");
        // Given through a relative-looking path with `..`.
        let via = vm.join("../default.qcow2");
        let r = provision(
            &qimg(),
            &via,
            &info(&qimg(), &src).unwrap(),
            &dest,
            Provision::Overlay,
            None,
        )
        .unwrap();
        assert_eq!(r.method, "overlay");
        let canon = fs::canonicalize(&src).unwrap();
        assert_eq!(r.info.backing_file.as_deref(), canon.to_str());
        assert_eq!(
            info(&qimg(), &dest).unwrap().backing_file.as_deref(),
            canon.to_str()
        );
        assert!(r.bytes < (1 << 20), "overlay is small: {}", r.bytes);
        assert!(same_contents(&src, "qcow2", &dest, "qcow2"));

        // A raw source gets -F raw.
        let raw = d.path().join("disk.img");
        fs::write(&raw, random_bytes(1 << 20)).unwrap();
        let dest2 = vm.join("root2.qcow2");
        provision(
            &qimg(),
            &raw,
            &info(&qimg(), &raw).unwrap(),
            &dest2,
            Provision::Overlay,
            Some(4 << 20),
        )
        .unwrap();
        let i = info(&qimg(), &dest2).unwrap();
        assert_eq!(i.virtual_size, 4 << 20);
        let out = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&dest2)
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("\"backing-filename-format\": \"raw\"")
        );
    }

    #[test]
    fn grow_to_grows_and_never_shrinks() {
        let d = TempDir::new().unwrap();
        let src = data_qcow2(d.path(), "default.qcow2", 2);
        let si = info(&qimg(), &src).unwrap();
        let big = d.path().join("big.qcow2");
        let r = provision(&qimg(), &src, &si, &big, Provision::Copy, Some(10 << 20)).unwrap();
        assert_eq!(r.info.virtual_size, 10 << 20);
        assert_eq!(info(&qimg(), &big).unwrap().virtual_size, 10 << 20);
        // Unaligned sizes round up to a sector.
        let odd = d.path().join("odd.qcow2");
        let r = provision(
            &qimg(),
            &src,
            &si,
            &odd,
            Provision::Copy,
            Some((3 << 20) + 1),
        )
        .unwrap();
        assert_eq!(r.info.virtual_size, (3 << 20) + 512);
        let small = d.path().join("small.qcow2");
        let r = provision(&qimg(), &src, &si, &small, Provision::Copy, Some(1 << 20)).unwrap();
        assert_eq!(r.info.virtual_size, 2 << 20);
        assert_eq!(fs::read(&small).unwrap(), fs::read(&src).unwrap());
        assert_eq!(info(&qimg(), &small).unwrap().virtual_size, 2 << 20);
        let ov = d.path().join("ov.qcow2");
        let r = provision(&qimg(), &src, &si, &ov, Provision::Overlay, Some(8 << 20)).unwrap();
        assert_eq!(r.info.virtual_size, 8 << 20);
        assert_eq!(info(&qimg(), &src).unwrap().virtual_size, 2 << 20);
    }

    #[test]
    fn stale_partials_are_removed_and_dest_is_never_replaced() {
        let d = TempDir::new().unwrap();
        let src = data_qcow2(d.path(), "default.qcow2", 1);
        let si = info(&qimg(), &src).unwrap();
        let vm = d.path().join("vm");
        fs::create_dir(&vm).unwrap();
        fs::write(vm.join(".root.qcow2.partial-0123456789abcdef"), b"half").unwrap();
        fs::write(vm.join(".root.qcow2.partial-x"), b"half").unwrap();
        fs::write(vm.join(".data.qcow2.partial-1"), b"other").unwrap();
        let dest = vm.join("root.qcow2");
        provision(&qimg(), &src, &si, &dest, Provision::Copy, None).unwrap();
        assert_eq!(partials(&vm), vec![".data.qcow2.partial-1".to_string()]);

        // dest exists: refused, untouched.
        let before = fs::read(&dest).unwrap();
        let other = data_qcow2(d.path(), "other.qcow2", 1);
        let e = provision(
            &qimg(),
            &other,
            &info(&qimg(), &other).unwrap(),
            &dest,
            Provision::Copy,
            None,
        )
        .unwrap_err();
        assert!(matches!(e, ImageError::Exists { .. }), "{e}");
        assert_eq!(fs::read(&dest).unwrap(), before);
        let e = create_empty(&qimg(), &dest, 1 << 20).unwrap_err();
        assert!(matches!(e, ImageError::Exists { .. }), "{e}");
        assert_eq!(partials(&vm), vec![".data.qcow2.partial-1".to_string()]);
    }

    #[test]
    fn failures_leave_nothing_behind() {
        let d = TempDir::new().unwrap();
        // Missing destination folder.
        let src = data_qcow2(d.path(), "default.qcow2", 1);
        let si = info(&qimg(), &src).unwrap();
        let e = provision(
            &qimg(),
            &src,
            &si,
            &d.path().join("nope/root.qcow2"),
            Provision::Copy,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("cannot create a temporary file") && e.contains("No such file"),
            "{e}"
        );
        // Source vanished since info.
        let vm = d.path().join("vm");
        fs::create_dir(&vm).unwrap();
        let gone = d.path().join("gone.qcow2");
        let e = provision(
            &qimg(),
            &gone,
            &si,
            &vm.join("root.qcow2"),
            Provision::Copy,
            None,
        )
        .unwrap_err();
        assert!(matches!(e, ImageError::NotFound { .. }), "{e}");
        // qemu-img fails: flattening a broken qcow2.
        let broken = d.path().join("broken.qcow2");
        let mut bytes = b"QFI\xfb\x00\x00\x00\x07".to_vec();
        bytes.resize(4096, 0xee);
        fs::write(&broken, bytes).unwrap();
        let overlay_info = ImageInfo {
            backing_file: Some("base.qcow2".into()),
            ..si.clone()
        };
        let e = provision(
            &qimg(),
            &broken,
            &overlay_info,
            &vm.join("root.qcow2"),
            Provision::Copy,
            None,
        )
        .unwrap_err();
        assert!(matches!(e, ImageError::QemuImg { .. }), "{e}");
        assert!(
            fs::read_dir(&vm).unwrap().next().is_none(),
            "{:?}",
            partials(&vm)
        );
    }

    /// A tmpfs of 1 MiB, unmounted on drop.
    struct TinyFs(PathBuf);

    impl TinyFs {
        fn mount(dir: &Path) -> Option<TinyFs> {
            fs::create_dir_all(dir).unwrap();
            let out = Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=1M", "tmpfs"])
                .arg(dir)
                .output()
                .ok()?;
            if out.status.success() {
                Some(TinyFs(dir.to_path_buf()))
            } else {
                eprintln!(
                    "NOTE: skipping the full-disk test: cannot mount a tmpfs: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
        }
    }

    impl Drop for TinyFs {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }

    #[test]
    fn full_disk_gives_the_reason_and_leaves_nothing() {
        let d = TempDir::new().unwrap();
        let src = data_qcow2(d.path(), "default.qcow2", 4);
        let si = info(&qimg(), &src).unwrap();
        let raw = d.path().join("disk.img");
        fs::write(&raw, random_bytes(4 << 20)).unwrap();
        let ri = info(&qimg(), &raw).unwrap();
        let Some(tiny) = TinyFs::mount(&d.path().join("tiny")) else {
            return;
        };
        let dest = tiny.0.join("root.qcow2");
        for (s, i, mode) in [
            (&src, &si, Provision::Copy),
            (&raw, &ri, Provision::Copy),
            (&src, &si, Provision::Overlay),
        ] {
            let r = provision(&qimg(), s, i, &dest, mode, Some(64 << 30));
            if mode == Provision::Overlay {
                // An overlay fits; only its growth is metadata.
                r.unwrap();
                fs::remove_file(&dest).unwrap();
                continue;
            }
            let e = r.unwrap_err().to_string();
            eprintln!("full disk: {e}");
            assert!(e.contains("No space left on device"), "{e}");
            assert!(!dest.exists());
            let left: Vec<_> = fs::read_dir(&tiny.0)
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect();
            assert!(left.is_empty(), "{left:?}");
        }
        let mut f = File::create(tiny.0.join("filler")).unwrap();
        let _ = f.write_all(&vec![1u8; 1 << 20]);
        drop(f);
        let e = create_empty(&qimg(), &dest, 1 << 30)
            .unwrap_err()
            .to_string();
        eprintln!("full disk: {e}");
        assert!(e.contains("No space left on device"), "{e}");
        fs::remove_file(tiny.0.join("filler")).unwrap();
        assert!(fs::read_dir(&tiny.0).unwrap().next().is_none());
    }

    // ---- create_empty, grow

    #[test]
    fn create_empty_makes_a_qcow2() {
        let d = TempDir::new().unwrap();
        let dest = d.path().join("root.qcow2");
        fs::write(d.path().join(".root.qcow2.partial-old"), b"x").unwrap();
        create_empty(&qimg(), &dest, 10_000_000_000).unwrap();
        let i = info(&qimg(), &dest).unwrap();
        assert_eq!(i.format, ImageFormat::Qcow2);
        assert_eq!(i.virtual_size, 10_000_000_000);
        assert!(fs::metadata(&dest).unwrap().len() < 1 << 20);
        assert!(partials(d.path()).is_empty());
    }

    #[test]
    fn grow_only_grows() {
        let d = TempDir::new().unwrap();
        let q = d.path().join("data.qcow2");
        qemu_img_ok(&["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "1M"]);
        grow(&qimg(), &q, ImageFormat::Qcow2, 5 << 20).unwrap();
        assert_eq!(info(&qimg(), &q).unwrap().virtual_size, 5 << 20);
        grow(&qimg(), &q, ImageFormat::Qcow2, 5 << 20).unwrap();
        let e = grow(&qimg(), &q, ImageFormat::Qcow2, 2 << 20).unwrap_err();
        assert!(matches!(e, ImageError::Shrink { .. }));
        assert!(
            e.to_string().contains("cannot shrink") && e.to_string().contains("only grow"),
            "{e}"
        );
        assert_eq!(info(&qimg(), &q).unwrap().virtual_size, 5 << 20);

        let r = d.path().join("data.img");
        File::create(&r).unwrap().set_len(1 << 20).unwrap();
        grow(&qimg(), &r, ImageFormat::Raw, 3 << 20).unwrap();
        assert_eq!(fs::metadata(&r).unwrap().len(), 3 << 20);
        let e = grow(
            &qimg(),
            &d.path().join("none.img"),
            ImageFormat::Raw,
            3 << 20,
        )
        .unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }

    #[test]
    fn formats_and_messages() {
        assert_eq!(ImageFormat::Qcow2.as_str(), "qcow2");
        assert_eq!(ImageFormat::Raw.to_string(), "raw");
        assert_eq!(ImageFormat::parse("vmdk"), None);
        assert_eq!(
            serde_json::to_string(&ImageFormat::Qcow2).unwrap(),
            "\"qcow2\""
        );
        assert!(looks_like_text(b"hello\nworld\t\xc3\xa9"));
        assert!(looks_like_text(b"ab\xc3"));
        assert!(!looks_like_text(&[0xfa, 0x31, 0xc0, 0x8e, 0xd8, 0]));
        assert!(!looks_like_text(&[0u8; 512]));
    }
}
