//! What the service answers when it cannot do a request: `ServiceError`,
//! and for a well-formed request that the current state refuses, a
//! `Refusal` with a typed `Reason` (the operator's error kept as its source,
//! Firecracker-style). The detail text is the message clients see; the api
//! layer picks the status and the stable `code` from the reason alone
//! (`api::error::status_of`).

use crate::model::Invalid;
use crate::operator::hotplug::HotplugError;
use crate::operator::image::ImageError;
use crate::operator::vm::LaunchError;
use crate::store::StoreError;

/// Why a request to the service could not be done. The api layer maps each
/// variant to a status in one place (`api::error`).
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A value the caller gave is out of its allowed range or shape.
    #[error("{0}")]
    Invalid(#[from] Invalid),
    /// The named resource does not exist.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The request is well-formed but the current state refuses it.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// Something failed inside vman or the host; details are logged.
    #[error("internal error: {0}")]
    Internal(String),
    /// The filesystem is full: nothing was changed (ENOSPC, SQLite's
    /// "database or disk is full").
    #[error("{0}")]
    NoSpace(String),
    /// The database file is damaged; /health reports it too.
    #[error("database damaged: {0}")]
    DatabaseDamaged(String),
}

impl ServiceError {
    /// A refusal for `reason`; `detail` is the message the client sees.
    pub(crate) fn refused(reason: Reason, detail: impl Into<String>) -> Self {
        Self::Refused(Refusal {
            reason,
            detail: detail.into(),
        })
    }

    /// A refusal caused by the operator error `source` (kept as the reason
    /// and as `Error::source`); `detail` words it for the client.
    pub(crate) fn because<E>(source: E, detail: impl FnOnce(&E) -> String) -> Self
    where
        E: Into<Reason>,
    {
        let detail = detail(&source);
        Self::refused(source.into(), detail)
    }

    /// A refusal because the image operation (create, copy, overlay, grow)
    /// failed with `source`.
    pub(crate) fn image_failed(
        source: ImageError,
        detail: impl FnOnce(&ImageError) -> String,
    ) -> Self {
        let detail = detail(&source);
        Self::refused(Reason::ImageFailed(source), detail)
    }

    /// The same refusal (same reason and source) with its detail reworded;
    /// any other error unchanged.
    pub(crate) fn reworded(self, detail: impl FnOnce(&str) -> String) -> Self {
        match self {
            Self::Refused(r) => Self::refused(r.reason, detail(&r.detail)),
            other => other,
        }
    }

    /// The reason of a refusal.
    pub fn reason(&self) -> Option<&Reason> {
        match self {
            Self::Refused(r) => Some(&r.reason),
            _ => None,
        }
    }
}

/// A request the current state refuses: why, and what the client is told.
#[derive(Debug)]
pub struct Refusal {
    pub reason: Reason,
    pub detail: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

impl std::error::Error for Refusal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.reason {
            Reason::ImageRefused(e) | Reason::ImageFailed(e) => Some(e),
            Reason::DiskFileRefused(e) => e.as_ref().map(|e| e as _),
            Reason::QemuFailed(e) | Reason::AlreadyRunning(Some(e)) => Some(e),
            Reason::HotplugFailed(e) => Some(e),
            Reason::ConsoleWriteFailed(e) => Some(e),
            Reason::BridgeFailed(e) => Some(e),
            Reason::SnapshotFailed(e) => Some(e),
            _ => None,
        }
    }
}

/// Why a request was refused. Each reason has its own stable `code` in the
/// error body (`api::error::status_of`, documented in docs/errors.md).
#[derive(Debug)]
pub enum Reason {
    /// A template, VM or disk with this name already exists (or, for a
    /// disk, its file does).
    AlreadyExists,
    /// The template named by a new VM does not exist.
    TemplateMissing,
    /// The template is used by VMs.
    InUse,
    /// The VM runs already; the source when QEMU's launch found a QEMU of
    /// the VM running.
    AlreadyRunning(Option<LaunchError>),
    /// The VM does not run.
    NotRunning,
    /// A QEMU of the VM runs but does not answer on QMP yet.
    AdoptionPending,
    /// A QEMU of the VM survived SIGKILL.
    Unkillable,
    /// Starting would exceed host memory × `VMAN_MEMORY_OVERCOMMIT`.
    NoMemory,
    /// QEMU could not be started.
    QemuFailed(LaunchError),
    /// The running VM has no serial console connection.
    ConsoleNotConnected,
    /// Writing to the VM's serial console failed.
    ConsoleWriteFailed(std::io::Error),
    /// The console has as many live viewers as it takes.
    TooManyViewers,
    /// An image the caller (or the configuration) names is refused by the
    /// image checks (folder, format, backing chain).
    ImageRefused(ImageError),
    /// An image operation (create, copy, overlay, grow) failed.
    ImageFailed(ImageError),
    /// A data disk's file vanished, changed format or got a backing file.
    DiskFileRefused(Option<ImageError>),
    /// The disk is attached to a VM.
    DiskAttached,
    /// The disk is not attached to a VM.
    NotAttached,
    /// Another request moves the disk; try again.
    DiskBusy,
    /// The VM has no free hot-plug slot.
    NoFreeSlot,
    /// A disk may only grow.
    CannotShrink,
    /// The guest did not release the disk within `VMAN_DETACH_TIMEOUT`.
    GuestDidNotRelease,
    /// A QMP step of hot-plugging, unplugging or resizing failed.
    HotplugFailed(HotplugError),
    /// The VM's state does not allow this change (the transition table of
    /// `VmState::next`), or another writer changed it meanwhile.
    InvalidTransition,
    /// A host port of a forward is taken (by a VM's forward or any socket).
    PortInUse,
    /// The network mode cannot be used here (`bridge` without root, or a
    /// tool it needs missing).
    NetworkUnavailable,
    /// Port forwards of a VM that is not in user mode.
    NotUserNetwork,
    /// Setting up the VM's network failed (passt would not start, QEMU
    /// refused a forward).
    NetworkFailed,
    /// Every address of `VMAN_SUBNET` is allocated.
    SubnetFull,
    /// Setting up the bridge, the VM's TAP, its rules or dnsmasq failed.
    BridgeFailed(crate::operator::bridge::BridgeError),
    /// The VM must be stopped for this (snapshots, restore).
    NotStopped,
    /// The VM has no root disk of vman's own to snapshot.
    NoRootDisk,
    /// `VMAN_MAX_SNAPSHOTS` or the backing chain depth limit is reached.
    TooManySnapshots,
    /// Another snapshot or the root disk is built on this snapshot.
    SnapshotInUse,
    /// A QMP step of a running VM's snapshot or merge failed.
    SnapshotFailed(crate::operator::snapshot_qmp::SnapshotQmpError),
    /// A data disk belongs to a snapshot (delete it with `?force=true`).
    DiskInSnapshot,
    /// A migration names a node the cluster does not know (or this node).
    UnknownNode,
    /// This VM cannot be migrated (not in cluster mode, a disk that is not
    /// vman's own standalone file, a bridge address, snapshots, a migration
    /// under way).
    MigrationRefused,
    /// A disk file arrived damaged (size or SHA-256 not as announced) or
    /// the target's image checks refused it; nothing was kept.
    TransferRefused,
    /// The VM's placement changed while it was being migrated.
    PlacementConflict,
}

impl Reason {
    /// The refusal for this reason; `detail` is the message the client sees.
    pub(crate) fn refuse(self, detail: impl Into<String>) -> ServiceError {
        ServiceError::refused(self, detail)
    }
}

impl From<ImageError> for Reason {
    /// An image the checks refuse; an image operation that failed is
    /// `Reason::ImageFailed`, built by hand.
    fn from(e: ImageError) -> Self {
        Self::ImageRefused(e)
    }
}

impl From<LaunchError> for Reason {
    fn from(e: LaunchError) -> Self {
        match e {
            LaunchError::AlreadyRunning(_) => Self::AlreadyRunning(Some(e)),
            e => Self::QemuFailed(e),
        }
    }
}

impl From<crate::operator::snapshot_qmp::SnapshotQmpError> for Reason {
    fn from(e: crate::operator::snapshot_qmp::SnapshotQmpError) -> Self {
        Self::SnapshotFailed(e)
    }
}

impl From<HotplugError> for Reason {
    fn from(e: HotplugError) -> Self {
        Self::HotplugFailed(e)
    }
}

impl From<std::io::Error> for Reason {
    /// The only refusal caused by a bare i/o error: a console write.
    fn from(e: std::io::Error) -> Self {
        Self::ConsoleWriteFailed(e)
    }
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => Self::NotFound("resource"),
            StoreError::Full(e) => {
                tracing::warn!("database write refused: {e}");
                Self::NoSpace(super::space::NO_SPACE.into())
            }
            StoreError::Damaged(e) => Self::DatabaseDamaged(e),
            other => Self::Internal(other.to_string()),
        }
    }
}

/// One example of every reason, in the order they are declared, for the
/// api layer's test of their codes. A new reason is added here too (the
/// match below fails to compile until it is).
#[cfg(test)]
pub(crate) fn every_reason() -> Vec<Reason> {
    fn io() -> std::io::Error {
        std::io::Error::other("boom")
    }
    fn image() -> ImageError {
        ImageError::Exists { path: "/x".into() }
    }
    let all = vec![
        Reason::AlreadyExists,
        Reason::TemplateMissing,
        Reason::InUse,
        Reason::AlreadyRunning(None),
        Reason::AlreadyRunning(Some(LaunchError::AlreadyRunning(42))),
        Reason::NotRunning,
        Reason::AdoptionPending,
        Reason::Unkillable,
        Reason::NoMemory,
        Reason::QemuFailed(LaunchError::Failed("exit 1".into())),
        Reason::ConsoleNotConnected,
        Reason::ConsoleWriteFailed(io()),
        Reason::TooManyViewers,
        Reason::ImageRefused(image()),
        Reason::ImageFailed(image()),
        Reason::DiskFileRefused(None),
        Reason::DiskFileRefused(Some(image())),
        Reason::DiskAttached,
        Reason::NotAttached,
        Reason::DiskBusy,
        Reason::NoFreeSlot,
        Reason::CannotShrink,
        Reason::GuestDidNotRelease,
        Reason::HotplugFailed(HotplugError::NotReleased(3)),
        Reason::InvalidTransition,
        Reason::PortInUse,
        Reason::NetworkUnavailable,
        Reason::NotUserNetwork,
        Reason::NetworkFailed,
        Reason::SubnetFull,
        Reason::BridgeFailed(crate::operator::bridge::BridgeError::Foreign("br".into())),
        Reason::NotStopped,
        Reason::NoRootDisk,
        Reason::TooManySnapshots,
        Reason::SnapshotInUse,
        Reason::SnapshotFailed(crate::operator::snapshot_qmp::SnapshotQmpError::Job {
            job: "j".into(),
            detail: "x".into(),
        }),
        Reason::DiskInSnapshot,
        Reason::UnknownNode,
        Reason::MigrationRefused,
        Reason::TransferRefused,
        Reason::PlacementConflict,
    ];
    for r in &all {
        match r {
            Reason::AlreadyExists
            | Reason::TemplateMissing
            | Reason::InUse
            | Reason::AlreadyRunning(_)
            | Reason::NotRunning
            | Reason::AdoptionPending
            | Reason::Unkillable
            | Reason::NoMemory
            | Reason::QemuFailed(_)
            | Reason::ConsoleNotConnected
            | Reason::ConsoleWriteFailed(_)
            | Reason::TooManyViewers
            | Reason::ImageRefused(_)
            | Reason::ImageFailed(_)
            | Reason::DiskFileRefused(_)
            | Reason::DiskAttached
            | Reason::NotAttached
            | Reason::DiskBusy
            | Reason::NoFreeSlot
            | Reason::CannotShrink
            | Reason::GuestDidNotRelease
            | Reason::HotplugFailed(_)
            | Reason::InvalidTransition
            | Reason::PortInUse
            | Reason::NetworkUnavailable
            | Reason::NotUserNetwork
            | Reason::NetworkFailed
            | Reason::SubnetFull
            | Reason::BridgeFailed(_)
            | Reason::NotStopped
            | Reason::NoRootDisk
            | Reason::TooManySnapshots
            | Reason::SnapshotInUse
            | Reason::SnapshotFailed(_)
            | Reason::DiskInSnapshot
            | Reason::UnknownNode
            | Reason::MigrationRefused
            | Reason::TransferRefused
            | Reason::PlacementConflict => {}
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn a_refusal_shows_its_detail_and_keeps_its_source() {
        let e = ServiceError::because(HotplugError::NotReleased(3), |e| {
            format!("Cannot unplug the disk: {e}")
        });
        assert_eq!(
            e.to_string(),
            "Cannot unplug the disk: the guest did not release the device within 3 s"
        );
        assert!(matches!(e.reason(), Some(Reason::HotplugFailed(_))));
        let source = e.source().expect("source kept");
        assert_eq!(
            source.to_string(),
            "the guest did not release the device within 3 s"
        );
    }

    #[test]
    fn rewording_keeps_the_reason() {
        let e = ServiceError::refused(Reason::DiskFileRefused(None), "gone")
            .reworded(|d| format!("{d}; detach it"));
        assert_eq!(e.to_string(), "gone; detach it");
        assert!(matches!(e.reason(), Some(Reason::DiskFileRefused(None))));
    }
}
