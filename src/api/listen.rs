//! The HTTP/1.1 accept loop (instead of `axum::serve`, which sets neither a
//! header-read timeout nor a connection limit):
//!
//! - a client has `header_timeout` to send each request's headers, counted
//!   from the connection's start or the end of the previous response, so
//!   slow-header and idle kept-alive connections are closed after it;
//! - at most `max_connections` connections are open; further clients wait in
//!   the listen backlog until one closes (their requests are then answered);
//! - on shutdown the listener closes, idle connections close at once and
//!   in-flight requests finish before `serve` returns.
//!
//! HTTP/2 is not offered: its preface and frames would need their own
//! timeouts, and no client of vman needs it. Upgrades (WebSocket) work.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// The knobs of the accept loop (`VMAN_HEADER_TIMEOUT`, `VMAN_MAX_CONNECTIONS`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub max_connections: u32,
}

/// Serves `router` on `listener` until `shutdown` completes, then waits for
/// open requests to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let max = limits.max_connections.max(1);
    let permits = Arc::new(Semaphore::new(max as usize));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut limit_logged = false;
    tokio::pin!(shutdown);
    loop {
        if permits.available_permits() == 0 && !limit_logged {
            tracing::warn!("{max} connections open (VMAN_MAX_CONNECTIONS): new clients wait");
            limit_logged = true;
        }
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and the like: wait instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if permits.available_permits() > 0 {
            limit_logged = false;
        }
        let _ = stream.set_nodelay(true);
        let service = tower::ServiceExt::map_request(
            router.clone(),
            move |mut req: axum::http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            },
        );
        let conn = builder
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
            .with_upgrades();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                log_connection_error(peer, &e);
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a permit: all of them back means all closed.
    let _ = permits.acquire_many(max).await;
}

fn log_connection_error(peer: SocketAddr, e: &hyper::Error) {
    if e.is_timeout() {
        tracing::debug!("closed connection from {peer}: headers not received in time");
    } else {
        tracing::debug!("connection from {peer}: {e}");
    }
}
