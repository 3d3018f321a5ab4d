//! Builds the server from a `Config`: opens the store, wires the service and
//! the routes, binds, and serves until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::operator::Host;
use crate::service::Service;
use crate::store::Store;

/// Runs the server until a shutdown signal; returns after a graceful stop.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let db = config.db_path();
    let store = Store::open_with(&db, &crate::store::OpenOptions::for_serve(&config))
        .with_context(|| format!("cannot open database {}", db.display()))?;
    let mut host = Host::probe(&config)?;
    // The guard table is needed now only if user-mode VMs may be running.
    let guarded = store
        .list_vms(Some(crate::model::VmState::Running))
        .map(|vms| {
            vms.iter()
                .any(|v| v.network_mode == crate::model::NetworkMode::User)
        })
        .unwrap_or(true);
    host.guard = crate::operator::guard::start(
        &config.guard_table,
        host.passt_as.as_ref().map(|(_, uid)| *uid),
        guarded,
    );
    if config.user_net == crate::model::UserNet::Passt {
        crate::operator::passt::check(&config.passt_binary)?;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 && host.passt_as.is_none() {
            anyhow::bail!(
                "VMAN_PASST_USER={:?}: no such user; as root passt runs as its own user \
                 (scripts/setup.sh creates vman-passt)",
                config.passt_user
            );
        }
    }
    tracing::info!(
        "accelerator {} ({}), QEMU sandbox {}, QEMU user {}, QEMU CPU weight {}",
        host.accel.as_str(),
        host.accel_reason,
        if host.sandbox { "on" } else { "unsupported" },
        host.run_as
            .as_ref()
            .map_or("unchanged", |r| r.user.as_str()),
        host.cpu.describe()
    );
    match &config.default_boot_disk {
        Some(d) if !d.is_file() => {
            tracing::warn!("Default boot disk specified but not found: {}", d.display())
        }
        Some(d) => tracing::info!("default boot disk {}", d.display()),
        None => tracing::info!("no default boot disk configured; new VMs get an empty disk"),
    }
    let service = Arc::new(Service::new(config.clone(), store, host));
    service.wire_metadata();
    service.sweep_leftovers();
    let mut state = AppState {
        service: service.clone(),
        token: config.api_token.as_deref().map(Arc::from),
        vm_list: Arc::default(),
        http_metrics: Arc::default(),
        cluster: None,
    };
    let addr = SocketAddr::new(config.host, config.port);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    if config.cluster.enabled {
        api::cluster::join(&mut state, local).await?;
    }
    // Before the "listening" line, which tells scripts vman is ready.
    let signal = shutdown_signal();
    // Listen first: a QEMU that does not answer must not hold up the API.
    // Adoption runs in parallel, with a bounded wait per VM; the observer
    // starts once it is done (it would take a VM not adopted yet for dead).
    let interval = std::time::Duration::from_secs(config.observer_interval);
    tokio::spawn(async move {
        if let Err(e) = service.recover().await {
            tracing::error!("cannot recover running VMs: {e}");
        }
        service.recover_snapshot_ops().await;
        service.recover_disk_attachments().await;
        service.recover_network().await;
        service.reconcile_bridge().await;
        service.ensure_bridge_metadata_listener().await;
        service.settle_migrations().await;
        crate::observer::run(service, interval).await;
    });
    tracing::info!(
        "vman {} listening on http://{local} (storage {}, database {})",
        env!("CARGO_PKG_VERSION"),
        config.storage_path.display(),
        db.display()
    );
    let service = state.service.clone();
    let limits = api::listen::Limits {
        header_timeout: std::time::Duration::from_secs(config.header_timeout),
        max_connections: config.max_connections,
    };
    let closing = service.clone();
    let shutdown = async move {
        signal.await;
        closing.close_streams(); // open event streams and consoles end
    };
    api::listen::serve(listener, api::router(state), limits, shutdown).await;
    service.network_shutdown().await;
    service.checkpoint_database();
    tracing::info!("vman stopped");
    Ok(())
}

/// Watches SIGTERM and SIGINT from the moment it is called (not from its
/// first poll): a signal sent right after the "listening" line still
/// shuts down gracefully instead of killing vman.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let watch = |kind: SignalKind, name: &'static str| {
        let watched = signal(kind);
        async move {
            match watched {
                Ok(mut s) => {
                    s.recv().await;
                    tracing::info!("{name} received, shutting down");
                }
                Err(e) => {
                    tracing::error!("cannot watch {name}: {e}");
                    std::future::pending::<()>().await;
                }
            }
        }
    };
    let term = watch(SignalKind::terminate(), "SIGTERM");
    let int = watch(SignalKind::interrupt(), "SIGINT");
    async move {
        tokio::select! {
            () = term => {}
            () = int => {}
        }
    }
}
