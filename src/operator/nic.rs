//! A VM's network card as QEMU sees it: the `-netdev` backend (QEMU's user
//! networking, a stream socket to passt, or a TAP) and the virtio NIC with
//! the VM's MAC; the slirp link layout; host port checks for forwards.
//! Pure argument building plus bind probes, unit-tested without QEMU.

use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use crate::model::{PortForward, Protocol};

/// The `-netdev` id of the one NIC (QMP `hostfwd_add` names it).
pub const NETDEV_ID: &str = "net0";
/// QEMU user networking's link: a /24 inside 169.254.0.0/16, so that the
/// metadata address 169.254.169.254 is an address of slirp's own network
/// (answered by the guestfwd relay, never by the host's cloud metadata).
pub const SLIRP_NET: &str = "169.254.169.0/24";
/// The slirp host (gateway) address.
pub const SLIRP_HOST: &str = "169.254.169.2";
/// The slirp DNS address.
pub const SLIRP_DNS: &str = "169.254.169.3";
/// First (and, with one guest per slirp, only) DHCP lease.
pub const SLIRP_GUEST: &str = "169.254.169.15";
/// Where guests reach their metadata.
pub const METADATA_ADDR: &str = "169.254.169.254";
/// The per-VM metadata socket (bare name: QEMU's cwd is the VM folder).
pub const METADATA_SOCK: &str = "metadata.sock";

/// The NIC of one VM.
#[derive(Debug, Clone)]
pub struct Nic {
    /// `52:54:00:xx:xx:xx` (`model::mac_for`).
    pub mac: String,
    pub backend: NicBackend,
}

#[derive(Debug, Clone)]
pub enum NicBackend {
    /// QEMU's user networking. `restrict`: the guest reaches only its
    /// forwards and the metadata relay (what vman asks for: see
    /// `service::network`); `metadata`: the command QEMU runs per guest
    /// connection to 169.254.169.254:80 (`metadata::relay_command`).
    Slirp {
        restrict: bool,
        forwards: Vec<PortForward>,
        metadata: Option<String>,
    },
    /// A connected stream socket to passt (one end of a socketpair; passt
    /// has the other). QEMU inherits it (`addr.type=fd`).
    Stream { fd: Arc<OwnedFd> },
    /// A TAP device vman created (bridge mode).
    Tap { ifname: String },
}

/// `hostfwd` rule of a forward: `tcp:127.0.0.1:10022-:22`.
pub fn hostfwd_rule(f: &PortForward) -> String {
    let addr = match f.host_address.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
        _ => f.host_address.clone(),
    };
    format!(
        "{}:{}:{}-:{}",
        f.protocol.as_str(),
        addr,
        f.host_port,
        f.guest_port
    )
}

/// The argument of `hostfwd_remove`: `net0 tcp:127.0.0.1:10022`.
pub fn hostfwd_remove_arg(f: &PortForward) -> String {
    format!(
        "{NETDEV_ID} {}:{}:{}",
        f.protocol.as_str(),
        f.host_address,
        f.host_port
    )
}

/// QEMU's `-netdev` and `-device` arguments for `nic`.
pub fn nic_args(nic: &Nic) -> Vec<String> {
    let netdev = match &nic.backend {
        NicBackend::Slirp {
            restrict,
            forwards,
            metadata,
        } => {
            let mut s = format!(
                "user,id={NETDEV_ID},net={SLIRP_NET},host={SLIRP_HOST},dns={SLIRP_DNS},\
                 dhcpstart={SLIRP_GUEST},ipv6=off,restrict={}",
                if *restrict { "on" } else { "off" }
            );
            for f in forwards {
                s.push_str(",hostfwd=");
                s.push_str(&hostfwd_rule(f));
            }
            if let Some(relay) = metadata {
                s.push_str(&format!(",guestfwd=tcp:{METADATA_ADDR}:80-cmd:{relay}"));
            }
            s
        }
        NicBackend::Stream { fd } => format!(
            "stream,id={NETDEV_ID},server=off,addr.type=fd,addr.str={}",
            fd.as_raw_fd()
        ),
        NicBackend::Tap { ifname } => {
            format!("tap,id={NETDEV_ID},ifname={ifname},script=no,downscript=no")
        }
    };
    vec![
        "-netdev".into(),
        netdev,
        "-device".into(),
        format!("virtio-net-pci,netdev={NETDEV_ID},mac={},id=nic0", nic.mac),
    ]
}

/// Descriptors QEMU must inherit for this NIC.
pub fn nic_fds(nic: &Nic) -> Vec<RawFd> {
    match &nic.backend {
        NicBackend::Stream { fd } => vec![fd.as_raw_fd()],
        _ => Vec::new(),
    }
}

/// QEMU must be allowed to fork (seccomp `spawn=allow`): only for the
/// metadata relay, which runs socat per guest connection.
pub fn needs_spawn(nic: &Nic) -> bool {
    matches!(
        nic.backend,
        NicBackend::Slirp {
            metadata: Some(_),
            ..
        }
    )
}

/// True when nothing on this host holds `port` on `addr` for `protocol`:
/// vman binds it for a moment (and lets it go).
pub fn port_free(addr: IpAddr, port: u16, protocol: Protocol) -> bool {
    let at = SocketAddr::new(addr, port);
    match protocol {
        Protocol::Tcp => TcpListener::bind(at).is_ok(),
        Protocol::Udp => UdpSocket::bind(at).is_ok(),
    }
}

/// A port the kernel calls free on `addr` for both TCP and UDP right now
/// (its ephemeral pick), for a forward vman allocates.
pub fn free_port(addr: IpAddr, protocol: Protocol) -> std::io::Result<u16> {
    let at = SocketAddr::new(addr, 0);
    let port = match protocol {
        Protocol::Tcp => TcpListener::bind(at)?.local_addr()?.port(),
        Protocol::Udp => UdpSocket::bind(at)?.local_addr()?.port(),
    };
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ssh(port: u16) -> PortForward {
        PortForward {
            host_port: port,
            guest_port: 22,
            protocol: Protocol::Tcp,
            host_address: "127.0.0.1".into(),
        }
    }

    #[test]
    fn slirp_without_root_is_restricted_with_its_forwards() {
        let nic = Nic {
            mac: "52:54:00:aa:bb:cc".into(),
            backend: NicBackend::Slirp {
                restrict: true,
                forwards: vec![
                    ssh(10022),
                    PortForward {
                        host_port: 5353,
                        guest_port: 53,
                        protocol: Protocol::Udp,
                        host_address: "::1".into(),
                    },
                ],
                metadata: None,
            },
        };
        let a = nic_args(&nic);
        assert_eq!(a[0], "-netdev");
        assert_eq!(
            a[1],
            "user,id=net0,net=169.254.169.0/24,host=169.254.169.2,dns=169.254.169.3,\
             dhcpstart=169.254.169.15,ipv6=off,restrict=on,\
             hostfwd=tcp:127.0.0.1:10022-:22,hostfwd=udp:[::1]:5353-:53"
        );
        assert_eq!(
            a[3],
            "virtio-net-pci,netdev=net0,mac=52:54:00:aa:bb:cc,id=nic0"
        );
        assert!(!a[1].contains("guestfwd"));
        assert!(!needs_spawn(&nic));
    }

    #[test]
    fn slirp_with_metadata_relays_169_254_169_254_to_its_socket() {
        let nic = Nic {
            mac: "52:54:00:00:00:01".into(),
            backend: NicBackend::Slirp {
                restrict: false,
                forwards: vec![ssh(2222)],
                metadata: Some("socat STDIO UNIX-CONNECT:metadata.sock".into()),
            },
        };
        let a = nic_args(&nic);
        assert!(a[1].contains("restrict=off"), "{}", a[1]);
        assert!(a[1].ends_with(
            ",guestfwd=tcp:169.254.169.254:80-cmd:socat STDIO UNIX-CONNECT:metadata.sock"
        ));
        assert!(needs_spawn(&nic));
        assert!(nic_fds(&nic).is_empty());
    }

    #[test]
    fn stream_passes_its_descriptor_and_tap_names_its_device() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let fd: OwnedFd = a.into();
        let raw = fd.as_raw_fd();
        let nic = Nic {
            mac: "52:54:00:00:00:02".into(),
            backend: NicBackend::Stream { fd: Arc::new(fd) },
        };
        assert_eq!(
            nic_args(&nic)[1],
            format!("stream,id=net0,server=off,addr.type=fd,addr.str={raw}")
        );
        assert_eq!(nic_fds(&nic), vec![raw]);
        let tap = Nic {
            mac: "52:54:00:00:00:03".into(),
            backend: NicBackend::Tap {
                ifname: "vmantap0".into(),
            },
        };
        assert_eq!(
            nic_args(&tap)[1],
            "tap,id=net0,ifname=vmantap0,script=no,downscript=no"
        );
    }

    #[test]
    fn a_bound_port_is_not_free() {
        let lo: IpAddr = "127.0.0.1".parse().expect("ip");
        let held = TcpListener::bind((lo, 0)).expect("bind");
        let port = held.local_addr().expect("addr").port();
        assert!(!port_free(lo, port, Protocol::Tcp));
        drop(held);
        assert!(port_free(lo, port, Protocol::Tcp));
        let p = free_port(lo, Protocol::Udp).expect("free");
        assert!(p > 0);
        assert_eq!(hostfwd_remove_arg(&ssh(7)), "net0 tcp:127.0.0.1:7");
    }
}
