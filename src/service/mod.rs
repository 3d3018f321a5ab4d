//! The rules of vman: what may happen to templates, VMs and metadata, in
//! which order, and under which lock. The service knows neither HTTP nor SQL:
//! it takes parsed inputs, asks the store and the operator, and answers with
//! domain values or a `ServiceError`.

mod adoption;
mod blocking;
mod bridge;
mod clone;
mod coherence;
mod console;
pub mod database;
mod disk_plan;
mod disks;
mod error;
mod events;
mod guest;
mod health;
mod lifecycle;
pub mod metrics;
pub mod migrate;
mod network;
mod observe;
mod progress;
mod record;
pub mod rootdisk;
mod snapshot_recovery;
mod snapshots;
mod space;

pub use bridge::{Allocation, BridgeConfigView, NetworkConfig};
pub use clone::CloneVm;
pub use coherence::{Issue, Report};
pub use console::{ConsoleOutput, ConsoleSession};
pub use disks::{CreateDisk, DiskState, DiskView};
#[cfg(test)]
pub(crate) use error::every_reason;
pub use error::{Reason, Refusal, ServiceError};
pub use events::{Event, EventKind, EventQuery};
pub use lifecycle::StopReport;
pub use network::{AddPort, Applied};
pub use progress::Provisioning;
pub use snapshot_recovery::Settled;
pub use snapshots::{CreateSnapshot, SnapshotDiskView, SnapshotView};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::config::Config;
use crate::model::{Metadata, MetadataPatch, Name, Template, Vm, VmState};
use crate::operator::vm::Running;
use crate::operator::Host;
use crate::store::{NewVm, Store, StoreError};

pub use health::{Check, HealthReport};

/// Maps "not found" of the store to the resource the caller asked for.
fn missing(what: &'static str) -> impl Fn(StoreError) -> ServiceError {
    move |e| match e {
        StoreError::NotFound => ServiceError::NotFound(what),
        other => other.into(),
    }
}

/// A template to create, already validated.
#[derive(Debug, Clone)]
pub struct CreateTemplate {
    pub name: Name,
    pub cpu_count: u32,
    pub ram_mib: u64,
    pub disk_size_gb: Option<u64>,
}

/// A VM to create, already validated.
#[derive(Debug, Clone)]
pub struct CreateVm {
    pub template_name: Name,
    pub id: Option<Name>,
    pub qcow2_path: Option<String>,
    pub boot_disk: Option<String>,
    /// `network.mode`; `None`: `VMAN_NETWORK_MODE`.
    pub network: Option<crate::model::NetworkMode>,
}

/// How many host ports a create picks for its SSH forward before it gives
/// up (each lost only to a create running at the same moment).
const CREATE_PORT_PICKS: u32 = 8;

pub struct Service {
    pub(crate) config: Arc<Config>,
    pub(crate) store: Store,
    pub(crate) host: Host,
    tools: health::Tools,
    /// One lock per VM: actions on one VM never race.
    locks: Mutex<HashMap<Name, Arc<tokio::sync::Mutex<()>>>>,
    /// QEMU processes vman manages, by VM.
    running: Mutex<HashMap<Name, Arc<Running>>>,
    /// Live QEMU processes of VMs that did not answer QMP yet (pid).
    pending: Mutex<HashMap<Name, i32>>,
    /// What start-up did with interrupted snapshot operations.
    settled_snapshot_ops: Mutex<Vec<snapshot_recovery::Settled>>,
    /// Memory (MiB) of running and starting VMs, for admission.
    memory: Mutex<HashMap<Name, u64>>,
    /// Root disks being made by starts (`progress.rs`); not VM state.
    provisioning: Mutex<HashMap<Name, Arc<crate::operator::image::Progress>>>,
    /// The observer's last findings.
    observer: Mutex<Report>,
    /// State changes that happened but could not be recorded (full disk);
    /// the observer records them (`space.rs`).
    unrecorded: Mutex<HashMap<Name, (crate::model::VmEvent, record::Detail)>>,
    /// The live side of the event journal (`events.rs`).
    events: events::Events,
    /// What /metrics counts as it happens (`metrics.rs`).
    pub(crate) counters: metrics::Counters,
    /// The guest metadata service (channels opened at launch, see `guest`).
    pub(crate) metadata: crate::metadata::Metadata,
    /// The bridge network's host side (`bridge.rs`).
    bridge: bridge::BridgeHost,
    /// The cluster core cold migration works with (`migrate.rs`); unset in
    /// single-host mode.
    placement: std::sync::OnceLock<Arc<dyn migrate::PlacementCommit>>,
}

impl Service {
    pub fn new(config: Arc<Config>, store: Store, host: Host) -> Self {
        let metadata = crate::metadata::Metadata::new(host.run_as.as_ref().map(|r| r.uid));
        Self {
            metadata,
            store,
            host,
            tools: health::Tools::default(),
            locks: Mutex::default(),
            running: Mutex::default(),
            pending: Mutex::default(),
            settled_snapshot_ops: Mutex::default(),
            memory: Mutex::default(),
            provisioning: Mutex::default(),
            observer: Mutex::default(),
            unrecorded: Mutex::default(),
            events: events::Events::default(),
            counters: metrics::Counters::default(),
            bridge: bridge::BridgeHost::probe(&config.storage_path),
            placement: std::sync::OnceLock::new(),
            config,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn create_template(&self, input: CreateTemplate) -> Result<Template, ServiceError> {
        let template = Template {
            name: input.name,
            cpu_count: input.cpu_count,
            ram_mib: input.ram_mib,
            disk_size_gb: input.disk_size_gb,
            created_at: crate::model::now(),
        };
        match self.store.insert_template(&template) {
            Ok(()) => {
                tracing::info!("template {} created", template.name);
                let size = serde_json::json!({ "cpu_count": template.cpu_count, "ram_mib": template.ram_mib });
                self.emit(EventKind::Template, template.name.as_str(), "created", size);
                Ok(template)
            }
            Err(StoreError::AlreadyExists) => {
                Err(Reason::AlreadyExists.refuse("Template already exists"))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn list_templates(&self) -> Result<Vec<Template>, ServiceError> {
        Ok(self.store.list_templates()?)
    }

    pub fn get_template(&self, name: &Name) -> Result<Template, ServiceError> {
        self.store.get_template(name).map_err(missing("Template"))
    }

    pub fn delete_template(&self, name: &Name) -> Result<(), ServiceError> {
        match self.store.delete_template(name) {
            Ok(()) => {
                tracing::info!("template {name} deleted");
                let none = serde_json::json!({});
                self.emit(EventKind::Template, name.as_str(), "deleted", none);
                Ok(())
            }
            Err(StoreError::InUse(n)) => {
                Err(Reason::InUse.refuse(format!("Template is in use by {n} VM(s)")))
            }
            Err(e) => Err(missing("Template")(e)),
        }
    }

    /// Records a stopped VM. `qcow2_path` and `boot_disk` must be images
    /// inside the allowed folders, whole backing chain checked (on a
    /// blocking thread); they are stored resolved, with their format pinned.
    pub async fn create_vm(&self, input: CreateVm) -> Result<Vm, ServiceError> {
        let images = self.host.images.clone();
        let (qcow2_path, boot_disk) = (input.qcow2_path, input.boot_disk);
        let (qcow2, boot) = blocking::blocking("image check", move || {
            let checked = |field, raw: Option<String>| {
                raw.map(|p| rootdisk::check_user_image(&images, field, &p))
                    .transpose()
            };
            Ok::<_, ServiceError>((
                checked("qcow2_path", qcow2_path)?,
                checked("boot_disk", boot_disk)?,
            ))
        })
        .await??;
        let path = |a: &Option<rootdisk::Accepted>| {
            a.as_ref().map(|a| a.path.to_string_lossy().into_owned())
        };
        let id = input.id.unwrap_or_else(Name::generate);
        // The SSH forward's host port is picked by binding port 0; a create
        // running at the same time may have recorded the same port between
        // the pick and the insert: pick again (rarely more than once).
        let mut picks = 0;
        let inserted = loop {
            let (network_mode, ports) = self.network_for_new(input.network).await?;
            let new = NewVm {
                id: id.clone(),
                template: input.template_name.clone(),
                qcow2_path: path(&qcow2),
                boot_disk: path(&boot),
                qcow2_path_format: qcow2.as_ref().map(|a| a.format),
                boot_disk_format: boot.as_ref().map(|a| a.format),
                network_mode,
                ports,
            };
            // A bridge VM's address is taken with its row (freed with it).
            let inserted = if network_mode == crate::model::NetworkMode::Bridge {
                self.store
                    .insert_vm_with_address(&new, self.pick_bridge_address())
            } else {
                self.store.insert_vm(&new)
            };
            let port_taken = matches!(inserted, Err(StoreError::AlreadyExists))
                && !new.ports.is_empty()
                && self.store.get_vm(&id).is_err();
            picks += 1;
            if !port_taken || picks >= CREATE_PORT_PICKS {
                break inserted;
            }
        };
        match inserted {
            Ok(vm) => {
                tracing::info!("vm {} created from template {}", vm.id, vm.template.name);
                let from = serde_json::json!({ "template": vm.template.name.as_str() });
                self.emit(EventKind::Vm, vm.id.as_str(), "created", from);
                Ok(vm)
            }
            Err(StoreError::AlreadyExists) if self.store.get_vm(&id).is_err() => {
                // Not the id: every host port picked for guest 22 was
                // recorded by another VM meanwhile.
                Err(Reason::PortInUse
                    .refuse("The host port allocated for SSH was taken meanwhile; try again"))
            }
            Err(StoreError::AlreadyExists) => {
                Err(Reason::AlreadyExists.refuse("VM with this ID already exists"))
            }
            Err(StoreError::TemplateMissing) => {
                Err(Reason::TemplateMissing.refuse("Template not found"))
            }
            Err(StoreError::Exhausted) => Err(self.subnet_full()),
            Err(e) => Err(e.into()),
        }
    }

    /// Changes whenever stored data changes; lets callers cache answers.
    pub fn data_generation(&self) -> u64 {
        self.store.generation()
    }

    pub fn list_vms(&self, state: Option<VmState>) -> Result<Vec<Vm>, ServiceError> {
        Ok(self.store.list_vms(state)?)
    }

    pub fn get_vm(&self, id: &Name) -> Result<Vm, ServiceError> {
        self.store.get_vm(id).map_err(missing("VM"))
    }

    pub fn get_metadata(&self, id: &Name) -> Result<Metadata, ServiceError> {
        self.store.get_metadata(id).map_err(missing("VM"))
    }

    pub fn put_metadata(&self, id: &Name, patch: MetadataPatch) -> Result<Metadata, ServiceError> {
        self.store
            .upsert_metadata(id, &patch)
            .map_err(missing("VM"))?;
        let none = serde_json::json!({});
        self.emit(EventKind::Vm, id.as_str(), "metadata_updated", none);
        self.get_metadata(id)
    }

    pub fn delete_metadata(&self, id: &Name) -> Result<(), ServiceError> {
        self.store.delete_metadata(id).map_err(missing("VM"))?;
        let none = serde_json::json!({});
        self.emit(EventKind::Vm, id.as_str(), "metadata_cleared", none);
        Ok(())
    }
}
