//! Snapshots of a stopped VM's root disk (issue 13, first step): the rules
//! (VM stopped, root disk vman's own `root.qcow2`, name unique, at most
//! `VMAN_MAX_SNAPSHOTS` and a backing chain within the depth limit, no
//! deleting a snapshot something is built on) and the order of file and row
//! writes. The files are `operator::image::snapshot`'s.
//!
//! Order: a snapshot's files become visible first (snapshot file, then the
//! new root overlay), then its row; deleting removes the file, then the row.
//! A crash in between leaves a bootable VM; the leftovers are repaired by
//! the next request on that name (`take`: a snapshot file that is still the
//! root disk's own inode is removed; one the root disk is built on gets its
//! row back; `delete`: a row without a file is removed).

use std::path::{Path, PathBuf};

use super::blocking::blocking;
use super::error::Reason;
use super::{missing, Service, ServiceError};
use crate::model::{Name, VmState};
use crate::operator::image::snapshot::{self as files, backing_of, same_file, snapshot_file};
use crate::operator::image::{ImageError, ImageFormat, Top, MAX_CHAIN_FILES};
use crate::store::{Snapshot, StoreError};

/// A snapshot to take, already validated.
#[derive(Debug, Clone)]
pub struct CreateSnapshot {
    pub name: Name,
    pub description: Option<String>,
}

/// A snapshot and what the VM's files say about it now.
#[derive(Debug, Clone)]
pub struct SnapshotView {
    pub snapshot: Snapshot,
    /// The disks it holds (`root` only in this step).
    pub disks: Vec<&'static str>,
}

impl From<Snapshot> for SnapshotView {
    fn from(snapshot: Snapshot) -> Self {
        Self {
            snapshot,
            disks: vec!["root"],
        }
    }
}

fn image_failed(e: ImageError) -> ServiceError {
    ServiceError::image_failed(e, |e| format!("snapshot files: {e}"))
}

impl Service {
    /// The VM, refused unless it is stopped and boots vman's own root disk
    /// (and that disk exists when `need_root`).
    fn snapshot_vm(&self, id: &Name, action: &str) -> Result<PathBuf, ServiceError> {
        let vm = self.get_vm(id)?;
        if vm.state != VmState::Stopped {
            return Err(Reason::NotStopped.refuse(format!(
                "VM {id} is {}: stop the VM first to {action} (snapshots of running VMs come later)",
                vm.state.as_str()
            )));
        }
        if vm.qcow2_path.is_some() {
            return Err(Reason::NoRootDisk.refuse(format!(
                "VM {id} boots its explicit qcow2_path; snapshots cover vman's own root disk only"
            )));
        }
        Ok(self.paths(id).root)
    }

    fn existing_root(&self, id: &Name, root: &Path) -> Result<(), ServiceError> {
        if root.is_file() {
            Ok(())
        } else {
            Err(Reason::NoRootDisk.refuse(format!(
                "VM {id} has no root disk yet (it is made at its first start)"
            )))
        }
    }

    pub async fn create_snapshot(
        &self,
        id: &Name,
        input: CreateSnapshot,
    ) -> Result<SnapshotView, ServiceError> {
        let _guard = self.lock_vm(id).await;
        let root = self.snapshot_vm(id, "take a snapshot")?;
        self.existing_root(id, &root)?;
        let name = input.name.clone();
        match self.store.get_snapshot(id, &name) {
            Ok(_) => {
                return Err(Reason::AlreadyExists
                    .refuse(format!("VM {id} has a snapshot named {name} already")))
            }
            Err(StoreError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        let existing = self.store.snapshots_of_vm(id)?;
        let max = self.config.max_snapshots as usize;
        if existing.len() >= max {
            return Err(Reason::TooManySnapshots.refuse(format!(
                "VM {id} has {} snapshots, the most VMAN_MAX_SNAPSHOTS allows ({max}); delete one first",
                existing.len()
            )));
        }
        let policy = self.host.images.clone();
        let qemu_img = self.config.qemu_img.clone();
        let vm_id = id.clone();
        let made = blocking("snapshot", move || -> Result<Snapshot, ServiceError> {
            let vm_dir = root.parent().unwrap_or(Path::new("/")).to_path_buf();
            let dest = snapshot_file(&vm_dir, name.as_str());
            let mut adopt = false;
            if dest.exists() {
                if same_file(&dest, &root) {
                    // Left by an interrupted snapshot before the root moved.
                    files::remove(&dest).map_err(image_failed)?;
                } else if backing_of(&root).ok().flatten().is_some_and(|b| same_file(&b, &dest)) {
                    // Left by an interrupted snapshot after the root moved:
                    // the root disk is built on it; record it.
                    adopt = true;
                } else {
                    return Err(Reason::AlreadyExists.refuse(format!(
                        "{} exists without a record; remove it by hand",
                        dest.display()
                    )));
                }
            }
            let chain = policy
                .open_chain(&root, Top::Trusted, Some(ImageFormat::Qcow2), false)
                .map_err(|e| ServiceError::because(e, |e| format!("root disk: {e}")))?;
            let depth = chain.files.len() + usize::from(!adopt);
            if depth > MAX_CHAIN_FILES {
                return Err(Reason::TooManySnapshots.refuse(format!(
                    "the root disk's backing chain would have {depth} files, more than the limit of \
                     {MAX_CHAIN_FILES}; delete a snapshot or restore an older one first"
                )));
            }
            let (top, parent_file) = if adopt {
                (chain.files.get(1).cloned(), chain.files.get(2).map(|f| f.path.clone()))
            } else {
                (Some(chain.top().clone()), chain.files.get(1).map(|f| f.path.clone()))
            };
            let Some(top) = top else {
                return Err(ServiceError::Internal("adopted snapshot not in the chain".into()));
            };
            let virtual_size = top.virtual_size;
            drop(chain);
            if !adopt {
                files::take(&qemu_img, &root, name.as_str(), virtual_size).map_err(image_failed)?;
            }
            let snap_dir = std::fs::canonicalize(files::snapshot_dir(&vm_dir))
                .unwrap_or_else(|_| files::snapshot_dir(&vm_dir));
            let parent = parent_file
                .filter(|p| p.parent() == Some(snap_dir.as_path()))
                .and_then(|p| {
                    p.file_stem()
                        .and_then(|s| s.to_str())
                        .map(str::to_owned)
                });
            let size_bytes = std::fs::metadata(&dest)
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .unwrap_or(0);
            Ok(Snapshot {
                vm_id,
                name,
                description: input.description,
                created_at: crate::model::now(),
                parent,
                vm_state: VmState::Stopped.as_str().to_owned(),
                size_bytes,
                virtual_size,
            })
        })
        .await??;
        self.store.insert_snapshot(&made).map_err(missing("VM"))?;
        Ok(made.into())
    }

    pub fn list_snapshots(&self, id: &Name) -> Result<Vec<SnapshotView>, ServiceError> {
        self.get_vm(id)?;
        Ok(self
            .store
            .snapshots_of_vm(id)?
            .into_iter()
            .map(SnapshotView::from)
            .collect())
    }

    pub fn get_snapshot(&self, id: &Name, name: &Name) -> Result<SnapshotView, ServiceError> {
        self.get_vm(id)?;
        Ok(self
            .store
            .get_snapshot(id, name)
            .map_err(missing("snapshot"))?
            .into())
    }

    /// The VM's root disk becomes a new empty overlay on the snapshot.
    pub async fn restore_snapshot(
        &self,
        id: &Name,
        name: &Name,
    ) -> Result<SnapshotView, ServiceError> {
        let _guard = self.lock_vm(id).await;
        let snap = self
            .store
            .get_snapshot(id, name)
            .map_err(missing("snapshot"))?;
        let root = self.snapshot_vm(id, "restore a snapshot")?;
        let policy = self.host.images.clone();
        let qemu_img = self.config.qemu_img.clone();
        let file = snapshot_file(&self.paths(id).dir, name.as_str());
        blocking("restore", move || -> Result<(), ServiceError> {
            // The snapshot's own chain must pass the checks (and leave room
            // for the overlay) before anything changes.
            let chain = policy
                .open_chain(&file, Top::Trusted, Some(ImageFormat::Qcow2), false)
                .map_err(|e| ServiceError::because(e, |e| format!("snapshot file: {e}")))?;
            if chain.files.len() + 1 > MAX_CHAIN_FILES {
                return Err(Reason::TooManySnapshots.refuse(format!(
                    "the restored root disk's chain would exceed {MAX_CHAIN_FILES} files"
                )));
            }
            let size = chain.top().virtual_size;
            let file = chain.top().path.clone();
            drop(chain);
            files::restore(&qemu_img, &root, &file, size).map_err(image_failed)
        })
        .await??;
        Ok(snap.into())
    }

    /// Deletes a snapshot nothing is built on (its file, then its row).
    pub async fn delete_snapshot(&self, id: &Name, name: &Name) -> Result<(), ServiceError> {
        let _guard = self.lock_vm(id).await;
        self.store
            .get_snapshot(id, name)
            .map_err(missing("snapshot"))?;
        self.refuse_delete_of_clone_base(id, name)?;
        let root = self.snapshot_vm(id, "delete a snapshot")?;
        let vm_dir = self.paths(id).dir;
        let name_s = name.to_string();
        blocking("delete snapshot", move || -> Result<(), ServiceError> {
            let file = snapshot_file(&vm_dir, &name_s);
            let on_it = |top: &Path| backing_of(top).ok().flatten().is_some_and(|b| same_file(&b, &file));
            // Every snapshot file there is (recorded or not) counts.
            let mut others: Vec<String> = std::fs::read_dir(files::snapshot_dir(&vm_dir))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_str()?.strip_suffix(".qcow2")?.to_owned();
                    (!n.starts_with('.') && n != name_s).then_some(n)
                })
                .collect();
            others.sort();
            let mut users: Vec<String> = others
                .iter()
                .filter(|o| on_it(&snapshot_file(&vm_dir, o)))
                .map(|o| format!("snapshot {o}"))
                .collect();
            if root.is_file() && on_it(&root) {
                users.push("the current root disk".into());
            }
            if !users.is_empty() {
                return Err(Reason::SnapshotInUse.refuse(format!(
                    "{} is built on snapshot {name_s}; deleting it would need merging, which comes later",
                    users.join(", ")
                )));
            }
            files::remove(&file).map_err(image_failed)
        })
        .await??;
        self.store.delete_snapshot(id, name)?;
        Ok(())
    }
}
