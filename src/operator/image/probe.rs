//! The image header as vman reads it itself, without spawning `qemu-img`
//! (which costs more than the rest of a VM start): a qcow2's format,
//! virtual size, backing file and its declared format, external data file
//! and encryption; the magic of the other image formats (so a "raw" image
//! that starts with one is recognised); and opening a file so that what was
//! checked is what gets used (`open_verified`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::atomic::read_full_at;
use super::qemu_img::{info, looks_like_text};
use super::{io_err, ImageError, ImageFormat, ImageInfo, SECTOR};

/// qcow2 magic, "QFI\xfb" (also qcow version 1).
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// Incompatible feature bit 2: guest data lives in an external file.
const QCOW2_EXTERNAL_DATA_FILE: u64 = 1 << 2;
/// Header extension: the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: the external data file's name.
const EXT_DATA_FILE: u32 = 0x4441_5441;
/// How much of the file the header parse reads (the extensions live in
/// the first cluster; 64 KiB is QEMU's default cluster size).
const HEADER_READ: usize = 64 << 10;

/// Magic numbers of the image formats QEMU would recognise, other than
/// qcow2: (offset, bytes, format). A file vman treats as raw must start
/// with none of them.
const OTHER_MAGICS: &[(usize, &[u8], &str)] = &[
    (0, b"KDMV", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"QED\0", "qed"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc"),
    (0, b"LUKS\xba\xbe", "luks"),
    (64, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"Bochs Virtual HD Image", "bochs"),
];

/// What the first bytes of a file say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Magic {
    Qcow2,
    /// Another image format QEMU knows (vmdk, vdi, vhdx, qed, luks, ...).
    Other(&'static str),
    /// No known magic: raw data.
    None,
}

impl Magic {
    pub fn of(buf: &[u8]) -> Magic {
        if buf.starts_with(&QCOW2_MAGIC) {
            return Magic::Qcow2;
        }
        for (at, magic, name) in OTHER_MAGICS {
            if buf.len() >= at + magic.len() && &buf[*at..at + magic.len()] == *magic {
                return Magic::Other(name);
            }
        }
        Magic::None
    }

    pub fn name(self) -> &'static str {
        match self {
            Magic::Qcow2 => "qcow2",
            Magic::Other(n) => n,
            Magic::None => "raw",
        }
    }
}

/// An image header as read by vman.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub magic: Magic,
    /// Size of the disk the guest sees (for raw: the file's length).
    pub virtual_size: u64,
    /// Bytes allocated on the host.
    pub actual_size: u64,
    /// The backing file named in a qcow2 header.
    pub backing_file: Option<String>,
    /// Its format, as the header declares it (`-F` of `qemu-img create`).
    pub backing_format: Option<String>,
}

/// Reads and checks the header of an open image. A qcow2 must be version 2
/// or 3, unencrypted, without an external data file (a second host file
/// QEMU would open on its own); anything else with a known magic is refused;
/// what is left is raw and must look like a disk (not empty, whole sectors,
/// not text).
pub fn read_header(file: &File, path: &Path) -> Result<Header, ImageError> {
    let meta = file
        .metadata()
        .map_err(io_err(format!("cannot stat {}", path.display())))?;
    if !meta.is_file() {
        return Err(ImageError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mut buf = vec![0u8; HEADER_READ.min(meta.len() as usize)];
    let n = read_full_at(file, &mut buf, 0)
        .map_err(io_err(format!("cannot read {}", path.display())))?;
    buf.truncate(n);
    let actual_size = meta.blocks() * 512;
    match Magic::of(&buf) {
        Magic::Qcow2 => parse_qcow2(file, path, &buf, actual_size),
        Magic::Other(name) => Err(ImageError::UnsupportedFormat {
            path: path.to_owned(),
            format: name.to_owned(),
        }),
        Magic::None => {
            let refuse = |reason: String| ImageError::NotAnImage {
                path: path.to_owned(),
                reason,
            };
            let len = meta.len();
            if len == 0 {
                return Err(refuse("the file is empty".into()));
            }
            if !len.is_multiple_of(SECTOR) {
                return Err(refuse(format!(
                    "{len} bytes is not a whole number of 512-byte sectors"
                )));
            }
            if looks_like_text(&buf[..buf.len().min(SECTOR as usize)]) {
                return Err(refuse("it contains text".into()));
            }
            Ok(Header {
                magic: Magic::None,
                virtual_size: len,
                actual_size,
                backing_file: None,
                backing_format: None,
            })
        }
    }
}

fn parse_qcow2(file: &File, path: &Path, h: &[u8], actual_size: u64) -> Result<Header, ImageError> {
    let unsupported = |what: String| ImageError::UnsupportedFormat {
        path: path.to_owned(),
        format: what,
    };
    let be64 = |at: usize| {
        h.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_be_bytes)
    };
    let be32 = |at: usize| {
        h.get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_be_bytes)
    };
    if h.len() < 72 {
        return Err(ImageError::Unreadable {
            path: path.to_owned(),
            detail: "truncated qcow2 header".into(),
        });
    }
    let version = be32(4);
    if !(version == 2 || version == 3) {
        return Err(unsupported(format!("qcow version {version}")));
    }
    if be32(32) != 0 {
        return Err(unsupported("encrypted qcow2".into()));
    }
    let header_len = if version == 3 {
        if be64(72) & QCOW2_EXTERNAL_DATA_FILE != 0 {
            return Err(unsupported("qcow2 with an external data file".into()));
        }
        be32(100) as usize
    } else {
        72
    };
    let mut backing_format = None;
    let mut at = header_len;
    while at + 8 <= h.len() {
        let (kind, len) = (be32(at), be32(at + 4) as usize);
        if kind == 0 {
            break;
        }
        let data = h.get(at + 8..at + 8 + len);
        match (kind, data) {
            (EXT_BACKING_FORMAT, Some(d)) => {
                backing_format = Some(String::from_utf8_lossy(d).into_owned());
            }
            (EXT_DATA_FILE, _) => {
                return Err(unsupported("qcow2 with an external data file".into()));
            }
            _ => {}
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    let (backing_offset, backing_len) = (be64(8), be32(16));
    let backing_file = if backing_offset == 0 || backing_len == 0 {
        None
    } else if backing_len > 1023 {
        return Err(ImageError::Unreadable {
            path: path.to_owned(),
            detail: format!("backing file name of {backing_len} bytes"),
        });
    } else {
        let mut name = vec![0u8; backing_len as usize];
        file.read_exact_at(&mut name, backing_offset)
            .map_err(|e| ImageError::Unreadable {
                path: path.to_owned(),
                detail: format!("backing file name: {e}"),
            })?;
        Some(String::from_utf8_lossy(&name).into_owned())
    };
    Ok(Header {
        magic: Magic::Qcow2,
        virtual_size: be64(24),
        actual_size,
        backing_file,
        backing_format,
    })
}

/// Opens the canonical `path` without following a symlink in its last
/// component (`O_NOFOLLOW`), then checks through `/proc/self/fd` that the
/// file opened is at `path` (no folder on the way was swapped for a link
/// since it was resolved). The file is then what QEMU gets, by descriptor.
pub fn open_verified(path: &Path, writable: bool) -> Result<File, ImageError> {
    let open = |noatime: i32| {
        File::options()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY | noatime)
            .open(path)
    };
    // Checking a file must not move its access time (a copy keeps it like
    // `cp -p`); O_NOATIME needs ownership or CAP_FOWNER.
    let file = match open(libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0),
        other => other,
    }
    .map_err(|source| {
        if source.raw_os_error() == Some(libc::ELOOP) {
            ImageError::Changed {
                path: path.to_owned(),
            }
        } else {
            ImageError::NotFound {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    let opened = fd_path(&file).map_err(io_err(format!("cannot check {}", path.display())))?;
    if opened != path {
        return Err(ImageError::Changed {
            path: path.to_owned(),
        });
    }
    Ok(file)
}

/// Where an open file is, as the kernel knows it.
pub fn fd_path(file: &File) -> io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

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
    let mut first = [0u8; 4];
    let n = file.read_at(&mut first, 0).unwrap_or(0);
    if n < 4 || Magic::of(&first) != Magic::Qcow2 {
        return info(qemu_img, path);
    }
    let h = read_header(&file, path)?;
    Ok(ImageInfo {
        format: ImageFormat::Qcow2,
        virtual_size: h.virtual_size,
        actual_size: Some(h.actual_size),
        backing_file: h.backing_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::image::testutil::*;

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
    fn magic_names_every_known_format() {
        let at = |off: usize, bytes: &[u8]| {
            let mut b = vec![0u8; 128];
            b[off..off + bytes.len()].copy_from_slice(bytes);
            Magic::of(&b)
        };
        assert_eq!(at(0, b"QFI\xfb"), Magic::Qcow2);
        for (off, bytes, name) in [
            (0, &b"KDMV"[..], "vmdk"),
            (0, b"# Disk DescriptorFile", "vmdk"),
            (0, b"QED\0", "qed"),
            (0, b"vhdxfile", "vhdx"),
            (0, b"conectix", "vpc"),
            (0, b"LUKS\xba\xbe", "luks"),
            (64, b"\x7f\x10\xda\xbe", "vdi"),
        ] {
            assert_eq!(at(off, bytes), Magic::Other(name), "{name}");
        }
        assert_eq!(at(0, b"\xeb\x63\x90"), Magic::None);
        assert_eq!(Magic::of(b""), Magic::None);
        assert_eq!(Magic::of(b"QF"), Magic::None);
    }

    #[test]
    fn read_header_reads_the_declared_backing_format_and_refuses_the_rest() {
        let d = TempDir::new().unwrap();
        let base = d.path().join("base.qcow2");
        let top = d.path().join("top.qcow2");
        qemu_img_ok(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "1M"]);
        overlay_on("base.qcow2", &top);
        let h = read_header(&File::open(&top).unwrap(), &top).unwrap();
        assert_eq!(h.magic, Magic::Qcow2);
        assert_eq!(h.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(h.virtual_size, 1 << 20);
        // Encrypted (crypt_method = 1): refused.
        let mut bytes = fs::read(&base).unwrap();
        bytes[35] = 1;
        let enc = d.path().join("enc.qcow2");
        fs::write(&enc, bytes).unwrap();
        let e = read_header(&File::open(&enc).unwrap(), &enc).unwrap_err();
        assert!(e.to_string().contains("encrypted qcow2"), "{e}");
        // A vmdk, a text file, an empty file.
        let vmdk = d.path().join("a.vmdk");
        qemu_img_ok(&["create", "-q", "-f", "vmdk", vmdk.to_str().unwrap(), "1M"]);
        let e = read_header(&File::open(&vmdk).unwrap(), &vmdk).unwrap_err();
        assert!(e.to_string().contains("is a vmdk image"), "{e}");
        let txt = d.path().join("a.txt");
        fs::write(&txt, "hello\n".repeat(100) + "\n\n\n\n\n\n\n\n\n\n\n\n").unwrap();
        let e = read_header(&File::open(&txt).unwrap(), &txt).unwrap_err();
        assert!(e.to_string().contains("not a disk image"), "{e}");
        let raw = d.path().join("a.img");
        fs::write(&raw, vec![0u8; 4096]).unwrap();
        let h = read_header(&File::open(&raw).unwrap(), &raw).unwrap();
        assert_eq!((h.magic, h.virtual_size), (Magic::None, 4096));
    }
}
