//! The watch-fed cache of what etcd holds (nodes, members, reservations,
//! placement, the VMs' published JSON, templates). Reads of the cluster
//! (GET /vms, GET /cluster/nodes, where to forward) answer from it, so
//! they still answer while etcd has no quorum. `follow` loads the whole
//! prefix, then applies the watch's changes; when the watch fails it loads
//! again (catch-up after an etcd outage). Side effects of changes — a
//! node's lease gone (`node_lost`), a template added or removed elsewhere —
//! run outside the lock.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::etcd::{Change, Entry};
use super::{Cluster, NodeRecord, Placed, Reserved};
use crate::sync::LockExt;

#[derive(Debug, Default, Clone)]
pub struct State {
    /// Nodes with a live lease.
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Every node that ever joined, with its last record.
    pub members: BTreeMap<String, NodeRecord>,
    pub reserved: BTreeMap<String, u64>,
    pub placement: BTreeMap<String, Placed>,
    pub vms: BTreeMap<String, serde_json::Value>,
    pub templates: BTreeMap<String, serde_json::Value>,
    /// False until the first full load succeeded.
    pub loaded: bool,
}

/// What a change asks to be done once the lock is released.
enum Effect {
    NodeLost(NodeRecord),
    TemplatePut(serde_json::Value),
    TemplateDeleted(String),
}

impl State {
    fn apply(&mut self, key: &str, value: Option<&[u8]>, effects: &mut Vec<Effect>) {
        let Some((kind, name)) = key.split_once('/') else {
            return;
        };
        match (kind, value) {
            ("nodes", Some(v)) => {
                if let Ok(n) = serde_json::from_slice::<NodeRecord>(v) {
                    self.nodes.insert(name.to_owned(), n);
                }
            }
            ("nodes", None) => {
                if let Some(n) = self.nodes.remove(name) {
                    effects.push(Effect::NodeLost(n));
                }
            }
            ("members", Some(v)) => {
                if let Ok(n) = serde_json::from_slice::<NodeRecord>(v) {
                    self.members.insert(name.to_owned(), n);
                }
            }
            ("members", None) => {
                self.members.remove(name);
            }
            ("reserved", Some(v)) => {
                let r: Reserved = serde_json::from_slice(v).unwrap_or_default();
                self.reserved.insert(name.to_owned(), r.memory_mib);
            }
            ("reserved", None) => {
                self.reserved.remove(name);
            }
            ("placement", Some(v)) => {
                if let Ok(p) = serde_json::from_slice::<Placed>(v) {
                    self.placement.insert(name.to_owned(), p);
                }
            }
            ("placement", None) => {
                self.placement.remove(name);
            }
            ("vms", Some(v)) => {
                if let Ok(j) = serde_json::from_slice(v) {
                    self.vms.insert(name.to_owned(), j);
                }
            }
            ("vms", None) => {
                self.vms.remove(name);
            }
            ("templates", Some(v)) => {
                if let Ok(j) = serde_json::from_slice::<serde_json::Value>(v) {
                    self.templates.insert(name.to_owned(), j.clone());
                    effects.push(Effect::TemplatePut(j));
                }
            }
            ("templates", None) if self.templates.remove(name).is_some() => {
                effects.push(Effect::TemplateDeleted(name.to_owned()));
            }
            _ => {}
        }
    }

    /// Replaces everything with a full load; nodes that were online and
    /// are gone now count as lost.
    fn reload(&mut self, entries: &[Entry], effects: &mut Vec<Effect>) {
        let before = std::mem::take(&mut self.nodes);
        let templates_before = std::mem::take(&mut self.templates);
        *self = State::default();
        for e in entries {
            self.apply(&e.key, Some(&e.value), effects);
        }
        for (name, n) in before {
            if !self.nodes.contains_key(&name) {
                effects.push(Effect::NodeLost(n));
            }
        }
        for name in templates_before.keys() {
            if !self.templates.contains_key(name) {
                effects.push(Effect::TemplateDeleted(name.clone()));
            }
        }
        self.loaded = true;
    }
}

/// Keeps the cache in step with etcd for the life of the node.
pub async fn follow(cluster: Arc<Cluster>) {
    loop {
        let (entries, revision) = match cluster.etcd.range("").await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("cluster cache: cannot load from etcd: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut effects = Vec::new();
        cluster
            .cache
            .lock_or_recover()
            .reload(&entries, &mut effects);
        run_effects(&cluster, effects).await;
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let etcd = cluster.etcd.clone();
        let watch = tokio::spawn(async move { etcd.watch(revision, &tx).await });
        while let Some(changes) = rx.recv().await {
            let mut effects = Vec::new();
            {
                let mut state = cluster.cache.lock_or_recover();
                for c in &changes {
                    match c {
                        Change::Put(e) => state.apply(&e.key, Some(&e.value), &mut effects),
                        Change::Delete(k) => state.apply(k, None, &mut effects),
                    }
                }
            }
            run_effects(&cluster, effects).await;
        }
        match watch.await {
            Ok(Err(e)) => tracing::info!("cluster cache: watch ended ({e}); loading again"),
            Ok(Ok(())) => {}
            Err(e) => tracing::warn!("cluster cache: watch task failed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn run_effects(cluster: &Arc<Cluster>, effects: Vec<Effect>) {
    for effect in effects {
        match effect {
            Effect::NodeLost(n) if n.name != cluster.node => {
                super::node::tell_node_lost(cluster, &n).await;
            }
            Effect::NodeLost(_) => {}
            Effect::TemplatePut(t) => super::node::mirror_template(cluster, &t),
            Effect::TemplateDeleted(name) => super::node::drop_template(cluster, &name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> Vec<u8> {
        serde_json::to_vec(&NodeRecord {
            name: name.into(),
            advertise: "http://127.0.0.1:1".into(),
            cpus: 2,
            memory_mib: 1000,
            heartbeat_at: String::new(),
            version: String::new(),
            lease: 7,
            placement_retries: 0,
        })
        .unwrap()
    }

    #[test]
    fn a_node_key_deleted_is_a_lost_node_once() {
        let mut s = State::default();
        let mut fx = Vec::new();
        s.apply("nodes/n2", Some(&node("n2")), &mut fx);
        s.apply(
            "placement/a",
            Some(br#"{"node":"n2","memory_mib":32}"#),
            &mut fx,
        );
        assert!(fx.is_empty());
        s.apply("nodes/n2", None, &mut fx);
        s.apply("nodes/n2", None, &mut fx);
        assert_eq!(fx.len(), 1);
        assert_eq!(s.placement["a"].node, "n2");
    }

    #[test]
    fn a_reload_without_a_node_loses_it() {
        let mut s = State::default();
        let mut fx = Vec::new();
        s.apply("nodes/n2", Some(&node("n2")), &mut fx);
        s.reload(&[], &mut fx);
        assert!(matches!(fx.as_slice(), [Effect::NodeLost(n)] if n.name == "n2"));
        assert!(s.loaded);
    }
}
