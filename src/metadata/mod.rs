//! The guest metadata service: what a guest reads at
//! `http://169.254.169.254/` (EC2 IMDSv1/v2 paths and NoCloud under
//! `/nocloud/`) about itself — its id, hostname, SSH keys, user-data.
//!
//! This module is a small HTTP server of its own, apart from the API: it
//! serves guests, not users, so it has no token, no Host/Origin guard and
//! no route of the API; it answers only the asking VM's own data, 404 for
//! anything else, never a 5xx. Who is asking is decided by the transport,
//! never by the request:
//! - a per-VM channel (`open_channel`): a UNIX socket vman binds for one VM
//!   before its QEMU starts, which QEMU's user networking reaches through
//!   `guestfwd=tcp:169.254.169.254:80-cmd:<relay_command>` (a `socat` QEMU
//!   forks per guest connection); the socket is that VM's identity;
//! - a TCP listener (`serve_tcp`), where a resolver maps the peer's source
//!   address to a VM (the bridge, whose anti-spoofing rules pin addresses).
//!
//! `paths` holds the answers (pure), `token` the IMDSv2 tokens, `server`
//! the accept loops.

mod paths;
mod server;
mod token;

pub use paths::{MAX_TTL, TOKEN_HEADER, TTL_HEADER, VERSIONS};
pub use server::TcpChannel;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;

use crate::model::Name;
use crate::operator::qemu::VmPaths;
use crate::sync::LockExt;

/// Address guests use for the service in every network mode.
pub const GUEST_ADDRESS: &str = "169.254.169.254";
/// The NoCloud seed URL given in the SMBIOS system serial.
///
/// `nocloud-net`, not `nocloud`: cloud-init 22.x (Debian 12) fetches an
/// http seed given as `ds=nocloud` and then ignores it as local-only
/// ("Exiting ... in local mode"), ending on DataSourceNone.
pub const NOCLOUD_SEED: &str = "ds=nocloud-net;s=http://169.254.169.254/nocloud/";
/// Largest request body accepted (the service takes none).
pub const MAX_BODY: u64 = 1024;
/// Time a guest has to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// `metadata_fetched_at` is written at most this often per VM.
pub const FETCH_RECORD_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// The VM's channel could not be bound.
    #[error("cannot open the metadata channel of VM {vm} ({name}): {source}")]
    Bind {
        vm: String,
        name: String,
        source: std::io::Error,
    },
    /// The TCP listener could not be bound.
    #[error("cannot listen for metadata requests on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What the service tells one guest.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestData {
    pub id: Name,
    /// The stored hostname, else the VM's name.
    pub hostname: String,
    pub user_data: Option<String>,
    /// One per non-empty line of the stored `ssh_keys`.
    pub ssh_keys: Vec<String>,
    pub mac: String,
    pub local_ip: Option<String>,
}

/// Where the service gets a VM's data and records that it was fetched
/// (implemented by `Service`).
pub trait Source: Send + Sync {
    /// The VM's data; `None` when there is no such VM (or it cannot be read).
    fn guest_data(&self, id: &Name) -> Option<GuestData>;
    /// Records that the guest fetched its meta-data now.
    fn record_fetch(&self, id: &Name);
}

/// Who is asking: set by the transport on every request.
#[derive(Debug, Clone)]
pub(crate) struct Identity(pub Option<Name>);

pub(crate) struct Inner {
    source: OnceLock<Weak<dyn Source>>,
    tokens: token::Tokens,
    /// Last `record_fetch` per VM (writes are throttled).
    fetched: Mutex<HashMap<Name, Instant>>,
    /// Peers (SO_PEERCRED uid) allowed on a VM channel: vman's own user
    /// and the user QEMU runs as.
    allowed_uids: Vec<u32>,
}

struct Channel {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// The metadata service: its data source, tokens and open channels.
pub struct Metadata {
    inner: Arc<Inner>,
    channels: Mutex<HashMap<Name, Channel>>,
}

/// Name of a VM's channel in the abstract UNIX socket namespace:
/// `vman-metadata-<hash of the VM folder>` (unique per storage and VM,
/// whatever the lengths of both). Abstract, not a file in the VM folder:
/// when vman is root the folder is closed (0700) to the user QEMU — and so
/// the relay it forks — runs as; peers are checked by uid instead, and an
/// abstract socket leaves no file behind after a crash.
pub fn channel_name(paths: &VmPaths) -> String {
    let hash = paths
        .dir
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    format!("vman-metadata-{hash:016x}")
}

/// The command QEMU's user networking runs per guest connection to
/// 169.254.169.254:80 (`guestfwd=...-cmd:<this>`; split on spaces by QEMU,
/// no shell): relays it to the VM's channel.
pub fn relay_command(paths: &VmPaths) -> String {
    format!("socat STDIO ABSTRACT-CONNECT:{}", channel_name(paths))
}

impl Metadata {
    /// A service with no source yet (`set_source`); `qemu_uid` is the user
    /// QEMU runs as, when it switches.
    pub fn new(qemu_uid: Option<u32>) -> Self {
        // SAFETY: geteuid has no preconditions.
        let mut allowed_uids = vec![unsafe { libc::geteuid() }];
        allowed_uids.extend(qemu_uid);
        Self {
            inner: Arc::new(Inner {
                source: OnceLock::new(),
                tokens: token::Tokens::default(),
                fetched: Mutex::default(),
                allowed_uids,
            }),
            channels: Mutex::default(),
        }
    }

    /// Where data comes from (once; later calls are ignored).
    pub fn set_source(&self, source: Weak<dyn Source>) {
        let _ = self.inner.source.set(source);
    }

    /// The guest-facing routes. Every request must carry an `Identity`
    /// extension (set by the transports); without one it is a 404.
    pub(crate) fn router(inner: Arc<Inner>) -> Router {
        Router::new().fallback(handle).with_state(inner)
    }

    /// Binds VM `id`'s channel and serves it with that identity until
    /// `close_channel`; one already open stays (same name, same VM).
    pub fn open_channel(&self, id: &Name, paths: &VmPaths) -> Result<(), MetadataError> {
        if self.has_channel(id) {
            return Ok(());
        }
        let name = channel_name(paths);
        let fail = |source| MetadataError::Bind {
            vm: id.to_string(),
            name: name.clone(),
            source,
        };
        let listener = server::bind_abstract(&name).map_err(fail)?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(server::serve_channel(
            listener,
            id.clone(),
            self.inner.clone(),
            stopped,
        ));
        self.channels
            .lock_or_recover()
            .insert(id.clone(), Channel { stop, task });
        tracing::debug!("vm {id}: metadata channel @{name} open");
        Ok(())
    }

    /// Closes VM `id`'s channel (and its open connections) and forgets its
    /// tokens; nothing when none is open. Returns once the name is free
    /// (connects are refused from then on).
    pub async fn close_channel(&self, id: &Name) {
        let channel = self.channels.lock_or_recover().remove(id);
        if let Some(c) = channel {
            // The accept loop returns on `stop` and drops its listener
            // (never shut down in place: tokio would then spin on accept).
            let _ = c.stop.send(true);
            let _ = c.task.await;
            self.inner.tokens.forget(id);
            tracing::debug!("vm {id}: metadata channel closed");
        }
    }

    /// Whether VM `id` has an open channel.
    pub fn has_channel(&self, id: &Name) -> bool {
        self.channels.lock_or_recover().contains_key(id)
    }

    /// Serves the same routes on TCP `addr`; `resolver` maps each peer's
    /// source address to the VM it belongs to (unknown addresses get 404s).
    /// Stops when the returned handle is dropped.
    pub async fn serve_tcp(
        &self,
        addr: SocketAddr,
        resolver: impl Fn(IpAddr) -> Option<Name> + Send + Sync + 'static,
    ) -> Result<TcpChannel, MetadataError> {
        server::serve_tcp(addr, Arc::new(resolver), self.inner.clone()).await
    }
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

fn error(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Response {
    let body = serde_json::json!({"detail": detail.into(), "code": code});
    (status, axum::Json(body)).into_response()
}

/// The one handler: identity from the transport, answer from `paths`.
async fn handle(State(inner): State<Arc<Inner>>, req: Request<Body>) -> Response {
    let id = req.extensions().get::<Identity>().and_then(|i| i.0.clone());
    let too_large = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_BODY);
    if too_large {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("Request bodies are limited to {MAX_BODY} bytes"),
        );
    }
    let data = id
        .as_ref()
        .and_then(|id| inner.source.get()?.upgrade()?.guest_data(id));
    let Some(data) = data else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "No VM is known on this channel or address",
        );
    };
    let ask = paths::Ask {
        method: req.method(),
        path: req.uri().path(),
        headers: req.headers(),
    };
    let (reply, fetch) = paths::answer(&ask, &data, &inner.tokens);
    if fetch == paths::Fetch::MetaData {
        inner.note_fetch(&data.id);
    }
    match reply {
        paths::Reply::Text(t) => text(StatusCode::OK, t),
        paths::Reply::Json(j) => (StatusCode::OK, axum::Json(j)).into_response(),
        paths::Reply::Token(t, ttl) => {
            let mut r = text(StatusCode::OK, t);
            if let Ok(v) = HeaderValue::from_str(&ttl.to_string()) {
                r.headers_mut().insert(TTL_HEADER, v);
            }
            r
        }
        paths::Reply::Error(status, code, detail) => error(status, code, detail),
    }
}

impl Inner {
    /// Records a meta-data fetch, at most every `FETCH_RECORD_EVERY`.
    fn note_fetch(&self, id: &Name) {
        let now = Instant::now();
        {
            let mut last = self.fetched.lock_or_recover();
            if last
                .get(id)
                .is_some_and(|t| now.duration_since(*t) < FETCH_RECORD_EVERY)
            {
                return;
            }
            last.insert(id.clone(), now);
        }
        if let Some(source) = self.source.get().and_then(Weak::upgrade) {
            source.record_fetch(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A fixed data set: `a` and `b` exist.
    struct Two;

    impl Source for Two {
        fn guest_data(&self, id: &Name) -> Option<GuestData> {
            ["a", "b"].contains(&id.as_str()).then(|| GuestData {
                id: id.clone(),
                hostname: format!("host-{id}"),
                user_data: None,
                ssh_keys: vec![],
                mac: crate::model::mac_for(id.as_str()),
                local_ip: None,
            })
        }
        fn record_fetch(&self, _: &Name) {}
    }

    async fn ask_tcp(addr: SocketAddr, request: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(request.as_bytes()).await.expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn tcp_identity_is_the_resolvers_answer_for_the_peer_address() {
        let source: Arc<dyn Source> = Arc::new(Two);
        let m = Metadata::new(None);
        m.set_source(Arc::downgrade(&source));
        let get = "GET /latest/meta-data/hostname HTTP/1.1\r\nHost: b\r\nX-Forwarded-For: 10.0.0.2\r\nConnection: close\r\n\r\n";
        // 127.0.0.1 is VM a, whatever the request says.
        let tcp = m
            .serve_tcp("127.0.0.1:0".parse().expect("addr"), |ip: IpAddr| {
                ip.is_loopback().then(|| Name::parse("id", "a").expect("a"))
            })
            .await
            .expect("listen");
        let out = ask_tcp(tcp.local_addr, get).await;
        assert!(
            out.starts_with("HTTP/1.1 200") && out.ends_with("\r\n\r\nhost-a"),
            "{out}"
        );
        // An address of no VM: 404, nobody's data.
        let none = m
            .serve_tcp("127.0.0.1:0".parse().expect("addr"), |_| None)
            .await
            .expect("listen");
        let out = ask_tcp(none.local_addr, get).await;
        assert!(out.starts_with("HTTP/1.1 404"), "{out}");
        assert!(!out.contains("host-"), "{out}");
        // Dropped: no longer served.
        let addr = tcp.local_addr;
        drop(tcp);
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            assert!(Instant::now() < deadline, "still listening after drop");
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn channel_names_are_per_folder_and_fit_a_socket_address() {
        let a = VmPaths::new(std::path::Path::new("/s1/vms"), "a");
        let b = VmPaths::new(std::path::Path::new("/s2/vms"), "a");
        assert_ne!(channel_name(&a), channel_name(&b));
        assert_eq!(channel_name(&a), channel_name(&a.clone()));
        assert!(channel_name(&a).len() < 100);
        assert!(!relay_command(&a).contains(','), "QEMU option syntax");
        assert_eq!(relay_command(&a).split(' ').count(), 3);
    }
}
