//! `serve`: the long-running daemon of the node's front-ends, over one cache. Binds
//! containerd's Unix socket inside a directory only its owner can enter and serves the
//! snapshots API (with, optionally, the CRI image service proxy whose pulls' credentials
//! the snapshotter uses), and/or mounts containers/storage's additional layer store,
//! and/or serves CSI, until SIGINT/SIGTERM; tells systemd when it is ready
//! (`Type=notify`). Beside them it answers `status` on a Unix socket of the same kind ([`status`]) and,
//! when asked to, Prometheus on a TCP address ([`crate::metrics`]), both over [`http`].

pub mod config;
pub mod http;
pub mod status;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::cache::ChunkCache;
use crate::cri::CriProxy;
use crate::csi::grpc::CsiGrpc;
use crate::csi::CsiNode;
use crate::fs;
use crate::layerstore::LayerStore;
use crate::metrics;
use crate::registry::credentials::keychain::CriKeychain;
use crate::restart::handover::Handover;
use crate::snapshotter::grpc::Grpc;
use crate::snapshotter::remote::RemoteSnapshotter;
use crate::snapshotter::{private_dir, SnapshotError, Snapshotter, STATE_MODE};
pub use config::{ConfigError, DaemonConfig};
use http::Reply;
use status::{Frontends, Node};

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Setting up state or the socket failed.
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: String, source: std::io::Error },
    /// Opening the snapshotter state failed.
    #[error(transparent)]
    Snapshotter(#[from] SnapshotError),
    /// The socket's directory is shared with other files, so it cannot be made private.
    #[error(
        "socket directory {dir} is open to other users and holds {other:?}: give `address` a directory of its own (it is created with mode 0700)"
    )]
    SharedSocketDir { dir: String, other: String },
    /// The chunk cache could not be opened.
    #[error(transparent)]
    Cache {
        #[from]
        source: crate::cache::CacheError,
    },
    /// The gRPC server failed.
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The layer store's records could not be opened.
    #[error(transparent)]
    LayerStore(#[from] crate::layerstore::StoreError),
    /// The layer store could not be mounted.
    #[error("layer store: {0}")]
    Mount(#[from] crate::fs::FsError),
    /// The session serving model snapshots could not be set up.
    #[error("model snapshots: {0}")]
    Models(crate::fs::FsError),
    /// The CSI plugin's state could not be opened.
    #[error("CSI: {0}")]
    Csi(#[from] crate::csi::CsiError),
    /// The CRI proxy could not be set up.
    #[error("CRI proxy: {0}")]
    Cri(#[from] crate::cri::CriError),
    /// The descriptor holder could not be reached or started.
    #[error("descriptor holder {path}: {source}")]
    Holder { path: String, source: std::io::Error },
    /// The metrics address could not be bound.
    #[error("metrics address {address}: {source}")]
    Metrics { address: std::net::SocketAddr, source: std::io::Error },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DaemonError + 'a {
    move |source| DaemonError::Io { what, path: path.display().to_string(), source }
}

/// Makes `dir` the socket's private directory ([`STATE_MODE`]): created so, or
/// tightened when it holds nothing but the socket (a directory an earlier build made).
/// Anyone who can connect drives the snapshotter, so the directory, not a mode set on
/// the socket after it is already listening, is what keeps other users out. A shared
/// directory (`/run` itself, say) is refused rather than closed to everyone else.
fn socket_dir(dir: &Path, socket: &Path) -> Result<(), DaemonError> {
    let loose = match std::fs::metadata(dir) {
        Ok(meta) => meta.permissions().mode() & 0o7777 != STATE_MODE,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(io_err("checking", dir)(e)),
    };
    if loose {
        let entries = std::fs::read_dir(dir).map_err(io_err("reading", dir))?;
        let mut others =
            entries.filter_map(Result::ok).filter(|e| Some(e.file_name().as_os_str()) != socket.file_name());
        if let Some(other) = others.next() {
            return Err(DaemonError::SharedSocketDir {
                dir: dir.display().to_string(),
                other: other.file_name().to_string_lossy().into_owned(),
            });
        }
    }
    private_dir(dir)?;
    Ok(())
}

/// The socket listening at `address`: the one the previous process kept through
/// `handover`, else bound afresh ([`bind`]).
fn listen(handover: Option<&Handover>, address: &Path) -> Result<UnixListener, DaemonError> {
    match handover {
        Some(handover) => handover.listener(address, || bind(address)),
        None => bind(address),
    }
}

/// Binds `address` afresh inside its private directory: a socket file left by an
/// earlier run is replaced, anything else in the way is an error.
fn bind(address: &Path) -> Result<UnixListener, DaemonError> {
    let dir = address.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    socket_dir(dir, address)?;
    match std::fs::symlink_metadata(address) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            std::fs::remove_file(address).map_err(io_err("removing stale socket", address))?;
        }
        Ok(_) => {
            return Err(DaemonError::Io {
                what: "refusing to replace",
                path: address.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "not a socket"),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("checking", address)(e)),
    }
    UnixListener::bind(address).map_err(io_err("binding", address))
}

/// Runs the daemon until `shutdown` completes (a restart) or `POST /stop` on the status
/// socket asks it to stop for good.
///
/// With `restart.hand_over`, a restart leaves every model mounted and the sockets
/// listening, kept by the descriptor holder for the next `serve` to take over
/// (docs/restarts.md): the process exits without unmounting anything. A stop for good,
/// or any stop without hand-over, unmounts everything.
///
/// The sockets are bound and the layer store mounted as soon as the state is open,
/// before any model is mounted again: start-up does not grow with the number of models,
/// and one model behind an unreachable registry holds up nobody. Models recorded before
/// a restart are mounted in the background; requests about one not mounted yet wait for
/// it (bounded) or answer `Unavailable` (snapshots API) or "not found" (layer store).
pub async fn serve(
    config: &DaemonConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), DaemonError> {
    // The state first: it creates the root private, before the cache (by default
    // inside it) exists.
    let base = if config.serves_containerd() {
        Some(tokio::task::block_in_place(|| Snapshotter::open(&config.root))?)
    } else {
        private_dir(&config.root)?;
        None
    };
    if let Err(e) = crate::restart::handover::write_pid(&config.root) {
        tracing::warn!(root = %config.root.display(), error = %e, "cannot record the daemon's process id; `stop` will not find it");
    }
    let handover = match config.restart.hand_over {
        true => {
            let socket = config.holder_socket();
            let dir = config.root.join("restart");
            let opened = tokio::task::block_in_place(|| Handover::open(&socket, &dir));
            Some(Arc::new(opened.map_err(|source| DaemonError::Holder { path: socket.display().to_string(), source })?))
        }
        false => None,
    };
    let mut starting = Starting(handover.clone());
    let mut settings = config.settings();
    let cache_dir = config.cache_dir();
    let cache = Arc::new(
        ChunkCache::open(&cache_dir, settings.fetch.cache_budget).map_err(|source| DaemonError::Cache { source })?,
    );
    settings.fetch.fit_cache(cache.recorded_chunk_size().map_err(|source| DaemonError::Cache { source })?);
    // Models come and go with their snapshots, layers and volumes: an unpacked layer goes
    // with its last model.
    cache.drop_unused_unpacked();
    let runtime = tokio::runtime::Handle::current();
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let mut servers = Vec::new();
    // Bound before anything is mounted: an address in use fails the start with nothing
    // left to undo. Answered once the front-ends exist.
    let status_socket = config.status_socket();
    let status_listener = listen(handover.as_deref(), &status_socket)?;
    let metrics_listener = match config.metrics_address() {
        Some(address) => Some(
            tokio::net::TcpListener::bind(address).await.map_err(|source| DaemonError::Metrics { address, source })?,
        ),
        None => None,
    };

    let mut frontends = Frontends::default();
    let mut store = match config.layer_store() {
        Some((path, store_settings)) => {
            let state = config.root.join("layer-store");
            private_dir(&state)?;
            let store = Arc::new(LayerStore::open(&state, cache.clone(), settings.clone(), store_settings)?);
            let at = runtime.clone();
            let keeper = handover.clone().map(|h| h as Arc<dyn crate::fs::handover::Keeper>);
            let wait = config.model_mounts().restore_wait;
            let mounted =
                tokio::task::block_in_place(|| fs::store::mount_store(store.clone(), &path, at, keeper, wait))?;
            let restoring = store.restore()?;
            tracing::info!(path = %path.display(), restoring, "serving the containers/storage layer store");
            println!("layer store: {}", path.display());
            frontends.layer_store = Some(store);
            Some(mounted)
        }
        None => None,
    };
    let csi = match config.csi() {
        Some((address, csi)) => {
            let state = config.root.join("csi");
            private_dir(&state)?;
            let mounting = config.model_mounts();
            let keeper = handover.clone().map(|h| h as Arc<dyn crate::fs::handover::Keeper>);
            let node = Arc::new(CsiNode::open(
                &state,
                cache.clone(),
                settings.clone(),
                runtime.clone(),
                (mounting.fuse_threads, mounting.restore_wait),
                keeper,
            )?);
            let timeout = settings.registry.request_timeout;
            let grpc = CsiGrpc::new(node.clone(), csi.driver_name.clone(), csi.node_id.clone(), timeout);
            let listener = listen(handover.as_deref(), &address)?;
            let router =
                tonic::transport::Server::builder().add_service(grpc.identity_server()).add_service(grpc.node_server());
            servers.push(tokio::spawn(serve_grpc(router, listener, stopping.clone(), grace)));
            let restoring = node.restore()?;
            tracing::info!(address = %address.display(), driver = %csi.driver_name, node = %csi.node_id, restoring, "serving CSI");
            println!("csi: {}", address.display());
            frontends.csi = Some(node.clone());
            Some((node, address))
        }
        None => None,
    };
    // What the CRI proxy's pulls prove, for the snapshotter's models.
    let keychain = config.cri().map(|(_, cri)| CriKeychain::new(cri.credential_ttl));
    let snapshotter = match base {
        Some(base) => {
            let at = runtime.clone();
            let pulls = keychain.clone();
            let cache = cache.clone();
            let keeper = handover.clone().map(|h| h as Arc<dyn crate::fs::handover::Keeper>);
            let snapshotter = tokio::task::block_in_place(|| {
                RemoteSnapshotter::new(base, cache, settings, config.model_mounts(), pulls, keeper, at)
            })
            .map_err(DaemonError::Models)?;
            let snapshotter = Arc::new(snapshotter);
            let listener = listen(handover.as_deref(), &config.address)?;
            tokio::task::block_in_place(|| snapshotter.restore())?;
            let router = tonic::transport::Server::builder().add_service(Grpc::new(snapshotter.clone()).into_server());
            servers.push(tokio::spawn(serve_grpc(router, listener, stopping.clone(), grace)));
            tracing::info!(address = %config.address.display(), root = %config.root.display(), "serving containerd snapshots API");
            println!("serving: {}", config.address.display());
            frontends.snapshotter = Some(snapshotter.clone());
            Some(snapshotter)
        }
        None => None,
    };
    let cri = match (config.cri(), keychain) {
        (Some((address, cri)), Some(keychain)) => {
            let proxy = CriProxy::new(&cri.containerd_address, keychain)?;
            let listener = listen(handover.as_deref(), &address)?;
            let router = tonic::transport::Server::builder().add_service(proxy.into_server());
            servers.push(tokio::spawn(serve_grpc(router, listener, stopping.clone(), grace)));
            tracing::info!(address = %address.display(), containerd = %cri.containerd_address.display(), "serving the CRI image service");
            println!("cri: {}", address.display());
            Some(address)
        }
        _ => None,
    };
    let node = Arc::new(Node::new(cache, frontends));
    servers.push(tokio::spawn(sample(node.clone(), stopping.clone())));
    let stop_asked = Arc::new(tokio::sync::Notify::new());
    servers.push(tokio::spawn(serve_status(status_listener, node.clone(), stop_asked.clone(), stopping.clone())));
    tracing::info!(address = %status_socket.display(), "serving status");
    println!("status: {}", status_socket.display());
    if let Some(listener) = metrics_listener {
        let address = listener.local_addr().map_or_else(|_| config.metrics_address.clone(), |a| a.to_string());
        servers.push(tokio::spawn(serve_metrics(listener, node.clone(), stopping.clone())));
        tracing::info!(%address, "serving metrics");
        println!("metrics: http://{address}/metrics");
    }
    if let Some(handover) = &handover {
        handover.release_unclaimed();
    }
    starting.started();
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::debug!(error = %e, "cannot notify systemd");
    }

    let for_good = tokio::select! {
        () = shutdown => false,
        () = stop_asked.notified() => true,
    };
    let _ = stop.send(true);
    let mut served = Ok(());
    for server in servers {
        let result = server.await.unwrap_or_else(|e| panic!("a gRPC server task failed: {e}"));
        served = served.and(result);
    }
    if !for_good && handover.is_some() {
        // A restart: what is kept stays as it is, for the next process. What this kernel
        // or front-end cannot hand over is unmounted, as a stop would. (A kept store must
        // not be dropped: that unmounts it.)
        let unkept_store = store.take_if(|s| !s.is_kept());
        tokio::task::block_in_place(|| {
            if let Some(snapshotter) = snapshotter.as_ref().filter(|s| !s.session_kept()) {
                snapshotter.unmount_all();
            }
            if let Some((node, _)) = csi.as_ref().filter(|(node, _)| !node.session_kept()) {
                node.unmount_all();
            }
            if let Some(mounted) = unkept_store {
                tracing::info!("unmounting the layer store");
                mounted.unmount();
            }
        });
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        tracing::info!("stopped for a restart: the models stay mounted, and the next `serve` takes them over");
        // Nothing is dropped on the way out: dropping the sessions would detach the
        // models, and a FUSE reply dropped unsent answers an error. Requests read and not
        // answered are sent again to the next process.
        std::process::exit(0);
    }
    let _ = std::fs::remove_file(&status_socket);
    tokio::task::block_in_place(|| {
        if let Some(snapshotter) = &snapshotter {
            snapshotter.unmount_all();
            let _ = std::fs::remove_file(&config.address);
        }
        if let Some(address) = &cri {
            let _ = std::fs::remove_file(address);
        }
        if let Some((node, address)) = &csi {
            node.unmount_all();
            let _ = std::fs::remove_file(address);
        }
        if let Some(mounted) = store {
            tracing::info!("unmounting the layer store");
            mounted.unmount();
        }
        if let Some(handover) = &handover {
            handover.quit();
        }
        crate::restart::handover::remove_pid(&config.root);
    });
    served?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    tracing::info!("stopped");
    Ok(())
}

/// A start under way: dropped before [`Starting::started`] (the start failed), it stops
/// the descriptor holder the start made, which would otherwise outlive it keeping nothing
/// of use.
struct Starting(Option<Arc<Handover>>);

impl Starting {
    fn started(&mut self) {
        self.0 = None;
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(handover) = self.0.take() {
            handover.abandon();
        }
    }
}

/// Samples the bytes fetched for the status's fetch rate until `stopping` turns true.
async fn sample(node: Arc<Node>, mut stopping: tokio::sync::watch::Receiver<bool>) -> Result<(), DaemonError> {
    let mut tick = tokio::time::interval(status::SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => node.sample(),
            _ = stopping.wait_for(|s| *s) => return Ok(()),
        }
    }
}

/// Answers `GET /status` with `node`'s status as JSON until `stopping` turns true.
async fn serve_status(
    listener: UnixListener,
    node: Arc<Node>,
    stop_asked: Arc<tokio::sync::Notify>,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> Result<(), DaemonError> {
    let handler: http::Handler = Arc::new(move |method: &Method, path: &str| match (method, path) {
        (&Method::GET, "/status") => {
            let json = serde_json::to_vec_pretty(&node.status()).expect("a status serializes");
            Reply::ok("application/json", json)
        }
        (&Method::POST, "/stop") => {
            tracing::info!("asked to stop for good");
            stop_asked.notify_one();
            Reply::ok("text/plain; charset=utf-8", "stopping for good\n")
        }
        (_, "/status" | "/stop") => {
            Reply::error(StatusCode::METHOD_NOT_ALLOWED, format!("{method} {path}: GET /status or POST /stop"))
        }
        (_, other) => Reply::error(StatusCode::NOT_FOUND, format!("no {other} here: GET /status or POST /stop")),
    });
    http::serve(UnixListenerStream::new(listener), handler, stopping).await;
    Ok(())
}

/// Answers `GET /metrics` with every metric, those `node` keeps read at each scrape,
/// until `stopping` turns true.
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    node: Arc<Node>,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> Result<(), DaemonError> {
    let collector = metrics::NodeCollector::new(move || node.gauges());
    let registry = metrics::exposition(metrics::recorded(), collector);
    let handler: http::Handler = Arc::new(move |method: &Method, path: &str| match path {
        "/metrics" if method != Method::GET => Reply::error(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics"),
        "/metrics" => Reply::ok(metrics::CONTENT_TYPE, metrics::encode(&registry)),
        other => Reply::error(StatusCode::NOT_FOUND, format!("no {other} here: GET /metrics")),
    });
    http::serve(tokio_stream::wrappers::TcpListenerStream::new(listener), handler, stopping).await;
    Ok(())
}

/// Serves `router` on `listener` until `stopping` turns true. A graceful stop waits for
/// every connection to close, and containerd and kubelet never close their own: after
/// `grace` the server (and its connections) is dropped, so that the models are unmounted
/// before a supervisor's SIGKILL would leave them mounted with nobody serving them.
async fn serve_grpc(
    router: tonic::transport::server::Router,
    listener: UnixListener,
    mut stopping: tokio::sync::watch::Receiver<bool>,
    grace: Duration,
) -> Result<(), DaemonError> {
    let mut stopped = stopping.clone();
    let server = router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
        let _ = stopping.wait_for(|s| *s).await;
    });
    tokio::select! {
        served = server => Ok(served?),
        () = async {
            let _ = stopped.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(?grace, "clients still connected after the grace period; closing their connections");
            Ok(())
        }
    }
}
