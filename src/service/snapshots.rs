//! Snapshot rules (issue 13): a snapshot holds the VM's root disk (an
//! external qcow2 overlay: the root disk's file becomes the immutable
//! snapshot file, a new overlay on it the root disk) and, with
//! `include_data_disks` (default), a copy of each attached data disk. A
//! stopped VM is snapshotted with `qemu-img` and file copies; a running one
//! without stopping it, through one QMP `transaction` (new root overlay and
//! point-in-time copies of the data disks at the same instant; disk-only,
//! crash-consistent, RAM not saved). Restore (stopped VMs) puts every disk
//! back as it was in the snapshot; delete merges the snapshot's data into
//! the files built on it (`qemu-img rebase`, or `block-stream` into a
//! running root disk) so later snapshots stay valid.
//!
//! Crash safety: every operation is recorded in `snapshot_ops` before its
//! first file changes and ends in the same transaction as its row change;
//! the file steps are ordered so each intermediate state boots (see
//! ARCHITECTURE.md); `snapshot_recovery` finishes or rolls back what a
//! crash interrupted.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::blocking::blocking;
use super::error::Reason;
use super::{missing, Service, ServiceError};
use crate::fault;
use crate::model::{Name, VmState};
use crate::operator::image::snapshot::{
    self as files, backing_of, disk_copy, disk_copy_dir, same_file, snapshot_file, PendingFile,
};
use crate::operator::image::{ImageError, ImageFormat, Top, MAX_CHAIN_FILES};
use crate::operator::snapshot_qmp::{self as live, Backup, NewNode};
use crate::operator::vm::Running;
use crate::store::{Disk, Snapshot, SnapshotDisk, StoreError};

/// A snapshot to take, already validated.
#[derive(Debug, Clone)]
pub struct CreateSnapshot {
    pub name: Name,
    pub description: Option<String>,
    /// Copy the VM's attached data disks too (default true).
    pub include_data_disks: bool,
}

impl CreateSnapshot {
    /// A snapshot of every disk, without a description.
    pub fn named(name: Name) -> Self {
        Self {
            name,
            description: None,
            include_data_disks: true,
        }
    }
}

/// A disk a snapshot holds, as the API shows it.
#[derive(Debug, Clone)]
pub struct SnapshotDiskView {
    /// `root`, or the data disk's id.
    pub id: String,
    pub kind: &'static str,
    pub format: String,
    pub virtual_size: u64,
    pub size_bytes: u64,
}

/// A snapshot and the disks it holds.
#[derive(Debug, Clone)]
pub struct SnapshotView {
    pub snapshot: Snapshot,
    pub disks: Vec<SnapshotDiskView>,
}

impl SnapshotView {
    /// Bytes allocated on the host by the snapshot's files.
    pub fn size_bytes(&self) -> u64 {
        self.disks.iter().map(|d| d.size_bytes).sum()
    }
}

impl From<Snapshot> for SnapshotView {
    fn from(snapshot: Snapshot) -> Self {
        let data: u64 = snapshot.disks.iter().map(|d| d.size_bytes).sum();
        let mut disks = vec![SnapshotDiskView {
            id: "root".into(),
            kind: "root",
            format: "qcow2".into(),
            virtual_size: snapshot.virtual_size,
            size_bytes: snapshot.size_bytes.saturating_sub(data),
        }];
        disks.extend(snapshot.disks.iter().map(|d| SnapshotDiskView {
            id: d.id.clone(),
            kind: "data",
            format: d.format.clone(),
            virtual_size: d.virtual_size,
            size_bytes: d.size_bytes,
        }));
        Self { snapshot, disks }
    }
}

/// What a `create` operation records before its first file changes
/// (`snapshot_ops.plan`): enough to finish it after a crash.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CreatePlan {
    pub description: Option<String>,
    pub created_at: String,
    pub parent: Option<String>,
    pub virtual_size: u64,
    /// The data disks copied (sizes filled in when finished).
    pub disks: Vec<SnapshotDisk>,
    /// Taken from a running VM: the new root overlay's node name and one
    /// copy job per data disk (job id, target node, disk id).
    pub running: bool,
    pub overlay_node: Option<String>,
    pub jobs: Vec<(String, String, String)>,
}

/// What a `delete` operation records: the snapshot's parent (its children's
/// new parent).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DeletePlan {
    pub parent: Option<String>,
}

fn image_failed(e: ImageError) -> ServiceError {
    ServiceError::image_failed(e, |e| format!("snapshot files: {e}"))
}

fn live_failed(vm: &Name, e: live::SnapshotQmpError) -> ServiceError {
    ServiceError::because(e, |e| format!("snapshot of running VM {vm}: {e}"))
}

/// Bytes a file allocates (0 when it cannot be read).
pub(crate) fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap_or(0)
}

/// A short random hex string for node and job names.
fn tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:08x}",
        (nanos as u64 ^ u64::from(std::process::id())) as u32
    )
}

/// The VM's state as far as snapshots go.
enum Power {
    Stopped,
    Running(Arc<Running>),
}

/// The names of the snapshot files in `vm_dir/snapshots/` other than `but`.
fn snapshot_names(vm_dir: &Path, but: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(files::snapshot_dir(vm_dir))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.strip_suffix(".qcow2")?.to_owned();
            (!n.starts_with('.') && n != but).then_some(n)
        })
        .collect();
    out.sort();
    out
}

/// True when `top`'s header names `file` as its backing file.
pub(crate) fn built_on(top: &Path, file: &Path) -> bool {
    backing_of(top)
        .ok()
        .flatten()
        .is_some_and(|b| same_file(&b, file))
}

impl Service {
    /// The VM, refused unless it boots vman's own root disk; `stopped_only`
    /// refuses a running VM too. A VM in `error` is always refused.
    fn snapshot_vm(
        &self,
        id: &Name,
        action: &str,
        stopped_only: bool,
    ) -> Result<(PathBuf, Power), ServiceError> {
        let vm = self.get_vm(id)?;
        if vm.qcow2_path.is_some() {
            return Err(Reason::NoRootDisk.refuse(format!(
                "VM {id} boots its explicit qcow2_path; snapshots cover vman's own root disk only"
            )));
        }
        let power = match (vm.state, self.live(id)) {
            (VmState::Stopped, _) => Power::Stopped,
            (VmState::Running, Some(run)) if !stopped_only => Power::Running(run),
            (state, _) => {
                return Err(Reason::NotStopped.refuse(format!(
                    "VM {id} is {}: stop the VM first to {action}",
                    state.as_str()
                )))
            }
        };
        Ok((self.paths(id).root, power))
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

    fn begin_op(&self, id: &Name, name: &Name, op: &str, plan: String) -> Result<(), ServiceError> {
        match self.store.begin_snapshot_op(id, name, op, &plan) {
            Ok(()) => Ok(()),
            Err(StoreError::AlreadyExists) => Err(Reason::SnapshotInUse.refuse(format!(
                "an operation on snapshot {name} of VM {id} is under way; try again later"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Takes a snapshot of a stopped or running VM (see the module doc).
    /// Clones call it too.
    pub async fn create_snapshot(
        &self,
        id: &Name,
        input: CreateSnapshot,
    ) -> Result<SnapshotView, ServiceError> {
        let _guard = self.lock_vm(id).await;
        self.create_snapshot_locked(id, input).await
    }

    /// `create_snapshot` for a caller that holds the VM's lock already.
    pub async fn create_snapshot_locked(
        &self,
        id: &Name,
        input: CreateSnapshot,
    ) -> Result<SnapshotView, ServiceError> {
        let (root, power) = self.snapshot_vm(id, "take a snapshot", false)?;
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
        let data: Vec<Disk> = if input.include_data_disks {
            self.store.disks_of_vm(id)?
        } else {
            Vec::new()
        };
        let running = matches!(power, Power::Running(_));
        // Checks (root chain, depth, data disk files) and leftovers of an
        // interrupted take of this name (before the operation record existed).
        let policy = self.host.images.clone();
        let vm_dir = self.paths(id).dir;
        let (root2, name2, data2) = (root.clone(), name.clone(), data.clone());
        let (virtual_size, parent, adopt) = blocking(
            "snapshot checks",
            move || -> Result<(u64, Option<String>, bool), ServiceError> {
                let dest = snapshot_file(&vm_dir, name2.as_str());
                let mut adopt = false;
                if dest.exists() {
                    if same_file(&dest, &root2) {
                        files::remove(&dest).map_err(image_failed)?;
                    } else if !running && built_on(&root2, &dest) {
                        adopt = true;
                    } else {
                        return Err(Reason::AlreadyExists.refuse(format!(
                            "snapshot file {name2}.qcow2 exists without a record; remove it by hand"
                        )));
                    }
                }
                let chain = policy
                    .open_chain(&root2, Top::Trusted, Some(ImageFormat::Qcow2), false)
                    .map_err(|e| ServiceError::because(e, |e| format!("root disk: {e}")))?;
                let depth = chain.files.len() + usize::from(!adopt);
                if depth > MAX_CHAIN_FILES {
                    return Err(Reason::TooManySnapshots.refuse(format!(
                        "the root disk's backing chain would have {depth} files, more than the limit of \
                         {MAX_CHAIN_FILES}; delete a snapshot or restore an older one first"
                    )));
                }
                let (top, parent_file) = if adopt {
                    (chain.files.get(1), chain.files.get(2).map(|f| f.path.clone()))
                } else {
                    (Some(chain.top()), chain.files.get(1).map(|f| f.path.clone()))
                };
                let Some(top) = top else {
                    return Err(ServiceError::Internal("adopted snapshot not in the chain".into()));
                };
                let snap_dir = std::fs::canonicalize(files::snapshot_dir(&vm_dir))
                    .unwrap_or_else(|_| files::snapshot_dir(&vm_dir));
                let parent = parent_file
                    .filter(|p| p.parent() == Some(snap_dir.as_path()))
                    .and_then(|p| p.file_stem().and_then(|s| s.to_str()).map(str::to_owned));
                for d in &data2 {
                    super::disks::check_file_of(&policy, d, false)?;
                }
                Ok((top.virtual_size, parent, adopt))
            },
        )
        .await??;
        let tag = tag();
        let mut plan = CreatePlan {
            description: input.description.clone(),
            created_at: crate::model::now(),
            parent,
            virtual_size,
            disks: data
                .iter()
                .map(|d| SnapshotDisk {
                    id: d.id.to_string(),
                    format: d.format.as_str().to_owned(),
                    virtual_size: d.size_gb * crate::model::GIB,
                    size_bytes: 0,
                })
                .collect(),
            running,
            overlay_node: running.then(|| format!("rs-{tag}")),
            jobs: data
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    (
                        format!("snap-{tag}-{i}"),
                        format!("sc-{tag}-{i}"),
                        d.id.to_string(),
                    )
                })
                .collect(),
        };
        if adopt {
            // The files are complete already: only the row was missing.
            plan.disks.clear();
        }
        let plan_json =
            serde_json::to_string(&plan).map_err(|e| ServiceError::Internal(e.to_string()))?;
        self.begin_op(id, &name, "create", plan_json)?;
        let taken = match power {
            Power::Stopped if adopt => Ok(()),
            Power::Stopped => {
                self.take_stopped(id, &name, &root, &data, virtual_size)
                    .await
            }
            Power::Running(run) => {
                self.take_running(id, &name, &root, &data, &plan, &run)
                    .await
            }
        };
        if let Err(e) = taken {
            if let Err(e2) = self.store.end_snapshot_op(id, &name) {
                tracing::error!("snapshot {id}/{name}: cannot end its operation record: {e2}");
            }
            return Err(e);
        }
        fault::point("snapshot.before_db_commit");
        let made = self.finish_create_record(id, &name, plan)?;
        tracing::info!(
            "snapshot {id}/{name} taken ({}, {} data disk(s))",
            if running { "running" } else { "stopped" },
            made.disks.len()
        );
        Ok(made.into())
    }

    /// The row of a snapshot whose files are complete, recorded with the
    /// end of its operation.
    pub(crate) fn finish_create_record(
        &self,
        id: &Name,
        name: &Name,
        plan: CreatePlan,
    ) -> Result<Snapshot, ServiceError> {
        let vm_dir = self.paths(id).dir;
        let mut disks = plan.disks;
        for d in &mut disks {
            d.size_bytes = allocated(&disk_copy(&vm_dir, name.as_str(), &d.id));
        }
        let root_bytes = allocated(&snapshot_file(&vm_dir, name.as_str()));
        let made = Snapshot {
            vm_id: id.clone(),
            name: name.clone(),
            description: plan.description,
            created_at: plan.created_at,
            parent: plan.parent,
            vm_state: if plan.running { "running" } else { "stopped" }.to_owned(),
            size_bytes: root_bytes + disks.iter().map(|d| d.size_bytes).sum::<u64>(),
            virtual_size: plan.virtual_size,
            disks,
        };
        self.store
            .finish_snapshot_create(&made)
            .map_err(missing("VM"))?;
        Ok(made)
    }

    /// Stopped VM: copies of the data disks first (complete before the root
    /// disk moves), then the root disk's files (`files::take`).
    async fn take_stopped(
        &self,
        id: &Name,
        name: &Name,
        root: &Path,
        data: &[Disk],
        virtual_size: u64,
    ) -> Result<(), ServiceError> {
        let qemu_img = self.config.qemu_img.clone();
        let vm_dir = self.paths(id).dir;
        let (root, name, data) = (root.to_path_buf(), name.clone(), data.to_vec());
        blocking("snapshot", move || -> Result<(), ServiceError> {
            for d in &data {
                let dest = disk_copy(&vm_dir, name.as_str(), d.id.as_str());
                let _ = files::remove(&dest);
                files::copy_disk(Path::new(&d.path), &dest)
                    .and_then(|p| p.persist(&dest))
                    .map_err(image_failed)?;
            }
            files::take(&qemu_img, &root, name.as_str(), virtual_size).map_err(image_failed)?;
            fault::point("snapshot.after_overlay");
            Ok(())
        })
        .await?
    }

    /// Running VM: the root disk's files as for a stopped VM (QEMU holds
    /// the old root by descriptor, so it keeps writing there: the new
    /// `root.qcow2` stays empty until the transaction), empty copy targets,
    /// then one QMP transaction, then the copies' end.
    async fn take_running(
        &self,
        id: &Name,
        name: &Name,
        root: &Path,
        data: &[Disk],
        plan: &CreatePlan,
        run: &Arc<Running>,
    ) -> Result<(), ServiceError> {
        let qemu_img = self.config.qemu_img.clone();
        let vm_dir = self.paths(id).dir;
        let snap = snapshot_file(&vm_dir, name.as_str());
        let (root2, name2, data2) = (root.to_path_buf(), name.clone(), data.to_vec());
        let virtual_size = plan.virtual_size;
        let (overlay, targets) = blocking(
            "snapshot files",
            move || -> Result<(std::fs::File, Vec<(PendingFile, std::fs::File)>), ServiceError> {
                let mut targets = Vec::new();
                for d in &data2 {
                    let dest = disk_copy(&vm_dir, name2.as_str(), d.id.as_str());
                    let pending = files::empty_image(
                        &qemu_img,
                        &dest,
                        d.format.as_str(),
                        d.size_gb * crate::model::GIB,
                    )
                    .map_err(image_failed)?;
                    let file = files::open_rw(pending.path()).map_err(image_failed)?;
                    targets.push((pending, file));
                }
                files::take(&qemu_img, &root2, name2.as_str(), virtual_size)
                    .map_err(image_failed)?;
                let overlay = files::open_rw(&root2).map_err(image_failed)?;
                Ok((overlay, targets))
            },
        )
        .await??;
        fault::point("snapshot.after_overlay");
        let qmp = &run.qmp;
        let overlay_node = plan.overlay_node.clone().unwrap_or_default();
        let switched = async {
            let root_node = live::root_top_node(qmp).await?;
            let backups: Vec<Backup<'_>> = data
                .iter()
                .zip(&targets)
                .zip(&plan.jobs)
                .map(|((d, (_, file)), (job, node, _))| Backup {
                    device_node: crate::operator::qemu::disk_node(d.id.as_str()),
                    target: NewNode {
                        file,
                        format: d.format,
                        node: node.clone(),
                    },
                    job: job.clone(),
                })
                .collect();
            let overlay = NewNode {
                file: &overlay,
                format: ImageFormat::Qcow2,
                node: overlay_node.clone(),
            };
            live::snapshot(qmp, &root_node, &overlay, &backups).await
        }
        .await;
        // An answer lost after the transaction happened: QEMU's root top is
        // the new overlay, so it is done.
        let switched = match switched {
            Err(e) => match live::root_top_node(qmp).await {
                Ok(top) if top == overlay_node => Ok(()),
                _ => Err(e),
            },
            ok => ok,
        };
        if let Err(e) = switched {
            // QEMU still writes into the old root (now also the snapshot
            // file): make it `root.qcow2` again.
            let (root2, snap2) = (root.to_path_buf(), snap.clone());
            blocking("snapshot rollback", move || files::untake(&root2, &snap2))
                .await?
                .map_err(image_failed)?;
            return Err(live_failed(id, e));
        }
        fault::point("snapshot.after_transaction");
        let jobs: Vec<(String, String)> = plan
            .jobs
            .iter()
            .map(|(job, node, _)| (job.clone(), node.clone()))
            .collect();
        let copied = live::finish_backups(qmp, &jobs).await;
        let vm_dir = self.paths(id).dir;
        let name2 = name.clone();
        let disk_ids: Vec<String> = data.iter().map(|d| d.id.to_string()).collect();
        let ok = copied.is_ok();
        blocking("snapshot copies", move || -> Result<(), ServiceError> {
            for ((pending, file), disk) in targets.into_iter().zip(disk_ids) {
                drop(file);
                if ok {
                    let dest = disk_copy(&vm_dir, name2.as_str(), &disk);
                    pending.persist(&dest).map_err(image_failed)?;
                }
            }
            Ok(())
        })
        .await??;
        if let Err(e) = copied {
            // The root disk runs on the new overlay already: merge the
            // snapshot back into it so nothing half-made stays.
            tracing::warn!("snapshot {id}/{name}: a data disk copy failed ({e}); merging it away");
            let parent = plan.parent.clone();
            if let Err(e2) = self
                .merge_away(id, name, parent.as_deref(), Some(run))
                .await
            {
                tracing::error!("snapshot {id}/{name}: merge after a failed copy: {e2}");
            }
            return Err(live_failed(id, e));
        }
        Ok(())
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

    /// Puts every disk of a stopped VM back as it was in the snapshot: the
    /// data disks' copies over their files, then the root disk as a new
    /// empty overlay on the snapshot file. A data disk the snapshot holds
    /// that was deleted since is made again (and attached); one attached to
    /// another VM now refuses the restore. Disks attached since stay.
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
        let (root, _) = self.snapshot_vm(id, "restore a snapshot", true)?;
        for d in &snap.disks {
            let disk_id = Name::from_trusted(d.id.clone());
            match self.store.get_disk(&disk_id) {
                Ok(disk) => {
                    if let Some((owner, _)) = disk.attachment.as_ref().filter(|(o, _)| o != id) {
                        return Err(Reason::SnapshotInUse.refuse(format!(
                            "data disk {} of snapshot {name} is attached to VM {owner} now; detach it first",
                            d.id
                        )));
                    }
                }
                Err(StoreError::NotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.begin_op(id, name, "restore", "{}".into())?;
        let result = self.redo_restore(id, &snap, &root).await;
        match &result {
            Ok(()) => self.store.end_snapshot_op(id, name)?,
            Err(e) => {
                // Nothing changed when the checks refused; a failure half-way
                // stays recorded so start-up finishes it.
                if matches!(
                    e.reason(),
                    Some(Reason::ImageRefused(_)) | Some(Reason::TooManySnapshots)
                ) {
                    self.store.end_snapshot_op(id, name)?;
                }
            }
        }
        result?;
        tracing::info!("VM {id} restored to snapshot {name}");
        Ok(snap.into())
    }

    /// The file steps of a restore (repeatable: start-up runs them again
    /// for a restore a crash interrupted), then the data disks' records.
    pub(crate) async fn redo_restore(
        &self,
        id: &Name,
        snap: &Snapshot,
        root: &Path,
    ) -> Result<(), ServiceError> {
        let policy = self.host.images.clone();
        let qemu_img = self.config.qemu_img.clone();
        let vm_dir = self.paths(id).dir;
        let file = snapshot_file(&vm_dir, snap.name.as_str());
        let disks_dir = self.config.disks_dir();
        let (root2, snap2) = (root.to_path_buf(), snap.clone());
        blocking("restore", move || -> Result<(), ServiceError> {
            // Every file must pass the checks before anything changes.
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
            let mut copies = Vec::new();
            for d in &snap2.disks {
                let copy = disk_copy(&vm_dir, snap2.name.as_str(), &d.id);
                let format = ImageFormat::parse(&d.format).unwrap_or(ImageFormat::Qcow2);
                let chain = policy
                    .open_chain(&copy, Top::Trusted, Some(format), false)
                    .map_err(|e| {
                        ServiceError::because(e, |e| format!("copy of disk {}: {e}", d.id))
                    })?;
                if chain.files.len() > 1 {
                    return Err(Reason::DiskFileRefused(None)
                        .refuse(format!("copy of disk {} has a backing file", d.id)));
                }
                copies.push((copy, disks_dir.join(format!("{}.qcow2", d.id))));
            }
            for (copy, dest) in copies {
                files::copy_disk(&copy, &dest)
                    .and_then(|p| p.persist_replacing(&dest))
                    .map_err(image_failed)?;
                fault::point("restore.after_disk");
            }
            files::restore(&qemu_img, &root2, &file, size).map_err(image_failed)
        })
        .await??;
        // Records: a disk deleted since is made again; an available one is
        // attached again (the VM is stopped: cold attach).
        for d in &snap.disks {
            let disk_id = Name::from_trusted(d.id.clone());
            let path = self.config.disks_dir().join(format!("{}.qcow2", d.id));
            let disk = match self.store.get_disk(&disk_id) {
                Ok(disk) => disk,
                Err(StoreError::NotFound) => self.store.insert_disk(&crate::store::NewDisk {
                    id: disk_id.clone(),
                    size_gb: d.virtual_size.div_ceil(crate::model::GIB).max(1),
                    mount_point: None,
                    path: path.to_string_lossy().into_owned(),
                    format: ImageFormat::parse(&d.format).unwrap_or(ImageFormat::Qcow2),
                })?,
                Err(e) => return Err(e.into()),
            };
            if disk.size_gb * crate::model::GIB != d.virtual_size {
                self.store
                    .set_disk_size(&disk_id, d.virtual_size.div_ceil(crate::model::GIB).max(1))?;
            }
            if disk.attachment.is_none() {
                let slot = self.free_slot(id)?;
                self.store.claim_disk(&disk_id, id, slot)?;
            }
        }
        Ok(())
    }

    /// Deletes a snapshot: its data is merged into every file built on it
    /// (other snapshots, the root disk), then its files and row go.
    pub async fn delete_snapshot(&self, id: &Name, name: &Name) -> Result<(), ServiceError> {
        let _guard = self.lock_vm(id).await;
        let snap = self
            .store
            .get_snapshot(id, name)
            .map_err(missing("snapshot"))?;
        self.refuse_delete_of_clone_base(id, name)?;
        let (_, power) = self.snapshot_vm(id, "delete a snapshot", false)?;
        let run = match power {
            Power::Running(run) => Some(run),
            Power::Stopped => None,
        };
        self.merge_away(id, name, snap.parent.as_deref(), run.as_ref())
            .await
    }

    /// The merge and removal of snapshot `name` (VM lock held).
    pub(crate) async fn merge_away(
        &self,
        id: &Name,
        name: &Name,
        parent_name: Option<&str>,
        run: Option<&Arc<Running>>,
    ) -> Result<(), ServiceError> {
        let vm_dir = self.paths(id).dir;
        let root = self.paths(id).root;
        let file = snapshot_file(&vm_dir, name.as_str());
        let policy = self.host.images.clone();
        let running = run.is_some();
        let (vm_dir2, file2, root2, name_s) =
            (vm_dir.clone(), file.clone(), root.clone(), name.to_string());
        // Who is built on it, its own backing, and whether QEMU reads a
        // file that would have to change.
        let (children, root_child, parent_file) = blocking(
            "snapshot merge plan",
            move || -> Result<(Vec<PathBuf>, bool, Option<PathBuf>), ServiceError> {
                let children: Vec<PathBuf> = snapshot_names(&vm_dir2, &name_s)
                    .into_iter()
                    .map(|o| snapshot_file(&vm_dir2, &o))
                    .filter(|f| built_on(f, &file2))
                    .collect();
                let root_child = root2.is_file() && built_on(&root2, &file2);
                let parent_file = if file2.exists() {
                    backing_of(&file2).map_err(image_failed)?
                } else {
                    None
                };
                if running {
                    let chain = policy
                        .open_chain(&root2, Top::Trusted, Some(ImageFormat::Qcow2), false)
                        .map_err(|e| ServiceError::because(e, |e| format!("root disk: {e}")))?;
                    let open: Vec<PathBuf> = chain.files.iter().skip(1).map(|f| f.path.clone()).collect();
                    if children.iter().any(|c| open.iter().any(|o| same_file(o, c))) {
                        return Err(Reason::NotStopped.refuse(format!(
                            "the running VM reads a snapshot built on {name_s}, which the merge would \
                             change: stop the VM first"
                        )));
                    }
                }
                Ok((children, root_child, parent_file))
            },
        )
        .await??;
        let plan = serde_json::to_string(&DeletePlan {
            parent: parent_name.map(str::to_owned),
        })
        .map_err(|e| ServiceError::Internal(e.to_string()))?;
        self.begin_op(id, name, "delete", plan)?;
        let merged = self
            .merge_children(id, &file, children, root_child, parent_file, run)
            .await;
        if let Err(e) = merged {
            // Every file is still valid (a merge step only copies what the
            // chain already shows); the snapshot stays.
            self.store.end_snapshot_op(id, name)?;
            return Err(e);
        }
        fault::point("delete.after_merge");
        let dir = disk_copy_dir(&vm_dir, name.as_str());
        blocking("snapshot delete", move || -> Result<(), ServiceError> {
            files::remove(&file).map_err(image_failed)?;
            files::remove_dir(&dir).map_err(image_failed)
        })
        .await??;
        self.store.finish_snapshot_delete(id, name, parent_name)?;
        tracing::info!("snapshot {id}/{name} deleted");
        Ok(())
    }

    async fn merge_children(
        &self,
        id: &Name,
        file: &Path,
        children: Vec<PathBuf>,
        root_child: bool,
        parent_file: Option<PathBuf>,
        run: Option<&Arc<Running>>,
    ) -> Result<(), ServiceError> {
        let qemu_img = self.config.qemu_img.clone();
        let root = self.paths(id).root;
        let offline_root = root_child && run.is_none();
        let (parent2, root_off) = (parent_file.clone(), root.clone());
        blocking("snapshot merge", move || -> Result<(), ServiceError> {
            for c in children.iter().chain(offline_root.then_some(&root_off)) {
                files::rebase(&qemu_img, c, parent2.as_deref()).map_err(image_failed)?;
            }
            Ok(())
        })
        .await??;
        if let (true, Some(run)) = (root_child, run) {
            let qmp = &run.qmp;
            let streamed = async {
                let top = live::root_top_node(qmp).await?;
                let nodes = live::backing_nodes(qmp, &top).await?;
                // nodes: [top, this snapshot, its parent, ...]
                let base = parent_file.as_ref().and_then(|_| nodes.get(2).cloned());
                let backing = parent_file
                    .as_ref()
                    .map(|p| p.to_string_lossy().into_owned());
                live::stream(
                    qmp,
                    &top,
                    base.as_deref(),
                    backing.as_deref(),
                    &format!("merge-{}", tag()),
                )
                .await
            }
            .await;
            streamed.map_err(|e| live_failed(id, e))?;
            let (root2, file2) = (root.clone(), file.to_path_buf());
            let still = blocking("merge check", move || built_on(&root2, &file2)).await?;
            if still {
                return Err(ServiceError::Internal(
                    "block-stream ended but the root disk still names the snapshot".into(),
                ));
            }
        }
        Ok(())
    }
}
