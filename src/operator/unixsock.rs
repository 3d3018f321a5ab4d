//! Connecting to a QEMU socket whatever the length of its path. A UNIX
//! socket address holds at most 107 bytes, so a long storage path plus a
//! long VM name would not fit: QEMU binds its sockets relative to its
//! working directory (the VM folder), and vman connects through
//! `/proc/self/fd/<dir fd>/<file>`, a short path to the same directory.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use tokio::net::UnixStream;

/// Longest path `connect` takes as is (`sun_path` is 108 bytes with its NUL).
const SUN_PATH_MAX: usize = 107;

/// Connects to the UNIX socket at `path`, however long the path is.
pub async fn connect(path: &Path) -> io::Result<UnixStream> {
    if path.as_os_str().len() <= SUN_PATH_MAX {
        return UnixStream::connect(path).await;
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a socket path", path.display()),
        ));
    };
    // The directory stays open until the connection is made.
    let dir = std::fs::File::open(dir)?;
    let short = Path::new("/proc/self/fd")
        .join(dir.as_raw_fd().to_string())
        .join(name);
    UnixStream::connect(&short).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_socket_under_a_path_longer_than_sun_path_is_reached() {
        let base = tempfile::tempdir().expect("tempdir");
        let deep = base.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).expect("mkdir");
        let sock = deep.join("qmp.sock");
        assert!(sock.as_os_str().len() > SUN_PATH_MAX);
        // Bind relative to the folder, as QEMU does from its working directory.
        let dir = std::fs::File::open(&deep).expect("open dir");
        let short = Path::new("/proc/self/fd")
            .join(dir.as_raw_fd().to_string())
            .join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&short).expect("bind");
        let accept = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
        connect(&sock).await.expect("connect through the folder fd");
        accept.await.expect("join").expect("accept");
        assert!(
            UnixStream::connect(&sock).await.is_err(),
            "the long path itself does not fit"
        );
    }
}
