//! Cold migration (issue 14): the rules and the order of steps of moving a
//! stopped VM (root disk, data disks, record) from this node to another.
//!
//! Source (`migrate_vm`), under the VM's lock:
//! 1. refuse unless cluster mode, a known other node with the VM's memory
//!    free, the VM stopped, every disk vman's own standalone file (no
//!    snapshots, no backing chain: refused, not flattened), no bridge
//!    address, no migration of it under way;
//! 2. record the intent (`vm_migrations`, step `copying`);
//! 3. stream each file (`PUT .../import/{vm}/{root|disk}/{root.qcow2|disk id}`
//!    with size and SHA-256); the target checks and renames it into place;
//! 4. `POST .../adopt/{vm}` with the record; the target writes it marked
//!    `incoming` (not startable there until the placement says so);
//!    intent step `adopted`;
//! 5. `PlacementCommit::move_placement` (etcd txn: placement still here,
//!    reserve there, release here);
//! 6. only then forget the VM here (record, disk rows, intent) and remove
//!    its files.
//!
//! A failure before 5 drops what the target received (`DELETE .../import`)
//! and keeps everything here. A kill -9 anywhere leaves the intent row;
//! `settle_migrations` at start-up reads the placement and finishes (6) or
//! rolls back. A start of a VM with an intent here is refused; a start of
//! an `incoming` VM on the target is allowed once the placement names the
//! target. So the VM is startable on exactly one node at every moment.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::blocking::blocking;
use super::{missing, EventKind, Reason, Service, ServiceError};
use crate::model::{ImageFormat, Name, NetworkMode, PortForward, Protocol, Template, VmState};
use crate::operator::image::{ImageError, Top};
use crate::operator::transfer::{self, Incoming, Peer, TransferError};
pub use crate::operator::transfer::{
    Announced, FORMAT_HEADER, SHA_HEADER, SIZE_HEADER, TOKEN_HEADER,
};
use crate::store::{AdoptedDisk, Adoption, MigrationRole, MigrationStep, NewVm, StoreError};

/// A node as migration needs it.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub name: String,
    /// Its API's base URL (`VMAN_ADVERTISE_URL`).
    pub url: String,
    /// Memory it can still take (capacity minus reservations), MiB.
    pub free_memory_mib: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// The placement is no longer `from` (now the given node, if any).
    #[error("the placement changed meanwhile (now {})", .0.as_deref().unwrap_or("none"))]
    Conflict(Option<String>),
    #[error("node {node} has {free} MiB of memory free, {need} MiB are needed")]
    NoMemory { node: String, free: u64, need: u64 },
    /// The target is not an online node (nothing changed).
    #[error("{0}")]
    NodeUnavailable(String),
    /// The cluster state cannot be read or written now; the outcome of a
    /// write is unknown.
    #[error("the cluster state is unavailable: {0}")]
    Unavailable(String),
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What cold migration needs of the cluster core (etcd): node records, the
/// placement of a VM, and the placement change as one transaction.
pub trait PlacementCommit: Send + Sync {
    /// This node's name.
    fn local_node(&self) -> &str;
    /// A known node, `None` when the cluster has no node of that name.
    fn node<'a>(&'a self, name: &'a str)
        -> BoxFuture<'a, Result<Option<NodeView>, PlacementError>>;
    /// The node the VM is placed on (`None`: no placement recorded).
    fn placement<'a>(
        &'a self,
        vm: &'a Name,
    ) -> BoxFuture<'a, Result<Option<String>, PlacementError>>;
    /// Moves the placement of `vm` from `from` to `to` if it is still
    /// `from`, reserving `memory_mib` on `to` and releasing it on `from`,
    /// all or nothing.
    fn move_placement<'a>(
        &'a self,
        vm: &'a Name,
        from: &'a str,
        to: &'a str,
        memory_mib: u64,
    ) -> BoxFuture<'a, Result<(), PlacementError>>;
}

/// The VM record the source sends to `POST /cluster/internal/adopt/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AdoptRecord {
    pub id: String,
    pub source_node: String,
    pub source_url: String,
    pub template: TemplateRecord,
    pub created_at: String,
    pub boot_disk: Option<String>,
    pub boot_disk_format: Option<String>,
    pub network_mode: String,
    pub ports: Vec<PortRecord>,
    /// The root disk's format when `root.qcow2` was sent.
    pub root_disk_format: Option<String>,
    pub hostname: Option<String>,
    pub user_data: Option<String>,
    pub ssh_keys: Option<Vec<String>>,
    pub disks: Vec<DiskRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TemplateRecord {
    pub name: String,
    pub cpu_count: u32,
    pub ram_mib: u64,
    pub disk_size_gb: Option<u64>,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PortRecord {
    pub host_port: u16,
    pub guest_port: u16,
    pub protocol: String,
    pub host_address: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DiskRecord {
    pub id: String,
    pub size_gb: u64,
    pub mount_point: Option<String>,
    pub format: String,
    pub slot: u8,
}

/// What a migration did.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MigrationReport {
    pub id: String,
    pub from: String,
    pub to: String,
    /// Files sent (root disk, data disks) and their bytes.
    pub files: usize,
    pub bytes: u64,
    pub seconds: f64,
}

/// Which file of an import: the root disk or a data disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportKind {
    Root,
    Disk,
}

impl ImportKind {
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "root" => Some(Self::Root),
            "disk" => Some(Self::Disk),
            _ => None,
        }
    }
}

/// One file to send.
struct Outgoing {
    kind: &'static str,
    name: String,
    path: PathBuf,
    format: ImageFormat,
}

/// Tests only: `VMAN_TEST_MIGRATE_CRASH_AT=<step>` makes the source kill
/// itself with SIGKILL at that step (`copied`, `adopted`, `committed`), as a
/// `kill -9` would, so the tests can check every crash point.
fn crash_point(step: &str) {
    if std::env::var("VMAN_TEST_MIGRATE_CRASH_AT").is_ok_and(|s| s == step) {
        tracing::error!("VMAN_TEST_MIGRATE_CRASH_AT={step}: killing myself");
        // SAFETY: signalling our own process.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

fn refused(detail: impl Into<String>) -> ServiceError {
    Reason::MigrationRefused.refuse(detail)
}

/// A refusal of the target becomes the matching refusal here; anything
/// else names the node and what failed.
fn from_peer(what: &str, e: TransferError) -> ServiceError {
    match e {
        TransferError::Peer {
            node,
            status: 400,
            code,
            detail,
        } => {
            let reason = match code.as_str() {
                "transfer_refused" => Reason::TransferRefused,
                "already_exists" => Reason::AlreadyExists,
                "port_in_use" => Reason::PortInUse,
                _ => Reason::MigrationRefused,
            };
            reason.refuse(format!(
                "node {node} refused {what}: {detail}; nothing was moved"
            ))
        }
        other => refused(format!("{what}: {other}; nothing was moved")),
    }
}

fn placement_failed(e: PlacementError) -> ServiceError {
    match e {
        PlacementError::Conflict(_) => Reason::PlacementConflict.refuse(format!(
            "{e}; the target dropped what it received and nothing was moved"
        )),
        PlacementError::NoMemory { .. } => {
            Reason::NoMemory.refuse(format!("{e}; nothing was moved"))
        }
        PlacementError::NodeUnavailable(_) => {
            Reason::UnknownNode.refuse(format!("{e}; nothing was moved"))
        }
        PlacementError::Unavailable(_) => refused(format!("{e}; nothing was moved")),
    }
}

impl Service {
    /// The cluster core migration works with (`None`: single-host mode).
    pub fn placement(&self) -> Option<Arc<dyn PlacementCommit>> {
        self.placement.get().cloned()
    }

    /// Wires the cluster core (once, at start-up, in cluster mode).
    pub fn set_placement(&self, p: Arc<dyn PlacementCommit>) {
        if self.placement.set(p).is_err() {
            tracing::warn!("the placement commit was wired twice; the first is kept");
        }
    }

    fn peer(&self, node: &str, url: &str) -> Peer {
        Peer::new(
            node,
            url,
            self.config.cluster.cluster_token.as_deref().unwrap_or(""),
            self.config.api_token.as_deref(),
        )
    }

    fn local_url(&self) -> String {
        self.config
            .cluster
            .advertise_url
            .clone()
            .unwrap_or_default()
    }

    /// `POST /vms/{id}/actions/migrate`: moves the stopped VM to `node`.
    pub async fn migrate_vm(&self, id: &Name, node: &str) -> Result<MigrationReport, ServiceError> {
        let cluster = self
            .placement()
            .ok_or_else(|| refused("vman is not running in cluster mode (--cluster)"))?;
        let local = cluster.local_node().to_owned();
        if node == local {
            return Err(Reason::UnknownNode.refuse(format!("VM {id} is on node {node} already")));
        }
        let _guard = self.lock_vm(id).await;
        let vm = self.store.get_vm(id).map_err(missing("VM"))?;
        if let Some(row) = self.store.get_migration(id)? {
            if row.role == MigrationRole::Incoming {
                // Received here: ours once the placement names this node.
                self.migration_allows_start(id).await?;
            } else {
                self.settle(cluster.as_ref(), &row).await;
            }
            if self.store.get_migration(id)?.is_some() {
                return Err(refused(format!(
                    "VM {id} is being migrated to node {} already",
                    row.peer
                )));
            }
        }
        if vm.state != VmState::Stopped || self.is_live(id) {
            return Err(Reason::NotStopped.refuse(format!(
                "VM {id} is {}: stop it first (only stopped VMs are migrated)",
                vm.state.as_str()
            )));
        }
        let target = cluster
            .node(node)
            .await
            .map_err(|e| refused(format!("{e}; nothing was moved")))?
            .ok_or_else(|| {
                Reason::UnknownNode.refuse(format!("Node {node} is not a node of the cluster"))
            })?;
        if vm.qcow2_path.is_some() {
            return Err(refused(format!(
                "VM {id} boots the explicit image qcow2_path, a file of this host's image \
                 folders; only vman's own disks are migrated"
            )));
        }
        if vm.network_mode == NetworkMode::Bridge {
            return Err(refused(format!(
                "VM {id} has an address of this node's bridge network; bridge VMs are not migrated"
            )));
        }
        if !self.store.snapshots_of_vm(id)?.is_empty() {
            return Err(refused(format!(
                "VM {id} has snapshots; delete them before migrating it (backing chains are not moved)"
            )));
        }
        let ram = vm.template.ram_mib;
        if target.free_memory_mib < ram {
            return Err(Reason::NoMemory.refuse(format!(
                "Node {node} has {} MiB of memory free, VM {id} needs {ram} MiB",
                target.free_memory_mib
            )));
        }
        let disks = self.store.disks_of_vm(id)?;
        let root = self.paths(id).root;
        let mut files = Vec::new();
        let root_format = if root.exists() {
            let format = vm.root_disk_format.unwrap_or(ImageFormat::Qcow2);
            files.push(Outgoing {
                kind: "root",
                name: "root.qcow2".into(),
                path: root.clone(),
                format,
            });
            Some(format)
        } else {
            None
        };
        for d in &disks {
            files.push(Outgoing {
                kind: "disk",
                name: d.id.to_string(),
                path: PathBuf::from(&d.path),
                format: d.format,
            });
        }
        // Every file must be a standalone image (no backing file), as the
        // target accepts only those.
        let images = self.host.images.clone();
        let checks: Vec<(PathBuf, Option<ImageFormat>)> = files
            .iter()
            .map(|f| (f.path.clone(), Some(f.format)))
            .collect();
        blocking("migration image check", move || {
            for (path, format) in checks {
                let chain = images
                    .open_chain(&path, Top::Trusted, format, false)
                    .map_err(|e| refused(format!("{e}")))?;
                if chain.files.len() > 1 {
                    return Err(refused(format!(
                        "{} is built on a backing file ({}); only standalone disks are \
                         migrated (VMAN_BOOT_DISK_MODE=overlay root disks and snapshots are not)",
                        path.display(),
                        chain.files[1].path.display()
                    )));
                }
            }
            Ok::<_, ServiceError>(())
        })
        .await??;

        let began = std::time::Instant::now();
        match self.store.begin_migration(id, node, &target.url) {
            Ok(()) => {}
            Err(StoreError::AlreadyExists) => {
                return Err(refused(format!("VM {id} is being migrated already")))
            }
            Err(e) => return Err(e.into()),
        }
        let peer = self.peer(node, &target.url);
        let rollback = |e: ServiceError| async {
            if let Err(c) = peer.cleanup(id.as_str()).await {
                tracing::warn!(
                    "migration of {id}: cannot clean up at node {node}: {c}; retried at start-up"
                );
                return e;
            }
            if let Err(s) = self.store.end_migration(id) {
                tracing::warn!("migration of {id}: cannot forget the intent: {s}");
            }
            e
        };
        let mut bytes = 0u64;
        for f in &files {
            match self.send_file(&peer, id, f).await {
                Ok(n) => bytes += n,
                Err(e) => return Err(rollback(e).await),
            }
        }
        crash_point("copied");
        let metadata = self.store.get_metadata(id).unwrap_or_default();
        let record = AdoptRecord {
            id: id.to_string(),
            source_node: local.clone(),
            source_url: self.local_url(),
            template: TemplateRecord {
                name: vm.template.name.to_string(),
                cpu_count: vm.template.cpu_count,
                ram_mib: vm.template.ram_mib,
                disk_size_gb: vm.template.disk_size_gb,
                created_at: vm.template.created_at.clone(),
            },
            created_at: vm.created_at.clone(),
            boot_disk: vm.boot_disk.clone(),
            boot_disk_format: vm.boot_disk_format.map(|f| f.as_str().to_owned()),
            network_mode: vm.network_mode.as_str().to_owned(),
            ports: vm
                .ports
                .iter()
                .map(|p| PortRecord {
                    host_port: p.host_port,
                    guest_port: p.guest_port,
                    protocol: p.protocol.as_str().to_owned(),
                    host_address: p.host_address.clone(),
                })
                .collect(),
            root_disk_format: root_format.map(|f| f.as_str().to_owned()),
            hostname: metadata.hostname,
            user_data: metadata.user_data,
            ssh_keys: metadata.ssh_keys,
            disks: disks
                .iter()
                .map(|d| DiskRecord {
                    id: d.id.to_string(),
                    size_gb: d.size_gb,
                    mount_point: d.mount_point.clone(),
                    format: d.format.as_str().to_owned(),
                    slot: d.attachment.as_ref().map(|(_, s)| *s).unwrap_or(0),
                })
                .collect(),
        };
        let json = serde_json::to_value(&record)
            .map_err(|e| ServiceError::Internal(format!("adopt record: {e}")))?;
        if let Err(e) = peer.adopt(id.as_str(), &json).await {
            return Err(rollback(from_peer("the VM record", e)).await);
        }
        self.store.set_migration_step(id, MigrationStep::Adopted)?;
        crash_point("adopted");
        match cluster.move_placement(id, &local, node, ram).await {
            Ok(()) => {}
            Err(PlacementError::Unavailable(e)) => {
                // The outcome is unknown: keep everything; the intent row
                // settles it by the placement once the cluster answers.
                return Err(refused(format!(
                    "the placement change of VM {id} could not be confirmed ({e}); the VM \
                     stays here until it is settled (at the next migrate request or vman start)"
                )));
            }
            Err(e) => return Err(rollback(placement_failed(e)).await),
        }
        crash_point("committed");
        self.forget_migrated(id).await;
        let seconds = began.elapsed().as_secs_f64();
        tracing::info!(
            "VM {id} migrated to node {node}: {} files, {bytes} bytes in {seconds:.2} s",
            files.len()
        );
        let detail = serde_json::json!({ "from": local, "to": node, "bytes": bytes });
        self.emit(EventKind::Vm, id.as_str(), "migrated", detail);
        Ok(MigrationReport {
            id: id.to_string(),
            from: local,
            to: node.to_owned(),
            files: files.len(),
            bytes,
            seconds,
        })
    }

    /// Streams one file to the target; its byte count.
    async fn send_file(&self, peer: &Peer, id: &Name, f: &Outgoing) -> Result<u64, ServiceError> {
        let what = if f.kind == "root" {
            "the root disk".to_owned()
        } else {
            format!("disk {}", f.name)
        };
        let path = f.path.clone();
        let (size, sha) = blocking("disk digest", move || transfer::digest(&path))
            .await?
            .map_err(|e| refused(format!("{what}: {e}; nothing was moved")))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let path = f.path.clone();
        let reader = blocking("disk read", move || transfer::read_chunks(&path, tx));
        let announced = transfer::Announced {
            size,
            sha256: sha,
            format: f.format,
        };
        let (sent, read) = tokio::join!(
            peer.put_file(id.as_str(), f.kind, &f.name, &announced, rx),
            reader
        );
        sent.map_err(|e| from_peer(&what, e))?;
        read?.map_err(|e| refused(format!("{what}: {e}; nothing was moved")))?;
        Ok(size)
    }

    /// The source's last step: the record, disk rows and intent go in one
    /// transaction, then the files.
    async fn forget_migrated(&self, id: &Name) {
        let disks = self.store.disks_of_vm(id).unwrap_or_default();
        if let Err(e) = self.store.forget_migrated(id) {
            tracing::error!("VM {id} migrated but its record here cannot be removed: {e}");
            return;
        }
        let dir = self.paths(id).dir;
        let paths: Vec<PathBuf> = disks.iter().map(|d| PathBuf::from(&d.path)).collect();
        let _ = blocking("remove migrated files", move || {
            for p in paths {
                if let Err(e) = std::fs::remove_file(&p) {
                    tracing::warn!("cannot remove migrated disk {}: {e}", p.display());
                }
            }
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("cannot remove migrated VM folder {}: {e}", dir.display());
                }
            }
        })
        .await;
    }

    /// Finishes or rolls back one interrupted outgoing migration by the
    /// placement; leaves the row when the cluster or the target cannot be
    /// reached (tried again later).
    async fn settle(&self, cluster: &dyn PlacementCommit, row: &crate::store::MigrationRow) {
        let id = &row.vm_id;
        let placed = match cluster.placement(id).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("migration of {id}: placement unknown ({e}); settled later");
                return;
            }
        };
        if row.step == MigrationStep::Adopted && placed.as_deref() == Some(row.peer.as_str()) {
            tracing::info!("migration of {id} to {} had committed: finishing", row.peer);
            self.forget_migrated(id).await;
            let detail = serde_json::json!({ "from": cluster.local_node(), "to": row.peer });
            self.emit(EventKind::Vm, id.as_str(), "migrated", detail);
            return;
        }
        match self
            .peer(&row.peer, &row.peer_url)
            .cleanup(id.as_str())
            .await
        {
            Ok(()) => {
                tracing::info!("migration of {id} to {} rolled back", row.peer);
                if let Err(e) = self.store.end_migration(id) {
                    tracing::warn!("migration of {id}: cannot forget the intent: {e}");
                }
            }
            Err(e) => tracing::warn!(
                "migration of {id}: node {} cannot drop its copy yet ({e}); settled later",
                row.peer
            ),
        }
    }

    /// At start-up (after the API listens): settles every migration a kill
    /// left half done.
    pub async fn settle_migrations(&self) {
        let Some(cluster) = self.placement() else {
            return;
        };
        let rows = match self.store.list_migrations(MigrationRole::Outgoing) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("cannot read migrations under way: {e}");
                return;
            }
        };
        for row in rows {
            let _guard = self.lock_vm(&row.vm_id).await;
            self.settle(cluster.as_ref(), &row).await;
        }
    }

    /// Refuses to start a VM this node is sending away, or one it received
    /// whose placement does not name this node yet (called by `start_vm`
    /// under the VM's lock).
    pub(crate) async fn migration_allows_start(&self, id: &Name) -> Result<(), ServiceError> {
        let Some(row) = self.store.get_migration(id)? else {
            return Ok(());
        };
        if row.role == MigrationRole::Outgoing {
            return Err(refused(format!(
                "VM {id} is being migrated to node {}; it cannot start here",
                row.peer
            )));
        }
        let cluster = self.placement().ok_or_else(|| {
            refused(format!(
                "VM {id} was received from node {} but this node is not in cluster mode",
                row.peer
            ))
        })?;
        match cluster.placement(id).await {
            Ok(Some(n)) if n == cluster.local_node() => {
                self.store.end_migration(id)?;
                Ok(())
            }
            Ok(other) => Err(refused(format!(
                "VM {id} is being migrated here from node {} and is placed on {} still; it cannot start here yet",
                row.peer,
                other.as_deref().unwrap_or("no node")
            ))),
            Err(e) => Err(refused(format!(
                "VM {id} was migrated here and its placement cannot be read ({e}); try again"
            ))),
        }
    }

    // ---- target side ----------------------------------------------------

    /// Refuses an import of a VM this node owns (a record without the
    /// `incoming` mark).
    fn check_importable(&self, id: &Name) -> Result<(), ServiceError> {
        match self.store.get_vm(id) {
            Err(StoreError::NotFound) => Ok(()),
            Err(e) => Err(e.into()),
            Ok(_) => Err(Reason::AlreadyExists.refuse(format!("VM {id} exists on this node"))),
        }
    }

    /// `PUT /cluster/internal/import/{vm}/{kind}/{file}`: receives one file
    /// of `size` bytes and SHA-256 `sha256` from `body` into its place.
    pub async fn import_file<S, E>(
        &self,
        id: &Name,
        kind: ImportKind,
        file: &str,
        announced: transfer::Announced,
        mut body: S,
    ) -> Result<(), ServiceError>
    where
        S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        use futures_util::StreamExt;
        self.check_importable(id)?;
        let dest = match kind {
            ImportKind::Root if file == "root.qcow2" => self.paths(id).root,
            ImportKind::Root => {
                return Err(refused("the root disk is imported as root.qcow2"));
            }
            ImportKind::Disk => {
                let disk = Name::parse("file", file).map_err(ServiceError::Invalid)?;
                match self.store.get_disk(&disk) {
                    Err(StoreError::NotFound) => {}
                    Err(e) => return Err(e.into()),
                    Ok(_) => {
                        return Err(Reason::AlreadyExists
                            .refuse(format!("Disk {disk} exists on this node")))
                    }
                }
                self.disk_path(&disk)
            }
        };
        let dest_for_note = dest.to_string_lossy().into_owned();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
        let images = self.host.images.clone();
        let writer = blocking("import write", move || {
            let mut incoming = Incoming::create(&dest, announced.size)?;
            while let Some(chunk) = rx.blocking_recv() {
                incoming.write(&chunk)?;
            }
            incoming.finish(&announced.sha256, announced.format, &images)
        });
        let feeder = async move {
            while let Some(chunk) = body.next().await {
                match chunk {
                    Ok(c) => {
                        if tx.send(c).await.is_err() {
                            // The writer stopped (its error says why).
                            return Ok(());
                        }
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
            Ok(())
        };
        let written_to = dest_for_note;
        let (fed, written) = tokio::join!(feeder, writer);
        if !matches!(written, Ok(Ok(_))) && kind == ImportKind::Root {
            // Leave no empty VM folder behind a refused root disk.
            let _ = std::fs::remove_dir(self.paths(id).dir);
        }
        // A body cut short drops the sender first: the writer then sees
        // fewer bytes than announced and removes its partial file.
        let result = written?;
        if let Err(e) = fed {
            return Err(Reason::TransferRefused
                .refuse(format!("the upload broke off ({e}); nothing was kept")));
        }
        match result {
            Ok(_) => {
                // Listed as this node's doing, for a roll-back to remove.
                if let Err(e) = self.store.note_import(id, &written_to) {
                    let _ = std::fs::remove_file(&written_to);
                    return Err(match e {
                        StoreError::AlreadyExists => Reason::AlreadyExists
                            .refuse(format!("VM {id} is being migrated away from this node")),
                        other => other.into(),
                    });
                }
                Ok(())
            }
            Err(TransferError::Image(ImageError::Exists { path })) => {
                Err(Reason::AlreadyExists.refuse(format!("{} exists on this node", path.display())))
            }
            Err(e @ (TransferError::Io { .. } | TransferError::Image(ImageError::Io { .. }))) => {
                Err(ServiceError::Internal(format!("import of {id}: {e}")))
            }
            Err(e) => Err(Reason::TransferRefused.refuse(e.to_string())),
        }
    }

    /// `POST /cluster/internal/adopt/{vm}`: records the VM whose files were
    /// imported, stopped and marked `incoming`.
    pub async fn adopt_migrated(&self, id: &Name, r: AdoptRecord) -> Result<(), ServiceError> {
        if r.id != id.as_str() {
            return Err(refused("the record's id is not the VM of the path"));
        }
        let _guard = self.lock_vm(id).await;
        self.check_importable(id)?;
        let bad = |what: &str| refused(format!("the record's {what} is not valid"));
        let format = |raw: &str| ImageFormat::parse(raw).ok_or_else(|| bad("format"));
        let template = Template {
            name: Name::parse("template", &r.template.name).map_err(ServiceError::Invalid)?,
            cpu_count: r.template.cpu_count,
            ram_mib: r.template.ram_mib,
            disk_size_gb: r.template.disk_size_gb,
            created_at: r.template.created_at.clone(),
        };
        match self.store.get_template(&template.name) {
            Ok(t) if t.cpu_count != template.cpu_count || t.ram_mib != template.ram_mib => {
                return Err(refused(format!(
                    "template {} differs on this node ({} CPUs, {} MiB)",
                    t.name, t.cpu_count, t.ram_mib
                )))
            }
            Ok(_) | Err(StoreError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        let network_mode =
            NetworkMode::parse(&r.network_mode).ok_or_else(|| bad("network_mode"))?;
        let mut ports = Vec::new();
        for p in &r.ports {
            ports.push(PortForward {
                host_port: p.host_port,
                guest_port: p.guest_port,
                protocol: Protocol::parse(&p.protocol).ok_or_else(|| bad("port protocol"))?,
                host_address: p.host_address.clone(),
            });
        }
        let root_format = r.root_disk_format.as_deref().map(format).transpose()?;
        let mut disks = Vec::new();
        for d in &r.disks {
            let disk_id = Name::parse("disk", &d.id).map_err(ServiceError::Invalid)?;
            let path = self.disk_path(&disk_id);
            disks.push(AdoptedDisk {
                id: disk_id,
                size_gb: d.size_gb,
                mount_point: d.mount_point.clone(),
                path: path.to_string_lossy().into_owned(),
                format: format(&d.format)?,
                slot: d.slot,
            });
        }
        // Every file must be here, whole and checked again.
        let images = self.host.images.clone();
        let root = self.paths(id).root;
        let mut checks: Vec<(PathBuf, ImageFormat)> = disks
            .iter()
            .map(|d| (PathBuf::from(&d.path), d.format))
            .collect();
        if let Some(f) = root_format {
            checks.push((root.clone(), f));
        }
        let sizes = blocking("adopt image check", move || {
            checks
                .into_iter()
                .map(|(p, f)| {
                    images
                        .open_chain(&p, Top::Trusted, Some(f), false)
                        .map(|c| c.top().virtual_size)
                        .map_err(|e| {
                            Reason::TransferRefused
                                .refuse(format!("{e} (import the files before the record)"))
                        })
                })
                .collect::<Result<Vec<u64>, ServiceError>>()
        })
        .await??;
        let root_disk = root_format.map(|f| {
            (
                root.to_string_lossy().into_owned(),
                sizes.last().copied().unwrap_or(0),
                f,
            )
        });
        let adoption = Adoption {
            vm: NewVm {
                id: id.clone(),
                template: template.name.clone(),
                qcow2_path: None,
                boot_disk: r.boot_disk.clone(),
                qcow2_path_format: None,
                boot_disk_format: r.boot_disk_format.as_deref().map(format).transpose()?,
                network_mode,
                ports,
            },
            template,
            created_at: r.created_at.clone(),
            root_disk,
            hostname: r.hostname.clone(),
            user_data: r.user_data.clone(),
            ssh_keys: r.ssh_keys.clone(),
            disks,
            peer: r.source_node.clone(),
            peer_url: r.source_url.clone(),
        };
        match self.store.adopt_vm(&adoption) {
            Ok(()) => {}
            Err(StoreError::AlreadyExists) => {
                return Err(Reason::AlreadyExists.refuse(format!(
                "VM {id}, one of its disks or one of its forwarded host ports exists on this node"
            )))
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!("VM {id} received from node {}", r.source_node);
        let detail = serde_json::json!({ "from": r.source_node });
        self.emit(EventKind::Vm, id.as_str(), "received", detail);
        Ok(())
    }

    /// `DELETE /cluster/internal/import/{vm}`: drops what was received for
    /// the VM: its record while marked `incoming`, and the files this node
    /// noted writing for it (never another file).
    pub async fn drop_import(&self, id: &Name) -> Result<(), ServiceError> {
        let _guard = self.lock_vm(id).await;
        // Never drop a copy the placement already names: the source may
        // have misread it (then the copy here is the VM).
        if let Some(cluster) = self.placement() {
            match cluster.placement(id).await {
                Ok(Some(n)) if n == cluster.local_node() => {
                    return Err(Reason::PlacementConflict.refuse(format!(
                        "VM {id} is placed on this node ({n}); its copy here is kept"
                    )))
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(refused(format!(
                    "the placement of VM {id} cannot be read ({e}); nothing was dropped, try again"
                )))
                }
            }
        }
        let Some(files) = self.store.drop_incoming(id)? else {
            return Ok(());
        };
        let dir = self.paths(id).dir;
        blocking("drop import", move || {
            for p in files {
                match std::fs::remove_file(&p) {
                    Ok(()) => tracing::info!("removed imported {p}"),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!("cannot remove imported {p}: {e}"),
                }
            }
            // The VM folder only when nothing else is in it.
            let _ = std::fs::remove_dir(&dir);
        })
        .await?;
        Ok(())
    }
}
