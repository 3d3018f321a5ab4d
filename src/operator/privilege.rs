//! Which user QEMU runs as, and the file modes that keep it from reaching
//! anything beyond its own VM.
//!
//! QEMU is started as root (vman's user) and drops to `VMAN_QEMU_USER` by
//! itself (`-runas`, or `-run-with user=` on QEMU 9.1+) after it has opened
//! its start-up files: the root disk and its backing chain, data disks plugged
//! at boot, the pid file, and the QMP and console sockets it listens on (so
//! these stay root's and vman reaches them as before). After the drop it has
//! no capabilities and the user's uid only, so:
//! - disks hot-plugged later are opened by vman and passed over QMP as file
//!   descriptors (`add-fd`, `/dev/fdset/N`): no disk file is ever chowned;
//! - the VM and disk folders are 0700 root and the database 0600, so the
//!   user cannot open any VM's disk, console log or the database by path,
//!   even files that are 0644; each VM folder is 0700 too.
//!
//! QEMU's own `-sandbox elevateprivileges=deny` forbids the set*id calls that
//! `-runas` makes (QEMU 7.2 dies with SIGSYS), so with a user it is
//! `elevateprivileges=allow`: once the uid is dropped there is nothing left to
//! elevate to (no capabilities, saved uid gone, `spawn=deny` forbids exec and
//! libseccomp sets no_new_privs).

use std::ffi::CString;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// How this QEMU is told to change user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunAsFlag {
    /// `-runas USER` (QEMU up to 9.x).
    Runas,
    /// `-run-with user=USER` (QEMU 9.1 and later, where `-runas` is deprecated).
    RunWith,
}

/// The unprivileged user QEMU switches to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    pub flag: RunAsFlag,
}

impl RunAs {
    /// The QEMU arguments that make it switch user.
    pub fn args(&self) -> [String; 2] {
        match self.flag {
            RunAsFlag::Runas => ["-runas".into(), self.user.clone()],
            RunAsFlag::RunWith => ["-run-with".into(), format!("user={}", self.user)],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error(
        "VMAN_QEMU_USER={0}: no such user (scripts/setup.sh creates vman-qemu; \
         set VMAN_QEMU_USER= to run QEMU as vman's own user)"
    )]
    NoSuchUser(String),
    #[error("VMAN_QEMU_USER={0}: refusing to run QEMU as root")]
    Root(String),
    #[error("{0} has neither -run-with user= nor -runas")]
    Unsupported(String),
    #[error("cannot close {path} to other users: {source}")]
    Restrict { path: String, source: io::Error },
}

/// The user passt switches to, with its uid: none when vman is not root
/// (passt keeps vman's user) or `name` is empty or unknown here (start-up
/// refuses passt as root then: see `passt::check_user`).
pub fn passt_user(name: &str) -> Option<(String, u32)> {
    // SAFETY: geteuid has no preconditions.
    if name.is_empty() || unsafe { libc::geteuid() } != 0 {
        return None;
    }
    lookup_user(name).map(|(uid, _)| (name.to_owned(), uid))
}

/// Decides the user QEMU runs as: none when `user` is empty or vman is not
/// root (it could not switch anyway); otherwise the user must exist and not
/// be root, and QEMU must know a way to switch.
pub fn resolve(user: &str, qemu: &Path) -> Result<Option<RunAs>, PrivilegeError> {
    // SAFETY: geteuid has no preconditions.
    if user.is_empty() || unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let (uid, gid) = lookup_user(user).ok_or_else(|| PrivilegeError::NoSuchUser(user.into()))?;
    if uid == 0 {
        return Err(PrivilegeError::Root(user.into()));
    }
    let flag = match std::process::Command::new(qemu).arg("-help").output() {
        Ok(o) => flag_from_help(&String::from_utf8_lossy(&o.stdout))
            .ok_or_else(|| PrivilegeError::Unsupported(qemu.display().to_string()))?,
        // No QEMU (yet): starts fail with their own clear error; vman runs.
        Err(e) => {
            tracing::warn!("cannot run {} -help ({e}); assuming -runas", qemu.display());
            RunAsFlag::Runas
        }
    };
    Ok(Some(RunAs {
        user: user.into(),
        uid,
        gid,
        flag,
    }))
}

/// Reads QEMU's `-help`: `-run-with ... user=` wins over the deprecated
/// `-runas`.
pub fn flag_from_help(help: &str) -> Option<RunAsFlag> {
    let has = |opt: &str| {
        help.lines()
            .any(|l| l.split_whitespace().next() == Some(opt))
    };
    if help
        .lines()
        .any(|l| l.starts_with("-run-with") && l.contains("user="))
    {
        Some(RunAsFlag::RunWith)
    } else if has("-runas") {
        Some(RunAsFlag::Runas)
    } else {
        None
    }
}

/// uid and gid of a user, from the system's user database.
pub fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let cname = CString::new(name).ok()?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and `buf` outlives it;
    // getpwnam_r writes only into `pwd` and `buf`.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    Some((pwd.pw_uid, pwd.pw_gid))
}

/// Closes what QEMU must not reach by path to everybody but root: the VM
/// and disk folders (0700, created when missing) and the database (0600;
/// SQLite gives its -wal and -shm files the same mode). The storage folder
/// itself is left as it is: it may be a shared one.
pub fn close_storage(dirs: &[&Path], db: &Path) -> Result<(), PrivilegeError> {
    let fail = |path: &Path| {
        let path = path.display().to_string();
        move |source| PrivilegeError::Restrict { path, source }
    };
    for dir in dirs {
        std::fs::create_dir_all(dir).map_err(fail(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(fail(dir))?;
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut file = db.as_os_str().to_owned();
        file.push(suffix);
        let file = Path::new(&file);
        if file.exists() {
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))
                .map_err(fail(file))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_switch_flag_is_read_from_qemu_help() {
        let q72 = "-runas user     change to user id user just before starting the VM\n\
                   -sandbox on[,obsolete=allow|deny]\n";
        assert_eq!(flag_from_help(q72), Some(RunAsFlag::Runas));
        let q91 = "-run-with [async-teardown=on|off][,chroot=dir][user=username|uid:gid]\n\
                   -runas user     deprecated\n";
        assert_eq!(flag_from_help(q91), Some(RunAsFlag::RunWith));
        let q90 = "-run-with [async-teardown=on|off][,chroot=dir]\n-runas user\n";
        assert_eq!(flag_from_help(q90), Some(RunAsFlag::Runas));
        assert_eq!(flag_from_help("-sandbox on\n"), None);
        assert_eq!(flag_from_help("  see -runas below\n"), None);
    }

    #[test]
    fn users_are_looked_up_and_args_built() {
        assert_eq!(lookup_user("root"), Some((0, 0)));
        assert_eq!(lookup_user("no-such-user-vman-test"), None);
        assert_eq!(lookup_user("a\0b"), None);
        let r = RunAs {
            user: "vman-qemu".into(),
            uid: 999,
            gid: 995,
            flag: RunAsFlag::RunWith,
        };
        assert_eq!(r.args(), ["-run-with", "user=vman-qemu"]);
    }

    #[test]
    fn storage_is_closed_to_other_users() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (vms, disks, db) = (
            dir.path().join("vms"),
            dir.path().join("disks"),
            dir.path().join("v.db"),
        );
        std::fs::create_dir(&vms).expect("vms");
        std::fs::set_permissions(&vms, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::write(&db, "").expect("db");
        std::fs::write(dir.path().join("v.db-wal"), "").expect("wal");
        close_storage(&[&vms, &disks], &db).expect("close");
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&vms), 0o700);
        assert_eq!(mode(&disks), 0o700);
        assert_eq!(mode(&db), 0o600);
        assert_eq!(mode(&dir.path().join("v.db-wal")), 0o600);
        assert!(!dir.path().join("v.db-shm").exists());
    }

    #[test]
    fn no_user_means_no_switch_and_root_is_refused() {
        assert_eq!(
            resolve("", Path::new("qemu-system-x86_64")).ok(),
            Some(None)
        );
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(matches!(
                resolve("root", Path::new("qemu-system-x86_64")),
                Err(PrivilegeError::Root(_))
            ));
            assert!(matches!(
                resolve("no-such-user-vman-test", Path::new("qemu-system-x86_64")),
                Err(PrivilegeError::NoSuchUser(_))
            ));
            // Regression: a missing QEMU binary must not keep vman from
            // starting (its starts then fail with a clear 400).
            let r = resolve("vman-qemu", Path::new("/nonexistent/qemu"));
            assert!(r.is_ok() || lookup_user("vman-qemu").is_none(), "{r:?}");
            assert!(matches!(
                resolve("vman-qemu", Path::new("/bin/true")),
                Err(PrivilegeError::Unsupported(_)) | Err(PrivilegeError::NoSuchUser(_))
            ));
        }
    }
}
