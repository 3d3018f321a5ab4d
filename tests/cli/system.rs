//! `vman health`, the connection settings (`VMAN_URL`, `--url`, the token),
//! exit code 3 for a server that is down, completions and the man page.

use std::net::TcpListener;

use crate::common::Server;
use crate::Cli;

#[test]
fn health_is_a_table_or_json() {
    let s = Server::start();
    let c = Cli::new(&s.url(""), s.storage_path());
    let out = c.ok(&["health"]);
    assert!(out.starts_with("status: ok"), "{out}");
    assert!(
        crate::rows(&out)
            .iter()
            .any(|r| r[0] == "database" && r[1] == "ok"),
        "{out}"
    );
    let j = c.json(&["health"]);
    assert_eq!(j["status"], "ok");
    assert_eq!(j["checks"]["database"]["ok"], true);
    assert!(c.ok(&["health", "--format", "yaml"]).contains("status: ok"));
}

#[test]
fn a_server_that_is_down_gives_exit_3_with_the_url() {
    // A port nobody listens on.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let c = Cli::new(&url, dir.path());
    for args in [
        &["health"][..],
        &["vm", "list"],
        &["template", "create", "t", "--cpus", "1", "--ram", "1"],
        &["launch", "t"],
        &["events"],
        &["events", "--follow"],
        &["vm", "console", "g1"],
    ] {
        let msg = c.fails(3, args);
        assert!(msg.contains(&format!("{url}/")), "{args:?}: {msg}");
    }
    // --url wins over VMAN_URL.
    let bad = Cli::new("http://127.0.0.1:1", dir.path());
    let s = Server::start();
    bad.ok(&["vm", "list", "--url", &s.url("")]);
}

#[test]
fn a_bad_url_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    for url in ["https://127.0.0.1:8000", "localhost:8000", "not a url"] {
        let msg = Cli::new(url, dir.path()).fails(2, &["vm", "list"]);
        assert!(msg.contains("VMAN_URL"), "{url}: {msg}");
    }
}

#[test]
fn the_token_is_sent_from_the_environment_or_the_flag() {
    let token = "0123456789abcdef-cli";
    let s = Server::builder().api_token(token).start();
    let mut c = Cli::new(&s.url(""), s.storage_path());
    // Without it: the server's 401 is a refusal.
    let d = c.refused(&["vm", "list"]);
    assert!(d.to_lowercase().contains("token"), "{d}");
    c.ok(&["vm", "list", "--token", token]);
    c.token = Some(token.into());
    c.ok(&["template", "create", "t", "--cpus", "1", "--ram", "1"]);
    assert_eq!(c.json(&["template", "list"])[0]["name"], "t");
    // The event list and stream send it too.
    assert_eq!(c.json(&["events"])[0]["action"], "created");
    let d = c.refused(&["events", "--follow", "--token", "wrong-token-0123456789"]);
    assert!(d.to_lowercase().contains("token"), "{d}");
    let wrong = c.refused(&["vm", "list", "--token", "wrong-token-0123456789"]);
    assert!(wrong.to_lowercase().contains("token"), "{wrong}");
}

#[test]
fn usage_errors_exit_2_before_any_request() {
    let dir = tempfile::tempdir().unwrap();
    // Nobody listens there: a request would be exit 3, not 2.
    let c = Cli::new("http://127.0.0.1:1", dir.path());
    c.fails(2, &["frobnicate"]);
    c.fails(2, &["vm", "list", "--bogus"]);
    c.fails(2, &["completions", "tcsh"]);
    assert_eq!(c.run(&["template"]).code, Some(2));
    assert_eq!(c.run(&["--help"]).code, Some(0));
    // Server flags stay where they were: `vman serve --help` has no client flags.
    let help = c.ok(&["serve", "--help"]);
    assert!(
        help.contains("--storage-path") && !help.contains("--url"),
        "{help}"
    );
}

#[test]
fn completions_and_man_page_are_generated() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cli::new("http://127.0.0.1:1", dir.path());
    let bash = c.ok(&["completions", "bash"]);
    assert!(bash.contains("_vman()") && bash.contains("launch"), "bash");
    let zsh = c.ok(&["completions", "zsh"]);
    assert!(zsh.contains("#compdef vman"), "zsh");
    let fish = c.ok(&["completions", "fish"]);
    assert!(fish.contains("complete -c vman"), "fish");
    let man = c.ok(&["man"]);
    assert!(man.contains(".TH vman 1"), "man");
    // Every client command has its page.
    for page in [
        ".TH vman-vm 1",
        ".TH vman-vm-logs 1",
        ".TH vman-disk-attach 1",
        ".TH vman-launch 1",
    ] {
        assert!(man.contains(page), "{page}");
    }
}

/// The one-line usage message names a flag's variable only when it has one
/// (it used to derive `VMAN_<FLAG>` from any flag: `--format / VMAN_FORMAT`).
#[test]
fn usage_message_names_no_variable_that_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cli::new("http://127.0.0.1:1", dir.path());
    let msg = c.fails(2, &["vm", "list", "--format", "xml"]);
    assert!(
        msg.contains("'--format <FORMAT>'") && !msg.contains("VMAN_FORMAT"),
        "{msg}"
    );
    // Server flags keep theirs.
    let msg = c.fails(2, &["serve", "--port", "eighty"]);
    assert!(msg.contains("--port / VMAN_PORT"), "{msg}");
}
