//! Port forwards of user-mode VMs: one row per (host port, protocol), so a
//! host port belongs to one VM at most; rows go with their VM (cascade).

use rusqlite::{Connection, OptionalExtension};

use super::{Store, StoreError};
use crate::model::{Name, PortForward, Protocol, Vm};

/// What inserting a forward did.
#[derive(Debug, PartialEq, Eq)]
pub enum PortInsert {
    Inserted,
    /// The host port and protocol are recorded for this VM already.
    Taken(Name),
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PortForward> {
    let proto: String = r.get(2)?;
    Ok(PortForward {
        host_port: r.get(0)?,
        guest_port: r.get(1)?,
        protocol: Protocol::parse(&proto).unwrap_or(Protocol::Tcp),
        host_address: r.get(3)?,
    })
}

const SELECT: &str =
    "SELECT host_port, guest_port, protocol, host_address, vm_id FROM port_forwards";

/// The VM's forwards, by host port.
pub(super) fn of_vm(c: &Connection, id: &Name) -> Result<Vec<PortForward>, StoreError> {
    let rows = c
        .prepare_cached(&format!(
            "{SELECT} WHERE vm_id = ?1 ORDER BY host_port, protocol"
        ))?
        .query_map([id.as_str()], row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// `vms` with their forwards filled in (one query for all).
pub(super) fn fill(c: &Connection, mut vms: Vec<Vm>) -> Result<Vec<Vm>, StoreError> {
    let mut stmt = c.prepare_cached(&format!("{SELECT} ORDER BY host_port, protocol"))?;
    let all = stmt.query_map([], |r| Ok((r.get::<_, String>(4)?, row(r)?)))?;
    let mut by_vm: std::collections::HashMap<String, Vec<PortForward>> = Default::default();
    for item in all {
        let (vm, port) = item?;
        by_vm.entry(vm).or_default().push(port);
    }
    for vm in &mut vms {
        vm.ports = by_vm.remove(vm.id.as_str()).unwrap_or_default();
    }
    Ok(vms)
}

/// Inserts in an open transaction; `AlreadyExists` when the host port and
/// protocol are taken.
pub(super) fn insert_in(
    tx: &rusqlite::Transaction<'_>,
    id: &Name,
    port: &PortForward,
    now: &str,
) -> Result<(), StoreError> {
    let n = tx.execute(
        "INSERT INTO port_forwards (host_port, protocol, vm_id, guest_port, host_address, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT(host_port, protocol) DO NOTHING",
        rusqlite::params![
            port.host_port,
            port.protocol.as_str(),
            id.as_str(),
            port.guest_port,
            port.host_address,
            now
        ],
    )?;
    if n == 0 {
        return Err(StoreError::AlreadyExists);
    }
    Ok(())
}

impl Store {
    /// Records a forward of VM `id`; `Taken` (nothing written) when its host
    /// port and protocol belong to a VM already; `NotFound` without the VM.
    pub fn insert_port(&self, id: &Name, port: &PortForward) -> Result<PortInsert, StoreError> {
        self.write(|tx| {
            let exists = tx
                .prepare_cached("SELECT 1 FROM vms WHERE id = ?1")?
                .exists([id.as_str()])?;
            if !exists {
                return Err(StoreError::NotFound);
            }
            let owner: Option<String> = tx
                .query_row(
                    "SELECT vm_id FROM port_forwards WHERE host_port = ?1 AND protocol = ?2",
                    rusqlite::params![port.host_port, port.protocol.as_str()],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(owner) = owner {
                return Ok(PortInsert::Taken(Name::from_trusted(owner)));
            }
            insert_in(tx, id, port, &crate::model::now())?;
            Ok(PortInsert::Inserted)
        })
    }

    /// Every recorded forward's (host port, protocol), of any VM.
    pub fn taken_ports(&self) -> Result<Vec<(u16, Protocol)>, StoreError> {
        self.read(|c| {
            let rows = c
                .prepare_cached(SELECT)?
                .query_map([], row)?
                .map(|r| r.map(|p| (p.host_port, p.protocol)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    /// The VM's forwards; `NotFound` without the VM.
    pub fn list_ports(&self, id: &Name) -> Result<Vec<PortForward>, StoreError> {
        self.read(|c| {
            let exists = c
                .prepare_cached("SELECT 1 FROM vms WHERE id = ?1")?
                .exists([id.as_str()])?;
            if !exists {
                return Err(StoreError::NotFound);
            }
            of_vm(c, id)
        })
    }

    /// Removes the VM's forward of `host_port` (`protocol` when given, else
    /// the one forward of that port); returns it. `NotFound` when the VM has
    /// no such forward; `AlreadyExists` when the port has a TCP and a UDP
    /// forward and no protocol was given.
    pub fn delete_port(
        &self,
        id: &Name,
        host_port: u16,
        protocol: Option<Protocol>,
    ) -> Result<PortForward, StoreError> {
        self.write(|tx| {
            let found = of_vm(tx, id)?
                .into_iter()
                .filter(|p| p.host_port == host_port && protocol.is_none_or(|x| x == p.protocol))
                .collect::<Vec<_>>();
            let port = match found.as_slice() {
                [] => return Err(StoreError::NotFound),
                [one] => one.clone(),
                _ => return Err(StoreError::AlreadyExists),
            };
            tx.execute(
                "DELETE FROM port_forwards WHERE vm_id = ?1 AND host_port = ?2 AND protocol = ?3",
                rusqlite::params![id.as_str(), host_port, port.protocol.as_str()],
            )?;
            Ok(port)
        })
    }

    /// Records (or clears) the address the guest of a VM has.
    pub fn set_local_ip(&self, id: &Name, ip: Option<&str>) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE vms SET local_ip = ?2 WHERE id = ?1",
                rusqlite::params![id.as_str(), ip],
            )?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{NetworkMode, Template};
    use crate::store::NewVm;

    fn name(s: &str) -> Name {
        Name::parse("id", s).expect("name")
    }

    fn fwd(host: u16, guest: u16, protocol: Protocol) -> PortForward {
        PortForward {
            host_port: host,
            guest_port: guest,
            protocol,
            host_address: "127.0.0.1".into(),
        }
    }

    #[test]
    fn a_host_port_belongs_to_one_vm_and_goes_with_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("vman.db")).expect("open");
        store
            .insert_template(&Template {
                name: name("t"),
                cpu_count: 1,
                ram_mib: 64,
                disk_size_gb: None,
                created_at: crate::model::now(),
            })
            .expect("template");
        for (vm, port) in [("a", 10022), ("b", 10023)] {
            store
                .insert_vm(&NewVm {
                    id: name(vm),
                    template: name("t"),
                    qcow2_path: None,
                    boot_disk: None,
                    qcow2_path_format: None,
                    boot_disk_format: None,
                    network_mode: NetworkMode::User,
                    ports: vec![fwd(port, 22, Protocol::Tcp)],
                })
                .expect("vm");
        }
        // A VM whose guest-22 port is taken is not created at all.
        let clash = store.insert_vm(&NewVm {
            id: name("c"),
            template: name("t"),
            qcow2_path: None,
            boot_disk: None,
            qcow2_path_format: None,
            boot_disk_format: None,
            network_mode: NetworkMode::User,
            ports: vec![fwd(10022, 22, Protocol::Tcp)],
        });
        assert!(matches!(clash, Err(StoreError::AlreadyExists)));
        assert!(matches!(
            store.get_vm(&name("c")),
            Err(StoreError::NotFound)
        ));
        assert_eq!(
            store
                .insert_port(&name("b"), &fwd(10022, 80, Protocol::Tcp))
                .expect("insert"),
            PortInsert::Taken(name("a"))
        );
        // The same number in another protocol is another forward.
        assert_eq!(
            store
                .insert_port(&name("b"), &fwd(10022, 53, Protocol::Udp))
                .expect("insert"),
            PortInsert::Inserted
        );
        let a = store.get_vm(&name("a")).expect("a");
        assert_eq!(a.ports, vec![fwd(10022, 22, Protocol::Tcp)]);
        let all = store.list_vms(None).expect("list");
        assert_eq!(all[1].ports.len(), 2);
        store.delete_vm(&name("a")).expect("delete");
        assert_eq!(
            store
                .insert_port(&name("b"), &fwd(10022, 80, Protocol::Tcp))
                .expect("insert"),
            PortInsert::Inserted
        );
        // Port 10022 of b is TCP and UDP: which one must be said.
        assert!(matches!(
            store.delete_port(&name("b"), 10022, None),
            Err(StoreError::AlreadyExists)
        ));
        let gone = store
            .delete_port(&name("b"), 10022, Some(Protocol::Udp))
            .expect("delete");
        assert_eq!(gone.guest_port, 53);
        assert!(matches!(
            store.delete_port(&name("b"), 4, None),
            Err(StoreError::NotFound)
        ));
        assert!(matches!(
            store.insert_port(&name("zz"), &fwd(1, 1, Protocol::Tcp)),
            Err(StoreError::NotFound)
        ));
    }
}
