//! The VM's network card as QEMU arguments. (Minimal version from the
//! `net-bridge` branch, with only the TAP backend; the `net-user` branch
//! owns this file and adds the user-mode backends.)

/// The VM's NIC: its MAC and where its frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub mac: String,
    pub backend: NicBackend,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicBackend {
    /// A TAP vman made (on its bridge); QEMU opens it by name, runs no
    /// script.
    Tap { ifname: String },
}

/// `-netdev` + a virtio-net-pci device with the VM's MAC.
pub fn nic_args(nic: &Nic) -> Vec<String> {
    let netdev = match &nic.backend {
        NicBackend::Tap { ifname } => {
            format!("tap,id=net0,ifname={ifname},script=no,downscript=no")
        }
    };
    vec![
        "-netdev".into(),
        netdev,
        "-device".into(),
        format!("virtio-net-pci,netdev=net0,mac={},id=nic0", nic.mac),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_nic_runs_no_script_and_carries_the_mac() {
        let a = nic_args(&Nic {
            mac: "52:54:00:01:02:03".into(),
            backend: NicBackend::Tap {
                ifname: "vman0011223344".into(),
            },
        });
        assert_eq!(
            a,
            [
                "-netdev",
                "tap,id=net0,ifname=vman0011223344,script=no,downscript=no",
                "-device",
                "virtio-net-pci,netdev=net0,mac=52:54:00:01:02:03,id=nic0"
            ]
        );
    }
}
