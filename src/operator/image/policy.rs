//! Which files may be used as disk images, in one place: `ImagePolicy`,
//! built once at start-up from the configured image folders and the default
//! boot disk. A user-given path must resolve (symlinks followed) to a
//! regular file inside the allowed folders; every file of a backing chain
//! must too (or be the default boot disk, which overlays use as backing).
//! `open_chain` walks a chain file by file, opening each one itself and
//! checking the open file, so what is checked is exactly what QEMU later
//! gets by descriptor.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::atomic::read_full_at;
use super::probe::{open_verified, read_header, Magic};
use super::{ImageError, ImageFormat};
use crate::config::Config;
use crate::sync::LockExt;

/// Most files in one backing chain (the top included); longer chains are
/// refused rather than trusted.
pub const MAX_CHAIN_FILES: usize = 16;

/// Where the top file of a chain comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Top {
    /// A path a user gave: it must be inside the allowed folders.
    User,
    /// A file vman itself placed or was configured with (`root.qcow2`, a
    /// data disk, the default boot disk): used where it is.
    Trusted,
}

/// One file of a checked chain, kept open.
#[derive(Debug, Clone)]
pub struct ChainFile {
    /// Canonical path (checked to be where the open file is).
    pub path: PathBuf,
    pub format: ImageFormat,
    pub virtual_size: u64,
    pub actual_size: u64,
    /// As written in the header (None at the bottom of the chain).
    pub backing_file: Option<String>,
    /// The backing file's format as the header declares it.
    pub backing_format: Option<String>,
    /// The open file: what QEMU (and qemu-img) get by descriptor.
    pub file: Arc<File>,
}

/// A checked backing chain, top first.
#[derive(Debug, Clone)]
pub struct Chain {
    pub files: Vec<ChainFile>,
}

impl Chain {
    pub fn top(&self) -> &ChainFile {
        // A chain is never empty: `open_chain` pushes the top first.
        &self.files[0]
    }
}

/// The allowed-folder rule, built once at start-up.
#[derive(Debug, Clone)]
pub struct ImagePolicy {
    /// Each configured folder and its canonical path (None while it does
    /// not exist; resolved when it appears).
    dirs: Vec<(PathBuf, Option<PathBuf>)>,
    /// The default boot disk, canonical, and its format as found at
    /// start-up (its pinned format).
    default: Option<(PathBuf, Option<ImageFormat>)>,
    /// The default boot disk as configured (resolved late when it did not
    /// exist at start-up).
    default_configured: Option<PathBuf>,
    /// Linked clones: a VM folder (canonical) and the snapshot files of
    /// other VMs its disks may be built on (canonical). Kept by the service
    /// from its `clones` rows (`service::clone`); shared by every copy.
    links: Arc<Mutex<HashMap<PathBuf, HashSet<PathBuf>>>>,
}

impl ImagePolicy {
    pub fn new(dirs: Vec<PathBuf>, default_boot_disk: Option<&Path>) -> Self {
        let dirs = dirs
            .into_iter()
            .map(|d| {
                let c = fs::canonicalize(&d).ok();
                (d, c)
            })
            .collect();
        let default = default_boot_disk.and_then(|d| {
            let c = fs::canonicalize(d).ok()?;
            let format = sniff(&c).ok();
            Some((c, format))
        });
        Self {
            dirs,
            default,
            default_configured: default_boot_disk.map(Path::to_path_buf),
            links: Arc::default(),
        }
    }

    /// Lets the images of the VM folder `vm_dir` be built on `base`, another
    /// VM's snapshot file (a linked clone), and on that file's own chain in
    /// its snapshot folder.
    pub fn allow_linked_base(&self, vm_dir: &Path, base: &Path) {
        let dir = fs::canonicalize(vm_dir).unwrap_or_else(|_| vm_dir.to_path_buf());
        let base = fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
        self.links
            .lock_or_recover()
            .entry(dir)
            .or_default()
            .insert(base);
    }

    /// Forgets the linked bases of `vm_dir` (the clone is gone).
    pub fn forget_linked_bases(&self, vm_dir: &Path) {
        let dir = fs::canonicalize(vm_dir).unwrap_or_else(|_| vm_dir.to_path_buf());
        let mut links = self.links.lock_or_recover();
        links.remove(&dir);
        links.remove(vm_dir);
    }

    /// Whether `backing` is a linked base allowed for the VM that `file`
    /// (a root disk or snapshot file, canonical) belongs to.
    fn linked_base_of(&self, file: &Path, backing: &Path) -> bool {
        let Some(folder) = file.parent() else {
            return false;
        };
        let vm_dir = if folder.file_name().is_some_and(|n| n == "snapshots") {
            folder.parent().unwrap_or(folder)
        } else {
            folder
        };
        self.links
            .lock_or_recover()
            .get(vm_dir)
            .is_some_and(|bases| bases.contains(backing))
    }

    pub fn from_config(config: &Config) -> Self {
        Self::new(
            config.allowed_image_dirs(),
            config.default_boot_disk.as_deref(),
        )
    }

    /// The allowed folders that exist, canonical.
    fn existing_dirs(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .filter_map(|(d, c)| c.clone().or_else(|| fs::canonicalize(d).ok()))
            .collect()
    }

    fn inside(&self, dirs: &[PathBuf], p: &Path) -> bool {
        dirs.iter().any(|d| p.starts_with(d))
    }

    /// The default boot disk's canonical path and pinned format, when it
    /// existed at start-up.
    pub fn default_boot_disk(&self) -> Option<(PathBuf, Option<ImageFormat>)> {
        self.default.clone().or_else(|| {
            let c = fs::canonicalize(self.default_configured.as_ref()?).ok()?;
            Some((c, None))
        })
    }

    /// Checks that `path`, after resolving symlinks, is a regular file
    /// inside one of the allowed folders. Returns the canonical path.
    pub fn resolve(&self, path: &Path) -> Result<PathBuf, ImageError> {
        let canonical = self.resolve_inside(path, false)?;
        let meta = fs::metadata(&canonical).map_err(|source| ImageError::NotFound {
            path: path.to_path_buf(),
            source,
        })?;
        if !meta.is_file() {
            return Err(ImageError::NotAFile { path: canonical });
        }
        Ok(canonical)
    }

    /// The canonical path when it lies inside the allowed folders (or is
    /// the default boot disk, when `default_ok`).
    fn resolve_inside(&self, path: &Path, default_ok: bool) -> Result<PathBuf, ImageError> {
        let dirs = self.existing_dirs();
        let list = |ds: &[PathBuf]| {
            ds.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if dirs.is_empty() && !default_ok {
            let configured: Vec<PathBuf> = self.dirs.iter().map(|(d, _)| d.clone()).collect();
            return Err(ImageError::NoAllowedDirs {
                configured: if configured.is_empty() {
                    "none configured".into()
                } else {
                    list(&configured)
                },
            });
        }
        let not_allowed = |p: PathBuf| ImageError::NotAllowed {
            path: p,
            allowed: list(&dirs),
        };
        match fs::canonicalize(path) {
            Ok(canonical) => {
                let is_default = default_ok
                    && self
                        .default_boot_disk()
                        .is_some_and(|(d, _)| d == canonical);
                if is_default || self.inside(&dirs, &canonical) {
                    Ok(canonical)
                } else {
                    Err(not_allowed(path.to_path_buf()))
                }
            }
            Err(source) => {
                // Say "not found" only inside the allowed folders: outside
                // them, the API must not tell which host files exist.
                let lexical = std::path::absolute(path)
                    .map(|p| normalize(&p))
                    .unwrap_or_default();
                if !lexical.as_os_str().is_empty()
                    && (self.inside(&dirs, &lexical)
                        || self
                            .dirs
                            .iter()
                            .any(|(d, _)| lexical.starts_with(normalize(d))))
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

    /// Opens and checks the whole backing chain of `path`: every file a
    /// regular file inside the allowed folders (the top may be `Trusted`;
    /// a backing file may be the default boot disk), each one's format what
    /// was pinned (`pinned` for the top, the format its parent's header
    /// declares for a backing file: a backing file without a declared
    /// format is refused), a raw file never starting with a known image
    /// magic, no external data file, no encryption, no loop, at most
    /// `MAX_CHAIN_FILES` files. The top is opened read-write when
    /// `writable`, the backing files read-only.
    pub fn open_chain(
        &self,
        path: &Path,
        top: Top,
        pinned: Option<ImageFormat>,
        writable: bool,
    ) -> Result<Chain, ImageError> {
        let top_path = match top {
            Top::User => self.resolve(path)?,
            Top::Trusted => fs::canonicalize(path).map_err(|source| ImageError::NotFound {
                path: path.to_path_buf(),
                source,
            })?,
        };
        let first = self.open_one(&top_path, pinned, writable)?;
        let mut seen = HashSet::new();
        seen.insert(identity(&first.file)?);
        let mut files = vec![first];
        // The snapshot folder of the last linked base reached (another
        // VM's), whose files may follow it in the chain.
        let mut linked_dir: Option<PathBuf> = None;
        loop {
            let parent = &files[files.len() - 1];
            let Some(backing) = parent.backing_file.clone() else {
                break;
            };
            let wrap = |e: ImageError| ImageError::Backing {
                path: parent.path.clone(),
                source: Box::new(e),
            };
            if files.len() >= MAX_CHAIN_FILES {
                return Err(ImageError::ChainTooDeep {
                    path: top_path,
                    max: MAX_CHAIN_FILES,
                });
            }
            let Some(declared) = parent.backing_format.clone() else {
                return Err(ImageError::NoBackingFormat {
                    path: parent.path.clone(),
                    backing,
                });
            };
            let format = ImageFormat::parse(&declared).ok_or_else(|| {
                wrap(ImageError::UnsupportedFormat {
                    path: PathBuf::from(&backing),
                    format: declared.clone(),
                })
            })?;
            if is_protocol(&backing) {
                return Err(wrap(ImageError::BackingNotAllowed {
                    path: PathBuf::from(&backing),
                    reason: "only plain file names are accepted, not protocols or json: specs"
                        .into(),
                }));
            }
            let name = Path::new(&backing);
            let absolute = if name.is_absolute() {
                name.to_path_buf()
            } else {
                parent.path.parent().unwrap_or(Path::new("/")).join(name)
            };
            // A vman-placed top (a VM's root disk, or one of its snapshot
            // files) may have the VM's own snapshot files
            // (`<VM folder>/snapshots/`) in its chain.
            // A linked clone's: the source's snapshot file registered for
            // the VM of the file naming it (`allow_linked_base`), and below
            // it that snapshot's own parents (in its own snapshot folder).
            let own_snapshot = fs::canonicalize(&absolute).ok().filter(|c| {
                top == Top::Trusted
                    && (c.parent().is_some_and(|d| own_snapshot_dir(&top_path, d))
                        || self.linked_base_of(&parent.path, c)
                        || (linked_dir.is_some() && c.parent() == linked_dir.as_deref()))
            });
            // Below a linked base, its own snapshot folder only.
            if let Some(c) = own_snapshot.as_ref().filter(|c| {
                !c.parent().is_some_and(|d| own_snapshot_dir(&top_path, d)) && in_snapshot_dir(c)
            }) {
                linked_dir = c.parent().map(Path::to_path_buf);
            }
            let canonical = match own_snapshot {
                Some(c) => c,
                None => {
                    linked_dir = None;
                    self.resolve_inside(&absolute, true).map_err(wrap)?
                }
            };
            let next = self
                .open_one(&canonical, Some(format), false)
                .map_err(wrap)?;
            if !seen.insert(identity(&next.file)?) {
                return Err(ImageError::ChainLoop { path: top_path });
            }
            files.push(next);
        }
        Ok(Chain { files })
    }

    /// Opens one canonical file and checks its header against `pinned`.
    fn open_one(
        &self,
        path: &Path,
        pinned: Option<ImageFormat>,
        writable: bool,
    ) -> Result<ChainFile, ImageError> {
        let file = open_verified(path, writable)?;
        let magic = magic_of(&file, path)?;
        let format = match (pinned, magic) {
            (Some(ImageFormat::Raw), Magic::None) | (None, Magic::None) => ImageFormat::Raw,
            (Some(ImageFormat::Raw), m) => {
                return Err(ImageError::RawWithHeader {
                    path: path.to_owned(),
                    found: m.name(),
                })
            }
            (Some(ImageFormat::Qcow2), Magic::Qcow2) | (None, Magic::Qcow2) => ImageFormat::Qcow2,
            (Some(ImageFormat::Qcow2), m) => {
                return Err(ImageError::FormatChanged {
                    path: path.to_owned(),
                    pinned: ImageFormat::Qcow2,
                    found: m.name(),
                })
            }
            (None, Magic::Other(name)) => {
                return Err(ImageError::UnsupportedFormat {
                    path: path.to_owned(),
                    format: name.to_owned(),
                })
            }
        };
        let h = read_header(&file, path)?;
        Ok(ChainFile {
            path: path.to_owned(),
            format,
            virtual_size: h.virtual_size,
            actual_size: h.actual_size,
            backing_file: h.backing_file,
            backing_format: h.backing_format,
            file: Arc::new(file),
        })
    }
}

/// True when `dir` is the snapshot folder of the VM whose root disk or
/// snapshot file is `top`: `<top's folder>/snapshots`, or `top`'s folder
/// itself when `top` is in a `snapshots` folder.
fn own_snapshot_dir(top: &Path, dir: &Path) -> bool {
    let Some(folder) = top.parent() else {
        return false;
    };
    dir == folder.join("snapshots")
        || (folder.file_name().is_some_and(|n| n == "snapshots") && dir == folder)
}

/// True when `file` lies in a folder named `snapshots`.
fn in_snapshot_dir(file: &Path) -> bool {
    file.parent()
        .and_then(Path::file_name)
        .is_some_and(|n| n == "snapshots")
}

/// `ImagePolicy::resolve` with a policy of these folders (for tests).
#[cfg(test)]
pub fn resolve_allowed(path: &Path, allowed_dirs: &[PathBuf]) -> Result<PathBuf, ImageError> {
    ImagePolicy::new(allowed_dirs.to_vec(), None).resolve(path)
}

/// The format a file's magic says (raw when none), or why it is refused.
pub fn sniff(path: &Path) -> Result<ImageFormat, ImageError> {
    let file = File::open(path).map_err(|source| ImageError::NotFound {
        path: path.to_owned(),
        source,
    })?;
    match magic_of(&file, path)? {
        Magic::Qcow2 => Ok(ImageFormat::Qcow2),
        Magic::None => Ok(ImageFormat::Raw),
        Magic::Other(name) => Err(ImageError::UnsupportedFormat {
            path: path.to_owned(),
            format: name.to_owned(),
        }),
    }
}

fn magic_of(file: &File, path: &Path) -> Result<Magic, ImageError> {
    // The magic of every known format lies in the first 128 bytes.
    let mut buf = [0u8; 128];
    let n = read_full_at(file, &mut buf, 0)
        .map_err(super::io_err(format!("cannot read {}", path.display())))?;
    Ok(Magic::of(&buf[..n]))
}

/// (device, inode) of an open file.
fn identity(file: &File) -> Result<(u64, u64), ImageError> {
    let m = file
        .metadata()
        .map_err(super::io_err("cannot stat an image"))?;
    Ok((m.dev(), m.ino()))
}

/// `json:{...}`, `nbd://...`, `host:path`: anything QEMU could read as a
/// protocol rather than a file name.
fn is_protocol(name: &str) -> bool {
    match name.find(':') {
        Some(colon) => !name[..colon].contains('/'),
        None => false,
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
#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::image::testutil::*;
    use std::os::unix::fs::symlink;
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

    // ---- open_chain

    fn qi(args: &[&str]) {
        qemu_img_ok(args);
    }

    fn p(x: &Path) -> &str {
        x.to_str().unwrap()
    }

    /// An image folder, an outside folder, and a policy allowing the first.
    fn dirs() -> (TempDir, PathBuf, PathBuf, ImagePolicy) {
        let d = TempDir::new().unwrap();
        let images = fs::canonicalize(d.path()).unwrap().join("images");
        let outside = fs::canonicalize(d.path()).unwrap().join("outside");
        fs::create_dir_all(&images).unwrap();
        fs::create_dir_all(&outside).unwrap();
        let policy = ImagePolicy::new(vec![images.clone()], None);
        (d, images, outside, policy)
    }

    fn overlay(top: &Path, backing: &str, fmt: &str) {
        qi(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-F",
            fmt,
            "-b",
            backing,
            p(top),
            "4M",
        ]);
    }

    #[test]
    fn open_chain_follows_a_chain_and_keeps_each_file_open() {
        let (_d, images, _o, policy) = dirs();
        let base = images.join("base.img");
        fs::write(&base, vec![0u8; 4 << 20]).unwrap();
        let mid = images.join("mid.qcow2");
        overlay(&mid, "base.img", "raw");
        let top = images.join("top.qcow2");
        overlay(&top, p(&mid), "qcow2");
        // Through a symlink inside: resolved.
        symlink(&top, images.join("link.qcow2")).unwrap();
        let chain = policy
            .open_chain(&images.join("link.qcow2"), Top::User, None, true)
            .unwrap();
        let got: Vec<(PathBuf, ImageFormat)> = chain
            .files
            .iter()
            .map(|f| (f.path.clone(), f.format))
            .collect();
        assert_eq!(
            got,
            vec![
                (top.clone(), ImageFormat::Qcow2),
                (mid.clone(), ImageFormat::Qcow2),
                (base.clone(), ImageFormat::Raw),
            ]
        );
        for f in &chain.files {
            assert_eq!(super::super::probe::fd_path(&f.file).unwrap(), f.path);
        }
        assert_eq!(chain.top().virtual_size, 4 << 20);
        // Top read-write, backing files read-only.
        let mode = |f: &File| unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(f), libc::F_GETFL) } & libc::O_ACCMODE;
        assert_eq!(mode(&chain.files[0].file), libc::O_RDWR);
        assert_eq!(mode(&chain.files[1].file), libc::O_RDONLY);
    }

    #[test]
    fn open_chain_refuses_hostile_chains() {
        let (_d, images, outside, policy) = dirs();
        let secret = outside.join("secret.qcow2");
        qi(&["create", "-q", "-f", "qcow2", p(&secret), "4M"]);
        let refused = |path: &Path, pinned, says: &str| {
            let e = policy
                .open_chain(path, Top::User, pinned, false)
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{}: {e}", path.display());
        };
        let out = images.join("out.qcow2");
        overlay(&out, p(&secret), "qcow2");
        refused(&out, None, "has a backing file that is refused");
        refused(&out, None, "outside the allowed image folders");
        let js = images.join("js.qcow2");
        overlay(
            &js,
            r#"json:{"driver":"file","filename":"/etc/passwd"}"#,
            "raw",
        );
        refused(&js, None, "not protocols or json");
        let (a, b) = (images.join("a.qcow2"), images.join("b.qcow2"));
        overlay(&a, "b.qcow2", "qcow2");
        overlay(&b, "a.qcow2", "qcow2");
        refused(&a, None, "loops");
        symlink("l2", images.join("l1")).unwrap();
        symlink("l1", images.join("l2")).unwrap();
        refused(&images.join("l1"), None, "symbolic links");
        let fmt = images.join("fmt.qcow2");
        overlay(&fmt, "a.qcow2", "vmdk");
        refused(&fmt, None, "is a vmdk image");
        // Depth: 16 files pass, 17 do not.
        let mut below = images.join("c00.qcow2");
        qi(&["create", "-q", "-f", "qcow2", p(&below), "4M"]);
        for i in 1..MAX_CHAIN_FILES + 1 {
            let next = images.join(format!("c{i:02}.qcow2"));
            overlay(&next, p(&below), "qcow2");
            if i == MAX_CHAIN_FILES - 1 {
                let c = policy.open_chain(&next, Top::User, None, false).unwrap();
                assert_eq!(c.files.len(), MAX_CHAIN_FILES);
            }
            below = next;
        }
        refused(&below, None, "more than 16 files");
        // Pinned formats.
        let raw = images.join("raw.img");
        fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
        policy
            .open_chain(&raw, Top::User, Some(ImageFormat::Raw), false)
            .unwrap();
        fs::write(&raw, fs::read(&out).unwrap()).unwrap();
        refused(
            &raw,
            Some(ImageFormat::Raw),
            "was accepted as a raw image but now starts with a qcow2 header",
        );
        let vmdk = images.join("x.vmdk");
        qi(&["create", "-q", "-f", "vmdk", p(&vmdk), "4M"]);
        refused(
            &vmdk,
            Some(ImageFormat::Qcow2),
            "was accepted as a qcow2 image but is now vmdk",
        );
        refused(&vmdk, None, "is a vmdk image");
        // A backing file declared raw that starts with a qcow2 header.
        let over_raw = images.join("over-raw.qcow2");
        overlay(&over_raw, p(&raw), "raw");
        refused(
            &over_raw,
            None,
            "was accepted as a raw image but now starts",
        );
    }

    #[test]
    fn the_default_boot_disk_is_a_fine_backing_file_wherever_it_is() {
        let (_d, images, outside, _) = dirs();
        let default = outside.join("default.qcow2");
        qi(&["create", "-q", "-f", "qcow2", p(&default), "4M"]);
        let policy = ImagePolicy::new(vec![images.clone()], Some(&default));
        assert_eq!(
            policy.default_boot_disk(),
            Some((default.clone(), Some(ImageFormat::Qcow2)))
        );
        let root = images.join("root.qcow2");
        overlay(&root, p(&default), "qcow2");
        let chain = policy
            .open_chain(&root, Top::Trusted, Some(ImageFormat::Qcow2), true)
            .unwrap();
        assert_eq!(chain.files[1].path, default);
        // Not as a user-given path, though.
        let e = policy
            .open_chain(&default, Top::User, None, false)
            .unwrap_err();
        assert!(matches!(e, ImageError::NotAllowed { .. }), "{e}");
    }

    /// Issue 9, hole 3: what was checked is what is opened. A folder on the
    /// way swapped for a symlink after the path was resolved, or a symlink
    /// put in place of the file, is refused, not followed.
    #[test]
    fn hole3_open_verified_refuses_swapped_paths() {
        let (_d, images, outside, _) = dirs();
        let sub = images.join("sub");
        fs::create_dir(&sub).unwrap();
        fs::write(sub.join("a.img"), vec![0u8; 512]).unwrap();
        fs::write(outside.join("a.img"), vec![1u8; 512]).unwrap();
        let checked = sub.join("a.img");
        super::super::probe::open_verified(&checked, false).unwrap();
        // The folder becomes a link to the outside folder.
        fs::rename(&sub, images.join("sub.old")).unwrap();
        symlink(&outside, &sub).unwrap();
        let e = super::super::probe::open_verified(&checked, false).unwrap_err();
        assert!(matches!(e, ImageError::Changed { .. }), "{e}");
        // The file itself becomes a link.
        fs::remove_file(&sub).unwrap();
        fs::create_dir(&sub).unwrap();
        symlink(outside.join("a.img"), &checked).unwrap();
        let e = super::super::probe::open_verified(&checked, false).unwrap_err();
        assert!(matches!(e, ImageError::Changed { .. }), "{e}");
        assert!(e.to_string().contains("changed while it was being checked"));
    }

    /// A linked clone's root disk may be built on the one snapshot file
    /// registered for its VM folder (and that file's own parents), never on
    /// another VM's other snapshots, and not once the link is forgotten.
    #[test]
    fn a_linked_clone_reaches_only_its_registered_base_and_its_parents() {
        let d = TempDir::new().unwrap();
        let root = fs::canonicalize(d.path()).unwrap();
        let (a, b) = (root.join("vms/a"), root.join("vms/b"));
        fs::create_dir_all(a.join("snapshots")).unwrap();
        fs::create_dir_all(&b).unwrap();
        let s0 = a.join("snapshots/s0.qcow2");
        qemu_img_ok(&["create", "-q", "-f", "qcow2", s0.to_str().unwrap(), "1M"]);
        let s1 = a.join("snapshots/s1.qcow2");
        overlay_on(s0.to_str().unwrap(), &s1);
        let other = a.join("snapshots/other.qcow2");
        overlay_on(s0.to_str().unwrap(), &other);
        let clone_root = b.join("root.qcow2");
        overlay_on(s1.to_str().unwrap(), &clone_root);
        let policy = ImagePolicy::new(vec![], None);
        assert!(policy
            .open_chain(&clone_root, Top::Trusted, None, false)
            .is_err());
        policy.allow_linked_base(&b, &s1);
        let chain = policy
            .open_chain(&clone_root, Top::Trusted, None, false)
            .unwrap();
        assert_eq!(chain.files.len(), 3);
        // A user-named top never reaches it; another of a's snapshots is
        // not the registered base.
        assert!(policy
            .open_chain(&clone_root, Top::User, None, false)
            .is_err());
        fs::remove_file(&clone_root).unwrap();
        overlay_on(other.to_str().unwrap(), &clone_root);
        assert!(policy
            .open_chain(&clone_root, Top::Trusted, None, false)
            .is_err());
        fs::remove_file(&clone_root).unwrap();
        overlay_on(s1.to_str().unwrap(), &clone_root);
        // A linked clone of the linked clone: c -> b's snapshot t -> a's s1 -> s0.
        let c = root.join("vms/c");
        fs::create_dir_all(b.join("snapshots")).unwrap();
        fs::create_dir_all(&c).unwrap();
        let t = b.join("snapshots/t.qcow2");
        overlay_on(s1.to_str().unwrap(), &t);
        let c_root = c.join("root.qcow2");
        overlay_on(t.to_str().unwrap(), &c_root);
        assert!(policy
            .open_chain(&c_root, Top::Trusted, None, false)
            .is_err());
        policy.allow_linked_base(&c, &t);
        let chain = policy
            .open_chain(&c_root, Top::Trusted, None, false)
            .unwrap();
        assert_eq!(chain.files.len(), 4);
        policy.clone().forget_linked_bases(&b);
        assert!(policy
            .open_chain(&c_root, Top::Trusted, None, false)
            .is_err());
        assert!(policy
            .open_chain(&clone_root, Top::Trusted, None, false)
            .is_err());
    }
}
