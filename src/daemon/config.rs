//! The `serve` configuration file (TOML): every key documented and defaulted, unknown
//! keys refused. `contrib/config.toml` is the annotated sample, parsed by a test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::registry::hosts::HostsDir;

use crate::config::{
    FetchSettings, LayerStoreSettings, LogFormat, ModelMountSettings, PrefetchPolicy, RegistrySettings, Settings,
};

/// Most threads `models.fuse_threads` may ask for.
const MAX_FUSE_THREADS: usize = 64;

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    /// The file is not valid TOML for this schema (unknown key, wrong type...).
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    /// A value is out of range.
    #[error("{path}: {key} {reason}")]
    Invalid { path: String, key: &'static str, reason: String },
}

/// The daemon's configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// State directory: snapshot metadata and directories, model mounts.
    pub root: PathBuf,
    /// Unix socket containerd connects to (`[proxy_plugins.modelpack] address`); empty
    /// serves no containerd socket (the layer store alone).
    pub address: PathBuf,
    /// The Unix socket `modelpack-snapshotter status` asks (`GET /status`), in a
    /// directory only root enters; empty means `<root>/status.sock`.
    pub status_address: PathBuf,
    /// Where Prometheus scrapes `GET /metrics` (`host:port`); empty serves no metrics.
    pub metrics_address: String,
    /// Log filter (`info`, `debug`, `modelpack_snapshotter=trace`, ...).
    pub log_level: String,
    /// How log lines are written: `text`, or `json` for log shippers.
    pub log_format: LogFormat,
    /// Seconds a stop waits for clients (containerd keeps its connection open) to finish
    /// their calls before it closes their connections and unmounts the models.
    pub shutdown_grace_secs: u64,
    /// The chunk cache of model bytes.
    pub cache: CacheConfig,
    /// How registries are reached.
    pub registry: RegistryConfig,
    /// How model snapshots are kept mounted.
    pub models: ModelsConfig,
    /// containers/storage's additional layer store (CRI-O, podman).
    pub layer_store: LayerStoreConfig,
    /// The CSI node plugin (kubelet).
    pub csi: CsiConfig,
    /// The CRI image service proxy (kubelet's pull secrets).
    pub cri: CriConfig,
    /// What a restart of the daemon keeps.
    pub restart: RestartConfig,
}

/// `[restart]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RestartConfig {
    /// Whether a restart (SIGTERM or a crash, then `serve` again) keeps the models'
    /// FUSE connections and the listening sockets, held by `<root>/holder.sock`'s
    /// process, for the next `serve` to take over (docs/restarts.md). Off, a stop
    /// unmounts everything and a start mounts it again.
    pub hand_over: bool,
}

impl Default for RestartConfig {
    fn default() -> Self {
        Self { hand_over: true }
    }
}

/// `[cri]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CriConfig {
    /// The Unix socket kubelet's `--image-service-endpoint` names; empty serves no proxy.
    pub address: PathBuf,
    /// containerd's socket, whose CRI image service the proxy forwards to.
    pub containerd_address: PathBuf,
    /// Seconds the credentials of a successful pull are remembered for its image.
    pub credential_ttl_secs: u64,
}

impl Default for CriConfig {
    fn default() -> Self {
        Self {
            address: PathBuf::new(),
            containerd_address: PathBuf::from("/run/containerd/containerd.sock"),
            credential_ttl_secs: 3600,
        }
    }
}

/// How the CRI proxy runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriProxySettings {
    /// containerd's socket.
    pub containerd_address: PathBuf,
    /// How long a successful pull's credentials are remembered.
    pub credential_ttl: Duration,
}

/// `[csi]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CsiConfig {
    /// The Unix socket kubelet (through node-driver-registrar) connects to; empty serves no
    /// CSI.
    pub address: PathBuf,
    /// The driver name pods ask for (`csi.driver`).
    pub driver_name: String,
    /// This node's id; empty means the host name.
    pub node_id: String,
}

impl Default for CsiConfig {
    fn default() -> Self {
        Self { address: PathBuf::new(), driver_name: "model.csi.modelpack.org".to_owned(), node_id: String::new() }
    }
}

/// The CSI node plugin's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsiIdentity {
    /// The driver name.
    pub driver_name: String,
    /// The node id.
    pub node_id: String,
}

/// `[layer_store]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LayerStoreConfig {
    /// Where the store is mounted (`storage.conf`: `additionallayerstores =
    /// ["<path>:ref"]`); empty serves no store.
    pub path: PathBuf,
    /// Seconds a reference's resolution (its companion layer, or that it has none) is
    /// reused.
    pub resolve_ttl_secs: u64,
    /// Seconds one lookup may take before it answers "not found".
    pub lookup_timeout_secs: u64,
}

impl Default for LayerStoreConfig {
    fn default() -> Self {
        let s = LayerStoreSettings::default();
        Self {
            path: PathBuf::new(),
            resolve_ttl_secs: s.resolve_ttl.as_secs(),
            lookup_timeout_secs: s.lookup_timeout.as_secs(),
        }
    }
}

/// `[cache]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Cache directory; empty means `<root>/cache`.
    pub dir: PathBuf,
    /// Most bytes of chunk data kept; 0 means unlimited.
    pub budget_bytes: u64,
    /// Bytes per chunk and per ranged request.
    pub chunk_size: u64,
    /// Chunks fetched ahead of a sequential reader.
    pub readahead_chunks: u64,
    /// Chunks fetched by one ranged request when reading ahead of a stream.
    pub stream_request_chunks: u64,
    /// Most chunks fetched but not yet written to the cache before fetches wait.
    pub pending_store_chunks: u64,
    /// Parallel requests of background prefetch.
    pub prefetch_concurrency: usize,
    /// What of each model is fetched in the background once it is served (`none`, `all`,
    /// `head:BYTES`), unless its companion or a CSI volume attribute says otherwise.
    pub prefetch: PrefetchPolicy,
    /// Let the kernel read verified raw-layer blobs from the cache (FUSE passthrough).
    pub passthrough: bool,
    /// Most bytes a compressed layer that does not declare its size may unpack to.
    pub max_unpacked_bytes: u64,
    /// Refuse plain ModelPack references without a lazy index among their referrers.
    pub require_lazy_index: bool,
}

/// `[registry]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Seconds allowed for one request.
    pub request_timeout_secs: u64,
    /// Seconds allowed to connect.
    pub connect_timeout_secs: u64,
    /// Retries of a failed request.
    pub retries: u32,
    /// containerd's hosts directory (`<dir>/<registry>/hosts.toml`), containerd's
    /// `config_path`; "" for none. Default: `/etc/containerd/certs.d` when it exists.
    pub config_path: Option<PathBuf>,
}

/// `[models]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// Models mounted at once in the background (after a restart, and retries).
    pub mount_concurrency: usize,
    /// Seconds a request about a model still being mounted after a restart waits.
    pub restore_wait_secs: u64,
    /// Seconds before the first retry of a model that could not be mounted.
    pub retry_initial_secs: u64,
    /// Most seconds between two retries.
    pub retry_max_secs: u64,
    /// Threads taking the kernel's requests for every model snapshot (one FUSE session).
    pub fuse_threads: usize,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        let m = ModelMountSettings::default();
        Self {
            mount_concurrency: m.concurrency,
            restore_wait_secs: m.restore_wait.as_secs(),
            retry_initial_secs: m.retry_initial.as_secs(),
            retry_max_secs: m.retry_max.as_secs(),
            fuse_threads: m.fuse_threads,
        }
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/var/lib/modelpack-snapshotter"),
            address: PathBuf::from("/run/modelpack-snapshotter/snapshotter.sock"),
            status_address: PathBuf::new(),
            metrics_address: String::new(),
            log_level: "info".to_owned(),
            log_format: LogFormat::Text,
            shutdown_grace_secs: 10,
            cache: CacheConfig::default(),
            registry: RegistryConfig::default(),
            models: ModelsConfig::default(),
            layer_store: LayerStoreConfig::default(),
            csi: CsiConfig::default(),
            cri: CriConfig::default(),
            restart: RestartConfig::default(),
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        let f = FetchSettings::default();
        Self {
            dir: PathBuf::new(),
            budget_bytes: 0,
            chunk_size: f.chunk_size,
            readahead_chunks: f.readahead_chunks,
            stream_request_chunks: f.stream_request_chunks,
            pending_store_chunks: f.pending_store_chunks,
            prefetch_concurrency: f.prefetch_concurrency,
            prefetch: f.prefetch,
            passthrough: f.passthrough,
            max_unpacked_bytes: f.max_unpacked_bytes,
            require_lazy_index: f.require_lazy_index,
        }
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        let r = RegistrySettings::default();
        Self {
            request_timeout_secs: r.request_timeout.as_secs(),
            connect_timeout_secs: r.connect_timeout.as_secs(),
            retries: r.retries,
            config_path: None,
        }
    }
}

impl DaemonConfig {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Self =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: origin.to_owned(), message: e.to_string() })?;
        config.check(origin)?;
        Ok(config)
    }

    /// Checks the values (again after command-line overrides); `origin` names them.
    pub fn check(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid =
            |key, reason: &str| ConfigError::Invalid { path: origin.to_owned(), key, reason: reason.to_owned() };
        if self.cache.chunk_size < 4096 {
            return Err(invalid("cache.chunk_size", "must be at least 4096"));
        }
        if self.cache.stream_request_chunks == 0 {
            return Err(invalid("cache.stream_request_chunks", "must be at least 1"));
        }
        if self.cache.prefetch_concurrency == 0 {
            return Err(invalid("cache.prefetch_concurrency", "must be at least 1"));
        }
        if self.registry.request_timeout_secs == 0 || self.registry.connect_timeout_secs == 0 {
            return Err(invalid("registry timeouts", "must be at least 1 second"));
        }
        if self.models.mount_concurrency == 0 {
            return Err(invalid("models.mount_concurrency", "must be at least 1"));
        }
        if !(1..=MAX_FUSE_THREADS).contains(&self.models.fuse_threads) {
            return Err(invalid("models.fuse_threads", &format!("must be between 1 and {MAX_FUSE_THREADS}")));
        }
        if self.models.retry_initial_secs == 0 {
            return Err(invalid("models.retry_initial_secs", "must be at least 1 second"));
        }
        if self.models.retry_max_secs < self.models.retry_initial_secs {
            return Err(invalid("models.retry_max_secs", "must be at least models.retry_initial_secs"));
        }
        if self.layer_store.lookup_timeout_secs == 0 {
            return Err(invalid("layer_store.lookup_timeout_secs", "must be at least 1 second"));
        }
        if !self.root.is_absolute() {
            return Err(invalid("root", "must be an absolute path"));
        }
        if !self.serves_containerd() && self.layer_store().is_none() && self.csi.address.as_os_str().is_empty() {
            return Err(invalid(
                "address",
                "is empty and neither layer_store.path nor csi.address is set: there is nothing to serve",
            ));
        }
        if !(self.csi.address.as_os_str().is_empty() || self.csi.address.is_absolute()) {
            return Err(invalid("csi.address", "must be an absolute path, or empty"));
        }
        if self.csi.driver_name.is_empty() {
            return Err(invalid("csi.driver_name", "must not be empty"));
        }
        if !(self.address.as_os_str().is_empty() || self.address.is_absolute()) {
            return Err(invalid("address", "must be an absolute path, or empty"));
        }
        if !(self.layer_store.path.as_os_str().is_empty() || self.layer_store.path.is_absolute()) {
            return Err(invalid("layer_store.path", "must be an absolute path, or empty"));
        }
        if !(self.status_address.as_os_str().is_empty() || self.status_address.is_absolute()) {
            return Err(invalid("status_address", "must be an absolute path, or empty"));
        }
        let status = self.status_socket();
        if status == self.address || status == self.csi.address || status == self.cri.address {
            return Err(invalid("status_address", &format!("{} is another socket of the daemon", status.display())));
        }
        if !self.metrics_address.is_empty() && self.metrics_address.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "metrics_address",
                &format!(
                    "{:?} is not an IP address and port (such as 127.0.0.1:9102), nor empty",
                    self.metrics_address
                ),
            ));
        }
        self.check_cri(origin)
    }

    /// Checks the `[cri]` values: the proxy serves the snapshotter's models, on a socket of
    /// its own.
    fn check_cri(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid =
            |key, reason: &str| ConfigError::Invalid { path: origin.to_owned(), key, reason: reason.to_owned() };
        if self.cri.address.as_os_str().is_empty() {
            return Ok(());
        }
        if !self.cri.address.is_absolute() {
            return Err(invalid("cri.address", "must be an absolute path, or empty"));
        }
        if !self.cri.containerd_address.is_absolute() {
            return Err(invalid("cri.containerd_address", "must be an absolute path"));
        }
        if !self.serves_containerd() {
            return Err(invalid("cri.address", "needs the containerd snapshotter, but address is empty"));
        }
        if self.cri.address == self.address || self.cri.address == self.csi.address {
            return Err(invalid("cri.address", "must not be the socket of another service"));
        }
        Ok(())
    }

    /// The status socket in effect.
    /// Where the process holding what a restart keeps listens.
    pub fn holder_socket(&self) -> PathBuf {
        self.root.join("holder.sock")
    }

    pub fn status_socket(&self) -> PathBuf {
        if self.status_address.as_os_str().is_empty() {
            self.root.join("status.sock")
        } else {
            self.status_address.clone()
        }
    }

    /// Where metrics are served, if they are (the address was checked by [`Self::check`]).
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.metrics_address.parse().ok()
    }

    /// Whether the containerd socket is served.
    pub fn serves_containerd(&self) -> bool {
        !self.address.as_os_str().is_empty()
    }

    /// Where the layer store is mounted and how it answers, if it is served.
    pub fn layer_store(&self) -> Option<(PathBuf, LayerStoreSettings)> {
        if self.layer_store.path.as_os_str().is_empty() {
            return None;
        }
        let settings = LayerStoreSettings {
            resolve_ttl: Duration::from_secs(self.layer_store.resolve_ttl_secs),
            lookup_timeout: Duration::from_secs(self.layer_store.lookup_timeout_secs),
            restore_concurrency: self.models.mount_concurrency,
        };
        Some((self.layer_store.path.clone(), settings))
    }

    /// The CSI socket and identity, if CSI is served.
    pub fn csi(&self) -> Option<(PathBuf, CsiIdentity)> {
        if self.csi.address.as_os_str().is_empty() {
            return None;
        }
        let node_id = if self.csi.node_id.is_empty() { host_name() } else { self.csi.node_id.clone() };
        Some((self.csi.address.clone(), CsiIdentity { driver_name: self.csi.driver_name.clone(), node_id }))
    }

    /// The CRI proxy's socket and settings, if it is served.
    pub fn cri(&self) -> Option<(PathBuf, CriProxySettings)> {
        if self.cri.address.as_os_str().is_empty() {
            return None;
        }
        let settings = CriProxySettings {
            containerd_address: self.cri.containerd_address.clone(),
            credential_ttl: Duration::from_secs(self.cri.credential_ttl_secs),
        };
        Some((self.cri.address.clone(), settings))
    }

    /// The cache directory in effect.
    pub fn cache_dir(&self) -> PathBuf {
        if self.cache.dir.as_os_str().is_empty() {
            self.root.join("cache")
        } else {
            self.cache.dir.clone()
        }
    }

    /// How model snapshots are kept mounted.
    pub fn model_mounts(&self) -> ModelMountSettings {
        ModelMountSettings {
            concurrency: self.models.mount_concurrency,
            restore_wait: Duration::from_secs(self.models.restore_wait_secs),
            retry_initial: Duration::from_secs(self.models.retry_initial_secs),
            retry_max: Duration::from_secs(self.models.retry_max_secs),
            fuse_threads: self.models.fuse_threads,
        }
    }

    /// The data-path settings.
    pub fn settings(&self) -> Settings {
        Settings {
            registry: RegistrySettings {
                request_timeout: Duration::from_secs(self.registry.request_timeout_secs),
                connect_timeout: Duration::from_secs(self.registry.connect_timeout_secs),
                retries: self.registry.retries,
                hosts: self.registry.config_path.as_deref().map_or_else(HostsDir::system, HostsDir::from_setting),
                ..RegistrySettings::default()
            },
            fetch: FetchSettings {
                chunk_size: self.cache.chunk_size,
                readahead_chunks: self.cache.readahead_chunks,
                stream_request_chunks: self.cache.stream_request_chunks,
                pending_store_chunks: self.cache.pending_store_chunks,
                prefetch_concurrency: self.cache.prefetch_concurrency,
                prefetch: self.cache.prefetch,
                passthrough: self.cache.passthrough,
                cache_budget: (self.cache.budget_bytes > 0).then_some(self.cache.budget_bytes),
                max_unpacked_bytes: self.cache.max_unpacked_bytes,
                require_lazy_index: self.cache.require_lazy_index,
            },
            selection: crate::modelpack::select::Selection::all(),
        }
    }
}

/// This machine's host name (the kernel's), or `localhost` if it has none.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|n| n.trim().to_owned())
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c = DaemonConfig::parse("", "t").unwrap();
        assert_eq!(c, DaemonConfig::default());
        let c = DaemonConfig::parse("root = \"/x\"\n[cache]\nchunk_size = 1048576\n", "t").unwrap();
        assert_eq!(c.root, PathBuf::from("/x"));
        assert_eq!(c.cache.chunk_size, 1 << 20);
        assert_eq!(c.cache_dir(), PathBuf::from("/x/cache"));
        assert_eq!(c.status_socket(), PathBuf::from("/x/status.sock"));
        assert_eq!(c.metrics_address(), None);
        let c = DaemonConfig::parse("log_format = \"json\"\n", "t").unwrap();
        assert_eq!(c.log_format, LogFormat::Json);
        let hosts = |text: &str| DaemonConfig::parse(text, "t").unwrap().settings().registry.hosts;
        assert_eq!(hosts("[registry]\nconfig_path = \"/etc/hosts.d\"\n"), HostsDir(Some("/etc/hosts.d".into())));
        assert_eq!(hosts("[registry]\nconfig_path = \"\"\n"), HostsDir(None));
        assert_eq!(hosts(""), HostsDir::system());
        let c = DaemonConfig::parse("metrics_address = \"127.0.0.1:9102\"\nstatus_address = \"/s/st.sock\"\n", "t")
            .unwrap();
        assert_eq!(c.metrics_address(), Some(SocketAddr::from(([127, 0, 0, 1], 9102))));
        assert_eq!(c.status_socket(), PathBuf::from("/s/st.sock"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let e = DaemonConfig::parse("roots = \"/x\"\n", "cfg.toml").unwrap_err().to_string();
        assert!(e.contains("cfg.toml") && e.contains("roots"), "{e}");
        let e = DaemonConfig::parse("[cache]\nchunk_size = 10\n", "cfg.toml").unwrap_err().to_string();
        assert!(e.contains("chunk_size"), "{e}");
        let e = DaemonConfig::parse("root = 5\n", "cfg.toml").unwrap_err().to_string();
        assert!(e.contains("root"), "{e}");
        let e = DaemonConfig::parse("[models]\nretry_max_secs = 1\nretry_initial_secs = 5\n", "cfg.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("retry_max_secs"), "{e}");
        let e = DaemonConfig::parse("[models]\nmount_concurrency = 0\n", "cfg.toml").unwrap_err().to_string();
        assert!(e.contains("mount_concurrency"), "{e}");
        let e = DaemonConfig::parse("address = \"\"\n", "cfg.toml").unwrap_err().to_string();
        assert!(e.contains("nothing to serve"), "{e}");
        let e = DaemonConfig::parse("[layer_store]\npath = \"store\"\n", "cfg.toml").unwrap_err().to_string();
        assert!(e.contains("layer_store.path"), "{e}");
        let e = DaemonConfig::parse("[cache]\nprefetch = \"head:64MB\"\n", "cfg.toml").unwrap_err().to_string();
        assert!(e.contains("cfg.toml") && e.contains("prefetch") && e.contains("\"head:64MB\""), "{e}");
        let e = DaemonConfig::parse("[cache]\nprefetch = 5\n", "cfg.toml").unwrap_err().to_string();
        assert!(e.contains("prefetch"), "{e}");
        let e = DaemonConfig::parse("log_format = \"xml\"\n", "cfg.toml").unwrap_err().to_string();
        assert!(e.contains("log_format") && e.contains("xml"), "{e}");
        let e = DaemonConfig::parse("metrics_address = \"localhost:9102\"\n", "cfg.toml").unwrap_err().to_string();
        assert!(e.contains("metrics_address") && e.contains("localhost:9102"), "{e}");
        let e = DaemonConfig::parse("status_address = \"status.sock\"\n", "cfg.toml").unwrap_err().to_string();
        assert!(e.contains("status_address"), "{e}");
        let e = DaemonConfig::parse("address = \"/r/s.sock\"\nstatus_address = \"/r/s.sock\"\n", "cfg.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("status_address") && e.contains("another socket"), "{e}");
    }

    #[test]
    fn the_sample_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/config.toml");
        let c = DaemonConfig::load(&path).unwrap();
        assert_eq!(c.settings().fetch.chunk_size, FetchSettings::default().chunk_size);
        assert_eq!(c.models, ModelsConfig::default(), "the sample shows the defaults");
        assert_eq!(c.settings().fetch.max_unpacked_bytes, FetchSettings::default().max_unpacked_bytes);
        assert_eq!(c.cache, CacheConfig::default(), "the sample shows the defaults");
        let c = DaemonConfig::parse("[cache]\nrequire_lazy_index = true\n", "t").unwrap();
        assert!(c.settings().fetch.require_lazy_index);
        assert_eq!(c.settings().fetch.prefetch, PrefetchPolicy::None, "lazy unless configured");
        for (text, policy) in [("all", PrefetchPolicy::All), ("head:64MiB", PrefetchPolicy::Head(64 << 20))] {
            let c = DaemonConfig::parse(&format!("[cache]\nprefetch = \"{text}\"\n"), "t").unwrap();
            assert_eq!(c.settings().fetch.prefetch, policy);
        }
        assert_eq!(c.layer_store, LayerStoreConfig::default(), "the sample shows the defaults");
        assert_eq!(c.csi, CsiConfig::default(), "the sample shows the defaults");
        assert_eq!(c.cri, CriConfig::default(), "the sample shows the defaults");
    }

    #[test]
    fn the_cri_proxy() {
        assert!(DaemonConfig::default().cri().is_none());
        let c = DaemonConfig::parse("[cri]\naddress = \"/run/m/cri.sock\"\ncredential_ttl_secs = 60\n", "t").unwrap();
        let (address, settings) = c.cri().unwrap();
        assert_eq!(address, PathBuf::from("/run/m/cri.sock"));
        assert_eq!(settings.containerd_address, PathBuf::from("/run/containerd/containerd.sock"));
        assert_eq!(settings.credential_ttl, Duration::from_secs(60));
        for (text, key) in [
            ("[cri]\naddress = \"cri.sock\"\n", "cri.address"),
            ("[cri]\naddress = \"/run/m/cri.sock\"\ncontainerd_address = \"c.sock\"\n", "cri.containerd_address"),
            (
                "address = \"\"\n[csi]\naddress = \"/c/csi.sock\"\n[cri]\naddress = \"/run/m/cri.sock\"\n",
                "needs the containerd",
            ),
            ("[cri]\naddress = \"/run/modelpack-snapshotter/snapshotter.sock\"\n", "another service"),
        ] {
            let e = DaemonConfig::parse(text, "cfg.toml").unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
        let d = DaemonConfig::default();
        assert_eq!((&c.status_address, &c.metrics_address), (&d.status_address, &d.metrics_address));
    }

    #[test]
    fn the_layer_store_alone() {
        let c = DaemonConfig::parse("address = \"\"\n[layer_store]\npath = \"/var/lib/s/store\"\n", "t").unwrap();
        assert!(!c.serves_containerd());
        let (path, settings) = c.layer_store().unwrap();
        assert_eq!(path, PathBuf::from("/var/lib/s/store"));
        assert_eq!(settings.lookup_timeout, LayerStoreSettings::default().lookup_timeout);
        assert!(DaemonConfig::default().layer_store().is_none());
    }
}
