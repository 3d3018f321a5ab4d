//! The bridge network's address rows (`bridge_ips`): a VM and its address
//! are recorded in one transaction, the address freed with the VM's row.
//! Which addresses may be handed out is the caller's rule (`pick`).

use std::collections::HashSet;
use std::net::Ipv4Addr;

use super::vms::{insert_vm_in, NewVm};
use super::{Store, StoreError};
use crate::model::{Name, Vm};

/// Gives the VM `id` (inserted in this transaction) the address `pick`
/// chooses among the free ones; `Exhausted` when there is none.
pub(super) fn assign_address_in(
    tx: &rusqlite::Transaction<'_>,
    id: &Name,
    pick: impl FnOnce(&HashSet<Ipv4Addr>) -> Option<Ipv4Addr>,
) -> Result<String, StoreError> {
    let taken = {
        let mut stmt = tx.prepare_cached("SELECT ip FROM bridge_ips")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.filter_map(|r| r.ok().and_then(|ip| ip.parse().ok()))
            .collect::<HashSet<Ipv4Addr>>()
    };
    let ip = pick(&taken).ok_or(StoreError::Exhausted)?.to_string();
    tx.execute(
        "INSERT INTO bridge_ips (ip, vm_id, created_at) VALUES (?1, ?2, ?3)",
        rusqlite::params![ip, id.as_str(), crate::model::now()],
    )?;
    tx.execute(
        "UPDATE vms SET local_ip = ?2 WHERE id = ?1",
        rusqlite::params![id.as_str(), ip],
    )?;
    Ok(ip)
}

impl Store {
    /// Records a new VM with the address `pick` chooses among those not
    /// taken (`pick` sees the taken ones); `Exhausted` with nothing written
    /// when it finds none. The VM's `local_ip` is that address.
    pub fn insert_vm_with_address(
        &self,
        new: &NewVm,
        pick: impl FnOnce(&HashSet<Ipv4Addr>) -> Option<Ipv4Addr>,
    ) -> Result<Vm, StoreError> {
        self.write(|tx| {
            let mut vm = insert_vm_in(tx, new)?;
            vm.local_ip = Some(assign_address_in(tx, &new.id, pick)?);
            Ok(vm)
        })
    }

    /// Every VM with a bridge address, and the address.
    pub fn bridge_addresses(&self) -> Result<Vec<(Name, Ipv4Addr)>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached("SELECT vm_id, ip FROM bridge_ips ORDER BY ip")?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (id, ip) = row?;
                let ip = ip.parse().map_err(|_| {
                    StoreError::Corrupt(format!("bridge address '{ip}' of VM {id}"))
                })?;
                out.push((Name::from_trusted(id), ip));
            }
            Ok(out)
        })
    }

    /// The VM's bridge address (`None`: not a bridge VM).
    pub fn bridge_address_of(&self, id: &Name) -> Result<Option<Ipv4Addr>, StoreError> {
        use rusqlite::OptionalExtension;
        let ip: Option<String> = self.read(|c| {
            Ok(
                c.prepare_cached("SELECT ip FROM bridge_ips WHERE vm_id = ?1")?
                    .query_row([id.as_str()], |r| r.get(0))
                    .optional()?,
            )
        })?;
        ip.map(|ip| {
            ip.parse()
                .map_err(|_| StoreError::Corrupt(format!("bridge address '{ip}' of VM {id}")))
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Template;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.db")).unwrap();
        store
            .insert_template(&Template {
                name: Name::parse("t", "t").unwrap(),
                cpu_count: 1,
                ram_mib: 64,
                disk_size_gb: None,
                created_at: crate::model::now(),
            })
            .unwrap();
        (dir, store)
    }

    fn new_vm(id: &str) -> NewVm {
        NewVm {
            id: Name::parse("id", id).unwrap(),
            template: Name::parse("t", "t").unwrap(),
            qcow2_path: None,
            boot_disk: None,
            qcow2_path_format: None,
            boot_disk_format: None,
            network_mode: crate::model::NetworkMode::Bridge,
            ports: Vec::new(),
        }
    }

    fn first_free(pool: Vec<Ipv4Addr>) -> impl FnOnce(&HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        move |taken| pool.into_iter().find(|ip| !taken.contains(ip))
    }

    #[test]
    fn addresses_are_unique_freed_with_the_vm_and_a_full_pool_writes_nothing() {
        let (_d, s) = store();
        let pool = vec![Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)];
        let a = s
            .insert_vm_with_address(&new_vm("a"), first_free(pool.clone()))
            .unwrap();
        let b = s
            .insert_vm_with_address(&new_vm("b"), first_free(pool.clone()))
            .unwrap();
        assert_eq!(a.local_ip.as_deref(), Some("10.0.0.2"));
        assert_eq!(b.local_ip.as_deref(), Some("10.0.0.3"));
        assert_eq!(
            s.get_vm(&a.id).unwrap().local_ip.as_deref(),
            Some("10.0.0.2")
        );
        let full = s.insert_vm_with_address(&new_vm("c"), first_free(pool.clone()));
        assert!(matches!(full, Err(StoreError::Exhausted)), "{full:?}");
        assert!(matches!(
            s.get_vm(&Name::parse("id", "c").unwrap()),
            Err(StoreError::NotFound)
        ));
        // A picker that insists on a taken address hits the unique key.
        let dup = s.insert_vm_with_address(&new_vm("d"), |_| Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert!(dup.is_err());
        assert!(s.get_vm(&Name::parse("id", "d").unwrap()).is_err());
        s.delete_vm(&a.id).unwrap();
        assert_eq!(s.bridge_addresses().unwrap().len(), 1);
        let c = s
            .insert_vm_with_address(&new_vm("c"), first_free(pool))
            .unwrap();
        assert_eq!(c.local_ip.as_deref(), Some("10.0.0.2"));
        assert_eq!(
            s.bridge_address_of(&c.id).unwrap(),
            Some(Ipv4Addr::new(10, 0, 0, 2))
        );
        assert_eq!(
            s.bridge_address_of(&Name::parse("id", "zz").unwrap())
                .unwrap(),
            None
        );
    }
}
