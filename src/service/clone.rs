//! Clones (issue 13): `POST /vms/{id}/clone` makes a new stopped VM with the
//! source's template, network mode (new MAC, new guest-22 forward or bridge
//! address, as any new VM), boot disk record, metadata without the hostname
//! (the clone's guest gets its own VM id as hostname, the default), and a
//! copy of each disk:
//!
//! - full clone: the root disk copied by the root disk fast path
//!   (`image::provision` Copy: reflink, else `copy_file_range`, temporary
//!   file + fsync + rename); a root disk with a backing chain (a VM with
//!   snapshots) becomes one standalone qcow2 (`qemu-img convert` of the
//!   checked chain): the clone has no snapshots;
//! - linked clone: a snapshot of the source is taken (`create_snapshot`,
//!   named `clone-<name>`), the clone's root disk is an empty qcow2 overlay
//!   on that snapshot file, which may not be deleted (nor the source VM)
//!   while the clone exists (`refuse_*` below, called from the snapshot and
//!   VM deletes); the image policy lets the clone's chain reach that file
//!   (`ImagePolicy::allow_linked_base`, kept from the `clones` rows);
//! - data disks (both kinds): full copies (data disks have no backing
//!   files), new disks `<clone>-<source disk>` attached to the clone on the
//!   source's slots.
//!
//! Crash safety: a `clone_jobs` row naming the clone and its new disks is
//! written before the first file; the files are made; then one transaction
//! records the VM, its disks, metadata and `clones` row and deletes the job.
//! A kill -9 before that transaction leaves a job row: the start-up sweep
//! (`sweep_clone_leftovers`, before the API listens) removes the clone's
//! folder and disk files and the row, the observer reports it meanwhile
//! (`partial_clone`). A snapshot taken for a linked clone stays (a valid
//! snapshot of the source: its root disk is built on it).
//!
//! A running source: its root disk and data disks are read through a
//! snapshot taken for the clone (`clone-<name>`, kept as a snapshot of the
//! source, all disks in one instant), so the copy is consistent.
//!
//! Locks: the source's and the clone name's VM locks, taken in name order
//! (after the snapshot, which takes the source's lock itself), held until
//! the clone is recorded: the source stays stopped while its disks are
//! read, and nothing starts a VM of the clone's name meanwhile.

use std::path::{Path, PathBuf};

use super::blocking::blocking;
use super::coherence::Issue;
use super::snapshots::CreateSnapshot;
use super::{Reason, Service, ServiceError};
use crate::fault;
use crate::model::{Name, Vm, VmState};
use crate::operator::image::snapshot::{disk_copy, snapshot_file};
use crate::operator::image::{
    self, ImageError, ImageFormat, ImagePolicy, Progress, Provision, Top, MAX_CHAIN_FILES,
};
use crate::store::{CloneDisk, CloneJob, CommitClone, NewVm, StoreError};

/// A clone to make, already validated.
#[derive(Debug, Clone)]
pub struct CloneVm {
    pub name: Name,
    pub linked: bool,
}

/// How many names a linked clone tries for its snapshot.
const BASE_NAME_TRIES: u32 = 8;

/// How many host ports a clone picks for its SSH forward before it gives up.
const PORT_PICKS: u32 = 8;

/// The snapshot a linked clone named `clone` is built on.
fn base_snapshot_name(clone: &Name) -> Name {
    Name::parse("name", &format!("clone-{clone}")).unwrap_or_else(|_| {
        // Too long with the prefix: a fresh one (never taken).
        Name::parse("name", &format!("clone-{}", Name::generate()))
            .unwrap_or_else(|_| clone.clone())
    })
}

/// The id of the copy of data disk `disk` for `clone`: `<clone>-<disk>`
/// when that is a name, else a fresh UUID.
fn disk_copy_id(clone: &Name, disk: &Name) -> Name {
    Name::parse("id", &format!("{clone}-{disk}")).unwrap_or_else(|_| Name::generate())
}

fn image_failed(e: ImageError, what: &str) -> ServiceError {
    if super::space::image_no_space(&e) {
        return ServiceError::NoSpace(format!(
            "No space left on the storage to copy {what} ({e}); free some space"
        ));
    }
    ServiceError::image_failed(e, |e| format!("cannot copy {what}: {e}"))
}

/// The files one clone makes, removed again unless the clone is recorded.
struct Made {
    vm_dir: PathBuf,
    dir_made: bool,
    disks: Vec<PathBuf>,
    policy: ImagePolicy,
}

impl Made {
    fn remove(&mut self) {
        if self.dir_made {
            self.policy.forget_linked_bases(&self.vm_dir);
            if let Err(e) = std::fs::remove_dir_all(&self.vm_dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("cannot remove {}: {e}", self.vm_dir.display());
                }
            }
            self.dir_made = false;
        }
        for d in self.disks.drain(..) {
            if let Err(e) = std::fs::remove_file(&d) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("cannot remove {}: {e}", d.display());
                }
            }
        }
    }
}

/// A data disk of the source to copy.
struct DiskPlan {
    source: crate::store::Disk,
    copy: CloneDisk,
    /// The copy a snapshot of a running source holds of this disk (read
    /// instead of the live file, which the guest keeps writing), with its
    /// pinned format.
    from_snapshot: Option<(PathBuf, ImageFormat)>,
}

/// What the blocking part copies.
struct FilePlan {
    qemu_img: PathBuf,
    policy: ImagePolicy,
    vm_dir: PathBuf,
    root: PathBuf,
    /// Where the clone's root disk comes from (none: the clone makes its
    /// root disk at its first start, as its source would).
    root_from: RootFrom,
    disks: Vec<DiskPlan>,
}

enum RootFrom {
    None,
    /// A full copy of this image (top of a chain, checked again here).
    Copy {
        path: PathBuf,
        top: Top,
        pinned: Option<ImageFormat>,
    },
    /// An overlay on this snapshot file.
    Overlay(PathBuf),
}

/// Makes the clone's files (blocking). On error, whatever it made is
/// removed by the caller through `made`.
/// Returns how the root disk was made (`reflink`, `copy_file_range`,
/// `read_write`, `convert`, `overlay`; none without one).
fn make_files(plan: &FilePlan, made: &mut Made) -> Result<Option<&'static str>, ServiceError> {
    match std::fs::create_dir(&plan.vm_dir) {
        Ok(()) => made.dir_made = true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(Reason::AlreadyExists.refuse(format!(
                "the folder of a VM of this name exists without a record ({}); remove it or choose another name",
                plan.vm_dir.display()
            )))
        }
        Err(e) => {
            return Err(image_failed(
                ImageError::Io {
                    what: format!("cannot create {}", plan.vm_dir.display()),
                    source: e,
                },
                "the root disk",
            ))
        }
    }
    let progress = Progress::new();
    let method = match &plan.root_from {
        RootFrom::None => None,
        RootFrom::Copy { path, top, pinned } => {
            let chain = plan
                .policy
                .open_chain(path, *top, *pinned, false)
                .map_err(|e| ServiceError::because(e, |e| format!("source root disk: {e}")))?;
            let report = image::provision(
                &plan.qemu_img,
                &chain,
                &plan.root,
                Provision::Copy,
                None,
                &progress,
            )
            .map_err(|e| image_failed(e, "the root disk"))?;
            Some(report.method)
        }
        RootFrom::Overlay(base) => {
            let chain = plan
                .policy
                .open_chain(base, Top::Trusted, Some(ImageFormat::Qcow2), false)
                .map_err(|e| ServiceError::because(e, |e| format!("snapshot file: {e}")))?;
            if chain.files.len() + 1 > MAX_CHAIN_FILES {
                return Err(Reason::TooManySnapshots.refuse(format!(
                    "the linked clone's backing chain would have more than {MAX_CHAIN_FILES} files; \
                     make a full clone instead"
                )));
            }
            plan.policy.allow_linked_base(&plan.vm_dir, base);
            let report = image::provision(
                &plan.qemu_img,
                &chain,
                &plan.root,
                Provision::Overlay,
                None,
                &progress,
            )
            .map_err(|e| image_failed(e, "the root disk"))?;
            Some(report.method)
        }
    };
    if !matches!(plan.root_from, RootFrom::None) {
        // The file made passes the same check as every root disk.
        plan.policy
            .open_chain(&plan.root, Top::Trusted, Some(ImageFormat::Qcow2), false)
            .map_err(|e| ServiceError::because(e, |e| format!("clone's root disk: {e}")))?;
    }
    fault::point("clone.after_root");
    for d in &plan.disks {
        let chain = match &d.from_snapshot {
            Some((copy, format)) => plan
                .policy
                .open_chain(copy, Top::Trusted, Some(*format), false)
                .map_err(|e| {
                    ServiceError::because(e, |e| {
                        format!("snapshot copy of disk {}: {e}", d.source.id)
                    })
                })?,
            None => super::disks::check_file_of(&plan.policy, &d.source, false)?,
        };
        let dest = PathBuf::from(&d.copy.path);
        made.disks.push(dest.clone());
        if let Err(e) = image::provision(
            &plan.qemu_img,
            &chain,
            &dest,
            Provision::Copy,
            None,
            &progress,
        ) {
            if matches!(e, ImageError::Exists { .. }) {
                // Not ours: keep it.
                made.disks.pop();
                return Err(Reason::AlreadyExists.refuse(format!(
                    "{} exists without a record; remove it",
                    dest.display()
                )));
            }
            return Err(image_failed(e, &format!("data disk {}", d.source.id)));
        }
        let copy = plan
            .policy
            .open_chain(&dest, Top::Trusted, Some(ImageFormat::Qcow2), false)
            .map_err(|e| {
                ServiceError::because(e, |e| format!("copy of disk {}: {e}", d.source.id))
            })?;
        if copy.files.len() > 1 {
            return Err(Reason::DiskFileRefused(None).refuse(format!(
                "the copy of disk {} has a backing file",
                d.source.id
            )));
        }
    }
    fault::point("clone.after_copy");
    Ok(method)
}

impl Service {
    /// Clones the VM `source` as `input.name` (see the module comment).
    pub async fn clone_vm(&self, source: &Name, input: CloneVm) -> Result<Vm, ServiceError> {
        let name = input.name.clone();
        let src = self.get_vm(source)?;
        if &name == source {
            return Err(Reason::AlreadyExists.refuse("VM with this ID already exists"));
        }
        self.clone_precheck(&src, &name)?;
        // A linked clone's snapshot is taken first (it takes the source's
        // lock itself); everything else is checked before it, so bad input
        // leaves no snapshot.
        // A running source is read through a snapshot (consistent, and
        // never written again); so is a linked clone's root disk.
        let runs = self.source_runs(&src);
        let snap = if input.linked || runs {
            Some(self.take_base_snapshot(source, &name, runs).await?)
        } else {
            None
        };
        // A running source's data disks are read from that snapshot's
        // copies (taken in the same instant as its root disk).
        let disks_from = if runs {
            match &snap {
                Some(snap) => Some((snap.clone(), self.store.get_snapshot(source, snap).map_err(|_| {
                    Reason::SnapshotInUse.refuse(format!(
                        "the snapshot {snap} of VM {source} made for this clone was deleted meanwhile; try again"
                    ))
                })?)),
                None => None,
            }
        } else {
            None
        };
        let base = snap.clone().filter(|_| input.linked);
        let (first, second) = if source <= &name {
            (source, &name)
        } else {
            (&name, source)
        };
        let _g1 = self.lock_vm(first).await;
        let _g2 = self.lock_vm(second).await;
        let src = self.get_vm(source)?;
        self.clone_precheck(&src, &name)?;
        if let Some(snap) = &base {
            self.store
                .get_snapshot(source, snap)
                .map_err(|_| Reason::SnapshotInUse.refuse(format!(
                    "the snapshot {snap} of VM {source} made for this clone was deleted meanwhile; try again"
                )))?;
        }
        if !runs && self.source_runs(&src) {
            // It started between the first look and the locks: its disks
            // were not snapshotted, and its live files must not be copied.
            return Err(Reason::NotStopped.refuse(format!(
                "VM {source} is being started (it started while the clone was prepared); clone it again now that it runs"
            )));
        }
        let disks = self.store.disks_of_vm(source)?;
        let src_dir = self.paths(source).dir;
        let mut plans = Vec::new();
        for d in disks {
            let Some((_, slot)) = d.attachment else {
                continue;
            };
            let mut id = disk_copy_id(&name, &d.id);
            let taken = |id: &Name| -> Result<bool, ServiceError> {
                match self.store.get_disk(id) {
                    Ok(_) => Ok(true),
                    Err(StoreError::NotFound) => Ok(self.disk_file(id).exists()),
                    Err(e) => Err(e.into()),
                }
            };
            if taken(&id)? || plans.iter().any(|p: &DiskPlan| p.copy.id == id) {
                id = Name::generate();
            }
            let path = self.disk_file(&id).to_string_lossy().into_owned();
            plans.push(DiskPlan {
                copy: CloneDisk {
                    id,
                    size_gb: d.size_gb,
                    mount_point: d.mount_point.clone(),
                    path,
                    slot,
                },
                from_snapshot: match &disks_from {
                    None => None,
                    Some((snap, row)) => {
                        let Some(held) = row.disks.iter().find(|h| h.id == d.id.as_str()) else {
                            return Err(Reason::SnapshotInUse.refuse(format!(
                                "disk {} was attached to VM {source} after the snapshot {snap} this clone reads; try again",
                                d.id
                            )));
                        };
                        let format = ImageFormat::parse(&held.format).unwrap_or(d.format);
                        Some((disk_copy(&src_dir, snap.as_str(), &held.id), format))
                    }
                },
                source: d,
            });
        }
        let paths = self.paths(&name);
        let src_paths = self.paths(source);
        let root_from = match (&base, &src.qcow2_path) {
            (Some(snap), _) => RootFrom::Overlay(snapshot_file(&src_paths.dir, snap.as_str())),
            // A full clone of a running source: from its snapshot.
            (None, _) if snap.is_some() => RootFrom::Copy {
                path: snapshot_file(
                    &src_paths.dir,
                    snap.as_ref().map(Name::as_str).unwrap_or_default(),
                ),
                top: Top::Trusted,
                pinned: Some(ImageFormat::Qcow2),
            },
            (None, Some(explicit)) => RootFrom::Copy {
                path: PathBuf::from(explicit),
                top: Top::User,
                pinned: src.qcow2_path_format,
            },
            (None, None) if src_paths.root.exists() => {
                let canonical = src_paths.root.canonicalize().ok();
                let pinned = src.root_disk_format.filter(|_| {
                    src.root_disk_path.as_deref().is_some_and(|p| {
                        Path::new(p) == src_paths.root || Some(Path::new(p)) == canonical.as_deref()
                    })
                });
                RootFrom::Copy {
                    path: src_paths.root.clone(),
                    top: Top::Trusted,
                    pinned,
                }
            }
            (None, None) => RootFrom::None,
        };
        let has_root = !matches!(root_from, RootFrom::None);
        let job = CloneJob {
            clone_id: name.clone(),
            source_vm: source.clone(),
            linked: input.linked,
            disk_ids: plans.iter().map(|p| p.copy.id.clone()).collect(),
            started_at: crate::model::now(),
        };
        match self.store.insert_clone_job(&job) {
            Ok(()) => {}
            Err(StoreError::AlreadyExists) => {
                return Err(Reason::AlreadyExists.refuse(format!(
                    "a clone named {name} is being made (or was interrupted; restart vman to clean it up)"
                )))
            }
            Err(e) => return Err(e.into()),
        }
        fault::point("clone.after_job");
        let policy = self.host.images.clone();
        let plan = FilePlan {
            qemu_img: self.config.qemu_img.clone(),
            policy: policy.clone(),
            vm_dir: paths.dir.clone(),
            root: paths.root.clone(),
            root_from,
            disks: plans,
        };
        let disk_copies: Vec<CloneDisk> = plan.disks.iter().map(|d| d.copy.clone()).collect();
        let made = blocking("clone", move || {
            let mut made = Made {
                vm_dir: plan.vm_dir.clone(),
                dir_made: false,
                disks: Vec::new(),
                policy: plan.policy.clone(),
            };
            match make_files(&plan, &mut made) {
                Ok(method) => Ok((made, method)),
                Err(e) => {
                    made.remove();
                    Err(e)
                }
            }
        })
        .await
        .and_then(|r| r);
        let (mut made, method) = match made {
            Ok(m) => m,
            Err(e) => {
                self.drop_clone_job(&name);
                return Err(e);
            }
        };
        fault::point("clone.before_commit");
        let committed = self
            .commit_clone_rows(&src, &name, &base, has_root, &paths.root, disk_copies)
            .await;
        match committed {
            Ok(vm) => {
                fault::point("clone.after_commit");
                tracing::info!(
                    "vm {name} cloned from vm {source} ({}, root disk by {}{})",
                    if input.linked { "linked" } else { "full" },
                    method.unwrap_or("none (made at its first start)"),
                    base.as_ref()
                        .map(|s| format!(", on its snapshot {s}"))
                        .unwrap_or_default()
                );
                let from = serde_json::json!({
                    "template": vm.template.name.as_str(),
                    "clone_of": source.as_str(),
                    "linked": input.linked,
                });
                self.emit(super::EventKind::Vm, name.as_str(), "created", from);
                Ok(vm)
            }
            Err(e) => {
                blocking("clone cleanup", move || made.remove()).await?;
                self.drop_clone_job(&name);
                Err(e)
            }
        }
    }

    /// Takes the snapshot a linked clone `name` of `source` is built on:
    /// `clone-<name>`, or `clone-<name>-<n>` when that name is taken (by a
    /// snapshot an interrupted clone left, which holds an older state).
    async fn take_base_snapshot(
        &self,
        source: &Name,
        name: &Name,
        with_data_disks: bool,
    ) -> Result<Name, ServiceError> {
        let first = base_snapshot_name(name);
        let mut last = None;
        for n in 1..=BASE_NAME_TRIES {
            let snap = if n == 1 {
                first.clone()
            } else {
                Name::parse("name", &format!("{first}-{n}"))
                    .unwrap_or_else(|_| base_snapshot_name(&Name::generate()))
            };
            let description = format!("base of the linked clone {name}");
            let taken = self
                .create_snapshot(
                    source,
                    CreateSnapshot {
                        name: snap.clone(),
                        description: Some(description),
                        // A stopped source's data disks are copied from
                        // their files; a running one's from this snapshot.
                        include_data_disks: with_data_disks,
                    },
                )
                .await;
            match taken {
                Ok(_) => {
                    fault::point("clone.after_snapshot");
                    return Ok(snap);
                }
                Err(e) if matches!(e.reason(), Some(Reason::AlreadyExists)) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| ServiceError::Internal("no snapshot name".into())))
    }

    /// Whether the source's QEMU runs (recorded or live).
    fn source_runs(&self, src: &Vm) -> bool {
        src.state == VmState::Running || self.is_live(&src.id)
    }

    /// The refusals that need no file: the source runs (or starts), the
    /// name is taken.
    fn clone_precheck(&self, src: &Vm, name: &Name) -> Result<(), ServiceError> {
        let source = &src.id;
        if self.provisioning_in(source.as_str()) {
            return Err(Reason::NotStopped.refuse(format!(
                "VM {source} is being started (its root disk is being made); stop it once it runs, then clone it"
            )));
        }
        match self.store.get_vm(name) {
            Ok(_) => return Err(Reason::AlreadyExists.refuse("VM with this ID already exists")),
            Err(StoreError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        let dir = self.paths(name).dir;
        if std::fs::symlink_metadata(&dir).is_ok() {
            return Err(Reason::AlreadyExists.refuse(format!(
                "the folder of a VM of this name exists without a record ({}); remove it or choose another name",
                dir.display()
            )));
        }
        Ok(())
    }

    fn disk_file(&self, id: &Name) -> PathBuf {
        self.config.disks_dir().join(format!("{id}.qcow2"))
    }

    fn drop_clone_job(&self, name: &Name) {
        if let Err(e) = self.store.delete_clone_job(name) {
            tracing::error!(
                "clone {name}: its files are removed but its job row stays ({e}); the next start-up removes it"
            );
        }
    }

    /// The one transaction that records the clone (with a new SSH port
    /// picked again when a concurrent create took the same one).
    async fn commit_clone_rows(
        &self,
        src: &Vm,
        name: &Name,
        base: &Option<Name>,
        has_root: bool,
        root: &Path,
        disks: Vec<CloneDisk>,
    ) -> Result<Vm, ServiceError> {
        let mut picks = 0;
        loop {
            let (network_mode, ports) = self.network_for_new(Some(src.network_mode)).await?;
            let commit = CommitClone {
                vm: NewVm {
                    id: name.clone(),
                    template: src.template.name.clone(),
                    qcow2_path: None,
                    boot_disk: src.boot_disk.clone(),
                    qcow2_path_format: None,
                    boot_disk_format: src.boot_disk_format,
                    network_mode,
                    ports,
                },
                source_vm: src.id.clone(),
                linked: base.is_some(),
                source_snapshot: base.clone(),
                root_disk_path: has_root.then(|| root.to_string_lossy().into_owned()),
                disks: disks.clone(),
            };
            let pick = (network_mode == crate::model::NetworkMode::Bridge)
                .then(|| self.pick_bridge_address());
            let result = self.store.commit_clone(&commit, pick);
            picks += 1;
            match result {
                Ok(vm) => return Ok(self.get_vm(&vm.id).unwrap_or(vm)),
                Err(StoreError::AlreadyExists)
                    if !commit.vm.ports.is_empty()
                        && picks < PORT_PICKS
                        && self.store.get_vm(name).is_err()
                        && !disks.iter().any(|d| self.store.get_disk(&d.id).is_ok()) =>
                {
                    continue
                }
                Err(StoreError::AlreadyExists) if self.store.get_vm(name).is_ok() => {
                    return Err(Reason::AlreadyExists.refuse("VM with this ID already exists"))
                }
                Err(StoreError::AlreadyExists) => return Err(Reason::AlreadyExists.refuse(
                    "a disk id or host port chosen for the clone was taken meanwhile; try again",
                )),
                Err(StoreError::TemplateMissing) => {
                    return Err(Reason::TemplateMissing.refuse("Template not found"))
                }
                Err(StoreError::Exhausted) => return Err(self.subnet_full()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Called before a VM is deleted: refused while linked clones are built
    /// on its snapshots.
    pub(crate) fn refuse_delete_of_clone_source(&self, id: &Name) -> Result<(), ServiceError> {
        let clones = self.store.linked_clones_of(id, None)?;
        if clones.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = clones.iter().map(|c| c.vm_id.as_str()).collect();
        Err(Reason::InUse.refuse(format!(
            "VM {id} is in use by {} linked clone(s) ({}); delete them first",
            clones.len(),
            names.join(", ")
        )))
    }

    /// Called after a VM is deleted: its linked bases are forgotten.
    pub(crate) fn forget_clone(&self, id: &Name) {
        self.host.images.forget_linked_bases(&self.paths(id).dir);
    }

    /// Called before a snapshot is deleted: refused while a linked clone is
    /// built on it.
    pub(crate) fn refuse_delete_of_clone_base(
        &self,
        id: &Name,
        snapshot: &Name,
    ) -> Result<(), ServiceError> {
        let clones = self.store.linked_clones_of(id, Some(snapshot))?;
        if clones.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = clones.iter().map(|c| c.vm_id.as_str()).collect();
        Err(Reason::SnapshotInUse.refuse(format!(
            "the linked clone(s) {} are built on snapshot {snapshot}; delete them first",
            names.join(", ")
        )))
    }

    /// Start-up, before the API listens: removes what interrupted clones
    /// left (their folder, their disk files without a record, their job
    /// row), and lets every linked clone's disks reach its base snapshot.
    pub fn sweep_clone_leftovers(&self) {
        match self.store.clone_jobs() {
            Ok(jobs) => {
                for job in jobs {
                    self.remove_clone_leftover(&job);
                }
            }
            Err(e) => tracing::error!("cannot read the clone jobs: {e}"),
        }
        match self.store.linked_clones() {
            Ok(rows) => {
                for c in rows {
                    if let Some(snap) = &c.source_snapshot {
                        let base = snapshot_file(&self.paths(&c.source_vm).dir, snap.as_str());
                        self.host
                            .images
                            .allow_linked_base(&self.paths(&c.vm_id).dir, &base);
                    }
                }
            }
            Err(e) => tracing::error!("cannot read the linked clones: {e}"),
        }
    }

    fn remove_clone_leftover(&self, job: &CloneJob) {
        let dir = self.paths(&job.clone_id).dir;
        // The job row exists until the clone is recorded, and the folder
        // was made under the job (a VM of that name could not start
        // meanwhile: the clone held its lock), so the folder is the clone's.
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => tracing::warn!(
                "removed {} left by an interrupted clone of vm {}",
                dir.display(),
                job.source_vm
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(
                    "cannot remove {} of an interrupted clone: {e}",
                    dir.display()
                );
                return;
            }
        }
        for id in &job.disk_ids {
            if !matches!(self.store.get_disk(id), Err(StoreError::NotFound)) {
                continue;
            }
            let file = self.disk_file(id);
            match std::fs::remove_file(&file) {
                Ok(()) => tracing::warn!(
                    "removed {} left by an interrupted clone of vm {}",
                    file.display(),
                    job.source_vm
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!("cannot remove {}: {e}", file.display());
                    return;
                }
            }
        }
        if let Err(e) = self.store.delete_clone_job(&job.clone_id) {
            tracing::error!("cannot forget the clone job {}: {e}", job.clone_id);
        } else {
            tracing::warn!(
                "interrupted clone {} of vm {} cleaned up",
                job.clone_id,
                job.source_vm
            );
        }
    }

    /// For the observer: clone jobs that no request is making (left by a
    /// crash; removed at the next start-up).
    pub(crate) fn clone_observations(&self) -> Vec<Issue> {
        let Ok(jobs) = self.store.clone_jobs() else {
            return Vec::new();
        };
        jobs.into_iter()
            .filter(|job| !self.vm_lock_held(&job.clone_id))
            .map(|job| {
                Issue::new(
                    "partial_clone",
                    job.clone_id.as_str(),
                    format!(
                        "an interrupted clone of VM {} (started {}) left files; they are removed at the next start-up",
                        job.source_vm, job.started_at
                    ),
                )
            })
            .collect()
    }

    /// Whether `path` (a `.partial` file) is being written by a clone under
    /// way: in its VM folder, or the copy of one of its new data disks.
    pub(crate) fn clone_writes(&self, path: &Path) -> bool {
        let Ok(jobs) = self.store.clone_jobs() else {
            return false;
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        jobs.iter()
            .filter(|job| self.vm_lock_held(&job.clone_id))
            .any(|job| {
                path.starts_with(self.paths(&job.clone_id).dir)
                    || job
                        .disk_ids
                        .iter()
                        .any(|id| name.starts_with(&format!(".{id}.qcow2.partial-")))
            })
    }

    /// Whether some request holds the VM lock of `id` now.
    fn vm_lock_held(&self, id: &Name) -> bool {
        use crate::sync::LockExt;
        let lock = self.locks.lock_or_recover().get(id).cloned();
        lock.is_some_and(|l| l.try_lock().is_err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_the_base_snapshot_and_disk_copies_follow_the_name_rule() {
        let short = Name::parse("n", "web2").unwrap();
        assert_eq!(base_snapshot_name(&short).as_str(), "clone-web2");
        let long = Name::parse("n", &"a".repeat(63)).unwrap();
        let snap = base_snapshot_name(&long);
        assert!(snap.as_str().starts_with("clone-") && snap.as_str().len() <= 63);
        let d = Name::parse("n", "data").unwrap();
        assert_eq!(disk_copy_id(&short, &d).as_str(), "web2-data");
        let copy = disk_copy_id(&long, &d);
        assert!(Name::parse("n", copy.as_str()).is_ok() && copy.as_str().len() == 36);
    }
}
