//! Tunables of the data path and of the snapshotter's model mounts, with their
//! documented defaults, and the format logs are written in ([`LogFormat`]).
//!
//! Every size, timeout, retry count and concurrency limit lives here, so the rest of the
//! code never carries a literal for one. The CLI fills these from flags.
//!
//! [`PrefetchPolicy`] is also read from untrusted places (a companion's lazy index, a CSI
//! volume's attributes), so its parser is strict and bounded.

use std::fmt;
use std::str::FromStr;
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
    /// environment. A CSI volume's pull secret sets it for that volume's model alone, and
    /// a CRI pull's credentials for the model of that pull's image.
    pub credentials: Option<crate::registry::credentials::CredentialStore>,
    /// HTTP clients shared by the registries reached with these settings (and clones).
    pub clients: crate::registry::ClientPool,
    /// Where each registry's hosts (mirrors, CAs, headers) are configured: containerd's
    /// hosts directory, `/etc/containerd/certs.d` when it exists.
    pub hosts: crate::registry::hosts::HostsDir,
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
            hosts: crate::registry::hosts::HostsDir::system(),
        }
    }
}

/// How blobs are split, cached and fetched ahead.
#[derive(Debug, Clone)]
pub struct FetchSettings {
    /// Size of one cached chunk: the least a read that misses fetches, and the unit the
    /// cache stores, checks and keeps in memory. 1 MiB, the lazy index's piece size: a
    /// loader reading one tensor (or `mmap` reading around a fault) fetches at most a
    /// chunk more on each side of it, where 4 MiB chunks fetched 28 MiB for a 16 MiB
    /// tensor (`make bench`). Streams still fetch `stream_request_chunks` per request.
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
    /// this far behind, new fetches wait, so memory stays bounded. 24 MiB (one request
    /// in flight while part of the last is written) read as fast as 64 MiB did, at a
    /// peak RSS of ~90 MiB instead of ~160 MiB for an 8 GiB cold read.
    pub pending_store_chunks: u64,
    /// Parallel ranged requests of the background prefetch.
    pub prefetch_concurrency: usize,
    /// What of each model is fetched in the background once it is served, unless its
    /// companion or a CSI volume says otherwise. [`PrefetchPolicy::None`] by default: a
    /// node serving many models, or models read only in part (one shard, one tensor),
    /// would otherwise fetch and store every byte of each, which is what lazy serving
    /// spares it; a model that will be read whole asks for `all` through its companion
    /// (`convert --prefetch all`) or its volume.
    pub prefetch: PrefetchPolicy,
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

/// Largest chunk size [`FetchSettings::fit_cache`] takes from a cache directory.
const MAX_ADOPTED_CHUNK_SIZE: u64 = 64 << 20;

impl FetchSettings {
    /// Keeps the chunk size of a cache directory made with another one (by an earlier
    /// release, whose default was 4 MiB) when this chunk size is the default, instead of
    /// refusing the directory: the windows counted in chunks are scaled so that they
    /// keep their size in bytes. A chunk size set to something else is kept, and a
    /// directory bound to another one is refused when opened.
    pub fn fit_cache(&mut self, recorded: Option<u64>) {
        // A record out of any sane range is left for binding to refuse, naming the directory.
        let sane = 4096..=MAX_ADOPTED_CHUNK_SIZE;
        let Some(recorded) = recorded.filter(|r| sane.contains(r) && *r != self.chunk_size) else { return };
        if self.chunk_size != Self::default().chunk_size {
            return;
        }
        let bytes = |chunks: u64| chunks.saturating_mul(self.chunk_size);
        let chunks = |bytes: u64| bytes.div_ceil(recorded).max(1);
        self.readahead_chunks = if self.readahead_chunks == 0 { 0 } else { chunks(bytes(self.readahead_chunks)) };
        self.stream_request_chunks = chunks(bytes(self.stream_request_chunks));
        self.pending_store_chunks = chunks(bytes(self.pending_store_chunks));
        tracing::info!(chunk_size = recorded, "the cache directory keeps the chunk size it was made with");
        self.chunk_size = recorded;
    }
}

impl Default for FetchSettings {
    fn default() -> Self {
        Self {
            chunk_size: 1 << 20,
            readahead_chunks: 32,
            stream_request_chunks: 16,
            pending_store_chunks: 24,
            prefetch_concurrency: 4,
            prefetch: PrefetchPolicy::None,
            passthrough: true,
            cache_budget: None,
            max_unpacked_bytes: 256 << 30,
            require_lazy_index: false,
        }
    }
}

/// What of a model is fetched in the background once it is served, at a lower priority
/// than reads (on-demand reads always go first). Written `none`, `all` or `head:BYTES`,
/// where BYTES is a decimal integer, optionally followed (without a space) by `KiB`,
/// `MiB`, `GiB` or `TiB`; nothing else is accepted.
///
/// Policies are ordered by how much they fetch: `none` < `head:N` < `head:M` (N < M) <
/// `all`. Where several apply to one mounted model (two CSI volumes of one model), the
/// largest wins.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PrefetchPolicy {
    /// Nothing: bytes are fetched when read (and read ahead of sequential readers).
    #[default]
    None,
    /// The first this many bytes (never 0) of every file served: safetensors headers,
    /// configs and tokenizers, and the first tensors, without the bulk of the weights.
    Head(u64),
    /// Every blob of every file served, whole, so that each is verified and can be
    /// served by passthrough.
    All,
}

/// Why a prefetch policy was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("prefetch policy {value:?}: {reason}")]
pub struct PolicyError {
    /// The value as given (cut to [`PrefetchPolicy::MAX_LEN`] bytes).
    pub value: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Binary units a `head:` size may end with, largest first.
const SIZE_UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];

impl PrefetchPolicy {
    /// The longest text accepted: more than any valid policy needs.
    pub const MAX_LEN: usize = 32;
}

/// A grammar this small is parsed here rather than by a size-parsing crate: those also
/// take decimal units, fractions and spaces, more than a companion or a pod spec should
/// be able to write.
impl FromStr for PrefetchPolicy {
    type Err = PolicyError;

    fn from_str(value: &str) -> Result<Self, PolicyError> {
        let err = |reason| {
            let mut end = value.len().min(Self::MAX_LEN);
            while !value.is_char_boundary(end) {
                end -= 1;
            }
            PolicyError { value: value[..end].to_owned(), reason }
        };
        if value.len() > Self::MAX_LEN {
            return Err(err("longer than any policy"));
        }
        match value {
            "none" => return Ok(Self::None),
            "all" => return Ok(Self::All),
            _ => {}
        }
        let Some(size) = value.strip_prefix("head:") else {
            return Err(err("expected none, all or head:BYTES (e.g. head:64MiB)"));
        };
        let (digits, unit) = SIZE_UNITS
            .iter()
            .find_map(|(suffix, unit)| size.strip_suffix(suffix).map(|d| (d, *unit)))
            .unwrap_or((size, 1));
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err("the size must be a decimal integer, optionally followed by KiB, MiB, GiB or TiB"));
        }
        let bytes =
            digits.parse::<u64>().ok().and_then(|n| n.checked_mul(unit)).ok_or_else(|| err("the size is too large"))?;
        if bytes == 0 {
            return Err(err("head:0 fetches nothing; write none"));
        }
        Ok(Self::Head(bytes))
    }
}

impl fmt::Display for PrefetchPolicy {
    /// The form [`FromStr`] reads: `none`, `all`, or `head:` with the largest unit that
    /// divides the size.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::None => f.write_str("none"),
            Self::All => f.write_str("all"),
            Self::Head(bytes) => match SIZE_UNITS.iter().find(|(_, unit)| bytes % unit == 0) {
                Some((suffix, unit)) => write!(f, "head:{}{suffix}", bytes / unit),
                None => write!(f, "head:{bytes}"),
            },
        }
    }
}

impl serde::Serialize for PrefetchPolicy {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PrefetchPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// How log lines are written on standard error.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines, coloured only on a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log shippers: `timestamp`, `level`, `target`,
    /// `fields` (with `message`) and the spans the event happened in.
    Json,
}

/// Why a log format was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("log format {0:?}: expected text or json")]
pub struct LogFormatError(String);

impl FromStr for LogFormat {
    type Err = LogFormatError;

    fn from_str(value: &str) -> Result<Self, LogFormatError> {
        match value {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(LogFormatError(value.to_owned())),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_made_with_another_chunk_size_keeps_it_and_the_windows_keep_their_bytes() {
        let default = FetchSettings::default();
        let mut fitted = FetchSettings::default();
        fitted.fit_cache(Some(4 << 20));
        assert_eq!(fitted.chunk_size, 4 << 20);
        let bytes = |s: &FetchSettings, chunks: u64| chunks * s.chunk_size;
        assert_eq!(bytes(&fitted, fitted.readahead_chunks), bytes(&default, default.readahead_chunks));
        assert_eq!(bytes(&fitted, fitted.stream_request_chunks), bytes(&default, default.stream_request_chunks));
        assert_eq!(bytes(&fitted, fitted.pending_store_chunks), bytes(&default, default.pending_store_chunks));
        // Read-ahead off stays off; a chunk size someone chose stays; so does an unbound
        // cache's, or one bound to the same size.
        let mut off = FetchSettings { readahead_chunks: 0, ..FetchSettings::default() };
        off.fit_cache(Some(4 << 20));
        assert_eq!((off.chunk_size, off.readahead_chunks), (4 << 20, 0));
        let mut chosen = FetchSettings { chunk_size: 2 << 20, ..FetchSettings::default() };
        chosen.fit_cache(Some(4 << 20));
        assert_eq!(chosen.chunk_size, 2 << 20);
        for recorded in [None, Some(default.chunk_size), Some(10), Some(1 << 40)] {
            let mut same = FetchSettings::default();
            same.fit_cache(recorded);
            assert_eq!((same.chunk_size, same.readahead_chunks), (default.chunk_size, default.readahead_chunks));
        }
    }

    #[test]
    fn log_formats_parse() {
        assert_eq!("text".parse::<LogFormat>().unwrap(), LogFormat::Text);
        assert_eq!("json".parse::<LogFormat>().unwrap(), LogFormat::Json);
        let e = "JSON".parse::<LogFormat>().unwrap_err().to_string();
        assert!(e.contains("\"JSON\"") && e.contains("text or json"), "{e}");
    }

    #[test]
    fn prefetch_policies_parse_strictly_and_read_back() {
        for (text, policy) in [
            ("none", PrefetchPolicy::None),
            ("all", PrefetchPolicy::All),
            ("head:1", PrefetchPolicy::Head(1)),
            ("head:4096", PrefetchPolicy::Head(4 << 10)),
            ("head:64MiB", PrefetchPolicy::Head(64 << 20)),
            ("head:3KiB", PrefetchPolicy::Head(3 << 10)),
            ("head:2GiB", PrefetchPolicy::Head(2 << 30)),
            ("head:1TiB", PrefetchPolicy::Head(1 << 40)),
        ] {
            assert_eq!(text.parse::<PrefetchPolicy>().unwrap(), policy, "{text}");
            assert_eq!(policy.to_string().parse::<PrefetchPolicy>().unwrap(), policy);
        }
        assert_eq!(PrefetchPolicy::Head(4096).to_string(), "head:4KiB");
        assert_eq!(PrefetchPolicy::Head(1000).to_string(), "head:1000");
        for bad in [
            "",
            "None",
            "ALL",
            " all",
            "all ",
            "head",
            "head:",
            "head:0",
            "head:0MiB",
            "head:-1",
            "head:+1",
            "head:1.5MiB",
            "head:64 MiB",
            "head:64mib",
            "head:64MB",
            "head:64M",
            "head:0x10",
            "head:18446744073709551616",
            "head:17179869184GiB",
            "head:1MiBMiB",
            "tail:1",
            "first:1MiB",
            "head:１",
        ] {
            let e = bad.parse::<PrefetchPolicy>().unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        let long = "head:".to_owned() + &"9".repeat(1000);
        let e = long.parse::<PrefetchPolicy>().unwrap_err();
        assert!(e.value.len() <= PrefetchPolicy::MAX_LEN, "{e}");
        assert!("é".repeat(40).parse::<PrefetchPolicy>().is_err(), "cut on a character boundary");
    }

    #[test]
    fn the_larger_policy_is_the_one_that_fetches_more() {
        let mut policies =
            [PrefetchPolicy::All, PrefetchPolicy::Head(2), PrefetchPolicy::None, PrefetchPolicy::Head(1)];
        policies.sort();
        assert_eq!(
            policies,
            [PrefetchPolicy::None, PrefetchPolicy::Head(1), PrefetchPolicy::Head(2), PrefetchPolicy::All]
        );
        assert_eq!(PrefetchPolicy::default(), PrefetchPolicy::None);
    }

    #[test]
    fn prefetch_policies_are_strings_in_json() {
        let json = serde_json::to_string(&PrefetchPolicy::Head(64 << 20)).unwrap();
        assert_eq!(json, "\"head:64MiB\"");
        assert_eq!(serde_json::from_str::<PrefetchPolicy>(&json).unwrap(), PrefetchPolicy::Head(64 << 20));
        let e = serde_json::from_str::<PrefetchPolicy>("\"most\"").unwrap_err().to_string();
        assert!(e.contains("\"most\""), "{e}");
        assert!(serde_json::from_str::<PrefetchPolicy>("5").is_err());
    }
}
