//! The rules of a VM's network: the mode at creation (default
//! `VMAN_NETWORK_MODE`; `bridge` only as root), the guest-22 forward every
//! user-mode VM gets, port forwards (host port free on the host and in the
//! database; applied at once on a running slirp VM, at the next start on
//! passt), and the NIC each start gets (`prepare_network`, before QEMU)
//! and what goes after QEMU (`teardown_network`: passt, the TAP, the
//! local IP). The bridge itself lives in `bridge.rs`; this file calls it.

use std::net::IpAddr;
use std::sync::Arc;

use serde_json::json;

use super::coherence::Issue;
use super::{missing, Reason, Service, ServiceError};
use crate::model::{mac_for, Name, NetworkMode, PortForward, Protocol, UserNet, Vm, SSH_PORT};
use crate::operator::nic::{self, Nic, NicBackend};
use crate::operator::{guard, passt};
use crate::store::{PortInsert, StoreError};
use crate::sync::LockExt;

/// Whether a forward change reached the running VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// QEMU has it now (running slirp VM).
    Now,
    /// It takes effect at the VM's next start (stopped VM, or passt).
    NextStart,
}

/// A forward to add, validated.
#[derive(Debug, Clone)]
pub struct AddPort {
    pub guest_port: u16,
    pub host_port: Option<u16>,
    pub protocol: Protocol,
}

/// Serialises making and removing the guard table with the check that no
/// VM runs or starts (a start reserves its memory before it makes the
/// table, so a removal never slips between a start's table and its QEMU).
static GUARD_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How many ephemeral picks vman tries before it gives up allocating.
const ALLOCATION_TRIES: usize = 32;

impl Service {
    /// The mode and first forwards of a VM being created (nothing is
    /// recorded yet). `bridge` is refused unless the bridge can work.
    pub(crate) async fn network_for_new(
        &self,
        requested: Option<NetworkMode>,
    ) -> Result<(NetworkMode, Vec<PortForward>), ServiceError> {
        let mode = requested.unwrap_or(self.config.network_mode);
        match mode {
            NetworkMode::None => Ok((mode, Vec::new())),
            NetworkMode::Bridge => {
                self.bridge_available()?;
                Ok((mode, Vec::new()))
            }
            NetworkMode::User => {
                let port = self.allocate_port(Protocol::Tcp).await?;
                Ok((
                    mode,
                    vec![PortForward {
                        host_port: port,
                        guest_port: SSH_PORT,
                        protocol: Protocol::Tcp,
                        host_address: self.config.forward_address.to_string(),
                    }],
                ))
            }
        }
    }

    /// Refuses `bridge` when this host cannot run it (not root, a tool
    /// missing): `network_unavailable`, a 400 at creation, not a failed
    /// start (`bridge.rs` probes the host once).
    fn bridge_available(&self) -> Result<(), ServiceError> {
        self.check_bridge_support()
    }

    /// A host port free on `VMAN_FORWARD_ADDRESS` and in no VM's forwards.
    async fn allocate_port(&self, protocol: Protocol) -> Result<u16, ServiceError> {
        let addr = self.config.forward_address;
        let taken = self.store.taken_ports()?;
        super::blocking::blocking("port allocation", move || {
            for _ in 0..ALLOCATION_TRIES {
                let port = nic::free_port(addr, protocol).map_err(|e| {
                    Reason::NetworkFailed.refuse(format!(
                        "cannot find a free port on {addr} (VMAN_FORWARD_ADDRESS): {e}"
                    ))
                })?;
                if !taken.contains(&(port, protocol)) {
                    return Ok(port);
                }
            }
            Err(Reason::PortInUse.refuse(format!(
                "no free host port found on {addr} after {ALLOCATION_TRIES} tries"
            )))
        })
        .await?
    }

    /// The VM's forwards.
    pub fn list_ports(&self, id: &Name) -> Result<Vec<PortForward>, ServiceError> {
        self.store.list_ports(id).map_err(missing("VM"))
    }

    fn user_vm(&self, id: &Name) -> Result<Vm, ServiceError> {
        let vm = self.store.get_vm(id).map_err(missing("VM"))?;
        if vm.network_mode != NetworkMode::User {
            return Err(Reason::NotUserNetwork.refuse(format!(
                "VM {id} has network mode {}: port forwards exist only in user mode",
                vm.network_mode
            )));
        }
        Ok(vm)
    }

    /// Adds a forward: recorded, and applied to the running VM when its
    /// backend allows it.
    pub async fn add_port(
        self: &Arc<Self>,
        id: &Name,
        add: AddPort,
    ) -> Result<(PortForward, Applied), ServiceError> {
        let _guard = self.lock_vm(id).await;
        self.user_vm(id)?;
        let addr = self.config.forward_address;
        let host_port = match add.host_port {
            Some(p) => p,
            None => self.allocate_port(add.protocol).await?,
        };
        let port = PortForward {
            host_port,
            guest_port: add.guest_port,
            protocol: add.protocol,
            host_address: addr.to_string(),
        };
        if let Some(owner) = self.port_owner(host_port, add.protocol)? {
            return Err(taken_by(&port, &owner));
        }
        if add.host_port.is_some() && !port_free(addr, host_port, add.protocol).await? {
            return Err(Reason::PortInUse.refuse(format!(
                "Host port {host_port}/{} is in use on {addr}",
                add.protocol
            )));
        }
        match self.store.insert_port(id, &port).map_err(missing("VM"))? {
            PortInsert::Inserted => {}
            PortInsert::Taken(owner) => return Err(taken_by(&port, &owner)),
        }
        let applied = match self.live_slirp(id) {
            Some(run) => {
                let line = format!(
                    "hostfwd_add {} {}",
                    nic::NETDEV_ID,
                    nic::hostfwd_rule(&port)
                );
                if let Err(why) = hmp(&run, &line).await {
                    if let Err(e) = self.store.delete_port(id, host_port, Some(add.protocol)) {
                        tracing::error!("vm {id}: cannot undo the refused forward: {e}");
                    }
                    return Err(Reason::NetworkFailed.refuse(format!(
                        "QEMU refused the forward {}: {why}",
                        nic::hostfwd_rule(&port)
                    )));
                }
                Applied::Now
            }
            None => Applied::NextStart,
        };
        tracing::info!(
            "vm {id}: forward {addr}:{host_port}/{} -> guest {} ({applied:?})",
            add.protocol,
            add.guest_port
        );
        Ok((port, applied))
    }

    /// Removes a forward (`protocol` needed only when the port has both).
    pub async fn delete_port(
        self: &Arc<Self>,
        id: &Name,
        host_port: u16,
        protocol: Option<Protocol>,
    ) -> Result<Applied, ServiceError> {
        let _guard = self.lock_vm(id).await;
        self.user_vm(id)?;
        let port = match self.store.delete_port(id, host_port, protocol) {
            Ok(p) => p,
            Err(StoreError::NotFound) => return Err(ServiceError::NotFound("Port forward")),
            Err(StoreError::AlreadyExists) => {
                return Err(ServiceError::Invalid(crate::model::Invalid::new(
                    "protocol",
                    format!("host port {host_port} has a tcp and a udp forward: say which (?protocol=tcp|udp)"),
                )))
            }
            Err(e) => return Err(e.into()),
        };
        let applied = match self.live_slirp(id) {
            Some(run) => {
                let line = format!("hostfwd_remove {}", nic::hostfwd_remove_arg(&port));
                if let Err(why) = hmp(&run, &line).await {
                    tracing::warn!("vm {id}: QEMU kept the removed forward {host_port}: {why}");
                }
                Applied::Now
            }
            None => Applied::NextStart,
        };
        tracing::info!("vm {id}: forward {host_port}/{} removed", port.protocol);
        Ok(applied)
    }

    fn port_owner(&self, port: u16, protocol: Protocol) -> Result<Option<Name>, ServiceError> {
        let vms = self.store.list_vms(None)?;
        Ok(vms
            .into_iter()
            .find(|v| {
                v.ports
                    .iter()
                    .any(|p| p.host_port == port && p.protocol == protocol)
            })
            .map(|v| v.id))
    }

    /// The running QEMU of a slirp VM (a passt VM has a passt process).
    fn live_slirp(&self, id: &Name) -> Option<Arc<crate::operator::vm::Running>> {
        let run = self.live(id)?;
        passt::find(&self.paths(id).dir).is_none().then_some(run)
    }

    /// The NIC of `vm` for the start about to happen, with whatever it needs
    /// running first (passt). Called by `launch` before QEMU; on failure
    /// nothing is left.
    pub(crate) async fn prepare_network(&self, vm: &Vm) -> Result<Option<Nic>, ServiceError> {
        let mac = mac_for(vm.id.as_str());
        match vm.network_mode {
            NetworkMode::None => Ok(None),
            NetworkMode::Bridge => {
                // The TAP on vman's bridge (the first bridge VM brings up
                // the bridge, its rules and dnsmasq), then the bridge's
                // metadata listener if it has none yet.
                let nic = self.prepare_bridge(vm)?;
                self.ensure_bridge_metadata_listener().await;
                Ok(Some(nic))
            }
            NetworkMode::User => {
                let paths = self.paths(&vm.id);
                let dir = paths.dir.clone();
                let backend = match self.config.user_net {
                    UserNet::Slirp => {
                        // The guest's metadata channel, before QEMU: its
                        // relay connects to it per guest connection.
                        self.metadata.open_channel(&vm.id, &paths).map_err(|e| {
                            Reason::NetworkFailed.refuse(format!("metadata channel: {e}"))
                        })?;
                        // Always restricted: slirp maps every address of its
                        // own network to the host's loopback, so an
                        // unrestricted guest would reach the vman API and
                        // every loopback service (the guard table cannot
                        // tell those connections from QEMU's own loopback
                        // plumbing of the relay). Forwards and the relay work.
                        NicBackend::Slirp {
                            restrict: true,
                            forwards: vm.ports.clone(),
                            metadata: Some(crate::metadata::relay_command(&paths)),
                        }
                    }
                    UserNet::Passt => {
                        // As root, passt runs as its own user, whose
                        // connections the guard keeps off the host.
                        self.guard_in_place().await;
                        // A passt left from an earlier run of this VM goes.
                        passt::stop(&dir).await;
                        let spec = passt::PasstSpec {
                            dir: dir.clone(),
                            forwards: vm.ports.clone(),
                            run_as: self.host.passt_as.as_ref().map(|(user, _)| user.clone()),
                        };
                        let started = passt::spawn(&self.config.passt_binary, &spec)
                            .await
                            .map_err(|e| {
                                Reason::NetworkFailed.refuse(format!("cannot start passt: {e}"))
                            })?;
                        tracing::info!("vm {}: passt pid {} started", vm.id, started.pid);
                        NicBackend::Stream {
                            fd: Arc::new(started.qemu_end),
                        }
                    }
                };
                let ip = self.config.user_net.guest_ip();
                if let Err(e) = self.store.set_local_ip(&vm.id, Some(ip)) {
                    tracing::warn!("vm {}: cannot record its address: {e}", vm.id);
                }
                Ok(Some(Nic { mac, backend }))
            }
        }
    }

    /// After the VM's QEMU is gone (stopped, exited, failed start, deleted):
    /// stops its passt, removes its TAP (the last bridge VM takes the
    /// bridge with it; nothing for VMs not on the bridge), forgets its
    /// user-mode address (a bridge VM keeps its allocated one).
    pub(crate) async fn teardown_network(&self, id: &Name) {
        self.metadata.close_channel(id).await;
        self.teardown_bridge(id);
        let dir = self.paths(id).dir;
        let running = passt::find(&dir);
        if !passt::stop(&dir).await {
            tracing::error!("vm {id}: its passt did not stop");
        } else if let Some(pid) = running {
            tracing::info!("vm {id}: passt pid {pid} stopped");
        }
        let cleared = match self.store.bridge_address_of(id) {
            Ok(Some(_)) => Ok(()),
            _ => self.store.set_local_ip(id, None),
        };
        match cleared {
            Ok(()) | Err(StoreError::NotFound) => {}
            Err(e) => tracing::warn!("vm {id}: cannot clear its address: {e}"),
        }
        self.drop_guard_when_idle().await;
    }

    /// Removes the guard table when no VM of this vman runs or starts: the
    /// table exists only while guests may need it.
    async fn drop_guard_when_idle(&self) {
        if !self.host.guard {
            return;
        }
        let _held = GUARD_LOCK.lock().await;
        let idle = self.memory.lock_or_recover().is_empty() && self.pending_vms().is_empty();
        if !idle {
            return;
        }
        let table = self.config.guard_table.clone();
        match super::blocking::blocking("nft guard", move || guard::remove(&table)).await {
            Ok(Ok(())) => tracing::info!(
                "nftables table inet {} removed (no VM runs)",
                self.config.guard_table
            ),
            Ok(Err(e)) => tracing::warn!("cannot remove the nftables guard: {e}"),
            Err(e) => tracing::warn!("cannot remove the nftables guard: {e}"),
        }
    }

    /// True when the nftables guard keeps passt's guests off the host:
    /// re-applied before each passt start (another vman's exit or a flush
    /// may have removed it).
    async fn guard_in_place(&self) -> bool {
        let (Some((_, uid)), true) = (self.host.passt_as.clone(), self.host.guard) else {
            return false;
        };
        let table = self.config.guard_table.clone();
        let done = super::blocking::blocking("nft guard", move || guard::ensure(&table, uid)).await;
        match done {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!("nftables guard unavailable ({e}): passt guests are not kept off the host's addresses");
                false
            }
            Err(e) => {
                tracing::warn!(
                    "nftables guard: {e}: passt guests are not kept off the host's addresses"
                );
                false
            }
        }
    }

    /// At a clean exit: removes the nftables guard unless a VM of this vman
    /// still runs (its QEMU outlives vman and must stay guarded).
    pub async fn network_shutdown(&self) {
        if !self.host.guard {
            return;
        }
        let running = self.running.lock_or_recover().len() + self.pending_vms().len();
        if running > 0 {
            tracing::info!(
                "nftables table inet {} stays: {running} VM(s) keep running",
                self.config.guard_table
            );
            return;
        }
        let table = self.config.guard_table.clone();
        match super::blocking::blocking("nft guard", move || guard::remove(&table)).await {
            Ok(Ok(())) => tracing::info!("nftables table inet {} removed", self.config.guard_table),
            Ok(Err(e)) => tracing::warn!("cannot remove the nftables guard: {e}"),
            Err(e) => tracing::warn!("cannot remove the nftables guard: {e}"),
        }
    }

    /// At start-up, after QEMU adoption: the passt of each adopted VM is
    /// taken over (found by its command line; it serves its QEMU on), and
    /// one whose QEMU is gone is stopped (as the observer does).
    pub async fn recover_network(&self) {
        if let Ok(vms) = self.store.list_vms(Some(crate::model::VmState::Running)) {
            for vm in vms.iter().filter(|v| v.network_mode == NetworkMode::User) {
                if let Some(pid) = passt::find(&self.paths(&vm.id).dir) {
                    tracing::info!("vm {}: adopted its running passt pid {pid}", vm.id);
                }
            }
        }
        for issue in self.network_observations().await {
            tracing::warn!("start-up: {}", issue.details);
        }
    }

    /// The observer's (and start-up's) look at passt processes: one whose
    /// VM has no QEMU (or does not exist) is stopped and reported.
    pub(crate) async fn network_observations(&self) -> Vec<Issue> {
        let prefix = format!("{}/", self.config.vms_dir().to_string_lossy());
        let mut issues = Vec::new();
        for (pid, owner) in passt::passts_under(&prefix) {
            let dir = self.config.vms_dir().join(&owner);
            let qemu = crate::operator::qemu::VmPaths::new(&self.config.vms_dir(), &owner);
            if crate::operator::vm::find(&qemu).is_some() {
                continue;
            }
            let mut issue = Issue::new(
                "orphan_passt",
                owner.as_str(),
                format!("passt pid {pid} runs for VM {owner} but its QEMU is gone"),
            );
            issue.repaired = passt::stop(&dir).await;
            if issue.repaired {
                issue.details.push_str("; stopped");
            }
            tracing::warn!("{}", issue.details);
            issues.push(issue);
        }
        issues
    }
}

fn taken_by(port: &PortForward, owner: &Name) -> ServiceError {
    Reason::PortInUse.refuse(format!(
        "Host port {}/{} is already forwarded to VM {owner}",
        port.host_port, port.protocol
    ))
}

async fn port_free(addr: IpAddr, port: u16, protocol: Protocol) -> Result<bool, ServiceError> {
    super::blocking::blocking("port check", move || nic::port_free(addr, port, protocol)).await
}

/// Runs an HMP command line through QMP; its output is an error text
/// (hostfwd_add/remove print nothing when they succeed).
async fn hmp(run: &crate::operator::vm::Running, line: &str) -> Result<(), String> {
    let out = run
        .qmp
        .execute(
            "human-monitor-command",
            Some(json!({ "command-line": line })),
        )
        .await
        .map_err(|e| e.to_string())?;
    match out.as_str().map(str::trim) {
        None | Some("") => Ok(()),
        Some(text) => Err(text.to_owned()),
    }
}
