//! The database's own health: the checks made before vman trusts the file
//! (`PRAGMA quick_check` or `integrity_check`, and no fresh database next to
//! VM folders or disk files), the sorting of SQLite errors into "no space"
//! and "damaged" (the latter remembered for /health), the WAL checkpoint of
//! a graceful stop, and consistent copies through SQLite's online backup API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags};

use super::{reserve::Reserve, Store, StoreError};
use crate::sync::LockExt;

/// How much of the file is read before it is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CheckLevel {
    /// No check (tests and tools that check themselves).
    #[default]
    None,
    /// `PRAGMA quick_check`: every page and b-tree, not index contents.
    Quick,
    /// `PRAGMA integrity_check`: also that indexes match their tables.
    Integrity,
}

/// How `Store::open_with` opens a database.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    pub check: CheckLevel,
    /// `(vms folder, disks folder)`: refuse to start a fresh database while
    /// these hold VM folders or disk files (their records would be lost).
    pub guard: Option<(PathBuf, PathBuf)>,
    /// Bytes kept aside next to the database (`{db}-reserve`), given up on a
    /// full filesystem so that a state write can still be recorded; 0: none.
    pub reserve_bytes: u64,
    /// The `flock` held on the database file while the store lives.
    pub lock: Lock,
}

/// Who else may use the database meanwhile. `flock` locks are separate
/// from SQLite's own (POSIX) locks, and the kernel drops them when the
/// process dies, even by `kill -9`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lock {
    #[default]
    None,
    /// `vman serve`: other servers and readers, not `vman db recover`.
    Shared,
    /// `vman db recover`: nobody else.
    Exclusive,
}

fn take_lock(path: &Path, lock: Lock) -> Result<Option<std::fs::File>, StoreError> {
    let op = match lock {
        Lock::None => return Ok(None),
        Lock::Shared => libc::LOCK_SH,
        Lock::Exclusive => libc::LOCK_EX,
    };
    let file = std::fs::File::open(path)
        .map_err(|e| StoreError::Refused(format!("cannot open {}: {e}", path.display())))?;
    // SAFETY: flock(2) on a descriptor we own; no memory is shared.
    let rc = unsafe {
        libc::flock(
            std::os::unix::io::AsRawFd::as_raw_fd(&file),
            op | libc::LOCK_NB,
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        return Err(StoreError::Refused(
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                format!(
                    "database {} is in use by a running `vman serve` (or `vman db recover`); \
                     stop it first",
                    path.display()
                )
            } else {
                format!("cannot lock {}: {err}", path.display())
            },
        ));
    }
    Ok(Some(file))
}

impl OpenOptions {
    /// What `vman serve` asks: a check (quick, or integrity with
    /// `--check-db`), the guard over the storage folders, the reserve.
    pub fn for_serve(config: &crate::config::Config) -> Self {
        Self {
            check: if config.check_db {
                CheckLevel::Integrity
            } else {
                CheckLevel::Quick
            },
            guard: Some((config.vms_dir(), config.disks_dir())),
            reserve_bytes: config.db_reserve_mib * 1024 * 1024,
            lock: Lock::Shared,
        }
    }
}

/// What the storage holds that only the database describes.
#[derive(Debug, Default)]
pub struct Holdings {
    pub vm_folders: Vec<String>,
    pub disk_files: Vec<String>,
}

impl Holdings {
    /// VM folders (valid names) under `vms`, disk files under `disks`.
    pub fn scan(vms: &Path, disks: &Path) -> Self {
        let names = |dir: &Path, want_dir: bool| -> Vec<String> {
            let mut out: Vec<String> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| {
                    e.file_type()
                        .is_ok_and(|t| if want_dir { t.is_dir() } else { t.is_file() })
                })
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| !n.starts_with('.'))
                .collect();
            out.sort();
            out
        };
        Self {
            vm_folders: names(vms, true),
            disk_files: names(disks, false),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.vm_folders.is_empty() && self.disk_files.is_empty()
    }

    fn describe(&self) -> String {
        let list = |v: &[String]| {
            let mut s = v.iter().take(3).cloned().collect::<Vec<_>>().join(", ");
            if v.len() > 3 {
                s.push_str(", ...");
            }
            s
        };
        format!(
            "{} VM folder(s) ({}) and {} disk file(s) ({})",
            self.vm_folders.len(),
            list(&self.vm_folders),
            self.disk_files.len(),
            list(&self.disk_files)
        )
    }
}

/// Missing or zero bytes long.
pub fn is_empty_file(path: &Path) -> Result<bool, StoreError> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(m.len() == 0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(StoreError::Refused(format!(
            "cannot read database {}: {e}",
            path.display()
        ))),
    }
}

fn corrupt_message(path: &Path, what: &str) -> String {
    format!(
        "database {} is damaged ({what}); refusing to start: restore a copy made with \
         `vman db backup`, or move it away (mv {0} {0}.damaged) and rebuild the records \
         from the storage folders with `vman db recover`",
        path.display()
    )
}

/// Runs `quick_check` or `integrity_check` on an existing, non-empty file.
pub fn check_file(path: &Path, level: CheckLevel) -> Result<(), StoreError> {
    let pragma = match level {
        CheckLevel::None => return Ok(()),
        CheckLevel::Quick => "quick_check",
        CheckLevel::Integrity => "integrity_check",
    };
    let found = (|| -> rusqlite::Result<Vec<String>> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        let mut stmt = conn.prepare(&format!("PRAGMA {pragma}(20)"))?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.collect()
    })();
    match found {
        Ok(rows) if rows.len() == 1 && rows[0] == "ok" => Ok(()),
        Ok(rows) => Err(StoreError::Refused(corrupt_message(
            path,
            &format!(
                "PRAGMA {pragma}: {}",
                rows.first().map(String::as_str).unwrap_or("no answer")
            ),
        ))),
        Err(e) if is_damage(&e) => Err(StoreError::Refused(corrupt_message(
            path,
            &format!("PRAGMA {pragma}: {e}"),
        ))),
        Err(e) => Err(StoreError::Sqlite(e)),
    }
}

fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

fn schema_version(path: &Path) -> Result<i64, StoreError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    match conn.pragma_query_value(None, "user_version", |r| r.get(0)) {
        Ok(v) => Ok(v),
        Err(e) if is_damage(&e) => Err(StoreError::Refused(corrupt_message(path, &e.to_string()))),
        Err(e) => Err(e.into()),
    }
}

impl Store {
    /// Opens the database after the checks `opts` asks for; see
    /// `OpenOptions`. Every refusal is one line saying what to do.
    pub fn open_with(path: &Path, opts: &OpenOptions) -> Result<Self, StoreError> {
        let empty = is_empty_file(path)?;
        if !empty {
            check_file(path, opts.check)?;
        }
        if let Some((vms, disks)) = &opts.guard {
            let fresh = empty || schema_version(path)? == 0;
            let held = Holdings::scan(vms, disks);
            if fresh && !held.is_empty() {
                return Err(StoreError::Refused(format!(
                    "database {} is {} but the storage holds {}; refusing to start without \
                     their records: restore a copy made with `vman db backup`, or rebuild \
                     the records from the folders with `vman db recover`",
                    path.display(),
                    if empty { "missing or empty" } else { "new" },
                    held.describe()
                )));
            }
        }
        // An exclusive user locks before it reads; a server after the
        // checks, which must not create the file.
        let early = if opts.lock == Lock::Exclusive && !empty {
            take_lock(path, Lock::Exclusive)?
        } else {
            None
        };
        let reserve = if opts.reserve_bytes > 0 {
            Reserve::new(reserve_path(path), opts.reserve_bytes)
        } else {
            Reserve::none()
        };
        let store = Self::connect(path, reserve)?;
        let held = match early {
            Some(f) => Some(f),
            None => take_lock(path, opts.lock)?,
        };
        *store.lock.lock_or_recover() = held;
        Ok(store)
    }

    /// Sorts an error: "database or disk is full" becomes `Full`, a damaged
    /// file becomes `Damaged` and is remembered for /health.
    pub(super) fn classify(&self, e: StoreError) -> StoreError {
        let StoreError::Sqlite(err) = &e else {
            return e;
        };
        match err.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => StoreError::Full(err.to_string()),
            // SQLite reports most ENOSPC as SQLITE_FULL; a failed -shm grow
            // is an I/O error whose errno is still ours to read.
            Some(ErrorCode::SystemIoFailure)
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSPC) =>
            {
                StoreError::Full(err.to_string())
            }
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
                let msg = err.to_string();
                let mut trouble = self.trouble.lock_or_recover();
                if trouble.is_none() {
                    tracing::error!(
                        "the database is damaged ({msg}); stop vman and restore a backup \
                         or rebuild the records with `vman db recover`"
                    );
                    *trouble = Some(msg.clone());
                }
                StoreError::Damaged(msg)
            }
            _ => e,
        }
    }

    /// The first damage any query met, if one did.
    pub fn trouble(&self) -> Option<String> {
        self.trouble.lock_or_recover().clone()
    }

    /// Moves every committed page from the WAL into the database file and
    /// empties the WAL (graceful shutdown).
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let conn = self.writer.lock_or_recover();
        let (busy, log, done): (i64, i64, i64) = conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(|e| self.classify(e.into()))?;
        if busy != 0 {
            return Err(StoreError::Refused(format!(
                "WAL checkpoint incomplete: {done} of {log} frames copied (a reader was busy)"
            )));
        }
        Ok(())
    }
}

/// Where the space reserve of the database at `db` lives.
pub fn reserve_path(db: &Path) -> PathBuf {
    let mut name = db.file_name().unwrap_or_default().to_os_string();
    name.push("-reserve");
    db.with_file_name(name)
}

/// Copies the database at `src` to `dest` with SQLite's online backup API:
/// one read transaction, so the copy is consistent even while a server
/// writes. `dest` must not exist; it appears only complete (temporary file,
/// fsync, rename). Returns the number of pages copied.
pub fn backup(src: &Path, dest: &Path) -> Result<i32, StoreError> {
    if dest.exists() {
        return Err(StoreError::Refused(format!(
            "{} already exists; refusing to overwrite it",
            dest.display()
        )));
    }
    if is_empty_file(src)? {
        return Err(StoreError::Refused(format!(
            "database {} is missing or empty; nothing to back up",
            src.display()
        )));
    }
    let mut tmp_name = dest.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".partial-{}", std::process::id()));
    let tmp = dest.with_file_name(tmp_name);
    let result = (|| -> Result<i32, StoreError> {
        let source = Connection::open_with_flags(src, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        source.busy_timeout(Duration::from_secs(10))?;
        let mut target = Connection::open(&tmp)?;
        {
            let copy = rusqlite::backup::Backup::new(&source, &mut target)?;
            // All pages in one step: one snapshot of the source.
            loop {
                match copy.step(-1)? {
                    rusqlite::backup::StepResult::Done => break,
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        let pages: i32 = target.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        target.pragma_update(None, "journal_mode", "DELETE")?;
        drop(target);
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| StoreError::Refused(format!("cannot sync {}: {e}", tmp.display())))?;
        check_file(&tmp, CheckLevel::Quick)?;
        std::fs::rename(&tmp, dest).map_err(|e| {
            StoreError::Refused(format!("cannot rename to {}: {e}", dest.display()))
        })?;
        Ok(pages)
    })();
    if result.is_err() {
        for suffix in ["", "-journal", "-wal", "-shm"] {
            let mut p = tmp.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_database_next_to_vm_folders_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (vms, disks) = (dir.path().join("vms"), dir.path().join("disks"));
        std::fs::create_dir_all(vms.join("web")).expect("vm folder");
        let db = dir.path().join("vman.db");
        std::fs::write(&db, b"").expect("empty db");
        let opts = OpenOptions {
            guard: Some((vms.clone(), disks)),
            check: CheckLevel::Quick,
            ..Default::default()
        };
        let err = Store::open_with(&db, &opts).err().expect("refused");
        let msg = err.to_string();
        assert!(msg.contains("1 VM folder(s) (web)"), "{msg}");
        assert!(msg.contains("vman db recover"), "{msg}");
        assert_eq!(std::fs::metadata(&db).expect("db").len(), 0, "untouched");
        std::fs::remove_dir(vms.join("web")).expect("rm");
        Store::open_with(&db, &opts).expect("nothing to lose: opens");
    }

    #[test]
    fn garbage_is_refused_by_quick_check() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("vman.db");
        std::fs::write(&db, vec![0x5a; 8192]).expect("garbage");
        let err = check_file(&db, CheckLevel::Quick).expect_err("refused");
        assert!(err.to_string().contains("is damaged"), "{err}");
    }

    #[test]
    fn backup_copies_rows_and_never_overwrites() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("vman.db");
        let store = Store::open(&db).expect("open");
        store
            .insert_template(&crate::model::Template {
                name: crate::model::Name::parse("n", "t").expect("name"),
                cpu_count: 1,
                ram_mib: 64,
                disk_size_gb: None,
                created_at: crate::model::now(),
            })
            .expect("insert");
        let copy = dir.path().join("copy.db");
        assert!(backup(&db, &copy).expect("backup") > 0);
        assert_eq!(
            Store::open(&copy)
                .expect("open copy")
                .list_templates()
                .expect("list")
                .len(),
            1
        );
        assert!(backup(&db, &copy).is_err(), "overwrote");
        store.checkpoint().expect("checkpoint");
    }
}
