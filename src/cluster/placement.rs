//! Placement: which node a new VM goes to, and the etcd transactions that
//! write it. A placement and its memory reservation are written together,
//! on the condition that the node's `reserved/<node>` key is still at the
//! revision the choice was made from and the VM id is not placed yet; a
//! transaction that loses to a concurrent one is retried from fresh reads,
//! so two creates can never both take a node's last memory.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use super::etcd::{Cond, Entry, Op};
use super::{Cluster, ClusterError, NodeRecord, Placed, Reserved};
use crate::config::Placement;

/// Attempts of one placement before it gives up (each lost only to a
/// concurrent placement that succeeded).
const ATTEMPTS: u32 = 200;

/// A node as placement sees it: capacity, reserved, and the reservation
/// key's revision (0: not written yet).
#[derive(Debug, Clone)]
pub struct Candidate {
    pub name: String,
    pub memory_mib: u64,
    pub reserved_mib: u64,
    pub revision: i64,
}

impl Candidate {
    pub fn free_mib(&self) -> u64 {
        self.memory_mib.saturating_sub(self.reserved_mib)
    }
}

/// The pure choice: among nodes that fit `need` MiB (only `pinned` when
/// given), one with the most free memory (`spread`) or the least that still
/// fits (`pack`). Nodes within less than `need` of the best are as good
/// (they differ by less than one such VM): `salt` picks among them, so
/// concurrent creates spread over them instead of all racing for one
/// node's reservation; with `salt` 0 the first by name.
pub fn choose<'a>(
    candidates: &'a [Candidate],
    need: u64,
    policy: Placement,
    pinned: Option<&str>,
    salt: usize,
) -> Option<&'a Candidate> {
    let mut fits: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| pinned.is_none_or(|p| p == c.name))
        .filter(|c| c.free_mib() >= need)
        .collect();
    fits.sort_by(|a, b| a.name.cmp(&b.name));
    let best = match policy {
        Placement::Spread => fits.iter().map(|c| c.free_mib()).max()?,
        Placement::Pack => fits.iter().map(|c| c.free_mib()).min()?,
    };
    let good: Vec<&Candidate> = fits
        .into_iter()
        .filter(|c| match policy {
            Placement::Spread => c.free_mib() + need > best,
            Placement::Pack => c.free_mib() < best + need.max(1),
        })
        .collect();
    good.get(salt % good.len().max(1)).copied()
}

fn reserved_of(entry: Option<&Entry>) -> (u64, i64) {
    entry.map_or((0, 0), |e| {
        let r: Reserved = serde_json::from_slice(&e.value).unwrap_or_default();
        (r.memory_mib, e.mod_revision)
    })
}

/// Online nodes with their reservations, read fresh from etcd.
pub(crate) async fn candidates(cluster: &Cluster) -> Result<Vec<Candidate>, ClusterError> {
    let (nodes, _) = cluster.etcd.range("nodes/").await?;
    let (reserved, _) = cluster.etcd.range("reserved/").await?;
    let reserved: BTreeMap<String, &Entry> = reserved
        .iter()
        .map(|e| (e.key.trim_start_matches("reserved/").to_owned(), e))
        .collect();
    Ok(nodes
        .iter()
        .filter_map(|e| serde_json::from_slice::<NodeRecord>(&e.value).ok())
        .map(|n| {
            let (reserved_mib, revision) = reserved_of(reserved.get(&n.name).copied());
            Candidate {
                memory_mib: n.memory_mib,
                name: n.name,
                reserved_mib,
                revision,
            }
        })
        .collect())
}

fn json(v: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// Cond on a reservation key as read: its revision, or absent.
fn unchanged(node: &str, revision: i64) -> Cond {
    let key = format!("reserved/{node}");
    if revision == 0 {
        Cond::Absent(key)
    } else {
        Cond::ModRevision(key, revision)
    }
}

/// Places a new VM: chooses a node and writes placement + reservation in
/// one transaction (retried on conflict). Returns the node.
pub async fn place(
    cluster: &Cluster,
    vm_id: &str,
    memory_mib: u64,
    pinned: Option<&str>,
) -> Result<String, ClusterError> {
    for attempt in 0..ATTEMPTS {
        let all = candidates(cluster).await?;
        if let Some(p) = pinned {
            if !all.iter().any(|c| c.name == p) {
                return Err(ClusterError::NodeUnavailable(format!(
                    "node {p:?} is not an online member of the cluster (GET /cluster/nodes lists them)"
                )));
            }
        }
        let salt = usize::from(uuid::Uuid::new_v4().as_bytes()[1]);
        let Some(node) = choose(&all, memory_mib, cluster.policy, pinned, salt) else {
            let free: Vec<String> = all
                .iter()
                .filter(|c| pinned.is_none_or(|p| p == c.name))
                .map(|c| format!("{} {} MiB", c.name, c.free_mib()))
                .collect();
            return Err(ClusterError::NoMemory(format!(
                "Not enough memory: VM {vm_id} needs {memory_mib} MiB but no node has it free ({})",
                if free.is_empty() {
                    "no node online".to_owned()
                } else {
                    free.join(", ")
                }
            )));
        };
        let placed = Placed {
            node: node.name.clone(),
            memory_mib,
        };
        let reserved = Reserved {
            memory_mib: node.reserved_mib + memory_mib,
        };
        let ok = cluster
            .etcd
            .txn(
                vec![
                    Cond::Absent(format!("placement/{vm_id}")),
                    unchanged(&node.name, node.revision),
                ],
                vec![
                    Op::Put(format!("placement/{vm_id}"), json(&placed)),
                    Op::Put(format!("reserved/{}", node.name), json(&reserved)),
                ],
            )
            .await?;
        if ok {
            return Ok(node.name.clone());
        }
        if cluster
            .etcd
            .get(&format!("placement/{vm_id}"))
            .await?
            .is_some()
        {
            return Err(ClusterError::AlreadyExists);
        }
        cluster.retries.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            "placement of {vm_id}: conflict on {} (attempt {attempt})",
            node.name
        );
        // Spread the retries of many concurrent creates a little.
        let jitter = u64::from(uuid::Uuid::new_v4().as_bytes()[0] % 20);
        tokio::time::sleep(std::time::Duration::from_millis(jitter)).await;
    }
    Err(ClusterError::Unavailable(format!(
        "placement of {vm_id} lost {ATTEMPTS} transactions in a row to concurrent creates"
    )))
}

/// Removes a VM's placement and gives its memory back (VM deleted, or its
/// create failed on the chosen node). Nothing to do when it is not placed.
pub async fn release(cluster: &Cluster, vm_id: &str) -> Result<(), ClusterError> {
    for _ in 0..ATTEMPTS {
        let Some(entry) = cluster.etcd.get(&format!("placement/{vm_id}")).await? else {
            cluster.etcd.delete(&format!("vms/{vm_id}")).await?;
            return Ok(());
        };
        let Ok(placed) = serde_json::from_slice::<Placed>(&entry.value) else {
            cluster.etcd.delete(&format!("placement/{vm_id}")).await?;
            return Ok(());
        };
        let r = cluster
            .etcd
            .get(&format!("reserved/{}", placed.node))
            .await?;
        let (reserved, revision) = reserved_of(r.as_ref());
        let ok = cluster
            .etcd
            .txn(
                vec![
                    Cond::ModRevision(format!("placement/{vm_id}"), entry.mod_revision),
                    unchanged(&placed.node, revision),
                ],
                vec![
                    Op::Delete(format!("placement/{vm_id}")),
                    Op::Delete(format!("vms/{vm_id}")),
                    Op::Put(
                        format!("reserved/{}", placed.node),
                        json(&Reserved {
                            memory_mib: reserved.saturating_sub(placed.memory_mib),
                        }),
                    ),
                ],
            )
            .await?;
        if ok {
            return Ok(());
        }
    }
    Err(ClusterError::Unavailable(format!(
        "release of {vm_id} lost {ATTEMPTS} transactions in a row"
    )))
}

/// `Cluster::move_placement`.
pub async fn move_placement(
    cluster: &Cluster,
    vm_id: &str,
    from: &str,
    to: &str,
    memory_mib: u64,
) -> Result<(), ClusterError> {
    if from == to {
        return Err(ClusterError::PlacementChanged(format!(
            "VM {vm_id} is already on node {to}"
        )));
    }
    for _ in 0..ATTEMPTS {
        let Some(entry) = cluster.etcd.get(&format!("placement/{vm_id}")).await? else {
            return Err(ClusterError::PlacementChanged(format!(
                "VM {vm_id} is not placed on any node any more"
            )));
        };
        let placed: Option<Placed> = serde_json::from_slice(&entry.value).ok();
        let Some(placed) = placed.filter(|p| p.node == from) else {
            return Err(ClusterError::PlacementChanged(format!(
                "VM {vm_id} is no longer placed on node {from}"
            )));
        };
        let all = candidates(cluster).await?;
        let Some(target) = all.iter().find(|c| c.name == to) else {
            return Err(ClusterError::NodeUnavailable(format!(
                "node {to:?} is not an online member of the cluster"
            )));
        };
        if target.free_mib() < memory_mib {
            return Err(ClusterError::NoMemory(format!(
                "Not enough memory: VM {vm_id} needs {memory_mib} MiB but node {to} has {} MiB free",
                target.free_mib()
            )));
        }
        let r = cluster.etcd.get(&format!("reserved/{from}")).await?;
        let (from_reserved, from_rev) = reserved_of(r.as_ref());
        let ok = cluster
            .etcd
            .txn(
                vec![
                    Cond::ModRevision(format!("placement/{vm_id}"), entry.mod_revision),
                    unchanged(from, from_rev),
                    unchanged(to, target.revision),
                ],
                vec![
                    Op::Put(
                        format!("placement/{vm_id}"),
                        json(&Placed {
                            node: to.to_owned(),
                            memory_mib,
                        }),
                    ),
                    Op::Put(
                        format!("reserved/{from}"),
                        json(&Reserved {
                            memory_mib: from_reserved.saturating_sub(placed.memory_mib),
                        }),
                    ),
                    Op::Put(
                        format!("reserved/{to}"),
                        json(&Reserved {
                            memory_mib: target.reserved_mib + memory_mib,
                        }),
                    ),
                ],
            )
            .await?;
        if ok {
            return Ok(());
        }
        cluster.retries.fetch_add(1, Ordering::Relaxed);
    }
    Err(ClusterError::Unavailable(format!(
        "move of {vm_id} lost {ATTEMPTS} transactions in a row"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, memory: u64, reserved: u64) -> Candidate {
        Candidate {
            name: name.into(),
            memory_mib: memory,
            reserved_mib: reserved,
            revision: 0,
        }
    }

    #[test]
    fn spread_takes_the_most_free_and_pack_the_least_that_fits() {
        let all = [c("n1", 1000, 100), c("n2", 1000, 500), c("n3", 1000, 950)];
        assert_eq!(
            choose(&all, 40, Placement::Spread, None, 0).map(|c| c.name.as_str()),
            Some("n1")
        );
        assert_eq!(
            choose(&all, 40, Placement::Pack, None, 0).map(|c| c.name.as_str()),
            Some("n3")
        );
        assert_eq!(
            choose(&all, 60, Placement::Pack, None, 0).map(|c| c.name.as_str()),
            Some("n2")
        );
        assert_eq!(
            choose(&all, 40, Placement::Spread, Some("n3"), 0).map(|c| c.name.as_str()),
            Some("n3")
        );
        assert!(choose(&all, 60, Placement::Spread, Some("n3"), 0).is_none());
        assert!(choose(&all, 901, Placement::Spread, None, 0).is_none());
    }

    #[test]
    fn ties_go_by_name() {
        let all = [c("n2", 1000, 0), c("n1", 1000, 0)];
        assert_eq!(
            choose(&all, 1, Placement::Spread, None, 0).map(|c| c.name.as_str()),
            Some("n1")
        );
        assert_eq!(
            choose(&all, 1, Placement::Pack, None, 0).map(|c| c.name.as_str()),
            Some("n1")
        );
    }

    #[test]
    fn nodes_a_whole_vm_apart_are_not_equally_good() {
        // n2 is one VM fuller: spread never picks it, pack always prefers
        // the fuller ones, whatever the salt; equal nodes share the load.
        let all = [c("n1", 1000, 0), c("n2", 1000, 100), c("n3", 1000, 50)];
        for salt in 0..10 {
            let got = choose(&all, 100, Placement::Spread, None, salt).map(|c| c.name.as_str());
            assert!(matches!(got, Some("n1" | "n3")), "{got:?}");
            let got = choose(&all, 100, Placement::Pack, None, salt).map(|c| c.name.as_str());
            assert!(matches!(got, Some("n2" | "n3")), "{got:?}");
        }
        let equal = [c("n1", 1000, 0), c("n2", 1000, 0)];
        let got = choose(&equal, 1, Placement::Spread, None, 1).map(|c| c.name.as_str());
        assert_eq!(got, Some("n2"));
    }
}
