//! SQLite persistence. This is the only module that knows SQL.
//!
//! One write connection behind a mutex serialises writers (SQLite allows one
//! at a time anyway, and waiting on a mutex is cheaper than `SQLITE_BUSY`
//! retries); a few read connections serve readers in parallel thanks to WAL.
//! Schema changes are the numbered files in `migrations/`, applied in order
//! at open and tracked in `PRAGMA user_version`.

/// The one list of a template's columns, in the order `template_row_at`
/// reads them, each with the table prefix `$t` (`""` or `"t."`). Defined
/// before the submodules so they can use it.
macro_rules! template_columns {
    ($t:literal) => {
        concat!(
            $t,
            "name, ",
            $t,
            "cpu_count, ",
            $t,
            "ram_mib, ",
            $t,
            "disk_size_gb, ",
            $t,
            "created_at"
        )
    };
}

mod bridge;
mod check;
mod clones;
mod disks;
mod events;
mod ports;
mod reserve;
mod snapshots;
mod vm_migrations;
mod vms;

pub use vm_migrations::{AdoptedDisk, Adoption, MigrationRole, MigrationRow, MigrationStep};

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::model::{Name, Template};
use crate::sync::LockExt;

pub use check::{backup, CheckLevel, Holdings, Lock, OpenOptions};
pub use clones::{CloneDisk, CloneJob, CloneRow, CommitClone};
pub use disks::{Disk, DiskClaim, DiskDelete, NewDisk};
pub use events::{EventFilter, EventRow};
pub use ports::PortInsert;
pub use snapshots::{Snapshot, SnapshotDisk, SnapshotOp};
pub use vms::{NewVm, VmRuntime, VmWrite};

/// The migrations, in order. Index + 1 is the schema version they produce.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/0001_init.sql"),
    include_str!("../../migrations/0002_disks.sql"),
    include_str!("../../migrations/0003_image_formats.sql"),
    include_str!("../../migrations/0004_network.sql"),
    include_str!("../../migrations/0005_metadata.sql"),
    include_str!("../../migrations/0006_bridge.sql"),
    include_str!("../../migrations/0007_events.sql"),
    include_str!("../../migrations/0008_snapshots.sql"),
    include_str!("../../migrations/0009_snapshot_disks.sql"),
    include_str!("../../migrations/0010_clones.sql"),
    include_str!("../../migrations/0011_migrations.sql"),
];

const READERS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("already exists")]
    AlreadyExists,
    #[error("template not found")]
    TemplateMissing,
    #[error("in use by {0} VM(s)")]
    InUse(u64),
    /// Every value of a pool (a subnet's addresses) is taken.
    #[error("none left")]
    Exhausted,
    #[error("database schema version {found} is newer than this vman ({known})")]
    SchemaTooNew { found: i64, known: i64 },
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// SQLite said "database or disk is full" (ENOSPC): nothing was written.
    #[error("no space left for the database: {0}")]
    Full(String),
    /// SQLite found the file damaged (SQLITE_CORRUPT, SQLITE_NOTADB).
    #[error("the database file is damaged: {0}")]
    Damaged(String),
    /// Opening refused: the reason is one line saying what to do.
    #[error("{0}")]
    Refused(String),
}

pub struct Store {
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    /// Bumped after every committed write: readers that cache a result
    /// compare it to know whether the cache is still true.
    generation: AtomicU64,
    /// The first sign of a damaged database seen by any query, for /health.
    trouble: Mutex<Option<String>>,
    /// Space set aside so that recording a stopped QEMU never fails on a
    /// full filesystem (see `reserve`).
    reserve: reserve::Reserve,
    /// A `flock` on the database file while this store lives (see
    /// `check::Lock`): `vman db recover` refuses while a server holds it.
    lock: Mutex<Option<std::fs::File>>,
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.execute_batch(
        "PRAGMA foreign_keys = ON;
         PRAGMA synchronous = NORMAL;",
    )
}

impl Store {
    /// Opens (creating if needed) the database and brings its schema up to
    /// date, without start-up checks or a space reserve (tests, tools).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, &OpenOptions::default())
    }

    /// The connections on a file already checked by `check::open_with`.
    fn connect(path: &Path, reserve: reserve::Reserve) -> Result<Self, StoreError> {
        let writer = Connection::open(path)?;
        writer.pragma_update(None, "journal_mode", "WAL")?;
        configure(&writer)?;
        migrate(&writer)?;
        let readers = (0..READERS)
            .map(|_| {
                let conn = Connection::open_with_flags(
                    path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                configure(&conn)?;
                Ok(Mutex::new(conn))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Self {
            writer: Mutex::new(writer),
            readers,
            next_reader: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            trouble: Mutex::new(None),
            reserve,
            lock: Mutex::new(None),
        })
    }

    /// Runs `f` on a read connection; readers never wait for writers.
    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed);
        for i in 0..self.readers.len() {
            if let Ok(conn) = self.readers[(start + i) % self.readers.len()].try_lock() {
                return f(&conn).map_err(|e| self.classify(e));
            }
        }
        let conn = self.readers[start % self.readers.len()].lock_or_recover();
        f(&conn).map_err(|e| self.classify(e))
    }

    /// Runs `f` in one immediate transaction on the write connection.
    fn write<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.writer.lock_or_recover();
        let done = (|| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })();
        let out = done.map_err(|e| self.classify(e))?;
        self.generation.fetch_add(1, Ordering::Release);
        Ok(out)
    }

    /// Changes whenever committed data changes.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A trivial query, for /health; also fails once any query saw the
    /// database damaged.
    pub fn ping(&self) -> Result<(), StoreError> {
        if let Some(trouble) = self.trouble() {
            return Err(StoreError::Damaged(trouble));
        }
        self.read(|c| Ok(c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?))
            .map(|_| ())
    }

    pub fn insert_template(&self, t: &Template) -> Result<(), StoreError> {
        self.write(|tx| {
            let n = tx.execute(
                concat!(
                    "INSERT INTO templates (",
                    template_columns!(""),
                    ") VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(name) DO NOTHING"
                ),
                rusqlite::params![
                    t.name.as_str(),
                    t.cpu_count,
                    t.ram_mib,
                    t.disk_size_gb,
                    t.created_at
                ],
            )?;
            if n == 0 {
                Err(StoreError::AlreadyExists)
            } else {
                Ok(())
            }
        })
    }

    pub fn list_templates(&self) -> Result<Vec<Template>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(concat!(
                "SELECT ",
                template_columns!(""),
                " FROM templates ORDER BY name"
            ))?;
            let rows = stmt.query_map([], template_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    pub fn get_template(&self, name: &Name) -> Result<Template, StoreError> {
        self.read(|c| {
            c.prepare_cached(concat!(
                "SELECT ",
                template_columns!(""),
                " FROM templates WHERE name = ?1"
            ))?
            .query_row([name.as_str()], template_row)
            .optional()?
            .ok_or(StoreError::NotFound)
        })
    }

    /// Deletes a template no VM uses; `InUse(n)` otherwise.
    pub fn delete_template(&self, name: &Name) -> Result<(), StoreError> {
        self.write(|tx| {
            let users: u64 = tx.query_row(
                "SELECT COUNT(*) FROM vms WHERE template_name = ?1",
                [name.as_str()],
                |r| r.get(0),
            )?;
            if users > 0 {
                return Err(StoreError::InUse(users));
            }
            match tx.execute("DELETE FROM templates WHERE name = ?1", [name.as_str()])? {
                0 => Err(StoreError::NotFound),
                _ => Ok(()),
            }
        })
    }
}

fn template_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Template> {
    template_row_at(r, 0)
}

/// A template read from the columns `template_columns!` lists, the first
/// at index `at`.
fn template_row_at(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Template> {
    Ok(Template {
        name: Name::from_trusted(r.get(at)?),
        cpu_count: r.get(at + 1)?,
        ram_mib: r.get(at + 2)?,
        disk_size_gb: r.get(at + 3)?,
        created_at: r.get(at + 4)?,
    })
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > known {
        return Err(StoreError::SchemaTooNew { found, known });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = i as i64 + 1;
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {sql}\n; PRAGMA user_version = {version}; COMMIT;"
        ))
        .inspect_err(|_| {
            let _ = conn.execute_batch("ROLLBACK");
        })?;
        tracing::info!("database migrated to schema version {version}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpl(name: &str) -> Template {
        Template {
            name: Name::parse("name", name).expect("valid"),
            cpu_count: 1,
            ram_mib: 1024,
            disk_size_gb: None,
            created_at: crate::model::now(),
        }
    }

    #[test]
    fn migrations_are_idempotent_and_versioned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        Store::open(&path).expect("first open");
        let store = Store::open(&path).expect("second open");
        store.insert_template(&tmpl("a")).expect("insert");
        let conn = Connection::open(&path).expect("open");
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("version");
        assert_eq!(v, MIGRATIONS.len() as i64);
        conn.pragma_update(None, "user_version", 99).expect("bump");
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::SchemaTooNew { found: 99, .. })
        ));
    }

    #[test]
    fn template_in_use_is_not_deleted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db")).expect("open");
        store.insert_template(&tmpl("small")).expect("insert");
        assert!(matches!(
            store.insert_template(&tmpl("small")),
            Err(StoreError::AlreadyExists)
        ));
        let vm = NewVm {
            id: Name::parse("id", "vm1").expect("valid"),
            template: Name::parse("t", "small").expect("valid"),
            qcow2_path: None,
            boot_disk: None,
            qcow2_path_format: None,
            boot_disk_format: None,
            network_mode: crate::model::NetworkMode::None,
            ports: Vec::new(),
        };
        store.insert_vm(&vm).expect("vm");
        assert!(matches!(
            store.delete_template(&vm.template),
            Err(StoreError::InUse(1))
        ));
        store.delete_vm(&vm.id).expect("delete vm");
        store
            .delete_template(&vm.template)
            .expect("delete template");
        assert!(matches!(
            store.get_template(&vm.template),
            Err(StoreError::NotFound)
        ));
    }
}
