//! This node in etcd: its record `nodes/<node>` on a lease of
//! `VMAN_NODE_TTL_SECS`, renewed (and the record rewritten with a fresh
//! `heartbeat_at`) every third of it; `members/<node>` keeps the last
//! record after the lease is gone, so a lost node is listed `offline`.
//! Also what a node does about other nodes' changes: `node_lost` told once
//! cluster-wide, templates mirrored into the local store.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::etcd::{Cond, EtcdError, Op};
use super::{Cluster, NodeRecord};
use crate::model::Name;
use crate::service::CreateTemplate;
use crate::service::EventKind;
use crate::sync::LockExt;

/// This node's record as of now.
pub fn record(cluster: &Cluster, lease: i64) -> NodeRecord {
    NodeRecord {
        name: cluster.node.clone(),
        advertise: cluster.advertise.clone(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
        memory_mib: cluster.service.memory_limit_mib(),
        heartbeat_at: crate::model::now(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        lease,
        placement_retries: cluster.retries.load(Ordering::Relaxed),
    }
}

/// One heartbeat: renew the lease (a new one when it expired, e.g. after
/// an etcd outage longer than the TTL) and write the record.
async fn beat(cluster: &Cluster) -> Result<(), EtcdError> {
    let ttl = cluster.ttl.as_secs() as i64;
    let mut lease = cluster.lease.load(Ordering::Relaxed);
    if lease != 0 && cluster.etcd.keep_alive(lease).await? <= 0 {
        tracing::warn!(
            "cluster: lease {lease:x} of node {} expired; taking a new one",
            cluster.node
        );
        lease = 0;
    }
    if lease == 0 {
        lease = cluster.etcd.grant(ttl).await?;
        cluster.lease.store(lease, Ordering::Relaxed);
    }
    let rec = serde_json::to_vec(&record(cluster, lease)).unwrap_or_default();
    let me = &cluster.node;
    cluster
        .etcd
        .txn(
            vec![],
            vec![
                Op::PutLease(format!("nodes/{me}"), rec.clone(), lease),
                Op::Put(format!("members/{me}"), rec),
            ],
        )
        .await?;
    Ok(())
}

/// Heartbeats for the life of the node.
pub async fn heartbeat(cluster: Arc<Cluster>) {
    let interval = cluster.ttl / 3;
    let mut failing = false;
    loop {
        match beat(&cluster).await {
            Ok(()) if failing => {
                tracing::info!("cluster: heartbeat of node {} written again", cluster.node);
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                tracing::warn!("cluster: heartbeat of node {} failed: {e}", cluster.node);
                failing = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(interval).await;
    }
}

/// A node's lease is gone: the first node to create
/// `events/node_lost/<node>/<lease>` tells the `node_lost` event (so it is
/// told once in the cluster, whoever sees it first).
pub async fn tell_node_lost(cluster: &Arc<Cluster>, lost: &NodeRecord) {
    let key = format!("events/node_lost/{}/{:x}", lost.name, lost.lease);
    let body = serde_json::json!({ "by": cluster.node, "at": crate::model::now() });
    let won = cluster
        .etcd
        .txn(
            vec![Cond::Absent(key.clone())],
            vec![Op::Put(key, body.to_string().into_bytes())],
        )
        .await;
    match won {
        Ok(true) => {
            let vms: Vec<String> = cluster
                .cache
                .lock_or_recover()
                .placement
                .iter()
                .filter(|(_, p)| p.node == lost.name)
                .map(|(id, _)| id.clone())
                .collect();
            tracing::warn!(
                "cluster: node {} lost (lease expired); its VMs are unknown: {}",
                lost.name,
                vms.join(", ")
            );
            let detail = serde_json::json!({
                "node": lost.name,
                "last_heartbeat": lost.heartbeat_at,
                "vms": vms,
                "seen_by": cluster.node,
            });
            cluster
                .service
                .emit(EventKind::Node, &lost.name, "node_lost", detail);
        }
        Ok(false) => {}
        Err(e) => tracing::warn!("cluster: cannot record the loss of node {}: {e}", lost.name),
    }
}

/// A template of `templates/<name>` exists in the local store too (VMs
/// created on this node find it).
pub fn mirror_template(cluster: &Cluster, t: &serde_json::Value) {
    let field = |k: &str| t.get(k).and_then(serde_json::Value::as_u64);
    let Some(name) = t
        .get("name")
        .and_then(|n| n.as_str())
        .and_then(|n| Name::parse("name", n).ok())
    else {
        return;
    };
    if cluster.service.get_template(&name).is_ok() {
        return;
    }
    let (Some(cpu_count), Some(ram_mib)) = (field("cpu_count"), field("ram_mib")) else {
        return;
    };
    let input = CreateTemplate {
        name: name.clone(),
        cpu_count: u32::try_from(cpu_count).unwrap_or(1),
        ram_mib,
        disk_size_gb: field("disk_size_gb"),
    };
    if let Err(e) = cluster.service.create_template(input) {
        tracing::warn!("cluster: cannot mirror template {name}: {e}");
    }
}

/// A template deleted through another node goes here too.
pub fn drop_template(cluster: &Cluster, name: &str) {
    if let Ok(name) = Name::parse("name", name) {
        if cluster.service.get_template(&name).is_ok() {
            if let Err(e) = cluster.service.delete_template(&name) {
                tracing::warn!("cluster: cannot drop template {name}: {e}");
            }
        }
    }
}
