//! The rules of the `bridge` network mode: who gets which address (the
//! allocator: one address of `VMAN_SUBNET` per bridge VM, taken at
//! creation, freed at deletion, never the network, gateway or broadcast
//! address), when the host's pieces exist, and `GET /network/config`.
//!
//! Lifetime: the bridge, its nftables tables and its dnsmasq exist exactly
//! while at least one bridge VM runs (or is starting): made by the first
//! `prepare_bridge`, removed by the `teardown_bridge` of the last one. They
//! are not removed when vman exits while bridge VMs run (their QEMUs
//! outlive vman and keep their network); the next vman finds them again
//! (`reconcile_bridge` at start-up) and the observer removes leftovers
//! (TAPs of VMs that do not run, a dnsmasq or tables with no VM) and
//! restarts a dnsmasq that died (`bridge_pass`).
//!
//! One `std::sync::Mutex` (`BridgeHost::ports`) serialises every change of
//! the host's network: the steps are short `ip`/`nft` runs.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use serde::Serialize;

use super::coherence::Issue;
use super::{Reason, Service, ServiceError};
use crate::model::{mac_for, Name, Vm};
use crate::operator::bridge::dnsmasq::Dnsmasq;
use crate::operator::bridge::nft::{self, Port};
use crate::operator::bridge::{link, support, BridgeError, Owner};
use crate::operator::nic::{Nic, NicBackend};
use crate::sync::LockExt;

/// The host side of the bridge mode, held by the service.
pub struct BridgeHost {
    owner: Owner,
    /// Why this host cannot do bridge networking (probed at start-up).
    unsupported: Option<String>,
    /// The VMs attached to the bridge now; empty: no bridge. Shared with
    /// the metadata listener's resolver.
    ports: Arc<std::sync::Mutex<BTreeMap<Name, Port>>>,
    /// The metadata listener on the gateway while the bridge exists (part
    /// B's `TcpChannel`: dropping it stops the listener).
    listener: std::sync::Mutex<Option<Box<dyn Send>>>,
}

impl BridgeHost {
    pub fn probe(storage: &std::path::Path) -> Self {
        Self {
            owner: Owner::for_storage(storage),
            unsupported: support().err(),
            ports: Arc::default(),
            listener: std::sync::Mutex::default(),
        }
    }
}

/// `GET /network/config`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum NetworkConfig {
    /// This host cannot run bridge VMs (vman not root, or tools missing).
    NotConfigured {
        /// `not_configured`.
        status: &'static str,
        /// Why (extension).
        reason: String,
    },
    Bridge(BridgeConfigView),
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct BridgeConfigView {
    /// `active` while bridge VMs run (the bridge exists), else `idle`.
    pub status: &'static str,
    pub vlan_id: Option<u16>,
    pub bridge_name: String,
    pub subnet: String,
    pub gateway: String,
    /// DNS servers handed to guests by DHCP (the gateway when
    /// VMAN_BRIDGE_NAT=1; none otherwise).
    pub dns: Vec<String>,
    /// How many addresses are allocated to VMs.
    pub allocated_ips: u64,
    /// How many addresses are still free.
    pub available_ips: u64,
    /// Which VM has which address (extension).
    pub allocations: Vec<Allocation>,
    /// TCP port of the metadata listener on the gateway.
    pub metadata_port: u16,
    pub nat: bool,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Allocation {
    pub vm_id: String,
    pub ip: String,
}

/// Runs `f` (short `ip`/`nft` runs, up to seconds for dnsmasq to start or
/// stop) without holding up the async workers: `block_in_place` on the
/// server's multi-threaded runtime, inline elsewhere.
fn off_worker<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn failed(e: BridgeError) -> ServiceError {
    let detail = match &e {
        BridgeError::Foreign(_) | BridgeError::ForeignTable(_) => e.to_string(),
        other => format!("cannot set up the VM's bridge network: {other}"),
    };
    Reason::BridgeFailed(e).refuse(detail)
}

impl Service {
    /// Refuses `bridge` on a host that cannot do it (a 400 at creation, not
    /// a failed start).
    pub(crate) fn check_bridge_support(&self) -> Result<(), ServiceError> {
        match &self.bridge.unsupported {
            Some(why) => Err(Reason::NetworkUnavailable.refuse(why.clone())),
            None => Ok(()),
        }
    }

    /// The lowest free guest address of the subnet.
    pub(crate) fn pick_bridge_address(
        &self,
    ) -> impl FnOnce(&std::collections::HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        let subnet = self.config.bridge.subnet;
        move |taken| subnet.guest_addresses().find(|ip| !taken.contains(ip))
    }

    pub(crate) fn subnet_full(&self) -> ServiceError {
        let s = &self.config.bridge;
        Reason::SubnetFull.refuse(format!(
            "No free address left in VMAN_SUBNET {} ({} addresses, all allocated); delete a bridge VM or use a larger subnet",
            s.subnet,
            s.subnet.guest_count()
        ))
    }

    fn dnsmasq(&self) -> Dnsmasq {
        Dnsmasq {
            dir: self.bridge.owner.run_dir(),
            bridge: self.config.bridge.bridge_name.clone(),
            subnet: self.config.bridge.subnet,
            dns: self.config.bridge.bridge_nat,
        }
    }

    /// Makes the bridge ready for `vm` and its TAP; the NIC QEMU gets.
    /// The first bridge VM brings up the bridge, the nftables tables and
    /// dnsmasq. On failure nothing of this VM stays (nor the bridge, when
    /// it was the first).
    pub fn prepare_bridge(&self, vm: &Vm) -> Result<Nic, ServiceError> {
        off_worker(|| self.prepare_bridge_now(vm))
    }

    fn prepare_bridge_now(&self, vm: &Vm) -> Result<Nic, ServiceError> {
        self.check_bridge_support()?;
        let ip = self
            .store
            .bridge_address_of(&vm.id)?
            .ok_or_else(|| ServiceError::Internal(format!("bridge VM {} has no address", vm.id)))?;
        let owner = &self.bridge.owner;
        let cfg = &self.config.bridge;
        let port = Port {
            tap: owner.tap_name(vm.id.as_str()),
            mac: mac_for(vm.id.as_str()),
            ip,
        };
        let mut ports = self.bridge.ports.lock_or_recover();
        let first = ports.is_empty();
        if first {
            if let Err(e) = self.bridge_up(&ports) {
                self.bridge_down();
                return Err(failed(e));
            }
        }
        let user = self.host.run_as.as_ref().map(|r| r.user.as_str());
        let attached = link::add_tap(
            owner,
            &port.tap,
            vm.id.as_str(),
            &cfg.bridge_name,
            user,
            cfg.vlan_id,
        )
        .and_then(|()| {
            ports.insert(vm.id.clone(), port.clone());
            self.bridge_refresh(&ports)
        });
        if let Err(e) = attached {
            ports.remove(&vm.id);
            let _ = link::remove_tap(owner, &port.tap, vm.id.as_str());
            if ports.is_empty() {
                self.bridge_down();
            } else if let Err(e) = self.bridge_refresh(&ports) {
                tracing::warn!("bridge: cannot restore the rules: {e}");
            }
            return Err(failed(e));
        }
        tracing::info!(
            "vm {}: TAP {} on {} ({ip}, {})",
            vm.id,
            port.tap,
            cfg.bridge_name,
            port.mac
        );
        Ok(Nic {
            mac: port.mac,
            backend: NicBackend::Tap { ifname: port.tap },
        })
    }

    /// Removes the VM's TAP, its rules and its lease once its QEMU is gone;
    /// the last one takes the bridge, the tables and dnsmasq with it. Never
    /// fails (a step that fails is logged; the observer tries again).
    pub fn teardown_bridge(&self, id: &Name) {
        if self.bridge.unsupported.is_none() {
            off_worker(|| self.teardown_bridge_now(id));
        }
    }

    fn teardown_bridge_now(&self, id: &Name) {
        let mut ports = self.bridge.ports.lock_or_recover();
        let owner = &self.bridge.owner;
        let attached = ports.remove(id);
        let tap = attached
            .as_ref()
            .map(|p| p.tap.clone())
            .unwrap_or_else(|| owner.tap_name(id.as_str()));
        match link::remove_tap(owner, &tap, id.as_str()) {
            Ok(true) => tracing::info!("vm {id}: TAP {tap} removed"),
            Ok(false) => {}
            Err(e) => tracing::warn!("vm {id}: cannot remove TAP {tap}: {e}"),
        }
        if attached.is_none() {
            // Not on the bridge (another mode, or never started): the
            // bridge of the other VMs is not this VM's business.
            return;
        }
        if ports.is_empty() {
            self.bridge_down();
        } else if let Err(e) = self.bridge_refresh(&ports) {
            tracing::warn!("bridge: cannot update rules and leases: {e}");
        }
    }

    /// Starts the bridge's metadata listener (gateway:VMAN_METADATA_PORT,
    /// where the nftables DNAT sends guests' 169.254.169.254:80) when the
    /// bridge is up without one: after `prepare_bridge` and after
    /// `reconcile_bridge`. A failure is logged: the guests still boot, they
    /// just get no metadata (and the next bridge start tries again).
    pub async fn ensure_bridge_metadata_listener(&self) {
        if !self.bridge_needs_metadata_listener() {
            return;
        }
        let addr = self.bridge_metadata_addr();
        match self.metadata.serve_tcp(addr, self.bridge_resolver()).await {
            Ok(channel) => {
                tracing::info!("bridge metadata listener on {addr}");
                self.keep_bridge_metadata_listener(Box::new(channel));
            }
            Err(e) => tracing::error!("bridge metadata listener on {addr}: {e}"),
        }
    }

    /// The bridge VM whose address is `ip` (the metadata listener's
    /// identity: anti-spoofing rules pin each TAP to its VM's MAC and
    /// address, so a source address names one VM).
    pub fn bridge_vm_at(&self, ip: IpAddr) -> Option<Name> {
        (self.bridge_resolver())(ip)
    }

    /// `bridge_vm_at` as a closure that outlives `&self`: the resolver of
    /// part B's `Metadata::serve_tcp(addr, resolver)`.
    pub fn bridge_resolver(&self) -> impl Fn(IpAddr) -> Option<Name> + Send + Sync + 'static {
        let ports = self.bridge.ports.clone();
        move |ip| {
            let IpAddr::V4(ip) = ip else { return None };
            ports
                .lock_or_recover()
                .iter()
                .find(|(_, p)| p.ip == ip)
                .map(|(id, _)| id.clone())
        }
    }

    /// Where the metadata listener of the bridge listens: the gateway and
    /// `VMAN_METADATA_PORT` (guests reach it as 169.254.169.254:80).
    pub fn bridge_metadata_addr(&self) -> SocketAddr {
        let cfg = &self.config.bridge;
        SocketAddr::from((cfg.subnet.gateway(), cfg.metadata_port))
    }

    /// True when the bridge exists and has no metadata listener yet. The
    /// caller (`prepare_network`, after `prepare_bridge`; and after
    /// `reconcile_bridge`) then starts one with `Metadata::serve_tcp(
    /// bridge_metadata_addr(), bridge_resolver())` and hands its handle to
    /// `keep_bridge_metadata_listener`.
    pub fn bridge_needs_metadata_listener(&self) -> bool {
        !self.bridge.ports.lock_or_recover().is_empty()
            && self.bridge.listener.lock_or_recover().is_none()
    }

    /// Keeps the listener's handle until the bridge goes (then it is
    /// dropped, which stops it); dropped at once if the bridge went
    /// meanwhile.
    pub fn keep_bridge_metadata_listener(&self, handle: Box<dyn Send>) {
        let ports = self.bridge.ports.lock_or_recover();
        if !ports.is_empty() {
            *self.bridge.listener.lock_or_recover() = Some(handle);
        }
    }

    /// Bridge, address, nftables tables, dnsmasq (started, or the running
    /// one of an earlier vman kept).
    fn bridge_up(&self, ports: &BTreeMap<Name, Port>) -> Result<(), BridgeError> {
        let cfg = &self.config.bridge;
        // Nothing is made when the tables are another vman's.
        nft::check_ours(&self.bridge.owner.mark())?;
        link::ensure_bridge(
            &self.bridge.owner,
            &cfg.bridge_name,
            cfg.subnet.gateway(),
            cfg.subnet.prefix(),
            cfg.vlan_id,
        )?;
        if cfg.bridge_nat {
            if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
                tracing::warn!("VMAN_BRIDGE_NAT=1 but IPv4 forwarding cannot be turned on: {e}");
            }
        }
        self.bridge_refresh(ports)?;
        let dnsmasq = self.dnsmasq();
        match dnsmasq.running() {
            Some(pid) => tracing::info!("dnsmasq of {} runs (pid {pid}); kept", cfg.bridge_name),
            None => {
                let pid = dnsmasq.start()?;
                tracing::info!("dnsmasq of {} started (pid {pid})", cfg.bridge_name);
            }
        }
        // The metadata listener is async (part B's `serve_tcp`): the caller
        // starts it (`bridge_needs_metadata_listener`).
        Ok(())
    }

    /// Rules and leases for the attached VMs.
    fn bridge_refresh(&self, ports: &BTreeMap<Name, Port>) -> Result<(), BridgeError> {
        let cfg = &self.config.bridge;
        let list: Vec<Port> = ports.values().cloned().collect();
        nft::apply(&nft::Rules {
            mark: &self.bridge.owner.mark(),
            bridge: &cfg.bridge_name,
            subnet: cfg.subnet,
            metadata_port: cfg.metadata_port,
            nat: cfg.bridge_nat,
            ports: &list,
        })?;
        let dnsmasq = self.dnsmasq();
        let leases: Vec<(String, Ipv4Addr)> = list.iter().map(|p| (p.mac.clone(), p.ip)).collect();
        dnsmasq.write_hosts(&leases)?;
        if dnsmasq.running().is_some() {
            dnsmasq.reload()?;
        }
        Ok(())
    }

    /// Everything of the bridge this vman made: dnsmasq, tables, bridge,
    /// runtime folder. Steps that fail are logged.
    fn bridge_down(&self) {
        let cfg = &self.config.bridge;
        drop(self.bridge.listener.lock_or_recover().take());
        let dnsmasq = self.dnsmasq();
        if dnsmasq.stop() {
            tracing::info!("dnsmasq of {} stopped", cfg.bridge_name);
        }
        if let Err(e) = nft::remove(&self.bridge.owner.mark()) {
            tracing::warn!("cannot remove the nftables tables {}: {e}", nft::TABLE);
        }
        if let Err(e) = link::remove_bridge(&self.bridge.owner, &cfg.bridge_name) {
            tracing::warn!("cannot remove bridge {}: {e}", cfg.bridge_name);
        }
        let dir = self.bridge.owner.run_dir();
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot remove {}: {e}", dir.display());
            }
        }
    }

    /// Something of this vman's bridge exists (with no bridge VM): its
    /// dnsmasq, its bridge, its runtime folder or its nftables tables.
    fn bridge_leftovers(&self) -> bool {
        let owner = &self.bridge.owner;
        let cfg = &self.config.bridge;
        self.dnsmasq().running().is_some()
            || owner.run_dir().exists()
            || link::find(&cfg.bridge_name)
                .ok()
                .flatten()
                .is_some_and(|l| l.ifalias.as_deref() == Some(&owner.bridge_alias()))
            || nft::has_tables(&owner.mark())
    }

    /// At start-up, after adoption: TAPs of running bridge VMs are kept
    /// (and the bridge, tables and dnsmasq with them, made again where
    /// missing); every other piece of an earlier run is removed.
    pub async fn reconcile_bridge(&self) {
        if self.bridge.unsupported.is_none() {
            off_worker(|| self.reconcile_bridge_now());
        }
    }

    fn reconcile_bridge_now(&self) {
        let addresses: BTreeMap<Name, Ipv4Addr> = match self.store.bridge_addresses() {
            Ok(a) => a.into_iter().collect(),
            Err(e) => {
                tracing::warn!("bridge reconciliation: {e}");
                return;
            }
        };
        let owner = &self.bridge.owner;
        let taps = match link::owned_taps(owner) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("bridge reconciliation: {e}");
                return;
            }
        };
        let mut ports = self.bridge.ports.lock_or_recover();
        for (tap, vm) in taps {
            let kept = Name::parse("vm", &vm).ok().and_then(|id| {
                let ip = *addresses.get(&id)?;
                self.is_live(&id).then_some((id, ip))
            });
            match kept {
                Some((id, ip)) if !ports.contains_key(&id) => {
                    tracing::info!("vm {id}: TAP {tap} of a running VM kept");
                    ports.insert(
                        id.clone(),
                        Port {
                            tap,
                            mac: mac_for(id.as_str()),
                            ip,
                        },
                    );
                }
                _ => match link::remove_tap(owner, &tap, &vm) {
                    Ok(_) => tracing::info!("TAP {tap} of VM {vm} (not running) removed"),
                    Err(e) => tracing::warn!("cannot remove TAP {tap}: {e}"),
                },
            }
        }
        if ports.is_empty() {
            if self.bridge_leftovers() {
                tracing::info!("bridge: removing what an earlier run left (no bridge VM runs)");
                self.bridge_down();
            }
        } else {
            let cfg = &self.config.bridge;
            let up = self.bridge_up(&ports).and_then(|()| {
                ports
                    .values()
                    .try_for_each(|p| link::attach(&p.tap, &cfg.bridge_name))
            });
            if let Err(e) = up {
                tracing::error!(
                    "bridge {}: cannot restore it for running VMs: {e}",
                    cfg.bridge_name
                );
            }
        }
    }

    /// The observer's share: leftovers removed, a dead dnsmasq restarted.
    pub(crate) fn bridge_pass(&self) -> Vec<Issue> {
        if self.bridge.unsupported.is_some() {
            return Vec::new();
        }
        off_worker(|| self.bridge_pass_now())
    }

    fn bridge_pass_now(&self) -> Vec<Issue> {
        let mut issues = Vec::new();
        let owner = &self.bridge.owner;
        let mut ports = self.bridge.ports.lock_or_recover();
        if let Ok(taps) = link::owned_taps(owner) {
            for (tap, vm) in taps {
                let id = Name::parse("vm", &vm).ok();
                let ours = id.as_ref().is_some_and(|id| ports.contains_key(id));
                // A QEMU adopted late (it did not answer at start-up) keeps
                // its TAP, now with its rules.
                let late = id.filter(|id| !ours && self.is_live(id)).and_then(|id| {
                    let ip = self.store.bridge_address_of(&id).ok().flatten()?;
                    Some((id, ip))
                });
                if let Some((id, ip)) = late {
                    let first = ports.is_empty();
                    ports.insert(
                        id.clone(),
                        Port {
                            tap: tap.clone(),
                            mac: mac_for(id.as_str()),
                            ip,
                        },
                    );
                    let done = if first {
                        self.bridge_up(&ports)
                    } else {
                        self.bridge_refresh(&ports)
                    };
                    let done =
                        done.and_then(|()| link::attach(&tap, &self.config.bridge.bridge_name));
                    let mut issue = Issue::new(
                        "bridge_adopted",
                        id.as_str(),
                        format!("TAP {tap} of a running VM taken over"),
                    );
                    match done {
                        Ok(()) => issue.repaired = true,
                        Err(e) => issue.details.push_str(&format!("; {e}")),
                    }
                    issues.push(issue);
                    continue;
                }
                if !ours {
                    let mut issue = Issue::new(
                        "bridge_leftover",
                        vm.as_str(),
                        format!("TAP {tap} of a VM that does not run"),
                    );
                    issue.repaired = link::remove_tap(owner, &tap, &vm).is_ok();
                    issues.push(issue);
                }
            }
        }
        let dnsmasq = self.dnsmasq();
        let cfg = &self.config.bridge;
        if ports.is_empty() {
            if self.bridge_leftovers() {
                let mut issue = Issue::new(
                    "bridge_leftover",
                    cfg.bridge_name.as_str(),
                    "bridge, dnsmasq or nftables tables with no bridge VM running",
                );
                self.bridge_down();
                issue.repaired = true;
                issues.push(issue);
            }
        } else if dnsmasq.running().is_none() {
            let mut issue = Issue::new(
                "dnsmasq_gone",
                cfg.bridge_name.as_str(),
                "the bridge's dnsmasq is not running",
            );
            match dnsmasq.start() {
                Ok(pid) => {
                    issue.repaired = true;
                    issue.details.push_str(&format!("; restarted (pid {pid})"));
                    tracing::warn!(
                        "dnsmasq of {} had died; restarted (pid {pid})",
                        cfg.bridge_name
                    );
                }
                Err(e) => issue.details.push_str(&format!("; cannot restart it: {e}")),
            }
            issues.push(issue);
        }
        issues
    }

    /// `GET /network/config`.
    pub fn network_config(&self) -> Result<NetworkConfig, ServiceError> {
        if let Some(why) = &self.bridge.unsupported {
            return Ok(NetworkConfig::NotConfigured {
                status: "not_configured",
                reason: why.clone(),
            });
        }
        let cfg = &self.config.bridge;
        let allocations = self.store.bridge_addresses()?;
        let allocated = allocations
            .iter()
            .filter(|(_, ip)| cfg.subnet.contains(*ip))
            .count() as u64;
        let active = !self.bridge.ports.lock_or_recover().is_empty();
        Ok(NetworkConfig::Bridge(BridgeConfigView {
            status: if active { "active" } else { "idle" },
            vlan_id: cfg.vlan_id,
            bridge_name: cfg.bridge_name.clone(),
            subnet: cfg.subnet.to_string(),
            gateway: cfg.subnet.gateway().to_string(),
            dns: if cfg.bridge_nat {
                vec![cfg.subnet.gateway().to_string()]
            } else {
                Vec::new()
            },
            allocated_ips: allocated,
            available_ips: cfg.subnet.guest_count().saturating_sub(allocated),
            allocations: allocations
                .into_iter()
                .map(|(id, ip)| Allocation {
                    vm_id: id.to_string(),
                    ip: ip.to_string(),
                })
                .collect(),
            metadata_port: cfg.metadata_port,
            nat: cfg.bridge_nat,
        }))
    }
}
