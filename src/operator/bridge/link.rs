//! The bridge and the TAPs, through `ip` and `bridge` (iproute2): made with
//! this vman's mark (`Owner`), found again by it, and removed only when
//! they carry it.

use std::net::Ipv4Addr;

use super::{run, BridgeError, Owner};

/// One interface as `ip -j -d link show` lists it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Link {
    pub ifname: String,
    #[serde(default)]
    pub ifalias: Option<String>,
    #[serde(default)]
    pub master: Option<String>,
}

/// Every interface of this network namespace.
pub fn list() -> Result<Vec<Link>, BridgeError> {
    let out = run("ip", &["-j", "-d", "link", "show"], None)?;
    serde_json::from_str(&out).map_err(|e| BridgeError::Command {
        command: "ip -j -d link show".into(),
        message: format!("unreadable output: {e}"),
    })
}

pub fn find(name: &str) -> Result<Option<Link>, BridgeError> {
    Ok(list()?.into_iter().find(|l| l.ifname == name))
}

fn ip(args: &[&str]) -> Result<(), BridgeError> {
    run("ip", args, None).map(drop)
}

fn bridge_cmd(args: &[&str]) -> Result<(), BridgeError> {
    run("bridge", args, None).map(drop)
}

/// Makes the bridge with the gateway address and brings it up, or checks
/// that the one there is ours (then only makes sure of its address and
/// state). With a VLAN, the bridge filters VLANs and the host's side of it
/// is an untagged member of that VLAN only.
pub fn ensure_bridge(
    owner: &Owner,
    name: &str,
    gateway: Ipv4Addr,
    prefix: u8,
    vlan: Option<u16>,
) -> Result<(), BridgeError> {
    let address = format!("{gateway}/{prefix}");
    match find(name)? {
        Some(l) if l.ifalias.as_deref() == Some(&owner.bridge_alias()) => {}
        Some(_) => return Err(BridgeError::Foreign(name.into())),
        None => {
            // VLAN filtering only when asked for: kernels built without it
            // refuse even `vlan_filtering 0`.
            let mut add = vec!["link", "add", name, "type", "bridge"];
            if vlan.is_some() {
                add.extend(["vlan_filtering", "1"]);
            }
            ip(&add).map_err(|e| match (vlan, e) {
                (Some(v), BridgeError::Command { command, message }) => BridgeError::Command {
                    command,
                    message: format!(
                        "{message} (VMAN_VLAN_ID={v} needs a kernel with bridge VLAN filtering)"
                    ),
                },
                (_, e) => e,
            })?;
            let made = (|| {
                ip(&["link", "set", "dev", name, "alias", &owner.bridge_alias()])?;
                if let Some(v) = vlan {
                    let v = v.to_string();
                    bridge_cmd(&["vlan", "del", "dev", name, "vid", "1", "self"])?;
                    bridge_cmd(&[
                        "vlan", "add", "dev", name, "vid", &v, "pvid", "untagged", "self",
                    ])?;
                }
                Ok(())
            })();
            if let Err(e) = made {
                let _ = ip(&["link", "del", "dev", name]);
                return Err(e);
            }
            tracing::info!(
                "bridge {name} created ({address}{})",
                vlan.map(|v| format!(", VLAN {v}")).unwrap_or_default()
            );
        }
    }
    ip(&["addr", "replace", &address, "dev", name])?;
    ip(&["link", "set", "dev", name, "up"])
}

/// Removes the bridge if it is ours; a foreign one of that name stays.
pub fn remove_bridge(owner: &Owner, name: &str) -> Result<bool, BridgeError> {
    match find(name)? {
        Some(l) if l.ifalias.as_deref() == Some(&owner.bridge_alias()) => {
            ip(&["link", "del", "dev", name])?;
            tracing::info!("bridge {name} removed");
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Makes the VM's TAP (owned by `user`, QEMU's user) on `bridge`, in
/// `vlan` only. A TAP of ours of that name left behind is made again; one
/// that is not ours is refused.
pub fn add_tap(
    owner: &Owner,
    tap: &str,
    vm_id: &str,
    bridge: &str,
    user: Option<&str>,
    vlan: Option<u16>,
) -> Result<(), BridgeError> {
    if let Some(l) = find(tap)? {
        if l.ifalias.as_deref() != Some(&owner.tap_alias(vm_id)) {
            return Err(BridgeError::Foreign(tap.into()));
        }
        ip(&["link", "del", "dev", tap])?;
    }
    let mut args = vec!["tuntap", "add", "dev", tap, "mode", "tap"];
    if let Some(u) = user {
        args.extend(["user", u]);
    }
    ip(&args)?;
    let made = (|| {
        ip(&["link", "set", "dev", tap, "alias", &owner.tap_alias(vm_id)])?;
        ip(&["link", "set", "dev", tap, "master", bridge])?;
        if let Some(v) = vlan {
            let v = v.to_string();
            bridge_cmd(&["vlan", "del", "dev", tap, "vid", "1"])?;
            bridge_cmd(&["vlan", "add", "dev", tap, "vid", &v, "pvid", "untagged"])?;
        }
        ip(&["link", "set", "dev", tap, "up"])
    })();
    if let Err(e) = made {
        let _ = ip(&["link", "del", "dev", tap]);
        return Err(e);
    }
    Ok(())
}

/// Removes the TAP if it is ours (true when it was there).
pub fn remove_tap(owner: &Owner, tap: &str, vm_id: &str) -> Result<bool, BridgeError> {
    match find(tap)? {
        Some(l) if l.ifalias.as_deref() == Some(&owner.tap_alias(vm_id)) => {
            ip(&["link", "del", "dev", tap])?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Every TAP of this owner: (interface, VM id).
pub fn owned_taps(owner: &Owner) -> Result<Vec<(String, String)>, BridgeError> {
    Ok(list()?
        .into_iter()
        .filter_map(|l| {
            let vm = owner.vm_of_tap_alias(l.ifalias.as_deref()?)?.to_owned();
            Some((l.ifname, vm))
        })
        .collect())
}

/// Puts the TAP on the bridge (again: after the bridge was made anew).
pub fn attach(tap: &str, bridge: &str) -> Result<(), BridgeError> {
    ip(&["link", "set", "dev", tap, "master", bridge])?;
    ip(&["link", "set", "dev", tap, "up"])
}
