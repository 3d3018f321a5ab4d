//! Which root disk a VM boots, in the order of shared/api.md:
//! 1. its explicit `qcow2_path`, used as is;
//! 2. an existing `vms/{id}/root.qcow2`, used as is;
//! 3. its own `boot_disk`, else `VMAN_DEFAULT_BOOT_DISK` when the file
//!    exists, copied (or overlaid) into `root.qcow2`;
//! 4. a new empty 10 GiB qcow2.
//!
//! Only the precedence lives here; every image used (the explicit disk, an
//! existing root disk, the boot disk or default copied from, and the root
//! disk made) goes through the same check, `ImagePolicy::open_chain`: the
//! whole backing chain inside the allowed folders, formats as pinned, no
//! external data file, a bounded depth. The chain that passed, files kept
//! open, is what QEMU gets.
//!
//! Runs on a blocking thread: copies and `qemu-img` take time.

use std::path::{Path, PathBuf};

use super::ServiceError;
use crate::config::{BootDiskMode, Config};
use crate::model::{RootDiskSource, Vm, GIB};
use crate::operator::image::{
    self, Chain, ImageError, ImageFormat, ImagePolicy, Progress, Provision, Top,
};
use crate::operator::qemu::VmPaths;
use crate::operator::vm::LaunchError;

/// Size of the root disk made when there is nothing to copy.
pub const EMPTY_ROOT_BYTES: u64 = 10 * GIB;

#[derive(Debug, Clone)]
pub struct RootDisk {
    pub source: RootDiskSource,
    pub path: PathBuf,
    pub format: ImageFormat,
    pub virtual_size: u64,
    /// The checked chain, top first, files open.
    pub chain: Chain,
    /// Formats to pin now for `qcow2_path` / `boot_disk` (VMs recorded
    /// before formats were pinned).
    pub pin_qcow2_path: Option<ImageFormat>,
    pub pin_boot_disk: Option<ImageFormat>,
    /// How it was made at this start (method, bytes, time), for /metrics.
    pub provisioned: Option<(&'static str, u64, std::time::Duration)>,
}

impl RootDisk {
    fn new(source: RootDiskSource, chain: Chain) -> Self {
        let top = chain.top();
        Self {
            source,
            path: top.path.clone(),
            format: top.format,
            virtual_size: top.virtual_size,
            chain,
            pin_qcow2_path: None,
            pin_boot_disk: None,
            provisioned: None,
        }
    }
}

fn refused(e: ImageError) -> ServiceError {
    ServiceError::because(e, ToString::to_string)
}

fn failed(e: ImageError) -> ServiceError {
    ServiceError::image_failed(e, ToString::to_string)
}

fn field_refused(field: &'static str) -> impl Fn(ImageError) -> ServiceError {
    move |e| ServiceError::because(e, |e| format!("{field}: {e}"))
}

/// A user-given image accepted at creation: canonical path and the format
/// pinned for it.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub path: PathBuf,
    pub format: ImageFormat,
}

/// Checks a user-given image path (`qcow2_path`, `boot_disk`) when a VM is
/// created: inside the allowed folders after resolving symlinks, a qcow2 or
/// raw image, its whole backing chain checked. Returns the canonical path
/// and the format to pin.
pub fn check_user_image(
    policy: &ImagePolicy,
    field: &'static str,
    raw: &str,
) -> Result<Accepted, ServiceError> {
    let chain = policy
        .open_chain(Path::new(raw), Top::User, None, false)
        .map_err(field_refused(field))?;
    let top = chain.top();
    Ok(Accepted {
        path: top.path.clone(),
        format: top.format,
    })
}

/// Which root disk the precedence picks, from what is there (pure: the
/// files are looked at by the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pick<'a> {
    /// The VM's explicit `qcow2_path`, used as is.
    Explicit(&'a str),
    /// The VM's existing `root.qcow2`, used as is.
    Existing,
    /// The VM's own `boot_disk`, copied into `root.qcow2`.
    BootDisk(&'a str),
    /// `VMAN_DEFAULT_BOOT_DISK`, copied into `root.qcow2`.
    Default(&'a Path),
    /// A new empty disk; `missing_default` names a default boot disk that
    /// is configured but is not a file.
    Empty { missing_default: Option<&'a Path> },
}

/// The precedence: explicit > existing > boot_disk > default > empty.
/// `default` is the configured default boot disk and whether it is a file.
pub(crate) fn pick<'a>(
    explicit: Option<&'a str>,
    existing: bool,
    boot_disk: Option<&'a str>,
    default: Option<(&'a Path, bool)>,
) -> Pick<'a> {
    match (explicit, existing, boot_disk, default) {
        (Some(p), ..) => Pick::Explicit(p),
        (None, true, ..) => Pick::Existing,
        (None, false, Some(own), _) => Pick::BootDisk(own),
        (None, false, None, Some((d, true))) => Pick::Default(d),
        (None, false, None, Some((d, false))) => Pick::Empty {
            missing_default: Some(d),
        },
        (None, false, None, None) => Pick::Empty {
            missing_default: None,
        },
    }
}

/// `progress` follows the root disk being made (untouched when one is used
/// as is).
pub fn choose(
    config: &Config,
    policy: &ImagePolicy,
    vm: &Vm,
    paths: &VmPaths,
    progress: &Progress,
) -> Result<RootDisk, ServiceError> {
    let qemu_img = &config.qemu_img;
    let picked = pick(
        vm.qcow2_path.as_deref(),
        paths.root.exists(),
        vm.boot_disk.as_deref(),
        config
            .default_boot_disk
            .as_deref()
            .map(|d| (d, d.is_file())),
    );
    if let Pick::Explicit(explicit) = picked {
        let chain = policy
            .open_chain(Path::new(explicit), Top::User, vm.qcow2_path_format, true)
            .map_err(field_refused("qcow2_path"))?;
        let mut root = RootDisk::new(RootDiskSource::Explicit, chain);
        if vm.qcow2_path_format.is_none() {
            root.pin_qcow2_path = Some(root.format);
        }
        return Ok(root);
    }
    if picked == Pick::Existing {
        // Pinned when vman made it or first used it.
        let canonical = paths.root.canonicalize().ok();
        let pinned = vm.root_disk_format.filter(|_| {
            vm.root_disk_path.as_deref().is_some_and(|p| {
                Path::new(p) == paths.root || Some(Path::new(p)) == canonical.as_deref()
            })
        });
        let chain = policy
            .open_chain(&paths.root, Top::Trusted, pinned, true)
            .map_err(refused)?;
        return Ok(RootDisk::new(RootDiskSource::Existing, chain));
    }
    let grow_to = vm.template.disk_size_gb.map(|gb| gb * GIB);
    let source = match picked {
        Pick::BootDisk(own) => {
            let chain = policy
                .open_chain(Path::new(own), Top::User, vm.boot_disk_format, false)
                .map_err(field_refused("boot_disk"))?;
            Some((RootDiskSource::BootDisk, chain))
        }
        Pick::Default(default) => {
            // Its format as found at start-up, when it is still that file.
            let pinned = policy.default_boot_disk().and_then(|(canonical, format)| {
                format.filter(|_| default.canonicalize().ok().as_ref() == Some(&canonical))
            });
            let chain = policy
                .open_chain(default, Top::Trusted, pinned, false)
                .map_err(|e| ServiceError::because(e, |e| format!("default boot disk: {e}")))?;
            Some((RootDiskSource::Default, chain))
        }
        Pick::Empty {
            missing_default: Some(default),
        } => {
            tracing::warn!(
                "Default boot disk specified but not found: {}",
                default.display()
            );
            None
        }
        Pick::Empty { .. } | Pick::Explicit(_) | Pick::Existing => None,
    };
    std::fs::create_dir_all(&paths.dir).map_err(|source| {
        let path = paths.dir.display().to_string();
        ServiceError::because(LaunchError::Folder { path, source }, ToString::to_string)
    })?;
    let made = |kind| {
        policy
            .open_chain(&paths.root, Top::Trusted, Some(ImageFormat::Qcow2), true)
            .map(|chain| RootDisk::new(kind, chain))
            .map_err(refused)
    };
    let Some((kind, source)) = source else {
        let size = grow_to.unwrap_or(0).max(EMPTY_ROOT_BYTES);
        progress.set_method("empty");
        progress.begin(0);
        image::create_empty(qemu_img, &paths.root, size).map_err(failed)?;
        tracing::info!(
            "vm {}: no boot disk to copy; created an empty {} GiB root disk {}",
            vm.id,
            size / GIB,
            paths.root.display()
        );
        return made(RootDiskSource::Empty);
    };
    let overlay = config.boot_disk_mode == BootDiskMode::Overlay;
    let mode = if overlay {
        Provision::Overlay
    } else {
        Provision::Copy
    };
    let from = source.top().path.clone();
    let report = image::provision(qemu_img, &source, &paths.root, mode, grow_to, progress)
        .map_err(|e| {
            ServiceError::image_failed(e, |e| {
                format!("cannot prepare the root disk from {}: {e}", from.display())
            })
        })?;
    tracing::info!(
        "vm {}: {} boot disk {} {} to {} ({} bytes by {} in {:.1} ms)",
        vm.id,
        if kind == RootDiskSource::Default {
            "default"
        } else {
            "per-VM"
        },
        from.display(),
        if overlay { "overlaid" } else { "copied" },
        paths.root.display(),
        report.bytes,
        report.method,
        report.elapsed.as_secs_f64() * 1000.0
    );
    let mut root = made(kind)?;
    root.provisioned = Some((report.method, report.bytes, report.elapsed));
    if kind == RootDiskSource::BootDisk && vm.boot_disk_format.is_none() {
        root.pin_boot_disk = Some(source.top().format);
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Name, Template, VmState};
    use clap::Parser;
    use std::process::Command;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        config: Config,
    }

    fn qemu_img(args: &[&str]) {
        let out = Command::new("qemu-img").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    struct World {
        _d: tempfile::TempDir,
        storage: PathBuf,
        images: PathBuf,
        outside: PathBuf,
        default: PathBuf,
    }

    fn world() -> World {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        let storage = root.join("storage");
        let images = storage.join("templates");
        let outside = root.join("outside");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let default = images.join("default.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", s(&default), "8M"]);
        World {
            _d: d,
            storage,
            images,
            outside,
            default,
        }
    }

    fn config(w: &World, default: &Path) -> Config {
        Wrap::try_parse_from([
            "vman",
            "--storage-path",
            s(&w.storage),
            "--default-boot-disk",
            s(default),
            "--image-dirs",
            s(&w.images),
            "--boot-disk-mode",
            "copy",
        ])
        .unwrap()
        .config
    }

    fn vm(id: &str, qcow2_path: Option<&Path>, boot_disk: Option<&Path>) -> Vm {
        Vm {
            id: Name::parse("id", id).unwrap(),
            template: Template {
                name: Name::parse("t", "t").unwrap(),
                cpu_count: 1,
                ram_mib: 64,
                disk_size_gb: None,
                created_at: String::new(),
            },
            state: VmState::Stopped,
            local_ip: None,
            qcow2_path: qcow2_path.map(|p| s(p).to_owned()),
            boot_disk: boot_disk.map(|p| s(p).to_owned()),
            qcow2_path_format: None,
            boot_disk_format: None,
            root_disk_format: None,
            root_disk_source: None,
            root_disk_path: None,
            root_disk_size: None,
            pid: None,
            last_error: None,
            network_mode: crate::model::NetworkMode::None,
            ports: Vec::new(),
            metadata_fetched_at: None,
            created_at: String::new(),
            updated_at: String::new(),
        }
    }

    #[test]
    fn pick_follows_explicit_existing_boot_disk_default_empty() {
        let d = Path::new("/img/default.qcow2");
        let (x, b) = (Some("/img/x.qcow2"), Some("/img/b.qcow2"));
        // Every combination: the first present source in the order wins.
        for explicit in [None, x] {
            for existing in [false, true] {
                for boot in [None, b] {
                    for default in [None, Some((d, false)), Some((d, true))] {
                        let want = if let Some(p) = explicit {
                            Pick::Explicit(p)
                        } else if existing {
                            Pick::Existing
                        } else if let Some(p) = boot {
                            Pick::BootDisk(p)
                        } else if let Some((p, true)) = default {
                            Pick::Default(p)
                        } else {
                            Pick::Empty {
                                missing_default: default.map(|(p, _)| p),
                            }
                        };
                        assert_eq!(
                            pick(explicit, existing, boot, default),
                            want,
                            "{explicit:?} {existing} {boot:?} {default:?}"
                        );
                    }
                }
            }
        }
        // The named cases, spelled out.
        assert_eq!(
            pick(x, true, b, Some((d, true))),
            Pick::Explicit("/img/x.qcow2")
        );
        assert_eq!(pick(None, true, b, Some((d, true))), Pick::Existing);
        assert_eq!(
            pick(None, false, b, Some((d, true))),
            Pick::BootDisk("/img/b.qcow2")
        );
        assert_eq!(pick(None, false, None, Some((d, true))), Pick::Default(d));
        assert_eq!(
            pick(None, false, None, Some((d, false))),
            Pick::Empty {
                missing_default: Some(d)
            }
        );
        assert_eq!(
            pick(None, false, None, None),
            Pick::Empty {
                missing_default: None
            }
        );
    }

    fn choose_for(c: &Config, v: &Vm) -> Result<RootDisk, ServiceError> {
        let policy = ImagePolicy::from_config(c);
        let progress = Progress::new();
        let r = choose(
            c,
            &policy,
            v,
            &VmPaths::new(&c.vms_dir(), v.id.as_str()),
            &progress,
        );
        if let Ok(r) = &r {
            // Made at this start: the progress names how and ends at its total.
            let seen = progress.snapshot();
            let made = !matches!(
                r.source,
                RootDiskSource::Explicit | RootDiskSource::Existing
            );
            assert_eq!(seen.method != "pending", made, "{seen:?}");
            assert_eq!(seen.bytes_done, seen.bytes_total);
        }
        r
    }

    #[test]
    fn precedence_explicit_existing_boot_disk_default_empty() {
        let w = world();
        let c = config(&w, &w.default);
        let own = w.images.join("own.img");
        std::fs::write(&own, vec![0u8; 1 << 20]).unwrap();
        // 1. explicit, used as is, its format to pin.
        let r = choose_for(&c, &vm("a", Some(&own), Some(&w.default))).unwrap();
        assert_eq!(
            (r.source, r.format),
            (RootDiskSource::Explicit, ImageFormat::Raw)
        );
        assert_eq!(r.path, own);
        assert_eq!(r.pin_qcow2_path, Some(ImageFormat::Raw));
        assert!(!c.vms_dir().join("a").exists());
        // 3. boot_disk copied (before an existing root disk exists).
        let bd = w.images.join("bd.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", s(&bd), "4M"]);
        let r = choose_for(&c, &vm("b", None, Some(&bd))).unwrap();
        assert_eq!(r.source, RootDiskSource::BootDisk);
        assert_eq!(r.pin_boot_disk, Some(ImageFormat::Qcow2));
        assert_eq!(r.virtual_size, 4 << 20);
        // 2. then the existing root disk wins.
        let r = choose_for(&c, &vm("b", None, Some(&bd))).unwrap();
        assert_eq!(r.source, RootDiskSource::Existing);
        // 3. the default.
        let r = choose_for(&c, &vm("c", None, None)).unwrap();
        assert_eq!(
            (r.source, r.virtual_size),
            (RootDiskSource::Default, 8 << 20)
        );
        assert_eq!(r.chain.files.len(), 1);
        // 4. empty, when the default is missing.
        let c2 = config(&w, &w.images.join("missing.qcow2"));
        let r = choose_for(&c2, &vm("d", None, None)).unwrap();
        assert_eq!(
            (r.source, r.virtual_size),
            (RootDiskSource::Empty, EMPTY_ROOT_BYTES)
        );
    }

    /// Issue 9, hole 1: a `boot_disk` (or the default) rebased onto a host
    /// file after the VM was accepted is refused at start, before any root
    /// disk is made.
    #[test]
    fn hole1_boot_disk_and_default_get_the_full_check_at_start() {
        let w = world();
        let c = config(&w, &w.default);
        let secret = w.outside.join("secret.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", s(&secret), "4M"]);
        let bd = w.images.join("bd.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", s(&bd), "4M"]);
        let accepted =
            check_user_image(&ImagePolicy::from_config(&c), "boot_disk", s(&bd)).unwrap();
        assert_eq!(accepted.format, ImageFormat::Qcow2);
        qemu_img(&["rebase", "-u", "-F", "qcow2", "-b", s(&secret), s(&bd)]);
        let mut v = vm("e", None, Some(&bd));
        v.boot_disk_format = Some(accepted.format);
        let e = choose_for(&c, &v).unwrap_err().to_string();
        assert!(
            e.starts_with("boot_disk: ") && e.contains("outside the allowed image folders"),
            "{e}"
        );
        assert!(!c.vms_dir().join("e/root.qcow2").exists());
        qemu_img(&[
            "rebase",
            "-u",
            "-F",
            "qcow2",
            "-b",
            s(&secret),
            s(&w.default),
        ]);
        let e = choose_for(&c, &vm("f", None, None))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("default boot disk: ") && e.contains("outside"),
            "{e}"
        );
        assert!(!c.vms_dir().join("f/root.qcow2").exists());
    }
}
