//! `serve`: the long-running snapshotter daemon containerd talks to. Binds the Unix
//! socket, serves the snapshots API until SIGINT/SIGTERM, and tells systemd when it is
//! ready (`Type=notify`).

pub mod config;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::cache::ChunkCache;
use crate::snapshotter::grpc::Grpc;
use crate::snapshotter::remote::RemoteSnapshotter;
use crate::snapshotter::{SnapshotError, Snapshotter};
pub use config::{ConfigError, DaemonConfig};

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Setting up state or the socket failed.
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: String, source: std::io::Error },
    /// Opening the snapshotter state failed.
    #[error(transparent)]
    Snapshotter(#[from] SnapshotError),
    /// The chunk cache could not be opened.
    #[error(transparent)]
    Cache {
        #[from]
        source: crate::cache::CacheError,
    },
    /// The gRPC server failed.
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DaemonError + 'a {
    move |source| DaemonError::Io { what, path: path.display().to_string(), source }
}

/// Binds `address` afresh: a socket file left by an earlier run is replaced, anything
/// else in the way is an error.
fn bind(address: &Path) -> Result<UnixListener, DaemonError> {
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    }
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
    let listener = UnixListener::bind(address).map_err(io_err("binding", address))?;
    // Only root (containerd) may drive the snapshotter.
    std::fs::set_permissions(address, std::fs::Permissions::from_mode(0o600)).map_err(io_err("securing", address))?;
    Ok(listener)
}

/// Runs the daemon until `shutdown` completes.
///
/// The socket is bound as soon as the state is open, before any model is mounted again:
/// start-up does not grow with the number of models, and one model behind an
/// unreachable registry holds up nobody. Models recorded before a restart are mounted in
/// the background; requests about one not mounted yet wait for it (bounded) or answer
/// `Unavailable`.
pub async fn serve(
    config: &DaemonConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), DaemonError> {
    std::fs::create_dir_all(&config.root).map_err(io_err("creating", &config.root))?;
    let settings = config.settings();
    let cache_dir = config.cache_dir();
    let cache =
        ChunkCache::open(&cache_dir, settings.fetch.cache_budget).map_err(|source| DaemonError::Cache { source })?;
    let base = tokio::task::block_in_place(|| Snapshotter::open(&config.root))?;
    let snapshotter = Arc::new(RemoteSnapshotter::new(
        base,
        Arc::new(cache),
        settings,
        config.model_mounts(),
        tokio::runtime::Handle::current(),
    ));
    let listener = bind(&config.address)?;
    tokio::task::block_in_place(|| snapshotter.restore())?;
    tracing::info!(address = %config.address.display(), root = %config.root.display(), "serving containerd snapshots API");
    println!("serving: {}", config.address.display());
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::debug!(error = %e, "cannot notify systemd");
    }
    let served = tonic::transport::Server::builder()
        .add_service(Grpc::new(snapshotter.clone()).into_server())
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    tokio::task::block_in_place(|| snapshotter.unmount_all());
    served?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let _ = std::fs::remove_file(&config.address);
    tracing::info!("stopped");
    Ok(())
}
