//! The cluster side of cold migration: `Cluster` as the service's
//! `PlacementCommit` (src/service/migrate.rs). Node records and placement
//! are read from etcd directly, never from the watch cache: right after a
//! restart the cache may still be empty, and a source that read "no
//! placement" there would roll back a migration that had committed.

use std::sync::Arc;

use super::{placement, Cluster, ClusterError, Placed};
use crate::model::Name;
use crate::service::migrate::{BoxFuture, NodeView, PlacementCommit, PlacementError};

fn mapped(e: ClusterError) -> PlacementError {
    match e {
        ClusterError::PlacementChanged(detail) => PlacementError::Conflict(Some(detail)),
        ClusterError::NodeUnavailable(detail) => PlacementError::NodeUnavailable(detail),
        // A refusal for memory is definite (nothing changed); only move_placement
        // meets it and says it with the figures.
        ClusterError::NoMemory(detail) => PlacementError::NodeUnavailable(detail),
        ClusterError::Unavailable(detail) => PlacementError::Unavailable(detail),
        ClusterError::AlreadyExists => PlacementError::Conflict(None),
    }
}

/// The etcd-backed placement change migration commits through.
pub struct EtcdPlacement(pub Arc<Cluster>);

impl PlacementCommit for EtcdPlacement {
    fn local_node(&self) -> &str {
        &self.0.node
    }

    fn node<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<NodeView>, PlacementError>> {
        Box::pin(async move {
            let all = placement::candidates(&self.0).await.map_err(mapped)?;
            let Some(c) = all.into_iter().find(|c| c.name == name) else {
                return Ok(None);
            };
            let Some(url) = self.0.node_url(name) else {
                return Err(PlacementError::NodeUnavailable(format!(
                    "node {name} is online but its address is not known here yet; try again"
                )));
            };
            Ok(Some(NodeView {
                free_memory_mib: c.free_mib(),
                name: c.name,
                url,
            }))
        })
    }

    fn placement<'a>(
        &'a self,
        vm: &'a Name,
    ) -> BoxFuture<'a, Result<Option<String>, PlacementError>> {
        Box::pin(async move {
            let entry = self
                .0
                .etcd
                .get(&format!("placement/{vm}"))
                .await
                .map_err(|e| mapped(e.into()))?;
            Ok(entry
                .and_then(|e| serde_json::from_slice::<Placed>(&e.value).ok())
                .map(|p| p.node))
        })
    }

    fn move_placement<'a>(
        &'a self,
        vm: &'a Name,
        from: &'a str,
        to: &'a str,
        memory_mib: u64,
    ) -> BoxFuture<'a, Result<(), PlacementError>> {
        Box::pin(async move {
            match self
                .0
                .move_placement(vm.as_str(), from, to, memory_mib)
                .await
            {
                Ok(()) => Ok(()),
                Err(ClusterError::NoMemory(_)) => {
                    let free = placement::candidates(&self.0)
                        .await
                        .ok()
                        .and_then(|all| all.into_iter().find(|c| c.name == to))
                        .map_or(0, |c| c.free_mib());
                    Err(PlacementError::NoMemory {
                        node: to.to_owned(),
                        free,
                        need: memory_mib,
                    })
                }
                Err(e) => Err(mapped(e)),
            }
        })
    }
}
