//! The `qemu-img` tool: `info` (format and sizes), `create` (an empty qcow2,
//! atomically), `resize` (grow only). Always an argument vector (never a
//! shell), an absolute path (so `name:rest` is never read as a protocol), an
//! explicit `-f` whenever the format is known, and killed if vman dies.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use serde::Deserialize;

use super::atomic::{read_full_at, remove_stale_partials, split_dest, Partial};
use super::{absolute, io_err, round_up_sector, ImageError, ImageFormat, ImageInfo, SECTOR};

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

pub(super) fn qemu_img_command(qemu_img: &Path) -> Command {
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
pub(super) fn run_qemu_img(
    qemu_img: &Path,
    args: &[&OsStr],
) -> Result<Result<Vec<u8>, String>, ImageError> {
    run_qemu_img_keeping(qemu_img, args, Vec::new())
}

/// `run_qemu_img` with `fds` inherited by qemu-img (named `/dev/fd/N` in
/// its arguments).
pub(super) fn run_qemu_img_keeping(
    qemu_img: &Path,
    args: &[&OsStr],
    fds: Vec<std::os::fd::RawFd>,
) -> Result<Result<Vec<u8>, String>, ImageError> {
    let mut cmd = qemu_img_command(qemu_img);
    if !fds.is_empty() {
        // SAFETY: the closure only calls fcntl (async-signal-safe) on
        // numbers in a vector allocated before the fork.
        unsafe {
            cmd.pre_exec(move || crate::operator::process::inherit_fds(&fds));
        }
    }
    let out = cmd
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

/// `run_qemu_img_keeping` with `-p` among `args`: qemu-img's percentages
/// (its stdout) are read as they come into `progress`; stderr is read on a
/// thread of its own so neither pipe can fill up.
pub(super) fn run_qemu_img_progress(
    qemu_img: &Path,
    args: &[&OsStr],
    fds: Vec<std::os::fd::RawFd>,
    progress: &super::progress::Progress,
) -> Result<Result<(), String>, ImageError> {
    let mut cmd = qemu_img_command(qemu_img);
    if !fds.is_empty() {
        // SAFETY: as in `run_qemu_img_keeping`.
        unsafe {
            cmd.pre_exec(move || crate::operator::process::inherit_fds(&fds));
        }
    }
    let spawn_err = |source| ImageError::Spawn {
        program: qemu_img.to_path_buf(),
        source,
    };
    let mut child = cmd.args(args).spawn().map_err(spawn_err)?;
    let stderr = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = std::io::Read::read_to_end(&mut e, &mut buf);
            buf
        })
    });
    if let Some(out) = child.stdout.take() {
        super::progress::follow_percentages(out, progress);
    }
    let status = child.wait().map_err(spawn_err)?;
    let stderr = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
    if status.success() {
        Ok(Ok(()))
    } else {
        Ok(Err(stderr_detail(&stderr, status)))
    }
}

/// Runs a qemu-img command that must succeed.
pub(super) fn qemu_img_do(
    qemu_img: &Path,
    action: &str,
    args: &[&OsStr],
) -> Result<(), ImageError> {
    run_qemu_img(qemu_img, args)?
        .map(|_| ())
        .map_err(|detail| ImageError::QemuImg {
            action: action.to_string(),
            detail,
        })
}

/// `qemu-img info -U --output=json <path>`: the image's format and sizes.
/// Only qcow2 and raw are accepted; a raw "image" that is plainly not a disk
/// (empty, not whole sectors, or text) is refused too.
pub fn info(qemu_img: &Path, path: &Path) -> Result<ImageInfo, ImageError> {
    info_as(qemu_img, path, None)
}

/// `info` with the format given (`-f`) instead of probed.
pub(super) fn info_as(
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
pub(super) fn check_raw_looks_like_disk(path: &Path, len: u64) -> Result<(), ImageError> {
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

/// UTF-8 text without control characters other than whitespace. A boot
/// sector, a partition table or a filesystem's first sector never is.
pub(super) fn looks_like_text(buf: &[u8]) -> bool {
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

pub(super) fn resize(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::image::testutil::*;

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
