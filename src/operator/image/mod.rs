//! Disk image files on this host, split by concern:
//!
//! - `qemu_img`: the tool (`info`, `create`, `convert`, `resize`), always run
//!   with an argument vector and an explicit `-f` when the format is known;
//! - `probe`: the image header read by vman itself (qcow2 fields, the magic
//!   of other formats) and the backing chain walk;
//! - `policy`: which files a user may name (`ImagePolicy`: the allowed image
//!   folders, built once at start-up);
//! - `atomic`: temporary file + fsync + rename, reflink/`copy_file_range`;
//! - `provision`: the root disk recipe (copy, overlay, convert, grow);
//! - `snapshot`: snapshot files of a stopped VM's root disk (overlays);
//! - `progress`: how far a root disk being made is (atomics, qemu-img `-p`).
//!
//! Synchronous: the async callers run it in `tokio::task::spawn_blocking`.

mod atomic;
mod policy;
mod probe;
mod progress;
mod provision;
mod qemu_img;
pub mod snapshot;

use std::io;
use std::path::PathBuf;

use serde::Serialize;

pub use crate::model::ImageFormat;

pub(crate) use atomic::Partial;

pub use policy::{Chain, ChainFile, ImagePolicy, Top, MAX_CHAIN_FILES};
pub use probe::probe;
pub use probe::{Header, Magic};
pub use progress::{Progress, Snapshot as ProgressSnapshot};
pub use provision::{provision, Provision, ProvisionReport};
pub use qemu_img::{create_empty, grow, info};

/// Disk sizes given to qemu-img are rounded up to whole sectors.
const SECTOR: u64 = 512;

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
    #[error("{} changed while it was being checked (a symbolic link or folder was replaced); try again", .path.display())]
    Changed { path: PathBuf },
    #[error("{} was accepted as a raw image but now starts with a {found} header (written by a guest?); refusing it", .path.display())]
    RawWithHeader { path: PathBuf, found: &'static str },
    #[error("{} was accepted as a {pinned} image but is now {found}; refusing it", .path.display())]
    FormatChanged {
        path: PathBuf,
        pinned: ImageFormat,
        found: &'static str,
    },
    #[error("{} has a backing file that is refused: {source}", .path.display())]
    Backing {
        path: PathBuf,
        source: Box<ImageError>,
    },
    #[error("{} names its backing file {backing} without its format; declare it with `qemu-img rebase -u -F qcow2|raw -b {backing} {}`", .path.display(), .path.display())]
    NoBackingFormat { path: PathBuf, backing: String },
    #[error("{} has a backing chain of more than {max} files", .path.display())]
    ChainTooDeep { path: PathBuf, max: usize },
    #[error("{} has a backing chain that loops", .path.display())]
    ChainLoop { path: PathBuf },
    #[error("{} is not allowed as a backing file here; {reason}", .path.display())]
    BackingNotAllowed { path: PathBuf, reason: String },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}

/// An absolute path, so that qemu never reads `name:rest` as a protocol.
fn absolute(path: &std::path::Path) -> Result<PathBuf, ImageError> {
    std::path::absolute(path).map_err(io_err(format!("cannot make {} absolute", path.display())))
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

fn round_up_sector(bytes: u64) -> u64 {
    bytes.div_ceil(SECTOR).saturating_mul(SECTOR)
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Helpers shared by the image tests.
    pub use std::fs::{self, File};
    pub use std::os::unix::fs::FileExt;
    pub use std::path::{Path, PathBuf};
    pub use std::process::Command;
    pub use tempfile::TempDir;

    pub use super::{create_empty, info};

    pub fn qimg() -> PathBuf {
        PathBuf::from("qemu-img")
    }

    pub fn qemu_img_ok(args: &[&str]) {
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

    /// A qcow2 `top` backed by the qcow2 `backing`, named in its header
    /// exactly as given (relative names resolve from `top`'s folder).
    pub fn overlay_on(backing: &str, top: &Path) {
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            backing,
            top.to_str().unwrap(),
        ]);
    }

    pub fn random_bytes(n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        File::open("/dev/urandom")
            .unwrap()
            .read_exact_at(&mut v, 0)
            .unwrap();
        v
    }

    /// A qcow2 holding `mib` MiB of random data (made from a raw file).
    pub fn data_qcow2(dir: &Path, name: &str, mib: usize) -> PathBuf {
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

    pub fn same_contents(a: &Path, fa: &str, b: &Path, fb: &str) -> bool {
        Command::new("qemu-img")
            .args(["compare", "-q", "-f", fa, "-F", fb])
            .arg(a)
            .arg(b)
            .status()
            .unwrap()
            .success()
    }

    pub fn partials(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".partial-"))
            .collect()
    }
}
