//! The `modelpack-snapshotter` command: `push`, `inspect`, `mount`, `convert`, `serve`
//! and `status`; and `hold`, hidden: the fd holder, which `Holder::start` runs.

use std::io::IsTerminal;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use modelpack_snapshotter::cache::ChunkCache;
use modelpack_snapshotter::config::{FetchSettings, LogFormat, PrefetchPolicy, RegistrySettings, Settings};
use modelpack_snapshotter::daemon::{self, DaemonConfig};
use modelpack_snapshotter::model::{Model, Prefetched};
use modelpack_snapshotter::modelpack::select::Selection;
use modelpack_snapshotter::modelpack::tree::NodeKind;
use modelpack_snapshotter::progress::Progress;
use modelpack_snapshotter::push::{self, PackFormat};
use modelpack_snapshotter::registry::hosts::HostsDir;
use modelpack_snapshotter::restart::holder;
use modelpack_snapshotter::{convert, fs};

/// How long `mount` waits at exit for cache writes of chunks it already fetched.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(version, about = "Lazy mounts of CNCF ModelPack models from OCI registries")]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct LogArgs {
    /// Log filter, e.g. `info`, `debug`, `modelpack_snapshotter=trace` [default: info, or
    /// the configuration's `log_level` for `serve`].
    #[arg(long, env = "MODELPACK_LOG", global = true)]
    log_level: Option<String>,
    /// Log lines as `text`, or as `json` (one object per line, for log shippers; progress
    /// is then logged too) [default: text, or the configuration's `log_format` for `serve`].
    #[arg(long, env = "MODELPACK_LOG_FORMAT", global = true, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
}

impl LogArgs {
    /// Starts logging on standard error, with the filter and format the flags give, else
    /// these defaults. Returns where progress goes: log lines are written through it, so
    /// that they never tear a progress bar.
    fn init(&self, level: &str, format: LogFormat) -> Progress {
        let format = self.log_format.unwrap_or(format);
        let filter = self.log_level.as_deref().unwrap_or(level);
        let progress = Progress::stderr(format);
        let logs = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| "info".into()))
            .with_writer(progress.log_writer());
        match format {
            LogFormat::Text => logs.with_ansi(colours()).init(),
            LogFormat::Json => logs.json().init(),
        }
        progress
    }
}

/// Whether text logs are coloured: only for a person at a terminal (journald and log
/// files would keep the escape codes around every field), unless `NO_COLOR` is set.
fn colours() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

#[derive(Args, Debug)]
struct RegistryArgs {
    /// Seconds allowed for one registry request.
    #[arg(long, default_value_t = 60, global = true)]
    request_timeout: u64,
    /// Seconds allowed to connect to the registry.
    #[arg(long, default_value_t = 10, global = true)]
    connect_timeout: u64,
    /// Retries of a failed registry request before giving up.
    #[arg(long, default_value_t = 3, global = true)]
    retries: u32,
    /// containerd's hosts directory (`<dir>/<registry>/hosts.toml`: mirrors, CAs, client
    /// certificates, headers, plain HTTP) [default: /etc/containerd/certs.d when it
    /// exists; "" for none].
    #[arg(long, global = true)]
    hosts_dir: Option<PathBuf>,
}

impl RegistryArgs {
    fn settings(&self) -> RegistrySettings {
        RegistrySettings {
            request_timeout: Duration::from_secs(self.request_timeout),
            connect_timeout: Duration::from_secs(self.connect_timeout),
            retries: self.retries,
            hosts: self.hosts_dir.as_deref().map_or_else(HostsDir::system, HostsDir::from_setting),
            ..RegistrySettings::default()
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Pack a directory as a ModelPack artifact (one layer per file) and push it.
    Push {
        /// The model directory.
        dir: PathBuf,
        /// Where to push, e.g. 127.0.0.1:5000/models/demo:v1.
        reference: String,
        /// Layer format: `raw` (the blob is the file) or `tar` (a tar of the one file).
        #[arg(long, value_enum, default_value_t = Format::Raw)]
        format: Format,
    },
    /// Show a model's layers and files.
    Inspect {
        /// The model reference.
        reference: String,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Publish a companion image (the lazy index) that containerd can pull through the snapshotter.
    Convert {
        /// The ModelPack artifact.
        source: String,
        /// Where to push the companion [default: the source tag with `-lazy` appended].
        #[arg(long)]
        target: Option<String>,
        /// Bytes per digested chunk; the snapshotter's chunk size must be a multiple of it.
        #[arg(long, default_value_t = 1 << 20)]
        chunk_size: u64,
        /// What nodes serving the model fetch in the background (`none`, `all`,
        /// `head:BYTES`), in place of their own `cache.prefetch` [default: theirs].
        #[arg(long, value_name = "POLICY")]
        prefetch: Option<PrefetchPolicy>,
    },
    /// Serve containerd's snapshots API on a Unix socket, containers/storage's additional
    /// layer store (CRI-O, podman), the CSI node plugin (kubelet) and the CRI image service
    /// proxy (kubelet's pull secrets), as configured, until SIGINT/SIGTERM.
    Serve {
        /// Configuration file (TOML) [default: /etc/modelpack-snapshotter/config.toml if it exists].
        #[arg(long)]
        config: Option<PathBuf>,
        /// State directory (overrides `root`).
        #[arg(long)]
        root: Option<PathBuf>,
        /// Socket path (overrides `address`).
        #[arg(long)]
        address: Option<PathBuf>,
        /// Chunk cache directory (overrides `cache.dir`).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Mount the additional layer store here (overrides `layer_store.path`).
        #[arg(long)]
        layer_store: Option<PathBuf>,
        /// Serve no containerd socket (the layer store or CSI alone).
        #[arg(long)]
        no_containerd: bool,
        /// Serve the CSI node plugin on this socket (overrides `csi.address`).
        #[arg(long)]
        csi_address: Option<PathBuf>,
        /// This node's id for CSI (overrides `csi.node_id`; Kubernetes: the node's name).
        #[arg(long)]
        csi_node_id: Option<String>,
        /// Serve CRI's image service on this socket as a proxy to containerd's, remembering
        /// kubelet's pull secrets for the snapshotter (overrides `cri.address`).
        #[arg(long)]
        cri_address: Option<PathBuf>,
        /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9102
        /// (overrides `metrics_address`).
        #[arg(long, value_name = "ADDR")]
        metrics_address: Option<String>,
        /// The socket `status` asks (overrides `status_address`) [default: <root>/status.sock].
        #[arg(long)]
        status_address: Option<PathBuf>,
    },
    /// Show what a running `serve` serves: every model, how much of it is cached, the
    /// fetch rate and the cache's use.
    Status {
        /// The daemon's status socket [default: `status_address` of the configuration,
        /// else <root>/status.sock].
        #[arg(long)]
        address: Option<PathBuf>,
        /// The daemon's configuration, to find its socket [default:
        /// /etc/modelpack-snapshotter/config.toml if it exists].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the daemon's answer as it is (JSON).
        #[arg(long)]
        json: bool,
    },
    /// Stop `serve` for good (a node drain, an uninstall): it unmounts every model and
    /// removes its sockets, and the process that kept them across restarts exits. (A
    /// SIGTERM is a restart: the models stay mounted for the next `serve` to take over.)
    /// Also cleans up after a daemon that crashed and is not started again.
    Stop {
        /// The daemon's configuration, to find its root and status socket [default:
        /// /etc/modelpack-snapshotter/config.toml if it exists].
        #[arg(long)]
        config: Option<PathBuf>,
        /// The daemon's state directory [default: `root` of the configuration].
        #[arg(long)]
        root: Option<PathBuf>,
        /// Seconds to wait for the daemon to finish.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Mount a model read-only; bytes are fetched when first read. Runs until SIGINT/SIGTERM.
    Mount {
        /// The model reference.
        reference: String,
        /// An empty directory to mount on.
        mountpoint: PathBuf,
        #[command(flatten)]
        cache: CacheArgs,
        /// Fetch in the background after mounting: `--prefetch` alone (or `=all`) the
        /// whole model, `--prefetch=head:BYTES` the first BYTES of every file,
        /// `--prefetch=none` nothing [default: the companion's policy, else none].
        #[arg(long, value_name = "POLICY", num_args = 0..=1, require_equals = true, default_missing_value = "all")]
        prefetch: Option<PrefetchPolicy>,
    },
    /// Keep the daemon's file descriptors across its restarts: the fd holder, which
    /// `serve` starts itself (`--socket-fd`), or which runs beside it (`--socket`, as the
    /// DaemonSet's holder container does: docs/restarts.md).
    #[command(hide = true)]
    Hold {
        /// The listening socket, inherited at this descriptor.
        #[arg(long, value_name = "N", required_unless_present = "socket", conflicts_with = "socket")]
        socket_fd: Option<RawFd>,
        /// Listen at this path (`<root>/holder.sock`, where `serve` looks), once no other
        /// holder answers there.
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
struct CacheArgs {
    /// Chunk cache directory [default: /var/cache/modelpack-snapshotter as root,
    /// else $XDG_CACHE_HOME/modelpack-snapshotter].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Most bytes of chunk data kept in the cache (least recently used go first).
    #[arg(long)]
    cache_budget: Option<u64>,
    /// Bytes per chunk and per ranged request.
    #[arg(long, default_value_t = FetchSettings::default().chunk_size)]
    chunk_size: u64,
    /// Chunks fetched ahead of a sequential reader.
    #[arg(long, default_value_t = FetchSettings::default().readahead_chunks)]
    readahead_chunks: u64,
    /// Chunks fetched by one ranged request when reading ahead of a stream.
    #[arg(long, default_value_t = FetchSettings::default().stream_request_chunks)]
    stream_request_chunks: u64,
    /// Most chunks fetched but not yet written to the cache before fetches wait.
    #[arg(long, default_value_t = FetchSettings::default().pending_store_chunks)]
    pending_store_chunks: u64,
    /// Serve every read through this process, never by FUSE passthrough of verified blobs.
    #[arg(long)]
    no_passthrough: bool,
    /// Parallel requests of the background prefetch.
    #[arg(long, default_value_t = FetchSettings::default().prefetch_concurrency)]
    prefetch_concurrency: usize,
    /// Most bytes a compressed layer may unpack to when it does not declare its size.
    #[arg(long, default_value_t = FetchSettings::default().max_unpacked_bytes)]
    max_unpacked_bytes: u64,
    /// Refuse a plain ModelPack reference without a lazy index among its referrers
    /// (`convert` publishes one), instead of serving chunks before their blob is verified.
    #[arg(long)]
    require_lazy_index: bool,
}

impl CacheArgs {
    fn fetch(&self) -> Result<FetchSettings> {
        anyhow::ensure!(self.chunk_size >= 4096, "--chunk-size must be at least 4096 bytes");
        anyhow::ensure!(self.stream_request_chunks >= 1, "--stream-request-chunks must be at least 1");
        Ok(FetchSettings {
            chunk_size: self.chunk_size,
            readahead_chunks: self.readahead_chunks,
            stream_request_chunks: self.stream_request_chunks,
            pending_store_chunks: self.pending_store_chunks,
            prefetch_concurrency: self.prefetch_concurrency,
            // `mount` has no node policy: `--prefetch`, else the companion's, else none.
            prefetch: PrefetchPolicy::None,
            passthrough: !self.no_passthrough,
            cache_budget: self.cache_budget,
            max_unpacked_bytes: self.max_unpacked_bytes,
            require_lazy_index: self.require_lazy_index,
        })
    }

    fn dir(&self) -> PathBuf {
        if let Some(dir) = &self.cache_dir {
            return dir.clone();
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return PathBuf::from("/var/cache/modelpack-snapshotter");
        }
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
            .unwrap_or_else(std::env::temp_dir)
            .join("modelpack-snapshotter")
    }

    /// The cache, and the fetch settings fitted to it (see [`FetchSettings::fit_cache`]).
    fn open(&self) -> Result<(FetchSettings, Arc<ChunkCache>)> {
        let dir = self.dir();
        let cache =
            ChunkCache::open(&dir, self.cache_budget).with_context(|| format!("opening cache {}", dir.display()))?;
        let mut fetch = self.fetch()?;
        fetch.fit_cache(cache.recorded_chunk_size()?);
        Ok((fetch, Arc::new(cache)))
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Raw,
    Tar,
}

const DEFAULT_CONFIG: &str = "/etc/modelpack-snapshotter/config.toml";

/// The log filter of every command but `serve`, whose configuration may give another.
const DEFAULT_LOG_LEVEL: &str = "info";

/// Most glibc malloc arenas. By default glibc gives each thread that allocates its own
/// arena, up to eight per core, and memory freed in one is not reused by another: with
/// chunk buffers handed between tokio workers and blocking threads, that fragmentation
/// took the peak RSS of an 8 GiB cold read from ~90 MiB to ~160 MiB (`make bench`).
const MALLOC_ARENAS: i32 = 2;

fn main() -> std::process::ExitCode {
    #[cfg(target_env = "gnu")]
    // SAFETY: called first thing, before any other thread exists; `mallopt` only sets a
    // parameter of the allocator.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
    }
    let cli = Cli::parse();
    let mut output = None;
    match run(cli, &mut output) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let message = format!("{e:#}");
            match output {
                Some(progress) => progress.error(&message),
                None => eprintln!("error: {message}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the command; `output` is where its lines go once logging has started.
fn run(cli: Cli, output: &mut Option<Progress>) -> Result<()> {
    // Built by the commands that need it: the fd holder is a plain blocking loop.
    let runtime = || tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting runtime");
    let registry_settings = cli.registry.settings();
    // `serve` starts logging once it has read its configuration; the others at once.
    let log = &cli.log;
    match cli.command {
        Command::Push { dir, reference, format } => {
            let progress = output.insert(log.init(DEFAULT_LOG_LEVEL, LogFormat::Text));
            let format = match format {
                Format::Raw => PackFormat::Raw,
                Format::Tar => PackFormat::Tar,
            };
            let digest = runtime()?.block_on(push::push_dir(&dir, &reference, format, &registry_settings, progress))?;
            println!("{digest}");
            Ok(())
        }
        Command::Inspect { reference, cache } => {
            *output = Some(log.init(DEFAULT_LOG_LEVEL, LogFormat::Text));
            let (fetch, cache) = cache.open()?;
            let settings = Settings { registry: registry_settings, fetch, selection: Selection::all() };
            let model = runtime()?.block_on(Model::open(&reference, &settings, cache))?;
            print_inspect(&model);
            Ok(())
        }
        Command::Convert { source, target, chunk_size, prefetch } => {
            let progress = output.insert(log.init(DEFAULT_LOG_LEVEL, LogFormat::Text));
            let target = match target {
                Some(t) => t,
                None => convert::default_target(&source)?,
            };
            let settings =
                Settings { registry: registry_settings, fetch: FetchSettings::default(), selection: Selection::all() };
            let done =
                runtime()?.block_on(convert::convert(&source, &target, chunk_size, prefetch, &settings, progress))?;
            println!("{}@{}", done.target, done.digest);
            Ok(())
        }
        Command::Serve {
            config,
            root,
            address,
            cache_dir,
            layer_store,
            no_containerd,
            csi_address,
            csi_node_id,
            cri_address,
            metrics_address,
            status_address,
        } => {
            let mut daemon = daemon_config(config.as_deref())?;
            daemon.root = root.unwrap_or(daemon.root);
            daemon.address = address.unwrap_or(daemon.address);
            daemon.cache.dir = cache_dir.unwrap_or(daemon.cache.dir);
            daemon.layer_store.path = layer_store.unwrap_or(daemon.layer_store.path);
            daemon.csi.address = csi_address.unwrap_or(daemon.csi.address);
            daemon.csi.node_id = csi_node_id.unwrap_or(daemon.csi.node_id);
            daemon.cri.address = cri_address.unwrap_or(daemon.cri.address);
            daemon.metrics_address = metrics_address.unwrap_or(daemon.metrics_address);
            daemon.status_address = status_address.unwrap_or(daemon.status_address);
            if no_containerd {
                daemon.address = PathBuf::new();
            }
            daemon.check("the command line")?;
            *output = Some(log.init(&daemon.log_level, daemon.log_format));
            let runtime = runtime()?;
            // Caught from the start: a SIGTERM while starting is a restart once started,
            // never the default death half-way.
            let shutdown = runtime.block_on(async { Shutdown::catch() })?;
            runtime.block_on(daemon::serve(&daemon, shutdown.signalled()))?;
            Ok(())
        }
        Command::Mount { reference, mountpoint, cache, prefetch } => {
            let progress = output.insert(log.init(DEFAULT_LOG_LEVEL, LogFormat::Text));
            let (fetch, cache) = cache.open()?;
            let settings = Settings { registry: registry_settings, fetch, selection: Selection::all() };
            runtime()?.block_on(mount(&reference, &mountpoint, &settings, cache, prefetch, progress))
        }
        Command::Stop { config, root, timeout } => {
            let mut config = daemon_config(config.as_deref())?;
            if let Some(root) = root {
                config.root = root;
            }
            let wait = std::time::Duration::from_secs(timeout + config.shutdown_grace_secs);
            let done = runtime()?.block_on(modelpack_snapshotter::restart::handover::stop_for_good(
                &config.status_socket(),
                &config.root,
                &config.holder_socket(),
                wait,
            ))?;
            println!("{done}");
            Ok(())
        }
        Command::Status { address, config, json } => {
            let socket = match address {
                Some(socket) => socket,
                None => daemon_config(config.as_deref())?.status_socket(),
            };
            let body = runtime()?.block_on(daemon::http::get(&socket, "/status"))?;
            if json {
                println!("{}", String::from_utf8_lossy(&body).trim_end());
            } else {
                let status: daemon::status::Status = serde_json::from_slice(&body)
                    .with_context(|| format!("reading the status from {}", socket.display()))?;
                print!("{}", status.render());
            }
            Ok(())
        }
        Command::Hold { socket_fd: Some(fd), .. } => hold(fd),
        Command::Hold { socket: Some(socket), .. } => Ok(holder::run_at(&socket, Duration::from_secs(1))?),
        Command::Hold { .. } => unreachable!("clap requires --socket-fd or --socket"),
    }
}

/// Runs the fd holder on the listening socket inherited at descriptor `fd`.
fn hold(fd: RawFd) -> Result<()> {
    anyhow::ensure!(fd > 2, "--socket-fd {fd}: the holder's socket cannot be a standard stream");
    // SAFETY: F_GETFD only reads the flags of `fd`, if it is open.
    anyhow::ensure!(unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0, "--socket-fd {fd}: no such open descriptor");
    // SAFETY: `fd` is open, and was inherited for the holder alone: nothing else in this
    // process uses it.
    let listener = unsafe { OwnedFd::from_raw_fd(fd) };
    holder::run(listener)?;
    Ok(())
}

/// The daemon's configuration: `path`, else the default file if it exists, else the
/// defaults.
fn daemon_config(path: Option<&Path>) -> Result<DaemonConfig> {
    Ok(match path {
        Some(path) => DaemonConfig::load(path)?,
        None if Path::new(DEFAULT_CONFIG).exists() => DaemonConfig::load(Path::new(DEFAULT_CONFIG))?,
        None => DaemonConfig::default(),
    })
}

fn print_inspect(model: &Model) {
    println!("reference: {}", model.reference);
    println!("manifest:  {}", model.manifest_digest);
    match &model.lazy_index {
        Some(index) => println!("lazy index: {index} (every chunk is checked against it)"),
        None => println!(
            "lazy index: none (chunks of multi-chunk blobs are served before the whole blob is verified; \
             `modelpack-snapshotter convert` publishes one)"
        ),
    }
    println!("layers:");
    for layer in &model.artifact.layers {
        let path = layer.path.as_ref().map_or(String::from("-"), ToString::to_string);
        println!("  {:>14}  {}  {}  {}", layer.size, layer.media_type, layer.digest, path);
    }
    println!("files:");
    for node in model.tree.nodes() {
        let path = model.tree.path_of(node.ino);
        match &node.kind {
            NodeKind::File(_) => println!("  {:>14}  {:04o}  {}", node.size, node.mode, path),
            NodeKind::Symlink(target) => println!("  {:>14}  link  {} -> {}", "", path, target),
            NodeKind::Dir { .. } => {}
        }
    }
}

async fn mount(
    reference: &str,
    mountpoint: &Path,
    settings: &Settings,
    cache: Arc<ChunkCache>,
    prefetch: Option<PrefetchPolicy>,
    progress: &Progress,
) -> Result<()> {
    let started = Instant::now();
    let model = Arc::new(Model::open(reference, settings, cache).await?);
    let mounted = fs::mount(model.clone(), mountpoint, tokio::runtime::Handle::current())?;
    // Caught before `ready:` is printed: whoever stops us once it reads that line must
    // get the closing report, not a process killed mid-write.
    let shutdown = Shutdown::catch()?;
    println!(
        "ready: {} mounted at {} ({} files, {} bytes) in {} ms{}",
        reference,
        mountpoint.display(),
        model.tree.files().count(),
        model.tree.total_file_bytes(),
        started.elapsed().as_millis(),
        if model.offline { " [offline: registry unreachable, serving from cache]" } else { "" },
    );
    let policy = prefetch.unwrap_or(model.prefetch);
    let mut prefetch_bar = None;
    let prefetching = model.start_prefetch_reporting(policy, &tokio::runtime::Handle::current(), |bytes| {
        let bar = Arc::new(progress.bar(format!("prefetch ({policy})"), bytes));
        prefetch_bar = Some(bar.clone());
        move |piece| bar.inc(piece)
    });
    if let (Some(done), Some(bar)) = (prefetching, prefetch_bar.clone()) {
        let reference = model.reference.clone();
        tokio::spawn(async move {
            let outcome = done.await;
            bar.finish();
            if let Ok(Prefetched { policy, elapsed, result: Ok(()), .. }) = outcome {
                println!("prefetched: {reference} ({policy}) in {:.3} s", elapsed.as_secs_f64());
            }
        });
    }
    wait_for_shutdown(shutdown, mountpoint).await?;
    // A prefetch still running is stopped by the unmount: its bar goes first.
    if let Some(bar) = prefetch_bar {
        bar.finish();
    }
    mounted.unmount();
    // Chunks already fetched are worth keeping: let their cache writes finish.
    if tokio::time::timeout(SETTLE_TIMEOUT, model.store.settle()).await.is_err() {
        tracing::warn!("cache writes still pending at exit; those chunks will be fetched again");
    }
    let stats = model.store.stats();
    println!(
        "unmounted: fetched {} of {} bytes ({} chunks), {} verification failures, {} passthrough opens",
        stats.fetched_bytes.load(Ordering::Relaxed),
        model.tree.total_file_bytes(),
        stats.fetched_chunks.load(Ordering::Relaxed),
        stats.verify_failures.load(Ordering::Relaxed),
        stats.passthrough_opens.load(Ordering::Relaxed),
    );
    Ok(())
}

/// SIGTERM and SIGINT, caught from now on.
struct Shutdown {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Shutdown {
    fn catch() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
        })
    }

    /// Completes on SIGINT or SIGTERM.
    async fn signalled(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        tracing::info!("shutting down");
    }
}

/// Returns on SIGINT or SIGTERM, or when someone else unmounted us.
async fn wait_for_shutdown(Shutdown { mut term, mut int }: Shutdown, mountpoint: &Path) -> Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = tick.tick() => if !fs::is_mountpoint(mountpoint) {
                tracing::warn!(path = %mountpoint.display(), "mount went away");
                return Ok(());
            },
        }
    }
}
