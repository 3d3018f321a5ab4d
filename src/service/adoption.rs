//! Finding and taking over QEMU processes that vman did not start in this
//! run: at start-up (in parallel, each with a bounded wait, after the API
//! listens), before every launch, and when the observer finds one.
//!
//! The rule: a live process whose command line is a VM's QEMU is never
//! disowned, and its pid file and sockets are never removed while it runs.
//! If it answers on QMP it is adopted (registered like a QEMU vman started).
//! If it does not (stopped with SIGSTOP, hung), the VM is recorded `running`
//! with `last_error` saying adoption is pending; a retry task tries again
//! until it answers or exits, a start is refused, and stop/delete kill it by
//! pid after checking its command line again.

use std::sync::Arc;
use std::time::Duration;

use super::record::Detail;
use super::{Reason, Service, ServiceError};
use crate::model::{Name, VmEvent, VmState};
use crate::operator::vm::{self, AdoptError, Running};
use crate::operator::{leftovers, process};
use crate::sync::LockExt;

/// How long one adoption attempt waits for QMP to answer.
const ADOPT_WAIT: Duration = Duration::from_secs(5);
/// Pause between two adoption attempts of an unresponsive QEMU.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// How long a SIGKILLed QEMU may take to disappear.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// What the pre-launch check found.
pub(crate) enum Found {
    /// No QEMU of this VM runs: a launch may go ahead.
    Nothing,
    /// A QEMU of this VM was running and is now adopted.
    Adopted,
}

impl Service {
    /// The start-up sweep, before the API listens: removes `.partial`
    /// copies left by a crash (no copy can be in progress yet).
    pub fn sweep_leftovers(&self) {
        for p in leftovers::remove_partials(&self.config.storage_path) {
            tracing::info!("removed {} left by an interrupted copy", p.display());
        }
        self.sweep_clone_leftovers();
    }

    /// At start-up, with the API already listening: takes over every QEMU
    /// still running for a VM, all VMs in parallel, each under its lock and
    /// with a bounded wait; marks VMs recorded `running` whose QEMU is gone.
    pub async fn recover(self: &Arc<Self>) -> Result<(), ServiceError> {
        let tasks: Vec<_> = self
            .store
            .list_vms(None)?
            .into_iter()
            .map(|vm| {
                let service = self.clone();
                tokio::spawn(async move { service.recover_vm(&vm.id).await })
            })
            .collect();
        for t in tasks {
            if let Err(e) = t.await {
                tracing::error!("recovery task failed: {e}");
            }
        }
        Ok(())
    }

    async fn recover_vm(self: &Arc<Self>, id: &Name) {
        let _guard = self.lock_vm(id).await;
        // A request may have come first (the API listens already).
        if self.registered(id).is_some() || self.pending_pid(id).is_some() {
            return;
        }
        let Ok(vm) = self.store.get_vm(id) else {
            return;
        };
        let paths = self.paths(id);
        match vm::find(&paths) {
            Some(pid) => {
                if let Err(e) = self.take_over(&vm, pid).await {
                    tracing::error!("vm {id}: cannot record its QEMU pid {pid}: {e}");
                }
            }
            None if vm.state == VmState::Running => {
                let msg = vm::with_console_tail("QEMU was gone when vman started".into(), &paths);
                tracing::warn!("vm {id}: {}", msg.lines().next().unwrap_or(""));
                // No live process has this VM's command line: its files
                // belong to nobody.
                vm::remove_runtime_files(&paths);
                if let Err(e) = self.record(id, VmEvent::Gone, Detail::error(msg)) {
                    tracing::error!("vm {id}: cannot record that its QEMU is gone: {e}");
                }
            }
            None => {}
        }
    }

    /// Adopts `pid`, the live QEMU of `vm` (VM lock held); when it does not
    /// answer in time, records it as pending and starts the retry task.
    async fn take_over(
        self: &Arc<Self>,
        vm: &crate::model::Vm,
        pid: i32,
    ) -> Result<bool, ServiceError> {
        let paths = self.paths(&vm.id);
        match vm::adopt(pid, &paths, self.config.console_max_bytes, ADOPT_WAIT).await {
            Ok(run) => {
                self.commit_adoption(&vm.id, vm.template.ram_mib, run)?;
                Ok(true)
            }
            Err(AdoptError::Gone(_)) => Ok(false),
            Err(e @ AdoptError::NoQmp { .. }) => {
                self.mark_pending(&vm.id, vm.template.ram_mib, pid, &e.to_string())?;
                Ok(false)
            }
        }
    }

    /// Records an adopted QEMU as the VM's (VM lock held).
    fn commit_adoption(
        self: &Arc<Self>,
        id: &Name,
        ram_mib: u64,
        run: Arc<Running>,
    ) -> Result<(), ServiceError> {
        tracing::info!("vm {id}: adopted running QEMU pid {}", run.pid);
        self.set_pending(id, None);
        self.memory.lock_or_recover().insert(id.clone(), ram_mib);
        self.record(id, VmEvent::Adopted, Detail::pid(run.pid))?;
        // Its relay (if it has one) reaches the channel by name again.
        if let Err(e) = self.metadata.open_channel(id, &run.paths) {
            tracing::warn!("vm {id}: {e}");
        }
        self.register(id.clone(), run);
        Ok(())
    }

    /// Records a live QEMU that does not answer on QMP (VM lock held): the
    /// VM is `running`, its files stay, and adoption is retried.
    fn mark_pending(
        self: &Arc<Self>,
        id: &Name,
        ram_mib: u64,
        pid: i32,
        why: &str,
    ) -> Result<(), ServiceError> {
        tracing::warn!("vm {id}: {why}; adoption pending, retried every {RETRY_EVERY:?}");
        self.memory.lock_or_recover().insert(id.clone(), ram_mib);
        let first = self.set_pending(id, Some(pid)) != Some(pid);
        let detail = Detail::pid(pid).with_error(format!(
            "adoption pending: QEMU pid {pid} runs but is unresponsive ({why}); \
             vman retries, and stop or delete end it"
        ));
        self.record(id, VmEvent::AdoptionPending, detail)?;
        if first {
            let service = self.clone();
            let id = id.clone();
            tokio::spawn(async move { service.retry_adoption(id, pid).await });
        }
        Ok(())
    }

    /// Sets (or clears) the pending pid of a VM; returns the previous one.
    fn set_pending(&self, id: &Name, pid: Option<i32>) -> Option<i32> {
        let mut map = self.pending.lock_or_recover();
        match pid {
            Some(pid) => map.insert(id.clone(), pid),
            None => map.remove(id),
        }
    }

    /// The pid of the VM's unresponsive QEMU, while it still runs.
    pub(crate) fn pending_pid(&self, id: &Name) -> Option<i32> {
        let pid = *self.pending.lock_or_recover().get(id)?;
        let paths = self.paths(id);
        process::is_our_qemu(pid, &paths.pid, &paths.qmp).then_some(pid)
    }

    /// VMs whose QEMU runs but has not been adopted yet, with its pid.
    pub(crate) fn pending_vms(&self) -> Vec<(Name, i32)> {
        let mut v: Vec<_> = self
            .pending
            .lock_or_recover()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        v.sort();
        v
    }

    /// Tries again to adopt `pid` until it answers, exits, or is no longer
    /// this VM's pending QEMU (stopped, deleted).
    async fn retry_adoption(self: Arc<Self>, id: Name, pid: i32) {
        loop {
            tokio::time::sleep(RETRY_EVERY).await;
            if self.pending.lock_or_recover().get(&id) != Some(&pid) {
                return;
            }
            let paths = self.paths(&id);
            // The attempt runs without the lock, so stop/delete are not held up.
            let attempt = vm::adopt(pid, &paths, self.config.console_max_bytes, ADOPT_WAIT).await;
            let _guard = self.lock_vm(&id).await;
            if self.pending.lock_or_recover().get(&id) != Some(&pid) {
                return; // stopped or deleted meanwhile; `attempt` is dropped
            }
            let ram = self
                .store
                .get_vm(&id)
                .map(|v| v.template.ram_mib)
                .unwrap_or(0);
            match attempt {
                Ok(run) if !run.has_exited() => {
                    match self.commit_adoption(&id, ram, run.clone()) {
                        Ok(()) => {
                            if let Err(e) = self.reconcile_vm_disks(&id, &run).await {
                                tracing::warn!(
                                    "vm {id}: cannot check its data disks with QEMU: {e}"
                                );
                            }
                        }
                        Err(e) => tracing::error!("vm {id}: cannot record its adoption: {e}"),
                    }
                    return;
                }
                Err(AdoptError::NoQmp { .. }) => continue,
                Ok(_) | Err(AdoptError::Gone(_)) => {
                    self.forget_pending(&id);
                    let gone =
                        Detail::error(format!("QEMU pid {pid} exited before vman could adopt it"));
                    if let Err(e) = self.record(&id, VmEvent::Gone, gone) {
                        tracing::error!("vm {id}: cannot record that its QEMU is gone: {e}");
                    }
                    tracing::warn!("vm {id}: QEMU pid {pid} exited before it was adopted");
                    return;
                }
            }
        }
    }

    /// Drops the pending record of a VM whose QEMU is gone, with its files.
    fn forget_pending(&self, id: &Name) {
        self.set_pending(id, None);
        self.release_memory(id);
        let paths = self.paths(id);
        if vm::find(&paths).is_none() {
            vm::remove_runtime_files(&paths);
        }
    }

    /// Before a launch (VM lock held): a QEMU of this VM that vman does not
    /// manage (folder deleted under it, pid file lost, start-up not done)
    /// is adopted, or the start is refused; never a second QEMU.
    pub(crate) async fn check_before_launch(
        self: &Arc<Self>,
        vm: &crate::model::Vm,
    ) -> Result<Found, ServiceError> {
        if let Some(pid) = self.pending_pid(&vm.id) {
            return Err(unresponsive(pid));
        }
        let Some(pid) = vm::find(&self.paths(&vm.id)) else {
            return Ok(Found::Nothing);
        };
        if self.take_over(vm, pid).await? {
            return Ok(Found::Adopted);
        }
        match self.pending_pid(&vm.id) {
            Some(pid) => Err(unresponsive(pid)),
            None => Ok(Found::Nothing), // it exited meanwhile
        }
    }

    /// Kills (VM lock held) a QEMU of this VM that vman does not manage:
    /// the pending one, or one found by its command line. Returns its pid;
    /// refuses when it would not die.
    pub(crate) async fn kill_unmanaged(&self, id: &Name) -> Result<Option<i32>, ServiceError> {
        if self.live(id).is_some() {
            return Ok(None); // managed: stopped through its `Running`
        }
        let paths = self.paths(id);
        let Some(pid) = self.pending_pid(id).or_else(|| vm::find(&paths)) else {
            self.forget_pending(id);
            return Ok(None);
        };
        tracing::warn!("vm {id}: killing its unresponsive or unmanaged QEMU pid {pid}");
        if !process::kill_vm_qemu(pid, &paths.pid, &paths.qmp, KILL_WAIT).await {
            return Err(Reason::Unkillable.refuse(format!(
                "QEMU pid {pid} of this VM did not exit after SIGKILL; try again"
            )));
        }
        self.forget_pending(id);
        Ok(Some(pid))
    }

    /// Used by the observer (VM lock held): a VM recorded `running` without
    /// a registered QEMU whose QEMU does run is adopted or made pending, not
    /// marked `error`. True when such a QEMU was found.
    pub(crate) async fn adopt_found(self: &Arc<Self>, vm: &crate::model::Vm) -> bool {
        if self.pending_pid(&vm.id).is_some() {
            return true;
        }
        let Some(pid) = vm::find(&self.paths(&vm.id)) else {
            return false;
        };
        if let Err(e) = self.take_over(vm, pid).await {
            tracing::error!("vm {}: cannot record its QEMU pid {pid}: {e}", vm.id);
        }
        true
    }
}

fn unresponsive(pid: i32) -> ServiceError {
    Reason::AdoptionPending.refuse(format!(
        "VM is already running: its QEMU (pid {pid}) does not answer on QMP yet (adoption \
         pending); stop or delete the VM to end it"
    ))
}
