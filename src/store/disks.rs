//! Data disk rows: the disk, and the VM and hot-plug slot it is attached to.
//!
//! Attaching is a conditional UPDATE (`... WHERE vm_id IS NULL`), so of two
//! concurrent attaches of one disk exactly one wins, whatever VM locks the
//! callers hold. Deleting is conditional the same way (`vm_id IS NULL`).

use rusqlite::OptionalExtension;

use super::{Store, StoreError};
use crate::model::ImageFormat;
use crate::model::Name;

/// A data disk as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub id: Name,
    pub size_gb: u64,
    pub mount_point: Option<String>,
    pub path: String,
    pub format: ImageFormat,
    /// The VM it is attached to, and the root port (`hp<slot>`) it uses.
    pub attachment: Option<(Name, u8)>,
    pub created_at: String,
    pub updated_at: String,
}

/// What POST /disks records.
#[derive(Debug, Clone)]
pub struct NewDisk {
    pub id: Name,
    pub size_gb: u64,
    pub mount_point: Option<String>,
    pub path: String,
    pub format: ImageFormat,
}

/// The outcome of a conditional delete.
#[derive(Debug)]
pub enum DiskDelete {
    Deleted(Disk),
    /// Still attached to this VM; nothing was deleted.
    Attached(Name),
}

/// The outcome of a conditional attach.
#[derive(Debug)]
pub enum DiskClaim {
    Claimed,
    /// Already attached to this VM; nothing changed.
    Attached(Name),
}

const DISK_SELECT: &str = "SELECT id, size_gb, mount_point, path, format, vm_id, slot,
        created_at, updated_at FROM disks";

fn disk_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Disk> {
    let format: String = r.get(4)?;
    let vm: Option<String> = r.get(5)?;
    let slot: Option<i64> = r.get(6)?;
    Ok(Disk {
        id: Name::from_trusted(r.get(0)?),
        size_gb: r.get(1)?,
        mount_point: r.get(2)?,
        path: r.get(3)?,
        format: ImageFormat::parse(&format).unwrap_or(ImageFormat::Qcow2),
        attachment: vm.map(|v| {
            (
                Name::from_trusted(v),
                slot.and_then(|s| u8::try_from(s).ok()).unwrap_or(u8::MAX),
            )
        }),
        created_at: r.get(7)?,
        updated_at: r.get(8)?,
    })
}

fn get_in(c: &rusqlite::Connection, id: &Name) -> Result<Disk, StoreError> {
    c.prepare_cached(&format!("{DISK_SELECT} WHERE id = ?1"))?
        .query_row([id.as_str()], disk_row)
        .optional()?
        .ok_or(StoreError::NotFound)
}

impl Store {
    /// Records a new available disk; `AlreadyExists` when the id is taken.
    pub fn insert_disk(&self, new: &NewDisk) -> Result<Disk, StoreError> {
        self.write(|tx| {
            let now = crate::model::now();
            let n = tx.execute(
                "INSERT INTO disks (id, size_gb, mount_point, path, format, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6) ON CONFLICT(id) DO NOTHING",
                rusqlite::params![
                    new.id.as_str(),
                    new.size_gb,
                    new.mount_point,
                    new.path,
                    new.format.as_str(),
                    now
                ],
            )?;
            if n == 0 {
                return Err(StoreError::AlreadyExists);
            }
            get_in(tx, &new.id)
        })
    }

    pub fn get_disk(&self, id: &Name) -> Result<Disk, StoreError> {
        self.read(|c| get_in(c, id))
    }

    pub fn list_disks(&self) -> Result<Vec<Disk>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!("{DISK_SELECT} ORDER BY created_at, id"))?;
            let rows = stmt.query_map([], disk_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// The disks attached to one VM, by slot.
    pub fn disks_of_vm(&self, vm: &Name) -> Result<Vec<Disk>, StoreError> {
        self.read(|c| {
            let mut stmt =
                c.prepare_cached(&format!("{DISK_SELECT} WHERE vm_id = ?1 ORDER BY slot, id"))?;
            let rows = stmt.query_map([vm.as_str()], disk_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Attaches the disk to `vm` on `slot` only if it is attached nowhere.
    /// `NotFound` when the disk (or the VM) does not exist.
    pub fn claim_disk(&self, id: &Name, vm: &Name, slot: u8) -> Result<DiskClaim, StoreError> {
        self.write(|tx| {
            let vm_exists: Option<i64> = tx
                .query_row("SELECT 1 FROM vms WHERE id = ?1", [vm.as_str()], |r| {
                    r.get(0)
                })
                .optional()?;
            if vm_exists.is_none() {
                return Err(StoreError::NotFound);
            }
            let n = tx.execute(
                "UPDATE disks SET vm_id = ?2, slot = ?3, updated_at = ?4
                 WHERE id = ?1 AND vm_id IS NULL",
                rusqlite::params![id.as_str(), vm.as_str(), slot, crate::model::now()],
            )?;
            if n == 1 {
                return Ok(DiskClaim::Claimed);
            }
            match get_in(tx, id)?.attachment {
                Some((owner, _)) => Ok(DiskClaim::Attached(owner)),
                None => Err(StoreError::Corrupt(format!(
                    "disk {id} could not be claimed"
                ))),
            }
        })
    }

    /// Detaches the disk if it is attached to `vm`; false when it was not.
    pub fn release_disk(&self, id: &Name, vm: &Name) -> Result<bool, StoreError> {
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE disks SET vm_id = NULL, slot = NULL, updated_at = ?3
                 WHERE id = ?1 AND vm_id = ?2",
                rusqlite::params![id.as_str(), vm.as_str(), crate::model::now()],
            )?;
            Ok(n == 1)
        })
    }

    /// Records what QEMU says: the disk sits in `vm` on `slot`. Used when a
    /// restarted vman finds a plugged disk its database does not know of.
    pub fn set_disk_attachment(&self, id: &Name, vm: &Name, slot: u8) -> Result<(), StoreError> {
        self.write(|tx| {
            match tx.execute(
                "UPDATE disks SET vm_id = ?2, slot = ?3, updated_at = ?4 WHERE id = ?1",
                rusqlite::params![id.as_str(), vm.as_str(), slot, crate::model::now()],
            )? {
                0 => Err(StoreError::NotFound),
                _ => Ok(()),
            }
        })
    }

    pub fn set_disk_size(&self, id: &Name, size_gb: u64) -> Result<(), StoreError> {
        self.write(|tx| {
            match tx.execute(
                "UPDATE disks SET size_gb = ?2, updated_at = ?3 WHERE id = ?1",
                rusqlite::params![id.as_str(), size_gb, crate::model::now()],
            )? {
                0 => Err(StoreError::NotFound),
                _ => Ok(()),
            }
        })
    }

    /// Deletes the record only when the disk is attached nowhere.
    pub fn delete_disk(&self, id: &Name) -> Result<DiskDelete, StoreError> {
        self.write(|tx| {
            let disk = get_in(tx, id)?;
            if let Some((vm, _)) = disk.attachment {
                return Ok(DiskDelete::Attached(vm));
            }
            tx.execute(
                "DELETE FROM disks WHERE id = ?1 AND vm_id IS NULL",
                [id.as_str()],
            )?;
            Ok(DiskDelete::Deleted(disk))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewVm;

    fn name(s: &str) -> Name {
        Name::parse("n", s).expect("valid")
    }

    fn store_with_vms(dir: &std::path::Path) -> Store {
        let store = Store::open(&dir.join("db")).expect("open");
        store
            .insert_template(&crate::model::Template {
                name: name("t"),
                cpu_count: 1,
                ram_mib: 256,
                disk_size_gb: None,
                created_at: crate::model::now(),
            })
            .expect("template");
        for vm in ["a", "b"] {
            store
                .insert_vm(&NewVm {
                    id: name(vm),
                    template: name("t"),
                    qcow2_path: None,
                    boot_disk: None,
                    qcow2_path_format: None,
                    boot_disk_format: None,
                    network_mode: crate::model::NetworkMode::None,
                    ports: Vec::new(),
                })
                .expect("vm");
        }
        store
    }

    fn new_disk(id: &str) -> NewDisk {
        NewDisk {
            id: name(id),
            size_gb: 1,
            mount_point: Some("/data".into()),
            path: format!("/s/disks/{id}.qcow2"),
            format: ImageFormat::Qcow2,
        }
    }

    #[test]
    fn one_claim_wins_and_deleting_a_vm_frees_its_disks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store_with_vms(dir.path());
        let d = store.insert_disk(&new_disk("d1")).expect("insert");
        assert_eq!(d.attachment, None);
        assert!(matches!(
            store.insert_disk(&new_disk("d1")),
            Err(StoreError::AlreadyExists)
        ));
        assert!(matches!(
            store.claim_disk(&name("d1"), &name("a"), 0),
            Ok(DiskClaim::Claimed)
        ));
        assert!(matches!(
            store.claim_disk(&name("d1"), &name("b"), 0),
            Ok(DiskClaim::Attached(v)) if v.as_str() == "a"
        ));
        assert!(matches!(
            store.claim_disk(&name("nope"), &name("b"), 0),
            Err(StoreError::NotFound)
        ));
        assert!(matches!(
            store.claim_disk(&name("d1"), &name("novm"), 0),
            Err(StoreError::NotFound)
        ));
        assert!(matches!(
            store.delete_disk(&name("d1")),
            Ok(DiskDelete::Attached(_))
        ));
        assert_eq!(store.disks_of_vm(&name("a")).expect("list").len(), 1);
        store.delete_vm(&name("a")).expect("delete vm");
        assert_eq!(store.get_disk(&name("d1")).expect("get").attachment, None);
        assert!(!store
            .release_disk(&name("d1"), &name("b"))
            .expect("release"));
        assert!(matches!(
            store.delete_disk(&name("d1")),
            Ok(DiskDelete::Deleted(_))
        ));
        assert!(matches!(
            store.get_disk(&name("d1")),
            Err(StoreError::NotFound)
        ));
    }
}
