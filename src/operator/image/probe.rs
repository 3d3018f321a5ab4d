//! The image header as vman reads it itself, without spawning `qemu-img`
//! (which costs more than the rest of a VM start): a qcow2's format, virtual
//! size, backing file and external data file flag.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use super::qemu_img::info;
use super::{io_err, ImageError, ImageFormat, ImageInfo};

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
}
