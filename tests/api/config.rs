//! Configuration: `.env` in the working directory, the environment winning
//! over it, and bad values stopping start-up with one clear line.

use serde_json::json;
use tempfile::TempDir;

use crate::common::{run_vman, Exited, Server};

fn dotenv_dir(content: &str) -> TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(".env"), content).expect("write .env");
    dir
}

fn status_with(s: &Server, token: &str) -> u16 {
    let auth = format!("Bearer {token}");
    s.raw("GET", "/templates", None, &[("authorization", &auth)])
        .status
}

#[test]
fn dotenv_in_working_directory_is_read() {
    let dir = dotenv_dir("# comment\nVMAN_API_TOKEN=from-dotenv-0123456789\n");
    let s = Server::builder().current_dir(dir.path()).start();
    assert_eq!(s.raw("GET", "/templates", None, &[]).status, 401);
    assert_eq!(status_with(&s, "from-dotenv-0123456789"), 200);
}

#[test]
fn dotenv_can_set_the_storage_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = dir.path().join("from-dotenv-storage");
    std::fs::write(
        dir.path().join(".env"),
        format!("VMAN_STORAGE_PATH={}\n", storage.display()),
    )
    .expect("write .env");
    let s = Server::builder()
        .env_remove("VMAN_STORAGE_PATH")
        .current_dir(dir.path())
        .start();
    assert_eq!(
        s.post_json(
            "/templates",
            &json!({"name": "t", "cpu_count": 1, "ram_amount": 1})
        )
        .0,
        201
    );
    assert!(
        storage.join("vman.db").is_file(),
        "{} not used",
        storage.display()
    );
    assert!(!s.storage_path().join("vman.db").exists());
}

#[test]
fn environment_overrides_dotenv() {
    let dir = dotenv_dir("VMAN_API_TOKEN=from-dotenv-0123456789\n");
    let s = Server::builder()
        .current_dir(dir.path())
        .env("VMAN_API_TOKEN", "from-env-0123456789abcd")
        .start();
    assert_eq!(status_with(&s, "from-env-0123456789abcd"), 200);
    assert_eq!(status_with(&s, "from-dotenv-0123456789"), 401);
}

#[track_caller]
fn assert_refused(out: &Exited, must_contain: &[&str]) {
    assert!(!out.timed_out, "vman started instead of refusing: {out:?}");
    assert!(
        matches!(out.code, Some(c) if c != 0),
        "exit code {:?}: {out:?}",
        out.code
    );
    let lines = out.stderr_lines();
    assert_eq!(
        lines.len(),
        1,
        "want one clear line on stderr, got {lines:#?}"
    );
    let line = lines[0].to_lowercase();
    for want in must_contain {
        assert!(
            line.contains(&want.to_lowercase()),
            "{:?} does not mention {want:?}",
            lines[0]
        );
    }
}

fn refused_env(extra: &[(&str, &str)], args: &[&str]) -> Exited {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = dir.path().join("storage");
    let logs = dir.path().join("logs");
    let (storage, logs) = (
        storage.to_str().expect("utf8"),
        logs.to_str().expect("utf8"),
    );
    let mut envs = vec![
        ("VMAN_STORAGE_PATH", storage),
        ("VMAN_LOG_DIR", logs),
        ("VMAN_ACCEL", "tcg"),
        ("VMAN_PORT", "0"),
    ];
    envs.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
    envs.extend_from_slice(extra);
    let mut argv = vec!["serve"];
    argv.extend_from_slice(args);
    run_vman(&argv, &envs, dir.path())
}

#[test]
fn port_that_is_not_a_number_is_refused() {
    let out = refused_env(&[("VMAN_PORT", "abc")], &[]);
    assert_refused(&out, &["abc", "port"]);
}

#[test]
fn port_out_of_range_is_refused() {
    let out = refused_env(&[("VMAN_PORT", "70000")], &[]);
    assert_refused(&out, &["70000", "port"]);
}

#[test]
fn unknown_log_level_is_refused() {
    let out = refused_env(&[("VMAN_LOG_LEVEL", "loud")], &[]);
    assert_refused(&out, &["loud", "log"]);
}

#[test]
fn storage_path_that_is_a_file_is_refused() {
    let file = tempfile::NamedTempFile::new().expect("tempfile");
    let path = file.path().to_str().expect("utf8");
    let out = refused_env(&[("VMAN_STORAGE_PATH", path)], &[]);
    assert_refused(&out, &[path, "not a directory"]);
    assert!(file.path().is_file(), "the file was left alone");
}

#[test]
fn bad_value_in_dotenv_is_refused_too() {
    let dir = dotenv_dir("VMAN_LOG_LEVEL=loud\n");
    let out = Server::builder().current_dir(dir.path()).run_to_exit();
    assert_refused(&out, &["loud"]);
}

#[test]
fn public_host_without_token_is_refused() {
    let out = Server::builder().host("0.0.0.0").run_to_exit();
    assert_refused(&out, &["0.0.0.0", "VMAN_API_TOKEN"]);
}

#[test]
fn public_host_with_empty_token_is_refused() {
    let out = Server::builder()
        .host("0.0.0.0")
        .env("VMAN_API_TOKEN", "")
        .run_to_exit();
    assert!(!out.timed_out, "{out:?}");
    assert_ne!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stderr_lines().len(), 1, "{out:?}");
}

#[test]
fn public_host_with_token_serves_and_demands_it() {
    let s = Server::builder()
        .host("0.0.0.0")
        .api_token("public-token-0123456789")
        .start();
    assert_eq!(s.raw("GET", "/vms", None, &[]).status, 401);
    assert_eq!(status_with(&s, "public-token-0123456789"), 200);
}

#[test]
fn bad_bridge_settings_are_refused_at_start_up() {
    for (key, value, shown) in [
        ("VMAN_SUBNET", "192.168.100.1/24", "host bits"),
        ("VMAN_SUBNET", "10.0.0.0/8", "10.0.0.0/8"),
        ("VMAN_VLAN_ID", "4095", "4095"),
        (
            "VMAN_BRIDGE_NAME",
            "a-name-far-too-long",
            "a-name-far-too-long",
        ),
        ("VMAN_METADATA_PORT", "0", "0"),
    ] {
        let out = Server::builder().env(key, value).run_to_exit();
        assert_refused(&out, &[shown]);
    }
}
