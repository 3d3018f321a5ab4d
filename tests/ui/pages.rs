//! What a person does in the web console: create a VM from the form, start
//! it and watch its row turn `running` without a reload, type into its
//! serial console and read the echo back, stop and delete it; a killed QEMU
//! turns the row to `error` with the reason; with a token the page asks for
//! it, refuses a wrong one and works with the right one.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::browser::{artifacts, Browser};
use crate::harness::{Vman, GUEST, SERVER};

/// A random-enough suffix (pid and clock) for names and markers.
fn random() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}{}", std::process::id() % 1000, nanos % 100_000)
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// The page must be in the binary, or every test below would only see the
/// "not built" page.
fn assert_built(vman: &Vman) {
    let (status, body) = vman.call("GET", "/ui", None);
    let page = body.as_str().unwrap_or("");
    assert_eq!(status, 200);
    assert!(
        !page.contains("not built"),
        "the web console is not built into this binary: run `npm ci && npm run build` in ui/, then cargo build"
    );
}

const ROW_STATE: &str =
    "const r = document.querySelector(`#vm-rows tr[data-vm=\"${arguments[0]}\"]`); return r && r.dataset.state === arguments[1];";

fn wait_row(b: &Browser, id: &str, state: &str, deadline: Duration) {
    b.wait(
        &format!("the row of {id} to show {state}"),
        deadline,
        ROW_STATE,
        vec![json!(id), json!(state)],
    );
}

/// Marks the page; `assert_not_reloaded` fails if it was loaded again.
fn mark_page(b: &Browser) {
    b.js("window.__vmanTestMark = 'same-page'; return true;", vec![]);
}

fn assert_not_reloaded(b: &Browser) {
    let mark = b.js("return window.__vmanTestMark || null;", vec![]);
    assert_eq!(mark, json!("same-page"), "the page was reloaded");
}

/// Clicks `css` (a destructive action) and confirms its dialog.
fn click_confirmed(b: &Browser, css: &str) {
    b.click(css);
    b.wait_for("dialog#confirm[open]", SERVER);
    b.click("#confirm-ok");
}

#[test]
fn a_vm_created_from_the_form_starts_shows_running_live_echoes_in_its_console_and_is_deleted() {
    let vman = Vman::builder().with_tiny_default().start();
    assert_built(&vman);
    vman.template("tiny", 256);
    let name = format!("ui-vm-{}", random());
    let b = Browser::start(&vman.base, 1280, 900);
    b.goto("/ui/#/create");
    b.wait_for("#create-template option[value=tiny]", SERVER);
    b.fill("#create-name", &name);
    b.fill("#create-hostname", "uihost");
    b.click("#create-submit");
    // The form leads to the list, where the new VM is stopped.
    wait_row(&b, &name, "stopped", SERVER);
    b.wait_for("#live[data-live=live]", SERVER);
    assert_eq!(
        vman.get(&format!("/vms/{name}/metadata"))["hostname"],
        "uihost"
    );
    mark_page(&b);

    b.click(&format!(
        "#vm-rows tr[data-vm=\"{name}\"] button[data-action=start]"
    ));
    wait_row(&b, &name, "running", GUEST);
    assert_eq!(vman.vm(&name)["state"], "running");
    b.screenshot("list");
    b.window_size(390, 844);
    b.screenshot("list-phone");
    b.window_size(1280, 900);

    // Its page: the console connects; once the guest's shell is up, a line
    // typed into the terminal comes back in it.
    b.click(&format!("#vm-rows tr[data-vm=\"{name}\"] a.vm-link"));
    b.wait_for("#console-status[data-state=open]", SERVER);
    vman.wait_console(&name, "vman-guest: ready", 1);
    let marker = format!("ui-{}", random());
    let mut typed = 0;
    let start = std::time::Instant::now();
    loop {
        if b.terminal_lines().iter().any(|l| l.trim() == marker) {
            break;
        }
        // A line typed right as the shell starts may be lost (see the
        // console_ws e2e test); it is typed again now and then, and only
        // its echo counts.
        if typed == 0 || start.elapsed() > Duration::from_secs(15 * typed) {
            b.click("#terminal .xterm-screen");
            b.type_into(
                "#terminal textarea.xterm-helper-textarea",
                &format!("echo {marker}\n"),
            );
            typed += 1;
        }
        assert!(
            start.elapsed() < GUEST,
            "no line {marker:?} in the terminal after {GUEST:?}; it shows:\n{}",
            b.terminal_lines().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The typed command is in the terminal too, as the guest echoed it.
    assert!(b
        .terminal_lines()
        .iter()
        .any(|l| l.contains(&format!("echo {marker}"))));
    b.js(
        "document.querySelector('#console').scrollIntoView(); return true;",
        vec![],
    );
    b.screenshot("console");
    assert_not_reloaded(&b);

    // Back to the list (no reload), stop with confirmation, delete.
    b.click("a[href='#/']");
    wait_row(&b, &name, "running", SERVER);
    click_confirmed(
        &b,
        &format!("#vm-rows tr[data-vm=\"{name}\"] button[data-action=stop]"),
    );
    wait_row(&b, &name, "stopped", GUEST);
    click_confirmed(
        &b,
        &format!("#vm-rows tr[data-vm=\"{name}\"] button[data-action=delete]"),
    );
    b.wait(
        "the row to go",
        SERVER,
        "return !document.querySelector(`#vm-rows tr[data-vm=\"${arguments[0]}\"]`)",
        vec![json!(name)],
    );
    let (status, _) = vman.call("GET", &format!("/vms/{name}"), None);
    assert_eq!(status, 404);
    assert_not_reloaded(&b);
}

#[test]
fn a_killed_qemu_turns_the_row_to_error_with_the_reason_without_a_reload() {
    let vman = Vman::builder().with_tiny_default().start();
    assert_built(&vman);
    vman.template("tiny", 256);
    let id = "ui-kill";
    let (s, body) = vman.create_vm(json!({"template_name": "tiny", "name": id}));
    assert_eq!(s, 201, "{body}");
    let (s, body) = vman.start_vm(id);
    assert_eq!(s, 202, "{body}");
    let pid = vman.vm(id)["pid"].as_i64().expect("a running VM has a pid") as i32;

    let b = Browser::start(&vman.base, 1280, 900);
    b.goto("/ui/");
    wait_row(&b, id, "running", SERVER);
    b.wait_for("#live[data-live=live]", SERVER);
    mark_page(&b);
    // The page notes when the row turned `error`.
    b.js(
        "const id = arguments[0];
         window.__errorAt = null;
         new MutationObserver(() => {
           if (!window.__errorAt && document.querySelector(`#vm-rows tr[data-vm=\"${id}\"][data-state=error]`))
             window.__errorAt = Date.now();
         }).observe(document.querySelector('#vm-rows'), {childList: true, subtree: true, attributes: true});
         return true;",
        vec![json!(id)],
    );
    let killed_at = now_ms();
    // SAFETY: kill(2) has no memory effects; the pid is this test's QEMU.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    wait_row(&b, id, "error", SERVER);
    let reason = b.wait(
        "the reason under the state",
        SERVER,
        "const e = document.querySelector(`#vm-rows tr[data-vm=\"${arguments[0]}\"] .last-error`); return e && e.textContent;",
        vec![json!(id)],
    );
    let api_reason = vman.vm(id)["last_error"].clone();
    assert_eq!(reason, api_reason, "the row shows the server's last_error");
    assert!(reason.as_str().is_some_and(|r| !r.is_empty()));
    assert_not_reloaded(&b);
    let seen = b.js("return window.__errorAt;", vec![]);
    let latency = seen.as_f64().map(|t| t - killed_at);
    let line = format!(
        "kill -9 of QEMU -> row shows error: {} ms\n",
        latency.map_or("?".to_owned(), |l| format!("{l:.0}"))
    );
    eprint!("{line}");
    let _ = std::fs::write(artifacts().join("kill-to-row.txt"), line);
}

#[test]
fn with_a_token_the_page_asks_for_it_refuses_a_wrong_one_and_works_with_the_right_one() {
    let token = format!("ui-token-{}-abcdefghijkl", random());
    let vman = Vman::builder().api_token(&token).start();
    assert_built(&vman);
    vman.template("tiny", 256);
    let b = Browser::start(&vman.base, 1280, 900);
    b.goto("/ui/");
    b.wait_for("#login-form #login-token", SERVER);
    b.fill("#login-token", "not-the-token-at-all-0000");
    b.click("#login-submit");
    let error = b.wait(
        "the login error",
        SERVER,
        "const e = document.querySelector('#login-error'); return e && e.textContent;",
        vec![],
    );
    assert!(
        error.as_str().is_some_and(|e| e.contains("Wrong token")),
        "{error}"
    );
    assert!(b
        .js("return document.querySelector('#vm-table')", vec![])
        .is_null());

    b.fill("#login-token", &token);
    b.click("#login-submit");
    b.wait_for("#vm-table", SERVER);
    b.wait_for("#live[data-live=live]", SERVER);
    let kept = b.js("return sessionStorage.getItem('vman.token')", vec![]);
    assert_eq!(kept, json!(token));
    // The event stream is authorized (header, not URL): a VM made through
    // the API shows up in the list by itself.
    let (s, body) = vman.create_vm(json!({"template_name": "tiny", "name": "ui-tok"}));
    assert_eq!(s, 201, "{body}");
    wait_row(&b, "ui-tok", "stopped", SERVER);
    // A reload keeps the token for the tab: no second question.
    b.goto("/ui/");
    wait_row(&b, "ui-tok", "stopped", SERVER);
    assert!(b
        .js("return document.querySelector('#login-form')", vec![])
        .is_null());
    // The token is never written to vman's log.
    assert!(
        !vman.logs().iter().any(|l| l.contains(&token)),
        "the token appears in the log"
    );
    let _: Value = b.js("return true", vec![]);
}
