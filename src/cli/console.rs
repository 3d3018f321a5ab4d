//! `vman vm console NAME [--readonly]`: the VM's serial console under your
//! fingers, over `GET /vms/{id}/console/ws` (the token as a header). On a
//! terminal stdin goes raw (termios via libc, restored by a guard on exit,
//! error and panic) and `Ctrl-]` detaches; otherwise (pipe mode) stdin is
//! sent as it comes, output printed, and `Ctrl-]` (byte 0x1d) or the end of
//! stdin detaches. Exit 0 detached or VM stopped (close 1000), 1 refused,
//! 3 unreachable or the server went away (close 1001, a broken connection).

use std::io::{IsTerminal, Read, Write};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::client::{answer, resolve_id, seg, CliError, Client, Kind};

/// The byte `Ctrl-]` sends: detach (as telnet and virsh console).
pub const DETACH: u8 = 0x1d;

/// How the session ended (when not by an error).
#[derive(Debug, PartialEq, Eq)]
enum End {
    Detached,
    VmStopped,
}

pub fn run(c: &Client, name: &str, readonly: bool) -> Result<(), CliError> {
    let id = resolve_id(c, Kind::Vm, name)?;
    let http_url = c.url(&format!(
        "/vms/{}/console/ws{}",
        seg(&id),
        if readonly { "?readonly=1" } else { "" }
    ));
    let ws_url = format!("ws{}", http_url.trim_start_matches("http"));
    let mut request = ws_url
        .as_str()
        .into_client_request()
        .map_err(|e| CliError::Usage(format!("bad console URL {ws_url}: {e}")))?;
    if let Some(token) = c.token() {
        let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            CliError::Usage("the API token has characters a header cannot carry".into())
        })?;
        request.headers_mut().insert("authorization", value);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::failed(format!("cannot start the console client: {e}")))?;
    let interactive = std::io::stdin().is_terminal();
    let result = runtime.block_on(session(request, &http_url, &id, interactive, readonly));
    // The stdin reader thread may sit in a blocking read: do not wait for it.
    runtime.shutdown_background();
    match result? {
        End::Detached => eprintln!("\r\nvman: detached from {id} (it keeps running)"),
        End::VmStopped => eprintln!("\r\nvman: the VM {id} stopped"),
    }
    Ok(())
}

async fn session(
    request: tokio_tungstenite::tungstenite::handshake::client::Request,
    http_url: &str,
    id: &str,
    interactive: bool,
    readonly: bool,
) -> Result<End, CliError> {
    let (socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|e| refusal(http_url, e))?;
    let (mut tx, mut rx) = socket.split();
    // Raw mode only once connected: a refusal prints on a sane terminal.
    let _raw = if interactive {
        Some(RawMode::enter()?)
    } else {
        None
    };
    if interactive {
        eprint!(
            "vman: connected to {id}{}; Ctrl-] detaches\r\n",
            if readonly { " (read-only)" } else { "" }
        );
    }
    let mut input = stdin_chunks();
    let mut stdout = std::io::stdout();
    loop {
        tokio::select! {
            chunk = input.recv() => {
                let Some(chunk) = chunk else {
                    // End of stdin (pipe mode): detach.
                    let _ = tx.send(Message::Close(None)).await;
                    return Ok(End::Detached);
                };
                let (keep, detach) = split_at_detach(&chunk);
                if !keep.is_empty() && !readonly {
                    tx.send(Message::Binary(keep.to_vec().into()))
                        .await
                        .map_err(|e| gone(http_url, &e.to_string()))?;
                }
                if detach {
                    let _ = tx.send(Message::Close(Some(CloseFrame {
                        code: CloseCode::Normal,
                        reason: "detached".into(),
                    }))).await;
                    return Ok(End::Detached);
                }
            }
            frame = rx.next() => match frame {
                Some(Ok(Message::Binary(data))) => {
                    if !write_out(&mut stdout, &data) {
                        return Ok(End::Detached);
                    }
                }
                Some(Ok(Message::Text(text))) => {
                    if !write_out(&mut stdout, text.as_bytes()) {
                        return Ok(End::Detached);
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    return match code {
                        1000 => Ok(End::VmStopped),
                        1001 => Err(gone(http_url, "the vman server is shutting down")),
                        _ => Err(CliError::failed(format!(
                            "the server closed the console ({code}{}{reason})",
                            if reason.is_empty() { "" } else { ": " }
                        ))),
                    };
                }
                Some(Err(e)) => return Err(gone(http_url, &e.to_string())),
                None => return Err(gone(http_url, "the connection closed")),
            }
        }
    }
}

/// Writes guest output to stdout as it comes; false when stdout is closed
/// (`| head`): the session then detaches (and the guard restores the terminal).
fn write_out(out: &mut std::io::Stdout, data: &[u8]) -> bool {
    out.write_all(data).and_then(|()| out.flush()).is_ok()
}

/// The bytes before `Ctrl-]`, and whether it was there.
pub fn split_at_detach(chunk: &[u8]) -> (&[u8], bool) {
    match chunk.iter().position(|b| *b == DETACH) {
        Some(i) => (&chunk[..i], true),
        None => (chunk, false),
    }
}

/// Stdin read on a plain thread (a blocking read cannot be cancelled; the
/// thread is left behind at exit) into a channel; closed at end of input.
fn stdin_chunks() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    rx
}

/// A failed upgrade: the server's JSON refusal (exit 1), or no answer (3).
fn refusal(http_url: &str, e: WsError) -> CliError {
    match e {
        WsError::Http(resp) => {
            let status = resp.status().as_u16();
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            match answer(status, &body) {
                Err(e) => e,
                Ok(_) => CliError::failed(format!(
                    "the server answered {status} instead of opening the console"
                )),
            }
        }
        other => gone(http_url, &other.to_string()),
    }
}

fn gone(url: &str, reason: &str) -> CliError {
    CliError::Unreachable {
        url: url.to_owned(),
        reason: reason.to_owned(),
    }
}

/// The terminal in raw mode (no echo, no line editing, no signals: every
/// key goes to the guest); the saved settings come back when dropped,
/// which also happens when a panic unwinds.
struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    fn enter() -> Result<Self, CliError> {
        let fd = libc::STDIN_FILENO;
        // SAFETY: a zeroed termios is a valid value to be filled by
        // tcgetattr; both calls only touch the struct we own.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(CliError::failed(format!(
                "cannot read the terminal settings: {}",
                std::io::Error::last_os_error()
            )));
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the struct; tcsetattr applies it to stdin.
        unsafe { libc::cfmakeraw(&mut raw) };
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(CliError::failed(format!(
                "cannot put the terminal in raw mode: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enter` on the same fd.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_close_bracket_splits_the_input() {
        assert_eq!(split_at_detach(b"ls\r"), (&b"ls\r"[..], false));
        assert_eq!(split_at_detach(b"ab\x1dcd"), (&b"ab"[..], true));
        assert_eq!(split_at_detach(b"\x1d"), (&b""[..], true));
    }
}
