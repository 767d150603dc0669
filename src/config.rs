//! Tunables of the data path and of the snapshotter's model mounts, with their
//! documented defaults.
//!
//! Every size, timeout, retry count and concurrency limit lives here, so the rest of the
//! code never carries a literal for one. The CLI fills these from flags.

use std::time::Duration;

/// How the registry is reached.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    /// Time allowed to establish a connection.
    pub connect_timeout: Duration,
    /// Time allowed for one request, from send to the last body byte.
    pub request_timeout: Duration,
    /// How many times a failed request is tried again (resets, timeouts, 5xx, short or
    /// corrupt bodies) before the read fails.
    pub retries: u32,
    /// Delay before the first retry; it doubles with every further retry.
    pub backoff: Duration,
    /// Where credentials come from; `None`: Docker's configuration of this process's
    /// environment. A CSI volume's pull secret sets it for that volume's model alone.
    pub credentials: Option<crate::registry::credentials::CredentialStore>,
    /// HTTP clients shared by the registries reached with these settings (and clones).
    pub clients: crate::registry::ClientPool,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            retries: 3,
            backoff: Duration::from_millis(100),
            credentials: None,
            clients: crate::registry::ClientPool::default(),
        }
    }
}

/// How blobs are split, cached and fetched ahead.
#[derive(Debug, Clone)]
pub struct FetchSettings {
    /// Size of one cached chunk and of one ranged request. 4 MiB: a loopback registry
    /// costs ~4 ms per request, so smaller ranges waste most of the link on overhead,
    /// while larger ones make a random small read fetch more than it needs.
    pub chunk_size: u64,
    /// Chunks fetched ahead of a reader that reads sequentially: two requests' worth,
    /// so that one is always in flight while the reader consumes the other.
    pub readahead_chunks: u64,
    /// Chunks fetched by one ranged request when reading ahead of a stream or
    /// prefetching. A loopback registry spends ~2.5 ms of CPU per request whatever its
    /// size: with 16 MiB requests it used half the CPU per GiB that it used with 4 MiB
    /// ones (`make bench`), while random reads still fetch one chunk.
    pub stream_request_chunks: u64,
    /// Most chunks fetched but not yet written to the cache. Readers get a chunk as soon
    /// as it is fetched and checked, and the cache write follows; when the disk falls
    /// this far behind, new fetches wait, so memory stays bounded. Six (one request of
    /// four in flight while the last is written) read as fast as sixteen did, at a peak
    /// RSS of ~90 MiB instead of ~160 MiB for an 8 GiB cold read.
    pub pending_store_chunks: u64,
    /// Parallel ranged requests of the background prefetch.
    pub prefetch_concurrency: usize,
    /// Let the kernel read a fully fetched and verified raw-layer blob straight from its
    /// cache file (FUSE passthrough, Linux ≥ 6.9) instead of through this process.
    pub passthrough: bool,
    /// Most bytes of chunk data the cache keeps; `None` is unlimited.
    pub cache_budget: Option<u64>,
    /// Most bytes a compressed (`tar+gzip`, `tar+zstd`) layer may unpack to when its file
    /// metadata does not declare the size of the one file it holds (a layer that does is
    /// held to that size plus room for tar headers, and never to more than this). A
    /// decompression bomb stops here instead of filling the cache's disk. 256 GiB is
    /// above any single model layer seen, a whole directory of shards included.
    pub max_unpacked_bytes: u64,
    /// Refuse to open a plain ModelPack reference that has no lazy index among its
    /// manifest's referrers (made by `convert`): without one, chunks of a blob larger
    /// than one chunk are served before the whole blob is verified. Off by default, so
    /// that artifacts nobody converted keep working.
    pub require_lazy_index: bool,
}

impl Default for FetchSettings {
    fn default() -> Self {
        Self {
            chunk_size: 4 << 20,
            readahead_chunks: 8,
            stream_request_chunks: 4,
            pending_store_chunks: 6,
            prefetch_concurrency: 4,
            passthrough: true,
            cache_budget: None,
            max_unpacked_bytes: 256 << 30,
            require_lazy_index: false,
        }
    }
}

/// Everything the data path needs.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Registry access.
    pub registry: RegistrySettings,
    /// Chunking, caching and read-ahead.
    pub fetch: FetchSettings,
    /// Which files of the model are served (a CSI volume's exclusions); all by default.
    pub selection: crate::modelpack::select::Selection,
}

/// How the snapshotter keeps its model snapshots mounted.
#[derive(Debug, Clone)]
pub struct ModelMountSettings {
    /// Models mounted at once in the background (after a restart, and retries). Each
    /// mount may wait on its registry for a whole request timeout; eight keep a few
    /// unreachable registries from holding up the rest without opening hundreds of
    /// connections at start on a node with many models.
    pub concurrency: usize,
    /// How long a request about a model still being mounted after a restart waits for
    /// it before answering `Unavailable`. A model whose index and blobs are cached mounts
    /// in milliseconds; ten seconds cover a registry round trip or two without stalling
    /// containerd behind an unreachable one.
    pub restore_wait: Duration,
    /// Delay before the first retry of a model that could not be mounted; it doubles
    /// with every further retry.
    pub retry_initial: Duration,
    /// Most delay between two retries: a registry back after an outage is noticed
    /// within five minutes.
    pub retry_max: Duration,
    /// Threads taking the kernel's requests for every model snapshot together: they are
    /// served in one FUSE session, whatever their number. Reads are handed to the async
    /// runtime, so a thread only dispatches; two keep one slow request (an `open` that
    /// sets up passthrough) from holding up every model's lookups.
    pub fuse_threads: usize,
}

/// How the containers/storage additional layer store answers lookups.
#[derive(Debug, Clone)]
pub struct LayerStoreSettings {
    /// How long a reference's resolution (its companion index layer, or that it is not a
    /// companion) is reused: containers/storage looks every layer of an image up in turn,
    /// and an ordinary image should cost one manifest request per pull, not one per layer.
    pub resolve_ttl: Duration,
    /// Most time one lookup may take before it answers "not found" (containers/storage
    /// then downloads the layer itself): a registry that does not answer holds up a pull
    /// this long, and no longer.
    pub lookup_timeout: Duration,
    /// Layers served again at once in the background after a restart (`[models]
    /// mount_concurrency`, shared with the snapshotter's models).
    pub restore_concurrency: usize,
}

impl Default for LayerStoreSettings {
    fn default() -> Self {
        Self {
            resolve_ttl: Duration::from_secs(60),
            lookup_timeout: Duration::from_secs(30),
            restore_concurrency: ModelMountSettings::default().concurrency,
        }
    }
}

impl Default for ModelMountSettings {
    fn default() -> Self {
        Self {
            concurrency: 8,
            restore_wait: Duration::from_secs(10),
            retry_initial: Duration::from_secs(2),
            retry_max: Duration::from_secs(300),
            fuse_threads: 2,
        }
    }
}
