//! Starting, stopping, restarting and deleting VMs, and taking over QEMU
//! processes after a vman restart.
//!
//! Who writes a VM's state: only `Service::record` (`record.rs`), with the
//! event that happened: `start` records `Started` (or `Failed` when QEMU
//! would not start); `stop` records `Halted` once the process is gone (or
//! `Killed` for a QEMU vman did not manage); the exit task records
//! `Halted`/`Gone` for an exit nobody asked for; `delete` removes the record
//! before it kills the process (`space.rs`). All of them hold the VM's lock
//! and check that the `Running` they act on is still the registered one;
//! `record` writes only if the state is still the one it read.

use std::sync::Arc;
use std::time::Duration;

use super::record::Detail;
use super::{missing, Reason, Service, ServiceError};
use crate::model::{Name, StopMethod, VmEvent, VmState};
use crate::operator::console;
use crate::operator::qemu::{LaunchSpec, VmPaths};
use crate::operator::vm::{self, with_console_tail, ExitInfo, Running};
use crate::sync::LockExt;

/// What a stop did.
#[derive(Debug, Clone, Copy)]
pub struct StopReport {
    pub method: StopMethod,
    pub elapsed: Duration,
}

impl Service {
    pub(crate) fn paths(&self, id: &Name) -> VmPaths {
        VmPaths::new(&self.config.vms_dir(), id.as_str())
    }

    /// The lock that serialises actions on one VM.
    pub(crate) async fn lock_vm(&self, id: &Name) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock_or_recover();
            locks.entry(id.clone()).or_default().clone()
        };
        lock.lock_owned().await
    }

    pub(crate) fn registered(&self, id: &Name) -> Option<Arc<Running>> {
        self.running.lock_or_recover().get(id).cloned()
    }

    /// The QEMU vman manages for this VM, while it runs (registered and not
    /// exited). Call under the VM lock for an answer that stays true.
    pub(crate) fn live(&self, id: &Name) -> Option<Arc<Running>> {
        self.registered(id).filter(|r| !r.has_exited())
    }

    fn unregister(&self, id: &Name, run: &Arc<Running>) -> bool {
        let mut map = self.running.lock_or_recover();
        match map.get(id) {
            Some(r) if Arc::ptr_eq(r, run) => {
                map.remove(id);
                self.release_memory(id);
                true
            }
            _ => false,
        }
    }

    /// Reserves the VM's memory, or refuses when running VMs would exceed
    /// host memory × `VMAN_MEMORY_OVERCOMMIT`.
    fn reserve_memory(&self, id: &Name, mib: u64) -> Result<(), ServiceError> {
        let limit = self.memory_limit_mib();
        let mut reserved = self.memory.lock_or_recover();
        let used: u64 = reserved.values().sum();
        if self.host.mem_total_mib > 0 && used + mib > limit {
            return Err(Reason::NoMemory.refuse(format!(
                "Not enough memory: VM {id} needs {mib} MiB but {used} MiB of the {limit} MiB \
                 allowed (host {} MiB x VMAN_MEMORY_OVERCOMMIT {}) are used by running VMs",
                self.host.mem_total_mib, self.config.memory_overcommit
            )));
        }
        reserved.insert(id.clone(), mib);
        Ok(())
    }

    pub(super) fn release_memory(&self, id: &Name) {
        self.memory.lock_or_recover().remove(id);
    }

    pub async fn start_vm(self: &Arc<Self>, id: &Name) -> Result<(), ServiceError> {
        let _guard = self.lock_vm(id).await;
        self.start_locked(id).await
    }

    async fn start_locked(self: &Arc<Self>, id: &Name) -> Result<(), ServiceError> {
        let vm = self.store.get_vm(id).map_err(missing("VM"))?;
        if self.live(id).is_some() {
            return Err(Reason::AlreadyRunning(None).refuse("VM is already running"));
        }
        self.migration_allows_start(id).await?;
        // A QEMU of this VM that vman does not manage is adopted or refused.
        if let super::adoption::Found::Adopted = self.check_before_launch(&vm).await? {
            return Ok(());
        }
        if vm.state.next(VmEvent::Started).is_none() {
            return Err(Reason::AlreadyRunning(None).refuse("VM is already running"));
        }
        self.reserve_memory(id, vm.template.ram_mib)?;
        match self.launch(&vm).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.release_memory(id);
                self.teardown_network(id).await;
                let reason = e.to_string();
                tracing::warn!("vm {id}: start failed: {reason}");
                if let Err(w) = self.record(id, VmEvent::Failed, Detail::error(reason)) {
                    tracing::warn!("vm {id}: cannot record the failed start: {w}");
                }
                Err(e)
            }
        }
    }

    async fn launch(self: &Arc<Self>, vm: &crate::model::Vm) -> Result<(), ServiceError> {
        let paths = self.paths(&vm.id);
        let t0 = std::time::Instant::now();
        // Shown on GET /vms/{id} until this start ends.
        let tracked = self.track_provisioning(&vm.id);
        let root = {
            let (config, policy) = (self.config.clone(), self.host.images.clone());
            let vm = vm.clone();
            let paths = paths.clone();
            let progress = tracked.progress.clone();
            tokio::task::spawn_blocking(move || {
                super::rootdisk::choose(&config, &policy, &vm, &paths, &progress)
            })
            .await
            .map_err(|e| ServiceError::Internal(format!("root disk task: {e}")))??
        };
        let hostname = self
            .store
            .get_metadata(&vm.id)
            .ok()
            .and_then(|m| m.hostname)
            .unwrap_or_else(|| vm.id.to_string());
        // Checked and planned only: moved slots are recorded once QEMU runs.
        let boot = self.boot_disks(&vm.id)?;
        let nic = self.prepare_network(vm).await?;
        let spec = LaunchSpec {
            vm_id: vm.id.to_string(),
            hostname,
            paths: paths.clone(),
            cpus: vm.template.cpu_count,
            ram_mib: vm.template.ram_mib,
            accel: self.host.accel,
            root_chain: crate::operator::qemu::DiskFile::chain(&root.chain),
            hotplug_slots: self.config.hotplug_slots,
            sandbox: self.host.sandbox,
            data_disks: boot.disks,
            run_as: self.host.run_as.clone(),
            placement: self.host.cpu.placement(vm.id.as_str()),
            nic,
        };
        if root.pin_qcow2_path.is_some() || root.pin_boot_disk.is_some() {
            self.store
                .pin_image_formats(&vm.id, root.pin_qcow2_path, root.pin_boot_disk)?;
        }
        let t1 = t0.elapsed();
        self.counters.provisioned(root.provisioned);
        let run = vm::launch(
            &self.config.qemu_binary,
            &spec,
            self.config.console_max_bytes,
        )
        .await
        .map_err(|e| ServiceError::because(e, ToString::to_string))?;
        let started = Detail {
            root_disk: Some((
                root.source,
                root.path.to_string_lossy().into_owned(),
                root.virtual_size,
                root.format,
            )),
            ..Detail::pid(run.pid)
        };
        // Progress ends before the state says running: a reader that sees
        // `running` (GET /vms/{id} reads the state first) sees no progress.
        drop(tracked);
        let updated = self.record(&vm.id, VmEvent::Started, started);
        if let Err(e) = updated {
            // Without a record of it, the QEMU must not stay.
            run.stop(true, Duration::ZERO).await;
            return Err(e.into());
        }
        self.record_boot_moves(&vm.id, &boot.moves);
        tracing::info!(
            "vm {} started: pid {}, accel {}, root disk {} ({}); disk ready in {:.1} ms, QMP answered in {:.1} ms",
            vm.id,
            run.pid,
            self.host.accel.as_str(),
            root.path.display(),
            root.source.as_str(),
            t1.as_secs_f64() * 1000.0,
            (t0.elapsed() - t1).as_secs_f64() * 1000.0
        );
        self.register(vm.id.clone(), run);
        Ok(())
    }

    /// Records a live QEMU and spawns the task that notices its exit.
    pub(crate) fn register(self: &Arc<Self>, id: Name, run: Arc<Running>) {
        self.running
            .lock_or_recover()
            .insert(id.clone(), run.clone());
        let service = self.clone();
        tokio::spawn(async move {
            let info = run.wait_exit().await;
            if info.requested {
                return; // stop/delete writes the state itself
            }
            let seen = std::time::Instant::now();
            let _guard = service.lock_vm(&id).await;
            if !service.unregister(&id, &run) {
                return;
            }
            service.teardown_network(&id).await;
            service.record_unexpected_exit(&id, &run, &info);
            service.counters.exit_recorded(seen.elapsed());
        });
    }

    fn record_unexpected_exit(&self, id: &Name, run: &Running, info: &ExitInfo) {
        let (event, detail) = if info.clean() {
            tracing::info!("vm {id}: guest powered off ({})", info.status);
            let cause = format!("guest powered off ({})", info.status);
            (VmEvent::Halted, Detail::clear().because(cause))
        } else {
            let msg = with_console_tail(
                format!("QEMU exited unexpectedly ({})", info.status),
                &run.paths,
            );
            tracing::warn!("vm {id}: {}", msg.lines().next().unwrap_or(""));
            (VmEvent::Gone, Detail::error(msg))
        };
        if let Err(e) = self.record(id, event, detail) {
            tracing::error!("vm {id}: cannot record its exit: {e}");
        }
    }

    pub async fn stop_vm(&self, id: &Name, force: bool) -> Result<StopReport, ServiceError> {
        let _guard = self.lock_vm(id).await;
        self.stop_locked(id, force).await
    }

    async fn stop_locked(&self, id: &Name, force: bool) -> Result<StopReport, ServiceError> {
        let vm = self.store.get_vm(id).map_err(missing("VM"))?;
        let run = self.registered(id);
        let Some(run) = run.filter(|_| vm.state == VmState::Running) else {
            // An unresponsive (adoption pending) or unmanaged QEMU: by pid.
            return match self.kill_unmanaged(id).await? {
                Some(_) => {
                    self.teardown_network(id).await;
                    self.record(id, VmEvent::Killed, Detail::clear().because("killed"))?;
                    tracing::info!("vm {id} stopped by SIGKILL (its QEMU was not adopted)");
                    Ok(StopReport {
                        method: StopMethod::Killed,
                        elapsed: Duration::ZERO,
                    })
                }
                None => Err(Reason::NotRunning.refuse("VM is not running")),
            };
        };
        let started = std::time::Instant::now();
        let method = run
            .stop(force, Duration::from_secs(self.config.stop_timeout))
            .await;
        let elapsed = started.elapsed();
        self.unregister(id, &run);
        self.teardown_network(id).await;
        let how = Detail::clear().because(super::events::stop_cause(method));
        self.record(id, VmEvent::Halted, how)?;
        tracing::info!(
            "vm {id} stopped by {method:?} in {:.0} ms",
            elapsed.as_secs_f64() * 1000.0
        );
        Ok(StopReport { method, elapsed })
    }

    /// Stop (when running) then start, under one lock.
    pub async fn restart_vm(self: &Arc<Self>, id: &Name, force: bool) -> Result<(), ServiceError> {
        let _guard = self.lock_vm(id).await;
        let vm = self.store.get_vm(id).map_err(missing("VM"))?;
        if vm.state == VmState::Running {
            self.stop_locked(id, force).await?;
        }
        self.start_locked(id).await
    }

    /// Deletes a VM: force-stops it when it runs, then removes its record
    /// and its folder.
    pub async fn delete_vm(&self, id: &Name) -> Result<(), ServiceError> {
        let _guard = self.lock_vm(id).await;
        self.store.get_vm(id).map_err(missing("VM"))?;
        self.refuse_delete_of_clone_source(id)?;
        // Recorded first: a full disk refuses the deletion with nothing
        // changed rather than leaving a killed QEMU recorded running.
        self.forget_vm(id)?;
        if let Some(run) = self.registered(id) {
            run.stop(true, Duration::ZERO).await;
            self.unregister(id, &run);
        }
        // An unresponsive (adoption pending) or unmanaged QEMU of the VM is
        // killed by pid; its files go only once no QEMU of it runs (a QEMU
        // that survives SIGKILL keeps them, and the observer reports it).
        self.kill_unmanaged(id).await?;
        self.teardown_network(id).await;
        let dir = self.paths(id).dir;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(
                "vm {id} deleted but its folder {} stays: {e}",
                dir.display()
            ),
        }
        self.forget_clone(id);
        tracing::info!("vm {id} deleted");
        let none = serde_json::json!({});
        self.emit(super::EventKind::Vm, id.as_str(), "deleted", none);
        Ok(())
    }

    /// The console tail and the file's size.
    pub fn console(&self, id: &Name) -> Result<(Vec<u8>, u64), ServiceError> {
        self.store.get_vm(id).map_err(missing("VM"))?;
        let path = self.paths(id).console;
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let tail = console::read_tail(&path, console::TAIL_BYTES)
            .map_err(|e| ServiceError::Internal(format!("read {}: {e}", path.display())))?;
        Ok((tail, size))
    }

    /// Types `data` into the VM's serial console.
    pub async fn console_input(&self, id: &Name, data: &[u8]) -> Result<(), ServiceError> {
        self.store.get_vm(id).map_err(missing("VM"))?;
        let run = self
            .live(id)
            .ok_or_else(|| Reason::NotRunning.refuse("VM is not running"))?;
        let console = run
            .console
            .as_ref()
            .ok_or_else(|| Reason::ConsoleNotConnected.refuse("VM console is not connected"))?;
        console
            .write(data)
            .await
            .map_err(|e| ServiceError::because(e, |e| format!("cannot write to the console: {e}")))
    }

    /// Host memory × `VMAN_MEMORY_OVERCOMMIT`, in MiB.
    pub(crate) fn memory_limit_mib(&self) -> u64 {
        (self.host.mem_total_mib as f64 * self.config.memory_overcommit) as u64
    }

    /// Memory reserved by running VMs, in MiB.
    pub fn memory_in_use(&self) -> u64 {
        self.memory.lock_or_recover().values().sum()
    }
}
