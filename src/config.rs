//! Configuration: one `Config` struct, filled from `vman serve` flags, then
//! `VMAN_*` environment variables, then `.env` (loaded by `main` without
//! overriding the environment), then defaults. The doc comments become
//! `--help`. `.env.example` lists every variable with its default.

use clap::builder::TypedValueParser;
use clap::{Args, ValueEnum};
use std::net::IpAddr;

use crate::model::{Accel, NetworkMode, UserNet};
use std::path::{Path, PathBuf};

mod bridge;
pub mod cluster;
pub use bridge::{BridgeConfig, Subnet};
pub use cluster::ClusterConfig;

#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on. Beyond loopback an API token is required.
    #[arg(long, env = "VMAN_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,

    /// TCP port to listen on (0 picks a free one; the chosen port is logged).
    #[arg(long, env = "VMAN_PORT", default_value_t = 8000)]
    pub port: u16,

    /// Folder for VM folders, data disks, templates and the database.
    #[arg(long, env = "VMAN_STORAGE_PATH", default_value = "/var/lib/vman")]
    pub storage_path: PathBuf,

    /// SQLite database file [default: {storage}/vman.db].
    #[arg(long, env = "VMAN_DB_PATH")]
    pub db_path: Option<PathBuf>,

    /// qcow2 (or raw) image copied to a VM's root disk at its first start.
    #[arg(long, env = "VMAN_DEFAULT_BOOT_DISK")]
    pub default_boot_disk: Option<PathBuf>,

    /// How the default boot disk becomes a root disk: `copy` (independent
    /// file) or `overlay` (qcow2 linked clone; the default must stay in place).
    #[arg(long, env = "VMAN_BOOT_DISK_MODE", value_enum, default_value_t = BootDiskMode::Copy)]
    pub boot_disk_mode: BootDiskMode,

    /// Colon-separated folders from which `qcow2_path` and `boot_disk` may be
    /// taken [default: {storage}/templates and the default boot disk's folder].
    #[arg(long, env = "VMAN_IMAGE_DIRS", value_delimiter = ':')]
    pub image_dirs: Vec<PathBuf>,

    /// Log level: debug, info, warning, error.
    #[arg(long, env = "VMAN_LOG_LEVEL", default_value = "info", value_parser = parse_log_level)]
    pub log_level: LogLevel,

    /// Folder of the rotated log file `vman.log`.
    #[arg(long, env = "VMAN_LOG_DIR", default_value = "./logs")]
    pub log_dir: PathBuf,

    /// Size at which `vman.log` is rotated.
    #[arg(long, env = "VMAN_LOG_MAX_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub log_max_bytes: u64,

    /// How many rotated log files are kept.
    #[arg(long, env = "VMAN_LOG_BACKUP_COUNT", default_value_t = 5)]
    pub log_backup_count: u32,

    /// Bearer token required on every route (/health without it answers only
    /// its status). Mandatory when listening beyond loopback; at least 16
    /// non-space characters.
    #[arg(long, env = "VMAN_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,

    /// Comma-separated host names accepted in `Host` and `Origin` besides the
    /// loopback ones (localhost, 127.0.0.1, [::1]); `*` accepts any host.
    /// [default: loopback names only when listening on loopback, any host
    /// otherwise]
    #[arg(long, env = "VMAN_ALLOWED_HOSTS", value_delimiter = ',', value_parser = parse_allowed_host)]
    pub allowed_hosts: Vec<String>,

    /// Seconds a client may take to send a request's headers (also the idle
    /// time of a kept-alive connection) before it is closed.
    #[arg(long, env = "VMAN_HEADER_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_timeout: u64,

    /// Snapshots per VM at most (also capped by the backing chain depth
    /// limit of 16 files).
    #[arg(long, env = "VMAN_MAX_SNAPSHOTS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_snapshots: u32,

    /// Open client connections at most; further clients wait until one closes.
    #[arg(long, env = "VMAN_MAX_CONNECTIONS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_connections: u32,

    /// Accelerator: auto = KVM when /dev/kvm opens and this host is not
    /// itself a VM (no `hypervisor` CPU flag), else TCG, so a nested host
    /// gets TCG (nested KVM guests fail); kvm or tcg force one.
    // `std::option::Option` spelled out: clap reads the value (`auto` = None)
    // instead of making the flag optional.
    #[arg(long, env = "VMAN_ACCEL", default_value = "auto",
          value_parser = clap::builder::PossibleValuesParser::new(["auto", "kvm", "tcg"]).map(|s| parse_accel(&s)))]
    pub accel: std::option::Option<Accel>,

    /// QEMU system emulator binary.
    #[arg(long, env = "VMAN_QEMU_BINARY", default_value = "qemu-system-x86_64")]
    pub qemu_binary: PathBuf,

    /// qemu-img binary.
    #[arg(long, env = "VMAN_QEMU_IMG", default_value = "qemu-img")]
    pub qemu_img: PathBuf,

    /// Seconds a graceful stop waits for the guest before forcing QEMU off.
    #[arg(long, env = "VMAN_STOP_TIMEOUT", default_value_t = 30)]
    pub stop_timeout: u64,

    /// Running VMs may use up to host memory times this factor.
    #[arg(long, env = "VMAN_MEMORY_OVERCOMMIT", default_value_t = 1.0, value_parser = parse_overcommit)]
    pub memory_overcommit: f64,

    /// Seconds between two coherence passes of the observer (1..=5).
    #[arg(long, env = "VMAN_OBSERVER_INTERVAL", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=5))]
    pub observer_interval: u64,

    /// Bytes of serial console kept on disk per VM.
    #[arg(long, env = "VMAN_CONSOLE_MAX_BYTES", default_value_t = 1024 * 1024, value_parser = clap::value_parser!(u64).range(4096..))]
    pub console_max_bytes: u64,

    /// Hot-pluggable PCIe root ports reserved per VM for data disks.
    #[arg(long, env = "VMAN_HOTPLUG_SLOTS", default_value_t = 8, value_parser = clap::value_parser!(u8).range(0..=30))]
    pub hotplug_slots: u8,

    /// Seconds a hot-unplug waits for the guest to release the device (the
    /// unplug request is sent again every 6 s meanwhile).
    #[arg(long, env = "VMAN_DETACH_TIMEOUT", default_value_t = 10)]
    pub detach_timeout: u64,

    /// At start-up run `PRAGMA integrity_check` (reads every index too)
    /// instead of the default `PRAGMA quick_check`.
    #[arg(long, env = "VMAN_CHECK_DB", action = clap::ArgAction::Set, num_args = 0..=1,
          default_value = "false", default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub check_db: bool,

    /// MiB set aside next to the database (`{db}-reserve`) and given up on
    /// a full filesystem so that state changes can still be recorded (0: none).
    #[arg(long, env = "VMAN_DB_RESERVE_MIB", default_value_t = 4)]
    pub db_reserve_mib: u64,

    /// Unprivileged user QEMU switches to (created by scripts/setup.sh).
    /// Empty, or vman not running as root: QEMU keeps vman's user.
    #[arg(long, env = "VMAN_QEMU_USER", default_value = "vman-qemu")]
    pub qemu_user: String,

    /// CPU weight of each QEMU process against other processes
    /// (100 = like any other; cgroup cpu.weight, or nice without cgroups),
    /// or `off`.
    #[arg(long, env = "VMAN_QEMU_CPU_WEIGHT", default_value = "10", value_parser = parse_cpu_weight)]
    pub qemu_cpu_weight: CpuWeight,

    /// Events kept in the database (GET /events); older ones are dropped.
    #[arg(long, env = "VMAN_EVENTS_KEEP", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub events_keep: u64,

    /// Network of a VM created without `network.mode`: user (rootless
    /// user-mode networking with port forwards), bridge (root) or none.
    #[arg(long, env = "VMAN_NETWORK_MODE", default_value = "user",
          value_parser = clap::builder::PossibleValuesParser::new(["user", "bridge", "none"])
              .map(|s| NetworkMode::parse(&s).unwrap_or(NetworkMode::None)))]
    pub network_mode: NetworkMode,

    /// User-mode backend: slirp (QEMU's built-in user networking, with the
    /// metadata relay) or passt (the passt daemon; needs the `passt` binary).
    #[arg(long, env = "VMAN_USER_NET", default_value = "slirp",
          value_parser = clap::builder::PossibleValuesParser::new(["slirp", "passt"])
              .map(|s| if s == "passt" { UserNet::Passt } else { UserNet::Slirp }))]
    pub user_net: UserNet,

    /// Host address the port forwards of user-mode VMs listen on.
    #[arg(long, env = "VMAN_FORWARD_ADDRESS", default_value = "127.0.0.1")]
    pub forward_address: IpAddr,

    /// passt binary (VMAN_USER_NET=passt).
    #[arg(long, env = "VMAN_PASST_BINARY", default_value = "passt")]
    pub passt_binary: PathBuf,

    /// User passt runs as when vman is root (its own user, not QEMU's: the
    /// nftables guard table keeps this user's connections off the host's
    /// own addresses, while QEMU needs loopback for the metadata relay).
    #[arg(long, env = "VMAN_PASST_USER", default_value = "vman-passt")]
    pub passt_user: String,

    /// Name of the nftables table (family inet) that keeps user-mode guests
    /// of a root vman off the host's own addresses (see README).
    #[arg(long, env = "VMAN_GUARD_TABLE", default_value = "vman_guard", value_parser = parse_table_name)]
    pub guard_table: String,

    #[command(flatten)]
    pub bridge: BridgeConfig,

    #[command(flatten)]
    pub cluster: ClusterConfig,
}

/// An nftables table name: letters, digits and `_`, at most 32 bytes.
fn parse_table_name(raw: &str) -> Result<String, String> {
    let ok = !raw.is_empty()
        && raw.len() <= 32
        && raw.starts_with(|c: char| c.is_ascii_alphabetic())
        && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(raw.to_owned())
    } else {
        Err("expected a table name: a letter, then letters, digits or _ (at most 32)".into())
    }
}

/// `VMAN_QEMU_CPU_WEIGHT`: off, or 1..=10000 on cgroup v2's scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuWeight {
    Off,
    Weight(u32),
}

fn parse_cpu_weight(raw: &str) -> Result<CpuWeight, String> {
    let raw = raw.trim();
    if raw.eq_ignore_ascii_case("off") {
        return Ok(CpuWeight::Off);
    }
    match raw.parse::<u32>() {
        Ok(w) if (1..=10_000).contains(&w) => Ok(CpuWeight::Weight(w)),
        _ => Err("expected off or a weight from 1 to 10000 (100 = like any other process)".into()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BootDiskMode {
    Copy,
    Overlay,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warning,
    Error,
}

impl LogLevel {
    pub fn as_filter(self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warning => "warn",
            Self::Error => "error",
        }
    }
}

fn parse_log_level(raw: &str) -> Result<LogLevel, String> {
    match raw.to_ascii_lowercase().as_str() {
        "debug" | "trace" => Ok(LogLevel::Debug),
        "info" => Ok(LogLevel::Info),
        "warning" | "warn" => Ok(LogLevel::Warning),
        "error" | "critical" => Ok(LogLevel::Error),
        _ => Err("expected one of debug, info, warning, error".into()),
    }
}

/// One `VMAN_ALLOWED_HOSTS` entry: a host name or IP address without scheme,
/// port or path (IPv6 in brackets), or `*`. Stored lowercase.
fn parse_allowed_host(raw: &str) -> Result<String, String> {
    let host = raw.trim().trim_end_matches('.').to_ascii_lowercase();
    let ipv6 = host.starts_with('[') && host.ends_with(']') && host.len() > 2;
    let plain = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if host == "*"
        || plain
        || ipv6
            && host[1..host.len() - 1]
                .parse::<std::net::Ipv6Addr>()
                .is_ok()
    {
        Ok(host)
    } else {
        Err(format!(
            "{raw:?} is not a host name (give names like vman.example.org or [::1], without scheme or port, or *)"
        ))
    }
}

/// `VMAN_ACCEL`: `kvm` or `tcg`, or None for `auto` (decided at start-up
/// by `operator::qemu::detect_accel`).
fn parse_accel(raw: &str) -> Option<Accel> {
    match raw {
        "kvm" => Some(Accel::Kvm),
        "tcg" => Some(Accel::Tcg),
        _ => None,
    }
}

fn parse_overcommit(raw: &str) -> Result<f64, String> {
    match raw.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 100.0 => Ok(v),
        _ => Err("expected a number greater than 0 (1.0 = no overcommit)".into()),
    }
}

/// Fewest non-space characters of `VMAN_API_TOKEN`.
pub const MIN_TOKEN_CHARS: usize = 16;

/// A configuration that parsed but cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("VMAN_STORAGE_PATH {0} exists and is not a directory")]
    StorageNotDir(PathBuf),
    #[error("cannot create VMAN_STORAGE_PATH {0}: {1}")]
    StorageCreate(PathBuf, std::io::Error),
    #[error(
        "refusing to listen on {0} without VMAN_API_TOKEN: set a token or listen on a loopback address"
    )]
    TokenRequired(IpAddr),
    #[error("VMAN_API_TOKEN must have at least {MIN_TOKEN_CHARS} non-space characters (e.g. `openssl rand -hex 32`)")]
    WeakToken,
    #[error("{0}")]
    Cluster(String),
}

impl Config {
    /// Checks what clap cannot: relations between values and the file system.
    /// Creates the storage folder when missing.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(token) = &self.api_token {
            if token.chars().filter(|c| !c.is_whitespace()).count() < MIN_TOKEN_CHARS {
                return Err(ConfigError::WeakToken);
            }
        }
        if !self.host.is_loopback() && self.api_token.is_none() {
            return Err(ConfigError::TokenRequired(self.host));
        }
        cluster::check(&self.cluster).map_err(ConfigError::Cluster)?;
        let storage = &self.storage_path;
        if storage.exists() && !storage.is_dir() {
            return Err(ConfigError::StorageNotDir(storage.clone()));
        }
        std::fs::create_dir_all(storage)
            .map_err(|e| ConfigError::StorageCreate(storage.clone(), e))?;
        Ok(())
    }

    pub fn db_path(&self) -> PathBuf {
        self.db_path
            .clone()
            .unwrap_or_else(|| self.storage_path.join("vman.db"))
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.storage_path.join("vms")
    }

    pub fn disks_dir(&self) -> PathBuf {
        self.storage_path.join("disks")
    }

    pub fn templates_dir(&self) -> PathBuf {
        self.storage_path.join("templates")
    }

    /// Folders that explicit disk paths must resolve into.
    pub fn allowed_image_dirs(&self) -> Vec<PathBuf> {
        if !self.image_dirs.is_empty() {
            return self.image_dirs.clone();
        }
        let mut dirs = vec![self.templates_dir()];
        if let Some(parent) = self.default_boot_disk.as_deref().and_then(Path::parent) {
            if !parent.as_os_str().is_empty() {
                dirs.push(parent.to_path_buf());
            }
        }
        dirs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        config: Config,
    }

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        let mut argv = vec!["vman"];
        argv.extend_from_slice(args);
        Wrap::try_parse_from(argv).map(|w| w.config)
    }

    #[test]
    fn log_levels_accept_python_names() {
        assert_eq!(parse_log_level("WARNING"), Ok(LogLevel::Warning));
        assert_eq!(parse_log_level("Info"), Ok(LogLevel::Info));
        assert!(parse_log_level("loud").is_err());
    }

    #[test]
    fn cpu_weight_is_off_or_1_to_10000() {
        assert_eq!(parse_cpu_weight("off"), Ok(CpuWeight::Off));
        assert_eq!(parse_cpu_weight("OFF"), Ok(CpuWeight::Off));
        assert_eq!(parse_cpu_weight("10"), Ok(CpuWeight::Weight(10)));
        for bad in ["0", "10001", "-1", "", "ten"] {
            assert!(parse_cpu_weight(bad).is_err(), "{bad}");
        }
        let c = parse(&[]).unwrap();
        assert_eq!(c.qemu_cpu_weight, CpuWeight::Weight(10));
        assert_eq!(c.qemu_user, "vman-qemu");
    }

    #[test]
    fn network_settings_default_to_user_slirp_on_loopback() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.network_mode, NetworkMode::User);
        assert_eq!(c.user_net, UserNet::Slirp);
        assert_eq!(c.forward_address.to_string(), "127.0.0.1");
        assert_eq!(c.guard_table, "vman_guard");
        let c = parse(&["--network-mode", "none", "--user-net", "passt"]).unwrap();
        assert_eq!(
            (c.network_mode, c.user_net),
            (NetworkMode::None, UserNet::Passt)
        );
        for bad in [
            ["--network-mode", "nat"],
            ["--user-net", "tap"],
            ["--guard-table", "a b"],
            ["--forward-address", "localhost"],
        ] {
            assert!(parse(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bad_port_is_refused() {
        assert!(parse(&["--port", "eighty"]).is_err());
        assert!(parse(&["--port", "70000"]).is_err());
    }

    #[test]
    fn public_host_needs_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = dir.path().to_str().expect("utf8");
        let c = parse(&["--host", "0.0.0.0", "--storage-path", storage]).expect("parses");
        assert!(matches!(c.validate(), Err(ConfigError::TokenRequired(_))));
        let c = parse(&[
            "--host",
            "0.0.0.0",
            "--storage-path",
            storage,
            "--api-token",
            "0123456789abcdef",
        ])
        .expect("parses");
        assert!(c.validate().is_ok());
    }

    #[test]
    fn short_or_blank_token_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = dir.path().to_str().expect("utf8");
        for token in ["", "                    ", "short", " 0123456789abcde "] {
            let c = parse(&["--storage-path", storage, "--api-token", token]).expect("parses");
            assert!(
                matches!(c.validate(), Err(ConfigError::WeakToken)),
                "{token:?}"
            );
        }
    }

    #[test]
    fn accel_auto_is_decided_at_start_up_and_kvm_or_tcg_force_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = dir.path().to_str().expect("utf8");
        for (arg, want) in [
            ("auto", None),
            ("kvm", Some(Accel::Kvm)),
            ("tcg", Some(Accel::Tcg)),
        ] {
            let c = parse(&["--storage-path", storage, "--accel", arg]).expect("parses");
            assert_eq!(c.accel, want, "{arg}");
        }
        for bad in ["", "KVM", "hvf", "none"] {
            assert!(
                parse(&["--storage-path", storage, "--accel", bad]).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn allowed_hosts_are_names_without_port() {
        assert_eq!(parse_allowed_host(" VMAN.lan. "), Ok("vman.lan".into()));
        assert_eq!(parse_allowed_host("[::1]"), Ok("[::1]".into()));
        assert_eq!(parse_allowed_host("*"), Ok("*".into()));
        for bad in ["", "http://x", "x:80", "a b", "[zz]", "x/y"] {
            assert!(parse_allowed_host(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn storage_that_is_a_file_is_refused() {
        let file = tempfile::NamedTempFile::new().expect("tempfile");
        let c = parse(&["--storage-path", file.path().to_str().expect("utf8")]).expect("parses");
        assert!(matches!(c.validate(), Err(ConfigError::StorageNotDir(_))));
    }

    #[test]
    fn image_dirs_default_to_templates_and_default_disk_folder() {
        let c = parse(&[
            "--storage-path",
            "/s",
            "--default-boot-disk",
            "/images/base.qcow2",
        ])
        .expect("parses");
        assert_eq!(
            c.allowed_image_dirs(),
            vec![PathBuf::from("/s/templates"), PathBuf::from("/images")]
        );
    }
}
