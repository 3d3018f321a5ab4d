//! A QMP client over the VM's unix socket. One connection per running VM,
//! held by vman for the VM's lifetime: commands are sent one at a time and
//! answered in order; events (SHUTDOWN, DEVICE_DELETED, ...) are broadcast to
//! whoever listens, and the last SHUTDOWN is remembered so the exit watcher
//! can tell a guest power-off from a crash.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::sync::LockExt;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket: {0}")]
    Connect(std::io::Error),
    #[error("QMP connection closed")]
    Closed,
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP command {0} timed out")]
    Timeout(String),
    #[error("QMP i/o error: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone)]
pub struct QmpEvent {
    pub event: String,
    pub data: Value,
}

type Pending = oneshot::Sender<Result<Value, QmpError>>;

#[derive(Default)]
struct Shared {
    pending: VecDeque<Pending>,
    closed: bool,
    last_shutdown: Option<Value>,
}

pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    shared: Arc<Mutex<Shared>>,
    events: broadcast::Sender<QmpEvent>,
    closed: tokio::sync::watch::Receiver<bool>,
}

/// How long one command may take before we give up on it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = super::unixsock::connect(path)
            .await
            .map_err(QmpError::Connect)?;
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = tokio::time::timeout(COMMAND_TIMEOUT, lines.next_line())
            .await
            .map_err(|_| QmpError::Timeout("greeting".into()))??
            .ok_or(QmpError::Closed)?;
        let greeting: Value =
            serde_json::from_str(&greeting).map_err(|e| QmpError::Protocol(e.to_string()))?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "unexpected greeting {greeting}"
            )));
        }
        let (events, _) = broadcast::channel(64);
        let (closed_tx, closed) = tokio::sync::watch::channel(false);
        let qmp = Self {
            writer: tokio::sync::Mutex::new(write),
            shared: Arc::new(Mutex::new(Shared::default())),
            events,
            closed,
        };
        tokio::spawn(read_loop(
            lines,
            qmp.shared.clone(),
            qmp.events.clone(),
            closed_tx,
        ));
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_inner(command, arguments, None).await
    }

    /// Runs one command with `fd` passed along (SCM_RIGHTS), as `add-fd` and
    /// `getfd` expect. QEMU gets its own copy; the caller may close `fd`.
    pub async fn execute_with_fd(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        self.execute_inner(command, arguments, Some(fd)).await
    }

    async fn execute_inner(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let mut writer = self.writer.lock().await;
        let (tx, rx) = oneshot::channel();
        {
            let mut shared = lock(&self.shared);
            if shared.closed {
                return Err(QmpError::Closed);
            }
            shared.pending.push_back(tx);
        }
        let sent = match fd {
            Some(fd) => send_with_fd(&mut writer, line.as_bytes(), fd).await,
            None => writer.write_all(line.as_bytes()).await,
        };
        if let Err(e) = sent {
            lock(&self.shared).pending.pop_back();
            return Err(e.into());
        }
        drop(writer);
        match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
            Ok(Ok(result)) => result.map_err(|e| match e {
                QmpError::Command { class, desc, .. } => QmpError::Command {
                    command: command.to_owned(),
                    class,
                    desc,
                },
                other => other,
            }),
            Ok(Err(_)) => Err(QmpError::Closed),
            Err(_) => Err(QmpError::Timeout(command.to_owned())),
        }
    }

    /// Events from now on. Subscribe before sending the command whose event
    /// you wait for.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// The data of the last SHUTDOWN event, if any (`{"guest": bool, "reason": ...}`).
    pub fn last_shutdown(&self) -> Option<Value> {
        lock(&self.shared).last_shutdown.clone()
    }

    /// Resolves once QEMU has closed the connection and every event it sent
    /// before has been read.
    pub async fn closed(&self) {
        let mut rx = self.closed.clone();
        let _ = rx.wait_for(|c| *c).await;
    }
}

/// Writes `bytes` with `fd` attached to the first of them, then the rest.
async fn send_with_fd(
    writer: &mut OwnedWriteHalf,
    bytes: &[u8],
    fd: BorrowedFd<'_>,
) -> std::io::Result<()> {
    let stream: &UnixStream = writer.as_ref();
    let sent = loop {
        stream.writable().await?;
        match stream.try_io(tokio::io::Interest::WRITABLE, || {
            sendmsg_fd(stream.as_raw_fd(), bytes, fd.as_raw_fd())
        }) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    writer.write_all(&bytes[sent..]).await
}

/// One sendmsg(2) carrying `fd` as SCM_RIGHTS; returns the bytes sent.
fn sendmsg_fd(sock: RawFd, bytes: &[u8], fd: RawFd) -> std::io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: a zeroed msghdr is valid; the fields set below point to
    // `iov` and `control`, which outlive the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `control` holds CMSG_SPACE(sizeof fd) bytes, so the first
    // header and its data fit in it.
    let sent = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(sent as usize)
    }
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock_or_recover()
}

async fn read_loop(
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    shared: Arc<Mutex<Shared>>,
    events: broadcast::Sender<QmpEvent>,
    closed_tx: tokio::sync::watch::Sender<bool>,
) {
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) | Err(_) => break,
        };
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            tracing::warn!("unparsable QMP message: {line}");
            continue;
        };
        if let Some(event) = msg.get("event").and_then(Value::as_str) {
            let data = msg.get("data").cloned().unwrap_or(Value::Null);
            if event == "SHUTDOWN" {
                lock(&shared).last_shutdown = Some(data.clone());
            }
            let _ = events.send(QmpEvent {
                event: event.to_owned(),
                data,
            });
            continue;
        }
        let result = if let Some(ret) = msg.get("return") {
            Ok(ret.clone())
        } else if let Some(err) = msg.get("error") {
            Err(QmpError::Command {
                command: String::new(),
                class: err["class"].as_str().unwrap_or("GenericError").to_owned(),
                desc: err["desc"].as_str().unwrap_or("").to_owned(),
            })
        } else {
            continue;
        };
        if let Some(tx) = lock(&shared).pending.pop_front() {
            let _ = tx.send(result);
        }
    }
    let mut shared = lock(&shared);
    shared.closed = true;
    for tx in shared.pending.drain(..) {
        let _ = tx.send(Err(QmpError::Closed));
    }
    drop(shared);
    let _ = closed_tx.send(true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    /// A fake QMP peer on a real socket: greets, answers capabilities, then
    /// answers one command with an event in between.
    #[tokio::test]
    async fn commands_and_events_are_told_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .expect("greet");
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.expect("read caps");
            assert!(String::from_utf8_lossy(&buf[..n]).contains("qmp_capabilities"));
            s.write_all(b"{\"return\": {}}\n").await.expect("caps");
            let n = s.read(&mut buf).await.expect("read cmd");
            assert!(String::from_utf8_lossy(&buf[..n]).contains("query-status"));
            s.write_all(
                b"{\"event\": \"SHUTDOWN\", \"data\": {\"guest\": true, \"reason\": \"guest-shutdown\"}}\n\
                  {\"return\": {\"status\": \"running\"}}\n",
            )
            .await
            .expect("answer");
            let n = s.read(&mut buf).await.expect("read bad");
            assert!(n > 0);
            s.write_all(b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"nope\"}}\n")
                .await
                .expect("error");
        });
        let qmp = Qmp::connect(&path).await.expect("connect");
        let mut events = qmp.subscribe();
        let status = qmp.execute("query-status", None).await.expect("status");
        assert_eq!(status["status"], "running");
        let ev = events.recv().await.expect("event");
        assert_eq!(ev.event, "SHUTDOWN");
        assert_eq!(
            qmp.last_shutdown().expect("remembered")["reason"],
            "guest-shutdown"
        );
        let err = qmp.execute("bogus", None).await.expect_err("error");
        assert!(
            matches!(&err, QmpError::Command { command, class, .. } if command == "bogus" && class == "CommandNotFound"),
            "{err:?}"
        );
        server.await.expect("server");
        // The peer hung up: commands fail fast instead of hanging.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(qmp.execute("query-status", None).await.is_err());
    }
}
