//! Snapshot rows: one per file under `vms/<id>/snapshots/`, with the
//! snapshot it was taken on top of (`parent`). Cascade-deleted with the VM.

use rusqlite::OptionalExtension;

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
}

const SELECT: &str = "SELECT vm_id, name, description, created_at, parent, vm_state,
        size_bytes, virtual_size FROM snapshots";

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
    })
}

impl Store {
    /// Records a snapshot; `AlreadyExists` when the VM has one of that name,
    /// `NotFound` when the VM is gone.
    pub fn insert_snapshot(&self, s: &Snapshot) -> Result<(), StoreError> {
        self.write(|tx| {
            let vm: Option<i64> = tx
                .query_row("SELECT 1 FROM vms WHERE id = ?1", [s.vm_id.as_str()], |r| {
                    r.get(0)
                })
                .optional()?;
            if vm.is_none() {
                return Err(StoreError::NotFound);
            }
            let n = tx.execute(
                "INSERT INTO snapshots (vm_id, name, description, created_at, parent, vm_state,
                    size_bytes, virtual_size) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT(vm_id, name) DO NOTHING",
                rusqlite::params![
                    s.vm_id.as_str(),
                    s.name.as_str(),
                    s.description,
                    s.created_at,
                    s.parent,
                    s.vm_state,
                    s.size_bytes,
                    s.virtual_size
                ],
            )?;
            if n == 0 {
                return Err(StoreError::AlreadyExists);
            }
            Ok(())
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
}
