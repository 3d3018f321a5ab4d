//! The root disk recipe: a VM's root disk made from a boot disk, copied
//! (reflink clone, `copy_file_range`, or `qemu-img convert` for raw sources
//! and overlays, flattened), overlaid (qcow2 linked clone), and grown to the
//! template's size, always atomically (see `atomic`).

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::atomic::{
    copy_contents, keep_mode_and_times, remove_stale_partials, split_dest, Partial,
};
use std::os::fd::AsRawFd;

use serde_json::{json, Value};

use super::policy::{Chain, ChainFile};
use super::progress::Progress;
use super::qemu_img::{info_as, qemu_img_do, resize, run_qemu_img_progress};
use super::{io_err, round_up_sector, ImageError, ImageFormat, ImageInfo};

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
// provision

/// Makes `dest` from the checked chain `source`, atomically:
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
///   `qemu-img convert` to qcow2, reading the very files that were checked
///   (by descriptor, `/dev/fd/N`) through an explicit graph (`json:` with
///   every `backing` given), so qemu-img never follows a header itself.
/// - Overlay: a qcow2 whose backing file is the absolute source.
/// - `grow_to`: the result is grown to it when smaller (never shrunk).
///
/// `progress` follows the work: a copy reports the offset reached in the
/// source file (of its length), `qemu-img convert` its own percentage (`-p`)
/// of the allocated size of the chain's files; an overlay is done at once.
pub fn provision(
    qemu_img: &Path,
    source: &Chain,
    dest: &Path,
    mode: Provision,
    grow_to: Option<u64>,
    progress: &Progress,
) -> Result<ProvisionReport, ImageError> {
    let started = Instant::now();
    let (dir, dest, name) = split_dest(dest)?;
    if fs::symlink_metadata(&dest).is_ok() {
        return Err(ImageError::Exists { path: dest });
    }
    let top = source.top();
    let source_info = ImageInfo {
        format: top.format,
        virtual_size: top.virtual_size,
        actual_size: Some(top.actual_size),
        backing_file: top.backing_file.clone(),
    };
    let chain = source;
    let source = top.path.clone();
    remove_stale_partials(&dir, &name);
    let (tmp, tmp_file) = Partial::create(&dir, &name)?;
    let src_fmt = source_info.format.as_str();

    let mut copied_meta = None;
    let (method, mut result) = match mode {
        Provision::Copy
            if source_info.format == ImageFormat::Qcow2 && source_info.backing_file.is_none() =>
        {
            let src: &File = &top.file;
            let meta = src
                .metadata()
                .map_err(io_err(format!("cannot stat {}", source.display())))?;
            if !meta.is_file() {
                return Err(ImageError::NotAFile { path: source });
            }
            let method =
                copy_contents(src, &tmp_file, meta.len(), true, progress).map_err(io_err(
                    format!("cannot copy {} to {}", source.display(), dir.display()),
                ))?;
            copied_meta = Some(meta);
            // Same bytes, same image: no need to ask qemu-img again.
            (method, source_info.clone())
        }
        Provision::Copy => {
            let spec = json_spec(chain);
            let fds = chain.files.iter().map(|f| f.file.as_raw_fd()).collect();
            progress.set_method("convert");
            progress.begin(chain.files.iter().map(|f| f.actual_size).sum());
            run_qemu_img_progress(
                qemu_img,
                &[
                    "convert".as_ref(),
                    "-p".as_ref(),
                    "-O".as_ref(),
                    "qcow2".as_ref(),
                    spec.as_ref(),
                    tmp.path.as_os_str(),
                ],
                fds,
                progress,
            )?
            .map_err(|detail| ImageError::QemuImg {
                action: "convert".into(),
                detail,
            })?;
            progress.finish();
            (
                "convert",
                info_as(qemu_img, &tmp.path, Some(ImageFormat::Qcow2))?,
            )
        }
        Provision::Overlay => {
            progress.set_method("overlay");
            progress.begin(0);
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

/// The checked chain as a `json:` filename for qemu-img: every file by
/// descriptor, every `backing` explicit (null at the bottom).
fn json_spec(chain: &Chain) -> String {
    fn node(files: &[ChainFile]) -> Value {
        let Some(f) = files.first() else {
            return Value::Null;
        };
        let mut v = json!({
            "driver": f.format.as_str(),
            "file": {
                "driver": "file",
                "filename": format!("/dev/fd/{}", f.file.as_raw_fd()),
            },
        });
        if f.format == ImageFormat::Qcow2 {
            v["backing"] = node(&files[1..]);
        }
        v
    }
    format!("json:{}", node(&chain.files))
}

#[cfg(test)]
mod tests {
    use super::super::qemu_img::create_empty;
    use super::*;
    use crate::operator::image::testutil::*;

    /// `provision` from the chain of `src` as `ImagePolicy` checks it (the
    /// source's own folder allowed). `_info` is what the caller believes.
    fn prov(
        src: &Path,
        _info: &ImageInfo,
        dest: &Path,
        mode: Provision,
        grow: Option<u64>,
    ) -> Result<ProvisionReport, ImageError> {
        let dir = fs::canonicalize(src.parent().unwrap()).unwrap();
        let policy = crate::operator::image::ImagePolicy::new(vec![dir], None);
        let chain = policy.open_chain(src, crate::operator::image::Top::Trusted, None, false)?;
        let progress = Progress::new();
        let r = provision(&qimg(), &chain, dest, mode, grow, &progress);
        if let Ok(r) = &r {
            // Whatever the method, the progress ends at its total.
            let seen = progress.snapshot();
            assert_eq!(seen.method, r.method);
            assert_eq!(seen.bytes_done, seen.bytes_total, "{seen:?}");
        }
        r
    }
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::time::Duration;
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

        let r = prov(&src, &src_info, &dest, Provision::Copy, None).unwrap();
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
        prov(
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
    fn copy_raw_converts_to_qcow2() {
        let d = TempDir::new().unwrap();
        let src = d.path().join("disk.img");
        fs::write(&src, random_bytes(2 << 20)).unwrap();
        let src_info = info(&qimg(), &src).unwrap();
        assert_eq!(src_info.format, ImageFormat::Raw);
        let dest = d.path().join("root.qcow2");
        let r = prov(&src, &src_info, &dest, Provision::Copy, None).unwrap();
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
        overlay_on("base.qcow2", &top);
        let top_info = info(&qimg(), &top).unwrap();
        assert_eq!(top_info.backing_file.as_deref(), Some("base.qcow2"));
        let vm = d.path().join("vm");
        fs::create_dir(&vm).unwrap();
        let dest = vm.join("root.qcow2");
        let r = prov(&top, &top_info, &dest, Provision::Copy, None).unwrap();
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
        let r = prov(
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
        prov(
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
        let r = prov(&src, &si, &big, Provision::Copy, Some(10 << 20)).unwrap();
        assert_eq!(r.info.virtual_size, 10 << 20);
        assert_eq!(info(&qimg(), &big).unwrap().virtual_size, 10 << 20);
        // Unaligned sizes round up to a sector.
        let odd = d.path().join("odd.qcow2");
        let r = prov(&src, &si, &odd, Provision::Copy, Some((3 << 20) + 1)).unwrap();
        assert_eq!(r.info.virtual_size, (3 << 20) + 512);
        let small = d.path().join("small.qcow2");
        let r = prov(&src, &si, &small, Provision::Copy, Some(1 << 20)).unwrap();
        assert_eq!(r.info.virtual_size, 2 << 20);
        assert_eq!(fs::read(&small).unwrap(), fs::read(&src).unwrap());
        assert_eq!(info(&qimg(), &small).unwrap().virtual_size, 2 << 20);
        let ov = d.path().join("ov.qcow2");
        let r = prov(&src, &si, &ov, Provision::Overlay, Some(8 << 20)).unwrap();
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
        prov(&src, &si, &dest, Provision::Copy, None).unwrap();
        assert_eq!(partials(&vm), vec![".data.qcow2.partial-1".to_string()]);

        // dest exists: refused, untouched.
        let before = fs::read(&dest).unwrap();
        let other = data_qcow2(d.path(), "other.qcow2", 1);
        let e = prov(
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
        let e = prov(
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
        let e = prov(&gone, &si, &vm.join("root.qcow2"), Provision::Copy, None).unwrap_err();
        assert!(matches!(e, ImageError::NotFound { .. }), "{e}");
        // A header vman cannot use: refused before anything is made.
        let broken = d.path().join("broken.qcow2");
        let mut bytes = b"QFI\xfb\x00\x00\x00\x07".to_vec();
        bytes.resize(4096, 0xee);
        fs::write(&broken, bytes).unwrap();
        let e = prov(&broken, &si, &vm.join("root.qcow2"), Provision::Copy, None).unwrap_err();
        assert!(matches!(e, ImageError::UnsupportedFormat { .. }), "{e}");
        // qemu-img fails: flattening an overlay whose cluster size is absurd.
        let top = d.path().join("top.qcow2");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&src)
            .arg(&top)
            .output()
            .unwrap();
        assert!(out.status.success());
        File::options()
            .write(true)
            .open(&top)
            .unwrap()
            .write_all_at(&30u32.to_be_bytes(), 20)
            .unwrap();
        let e = prov(&top, &si, &vm.join("root.qcow2"), Provision::Copy, None).unwrap_err();
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
            let r = prov(s, i, &dest, mode, Some(64 << 30));
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
        // The empty disk on a fresh tmpfs filled to its last block (small
        // writes until the filesystem says no): pages of the files removed
        // above can be given back late, which made room on the first one.
        let Some(full) = TinyFs::mount(&d.path().join("full")) else {
            return;
        };
        let mut f = File::create(full.0.join("filler")).unwrap();
        while f.write(&[1u8; 4096]).is_ok_and(|n| n > 0) {}
        while f.write(&[1u8; 1]).is_ok_and(|n| n > 0) {}
        drop(f);
        let dest = full.0.join("root.qcow2");
        let e = create_empty(&qimg(), &dest, 1 << 30)
            .unwrap_err()
            .to_string();
        eprintln!("full disk: {e}");
        assert!(e.contains("No space left on device"), "{e}");
        fs::remove_file(full.0.join("filler")).unwrap();
        assert!(fs::read_dir(&full.0).unwrap().next().is_none());
    }

    /// Issue 9, hole 3 for qemu-img: flattening reads the files that were
    /// checked, by descriptor, with every backing explicit. A header
    /// rebased onto another file after the check changes nothing.
    #[test]
    fn hole3_convert_reads_the_checked_chain_not_the_header() {
        let d = TempDir::new().unwrap();
        let base = data_qcow2(d.path(), "base.qcow2", 1);
        let other = data_qcow2(d.path(), "other.qcow2", 1);
        let top = d.path().join("top.qcow2");
        overlay_on("base.qcow2", &top);
        let dir = fs::canonicalize(d.path()).unwrap();
        let policy = crate::operator::image::ImagePolicy::new(vec![dir], None);
        let chain = policy
            .open_chain(&top, crate::operator::image::Top::User, None, false)
            .unwrap();
        assert_eq!(chain.files.len(), 2);
        qemu_img_ok(&[
            "rebase",
            "-u",
            "-F",
            "qcow2",
            "-b",
            "other.qcow2",
            top.to_str().unwrap(),
        ]);
        let dest = d.path().join("root.qcow2");
        let progress = Progress::new();
        let r = provision(&qimg(), &chain, &dest, Provision::Copy, None, &progress).unwrap();
        let seen = progress.snapshot();
        assert_eq!(seen.method, "convert");
        assert!(
            seen.bytes_total > 0 && seen.bytes_done == seen.bytes_total,
            "{seen:?}"
        );
        assert_eq!(r.method, "convert");
        assert!(same_contents(&base, "qcow2", &dest, "qcow2"));
        assert!(!same_contents(&other, "qcow2", &dest, "qcow2"));
        let spec = json_spec(&chain);
        assert!(spec.starts_with("json:"), "{spec}");
        assert!(
            !spec.contains("base.qcow2") && spec.contains("/dev/fd/"),
            "{spec}"
        );
        assert!(spec.contains(r#""backing":null"#), "{spec}");
    }
}
