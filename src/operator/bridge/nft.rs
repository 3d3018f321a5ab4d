//! The nftables rules of the bridge, written whole from the current state
//! each time (one `nft -f` transaction: create, delete, define), in two
//! tables vman owns:
//! * `bridge vman_bridge`: per TAP, frames from the guest must carry its
//!   MAC, and IPv4/ARP its allocated address (0.0.0.0 only for DHCP); no
//!   other ethertype (IPv6, VLAN tags) leaves a guest;
//! * `inet vman_bridge`: DNAT of 169.254.169.254:80 to the metadata
//!   listener on the gateway; from the bridge the host accepts only DHCP,
//!   DNS (when NAT is on), the metadata port and ping, and rejects the rest
//!   (the vman API, ssh, anything); routing off the bridge only with NAT
//!   (masquerade).

use std::fmt::Write;
use std::net::Ipv4Addr;

use super::{run, BridgeError};
use crate::config::Subnet;

pub const TABLE: &str = "vman_bridge";
/// The address guests ask for metadata (EC2's).
pub const METADATA_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// One guest's port on the bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub tap: String,
    pub mac: String,
    pub ip: Ipv4Addr,
}

/// What the rules are made from.
#[derive(Debug, Clone)]
pub struct Rules<'a> {
    /// The owner's mark, the tables' comment (`Owner::mark`).
    pub mark: &'a str,
    pub bridge: &'a str,
    pub subnet: Subnet,
    pub metadata_port: u16,
    pub nat: bool,
    pub ports: &'a [Port],
}

/// The `nft -f` script that replaces both tables with `r`.
pub fn script(r: &Rules<'_>) -> String {
    let br = r.bridge;
    let gw = r.subnet.gateway();
    let net = r.subnet;
    let mut s = String::new();
    // Create-then-delete makes the delete safe when the table is absent.
    let _ = writeln!(s, "table inet {TABLE} {{}}\ndelete table inet {TABLE}");
    let _ = writeln!(s, "table bridge {TABLE} {{}}\ndelete table bridge {TABLE}");
    let _ = writeln!(s, "table inet {TABLE} {{\n  comment \"{}\"", r.mark);
    let _ = writeln!(
        s,
        "  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         iifname \"{br}\" ip daddr {METADATA_IP} tcp dport 80 dnat ip to {gw}:{}\n  }}",
        r.metadata_port
    );
    let _ = writeln!(
        s,
        "  chain input {{\n    type filter hook input priority filter; policy accept;\n    \
         iifname \"{br}\" jump from_guests\n  }}"
    );
    let mut guests = String::new();
    let _ = writeln!(guests, "    ct state established,related accept");
    let _ = writeln!(guests, "    udp sport 68 udp dport 67 accept");
    if r.nat {
        let _ = writeln!(guests, "    ip daddr {gw} udp dport 53 accept");
        let _ = writeln!(guests, "    ip daddr {gw} tcp dport 53 accept");
    }
    let _ = writeln!(
        guests,
        "    ip daddr {gw} tcp dport {} accept",
        r.metadata_port
    );
    let _ = writeln!(guests, "    icmp type echo-request accept");
    let _ = writeln!(guests, "    meta l4proto tcp reject with tcp reset");
    let _ = writeln!(guests, "    reject with icmpx type admin-prohibited");
    let _ = writeln!(s, "  chain from_guests {{\n{guests}  }}");
    let mut fwd = String::new();
    if r.nat {
        let _ = writeln!(
            fwd,
            "    iifname \"{br}\" ip saddr {net} oifname != \"{br}\" accept"
        );
        let _ = writeln!(
            fwd,
            "    oifname \"{br}\" ct state established,related accept"
        );
    }
    let _ = writeln!(fwd, "    iifname \"{br}\" oifname != \"{br}\" drop");
    let _ = writeln!(fwd, "    oifname \"{br}\" iifname != \"{br}\" drop");
    let _ = writeln!(
        s,
        "  chain forward {{\n    type filter hook forward priority filter; policy accept;\n{fwd}  }}"
    );
    if r.nat {
        let _ = writeln!(
            s,
            "  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
             ip saddr {net} ip daddr != {net} oifname != \"{br}\" masquerade\n  }}"
        );
    }
    let _ = writeln!(s, "}}");
    let _ = writeln!(s, "table bridge {TABLE} {{\n  comment \"{}\"", r.mark);
    let _ = writeln!(
        s,
        "  chain prerouting {{\n    type filter hook prerouting priority -200; policy accept;"
    );
    for p in r.ports {
        let _ = writeln!(s, "    iifname \"{}\" jump port_{}", p.tap, p.tap);
    }
    let _ = writeln!(s, "  }}");
    for p in r.ports {
        let (tap, mac, ip) = (&p.tap, &p.mac, p.ip);
        let _ = writeln!(
            s,
            "  chain port_{tap} {{\n    \
             ether saddr != {mac} drop\n    \
             ether type != {{ ip, arp }} drop\n    \
             arp saddr ether != {mac} drop\n    \
             arp saddr ip != {{ {ip}, 0.0.0.0 }} drop\n    \
             ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept\n    \
             ip saddr != {ip} drop\n  }}"
        );
    }
    let _ = writeln!(s, "}}");
    s
}

const FAMILIES: [&str; 2] = ["inet", "bridge"];

/// The comment of table `family vman_bridge`: `None` when the table is
/// not there, `Some("")` when it has none.
fn mark_of(family: &str) -> Option<String> {
    let listing = run("nft", &["list", "table", family, TABLE], None).ok()?;
    Some(
        listing
            .lines()
            .find_map(|l| l.trim().strip_prefix("comment \""))
            .map(|c| c.trim_end_matches('"').to_owned())
            .unwrap_or_default(),
    )
}

/// Replaces both tables with `r` in one transaction; refuses tables of
/// that name that another vman made.
pub fn apply(r: &Rules<'_>) -> Result<(), BridgeError> {
    check_ours(r.mark)?;
    run("nft", &["-f", "-"], Some(&script(r))).map(drop)
}

/// True when a table of vman's name with `mark` exists.
pub fn has_tables(mark: &str) -> bool {
    FAMILIES
        .into_iter()
        .any(|f| mark_of(f).is_some_and(|m| m == mark))
}

/// Refuses when a table of vman's name exists without `mark`.
pub fn check_ours(mark: &str) -> Result<(), BridgeError> {
    match FAMILIES
        .into_iter()
        .find(|f| mark_of(f).is_some_and(|m| m != mark))
    {
        Some(family) => Err(BridgeError::ForeignTable(format!("{family} {TABLE}"))),
        None => Ok(()),
    }
}

/// Removes both tables if they carry `mark` (nothing when they are not
/// there or are another vman's).
pub fn remove(mark: &str) -> Result<(), BridgeError> {
    let s: String = FAMILIES
        .into_iter()
        .filter(|f| mark_of(f).is_some_and(|m| m == mark))
        .map(|f| format!("delete table {f} {TABLE}\n"))
        .collect();
    if s.is_empty() {
        return Ok(());
    }
    run("nft", &["-f", "-"], Some(&s)).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(nat: bool, ports: &[Port]) -> String {
        script(&Rules {
            mark: "vman:0123abcd",
            bridge: "br-vman",
            subnet: Subnet::parse("192.168.100.0/24").unwrap(),
            metadata_port: 8775,
            nat,
            ports,
        })
    }

    #[test]
    fn metadata_is_dnatted_to_the_gateway_and_the_rest_of_the_host_is_rejected() {
        let s = rules(false, &[]);
        assert!(s.contains(
            "iifname \"br-vman\" ip daddr 169.254.169.254 tcp dport 80 dnat ip to 192.168.100.1:8775"
        ));
        assert!(s.contains("ip daddr 192.168.100.1 tcp dport 8775 accept"));
        assert!(s.contains("reject with tcp reset"));
        assert!(!s.contains("dport 53"), "no DNS without NAT");
        assert!(!s.contains("masquerade"));
        assert!(s.contains("iifname \"br-vman\" oifname != \"br-vman\" drop"));
        assert_eq!(s.matches("comment \"vman:0123abcd\"").count(), 2);
    }

    #[test]
    fn nat_adds_masquerade_dns_and_forwarding() {
        let s = rules(true, &[]);
        assert!(s.contains("ip saddr 192.168.100.0/24 ip daddr != 192.168.100.0/24 oifname != \"br-vman\" masquerade"));
        assert!(s.contains("udp dport 53 accept"));
    }

    #[test]
    fn each_port_accepts_only_its_mac_and_address() {
        let p = Port {
            tap: "vman0123456789".into(),
            mac: "52:54:00:aa:bb:cc".into(),
            ip: Ipv4Addr::new(192, 168, 100, 7),
        };
        let s = rules(false, std::slice::from_ref(&p));
        assert!(s.contains("iifname \"vman0123456789\" jump port_vman0123456789"));
        assert!(s.contains("ether saddr != 52:54:00:aa:bb:cc drop"));
        assert!(s.contains("ip saddr != 192.168.100.7 drop"));
        assert!(s.contains("arp saddr ip != { 192.168.100.7, 0.0.0.0 } drop"));
    }

    #[test]
    fn nft_accepts_the_script_in_check_mode() {
        // `nft -c` checks against the kernel without changing anything.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || super::super::which("nft").is_none() {
            eprintln!("SKIPPED: needs root and nft");
            return;
        }
        let p = Port {
            tap: "vman0123456789".into(),
            mac: "52:54:00:aa:bb:cc".into(),
            ip: Ipv4Addr::new(192, 168, 100, 7),
        };
        for nat in [false, true] {
            let script = rules(nat, std::slice::from_ref(&p));
            let checked = run("nft", &["-c", "-f", "-"], Some(&script));
            assert!(checked.is_ok(), "{checked:?}\n{script}");
        }
    }
}
