//! The database file itself: refused when damaged or emptied next to VM
//! folders, rebuilt by `vman db recover` (never under a running server),
//! copied by `vman db backup` while the server runs, damage found later
//! flagged on /health, and an empty WAL after a graceful stop.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use serde_json::{json, Value};

use crate::common::{run_vman, Exited, Server};
use crate::{make_template, make_vm, names};

fn db_of(s: &Server) -> std::path::PathBuf {
    s.storage_path().join("vman.db")
}

/// Runs `vman db ARGS --storage-path STORAGE`.
fn vman_db(storage: &Path, args: &[&str]) -> Exited {
    let mut argv = vec!["db"];
    argv.extend_from_slice(args);
    let storage_arg = storage.to_string_lossy().into_owned();
    argv.extend_from_slice(&["--storage-path", &storage_arg]);
    run_vman(&argv, &[], storage)
}

#[track_caller]
fn assert_refused_with(out: &Exited, needles: &[&str]) {
    assert!(!out.timed_out, "started a server: {out:?}");
    assert_ne!(out.code, Some(0), "{out:?}");
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "one clear line, got {lines:?}");
    for n in needles {
        assert!(lines[0].contains(n), "{:?} lacks {n:?}", lines[0]);
    }
}

/// Overwrites the first page of table `table` with pseudo-random bytes.
fn scramble_table_page(db: &Path, table: &str) {
    let (root, page_size): (i64, i64) = {
        let c = rusqlite::Connection::open(db).expect("open");
        let root = c
            .query_row(
                "SELECT rootpage FROM sqlite_master WHERE name = ?1",
                [table],
                |r| r.get(0),
            )
            .expect("rootpage");
        let size = c
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .expect("page_size");
        (root, size)
    };
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let garbage: Vec<u8> = (0..page_size)
        .map(|_| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 56) as u8
        })
        .collect();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(db)
        .expect("open db");
    f.seek(SeekFrom::Start(((root - 1) * page_size) as u64))
        .expect("seek");
    f.write_all(&garbage).expect("write");
    f.sync_all().expect("sync");
}

fn wal_len(db: &Path) -> u64 {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    fs::metadata(wal).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn sigterm_leaves_an_empty_wal_and_every_row_in_the_database_file() {
    let mut s = Server::start();
    make_template(&s, "small", 1, 1);
    for i in 0..20 {
        make_vm(&s, "small", Some(&format!("vm{i}")));
    }
    assert!(wal_len(&db_of(&s)) > 0, "the writes went to the WAL first");
    assert!(s.sigterm().success());
    assert_eq!(wal_len(&db_of(&s)), 0, "WAL not checkpointed");
    // The file alone holds them: read it without its WAL.
    let c = rusqlite::Connection::open_with_flags(
        db_of(&s),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open");
    let n: i64 = c
        .query_row("SELECT COUNT(*) FROM vms", [], |r| r.get(0))
        .expect("count");
    assert_eq!(n, 20);
}

#[test]
fn zero_length_database_next_to_vm_folders_is_refused_and_recover_rebuilds_the_records() {
    let mut s = Server::start();
    make_template(&s, "small", 2, 1);
    make_vm(&s, "small", Some("web"));
    let (st, d) = s.post_json("/disks", &json!({"name": "data1", "size": 2}));
    assert_eq!(st, 201, "{d}");
    // A VM folder as a first start makes it (the root disk is kept as is).
    fs::create_dir_all(s.storage_path().join("vms/web")).expect("vm folder");
    assert!(s.sigterm().success());
    let storage = s.storage_handle();
    let db = db_of(&s);
    fs::write(&db, b"").expect("truncate the database");

    let out = Server::builder().storage(storage.clone()).run_to_exit();
    assert_refused_with(
        &out,
        &[
            "is missing or empty",
            "1 VM folder(s) (web)",
            "vman db recover",
        ],
    );
    assert_eq!(fs::metadata(&db).expect("db").len(), 0, "left as it was");
    // A missing database too.
    fs::remove_file(&db).expect("rm db");
    let out = Server::builder().storage(storage.clone()).run_to_exit();
    assert_refused_with(&out, &["data1.qcow2", "vman db backup"]);
    assert!(!db.exists(), "refusing must not create the file");

    let out = vman_db(
        storage.path(),
        &["recover", "--cpus", "2", "--ram-mib", "512"],
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("recorded vm web"), "{}", out.stdout);
    assert!(
        out.stdout.contains("recorded disk data1: 2 GiB qcow2"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("not recoverable"), "{}", out.stdout);

    let s = Server::builder().storage(storage.clone()).start();
    let (st, vm) = s.get("/vms/web");
    assert_eq!(st, 200, "{vm}");
    assert_eq!(vm["state"], "stopped");
    assert_eq!(vm["vm_template"]["name"], "recovered");
    assert_eq!(vm["vm_template"]["cpu_count"], 2);
    let (st, disk) = s.get("/disks/data1");
    assert_eq!(st, 200, "{disk}");
    assert_eq!(disk["state"], "available");
    assert_eq!(disk["size"], 2);
    // Running it again records nothing twice.
    drop(s);
    let out = vman_db(storage.path(), &["recover"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains("skipped vm web: already recorded"),
        "{}",
        out.stdout
    );
}

#[test]
fn random_bytes_in_a_table_page_are_refused_at_start_by_quick_check() {
    let mut s = Server::start();
    make_template(&s, "small", 1, 1);
    for i in 0..5 {
        make_vm(&s, "small", Some(&format!("v{i}")));
    }
    assert!(s.sigterm().success());
    scramble_table_page(&db_of(&s), "vms");
    let out = Server::builder().storage(s.storage_handle()).run_to_exit();
    assert_refused_with(&out, &["is damaged", "quick_check", "vman db recover"]);
    let out = Server::builder()
        .storage(s.storage_handle())
        .env("VMAN_CHECK_DB", "true")
        .run_to_exit();
    assert_refused_with(&out, &["is damaged", "integrity_check"]);
    // recover refuses a damaged file too, with the same advice.
    let out = vman_db(s.storage_path(), &["recover"]);
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("is damaged"), "{out:?}");
}

#[test]
fn damage_found_while_running_gives_a_short_500_and_flags_health() {
    let mut s = Server::start();
    make_template(&s, "small", 1, 1);
    for i in 0..5 {
        make_vm(&s, "small", Some(&format!("v{i}")));
    }
    s.restart(); // checkpointed: the rows are in the file
    assert_eq!(s.get("/health").0, 200);
    scramble_table_page(&db_of(&s), "vms");
    // A write elsewhere makes every reader drop its cached pages.
    make_template(&s, "other", 1, 1);
    let r = s.request("GET", "/vms/v1", None);
    assert_eq!(r.status, 500, "{}", r.text);
    assert_eq!(r.body["code"], "database_damaged", "{}", r.text);
    let detail = r.body["detail"].as_str().expect("detail");
    let storage = s.storage_path().to_string_lossy().into_owned();
    assert!(detail.len() < 80 && !detail.contains(&storage), "{detail}");
    let (st, health) = s.get("/health");
    assert_eq!(st, 503, "{health}");
    assert_eq!(health["checks"]["database"]["ok"], false, "{health}");
    assert!(s.logs_contain("the database is damaged"));
}

#[test]
fn vman_db_backup_gives_a_database_with_the_same_rows_while_the_server_runs() {
    let s = Server::start();
    make_template(&s, "small", 1, 1);
    for i in 0..10 {
        make_vm(&s, "small", Some(&format!("b{i}")));
    }
    let (st, _) = s.put_json("/vms/b1/metadata", &json!({"hostname": "h1"}));
    assert_eq!(st, 200);
    let out_dir = tempfile::tempdir().expect("tempdir");
    let copy = out_dir.path().join("copy.db");
    let out = vman_db(s.storage_path(), &["backup", copy.to_str().expect("utf8")]);
    assert_eq!(out.code, Some(0), "{out:?}");
    // The server still works and the copy opens with the same rows.
    make_vm(&s, "small", Some("after"));
    let (_, vms) = s.get("/vms");
    let c = rusqlite::Connection::open(&copy).expect("open copy");
    let mut stmt = c
        .prepare("SELECT id FROM vms ORDER BY id")
        .expect("prepare");
    let ids: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    let mut want = names(&vms, "id");
    want.retain(|id| id != "after");
    assert_eq!(ids, want);
    let host: String = c
        .query_row(
            "SELECT hostname FROM vm_metadata WHERE vm_id = 'b1'",
            [],
            |r| r.get(0),
        )
        .expect("metadata");
    assert_eq!(host, "h1");
    let check: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("check");
    assert_eq!(check, "ok");
    // Rebuilding records under a running server is refused.
    let out = vman_db(s.storage_path(), &["recover"]);
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("in use by a running"), "{out:?}");
    // Never over an existing file.
    let out = vman_db(s.storage_path(), &["backup", copy.to_str().expect("utf8")]);
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("already exists"), "{out:?}");
    let leftovers: Vec<Value> = fs::read_dir(out_dir.path())
        .expect("ls")
        .flatten()
        .map(|e| Value::String(e.file_name().to_string_lossy().into_owned()))
        .collect();
    assert_eq!(leftovers, vec![Value::String("copy.db".into())]);
}
