//! Which paths a user may name as an image: regular files that resolve
//! (symlinks followed) inside the allowed image folders.

use std::fs;
use std::path::{Component, Path, PathBuf};

use super::ImageError;

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
}
