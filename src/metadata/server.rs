//! The accept loops of the metadata service: one per VM channel (an
//! abstract UNIX socket whose peers are checked by uid) and one per TCP
//! listener (identity from the resolver). HTTP/1.1 only, headers within
//! `HEADER_TIMEOUT` and 16 KiB, a bounded number of connections each.

use std::net::{IpAddr, SocketAddr};
use std::os::linux::net::SocketAddrExt;
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};

use super::{Identity, Inner, Metadata, MetadataError, HEADER_TIMEOUT};
use crate::model::Name;

/// Open connections per VM channel (a guest needs one or two).
const PER_CHANNEL: usize = 8;
/// Open connections on a TCP listener (all VMs of a bridge).
const PER_LISTENER: usize = 128;
/// Header buffer limit (hyper's minimum is 8 KiB).
const MAX_HEADERS: usize = 16 * 1024;

/// Binds `name` in the abstract namespace.
pub(super) fn bind_abstract(name: &str) -> std::io::Result<UnixListener> {
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let std = std::os::unix::net::UnixListener::bind_addr(&addr)?;
    std.set_nonblocking(true)?;
    UnixListener::from_std(std)
}

async fn serve_conn<S>(
    stream: S,
    identity: Identity,
    inner: Arc<Inner>,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let router = Metadata::router(inner);
    let service = tower::ServiceExt::map_request(
        router,
        move |mut req: axum::http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(identity.clone());
            req
        },
    );
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADERS)
        // A relay (socat) shuts its write side once the guest's request is
        // sent; the answer must still go out.
        .half_close(true);
    let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.changed() => return,
    };
    if let Err(e) = result {
        tracing::debug!("metadata connection: {e}");
    }
}

/// Serves one VM's channel until `stop` changes.
pub(super) async fn serve_channel(
    listener: UnixListener,
    id: Name,
    inner: Arc<Inner>,
    mut stop: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(PER_CHANNEL));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = stop.changed() => return,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => return,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("vm {id}: metadata accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let uid = stream.peer_cred().map(|c| c.uid()).ok();
        if !uid.is_some_and(|u| inner.allowed_uids.contains(&u)) {
            tracing::warn!("vm {id}: metadata connection from uid {uid:?} refused");
            continue;
        }
        let (identity, inner, stop) = (Identity(Some(id.clone())), inner.clone(), stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            serve_conn(stream, identity, inner, stop).await;
        });
    }
}

/// A TCP listener of the service; stops serving when dropped.
pub struct TcpChannel {
    pub local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TcpChannel {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

type Resolver = Arc<dyn Fn(IpAddr) -> Option<Name> + Send + Sync>;

pub(super) async fn serve_tcp(
    addr: SocketAddr,
    resolver: Resolver,
    inner: Arc<Inner>,
) -> Result<TcpChannel, MetadataError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetadataError::Listen { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| MetadataError::Listen { addr, source })?;
    let (stop, stopped) = watch::channel(false);
    let mut ended = stopped.clone();
    let task = tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(PER_LISTENER));
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = ended.changed() => return,
            };
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = ended.changed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("metadata accept on {local_addr} failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            // An IPv4 peer on a dual-stack socket shows as ::ffff:a.b.c.d.
            let ip = match peer.ip() {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                v4 => v4,
            };
            let identity = Identity(resolver(ip));
            let (inner, stop) = (inner.clone(), stopped.clone());
            tokio::spawn(async move {
                let _permit = permit;
                serve_conn(stream, identity, inner, stop).await;
            });
        }
    });
    Ok(TcpChannel {
        local_addr,
        stop,
        task,
    })
}
