//! The `bridge` network mode's settings (`VMAN_BRIDGE_NAME`, `VMAN_SUBNET`,
//! `VMAN_VLAN_ID`, `VMAN_BRIDGE_NAT`, `VMAN_METADATA_PORT`) and `Subnet`,
//! the IPv4 network the bridge's guests live in (gateway = first address).

use clap::Args;
use std::net::Ipv4Addr;

#[derive(Debug, Clone, Args)]
pub struct BridgeConfig {
    /// Linux bridge vman creates for `bridge` VMs (as root). A bridge of this
    /// name that vman did not create is refused, never reused.
    #[arg(long, env = "VMAN_BRIDGE_NAME", default_value = "br-vman", value_parser = parse_ifname)]
    pub bridge_name: String,

    /// IPv4 network of the bridge (prefix /16 to /30); the gateway (the
    /// host's address on the bridge) is its first address.
    #[arg(long, env = "VMAN_SUBNET", default_value = "192.168.100.0/24", value_parser = Subnet::parse)]
    pub subnet: Subnet,

    /// VLAN id (1-4094) of the bridge ports (VLAN filtering); unset: none.
    #[arg(long, env = "VMAN_VLAN_ID", value_parser = clap::value_parser!(u16).range(1..=4094))]
    pub vlan_id: Option<u16>,

    /// 1: bridge guests reach the outside through NAT (masquerade) and get
    /// DNS from the gateway; 0: they reach only each other and the gateway's
    /// DHCP and metadata.
    #[arg(long, env = "VMAN_BRIDGE_NAT", action = clap::ArgAction::Set, num_args = 0..=1,
          default_value = "0", default_missing_value = "1",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub bridge_nat: bool,

    /// TCP port of the metadata listener on the bridge gateway address
    /// (guests reach it as http://169.254.169.254/ through a DNAT rule).
    #[arg(long, env = "VMAN_METADATA_PORT", default_value_t = 8775, value_parser = clap::value_parser!(u16).range(1..))]
    pub metadata_port: u16,
}

/// A Linux interface name vman may create: 1-15 bytes, letters, digits,
/// `-`, `_`, `.`.
fn parse_ifname(raw: &str) -> Result<String, String> {
    let ok = !raw.is_empty()
        && raw.len() <= 15
        && raw != "."
        && raw != ".."
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(raw.to_owned())
    } else {
        Err(format!(
            "'{raw}' is not an interface name (1-15 letters, digits, '-', '_', '.')"
        ))
    }
}

/// An IPv4 network `a.b.c.d/n` with `n` in 16..=30 and no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let bad = || format!("'{raw}' is not an IPv4 network like 192.168.100.0/24 (prefix 16-30)");
        let (addr, prefix) = raw.trim().split_once('/').ok_or_else(bad)?;
        let network: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(16..=30).contains(&prefix) {
            return Err(bad());
        }
        let s = Self { network, prefix };
        if u32::from(network) & !s.mask() != 0 {
            return Err(format!(
                "'{raw}' has host bits set; the network is {}/{prefix}",
                Ipv4Addr::from(u32::from(network) & s.mask())
            ));
        }
        Ok(s)
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - self.prefix)
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask())
    }

    /// The host's address on the bridge: the first address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask())
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network)
    }

    /// The addresses guests may get, lowest first: every address but the
    /// network, the gateway and the broadcast.
    pub fn guest_addresses(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.network) + 2;
        let last = u32::from(self.broadcast()) - 1;
        (first..=last).map(Ipv4Addr::from)
    }

    pub fn guest_count(&self) -> u64 {
        (1u64 << (32 - self.prefix)) - 3
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_gateway_is_the_first_address_and_guests_skip_network_gateway_broadcast() {
        let s = Subnet::parse("192.168.100.0/24").unwrap();
        assert_eq!(s.gateway(), Ipv4Addr::new(192, 168, 100, 1));
        assert_eq!(s.broadcast(), Ipv4Addr::new(192, 168, 100, 255));
        assert_eq!(s.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        let all: Vec<_> = s.guest_addresses().collect();
        assert_eq!(all.len() as u64, s.guest_count());
        assert_eq!(all.first(), Some(&Ipv4Addr::new(192, 168, 100, 2)));
        assert_eq!(all.last(), Some(&Ipv4Addr::new(192, 168, 100, 254)));
        let tiny = Subnet::parse("10.9.0.4/30").unwrap();
        assert_eq!(
            tiny.guest_addresses().collect::<Vec<_>>(),
            [Ipv4Addr::new(10, 9, 0, 6)]
        );
    }

    #[test]
    fn subnet_refuses_host_bits_bad_prefixes_and_garbage() {
        for bad in [
            "192.168.100.1/24",
            "10.0.0.0/8",
            "10.0.0.0/31",
            "10.0.0.0",
            "x/24",
            "10.0.0.0/",
        ] {
            assert!(Subnet::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn interface_names_are_short_and_plain() {
        assert!(parse_ifname("br-vman").is_ok());
        for bad in ["", "a/b", "sixteen-chars-xx", "..", "br vman"] {
            assert!(parse_ifname(bad).is_err(), "{bad}");
        }
    }
}
