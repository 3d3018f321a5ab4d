//! The forms of the web console on a stopped VM (no guest needed): port
//! forwards, metadata and data disks edited through the VM page reach the
//! API; refusals (a taken name in the create form, a snapshot of a VM
//! without a root disk) show the server's own `detail`; the host page shows
//! the health checks, memory reserved vs allowed and the observer.

use serde_json::json;

use crate::browser::Browser;
use crate::harness::{Vman, SERVER};

fn errors_show(b: &Browser, detail: &str) {
    b.wait(
        &format!("an error message {detail:?}"),
        SERVER,
        "return Array.from(document.querySelectorAll('#errors .detail')).some(e => e.textContent === arguments[0])",
        vec![json!(detail)],
    );
}

#[test]
fn the_vm_page_edits_ports_metadata_and_disks_and_refusals_show_the_servers_detail() {
    let vman = Vman::builder().start();
    vman.template("tiny", 256);
    let (s, body) = vman.create_vm(json!({"template_name": "tiny", "name": "v1"}));
    assert_eq!(s, 201, "{body}");
    let b = Browser::start(&vman.base, 1280, 900);

    // The create form with a taken name: the server's detail, nothing made.
    let (s, refusal) = vman.create_vm(json!({"template_name": "tiny", "name": "v1"}));
    assert_eq!(s, 400, "{refusal}");
    b.goto("/ui/#/create");
    b.wait_for("#create-template option[value=tiny]", SERVER);
    b.fill("#create-name", "v1");
    b.click("#create-submit");
    errors_show(&b, refusal["detail"].as_str().expect("detail"));
    assert_eq!(vman.get("/vms").as_array().map(Vec::len), Some(1));

    // Port forwards.
    b.goto("/ui/#/vm/v1");
    b.wait_for("#vm-state .state-stopped", SERVER);
    b.wait_for("#port-form", SERVER);
    b.wait_for("#new-disk-form", SERVER);
    b.wait_for("#meta-form", SERVER);
    b.wait_for("#snap-form", SERVER);
    // Regression: an absent part (no free disk to attach) was written as
    // the text "null".
    let shown = b.js("return document.querySelector('#main').innerText", vec![]);
    let shown = shown.as_str().unwrap_or("");
    assert!(
        !shown.contains("null") && !shown.contains("undefined"),
        "{shown}"
    );
    b.fill("#port-guest", "8080");
    b.click("#port-form button[type=submit]");
    b.wait(
        "the new forward in the list",
        SERVER,
        "return document.querySelector('#ports-body').textContent.includes('guest 8080/tcp')",
        vec![],
    );
    let ports = vman.get("/vms/v1/ports");
    let host_port = ports
        .as_array()
        .and_then(|a| a.iter().find(|p| p["guest_port"] == 8080))
        .map(|p| p["host_port"].clone())
        .expect("the forward made through the page");
    b.click(&format!(
        "button[aria-label='Remove forward of host port {host_port}']"
    ));
    b.wait(
        "the forward to go",
        SERVER,
        "return !document.querySelector('#ports-body').textContent.includes('guest 8080/tcp')",
        vec![],
    );
    assert!(!vman.get("/vms/v1/ports").to_string().contains("8080"));

    // Metadata.
    b.wait_for("#meta-form", SERVER);
    b.fill("#meta-hostname", "from-the-page");
    b.fill(
        "#meta-ssh-keys",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTheUiTest ui@test",
    );
    b.click("#meta-form button[type=submit]");
    b.wait(
        "the metadata saved",
        SERVER,
        "return document.querySelector('#meta-body').textContent.includes('Saved')",
        vec![],
    );
    let meta = vman.get("/vms/v1/metadata");
    assert_eq!(meta["hostname"], "from-the-page");
    assert!(meta["ssh_keys"]
        .as_str()
        .is_some_and(|k| k.contains("FakeKeyForTheUiTest")));

    // Data disks: create and attach, resize, detach.
    b.wait_for("#new-disk-form", SERVER);
    b.fill("#new-disk-size", "1");
    b.click("#new-disk-form button[type=submit]");
    b.wait_for("#disks-body tr[data-disk]", SERVER);
    let disk = b.js(
        "return document.querySelector('#disks-body tr[data-disk]').dataset.disk",
        vec![],
    );
    let disk = disk.as_str().expect("a disk id").to_owned();
    assert_eq!(vman.get(&format!("/disks/{disk}"))["vm_id"], "v1");
    b.fill(&format!("#disk-size-{disk}"), "2");
    b.click(&format!(
        "#disks-body tr[data-disk='{disk}'] button:not(.danger)"
    ));
    b.wait(
        "the disk at 2 GiB",
        SERVER,
        "const r = document.querySelector(`#disks-body tr[data-disk='${arguments[0]}']`); return r && r.textContent.includes('2 GiB');",
        vec![json!(disk)],
    );
    assert_eq!(vman.get(&format!("/disks/{disk}"))["size"], 2);
    b.click(&format!("#disks-body tr[data-disk='{disk}'] button.danger"));
    b.wait_for("dialog#confirm[open]", SERVER);
    b.click("#confirm-ok");
    b.wait_for("#attach-form", SERVER);
    assert!(vman.get(&format!("/disks/{disk}"))["vm_id"].is_null());

    // A snapshot of a VM that never started: refused, with the detail.
    let (s, refusal) = vman.post("/vms/v1/snapshots", json!({"name": "s1"}));
    assert!((400..500).contains(&s), "{refusal}");
    b.fill("#snap-name", "s1");
    b.click("#snap-form button[type=submit]");
    errors_show(&b, refusal["detail"].as_str().expect("detail"));

    // The host page.
    b.goto("/ui/#/host");
    b.wait_for("#health-checks tr[data-check=memory]", SERVER);
    b.wait_for("#memory-meter", SERVER);
    b.wait_for("#observer-body p", SERVER);
    let health = vman.get("/health");
    for (name, check) in health["checks"].as_object().expect("checks") {
        let row = b.text(&format!("#health-checks tr[data-check='{name}']"));
        assert!(
            row.contains(check["detail"].as_str().unwrap_or("")),
            "{name}: {row}"
        );
    }
    // Without a token there is none to forget.
    assert!(b
        .js(
            "return document.querySelector('#forget').offsetParent === null",
            vec![]
        )
        .as_bool()
        .unwrap_or(false));
    b.screenshot("host");
}
