//! Cluster mode (issue 14): the `Cluster` handle a node holds when it runs
//! with `--cluster` — its etcd client, its name and URL, the cluster token,
//! and the watch-fed cache of what etcd holds. Each node keeps its own
//! SQLite for the VMs placed on it (single-host code unchanged); etcd holds
//! nodes (on leases), placement, memory reservations, the VMs' published
//! JSON and templates. Requests about a VM placed elsewhere are forwarded
//! to its owner (`forward.rs`; the HTTP side is `api/cluster.rs`).
//!
//! Keys (under `VMAN_CLUSTER_PREFIX`, default `/vman`):
//! `nodes/<node>` (leased record), `members/<node>` (last record, kept),
//! `placement/<vm>` (`{node, memory_mib}`), `reserved/<node>`
//! (`{memory_mib}`), `vms/<vm>` (the owner's GET /vms/{id} JSON),
//! `templates/<name>`, `events/node_lost/<node>/<lease>`.

pub mod cache;
pub mod etcd;
pub mod forward;
pub mod migration;
pub mod node;
pub mod placement;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use crate::sync::LockExt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{ClusterConfig, Placement};
use crate::service::Service;
pub use etcd::EtcdError;

/// Header of node-to-node requests: the cluster token.
pub const TOKEN_HEADER: &str = "x-vman-cluster-token";

/// Why a cluster operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// etcd has no quorum or cannot be reached: nothing was changed.
    #[error("the cluster cannot take writes now: etcd has no quorum or cannot be reached ({0}); nothing was changed, try again once etcd is back")]
    Unavailable(String),
    /// No node (or not the pinned one) has the memory.
    #[error("{0}")]
    NoMemory(String),
    /// A pinned or target node is not an online member.
    #[error("{0}")]
    NodeUnavailable(String),
    /// The VM id is placed already.
    #[error("VM with this ID already exists")]
    AlreadyExists,
    /// The placement is not what the caller expected (moved or deleted).
    #[error("{0}")]
    PlacementChanged(String),
}

impl From<EtcdError> for ClusterError {
    fn from(e: EtcdError) -> Self {
        Self::Unavailable(e.to_string())
    }
}

/// `nodes/<node>` and `members/<node>`: what a node publishes about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeRecord {
    pub name: String,
    pub advertise: String,
    pub cpus: u64,
    /// Host memory × VMAN_MEMORY_OVERCOMMIT: what placement may reserve.
    pub memory_mib: u64,
    pub heartbeat_at: String,
    pub version: String,
    pub lease: i64,
    /// Placement transactions this node had to retry (conflicts).
    #[serde(default)]
    pub placement_retries: u64,
}

/// `placement/<vm>`: where a VM lives and the memory it holds there.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Placed {
    pub node: String,
    pub memory_mib: u64,
}

/// `reserved/<node>`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
pub struct Reserved {
    pub memory_mib: u64,
}

pub struct Cluster {
    pub(crate) etcd: etcd::Etcd,
    /// This node's name.
    pub node: String,
    /// This node's URL as other nodes reach it.
    pub advertise: String,
    token: String,
    pub(crate) ttl: Duration,
    pub(crate) policy: Placement,
    pub(crate) cache: Mutex<cache::State>,
    pub(crate) http: reqwest::Client,
    pub(crate) service: Arc<Service>,
    /// Placement transactions retried after a conflict (since start).
    pub(crate) retries: AtomicU64,
    /// The lease of this node's record (0: none yet).
    pub(crate) lease: std::sync::atomic::AtomicI64,
}

impl Cluster {
    /// Connects to etcd and starts the heartbeat and the cache's watch.
    /// etcd being unreachable now is not fatal: both retry.
    pub async fn start(
        cfg: &ClusterConfig,
        service: Arc<Service>,
        bound: std::net::SocketAddr,
    ) -> anyhow::Result<Arc<Self>> {
        let etcd = etcd::Etcd::connect(cfg).await?;
        let node = cfg.node_name.clone().unwrap_or_default();
        let advertise = cfg
            .advertise_url
            .clone()
            .unwrap_or_else(|| format!("http://{bound}"))
            .trim_end_matches('/')
            .to_owned();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(600))
            .build()?;
        let cluster = Arc::new(Self {
            etcd,
            node,
            advertise,
            token: cfg.cluster_token.clone().unwrap_or_default(),
            ttl: Duration::from_secs(cfg.node_ttl_secs),
            policy: cfg.placement,
            cache: Mutex::default(),
            http,
            service,
            retries: AtomicU64::new(0),
            lease: std::sync::atomic::AtomicI64::new(0),
        });
        tokio::spawn(node::heartbeat(cluster.clone()));
        tokio::spawn(cache::follow(cluster.clone()));
        tracing::info!(
            "cluster node {} ({}) on etcd {}",
            cluster.node,
            cluster.advertise,
            cfg.etcd_endpoints.join(",")
        );
        Ok(cluster)
    }

    /// True when `given` is the cluster token (constant-time compare).
    /// Every node-to-node route (`/cluster/internal/...`, forwarded
    /// requests) requires it in the `X-Vman-Cluster-Token` header.
    pub fn check_token(&self, given: Option<&str>) -> bool {
        let Some(given) = given else { return false };
        let (a, b) = (given.as_bytes(), self.token.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// The token to send on node-to-node requests.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Answers `Err(Unavailable)` unless etcd has quorum now (a
    /// linearizable read). Writes check this first so that without quorum
    /// nothing is changed anywhere.
    pub async fn check_quorum(&self) -> Result<(), ClusterError> {
        self.etcd.get(&format!("nodes/{}", self.node)).await?;
        Ok(())
    }

    /// The online node `name`'s URL, from the cache.
    pub fn node_url(&self, name: &str) -> Option<String> {
        let state = self.cache.lock_or_recover();
        state.nodes.get(name).map(|n| n.advertise.clone())
    }

    /// Where the VM is placed, from the cache.
    pub fn placement_of(&self, vm_id: &str) -> Option<Placed> {
        self.cache.lock_or_recover().placement.get(vm_id).cloned()
    }

    /// True when `node` holds a live lease (as far as the cache knows).
    pub fn is_online(&self, node: &str) -> bool {
        self.cache.lock_or_recover().nodes.contains_key(node)
    }

    /// Moves a VM's placement from `from` to `to` in one etcd transaction
    /// (cold migration): only if the placement is still `from`; the VM's
    /// `memory_mib` is reserved on `to` (refused when `to` lacks it) and
    /// released on `from`. Retried while only the reservations changed
    /// under it. `PlacementChanged` when the VM is no longer on `from`;
    /// `NodeUnavailable` when `to` is not online; `Unavailable` without
    /// quorum (nothing changed).
    pub async fn move_placement(
        &self,
        vm_id: &str,
        from: &str,
        to: &str,
        memory_mib: u64,
    ) -> Result<(), ClusterError> {
        placement::move_placement(self, vm_id, from, to, memory_mib).await
    }
}
