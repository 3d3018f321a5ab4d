//! Snapshot files of a stopped VM's root disk (external snapshots): the
//! current `root.qcow2` becomes the immutable `snapshots/<name>.qcow2` and a
//! new empty overlay on it becomes `root.qcow2`; restore puts a new empty
//! overlay on a snapshot in place of `root.qcow2`. Every new file is made
//! under a `.partial` name and renamed, folders fsynced, so a crash at any
//! point leaves `root.qcow2` either the old or the new one, both bootable.
//! Backing names are absolute paths (a file moved into `snapshots/` keeps
//! a valid backing name). Only for a VM whose QEMU does not run.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::atomic::{copy_contents, remove_stale_partials, Partial};
use super::probe::{open_verified, read_header};
use super::progress::Progress;
use super::qemu_img::qemu_img_do;
use super::{io_err, ImageError};

/// The folder of a VM's snapshot files.
pub fn snapshot_dir(vm_dir: &Path) -> PathBuf {
    vm_dir.join("snapshots")
}

/// The file of snapshot `name`.
pub fn snapshot_file(vm_dir: &Path, name: &str) -> PathBuf {
    snapshot_dir(vm_dir).join(format!("{name}.qcow2"))
}

fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(format!("cannot flush folder {}", dir.display())))
}

/// The backing file named in the header of `path` (None without one).
pub fn backing_of(path: &Path) -> Result<Option<PathBuf>, ImageError> {
    let file = open_verified(path, false)?;
    let h = read_header(&file, path)?;
    Ok(h.backing_file.map(|b| {
        let b = PathBuf::from(b);
        if b.is_absolute() {
            b
        } else {
            path.parent().unwrap_or(Path::new("/")).join(b)
        }
    }))
}

/// True when `a` and `b` are the same file (same device and inode).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Makes a new empty qcow2 overlay on `backing` (a file that exists) of
/// `virtual_size` bytes as a `.partial` next to `root`, and renames it onto
/// `root`, replacing it.
fn overlay_onto(
    qemu_img: &Path,
    backing: &Path,
    virtual_size: u64,
    root: &Path,
) -> Result<(), ImageError> {
    let dir = root.parent().unwrap_or(Path::new("/"));
    let name = root.file_name().unwrap_or_default();
    let (tmp, file) = Partial::create(dir, name)?;
    drop(file);
    create_overlay(qemu_img, backing, &tmp.path, virtual_size)?;
    tmp.persist_replacing(root)?;
    sync_dir(dir)
}

/// Writes at `path` an empty qcow2 overlay of `virtual_size` bytes whose
/// backing is the qcow2 file `backing`, named but not opened (`-u`: the
/// size is given).
fn create_overlay(
    qemu_img: &Path,
    backing: &Path,
    path: &Path,
    virtual_size: u64,
) -> Result<(), ImageError> {
    let size = virtual_size.to_string();
    qemu_img_do(
        qemu_img,
        "create",
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-u".as_ref(),
            "-F".as_ref(),
            "qcow2".as_ref(),
            "-b".as_ref(),
            backing.as_os_str(),
            path.as_os_str(),
            size.as_ref(),
        ],
    )
}

/// Takes snapshot `name` of the root disk `root` (in the VM folder):
/// 1. a hard link of `root` as `snapshots/.<name>.qcow2.partial-*`;
/// 2. a new empty overlay on `snapshots/<name>.qcow2` as `.root.qcow2.partial-*`;
/// 3. the link renamed to `snapshots/<name>.qcow2` (never replacing);
/// 4. the overlay renamed onto `root.qcow2`.
///
/// Until 4 the VM boots its old root disk (the snapshot file, if step 3
/// happened, is the same inode as `root.qcow2`: `same_file` tells a caller
/// it is a leftover); after 4 it boots the overlay. Returns the snapshot file.
pub fn take(
    qemu_img: &Path,
    root: &Path,
    name: &str,
    virtual_size: u64,
) -> Result<PathBuf, ImageError> {
    // Absolute, canonical names: they are written as backing names.
    let root =
        &fs::canonicalize(root).map_err(io_err(format!("cannot find {}", root.display())))?;
    let vm_dir = root.parent().unwrap_or(Path::new("/")).to_path_buf();
    let dir = snapshot_dir(&vm_dir);
    fs::create_dir_all(&dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
    let dest = snapshot_file(&vm_dir, name);
    if fs::symlink_metadata(&dest).is_ok() {
        return Err(ImageError::Exists { path: dest });
    }
    let file_name = dest.file_name().unwrap_or_default().to_os_string();
    remove_stale_partials(&dir, &file_name);
    let link = linked_partial(&dir, &file_name, root)?;
    File::open(root)
        .and_then(|f| f.sync_all())
        .map_err(io_err(format!("cannot flush {}", root.display())))?;
    // The overlay is made first (backing named, not opened), so that once
    // the snapshot file exists only one rename remains.
    let overlay_dir = vm_dir.clone();
    let root_name = root.file_name().unwrap_or_default().to_os_string();
    let (tmp, file) = Partial::create(&overlay_dir, &root_name)?;
    drop(file);
    create_overlay(qemu_img, &dest, &tmp.path, virtual_size)?;
    link.persist(&dest)?;
    tmp.persist_replacing(root)?;
    sync_dir(&vm_dir)?;
    Ok(dest)
}

/// Replaces `root` by a new empty overlay on the snapshot file `snapshot`.
pub fn restore(
    qemu_img: &Path,
    root: &Path,
    snapshot: &Path,
    virtual_size: u64,
) -> Result<(), ImageError> {
    overlay_onto(qemu_img, snapshot, virtual_size, root)
}

/// Removes a snapshot file (gone already is fine) and fsyncs its folder.
pub fn remove(snapshot: &Path) -> Result<(), ImageError> {
    match fs::remove_file(snapshot) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(ImageError::Io {
                what: format!("cannot remove {}", snapshot.display()),
                source: e,
            })
        }
    }
    if let Some(dir) = snapshot.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// The folder of snapshot `name`'s data disk copies.
pub fn disk_copy_dir(vm_dir: &Path, name: &str) -> PathBuf {
    snapshot_dir(vm_dir).join(format!("{name}.disks"))
}

/// The copy of data disk `disk` in snapshot `name`.
pub fn disk_copy(vm_dir: &Path, name: &str, disk: &str) -> PathBuf {
    disk_copy_dir(vm_dir, name).join(format!("{disk}.img"))
}

/// A temporary (`Partial`) name in `dir` for `name` that is a hard link of
/// `target`: the empty placeholder `Partial::create` makes is replaced by
/// the link, so a crash leaves only a recognisable partial name behind.
fn linked_partial(
    dir: &Path,
    name: &std::ffi::OsStr,
    target: &Path,
) -> Result<Partial, ImageError> {
    let (link, file) = Partial::create(dir, name)?;
    drop(file);
    fs::remove_file(&link.path)
        .map_err(io_err(format!("cannot replace {}", link.path.display())))?;
    fs::hard_link(target, &link.path).map_err(io_err(format!(
        "cannot link {} as {}",
        target.display(),
        link.path.display()
    )))?;
    Ok(link)
}

/// Undoes `take` whose overlay QEMU never used: `root` becomes the snapshot
/// file's inode again (a hard link renamed onto it), then the snapshot file
/// goes. Every step leaves `root` bootable with all the data written.
pub fn untake(root: &Path, snapshot: &Path) -> Result<(), ImageError> {
    if !snapshot.exists() {
        return Ok(());
    }
    if !same_file(root, snapshot) {
        let dir = root.parent().unwrap_or(Path::new("/"));
        let name = root.file_name().unwrap_or_default();
        let tmp = linked_partial(dir, name, snapshot)?;
        tmp.persist_replacing(root)?;
        sync_dir(dir)?;
    }
    remove(snapshot)
}

/// Opens an image vman made, read-write, checked to be at `path` (what
/// QEMU gets by descriptor).
pub fn open_rw(path: &Path) -> Result<File, ImageError> {
    open_verified(path, true)
}

/// A file being made under a `.partial` name (removed when dropped unless
/// persisted).
pub struct PendingFile(Partial);

impl PendingFile {
    pub fn path(&self) -> &Path {
        &self.0.path
    }

    /// fsyncs it and renames it onto `dest` (never replacing).
    pub fn persist(self, dest: &Path) -> Result<(), ImageError> {
        self.0.persist(dest)
    }

    /// fsyncs it and renames it onto `dest`, replacing it, and fsyncs the folder.
    pub fn persist_replacing(self, dest: &Path) -> Result<(), ImageError> {
        self.0.persist_replacing(dest)?;
        sync_dir(dest.parent().unwrap_or(Path::new("/")))
    }
}

fn pending_for(dest: &Path) -> Result<(PendingFile, File), ImageError> {
    let dir = dest.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
    let (p, f) = Partial::create(dir, dest.file_name().unwrap_or_default())?;
    Ok((PendingFile(p), f))
}

/// A copy of the (stopped) data disk `src` (reflink when the filesystem
/// can), made as a `.partial` next to `dest`; the caller persists it.
pub fn copy_disk(src: &Path, dest: &Path) -> Result<PendingFile, ImageError> {
    let (pending, dst) = pending_for(dest)?;
    let from = open_verified(src, false)?;
    let len = from
        .metadata()
        .map_err(io_err(format!("cannot read {}", src.display())))?
        .len();
    copy_contents(&from, &dst, len, true, &Progress::new())
        .map_err(io_err(format!("cannot copy {}", src.display())))?;
    Ok(pending)
}

/// An empty image of `format` and `virtual_size` bytes made as a
/// `.partial` next to `dest` (the target of a running disk's copy).
pub fn empty_image(
    qemu_img: &Path,
    dest: &Path,
    format: &str,
    virtual_size: u64,
) -> Result<PendingFile, ImageError> {
    let (pending, file) = pending_for(dest)?;
    drop(file);
    let size = virtual_size.to_string();
    qemu_img_do(
        qemu_img,
        "create",
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            format.as_ref(),
            pending.path().as_os_str(),
            size.as_ref(),
        ],
    )?;
    Ok(pending)
}

/// Makes `child` (a qcow2 file no QEMU has open) independent of its
/// backing file: the data its backing shows and `new_backing` does not is
/// copied into it, then its header names `new_backing` (None: no backing).
/// Safe at any crash: until the header changes, what was copied is what
/// the old backing showed at those places.
pub fn rebase(qemu_img: &Path, child: &Path, new_backing: Option<&Path>) -> Result<(), ImageError> {
    use std::ffi::OsStr;
    let mut args: Vec<&OsStr> = ["rebase", "-q", "-f", "qcow2"].map(OsStr::new).to_vec();
    match new_backing {
        Some(b) => {
            args.extend(["-F", "qcow2", "-b"].map(OsStr::new));
            args.push(b.as_os_str());
        }
        None => args.extend(["-b", ""].map(OsStr::new)),
    }
    args.push(child.as_os_str());
    qemu_img_do(qemu_img, "rebase", &args)?;
    File::open(child)
        .and_then(|f| f.sync_all())
        .map_err(io_err(format!("cannot flush {}", child.display())))
}

/// Removes a folder of disk copies (gone already is fine).
pub fn remove_dir(dir: &Path) -> Result<(), ImageError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(ImageError::Io {
                what: format!("cannot remove {}", dir.display()),
                source: e,
            })
        }
    }
    sync_dir(dir.parent().unwrap_or(Path::new("/")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::image::testutil::{qemu_img_ok, qimg};

    #[test]
    fn take_and_restore_keep_each_state() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root.qcow2");
        qemu_img_ok(&["create", "-q", "-f", "qcow2", root.to_str().unwrap(), "1M"]);
        let qio = |file: &Path, cmd: &str| {
            let out = std::process::Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", cmd, file.to_str().unwrap()])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).to_string()
        };
        qio(&root, "write -P 0x11 0 64k");
        let snap = take(&qimg(), &root, "one", 1 << 20).unwrap();
        assert!(!same_file(&snap, &root));
        assert_eq!(backing_of(&root).unwrap().as_deref(), Some(snap.as_path()));
        qio(&root, "write -P 0x22 0 64k");
        assert!(qio(&root, "read -P 0x22 0 64k").contains("read 65536"));
        restore(&qimg(), &root, &snap, 1 << 20).unwrap();
        let back = qio(&root, "read -P 0x11 0 64k");
        assert!(
            back.contains("read 65536") && !back.contains("Pattern verification failed"),
            "{back}"
        );
        assert!(take(&qimg(), &root, "one", 1 << 20).is_err());
        assert!(crate::operator::leftovers::find_partials(d.path()).is_empty());
    }
}

#[cfg(test)]
mod merge_tests {
    use super::*;
    use crate::operator::image::testutil::{qemu_img_ok, qimg};

    fn qio(file: &Path, cmd: &str) -> String {
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd, file.to_str().unwrap()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn holds(file: &Path, pattern: u8) -> bool {
        let out = qio(file, &format!("read -P {pattern:#x} 0 64k"));
        out.contains("read 65536") && !out.contains("verification failed")
    }

    #[test]
    fn untake_makes_the_snapshot_the_root_disk_again() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root.qcow2");
        qemu_img_ok(&["create", "-q", "-f", "qcow2", root.to_str().unwrap(), "1M"]);
        qio(&root, "write -P 0x11 0 64k");
        let snap = take(&qimg(), &root, "s", 1 << 20).unwrap();
        // A running QEMU would have kept writing into the old inode.
        qio(&snap, "write -P 0x33 0 64k");
        untake(&root, &snap).unwrap();
        assert!(!snap.exists());
        assert_eq!(backing_of(&root).unwrap(), None);
        assert!(holds(&root, 0x33));
        assert!(crate::operator::leftovers::find_partials(d.path()).is_empty());
    }

    #[test]
    fn a_rebase_merges_a_middle_snapshot_into_its_child() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root.qcow2");
        qemu_img_ok(&["create", "-q", "-f", "qcow2", root.to_str().unwrap(), "1M"]);
        qio(&root, "write -P 0x11 0 64k");
        let a = take(&qimg(), &root, "a", 1 << 20).unwrap();
        qio(&root, "write -P 0x22 0 32k");
        let b = take(&qimg(), &root, "b", 1 << 20).unwrap();
        // b (0x22 then 0x11) sits on a; merge b's data into root, then a
        // into b, and drop both.
        rebase(&qimg(), &root, Some(&a)).unwrap();
        assert!(qio(&root, "read -P 0x22 0 32k").contains("read 32768"));
        rebase(&qimg(), &root, None).unwrap();
        assert_eq!(backing_of(&root).unwrap(), None);
        remove(&b).unwrap();
        remove(&a).unwrap();
        let out = qio(&root, "read -P 0x22 0 32k");
        assert!(!out.contains("verification failed"), "{out}");
        let out = qio(&root, "read -P 0x11 32k 32k");
        assert!(
            !out.contains("verification failed") && out.contains("read 32768"),
            "{out}"
        );
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;
    use crate::operator::image::testutil::{overlay_on, qemu_img_ok};
    use crate::operator::image::{ImagePolicy, Top};

    #[test]
    fn a_root_disk_may_be_built_on_its_own_snapshots_only() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        for dir in [&a, &b] {
            fs::create_dir_all(dir.join("snapshots")).unwrap();
        }
        let own = a.join("snapshots/s.qcow2");
        qemu_img_ok(&["create", "-q", "-f", "qcow2", own.to_str().unwrap(), "1M"]);
        let foreign = b.join("snapshots/s.qcow2");
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            foreign.to_str().unwrap(),
            "1M",
        ]);
        let policy = ImagePolicy::new(vec![], None);
        overlay_on(own.to_str().unwrap(), &a.join("root.qcow2"));
        let chain = policy
            .open_chain(&a.join("root.qcow2"), Top::Trusted, None, false)
            .unwrap();
        assert_eq!(chain.files.len(), 2);
        // A snapshot file as the top (restore checks it): its parent in the
        // same folder is the VM's own.
        let top_snap = a.join("snapshots/t.qcow2");
        overlay_on(own.to_str().unwrap(), &top_snap);
        let chain = policy
            .open_chain(&top_snap, Top::Trusted, None, false)
            .unwrap();
        assert_eq!(chain.files.len(), 2);
        // Another VM's snapshot, or the own snapshot folder reached from a
        // user-named top: refused.
        overlay_on(foreign.to_str().unwrap(), &a.join("other.qcow2"));
        assert!(policy
            .open_chain(&a.join("other.qcow2"), Top::Trusted, None, false)
            .is_err());
        assert!(policy
            .open_chain(&a.join("root.qcow2"), Top::User, None, false)
            .is_err());
    }
}
