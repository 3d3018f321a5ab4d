//! Cold migration rows (`vm_migrations`, migrations/0011_migrations.sql):
//! the intent of a source (`outgoing`) and the mark of a target
//! (`incoming`), and the target's adoption of a VM record in one
//! transaction (VM row, root disk, metadata, forwards, data disks, mark).

use rusqlite::OptionalExtension;

use super::{Store, StoreError};
use crate::model::{ImageFormat, Name, Template};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationRole {
    Outgoing,
    Incoming,
}

impl MigrationRole {
    fn as_str(self) -> &'static str {
        match self {
            Self::Outgoing => "outgoing",
            Self::Incoming => "incoming",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationStep {
    /// Files are being sent; the target has no record yet.
    Copying,
    /// The target recorded the VM; the placement change may have happened.
    Adopted,
}

impl MigrationStep {
    fn as_str(self) -> &'static str {
        match self {
            Self::Copying => "copying",
            Self::Adopted => "adopted",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationRow {
    pub vm_id: Name,
    pub role: MigrationRole,
    pub peer: String,
    pub peer_url: String,
    pub step: MigrationStep,
}

/// A data disk as the target records it.
#[derive(Debug, Clone)]
pub struct AdoptedDisk {
    pub id: Name,
    pub size_gb: u64,
    pub mount_point: Option<String>,
    pub path: String,
    pub format: ImageFormat,
    pub slot: u8,
}

/// Everything the target writes for a VM it adopts.
#[derive(Debug, Clone)]
pub struct Adoption {
    pub vm: super::NewVm,
    pub template: Template,
    pub created_at: String,
    /// `root.qcow2` at the target: path, virtual size, format.
    pub root_disk: Option<(String, u64, ImageFormat)>,
    pub hostname: Option<String>,
    pub user_data: Option<String>,
    pub ssh_keys: Option<Vec<String>>,
    pub disks: Vec<AdoptedDisk>,
    /// The source node and its URL (the `incoming` mark).
    pub peer: String,
    pub peer_url: String,
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MigrationRow> {
    let role: String = r.get(1)?;
    let step: String = r.get(4)?;
    Ok(MigrationRow {
        vm_id: Name::from_trusted(r.get(0)?),
        role: if role == "incoming" {
            MigrationRole::Incoming
        } else {
            MigrationRole::Outgoing
        },
        peer: r.get(2)?,
        peer_url: r.get(3)?,
        step: if step == "adopted" {
            MigrationStep::Adopted
        } else {
            MigrationStep::Copying
        },
    })
}

const SELECT: &str = "SELECT vm_id, role, peer, peer_url, step FROM vm_migrations";

impl Store {
    /// Records an outgoing migration; `AlreadyExists` when the VM has a row.
    pub fn begin_migration(&self, vm: &Name, peer: &str, peer_url: &str) -> Result<(), StoreError> {
        self.write(|tx| {
            let n = tx.execute(
                "INSERT INTO vm_migrations (vm_id, role, peer, peer_url, step, created_at)
                 VALUES (?1, 'outgoing', ?2, ?3, 'copying', ?4) ON CONFLICT(vm_id) DO NOTHING",
                rusqlite::params![vm.as_str(), peer, peer_url, crate::model::now()],
            )?;
            if n == 0 {
                return Err(StoreError::AlreadyExists);
            }
            Ok(())
        })
    }

    pub fn set_migration_step(&self, vm: &Name, step: MigrationStep) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE vm_migrations SET step = ?2 WHERE vm_id = ?1",
                rusqlite::params![vm.as_str(), step.as_str()],
            )?;
            Ok(())
        })
    }

    pub fn get_migration(&self, vm: &Name) -> Result<Option<MigrationRow>, StoreError> {
        self.read(|c| {
            Ok(c.prepare_cached(&format!("{SELECT} WHERE vm_id = ?1"))?
                .query_row([vm.as_str()], row)
                .optional()?)
        })
    }

    pub fn list_migrations(&self, role: MigrationRole) -> Result<Vec<MigrationRow>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!("{SELECT} WHERE role = ?1 ORDER BY vm_id"))?;
            let rows = stmt.query_map([role.as_str()], row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// Forgets a VM's migration row (any role).
    pub fn end_migration(&self, vm: &Name) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute("DELETE FROM vm_migrations WHERE vm_id = ?1", [vm.as_str()])?;
            Ok(())
        })
    }

    /// The target's adoption, all or nothing: `AlreadyExists` when the VM id,
    /// a disk id or a forwarded host port is taken here; the template is
    /// created when missing (the caller checked that an existing one has the
    /// same size).
    pub fn adopt_vm(&self, a: &Adoption) -> Result<(), StoreError> {
        let keys = a
            .ssh_keys
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.write(|tx| {
            let t = &a.template;
            tx.execute(
                "INSERT INTO templates (name, cpu_count, ram_mib, disk_size_gb, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(name) DO NOTHING",
                rusqlite::params![
                    t.name.as_str(),
                    t.cpu_count,
                    t.ram_mib,
                    t.disk_size_gb,
                    t.created_at
                ],
            )?;
            // The row of the files received (if any) becomes `adopted`; an
            // outgoing row means the VM is this node's.
            let n = tx.execute(
                "INSERT INTO vm_migrations (vm_id, role, peer, peer_url, step, created_at)
                 VALUES (?1, 'incoming', ?2, ?3, 'adopted', ?4)
                 ON CONFLICT(vm_id) DO UPDATE SET peer = ?2, peer_url = ?3, step = 'adopted'
                 WHERE role = 'incoming'",
                rusqlite::params![a.vm.id.as_str(), a.peer, a.peer_url, crate::model::now()],
            )?;
            if n == 0 {
                return Err(StoreError::AlreadyExists);
            }
            super::vms::insert_vm_in(tx, &a.vm)?;
            tx.execute(
                "UPDATE vms SET created_at = ?2 WHERE id = ?1",
                rusqlite::params![a.vm.id.as_str(), a.created_at],
            )?;
            if let Some((path, size, format)) = &a.root_disk {
                tx.execute(
                    "UPDATE vms SET root_disk_source = 'existing', root_disk_path = ?2,
                        root_disk_size = ?3, root_disk_format = ?4 WHERE id = ?1",
                    rusqlite::params![a.vm.id.as_str(), path, size, format.as_str()],
                )?;
            }
            if a.hostname.is_some() || a.user_data.is_some() || keys.is_some() {
                let now = crate::model::now();
                tx.execute(
                    "INSERT INTO vm_metadata (vm_id, hostname, user_data, ssh_keys, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                    rusqlite::params![a.vm.id.as_str(), a.hostname, a.user_data, keys, now],
                )?;
            }
            let now = crate::model::now();
            for d in &a.disks {
                let n = tx.execute(
                    "INSERT INTO disks (id, size_gb, mount_point, path, format, vm_id, slot,
                        created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8) ON CONFLICT(id) DO NOTHING",
                    rusqlite::params![
                        d.id.as_str(),
                        d.size_gb,
                        d.mount_point,
                        d.path,
                        d.format.as_str(),
                        a.vm.id.as_str(),
                        d.slot,
                        now
                    ],
                )?;
                if n == 0 {
                    return Err(StoreError::AlreadyExists);
                }
            }
            Ok(())
        })
    }

    /// The target notes a file it wrote for an incoming VM (the row is made
    /// with the first). `AlreadyExists` when the VM has an outgoing row.
    pub fn note_import(&self, vm: &Name, path: &str) -> Result<(), StoreError> {
        self.write(|tx| {
            let row: Option<(String, String)> = tx
                .query_row(
                    "SELECT role, files FROM vm_migrations WHERE vm_id = ?1",
                    [vm.as_str()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let mut files: Vec<String> = match &row {
                Some((role, _)) if role != "incoming" => return Err(StoreError::AlreadyExists),
                Some((_, files)) => serde_json::from_str(files).unwrap_or_default(),
                None => Vec::new(),
            };
            if !files.iter().any(|f| f == path) {
                files.push(path.to_owned());
            }
            let text =
                serde_json::to_string(&files).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            tx.execute(
                "INSERT INTO vm_migrations (vm_id, role, peer, peer_url, step, files, created_at)
                 VALUES (?1, 'incoming', '', '', 'copying', ?2, ?3)
                 ON CONFLICT(vm_id) DO UPDATE SET files = ?2",
                rusqlite::params![vm.as_str(), text, crate::model::now()],
            )?;
            Ok(())
        })
    }

    /// The target's roll-back: removes the VM and its disk rows only when
    /// they carry the `incoming` mark (a VM this node owns is never touched).
    /// Returns the paths of the files this node wrote for it (the caller
    /// removes them), `None` when there was no mark.
    pub fn drop_incoming(&self, vm: &Name) -> Result<Option<Vec<String>>, StoreError> {
        self.write(|tx| {
            let marked: Option<(String, String)> = tx
                .query_row(
                    "SELECT role, files FROM vm_migrations WHERE vm_id = ?1",
                    [vm.as_str()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some(("incoming", files)) = marked.as_ref().map(|(r, f)| (r.as_str(), f)) else {
                return Ok(None);
            };
            let paths: Vec<String> = serde_json::from_str(files).unwrap_or_default();
            tx.execute("DELETE FROM disks WHERE vm_id = ?1", [vm.as_str()])?;
            tx.execute("DELETE FROM vms WHERE id = ?1", [vm.as_str()])?;
            tx.execute("DELETE FROM vm_migrations WHERE vm_id = ?1", [vm.as_str()])?;
            Ok(Some(paths))
        })
    }

    /// The source's last step once the placement moved: the VM's row, its
    /// disk rows and its migration row, in one transaction.
    pub fn forget_migrated(&self, vm: &Name) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute("DELETE FROM disks WHERE vm_id = ?1", [vm.as_str()])?;
            tx.execute("DELETE FROM vms WHERE id = ?1", [vm.as_str()])?;
            tx.execute("DELETE FROM vm_migrations WHERE vm_id = ?1", [vm.as_str()])?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NetworkMode;
    use crate::store::{NewDisk, NewVm};

    fn name(s: &str) -> Name {
        Name::parse("n", s).expect("valid")
    }

    fn adoption(id: &str, disk: &str) -> Adoption {
        Adoption {
            vm: NewVm {
                id: name(id),
                template: name("t"),
                qcow2_path: None,
                boot_disk: None,
                qcow2_path_format: None,
                boot_disk_format: None,
                network_mode: NetworkMode::None,
                ports: Vec::new(),
            },
            template: Template {
                name: name("t"),
                cpu_count: 1,
                ram_mib: 256,
                disk_size_gb: None,
                created_at: crate::model::now(),
            },
            created_at: "2020-01-01T00:00:00Z".into(),
            root_disk: Some(("/s/vms/x/root.qcow2".into(), 1 << 30, ImageFormat::Qcow2)),
            hostname: Some("h".into()),
            user_data: None,
            ssh_keys: Some(vec!["ssh-ed25519 AAAA k".into()]),
            disks: vec![AdoptedDisk {
                id: name(disk),
                size_gb: 1,
                mount_point: None,
                path: format!("/s/disks/{disk}.qcow2"),
                format: ImageFormat::Qcow2,
                slot: 0,
            }],
            peer: "n1".into(),
            peer_url: "http://n1".into(),
        }
    }

    #[test]
    fn an_adoption_is_all_or_nothing_and_marked_incoming() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(&dir.path().join("db")).expect("open");
        store
            .insert_disk(&NewDisk {
                id: name("taken"),
                size_gb: 1,
                mount_point: None,
                path: "/s/disks/taken.qcow2".into(),
                format: ImageFormat::Qcow2,
            })
            .expect("disk");
        // A disk id taken here: nothing at all is written.
        assert!(matches!(
            store.adopt_vm(&adoption("v1", "taken")),
            Err(StoreError::AlreadyExists)
        ));
        assert!(matches!(
            store.get_vm(&name("v1")),
            Err(StoreError::NotFound)
        ));
        assert_eq!(store.get_migration(&name("v1")).expect("read"), None);
        assert!(matches!(
            store.get_template(&name("t")),
            Err(StoreError::NotFound)
        ));

        store.adopt_vm(&adoption("v1", "d1")).expect("adopt");
        let vm = store.get_vm(&name("v1")).expect("vm");
        assert_eq!(vm.created_at, "2020-01-01T00:00:00Z");
        assert_eq!(vm.root_disk_size, Some(1 << 30));
        assert_eq!(vm.root_disk_format, Some(ImageFormat::Qcow2));
        assert_eq!(
            store
                .get_metadata(&name("v1"))
                .expect("md")
                .hostname
                .as_deref(),
            Some("h")
        );
        assert_eq!(
            store.get_disk(&name("d1")).expect("disk").attachment,
            Some((name("v1"), 0))
        );
        let row = store
            .get_migration(&name("v1"))
            .expect("read")
            .expect("row");
        assert_eq!(
            (row.role, row.peer.as_str()),
            (MigrationRole::Incoming, "n1")
        );
    }

    #[test]
    fn a_roll_back_drops_only_a_marked_copy() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(&dir.path().join("db")).expect("open");
        store.adopt_vm(&adoption("v1", "d1")).expect("adopt");
        // Once it is this node's (mark gone), a roll-back leaves it alone.
        store.end_migration(&name("v1")).expect("unmark");
        assert_eq!(store.drop_incoming(&name("v1")).expect("drop"), None);
        assert!(store.get_vm(&name("v1")).is_ok());
        store
            .note_import(&name("v2"), "/s/disks/d2.qcow2")
            .expect("note");
        store
            .note_import(&name("v2"), "/s/disks/d2.qcow2")
            .expect("twice");
        store.adopt_vm(&adoption("v2", "d2")).expect("adopt");
        let paths = store.drop_incoming(&name("v2")).expect("drop");
        // Only what this node noted writing: never a file it did not make.
        assert_eq!(paths, Some(vec!["/s/disks/d2.qcow2".to_owned()]));
        assert!(matches!(
            store.get_vm(&name("v2")),
            Err(StoreError::NotFound)
        ));
        assert!(matches!(
            store.get_disk(&name("d2")),
            Err(StoreError::NotFound)
        ));
        assert!(store.get_disk(&name("d1")).is_ok());
    }

    #[test]
    fn an_outgoing_intent_is_one_per_vm() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(&dir.path().join("db")).expect("open");
        store
            .begin_migration(&name("v"), "n2", "http://n2")
            .expect("begin");
        assert!(matches!(
            store.begin_migration(&name("v"), "n3", "http://n3"),
            Err(StoreError::AlreadyExists)
        ));
        store
            .set_migration_step(&name("v"), MigrationStep::Adopted)
            .expect("step");
        let rows = store
            .list_migrations(MigrationRole::Outgoing)
            .expect("list");
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].step, rows[0].peer.as_str()),
            (MigrationStep::Adopted, "n2")
        );
        // A VM this node is sending away takes no imports.
        assert!(matches!(
            store.note_import(&name("v"), "/s/x"),
            Err(StoreError::AlreadyExists)
        ));
        store.end_migration(&name("v")).expect("end");
        assert!(store
            .list_migrations(MigrationRole::Outgoing)
            .expect("list")
            .is_empty());
    }
}
