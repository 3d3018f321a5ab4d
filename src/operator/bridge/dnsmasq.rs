//! The bridge's DHCP server: one dnsmasq per bridge, started by vman in its
//! own session (it outlives a vman restart and is found again by its pid
//! file and command line), serving only static leases (`--dhcp-host`
//! lines in a hosts file it re-reads on SIGHUP), bound to the bridge only.
//! DNS is off (`--port=0`) unless NAT is on, then it answers on the bridge
//! address only (`--bind-interfaces`), never on the host's other addresses.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::BridgeError;
use crate::config::Subnet;
use crate::operator::process::{self, Pid};

/// One bridge's dnsmasq and its files (all in `dir`).
#[derive(Debug, Clone)]
pub struct Dnsmasq {
    pub dir: PathBuf,
    pub bridge: String,
    pub subnet: Subnet,
    pub dns: bool,
}

impl Dnsmasq {
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("dnsmasq.pid")
    }

    pub fn hosts_file(&self) -> PathBuf {
        self.dir.join("dhcp-hosts")
    }

    pub fn log_file(&self) -> PathBuf {
        self.dir.join("dnsmasq.log")
    }

    fn lease_file(&self) -> PathBuf {
        self.dir.join("dnsmasq.leases")
    }

    /// The argument vector (no shell; no /etc/dnsmasq.conf).
    pub fn args(&self) -> Vec<String> {
        let s = self.subnet;
        let mut a = vec![
            "--keep-in-foreground".to_owned(),
            "--conf-file=/dev/null".into(),
            "--no-hosts".into(),
            format!("--interface={}", self.bridge),
            "--bind-interfaces".into(),
            "--except-interface=lo".into(),
            format!("--dhcp-range={},static,{},1h", s.network(), s.netmask()),
            format!("--dhcp-option=option:router,{}", s.gateway()),
            format!("--dhcp-hostsfile={}", self.hosts_file().display()),
            format!("--dhcp-leasefile={}", self.lease_file().display()),
            format!("--pid-file={}", self.pid_file().display()),
            format!("--log-facility={}", self.log_file().display()),
            "--dhcp-authoritative".into(),
        ];
        if self.dns {
            a.push(format!("--listen-address={}", s.gateway()));
            a.push(format!("--dhcp-option=option:dns-server,{}", s.gateway()));
        } else {
            a.push("--port=0".into());
            a.push("--no-resolv".into());
        }
        a
    }

    /// The static leases, one `mac,ip` line each; written whole (temporary
    /// file + rename), world-readable (dnsmasq re-reads it as `nobody`).
    pub fn write_hosts(&self, leases: &[(String, Ipv4Addr)]) -> Result<(), BridgeError> {
        let io =
            |what: &str, e| BridgeError::Io(format!("{what} {}", self.hosts_file().display()), e);
        create_dir(&self.dir)?;
        let text: String = leases
            .iter()
            .map(|(mac, ip)| format!("{mac},{ip}\n"))
            .collect();
        let tmp = self.dir.join(".dhcp-hosts.tmp");
        std::fs::write(&tmp, text).map_err(|e| io("write", e))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| io("chmod", e))?;
        std::fs::rename(&tmp, self.hosts_file()).map_err(|e| io("rename", e))
    }

    /// The running dnsmasq of this bridge: the pid file's process, if its
    /// command line is dnsmasq with this pid file.
    pub fn running(&self) -> Option<Pid> {
        let pid = process::read_pid(&self.pid_file())?;
        is_ours(pid.get(), &self.pid_file()).then_some(pid)
    }

    /// Starts dnsmasq (in its own session) and waits until it wrote its pid
    /// file; its log tail is the error when it exits first.
    pub fn start(&self) -> Result<Pid, BridgeError> {
        create_dir(&self.dir)?;
        if !self.hosts_file().exists() {
            self.write_hosts(&[])?;
        }
        let _ = std::fs::remove_file(self.pid_file());
        let binary = super::which("dnsmasq").unwrap_or_else(|| "dnsmasq".into());
        let mut cmd = std::process::Command::new(binary);
        cmd.args(self.args())
            .current_dir(&self.dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        // SAFETY: setsid(2) is async-signal-safe and touches no memory of
        // the parent; it runs in the child between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| BridgeError::Dnsmasq(format!("cannot start: {e}")))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return Err(BridgeError::Dnsmasq(format!(
                    "exited at start ({status}): {}",
                    err.trim()
                )));
            }
            if let Some(pid) = self.running() {
                // Reap it whenever it ends, so a dead dnsmasq is not a zombie
                // that still looks alive.
                std::thread::spawn(move || {
                    let _ = child.wait();
                });
                return Ok(pid);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(BridgeError::Dnsmasq(
                    "did not write its pid file within 10 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Makes dnsmasq re-read the hosts file.
    pub fn reload(&self) -> Result<(), BridgeError> {
        let pid = self
            .running()
            .ok_or_else(|| BridgeError::Dnsmasq("not running".into()))?;
        process::kill(pid, libc::SIGHUP).map_err(|e| BridgeError::Io("SIGHUP dnsmasq".into(), e))
    }

    /// Stops it (SIGTERM, then SIGKILL after 3 s); true when one ran.
    pub fn stop(&self) -> bool {
        let Some(pid) = self.running() else {
            return false;
        };
        let _ = process::kill(pid, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while is_ours(pid.get(), &self.pid_file()) {
            if Instant::now() > deadline {
                let _ = process::kill(pid, libc::SIGKILL);
                std::thread::sleep(Duration::from_millis(50));
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(self.pid_file());
        true
    }
}

fn is_ours(pid: i32, pid_file: &Path) -> bool {
    let want = format!("--pid-file={}", pid_file.display());
    process::cmdline(pid).is_some_and(|args| {
        args.first().is_some_and(|a| a.ends_with("dnsmasq")) && args.contains(&want)
    })
}

fn create_dir(dir: &Path) -> Result<(), BridgeError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| BridgeError::Io(format!("create {}", dir.display()), e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| BridgeError::Io(format!("chmod {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(dns: bool) -> Dnsmasq {
        Dnsmasq {
            dir: "/run/vman/bridge-x".into(),
            bridge: "br-vman".into(),
            subnet: Subnet::parse("192.168.100.0/24").unwrap(),
            dns,
        }
    }

    #[test]
    fn static_leases_only_on_the_bridge_and_no_dns_without_nat() {
        let a = d(false).args();
        assert!(a.contains(&"--dhcp-range=192.168.100.0,static,255.255.255.0,1h".to_owned()));
        assert!(a.contains(&"--interface=br-vman".to_owned()));
        assert!(a.contains(&"--bind-interfaces".to_owned()));
        assert!(a.contains(&"--port=0".to_owned()));
        assert!(a.contains(&"--conf-file=/dev/null".to_owned()));
        let a = d(true).args();
        assert!(!a.contains(&"--port=0".to_owned()));
        assert!(a.contains(&"--listen-address=192.168.100.1".to_owned()));
    }
}
