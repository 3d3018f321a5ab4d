//! Clone rows (`migrations/0010_clones.sql`): `clone_jobs`, a clone under
//! way (written before its first file), and `clones`, what a finished clone
//! was made from. `commit_clone` records a clone in one transaction: the VM
//! (with its forwards or bridge address), its metadata copied without the
//! hostname, its data disks attached, its `clones` row, and the job row
//! removed. Before that transaction nothing of the clone is recorded; after
//! it, all of it is.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use rusqlite::OptionalExtension;

use super::vms::{insert_vm_in, NewVm};
use super::{Store, StoreError};
use crate::model::{ImageFormat, Name, Vm};

/// A clone under way, as recorded before its first file is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneJob {
    pub clone_id: Name,
    pub source_vm: Name,
    pub linked: bool,
    /// The data disks it creates (`{storage}/disks/<id>.qcow2`).
    pub disk_ids: Vec<Name>,
    pub started_at: String,
}

/// What a clone was made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneRow {
    pub vm_id: Name,
    pub source_vm: Name,
    pub linked: bool,
    /// The source's snapshot a linked clone's root disk is built on.
    pub source_snapshot: Option<Name>,
    pub created_at: String,
}

/// A data disk of a clone, attached on `slot`.
#[derive(Debug, Clone)]
pub struct CloneDisk {
    pub id: Name,
    pub size_gb: u64,
    pub mount_point: Option<String>,
    pub path: String,
    pub slot: u8,
}

/// Everything `commit_clone` records.
#[derive(Debug, Clone)]
pub struct CommitClone {
    pub vm: NewVm,
    pub source_vm: Name,
    pub linked: bool,
    pub source_snapshot: Option<Name>,
    /// The root disk made for the clone (`vms/<id>/root.qcow2`), pinned qcow2.
    pub root_disk_path: Option<String>,
    pub disks: Vec<CloneDisk>,
}

fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CloneJob> {
    let ids: String = r.get(3)?;
    let ids: Vec<String> = serde_json::from_str(&ids).unwrap_or_default();
    Ok(CloneJob {
        clone_id: Name::from_trusted(r.get(0)?),
        source_vm: Name::from_trusted(r.get(1)?),
        linked: r.get::<_, i64>(2)? != 0,
        disk_ids: ids.into_iter().map(Name::from_trusted).collect(),
        started_at: r.get(4)?,
    })
}

fn clone_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CloneRow> {
    Ok(CloneRow {
        vm_id: Name::from_trusted(r.get(0)?),
        source_vm: Name::from_trusted(r.get(1)?),
        linked: r.get::<_, i64>(2)? != 0,
        source_snapshot: r.get::<_, Option<String>>(3)?.map(Name::from_trusted),
        created_at: r.get(4)?,
    })
}

const CLONE_SELECT: &str =
    "SELECT vm_id, source_vm, linked, source_snapshot, created_at FROM clones";

impl Store {
    /// Records a clone under way; `AlreadyExists` when a job for that clone
    /// id is recorded already (one under way, or left by a crash).
    pub fn insert_clone_job(&self, job: &CloneJob) -> Result<(), StoreError> {
        let ids: Vec<&str> = job.disk_ids.iter().map(Name::as_str).collect();
        let ids = serde_json::to_string(&ids).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.write(|tx| {
            let n = tx.execute(
                "INSERT INTO clone_jobs (clone_id, source_vm, linked, disk_ids, started_at)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(clone_id) DO NOTHING",
                rusqlite::params![
                    job.clone_id.as_str(),
                    job.source_vm.as_str(),
                    i64::from(job.linked),
                    ids,
                    job.started_at
                ],
            )?;
            if n == 0 {
                return Err(StoreError::AlreadyExists);
            }
            Ok(())
        })
    }

    /// Every clone job recorded (under way, or left by a crash).
    pub fn clone_jobs(&self) -> Result<Vec<CloneJob>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT clone_id, source_vm, linked, disk_ids, started_at FROM clone_jobs
                 ORDER BY started_at, clone_id",
            )?;
            let rows = stmt.query_map([], job_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Forgets a clone job (its files are gone); false when there was none.
    pub fn delete_clone_job(&self, clone_id: &Name) -> Result<bool, StoreError> {
        self.write(|tx| {
            Ok(tx.execute(
                "DELETE FROM clone_jobs WHERE clone_id = ?1",
                [clone_id.as_str()],
            )? > 0)
        })
    }

    /// Records the finished clone and removes its job, in one transaction.
    /// `pick` chooses a bridge address (bridge mode only). `AlreadyExists`
    /// when the VM id or a disk id is taken meanwhile (nothing written),
    /// `TemplateMissing`, `Exhausted` as for a new VM; `NotFound` when the
    /// job is gone.
    pub fn commit_clone(
        &self,
        c: &CommitClone,
        pick: Option<impl FnOnce(&HashSet<Ipv4Addr>) -> Option<Ipv4Addr>>,
    ) -> Result<Vm, StoreError> {
        self.write(|tx| {
            let now = crate::model::now();
            let id = c.vm.id.as_str();
            let gone = tx.execute("DELETE FROM clone_jobs WHERE clone_id = ?1", [id])? == 0;
            if gone {
                return Err(StoreError::NotFound);
            }
            let mut vm = insert_vm_in(tx, &c.vm)?;
            if let Some(pick) = pick {
                vm.local_ip = Some(super::bridge::assign_address_in(tx, &c.vm.id, pick)?);
            }
            if let Some(root) = &c.root_disk_path {
                tx.execute(
                    "UPDATE vms SET root_disk_path = ?2, root_disk_format = ?3 WHERE id = ?1",
                    rusqlite::params![id, root, ImageFormat::Qcow2.as_str()],
                )?;
                vm.root_disk_path = Some(root.clone());
                vm.root_disk_format = Some(ImageFormat::Qcow2);
            }
            // The metadata, except the hostname (the guest then gets its
            // VM id, as every VM without one).
            tx.execute(
                "INSERT INTO vm_metadata (vm_id, hostname, user_data, ssh_keys, created_at, updated_at)
                 SELECT ?1, NULL, user_data, ssh_keys, ?3, ?3 FROM vm_metadata
                 WHERE vm_id = ?2 AND (user_data IS NOT NULL OR ssh_keys IS NOT NULL)",
                rusqlite::params![id, c.source_vm.as_str(), now],
            )?;
            for d in &c.disks {
                let n = tx.execute(
                    "INSERT INTO disks (id, size_gb, mount_point, path, format, vm_id, slot,
                        created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, 'qcow2', ?5, ?6, ?7, ?7) ON CONFLICT(id) DO NOTHING",
                    rusqlite::params![
                        d.id.as_str(),
                        d.size_gb,
                        d.mount_point,
                        d.path,
                        id,
                        d.slot,
                        now
                    ],
                )?;
                if n == 0 {
                    return Err(StoreError::AlreadyExists);
                }
            }
            tx.execute(
                "INSERT INTO clones (vm_id, source_vm, linked, source_snapshot, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![
                    id,
                    c.source_vm.as_str(),
                    i64::from(c.linked),
                    c.source_snapshot.as_ref().map(Name::as_str),
                    now
                ],
            )?;
            Ok(vm)
        })
    }

    /// What the VM was cloned from, when it is a clone.
    pub fn clone_of(&self, vm: &Name) -> Result<Option<CloneRow>, StoreError> {
        self.read(|c| {
            Ok(
                c.prepare_cached(&format!("{CLONE_SELECT} WHERE vm_id = ?1"))?
                    .query_row([vm.as_str()], clone_row)
                    .optional()?,
            )
        })
    }

    /// The linked clones built on a snapshot of `source` (on `snapshot`
    /// only, when given), by id.
    pub fn linked_clones_of(
        &self,
        source: &Name,
        snapshot: Option<&Name>,
    ) -> Result<Vec<CloneRow>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "{CLONE_SELECT} WHERE linked = 1 AND source_vm = ?1
                 AND (?2 IS NULL OR source_snapshot = ?2) ORDER BY vm_id"
            ))?;
            let rows = stmt.query_map(
                rusqlite::params![source.as_str(), snapshot.map(Name::as_str)],
                clone_row,
            )?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Every linked clone, by id.
    pub fn linked_clones(&self) -> Result<Vec<CloneRow>, StoreError> {
        self.read(|c| {
            let mut stmt =
                c.prepare_cached(&format!("{CLONE_SELECT} WHERE linked = 1 ORDER BY vm_id"))?;
            let rows = stmt.query_map([], clone_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }
}
