//! Snapshot rows: one per file under `vms/<id>/snapshots/`, with the
//! snapshot it was taken on top of (`parent`) and the data disks it holds;
//! and the intent records of snapshot operations under way
//! (`snapshot_ops`). Both cascade-deleted with the VM.

use rusqlite::OptionalExtension;
use serde::{Deserialize, Serialize};

use super::{Store, StoreError};
use crate::model::Name;

/// A snapshot as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub vm_id: Name,
    pub name: Name,
    pub description: Option<String>,
    pub created_at: String,
    pub parent: Option<String>,
    /// The VM's state when it was taken.
    pub vm_state: String,
    /// Bytes allocated by the snapshot's file.
    pub size_bytes: u64,
    /// Bytes the guest saw.
    pub virtual_size: u64,
    /// The data disks it holds (a copy of each).
    pub disks: Vec<SnapshotDisk>,
}

/// A data disk as a snapshot holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDisk {
    pub id: String,
    /// The disk's pinned format (`qcow2` or `raw`), also its copy's.
    pub format: String,
    pub virtual_size: u64,
    /// Bytes allocated by the copy.
    pub size_bytes: u64,
}

/// A snapshot operation under way: written before its first file changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotOp {
    pub vm_id: Name,
    pub name: Name,
    /// `create`, `delete` or `restore`.
    pub op: String,
    /// What finishing it needs (JSON, the service's).
    pub plan: String,
    pub started_at: String,
}

const SELECT: &str = "SELECT vm_id, name, description, created_at, parent, vm_state,
        size_bytes, virtual_size, disks FROM snapshots";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Snapshot> {
    Ok(Snapshot {
        vm_id: Name::from_trusted(r.get(0)?),
        name: Name::from_trusted(r.get(1)?),
        description: r.get(2)?,
        created_at: r.get(3)?,
        parent: r.get(4)?,
        vm_state: r.get(5)?,
        size_bytes: r.get(6)?,
        virtual_size: r.get(7)?,
        disks: {
            let text: String = r.get(8)?;
            serde_json::from_str(&text).unwrap_or_default()
        },
    })
}

fn insert_row(tx: &rusqlite::Transaction<'_>, s: &Snapshot) -> Result<(), StoreError> {
    let vm: Option<i64> = tx
        .query_row("SELECT 1 FROM vms WHERE id = ?1", [s.vm_id.as_str()], |r| {
            r.get(0)
        })
        .optional()?;
    if vm.is_none() {
        return Err(StoreError::NotFound);
    }
    let disks = serde_json::to_string(&s.disks).unwrap_or_else(|_| "[]".into());
    let n = tx.execute(
        "INSERT INTO snapshots (vm_id, name, description, created_at, parent, vm_state,
            size_bytes, virtual_size, disks) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT(vm_id, name) DO NOTHING",
        rusqlite::params![
            s.vm_id.as_str(),
            s.name.as_str(),
            s.description,
            s.created_at,
            s.parent,
            s.vm_state,
            s.size_bytes,
            s.virtual_size,
            disks
        ],
    )?;
    if n == 0 {
        return Err(StoreError::AlreadyExists);
    }
    Ok(())
}

fn end_op(tx: &rusqlite::Transaction<'_>, vm: &Name, name: &Name) -> Result<(), StoreError> {
    tx.execute(
        "DELETE FROM snapshot_ops WHERE vm_id = ?1 AND name = ?2",
        [vm.as_str(), name.as_str()],
    )?;
    Ok(())
}

impl Store {
    /// Records a snapshot; `AlreadyExists` when the VM has one of that name,
    /// `NotFound` when the VM is gone.
    pub fn insert_snapshot(&self, s: &Snapshot) -> Result<(), StoreError> {
        self.write(|tx| insert_row(tx, s))
    }

    /// Records a snapshot and ends its `create` operation, in one transaction.
    pub fn finish_snapshot_create(&self, s: &Snapshot) -> Result<(), StoreError> {
        self.write(|tx| {
            insert_row(tx, s)?;
            end_op(tx, &s.vm_id, &s.name)
        })
    }

    /// A VM's snapshots, oldest first.
    pub fn snapshots_of_vm(&self, vm: &Name) -> Result<Vec<Snapshot>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "{SELECT} WHERE vm_id = ?1 ORDER BY created_at, name"
            ))?;
            let rows = stmt.query_map([vm.as_str()], row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    pub fn get_snapshot(&self, vm: &Name, name: &Name) -> Result<Snapshot, StoreError> {
        self.read(|c| {
            c.prepare_cached(&format!("{SELECT} WHERE vm_id = ?1 AND name = ?2"))?
                .query_row([vm.as_str(), name.as_str()], row)
                .optional()?
                .ok_or(StoreError::NotFound)
        })
    }

    /// Removes a snapshot row; false when there was none.
    pub fn delete_snapshot(&self, vm: &Name, name: &Name) -> Result<bool, StoreError> {
        self.write(|tx| {
            Ok(tx.execute(
                "DELETE FROM snapshots WHERE vm_id = ?1 AND name = ?2",
                [vm.as_str(), name.as_str()],
            )? > 0)
        })
    }

    /// Removes a snapshot's row, gives its children its parent, and ends
    /// its `delete` operation, in one transaction.
    pub fn finish_snapshot_delete(
        &self,
        vm: &Name,
        name: &Name,
        parent: Option<&str>,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE snapshots SET parent = ?3 WHERE vm_id = ?1 AND parent = ?2",
                rusqlite::params![vm.as_str(), name.as_str(), parent],
            )?;
            tx.execute(
                "DELETE FROM snapshots WHERE vm_id = ?1 AND name = ?2",
                [vm.as_str(), name.as_str()],
            )?;
            end_op(tx, vm, name)
        })
    }

    /// Records that an operation on snapshot `name` begins; `AlreadyExists`
    /// when one on that name is still recorded.
    pub fn begin_snapshot_op(
        &self,
        vm: &Name,
        name: &Name,
        op: &str,
        plan: &str,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            let n = tx.execute(
                "INSERT INTO snapshot_ops (vm_id, name, op, plan, started_at)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(vm_id, name) DO NOTHING",
                rusqlite::params![vm.as_str(), name.as_str(), op, plan, crate::model::now()],
            )?;
            if n == 0 {
                return Err(StoreError::AlreadyExists);
            }
            Ok(())
        })
    }

    /// Ends an operation (rolled back, or finished without a row change).
    pub fn end_snapshot_op(&self, vm: &Name, name: &Name) -> Result<(), StoreError> {
        self.write(|tx| end_op(tx, vm, name))
    }

    /// Every operation still recorded (interrupted ones at start-up).
    pub fn snapshot_ops(&self) -> Result<Vec<SnapshotOp>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT vm_id, name, op, plan, started_at FROM snapshot_ops ORDER BY started_at",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(SnapshotOp {
                    vm_id: Name::from_trusted(r.get(0)?),
                    name: Name::from_trusted(r.get(1)?),
                    op: r.get(2)?,
                    plan: r.get(3)?,
                    started_at: r.get(4)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// The snapshots (VM, name) that hold a copy of data disk `disk`.
    pub fn snapshots_holding_disk(&self, disk: &Name) -> Result<Vec<(String, String)>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT vm_id, name FROM snapshots WHERE EXISTS (SELECT 1 FROM json_each(disks)
                   WHERE json_extract(value, '$.id') = ?1) ORDER BY vm_id, name",
            )?;
            let rows = stmt.query_map([disk.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }
}
