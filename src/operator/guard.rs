//! The nftables table that keeps passt's guests of a root vman off the
//! host itself. passt runs as `VMAN_PASST_USER` (its own user: QEMU's user
//! needs loopback for the slirp metadata relay, whose plumbing libslirp
//! builds over a TCP connection to 127.0.0.1); every new connection such a
//! process opens on behalf of a guest to a local address of the host
//! (loopback, any address the host owns: `fib daddr type local`) or to
//! 169.254.169.254 (the host's own cloud metadata) is rejected, except DNS
//! (port 53) to the host's resolver. Guests keep the outside network; the
//! vman API and every other host service stay out of reach. slirp guests
//! need no table: slirp always runs with `restrict=on` (see
//! `service::network`). Created when a passt VM starts (and at start-up
//! when VMs run; a stale one is removed then), replaced atomically each
//! time, removed when no VM of this vman runs or starts any more (and at a
//! clean exit in that case).

use std::io::Write;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("cannot run nft: {0}")]
    Spawn(std::io::Error),
    #[error("nft refused the guard table: {0}")]
    Nft(String),
}

/// The ruleset of table `inet <table>` for processes of uid `uid`, as one
/// `nft -f` script that replaces any earlier version atomically.
pub fn script(table: &str, uid: u32) -> String {
    format!(
        "table inet {table} {{}}
delete table inet {table}
table inet {table} {{
  chain output {{
    type filter hook output priority 0; policy accept;
    meta skuid {uid} ct state new jump guest
  }}
  chain guest {{
    fib daddr type local udp dport 53 accept
    fib daddr type local tcp dport 53 accept
    ip daddr 169.254.169.254 reject
    fib daddr type local reject
    ip daddr 127.0.0.0/8 reject
    ip6 daddr ::1 reject
  }}
}}
"
    )
}

fn nft(args: &[&str], input: Option<&str>) -> Result<String, GuardError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(GuardError::Spawn)?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(GuardError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(GuardError::Spawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(GuardError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// At start-up: as root (QEMU switches to `run_as`) the guard is
/// available when nft works. The table itself exists only while user-mode
/// VMs may run: created (or reconciled) now when `needed` (VMs recorded
/// running), else a table left by a crash is removed; every start of a
/// user-mode VM re-applies it. Without root there is no guard and slirp
/// runs with `restrict=on`.
pub fn start(table: &str, uid: Option<u32>, needed: bool) -> bool {
    let Some(uid) = uid else {
        tracing::info!(
            "user-mode networking: no nftables guard (not root, or no passt user); slirp \
             guests are restricted to their forwards and metadata (restrict=on)"
        );
        return false;
    };
    let done = if needed {
        ensure(table, uid)
    } else {
        nft(&["list", "tables"], None).and_then(|_| remove(table))
    };
    match done {
        Ok(()) => {
            tracing::info!(
                "user-mode networking: nftables table inet {table} keeps guests (uid {}) off \
                 the host's own addresses{}",
                uid,
                if needed {
                    ""
                } else {
                    " (made at the first start)"
                }
            );
            true
        }
        Err(e) => {
            tracing::warn!(
                "user-mode networking: nftables unusable ({e}); passt guests are not kept off \
                 the host's addresses"
            );
            false
        }
    }
}

/// Creates or replaces the table.
pub fn ensure(table: &str, uid: u32) -> Result<(), GuardError> {
    nft(&["-f", "-"], Some(&script(table, uid))).map(|_| ())
}

/// True when the table exists.
pub fn exists(table: &str) -> bool {
    nft(&["list", "table", "inet", table], None).is_ok()
}

/// Removes the table (nothing when it is not there).
pub fn remove(table: &str) -> Result<(), GuardError> {
    if !exists(table) {
        return Ok(());
    }
    nft(&["delete", "table", "inet", table], None).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_rejects_local_and_metadata_but_lets_dns_through() {
        let s = script("vman_guard", 999);
        assert!(s.contains("meta skuid 999 ct state new jump guest"));
        let dns = s.find("udp dport 53 accept").expect("dns");
        let local = s.find("fib daddr type local reject").expect("local");
        assert!(dns < local, "DNS must be accepted before local is rejected");
        assert!(s.contains("ip daddr 169.254.169.254 reject"));
        assert!(s.contains("ip6 daddr ::1 reject"));
        // Replaces an earlier version in one transaction.
        assert!(s.starts_with("table inet vman_guard {}\ndelete table inet vman_guard\n"));
    }
}
