//! Files an interrupted vman leaves behind: the `.<name>.partial-<random>`
//! copies of `image` (root disks in `{storage}/vms/<id>/`, data disks in
//! `{storage}/disks/`). Found for the observer, removed at start-up.

use std::path::{Path, PathBuf};

/// True for a file name that `image` uses for a copy in progress.
pub fn is_partial(name: &str) -> bool {
    name.starts_with('.') && name.contains(".partial-")
}

/// Every `.partial` file under the storage's VM folders and disk folder.
pub fn find_partials(storage: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![storage.join("disks")];
    if let Ok(vms) = std::fs::read_dir(storage.join("vms")) {
        dirs.extend(
            vms.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    // Snapshot files in the making (`vms/<id>/snapshots/`).
    let snapshot_dirs: Vec<PathBuf> = dirs
        .iter()
        .map(|d| d.join("snapshots"))
        .filter(|d| d.is_dir())
        .collect();
    // Data disk copies in the making (`vms/<id>/snapshots/<name>.disks/`).
    let copy_dirs: Vec<PathBuf> = snapshot_dirs
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.ends_with(".disks"))
        })
        .map(|e| e.path())
        .collect();
    dirs.extend(snapshot_dirs);
    dirs.extend(copy_dirs);
    let mut found = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        found.extend(
            entries
                .flatten()
                .filter(|e| e.file_name().to_str().is_some_and(is_partial))
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.path()),
        );
    }
    found.sort();
    found
}

/// Removes every `.partial` file (only safe while no copy can run: at
/// start-up, before the API listens). Returns what was removed.
pub fn remove_partials(storage: &Path) -> Vec<PathBuf> {
    find_partials(storage)
        .into_iter()
        .filter(|p| match std::fs::remove_file(p) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("cannot remove {}: {e}", p.display());
                false
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partials_of_root_and_data_disks_are_found_and_removed_others_kept() {
        let d = tempfile::tempdir().expect("tempdir");
        let vm = d.path().join("vms/a");
        std::fs::create_dir_all(&vm).expect("vm dir");
        std::fs::create_dir_all(d.path().join("disks")).expect("disks dir");
        std::fs::write(vm.join(".root.qcow2.partial-0123"), b"half").expect("w");
        std::fs::write(vm.join("root.qcow2"), b"whole").expect("w");
        std::fs::write(d.path().join("disks/.d1.qcow2.partial-9"), b"half").expect("w");
        std::fs::write(d.path().join("disks/d1.qcow2"), b"whole").expect("w");
        assert_eq!(find_partials(d.path()).len(), 2);
        assert_eq!(remove_partials(d.path()).len(), 2);
        assert!(find_partials(d.path()).is_empty());
        assert!(vm.join("root.qcow2").exists());
        assert!(d.path().join("disks/d1.qcow2").exists());
    }
}
