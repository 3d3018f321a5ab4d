//! The NIC of branch net-meta, just enough for the metadata service:
//! QEMU's user networking on 169.254.169.0/24 with `restrict=on` (the guest
//! reaches nothing but its metadata relay) and the relay as a `guestfwd` to
//! 169.254.169.254:80. Issue 11's network modes (`operator::nic`, branch
//! net-user) replace it at the merge: only the `guestfwd` part stays.

use super::qemu::LaunchSpec;

/// The guest network the relay sits in (QEMU's slirp).
pub const NET: &str = "169.254.169.0/24";

/// `-netdev`/`-device` for a VM with a metadata relay; none without one.
pub fn args(spec: &LaunchSpec) -> Vec<String> {
    let Some(relay) = &spec.metadata_relay else {
        return Vec::new();
    };
    vec![
        "-netdev".into(),
        format!(
            "user,id=net0,restrict=on,net={NET},host=169.254.169.2,dns=169.254.169.3,\
             dhcpstart=169.254.169.15,guestfwd=tcp:169.254.169.254:80-cmd:{relay}"
        ),
        "-device".into(),
        format!("virtio-net-pci,netdev=net0,mac={}", spec.mac),
    ]
}
