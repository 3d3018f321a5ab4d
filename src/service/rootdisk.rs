//! Which root disk a VM boots, in the order of shared/api.md:
//! 1. its explicit `qcow2_path`, used as is;
//! 2. an existing `vms/{id}/root.qcow2`, used as is;
//! 3. its own `boot_disk`, else `VMAN_DEFAULT_BOOT_DISK` when the file
//!    exists, copied (or overlaid) into `root.qcow2`;
//! 4. a new empty 10 GB qcow2.
//!
//! Runs on a blocking thread: copies and `qemu-img` take time.

use std::path::{Path, PathBuf};

use super::ServiceError;
use crate::config::{BootDiskMode, Config};
use crate::model::{RootDiskSource, Vm};
use crate::operator::image::{self, ImageError, ImageFormat, Provision};
use crate::operator::qemu::VmPaths;

/// Size of the root disk made when there is nothing to copy.
pub const EMPTY_ROOT_BYTES: u64 = 10 * crate::model::GIB;

const GB: u64 = crate::model::GIB;

#[derive(Debug, Clone)]
pub struct RootDisk {
    pub source: RootDiskSource,
    pub path: PathBuf,
    pub format: ImageFormat,
    pub virtual_size: u64,
}

fn refused(e: ImageError) -> ServiceError {
    ServiceError::Rejected(e.to_string())
}

/// Checks a user-given image path (`qcow2_path`, `boot_disk`): inside the
/// allowed folders after resolving symlinks, a qcow2 or raw image, and a
/// backing chain inside the allowed folders too. Returns the canonical path.
pub fn check_user_image(config: &Config, field: &str, raw: &str) -> Result<PathBuf, ServiceError> {
    user_image(config, field, raw).map(|(path, _)| path)
}

fn user_image(
    config: &Config,
    field: &str,
    raw: &str,
) -> Result<(PathBuf, image::ImageInfo), ServiceError> {
    let rejected = |e: &dyn std::fmt::Display| ServiceError::Rejected(format!("{field}: {e}"));
    let path = image::resolve_allowed(Path::new(raw), &config.allowed_image_dirs())
        .map_err(|e| rejected(&e))?;
    let info = image::probe(&config.qemu_img, &path).map_err(|e| rejected(&e))?;
    check_backing(config, &path, &info).map_err(|e| rejected(&e))?;
    Ok((path, info))
}

/// Longest backing chain followed; deeper is refused rather than trusted.
const MAX_BACKING_DEPTH: usize = 16;

/// A qcow2 may name a backing file, which QEMU then opens too, and so on
/// down the chain. A disk used as is (explicit or existing) could have been
/// rewritten by its guest to point at any host file, so every file of the
/// chain must lie inside the allowed image folders.
fn check_backing(config: &Config, path: &Path, info: &image::ImageInfo) -> Result<(), String> {
    let mut current = path.to_path_buf();
    let mut next = info.backing_file.clone();
    for _ in 0..MAX_BACKING_DEPTH {
        let Some(backing) = next else {
            return Ok(());
        };
        let backing = Path::new(&backing);
        let absolute = if backing.is_absolute() {
            backing.to_path_buf()
        } else {
            current.parent().unwrap_or(Path::new("/")).join(backing)
        };
        // The default boot disk itself is always a fine backing file: overlay
        // mode makes root disks backed by it, wherever VMAN_IMAGE_DIRS points.
        let canonical = absolute.canonicalize().ok();
        let is_default = config
            .default_boot_disk
            .as_deref()
            .and_then(|d| d.canonicalize().ok())
            .is_some_and(|d| canonical.as_ref() == Some(&d));
        let allowed = if let Some(default) = canonical.filter(|_| is_default) {
            default
        } else {
            image::resolve_allowed(&absolute, &config.allowed_image_dirs()).map_err(|e| {
                format!("{} has a backing file that is refused: {e}", path.display())
            })?
        };
        next = image::probe(&config.qemu_img, &allowed)
            .map_err(|e| format!("{} has a backing file that is refused: {e}", path.display()))?
            .backing_file;
        current = allowed;
    }
    Err(format!(
        "{} has a backing chain deeper than {MAX_BACKING_DEPTH} files",
        path.display()
    ))
}

pub fn choose(config: &Config, vm: &Vm, paths: &VmPaths) -> Result<RootDisk, ServiceError> {
    let qemu_img = &config.qemu_img;
    if let Some(explicit) = &vm.qcow2_path {
        let (path, info) = user_image(config, "qcow2_path", explicit)?;
        return Ok(RootDisk {
            source: RootDiskSource::Explicit,
            path,
            format: info.format,
            virtual_size: info.virtual_size,
        });
    }
    if paths.root.exists() {
        let info = image::probe(qemu_img, &paths.root).map_err(refused)?;
        check_backing(config, &paths.root, &info).map_err(ServiceError::Rejected)?;
        return Ok(RootDisk {
            source: RootDiskSource::Existing,
            path: paths.root.clone(),
            format: info.format,
            virtual_size: info.virtual_size,
        });
    }
    let grow_to = vm.template.disk_size_gb.map(|gb| gb * GB);
    let source = match (&vm.boot_disk, &config.default_boot_disk) {
        (Some(own), _) => Some((
            RootDiskSource::BootDisk,
            image::resolve_allowed(Path::new(own), &config.allowed_image_dirs())
                .map_err(|e| ServiceError::Rejected(format!("boot_disk: {e}")))?,
        )),
        (None, Some(default)) if default.is_file() => {
            Some((RootDiskSource::Default, default.clone()))
        }
        (None, Some(default)) => {
            tracing::warn!(
                "Default boot disk specified but not found: {}",
                default.display()
            );
            None
        }
        (None, None) => None,
    };
    std::fs::create_dir_all(&paths.dir).map_err(|e| {
        ServiceError::Rejected(format!(
            "cannot create the VM folder {}: {e}",
            paths.dir.display()
        ))
    })?;
    let Some((kind, source)) = source else {
        let size = grow_to.unwrap_or(0).max(EMPTY_ROOT_BYTES);
        image::create_empty(qemu_img, &paths.root, size).map_err(refused)?;
        tracing::info!(
            "vm {}: no boot disk to copy; created an empty {} GB root disk {}",
            vm.id,
            size / GB,
            paths.root.display()
        );
        return Ok(RootDisk {
            source: RootDiskSource::Empty,
            path: paths.root.clone(),
            format: ImageFormat::Qcow2,
            virtual_size: size,
        });
    };
    let info = image::info(qemu_img, &source).map_err(refused)?;
    let overlay = config.boot_disk_mode == BootDiskMode::Overlay;
    let mode = if overlay {
        Provision::Overlay
    } else {
        Provision::Copy
    };
    let report =
        image::provision(qemu_img, &source, &info, &paths.root, mode, grow_to).map_err(|e| {
            ServiceError::Rejected(format!(
                "cannot prepare the root disk from {}: {e}",
                source.display()
            ))
        })?;
    tracing::info!(
        "vm {}: {} boot disk {} {} to {} ({} bytes by {} in {:.1} ms)",
        vm.id,
        if kind == RootDiskSource::Default {
            "default"
        } else {
            "per-VM"
        },
        source.display(),
        if overlay { "overlaid" } else { "copied" },
        paths.root.display(),
        report.bytes,
        report.method,
        report.elapsed.as_secs_f64() * 1000.0
    );
    Ok(RootDisk {
        source: kind,
        path: paths.root.clone(),
        format: report.info.format,
        virtual_size: report.info.virtual_size,
    })
}
