//! The forms of the web console on a stopped VM (no guest needed): the
//! list's state filter; port
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

    // The state filter of the list.
    b.goto("/ui/");
    b.wait_for("#vm-rows tr[data-vm=v1][data-state=stopped]", SERVER);
    b.select("#state-filter", "running");
    b.wait(
        "v1 filtered out",
        SERVER,
        "return !document.querySelector('#vm-rows tr[data-vm=v1]') && !document.querySelector('#vm-empty').hidden",
        vec![],
    );
    b.select("#state-filter", "stopped");
    b.wait_for("#vm-rows tr[data-vm=v1]", SERVER);
    b.select("#state-filter", "");

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

/// A qcow2 image whose file is `mib` MiB long (a valid header, then filler
/// the guest never reads as a disk): a copy long enough to be seen.
fn big_boot_disk(dir: &std::path::Path, mib: usize) -> std::path::PathBuf {
    use std::io::Write;
    let small = dir.join("small.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&small)
        .arg("64M")
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "{out:?}");
    let path = dir.join("big.qcow2");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("create"));
    f.write_all(&std::fs::read(&small).expect("read"))
        .expect("write");
    let chunk = vec![0xabu8; 1 << 20];
    for _ in 0..mib {
        f.write_all(&chunk).expect("write");
    }
    f.into_inner().expect("flush").sync_all().expect("sync");
    path
}

#[test]
fn create_and_start_from_the_form_shows_the_root_disk_copy_progress() {
    let dir = tempfile::Builder::new()
        .prefix("vman-ui-big-")
        .tempdir()
        .expect("temp dir");
    let image = big_boot_disk(dir.path(), 1024);
    let total = std::fs::metadata(&image).expect("size").len();
    let vman = Vman::builder()
        .env("VMAN_DEFAULT_BOOT_DISK", &image)
        .env("VMAN_NETWORK_MODE", "none")
        .start();
    vman.template("tiny", 128);
    let b = Browser::start(&vman.base, 1280, 900);
    b.goto("/ui/#/create");
    b.wait_for("#create-template option[value=tiny]", SERVER);
    // Every progress bar the page draws is noted.
    b.js(
        "window.__progress = [];
         new MutationObserver(() => {
           for (const p of document.querySelectorAll('[data-progress] progress'))
             window.__progress.push([Number(p.value), Number(p.max)]);
         }).observe(document.body, {childList: true, subtree: true});
         return true;",
        vec![],
    );
    b.fill("#create-name", "big");
    b.click("#create-start");
    b.click("#create-submit");
    b.wait(
        "the row of big to show running",
        crate::harness::GUEST,
        "const r = document.querySelector('#vm-rows tr[data-vm=big]'); return r && r.dataset.state === 'running';",
        vec![],
    );
    let seen = b.js("return window.__progress", vec![]);
    let seen: Vec<(f64, f64)> = seen
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
        .collect();
    eprintln!(
        "copy progress shown {} times: {:?}",
        seen.len(),
        seen.last()
    );
    assert!(!seen.is_empty(), "no copy progress was shown");
    for (done, max) in &seen {
        assert_eq!(*max, total as f64, "{seen:?}");
        assert!(*done <= *max, "{seen:?}");
    }
    // The bar is gone once the VM runs.
    assert!(b
        .js("return document.querySelector('[data-progress]')", vec![])
        .is_null());
    assert_eq!(vman.vm("big")["root_disk"]["source"], "default");
}
