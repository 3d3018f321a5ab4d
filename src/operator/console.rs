//! The serial console: QEMU serves it on `console.sock`; a pump task of vman
//! copies it into `console.txt`, which never grows past its bound (the oldest
//! half is dropped when it would). Because vman, not QEMU, writes the file,
//! the bound holds whatever the guest prints, and a restarted vman simply
//! reconnects and goes on appending. Input typed through the API goes to the
//! same socket.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{broadcast, Mutex};

use crate::sync::LockExt;

/// What GET /console returns at most.
pub const TAIL_BYTES: u64 = 50 * 1024;

/// An append-only file kept under `max_bytes`.
pub struct BoundedLog {
    path: PathBuf,
    max_bytes: u64,
    file: File,
    len: u64,
}

impl BoundedLog {
    pub fn open(path: &Path, max_bytes: u64) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let len = file.metadata()?.len();
        let mut log = Self {
            path: path.to_owned(),
            max_bytes,
            file,
            len,
        };
        if len > max_bytes {
            log.trim(0)?;
        }
        Ok(log)
    }

    pub fn append(&mut self, mut data: &[u8]) -> io::Result<()> {
        // A single chunk bigger than the bound only keeps its end.
        let keep = (self.max_bytes / 2) as usize;
        if data.len() > keep {
            data = &data[data.len() - keep..];
        }
        if self.len + data.len() as u64 > self.max_bytes {
            self.trim(data.len() as u64)?;
        }
        self.file.write_all(data)?;
        self.len += data.len() as u64;
        Ok(())
    }

    /// Rewrites the file with its newest part so that `incoming` more bytes
    /// fit within half the bound; temp file + rename, so a reader never sees
    /// a half-written console.
    fn trim(&mut self, incoming: u64) -> io::Result<()> {
        let keep = (self.max_bytes / 2).saturating_sub(incoming);
        let tail = read_tail(&self.path, keep)?;
        let tmp = self.path.with_extension("txt.trim");
        fs::write(&tmp, &tail)?;
        fs::rename(&tmp, &self.path)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.len = tail.len() as u64;
        Ok(())
    }
}

/// The last `max` bytes of a file (empty when it does not exist).
pub fn read_tail(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = len.saturating_sub(max);
    file.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    file.take(max).read_to_end(&mut buf)?;
    Ok(buf)
}

/// The last `n` lines of a file's tail, for error messages.
pub fn last_lines(path: &Path, n: usize) -> String {
    let tail = read_tail(path, 8 * 1024).unwrap_or_default();
    let text = String::from_utf8_lossy(&tail);
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Bytes of console output handed to live viewers, per chunk read.
pub type Chunk = Arc<[u8]>;

/// Chunks a live viewer may fall behind before it misses output.
const VIEWER_BACKLOG: usize = 256;

/// Live viewers one console takes at most.
pub const MAX_VIEWERS: usize = 32;

/// Why `watch` gives no viewer.
#[derive(Debug, PartialEq, Eq)]
pub enum WatchError {
    /// QEMU closed the console.
    Closed,
    /// `MAX_VIEWERS` watch already.
    Full,
}

/// A connected console: the pump runs in the background until QEMU closes
/// the socket; `write` sends input to the guest; `watch` gives live viewers
/// the output as it is read (the file gets it all the same).
pub struct Console {
    input: Mutex<Option<OwnedWriteHalf>>,
    /// `None` once QEMU closed the console: viewers then see the end.
    output: std::sync::Mutex<Option<broadcast::Sender<Chunk>>>,
}

impl Console {
    /// Connects to `sock` and starts pumping into `log_path`.
    pub async fn attach(sock: &Path, log_path: &Path, max_bytes: u64) -> io::Result<Arc<Self>> {
        let stream = super::unixsock::connect(sock).await?;
        let (mut read, write) = stream.into_split();
        let mut log = BoundedLog::open(log_path, max_bytes)?;
        let path = log_path.to_owned();
        let console = Arc::new(Self {
            input: Mutex::new(Some(write)),
            output: std::sync::Mutex::new(Some(broadcast::channel(VIEWER_BACKLOG).0)),
        });
        let pump = console.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match read.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        if let Err(e) = log.append(&buf[..n]) {
                            tracing::warn!("console {}: {e}", path.display());
                        }
                        if let Some(tx) = pump.output.lock_or_recover().as_ref() {
                            // No viewer is not an error.
                            let _ = tx.send(Chunk::from(&buf[..n]));
                        }
                    }
                    Err(e) => {
                        tracing::debug!("console {} closed: {e}", path.display());
                        break;
                    }
                }
            }
            // Viewers see the end of the console.
            pump.output.lock_or_recover().take();
        });
        Ok(console)
    }

    /// The output from now on, until QEMU closes the console.
    pub fn watch(&self) -> Result<broadcast::Receiver<Chunk>, WatchError> {
        let output = self.output.lock_or_recover();
        let tx = output.as_ref().ok_or(WatchError::Closed)?;
        if tx.receiver_count() >= MAX_VIEWERS {
            return Err(WatchError::Full);
        }
        Ok(tx.subscribe())
    }

    /// Sends bytes to the guest's serial port.
    pub async fn write(&self, data: &[u8]) -> io::Result<()> {
        let mut input = self.input.lock().await;
        let Some(w) = input.as_mut() else {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "console closed",
            ));
        };
        if let Err(e) = w.write_all(data).await {
            *input = None;
            return Err(e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_never_passes_its_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.txt");
        let mut log = BoundedLog::open(&path, 4096).expect("open");
        for i in 0..2000 {
            log.append(format!("line {i:05}\n").as_bytes())
                .expect("append");
            assert!(fs::metadata(&path).expect("meta").len() <= 4096);
        }
        let text = fs::read_to_string(&path).expect("read");
        assert!(text.ends_with("line 01999\n"));
        log.append(&vec![b'x'; 10_000]).expect("huge chunk");
        assert!(fs::metadata(&path).expect("meta").len() <= 4096);
        // Reopening an oversized file trims it too.
        fs::write(&path, vec![b'y'; 9000]).expect("write");
        BoundedLog::open(&path, 4096).expect("reopen");
        assert!(fs::metadata(&path).expect("meta").len() <= 4096);
    }

    #[test]
    fn tails_and_last_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.txt");
        assert!(read_tail(&path, 10).expect("missing").is_empty());
        fs::write(&path, "a\nb\r\n\nc\n").expect("write");
        assert_eq!(read_tail(&path, 2).expect("tail"), b"c\n");
        assert_eq!(last_lines(&path, 2), "b\nc");
    }
}
