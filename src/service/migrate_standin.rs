//! Tests only, until the etcd core is merged: a `PlacementCommit` over one
//! JSON file in a folder the nodes share (`VMAN_CLUSTER_STANDIN`), changed
//! under an exclusive `flock` so that a placement move is all or nothing
//! like the etcd transaction it stands in for. Node records (name, URL,
//! memory capacity), reservations by node and placements by VM. A VM
//! without a placement entry was never moved: `placement` answers `None`
//! and `move_placement` takes it as placed on `from`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::blocking::blocking;
use super::migrate::{BoxFuture, NodeView, PlacementCommit, PlacementError};
use crate::model::Name;

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    nodes: BTreeMap<String, NodeRecord>,
    reserved: BTreeMap<String, u64>,
    placement: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeRecord {
    url: String,
    memory_mib: u64,
}

pub struct StandIn {
    file: PathBuf,
    node: String,
}

fn unavailable(e: impl std::fmt::Display) -> PlacementError {
    PlacementError::Unavailable(e.to_string())
}

/// Runs `f` on the state under the lock; writes it back when `f` says so.
fn with_state<T>(
    path: &Path,
    f: impl FnOnce(&mut State) -> Result<(T, bool), PlacementError>,
) -> Result<T, PlacementError> {
    let mut file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(unavailable)?;
    // SAFETY: a valid open descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(unavailable(std::io::Error::last_os_error()));
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(unavailable)?;
    let mut state: State = if text.trim().is_empty() {
        State::default()
    } else {
        serde_json::from_str(&text).map_err(unavailable)?
    };
    let (out, write) = f(&mut state)?;
    if write {
        let text = serde_json::to_string_pretty(&state).map_err(unavailable)?;
        file.set_len(0).map_err(unavailable)?;
        file.rewind().map_err(unavailable)?;
        file.write_all(text.as_bytes()).map_err(unavailable)?;
        file.sync_all().map_err(unavailable)?;
    }
    Ok(out)
}

impl StandIn {
    /// Registers this node (`url`, `memory_mib` capacity) in `dir`.
    pub fn register(dir: &Path, node: &str, url: &str, memory_mib: u64) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let file = dir.join("cluster.json");
        let record = NodeRecord {
            url: url.to_owned(),
            memory_mib,
        };
        with_state(&file, |s| {
            s.nodes.insert(node.to_owned(), record);
            Ok(((), true))
        })
        .map_err(|e| e.to_string())?;
        Ok(Self {
            file,
            node: node.to_owned(),
        })
    }
}

impl PlacementCommit for StandIn {
    fn local_node(&self) -> &str {
        &self.node
    }

    fn node<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<NodeView>, PlacementError>> {
        let (file, name) = (self.file.clone(), name.to_owned());
        Box::pin(async move {
            blocking("stand-in read", move || {
                with_state(&file, |s| {
                    let view = s.nodes.get(&name).map(|n| NodeView {
                        name: name.clone(),
                        url: n.url.clone(),
                        free_memory_mib: n
                            .memory_mib
                            .saturating_sub(s.reserved.get(&name).copied().unwrap_or(0)),
                    });
                    Ok((view, false))
                })
            })
            .await
            .map_err(unavailable)?
        })
    }

    fn placement<'a>(
        &'a self,
        vm: &'a Name,
    ) -> BoxFuture<'a, Result<Option<String>, PlacementError>> {
        let (file, vm) = (self.file.clone(), vm.to_string());
        Box::pin(async move {
            blocking("stand-in read", move || {
                with_state(&file, |s| Ok((s.placement.get(&vm).cloned(), false)))
            })
            .await
            .map_err(unavailable)?
        })
    }

    fn move_placement<'a>(
        &'a self,
        vm: &'a Name,
        from: &'a str,
        to: &'a str,
        memory_mib: u64,
    ) -> BoxFuture<'a, Result<(), PlacementError>> {
        let file = self.file.clone();
        let (vm, from, to) = (vm.to_string(), from.to_owned(), to.to_owned());
        Box::pin(async move {
            blocking("stand-in txn", move || {
                with_state(&file, |s| {
                    let now = s
                        .placement
                        .get(&vm)
                        .cloned()
                        .unwrap_or_else(|| from.clone());
                    if now != from {
                        return Err(PlacementError::Conflict(Some(now)));
                    }
                    let capacity = s.nodes.get(&to).map(|n| n.memory_mib).unwrap_or(0);
                    let used = s.reserved.get(&to).copied().unwrap_or(0);
                    let free = capacity.saturating_sub(used);
                    if free < memory_mib {
                        return Err(PlacementError::NoMemory {
                            node: to,
                            free,
                            need: memory_mib,
                        });
                    }
                    s.reserved.insert(to.clone(), used + memory_mib);
                    let back = s.reserved.get(&from).copied().unwrap_or(0);
                    s.reserved.insert(from, back.saturating_sub(memory_mib));
                    s.placement.insert(vm, to);
                    Ok(((), true))
                })
            })
            .await
            .map_err(unavailable)?
        })
    }
}

impl super::Service {
    /// In cluster mode with `VMAN_CLUSTER_STANDIN`: registers this node in
    /// the stand-in and wires it (called once the API listens on `port`; an
    /// advertised URL ending in `:0` gets that port, for tests on port 0).
    pub fn wire_cluster_standin(&self, port: u16) {
        let c = &self.config.cluster;
        let (true, Some(dir), Some(node), Some(url)) = (
            c.enabled,
            c.standin.as_deref(),
            c.node_name.as_deref(),
            c.advertise_url.as_deref(),
        ) else {
            return;
        };
        let url = match url.strip_suffix(":0") {
            Some(base) => format!("{base}:{port}"),
            None => url.to_owned(),
        };
        match StandIn::register(dir, node, &url, self.memory_limit_mib()) {
            Ok(s) => {
                tracing::warn!(
                    "cluster node {node} at {url} on the TEST stand-in placement in {} (not etcd)",
                    dir.display()
                );
                self.set_placement(std::sync::Arc::new(s));
            }
            Err(e) => tracing::error!("cannot register in the cluster stand-in: {e}"),
        }
    }
}
