//! The guest metadata service seen from real guests: two tiny guests each
//! fetch their own hostname and keys over QEMU's user networking
//! (169.254.169.254 → guestfwd → the VM's channel), apply the hostname, and
//! one of them tries every way it has to read the other's data and gets
//! only its own.

use serde_json::json;

use crate::harness::Vman;

fn vm_with_metadata(vman: &Vman, id: &str, hostname: &str, keys: &[&str]) {
    let (s, b) = vman.create_vm(json!({"template_name": "tiny", "name": id}));
    assert_eq!(s, 201, "{b}");
    let (s, b) = vman.call(
        "PUT",
        &format!("/vms/{id}/metadata"),
        Some(json!({"hostname": hostname, "ssh_keys": keys.join("\n")})),
    );
    assert_eq!(s, 200, "{b}");
    assert!(vman.vm(id)["metadata_fetched_at"].is_null());
    let (s, b) = vman.start_vm(id);
    assert_eq!(s, 202, "{b}");
}

/// Runs `cmd` in the guest's shell; returns what it printed between the
/// markers (`cmd`'s output must not contain newlines).
fn guest_output(vman: &Vman, id: &str, n: usize, cmd: &str) -> String {
    // The marker is built by the shell, so the echoed command line does
    // not match it.
    vman.type_line(
        id,
        &format!("echo \"probe{n}\"'=['\"$({cmd} 2>/dev/null)\"']'"),
    );
    let marker = format!("probe{n}=[");
    vman.wait_console(id, &marker, 1);
    let console = vman.console(id);
    let at = console.find(&marker).expect("marker") + marker.len();
    let rest = &console[at..];
    let end = rest.find(']').unwrap_or(rest.len());
    rest[..end].to_owned()
}

#[test]
fn each_guest_reads_only_its_own_metadata() {
    let mut vman = Vman::builder().with_tiny_default().start();
    vman.template("tiny", 192);
    vm_with_metadata(
        &vman,
        "meta-a",
        "alpha-host",
        &["ssh-ed25519 AAAAa a@x", "ssh-rsa AAAAb b@x"],
    );
    vm_with_metadata(
        &vman,
        "meta-b",
        "bravo-host",
        &[
            "ssh-ed25519 BBBBa c@y",
            "ssh-ed25519 BBBBb d@y",
            "ssh-ed25519 BBBBc e@y",
        ],
    );
    vman.wait_console(
        "meta-a",
        "vman-guest: metadata hostname=alpha-host keys=2",
        1,
    );
    vman.wait_console(
        "meta-b",
        "vman-guest: metadata hostname=bravo-host keys=3",
        1,
    );
    for id in ["meta-a", "meta-b"] {
        let vm = vman.vm(id);
        assert!(vm["metadata_fetched_at"].is_string(), "{vm}");
    }
    vman.wait_console("meta-a", "vman-guest: ready", 1);
    // The hostname was applied in the guest.
    assert_eq!(guest_output(&vman, "meta-a", 1, "hostname"), "alpha-host");
    assert_eq!(
        guest_output(&vman, "meta-a", 2, "wc -l </root/.ssh/authorized_keys"),
        "2"
    );

    // Stock cloud-init finds NoCloud's seed in the SMBIOS serial; the VM id
    // stays readable in type 11.
    assert_eq!(
        guest_output(&vman, "meta-a", 3, "cat /sys/class/dmi/id/product_serial"),
        "ds=nocloud-net;s=http://169.254.169.254/nocloud/"
    );
    assert_eq!(
        guest_output(
            &vman,
            "meta-a",
            4,
            "strings -n 1 /sys/firmware/dmi/entries/11-0/raw | sed -n s/^vman.id=//p"
        ),
        "meta-a"
    );

    // meta-a asks for meta-b's data every way it can: meta-b's id or name in
    // the path, query and headers; meta-b's key index; API routes.
    let url = "http://169.254.169.254";
    let probes = [
        format!("wget -q -O - {url}/latest/meta-data/hostname?instance-id=meta-b"),
        format!("wget -q -O - --header 'X-Forwarded-For: 169.254.169.16' --header 'X-Vman-Id: meta-b' {url}/latest/meta-data/instance-id"),
        format!("wget -q -O - --header 'Host: meta-b' {url}/latest/meta-data/hostname"),
        format!("wget -q -O - {url}/meta-b/latest/meta-data/hostname"),
        format!("wget -q -O - {url}/latest/meta-data/public-keys/2/openssh-key"),
        format!("wget -q -O - {url}/vms/meta-b/metadata"),
        format!("wget -q -O - {url}/latest/meta-data/../../vms/meta-b/metadata"),
        format!("wget -q -O - {url}/nocloud/meta-data | tr '\\n' ' '"),
        format!("wget -q -O - {url}/vms"),
    ];
    let answers: Vec<String> = probes
        .iter()
        .enumerate()
        .map(|(i, p)| guest_output(&vman, "meta-a", 10 + i, p))
        .collect();
    assert_eq!(answers[0], "alpha-host");
    assert_eq!(answers[1], "meta-a");
    assert_eq!(answers[2], "alpha-host");
    for (i, a) in answers.iter().enumerate().skip(3).take(4) {
        assert_eq!(a, "", "probe {}: {}", probes[i], a);
    }
    assert!(
        answers[7].contains("instance-id: \"meta-a\""),
        "{}",
        answers[7]
    );
    assert_eq!(answers[8], "");
    let console = vman.console("meta-a");
    for secret in ["bravo-host", "BBBB"] {
        assert!(
            !console.contains(secret),
            "meta-b's {secret} reached meta-a:\n{console}"
        );
    }

    // A restarted vman adopts the QEMUs and opens their channels again.
    vman.restart();
    assert_eq!(
        guest_output(
            &vman,
            "meta-b",
            1,
            "wget -q -O - http://169.254.169.254/latest/meta-data/instance-id"
        ),
        "meta-b"
    );
}
