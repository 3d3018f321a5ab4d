//! VM rows and their metadata.

use rusqlite::OptionalExtension;

use super::{template_row, template_row_at, Store, StoreError};
use crate::model::{
    ImageFormat, Metadata, MetadataPatch, Name, NetworkMode, PortForward, RootDiskSource, Vm,
    VmState,
};

/// What POST /vms records.
#[derive(Debug, Clone)]
pub struct NewVm {
    pub id: Name,
    pub template: Name,
    pub qcow2_path: Option<String>,
    pub boot_disk: Option<String>,
    pub qcow2_path_format: Option<ImageFormat>,
    pub boot_disk_format: Option<ImageFormat>,
    pub network_mode: NetworkMode,
    /// Forwards recorded with the VM (user mode: guest 22).
    pub ports: Vec<PortForward>,
}

/// One write of a VM's state (`Service::record` builds it from an event):
/// the state and pid are always written, and the error (`None` clears it).
#[derive(Debug, Clone, PartialEq)]
pub struct VmRuntime {
    pub state: VmState,
    pub pid: Option<i64>,
    pub last_error: Option<String>,
    /// The root disk QEMU was started with, and its pinned format.
    pub root_disk: Option<(RootDiskSource, String, u64, ImageFormat)>,
}

/// What a conditional state write did.
#[derive(Debug)]
pub enum VmWrite {
    /// Written; the VM as it now is.
    Written(Box<Vm>),
    /// Not written: the VM was no longer in the expected state but in this
    /// one (a newer writer came first).
    Stale(VmState),
}

const VM_SELECT: &str = concat!(
    "SELECT v.id, v.state, v.local_ip, v.qcow2_path, v.boot_disk,
        v.root_disk_source, v.root_disk_path, v.root_disk_size, v.pid, v.last_error,
        v.created_at, v.updated_at, v.qcow2_path_format, v.boot_disk_format, v.root_disk_format, v.network_mode, \
        v.metadata_fetched_at, ",
    template_columns!("t."),
    " FROM vms v JOIN templates t ON t.name = v.template_name"
);

fn vm_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Vm> {
    let state: String = r.get(1)?;
    let source: Option<String> = r.get(5)?;
    let format = |at: usize| -> rusqlite::Result<Option<ImageFormat>> {
        Ok(r.get::<_, Option<String>>(at)?
            .as_deref()
            .and_then(ImageFormat::parse))
    };
    Ok(Vm {
        id: Name::from_trusted(r.get(0)?),
        state: VmState::parse(&state).unwrap_or(VmState::Error),
        local_ip: r.get(2)?,
        qcow2_path: r.get(3)?,
        boot_disk: r.get(4)?,
        root_disk_source: source.as_deref().and_then(RootDiskSource::parse),
        root_disk_path: r.get(6)?,
        root_disk_size: r.get(7)?,
        pid: r.get(8)?,
        last_error: r.get(9)?,
        created_at: r.get(10)?,
        updated_at: r.get(11)?,
        qcow2_path_format: format(12)?,
        boot_disk_format: format(13)?,
        root_disk_format: format(14)?,
        network_mode: NetworkMode::parse(&r.get::<_, String>(15)?).unwrap_or(NetworkMode::None),
        ports: Vec::new(),
        metadata_fetched_at: r.get(16)?,
        template: template_row_at(r, 17)?,
    })
}

impl Store {
    /// Records a new stopped VM. `AlreadyExists` when the id is taken,
    /// `TemplateMissing` when the template is not there (checked in the same
    /// transaction, so a concurrent template delete cannot slip between).
    pub fn insert_vm(&self, new: &NewVm) -> Result<Vm, StoreError> {
        self.write(|tx| insert_vm_in(tx, new))
    }
}

/// `Store::insert_vm` inside a transaction the caller holds (so that other
/// rows, e.g. a bridge address, are written with it or not at all).
pub(super) fn insert_vm_in(tx: &rusqlite::Transaction<'_>, new: &NewVm) -> Result<Vm, StoreError> {
    let template = tx
        .query_row(
            concat!(
                "SELECT ",
                template_columns!(""),
                " FROM templates WHERE name = ?1"
            ),
            [new.template.as_str()],
            template_row,
        )
        .optional()?
        .ok_or(StoreError::TemplateMissing)?;
    let now = crate::model::now();
    let n = tx.execute(
        "INSERT INTO vms (id, template_name, state, qcow2_path, boot_disk, created_at, updated_at,
            qcow2_path_format, boot_disk_format, network_mode)
         VALUES (?1, ?2, 'stopped', ?3, ?4, ?5, ?5, ?6, ?7, ?8) ON CONFLICT(id) DO NOTHING",
        rusqlite::params![
            new.id.as_str(),
            new.template.as_str(),
            new.qcow2_path,
            new.boot_disk,
            now,
            new.qcow2_path_format.map(ImageFormat::as_str),
            new.boot_disk_format.map(ImageFormat::as_str),
            new.network_mode.as_str()
        ],
    )?;
    if n == 0 {
        return Err(StoreError::AlreadyExists);
    }
    for port in &new.ports {
        super::ports::insert_in(tx, &new.id, port, &now)?;
    }
    Ok(Vm {
        id: new.id.clone(),
        template,
        state: VmState::Stopped,
        local_ip: None,
        qcow2_path: new.qcow2_path.clone(),
        boot_disk: new.boot_disk.clone(),
        qcow2_path_format: new.qcow2_path_format,
        boot_disk_format: new.boot_disk_format,
        root_disk_format: None,
        root_disk_source: None,
        root_disk_path: None,
        root_disk_size: None,
        pid: None,
        last_error: None,
        created_at: now.clone(),
        updated_at: now,
        network_mode: new.network_mode,
        ports: new.ports.clone(),
        metadata_fetched_at: None,
    })
}

impl Store {
    pub fn get_vm(&self, id: &Name) -> Result<Vm, StoreError> {
        self.read(|c| {
            let mut vm = c
                .prepare_cached(&format!("{VM_SELECT} WHERE v.id = ?1"))?
                .query_row([id.as_str()], vm_row)
                .optional()?
                .ok_or(StoreError::NotFound)?;
            vm.ports = super::ports::of_vm(c, &vm.id)?;
            Ok(vm)
        })
    }

    pub fn list_vms(&self, state: Option<VmState>) -> Result<Vec<Vm>, StoreError> {
        self.read(|c| {
            let rows = match state {
                Some(s) => c
                    .prepare_cached(&format!(
                        "{VM_SELECT} WHERE v.state = ?1 ORDER BY v.created_at, v.id"
                    ))?
                    .query_map([s.as_str()], vm_row)?
                    .collect::<Result<Vec<_>, _>>()?,
                None => c
                    .prepare_cached(&format!("{VM_SELECT} ORDER BY v.created_at, v.id"))?
                    .query_map([], vm_row)?
                    .collect::<Result<Vec<_>, _>>()?,
            };
            super::ports::fill(c, rows)
        })
    }

    pub fn delete_vm(&self, id: &Name) -> Result<(), StoreError> {
        self.write(
            |tx| match tx.execute("DELETE FROM vms WHERE id = ?1", [id.as_str()])? {
                0 => Err(StoreError::NotFound),
                _ => Ok(()),
            },
        )
    }

    /// Deletes the VM and frees its data disks in one transaction; returns
    /// the ids of the disks that were attached to it.
    pub fn delete_vm_and_free_disks(&self, id: &Name) -> Result<Vec<Name>, StoreError> {
        self.write(|tx| {
            let ids = {
                let mut stmt = tx.prepare_cached("SELECT id FROM disks WHERE vm_id = ?1")?;
                let rows = stmt.query_map([id.as_str()], |r| r.get::<_, String>(0))?;
                rows.collect::<Result<Vec<_>, _>>()?
            };
            tx.execute(
                "UPDATE disks SET vm_id = NULL, slot = NULL, updated_at = ?2 WHERE vm_id = ?1",
                rusqlite::params![id.as_str(), crate::model::now()],
            )?;
            match tx.execute("DELETE FROM vms WHERE id = ?1", [id.as_str()])? {
                0 => Err(StoreError::NotFound),
                _ => Ok(ids.into_iter().map(Name::from_trusted).collect()),
            }
        })
    }

    /// Writes `change` only if the VM is still in state `expected` (one
    /// statement, like the disk claim), so a stale writer cannot overwrite
    /// a newer state. `NotFound` when the VM does not exist.
    pub fn transition_vm(
        &self,
        id: &Name,
        expected: VmState,
        change: &VmRuntime,
    ) -> Result<VmWrite, StoreError> {
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE vms SET state = ?3, pid = ?4, last_error = ?5, updated_at = ?6
                 WHERE id = ?1 AND state = ?2",
                rusqlite::params![
                    id.as_str(),
                    expected.as_str(),
                    change.state.as_str(),
                    change.pid,
                    change.last_error,
                    crate::model::now()
                ],
            )?;
            if n == 0 {
                let found: Option<String> = tx
                    .query_row("SELECT state FROM vms WHERE id = ?1", [id.as_str()], |r| {
                        r.get(0)
                    })
                    .optional()?;
                return match found {
                    None => Err(StoreError::NotFound),
                    Some(s) => Ok(VmWrite::Stale(VmState::parse(&s).unwrap_or(VmState::Error))),
                };
            }
            if let Some((source, path, size, format)) = &change.root_disk {
                tx.execute(
                    "UPDATE vms SET root_disk_source = ?2, root_disk_path = ?3, root_disk_size = ?4,
                        root_disk_format = ?5 WHERE id = ?1",
                    rusqlite::params![id.as_str(), source.as_str(), path, size, format.as_str()],
                )?;
            }
            let mut vm = tx.query_row(
                &format!("{VM_SELECT} WHERE v.id = ?1"),
                [id.as_str()],
                vm_row,
            )?;
            vm.ports = super::ports::of_vm(tx, &vm.id)?;
            Ok(VmWrite::Written(Box::new(vm)))
        })
    }

    /// Pins the formats of a VM's explicit images where none is recorded
    /// yet (rows made before formats were pinned); never changes a pin.
    pub fn pin_image_formats(
        &self,
        id: &Name,
        qcow2_path: Option<ImageFormat>,
        boot_disk: Option<ImageFormat>,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE vms SET qcow2_path_format = COALESCE(qcow2_path_format, ?2),
                    boot_disk_format = COALESCE(boot_disk_format, ?3) WHERE id = ?1",
                rusqlite::params![
                    id.as_str(),
                    qcow2_path.map(ImageFormat::as_str),
                    boot_disk.map(ImageFormat::as_str)
                ],
            )?;
            Ok(())
        })
    }

    /// The VM's metadata; `NotFound` when the VM does not exist.
    pub fn get_metadata(&self, id: &Name) -> Result<Metadata, StoreError> {
        self.read(|c| {
            let exists: bool = c
                .prepare_cached("SELECT 1 FROM vms WHERE id = ?1")?
                .exists([id.as_str()])?;
            if !exists {
                return Err(StoreError::NotFound);
            }
            let row = c
                .prepare_cached(
                    "SELECT hostname, user_data, ssh_keys, created_at, updated_at FROM vm_metadata WHERE vm_id = ?1",
                )?
                .query_row([id.as_str()], |r| {
                    Ok((
                        r.get::<_, Option<String>>(0)?,
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, Option<String>>(4)?,
                    ))
                })
                .optional()?;
            let Some((hostname, user_data, keys, created_at, updated_at)) = row else {
                return Ok(Metadata::default());
            };
            let ssh_keys = keys
                .map(|k| serde_json::from_str::<Vec<String>>(&k))
                .transpose()
                .map_err(|e| StoreError::Corrupt(format!("ssh_keys of {id}: {e}")))?;
            Ok(Metadata {
                hostname,
                user_data,
                ssh_keys,
                created_at,
                updated_at,
            })
        })
    }

    /// Records when the guest fetched its meta-data; `NotFound` when the VM
    /// does not exist. Leaves `updated_at` alone (the VM did not change).
    pub fn set_metadata_fetched(&self, id: &Name, at: &str) -> Result<(), StoreError> {
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE vms SET metadata_fetched_at = ?2 WHERE id = ?1",
                rusqlite::params![id.as_str(), at],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(())
        })
    }

    /// Creates or updates metadata; only the fields given change.
    pub fn upsert_metadata(&self, id: &Name, patch: &MetadataPatch) -> Result<(), StoreError> {
        let keys = patch
            .ssh_keys
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.write(|tx| {
            let exists = tx.prepare("SELECT 1 FROM vms WHERE id = ?1")?.exists([id.as_str()])?;
            if !exists {
                return Err(StoreError::NotFound);
            }
            let now = crate::model::now();
            tx.execute(
                "INSERT INTO vm_metadata (vm_id, hostname, user_data, ssh_keys, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)
                 ON CONFLICT(vm_id) DO UPDATE SET
                    hostname = COALESCE(?2, hostname),
                    user_data = COALESCE(?3, user_data),
                    ssh_keys = COALESCE(?4, ssh_keys),
                    updated_at = ?5",
                rusqlite::params![id.as_str(), patch.hostname, patch.user_data, keys, now],
            )?;
            Ok(())
        })
    }

    /// Forgets the metadata; `NotFound` only when the VM does not exist.
    pub fn delete_metadata(&self, id: &Name) -> Result<(), StoreError> {
        self.write(|tx| {
            let exists = tx
                .prepare("SELECT 1 FROM vms WHERE id = ?1")?
                .exists([id.as_str()])?;
            if !exists {
                return Err(StoreError::NotFound);
            }
            tx.execute("DELETE FROM vm_metadata WHERE vm_id = ?1", [id.as_str()])?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        Name::parse("id", s).expect("name")
    }

    fn running(pid: i64) -> VmRuntime {
        VmRuntime {
            state: VmState::Running,
            pid: Some(pid),
            last_error: None,
            root_disk: None,
        }
    }

    #[test]
    fn a_stale_state_writer_cannot_overwrite_a_newer_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("vman.db")).expect("open");
        store
            .insert_template(&crate::model::Template {
                name: name("t"),
                cpu_count: 1,
                ram_mib: 64,
                disk_size_gb: None,
                created_at: crate::model::now(),
            })
            .expect("template");
        store
            .insert_vm(&NewVm {
                id: name("a"),
                template: name("t"),
                qcow2_path: None,
                boot_disk: None,
                qcow2_path_format: None,
                boot_disk_format: None,
                network_mode: NetworkMode::None,
                ports: Vec::new(),
            })
            .expect("vm");
        let a = name("a");
        let vm = match store.transition_vm(&a, VmState::Stopped, &running(42)) {
            Ok(VmWrite::Written(vm)) => vm,
            other => panic!("{other:?}"),
        };
        assert_eq!((vm.state, vm.pid), (VmState::Running, Some(42)));
        // A writer that still believes the VM stopped is refused.
        match store.transition_vm(&a, VmState::Stopped, &running(7)) {
            Ok(VmWrite::Stale(VmState::Running)) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(store.get_vm(&a).expect("vm").pid, Some(42));
        let gone = VmRuntime {
            state: VmState::Error,
            pid: None,
            last_error: Some("gone".into()),
            root_disk: Some((RootDiskSource::Empty, "/r".into(), 1, ImageFormat::Qcow2)),
        };
        let vm = match store.transition_vm(&a, VmState::Running, &gone) {
            Ok(VmWrite::Written(vm)) => vm,
            other => panic!("{other:?}"),
        };
        assert_eq!(vm.state, VmState::Error);
        assert_eq!(vm.pid, None);
        assert_eq!(vm.last_error.as_deref(), Some("gone"));
        assert_eq!(vm.root_disk_format, Some(ImageFormat::Qcow2));
        assert!(matches!(
            store.transition_vm(&name("nope"), VmState::Stopped, &running(1)),
            Err(StoreError::NotFound)
        ));
    }
}
