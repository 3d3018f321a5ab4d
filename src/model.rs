//! Domain types shared by every layer: validated names, sizes, and the VM
//! state machine. Parsing happens here, so an invalid name or an impossible
//! size cannot reach the store or the operator.

use serde::{Deserialize, Serialize};
use std::fmt;
use utoipa::ToSchema;

/// Why a value given by a user was refused. The string names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: &'static str,
    pub message: String,
}

impl Invalid {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

/// The rule of `Name`, as a regular expression (for the OpenAPI document).
pub const NAME_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$";

/// A template name, VM id or disk id: `^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`.
///
/// The rule keeps every name usable as one path component: no `/`, no `..`,
/// no leading dot, nothing longer than 63 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, ToSchema)]
#[serde(transparent)]
pub struct Name(String);

impl Name {
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, Invalid> {
        let bytes = raw.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.len() <= 63
            && bytes[0].is_ascii_alphanumeric()
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(Invalid::new(
                field,
                "must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$ (letters, digits, '.', '_', '-'; \
                 starting with a letter or digit; at most 63 characters)",
            ))
        }
    }

    /// A fresh UUID v4, used as a VM id when no name is given.
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }

    /// Wraps a value read back from our own database, which only ever stores
    /// parsed names.
    pub(crate) fn from_trusted(raw: String) -> Self {
        Self(raw)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<std::path::Path> for Name {
    fn as_ref(&self) -> &std::path::Path {
        std::path::Path::new(&self.0)
    }
}

/// The state of a VM as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Stopped,
    Running,
    Error,
}

/// What happened to a VM; the transition table (`VmState::next`) says
/// which state it leads to. Every write of a VM's state is one of these,
/// recorded by `Service::record` (`service/record.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmEvent {
    /// QEMU started and answered QMP.
    Started,
    /// QEMU did not start (nothing runs).
    Failed,
    /// QEMU is gone after a stop we asked for, or a clean guest power-off.
    Halted,
    /// QEMU ended without being asked to: it crashed, or it was found gone
    /// (at start-up, by the observer, before its adoption).
    Gone,
    /// A QEMU vman did not manage (adoption pending, or found by its
    /// command line) was killed by pid.
    Killed,
    /// A running QEMU vman did not start was taken over (it answered QMP).
    Adopted,
    /// A running QEMU vman did not start does not answer QMP yet; it is
    /// recorded running while adoption is retried.
    AdoptionPending,
}

impl VmEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Failed => "failed",
            Self::Halted => "halted",
            Self::Gone => "gone",
            Self::Killed => "killed",
            Self::Adopted => "adopted",
            Self::AdoptionPending => "adoption pending",
        }
    }

    /// The event records that a QEMU already ended: its write must land
    /// even on a full disk (through the database's space reserve), or the
    /// VM would stay recorded `running`.
    pub fn records_an_end(self) -> bool {
        matches!(self, Self::Halted | Self::Gone | Self::Killed)
    }
}

impl fmt::Display for VmEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stopped => "stopped",
            Self::Running => "running",
            Self::Error => "error",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "stopped" => Some(Self::Stopped),
            "running" => Some(Self::Running),
            "error" => Some(Self::Error),
            _ => None,
        }
    }

    /// The transition table. `None` means the event makes no sense in this
    /// state (for example starting a running VM), which the service reports
    /// as a refused transition.
    pub fn next(self, event: VmEvent) -> Option<Self> {
        use VmEvent::{Adopted, AdoptionPending, Failed, Gone, Halted, Killed, Started};
        use VmState::{Error, Running, Stopped};
        match (self, event) {
            (Stopped | Error, Started) => Some(Running),
            // A start that fails leaves a stopped VM in error, so the user
            // sees `last_error`; an errored VM can be started again.
            (Stopped | Error, Failed) => Some(Error),
            (Running | Error, Halted) => Some(Stopped),
            (Running, Gone) => Some(Error),
            // An unmanaged QEMU can run whatever the record says.
            (_, Killed) => Some(Stopped),
            // A QEMU found running is the VM's, whatever the record says.
            (_, Adopted | AdoptionPending) => Some(Running),
            (Running, Started | Failed) | (Stopped, Halted) | (Stopped | Error, Gone) => None,
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Memory of a template, kept in MiB; the API speaks GiB (`ram_amount`) or
/// MiB (`ram_mib`).
pub const MAX_RAM_MIB: u64 = 16 * 1024 * 1024;
pub const MIN_RAM_MIB: u64 = 16;
pub const MAX_CPUS: u32 = 512;
/// Largest disk size in GiB (`size`, `disk_size_gb`).
pub const MAX_DISK_GB: u64 = 64 * 1024;

/// Bytes in a GiB. Every disk size the API takes (`size` of data disks,
/// `disk_size_gb` of templates) and the empty fallback root disk are GiB,
/// as `qemu-img create ... {size}G` and the first VMAN.
pub const GIB: u64 = 1 << 30;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_are_paths_are_refused() {
        for bad in [
            "",
            "..",
            ".hidden",
            "a/b",
            "../../etc",
            "a b",
            "-x",
            "é",
            "a\0b",
            &"x".repeat(64),
        ] {
            assert!(Name::parse("name", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["a", "my-vm", "vm_1.2", "A9", &"x".repeat(63)] {
            assert!(Name::parse("name", good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn generated_names_are_valid_uuids() {
        let n = Name::generate();
        assert!(Name::parse("id", n.as_str()).is_ok());
        assert!(uuid::Uuid::parse_str(n.as_str()).is_ok());
    }

    #[test]
    fn transition_table() {
        use VmEvent::*;
        use VmState::{Error, Running, Stopped};
        let table = [
            // (from, event, to)
            (Stopped, Started, Some(Running)),
            (Error, Started, Some(Running)),
            (Running, Started, None),
            (Stopped, Failed, Some(Error)),
            (Error, Failed, Some(Error)),
            (Running, Failed, None),
            (Running, Halted, Some(Stopped)),
            (Error, Halted, Some(Stopped)),
            (Stopped, Halted, None),
            (Running, Gone, Some(Error)),
            (Stopped, Gone, None),
            (Error, Gone, None),
            (Running, Killed, Some(Stopped)),
            (Stopped, Killed, Some(Stopped)),
            (Error, Killed, Some(Stopped)),
            (Running, Adopted, Some(Running)),
            (Stopped, Adopted, Some(Running)),
            (Error, Adopted, Some(Running)),
            (Running, AdoptionPending, Some(Running)),
            (Stopped, AdoptionPending, Some(Running)),
            (Error, AdoptionPending, Some(Running)),
        ];
        for (from, event, to) in table {
            assert_eq!(from.next(event), to, "{from} + {event}");
        }
        // Every (state, event) pair is in the table above.
        assert_eq!(table.len(), 3 * 7);
    }

    #[test]
    fn only_events_that_record_an_end_use_the_space_reserve() {
        use VmEvent::*;
        for e in [Halted, Gone, Killed] {
            assert!(e.records_an_end(), "{e}");
            assert_ne!(VmState::Running.next(e), Some(VmState::Running));
        }
        for e in [Started, Failed, Adopted, AdoptionPending] {
            assert!(!e.records_an_end(), "{e}");
        }
    }

    #[test]
    fn state_round_trips() {
        for s in [VmState::Stopped, VmState::Running, VmState::Error] {
            assert_eq!(VmState::parse(s.as_str()), Some(s));
        }
        assert_eq!(VmState::parse("paused"), None);
    }
}

/// A VM size.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub name: Name,
    pub cpu_count: u32,
    pub ram_mib: u64,
    /// Root disks are grown to this size after the copy (never shrunk).
    pub disk_size_gb: Option<u64>,
    pub created_at: String,
}

/// The accelerator a VM runs with (`VMAN_ACCEL`; `auto` picks one of
/// these at start-up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

/// How a stop ended (the operator does it; the API reports it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StopMethod {
    /// The guest powered off after the ACPI power button.
    Acpi,
    /// QEMU quit on QMP `quit`.
    Quit,
    /// QEMU was killed with SIGKILL.
    Killed,
    /// QEMU was already gone.
    AlreadyExited,
}

/// The format of a disk image, as vman pins it and passes it to QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Qcow2,
    Raw,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }

    /// The format named by qemu-img, if it is one we support.
    pub fn parse(s: &str) -> Option<ImageFormat> {
        match s {
            "qcow2" => Some(ImageFormat::Qcow2),
            "raw" => Some(ImageFormat::Raw),
            _ => None,
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a VM's root disk came from at its last start (see shared/api.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RootDiskSource {
    Explicit,
    Existing,
    Default,
    BootDisk,
    Empty,
}

impl RootDiskSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Explicit => "explicit",
            Self::Existing => "existing",
            Self::Default => "default",
            Self::BootDisk => "boot_disk",
            Self::Empty => "empty",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        [
            Self::Explicit,
            Self::Existing,
            Self::Default,
            Self::BootDisk,
            Self::Empty,
        ]
        .into_iter()
        .find(|s| s.as_str() == raw)
    }
}

/// A VM as the store keeps it, with its template joined in.
#[derive(Debug, Clone, PartialEq)]
pub struct Vm {
    pub id: Name,
    pub template: Template,
    pub state: VmState,
    pub local_ip: Option<String>,
    /// Explicit root disk given at creation (used as is).
    pub qcow2_path: Option<String>,
    /// Image to copy instead of the default boot disk.
    pub boot_disk: Option<String>,
    /// Formats pinned when the images were accepted (None: not yet).
    pub qcow2_path_format: Option<ImageFormat>,
    pub boot_disk_format: Option<ImageFormat>,
    pub root_disk_format: Option<ImageFormat>,
    pub root_disk_source: Option<RootDiskSource>,
    pub root_disk_path: Option<String>,
    pub root_disk_size: Option<u64>,
    pub pid: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// Cloud-init metadata of a VM; `None` fields were never set.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Metadata {
    pub hostname: Option<String>,
    pub user_data: Option<String>,
    pub ssh_keys: Option<Vec<String>>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
}

/// A partial update of metadata: only `Some` fields change.
#[derive(Debug, Clone, Default)]
pub struct MetadataPatch {
    pub hostname: Option<String>,
    pub user_data: Option<String>,
    pub ssh_keys: Option<Vec<String>>,
}

/// Current time as stored and shown: RFC 3339 UTC with milliseconds.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// How a VM is networked (`POST /vms` `network.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    User,
    Bridge,
    None,
}

/// The VM's stable MAC address: QEMU's locally administered prefix
/// 52:54:00 and three bytes of a stable hash (FNV-1a) of its id.
pub fn mac_for(vm_id: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in vm_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[5], b[6], b[7])
}
