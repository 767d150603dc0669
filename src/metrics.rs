//! Observability, declared in one place: every metric the process records, its name,
//! help, unit and bounded label set, and the Prometheus text exposition `serve
//! --metrics-address` answers with (`prometheus-client`).
//!
//! What the data path records (registry requests, chunk reads, prefetch, passthrough
//! opens, FUSE reads) lives in one process-wide [`Metrics`]: the recording sites sit deep
//! in code that `mount` and every front-end of `serve` share, and a handle threaded
//! through each of them would buy nothing a process-wide counter does not. Recording is
//! an atomic add, or a short uncontended lock for a histogram; nothing is held across
//! I/O, and the FUSE read path uses only families resolved when the process started, so
//! a read allocates nothing here. What other parts already keep (the cache's use,
//! budget, evictions and verification failures; the models each front-end serves) is
//! read when scraped, by [`NodeCollector`], not counted twice.
//!
//! Labels are bounded: `registry` is a registry host the node was configured or asked to
//! read from, `kind` one of [`FailureKind`], `source` one of [`ChunkSource`] and
//! `frontend` one of [`Frontend`].

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::cache::CacheStats;

/// What every metric name starts with (`modelpack_...`).
pub const PREFIX: &str = "modelpack";

/// The `Content-Type` of [`encode`]'s output: Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Upper bounds of the registry request latency buckets: 1 ms doubling to about a minute
/// (the default request timeout), since a ranged request costs a few milliseconds on
/// loopback and seconds for many megabytes over a slow link.
fn request_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 17)
}

/// Upper bounds of the FUSE read latency buckets: 10 µs (a read answered from memory)
/// by fourfold steps to about 40 s (a read that waits for retries of a fetch).
fn fuse_read_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_01, 4.0, 12)
}

/// Why a registry request (one attempt of it) failed: the `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// No answer, or not all of it, within the request timeout.
    Timeout,
    /// The request could not be sent: connection refused or reset, name resolution, TLS.
    Connect,
    /// The registry answered 5xx.
    Status5xx,
    /// The registry answered a 4xx other than 401, 403 and 404 (408 and 429 among them).
    Status4xx,
    /// The body broke off or ended before the bytes asked for.
    ShortBody,
    /// The body held more bytes than asked for.
    LongBody,
    /// The registry refused the credentials (401, 403).
    Denied,
    /// The registry has no such manifest or blob (404).
    NotFound,
    /// Content did not match its digest.
    Digest,
    /// Anything else (a malformed answer, a local error).
    Other,
}

impl FailureKind {
    /// Every kind, in label order.
    pub const ALL: [Self; 10] = [
        Self::Timeout,
        Self::Connect,
        Self::Status5xx,
        Self::Status4xx,
        Self::ShortBody,
        Self::LongBody,
        Self::Denied,
        Self::NotFound,
        Self::Digest,
        Self::Other,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Connect => "connect",
            Self::Status5xx => "status_5xx",
            Self::Status4xx => "status_4xx",
            Self::ShortBody => "short_body",
            Self::LongBody => "long_body",
            Self::Denied => "denied",
            Self::NotFound => "not_found",
            Self::Digest => "digest",
            Self::Other => "other",
        }
    }
}

impl EncodeLabelValue for FailureKind {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(self.as_str())
    }
}

/// Where the bytes of one chunk a read touched came from: the `source` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChunkSource {
    /// Read from the chunk cache's files.
    Cache,
    /// Held in memory, fetched moments before for this reader (read-ahead).
    Memory,
    /// Waited for: fetched from the registry (or joined a fetch in flight) for this read.
    Fetch,
}

impl ChunkSource {
    /// Every source, in label order.
    pub const ALL: [Self; 3] = [Self::Cache, Self::Memory, Self::Fetch];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cache => "cache",
            Self::Memory => "memory",
            Self::Fetch => "fetch",
        }
    }
}

impl EncodeLabelValue for ChunkSource {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(self.as_str())
    }
}

/// The front-end a model is served through: the `frontend` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Frontend {
    /// A containerd model snapshot (the snapshotter).
    Containerd,
    /// A CSI volume (kubelet).
    Csi,
    /// containers/storage's additional layer store (CRI-O, podman).
    LayerStore,
}

impl Frontend {
    /// Every front-end, in label order.
    pub const ALL: [Self; 3] = [Self::Containerd, Self::Csi, Self::LayerStore];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Containerd => "containerd",
            Self::Csi => "csi",
            Self::LayerStore => "layer_store",
        }
    }

    /// How a person would say a model is served so.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Containerd => "containerd snapshot",
            Self::Csi => "CSI volume",
            Self::LayerStore => "layer store",
        }
    }
}

impl EncodeLabelValue for Frontend {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RegistryLabels {
    registry: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FailureLabels {
    registry: String,
    kind: FailureKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SourceLabels {
    source: ChunkSource,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FrontendLabels {
    frontend: Frontend,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// What the data path records. The process has one ([`recorded`]); tests make their own.
#[derive(Debug)]
pub struct Metrics {
    registry_bytes: Family<RegistryLabels, Counter>,
    registry_requests: Family<RegistryLabels, Counter>,
    registry_latency: HistogramFamily<RegistryLabels>,
    registry_retries: Family<FailureLabels, Counter>,
    registry_errors: Family<FailureLabels, Counter>,
    chunk_reads: Family<SourceLabels, Counter>,
    /// `chunk_reads` per [`ChunkSource::ALL`], resolved once: the read path never looks
    /// a label up.
    chunk_reads_by_source: [Counter; 3],
    chunks_fetched: Counter,
    prefetch_bytes: Counter,
    passthrough_opens: Counter,
    fuse_reads: Histogram,
    /// Every byte of every registry, for `status`'s fetch rate.
    fetched_bytes: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        let chunk_reads = Family::<SourceLabels, Counter>::default();
        let chunk_reads_by_source =
            ChunkSource::ALL.map(|source| chunk_reads.get_or_create_owned(&SourceLabels { source }));
        Self {
            registry_bytes: Family::default(),
            registry_requests: Family::default(),
            registry_latency: Family::new_with_constructor(|| Histogram::new(request_buckets())),
            registry_retries: Family::default(),
            registry_errors: Family::default(),
            chunk_reads,
            chunk_reads_by_source,
            chunks_fetched: Counter::default(),
            prefetch_bytes: Counter::default(),
            passthrough_opens: Counter::default(),
            fuse_reads: Histogram::new(fuse_read_buckets()),
            fetched_bytes: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Adds every metric to `registry` (whose prefix names them).
    fn register(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "registry_fetched",
            "Bytes received from registries by ranged blob reads",
            Unit::Bytes,
            self.registry_bytes.clone(),
        );
        registry.register(
            "registry_requests",
            "Ranged blob reads that delivered their bytes, retries included in one",
            self.registry_requests.clone(),
        );
        registry.register_with_unit(
            "registry_request_duration",
            "Time of one ranged blob read, from the first attempt to the last byte",
            Unit::Seconds,
            self.registry_latency.clone(),
        );
        registry.register(
            "registry_retries",
            "Registry request attempts that failed and were tried again, by why they failed",
            self.registry_retries.clone(),
        );
        registry.register(
            "registry_errors",
            "Registry requests that failed for good (retries exhausted, or not worth retrying), by why",
            self.registry_errors.clone(),
        );
        registry.register(
            "chunk_reads",
            "Chunks (or parts of one) that reads of model files touched, by where their bytes came from",
            self.chunk_reads.clone(),
        );
        registry.register(
            "chunks_fetched",
            "Chunks fetched from registries and checked (read-ahead and prefetch included)",
            self.chunks_fetched.clone(),
        );
        registry.register_with_unit(
            "prefetch",
            "Bytes fetched by background prefetch",
            Unit::Bytes,
            self.prefetch_bytes.clone(),
        );
        registry.register(
            "passthrough_opens",
            "Files opened for the kernel to read straight from the cache (FUSE passthrough)",
            self.passthrough_opens.clone(),
        );
        registry.register_with_unit(
            "fuse_read_duration",
            "Time from a FUSE read request to its reply (passthrough reads never reach the daemon)",
            Unit::Seconds,
            self.fuse_reads.clone(),
        );
    }

    /// See [`registry_request`].
    pub fn registry_request(&self, registry: &str, bytes: u64, elapsed: Duration) {
        let labels = RegistryLabels { registry: registry.to_owned() };
        self.registry_bytes.get_or_create(&labels).inc_by(bytes);
        self.registry_requests.get_or_create(&labels).inc();
        self.registry_latency.get_or_create(&labels).observe(elapsed.as_secs_f64());
        self.fetched_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// See [`registry_retry`].
    pub fn registry_retry(&self, registry: &str, kind: FailureKind) {
        self.registry_retries.get_or_create(&FailureLabels { registry: registry.to_owned(), kind }).inc();
    }

    /// See [`registry_error`].
    pub fn registry_error(&self, registry: &str, kind: FailureKind) {
        self.registry_errors.get_or_create(&FailureLabels { registry: registry.to_owned(), kind }).inc();
    }

    /// See [`chunk_reads`].
    pub fn chunk_reads(&self, source: ChunkSource, chunks: usize) {
        let index = ChunkSource::ALL.iter().position(|s| *s == source).expect("every source is listed");
        self.chunk_reads_by_source[index].inc_by(chunks as u64);
    }

    /// See [`chunks_fetched`].
    pub fn chunks_fetched(&self, chunks: u64) {
        self.chunks_fetched.inc_by(chunks);
    }

    /// See [`prefetched`].
    pub fn prefetched(&self, bytes: u64) {
        self.prefetch_bytes.inc_by(bytes);
    }

    /// See [`passthrough_open`].
    pub fn passthrough_open(&self) {
        self.passthrough_opens.inc();
    }

    /// See [`fuse_read`].
    pub fn fuse_read(&'static self) -> ReadTimer {
        ReadTimer { histogram: &self.fuse_reads, started: Instant::now() }
    }

    /// Bytes received from every registry so far.
    pub fn fetched_bytes(&self) -> u64 {
        self.fetched_bytes.load(Ordering::Relaxed)
    }
}

/// The process's metrics.
pub fn recorded() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);
    &METRICS
}

/// A ranged read of `bytes` from `registry` (its host) delivered, `elapsed` after its
/// first attempt started.
pub fn registry_request(registry: &str, bytes: u64, elapsed: Duration) {
    recorded().registry_request(registry, bytes, elapsed);
}

/// An attempt of a request to `registry` failed for `kind` and is tried again.
pub fn registry_retry(registry: &str, kind: FailureKind) {
    recorded().registry_retry(registry, kind);
}

/// A request to `registry` failed for good, the last attempt for `kind`.
pub fn registry_error(registry: &str, kind: FailureKind) {
    recorded().registry_error(registry, kind);
}

/// A read touched `chunks` chunks whose bytes came from `source`.
pub fn chunk_reads(source: ChunkSource, chunks: usize) {
    recorded().chunk_reads(source, chunks);
}

/// `chunks` chunks were fetched and passed their checks.
pub fn chunks_fetched(chunks: u64) {
    recorded().chunks_fetched(chunks);
}

/// Background prefetch fetched `bytes`.
pub fn prefetched(bytes: u64) {
    recorded().prefetched(bytes);
}

/// A file was opened for passthrough reads.
pub fn passthrough_open() {
    recorded().passthrough_open();
}

/// Times a FUSE read: its latency is recorded when the returned guard is dropped, after
/// the reply (keep it alive until then, across any task the read moves to).
pub fn fuse_read() -> ReadTimer {
    recorded().fuse_read()
}

/// Records a FUSE read's latency when dropped.
#[derive(Debug)]
#[must_use = "the read is timed until the guard is dropped"]
pub struct ReadTimer {
    histogram: &'static Histogram,
    started: Instant,
}

impl Drop for ReadTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

/// What the daemon knows at scrape time that is kept elsewhere: the cache's counters and
/// limits, and how many models each front-end serves.
#[derive(Debug, Clone, Default)]
pub struct NodeGauges {
    /// The chunk cache's counters.
    pub cache: CacheStats,
    /// The cache budget; None when unlimited.
    pub budget: Option<u64>,
    /// Models served now, per front-end (a front-end not listed serves none).
    pub models: Vec<(Frontend, u64)>,
}

/// Reads [`NodeGauges`] at every scrape.
pub struct NodeCollector {
    read: Box<dyn Fn() -> NodeGauges + Send + Sync>,
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCollector").finish_non_exhaustive()
    }
}

impl NodeCollector {
    /// A collector calling `read` at every scrape.
    pub fn new(read: impl Fn() -> NodeGauges + Send + Sync + 'static) -> Self {
        Self { read: Box::new(read) }
    }
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let now = (self.read)();
        let gauge = |encoder: &mut DescriptorEncoder<'_>, name, help, value: u64| {
            let metric = ConstGauge::new(value as i64);
            metric.encode(encoder.encode_descriptor(name, help, Some(&Unit::Bytes), metric.metric_type())?)
        };
        let counter = |encoder: &mut DescriptorEncoder<'_>, name, help, value: u64| {
            let metric = ConstCounter::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
        };
        gauge(
            &mut encoder,
            "cache_used",
            "Bytes of chunk data (and unpacked layers) in the cache.",
            now.cache.used_bytes,
        )?;
        gauge(
            &mut encoder,
            "cache_budget",
            "Most bytes the cache keeps before it evicts (0: unlimited).",
            now.budget.unwrap_or(0),
        )?;
        counter(
            &mut encoder,
            "cache_evictions",
            "Chunks evicted from the cache to stay within its budget.",
            now.cache.evictions,
        )?;
        counter(
            &mut encoder,
            "verification_failures",
            "Chunks or blobs whose bytes did not match their digests (never served).",
            now.cache.verify_failures,
        )?;
        let mut models = encoder.encode_descriptor(
            "models_mounted",
            "Models served now, by front-end.",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for frontend in Frontend::ALL {
            let count = now.models.iter().filter(|(f, _)| *f == frontend).map(|(_, n)| n).sum::<u64>();
            ConstGauge::new(count as i64).encode(models.encode_family(&FrontendLabels { frontend })?)?;
        }
        Ok(())
    }
}

/// The registry the daemon exposes: `metrics`, and what `node` reads at scrape time.
pub fn exposition(metrics: &Metrics, node: NodeCollector) -> Registry {
    let mut registry = Registry::with_prefix(PREFIX);
    metrics.register(&mut registry);
    registry.register_collector(Box::new(node));
    registry
}

/// `registry` in Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, registry).expect("writing to a String never fails");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample lines of `text` (no comments).
    fn samples(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    fn node() -> NodeCollector {
        NodeCollector::new(|| NodeGauges {
            cache: CacheStats { used_bytes: 3 << 20, evictions: 2, verify_failures: 1, ..CacheStats::default() },
            budget: Some(8 << 20),
            models: vec![(Frontend::Csi, 1), (Frontend::Csi, 1), (Frontend::Containerd, 3)],
        })
    }

    #[test]
    fn registry_requests_are_counted_and_timed_by_registry() {
        let metrics = Metrics::default();
        metrics.registry_request("127.0.0.1:5000", 1 << 20, Duration::from_millis(3));
        metrics.registry_request("127.0.0.1:5000", 1 << 20, Duration::from_millis(30));
        metrics.registry_request("mirror.example:443", 100, Duration::from_millis(1));
        metrics.registry_retry("127.0.0.1:5000", FailureKind::Status5xx);
        metrics.registry_error("127.0.0.1:5000", FailureKind::Timeout);
        let text = encode(&exposition(&metrics, node()));
        let lines = samples(&text);
        for want in [
            r#"modelpack_registry_fetched_bytes_total{registry="127.0.0.1:5000"} 2097152"#,
            r#"modelpack_registry_fetched_bytes_total{registry="mirror.example:443"} 100"#,
            r#"modelpack_registry_requests_total{registry="127.0.0.1:5000"} 2"#,
            r#"modelpack_registry_request_duration_seconds_count{registry="127.0.0.1:5000"} 2"#,
            r#"modelpack_registry_request_duration_seconds_bucket{registry="127.0.0.1:5000",le="0.004"} 1"#,
            r#"modelpack_registry_request_duration_seconds_bucket{registry="127.0.0.1:5000",le="+Inf"} 2"#,
            r#"modelpack_registry_retries_total{registry="127.0.0.1:5000",kind="status_5xx"} 1"#,
            r#"modelpack_registry_errors_total{registry="127.0.0.1:5000",kind="timeout"} 1"#,
        ] {
            assert!(lines.contains(&want), "{want} missing from:\n{text}");
        }
        assert!(text.contains("# TYPE modelpack_registry_request_duration_seconds histogram"), "{text}");
        assert!(text.contains("# TYPE modelpack_registry_fetched_bytes_total counter"), "{text}");
        assert_eq!(metrics.fetched_bytes(), (2 << 20) + 100);
    }

    #[test]
    fn chunk_reads_prefetch_and_passthrough() {
        let metrics = Metrics::default();
        metrics.chunk_reads(ChunkSource::Cache, 3);
        metrics.chunk_reads(ChunkSource::Fetch, 1);
        metrics.chunks_fetched(16);
        metrics.prefetched(4096);
        metrics.passthrough_open();
        let text = encode(&exposition(&metrics, node()));
        let lines = samples(&text);
        for want in [
            r#"modelpack_chunk_reads_total{source="cache"} 3"#,
            r#"modelpack_chunk_reads_total{source="memory"} 0"#,
            r#"modelpack_chunk_reads_total{source="fetch"} 1"#,
            "modelpack_chunks_fetched_total 16",
            "modelpack_prefetch_bytes_total 4096",
            "modelpack_passthrough_opens_total 1",
            "modelpack_fuse_read_duration_seconds_count 0",
        ] {
            assert!(lines.contains(&want), "{want} missing from:\n{text}");
        }
    }

    #[test]
    fn what_the_node_keeps_is_read_at_scrape_time() {
        let text = encode(&exposition(&Metrics::default(), node()));
        let lines = samples(&text);
        for want in [
            "modelpack_cache_used_bytes 3145728",
            "modelpack_cache_budget_bytes 8388608",
            "modelpack_cache_evictions_total 2",
            "modelpack_verification_failures_total 1",
            r#"modelpack_models_mounted{frontend="containerd"} 3"#,
            r#"modelpack_models_mounted{frontend="csi"} 2"#,
            r#"modelpack_models_mounted{frontend="layer_store"} 0"#,
        ] {
            assert!(lines.contains(&want), "{want} missing from:\n{text}");
        }
        assert!(text.contains("# TYPE modelpack_models_mounted gauge"), "{text}");
    }

    #[test]
    fn a_fuse_read_is_timed_when_its_guard_drops() {
        let metrics: &'static Metrics = Box::leak(Box::default());
        drop(metrics.fuse_read());
        let text = encode(&exposition(metrics, node()));
        assert!(samples(&text).contains(&"modelpack_fuse_read_duration_seconds_count 1"), "{text}");
        assert!(samples(&text).contains(&r#"modelpack_fuse_read_duration_seconds_bucket{le="+Inf"} 1"#), "{text}");
    }

    #[test]
    fn the_dashboard_names_only_metrics_that_exist() {
        // A labelled family is exposed once it has a sample.
        let metrics = Metrics::default();
        metrics.registry_request("r", 1, Duration::ZERO);
        metrics.registry_retry("r", FailureKind::Other);
        metrics.registry_error("r", FailureKind::Other);
        let text = encode(&exposition(&metrics, node()));
        let mut exposed = std::collections::HashSet::new();
        for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let (name, kind) = line.split_once(' ').unwrap();
            exposed.insert(name.to_owned());
            if kind == "histogram" {
                exposed.extend(["_bucket", "_count", "_sum"].map(|suffix| format!("{name}{suffix}")));
            }
        }
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/grafana/modelpack-dashboard.json");
        let dashboard = std::fs::read_to_string(&path).unwrap();
        serde_json::from_str::<serde_json::Value>(&dashboard).expect("the dashboard is JSON");
        let used: Vec<&str> = regex::Regex::new(r"modelpack_[a-z0-9_]+")
            .unwrap()
            .find_iter(&dashboard)
            .map(|m| m.as_str())
            .filter(|name| *name != "modelpack_snapshotter")
            .collect();
        assert!(used.len() > 10, "{used:?}");
        for name in used {
            assert!(exposed.contains(name), "the dashboard uses {name}, which is not exposed: {exposed:?}");
        }
    }

    #[test]
    fn label_values_are_snake_case_and_distinct() {
        let kinds: std::collections::HashSet<_> = FailureKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(kinds.len(), FailureKind::ALL.len());
        for value in kinds.iter().chain(ChunkSource::ALL.map(|s| s.as_str()).iter()) {
            assert!(value.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'), "{value}");
        }
    }
}
