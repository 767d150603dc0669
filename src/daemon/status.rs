//! What `modelpack-snapshotter status` shows, gathered when asked: every model the
//! front-ends serve and how much of each the cache holds, the rate at which the daemon
//! fetches from registries, and the cache's use against its budget. The same front-end
//! listing and cache counters feed the metrics read at scrape time ([`Node::gauges`]).
//!
//! The fetch rate is over the last [`RATE_WINDOW`] (the daemon samples its byte count
//! every [`SAMPLE_EVERY`]) and, beside it, since the daemon started.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cache::ChunkCache;
use crate::csi::CsiNode;
use crate::layerstore::LayerStore;
use crate::metrics::{self, Frontend, NodeGauges};
use crate::model::Model;
use crate::snapshotter::remote::RemoteSnapshotter;

/// How often the daemon samples the bytes it has fetched.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// The span of the recent fetch rate: long enough to smooth over one slow request, short
/// enough to show a read that just started or stopped.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

/// The front-ends the daemon serves.
#[derive(Debug, Default)]
pub struct Frontends {
    /// containerd's snapshotter.
    pub snapshotter: Option<Arc<RemoteSnapshotter>>,
    /// The CSI node plugin.
    pub csi: Option<Arc<CsiNode>>,
    /// containers/storage's additional layer store.
    pub layer_store: Option<Arc<LayerStore>>,
}

impl Frontends {
    /// Every model served now, with the front-end serving it.
    pub fn models(&self) -> Vec<(Frontend, Arc<Model>)> {
        let tagged = |frontend, models: Vec<Arc<Model>>| models.into_iter().map(move |m| (frontend, m));
        let mut out = Vec::new();
        if let Some(s) = &self.snapshotter {
            out.extend(tagged(Frontend::Containerd, s.mounted_models()));
        }
        if let Some(csi) = &self.csi {
            out.extend(tagged(Frontend::Csi, csi.mounted_models()));
        }
        if let Some(store) = &self.layer_store {
            out.extend(tagged(Frontend::LayerStore, store.served_models()));
        }
        out
    }
}

/// The daemon as `status` and the metrics see it.
#[derive(Debug)]
pub struct Node {
    started: Instant,
    /// Bytes the process had fetched when the daemon started.
    start_bytes: u64,
    cache: Arc<ChunkCache>,
    frontends: Frontends,
    /// (when, bytes fetched by then), oldest first, spanning about [`RATE_WINDOW`].
    samples: Mutex<VecDeque<(Instant, u64)>>,
}

impl Node {
    /// The daemon serving `frontends` over `cache`, starting now.
    pub fn new(cache: Arc<ChunkCache>, frontends: Frontends) -> Self {
        let (started, start_bytes) = (Instant::now(), metrics::recorded().fetched_bytes());
        let samples = Mutex::new(VecDeque::from([(started, start_bytes)]));
        Self { started, start_bytes, cache, frontends, samples }
    }

    /// Records the bytes fetched so far (every [`SAMPLE_EVERY`]).
    pub fn sample(&self) {
        let now = Instant::now();
        let mut samples = self.samples.lock().expect("samples lock");
        samples.push_back((now, metrics::recorded().fetched_bytes()));
        while samples.front().is_some_and(|(at, _)| now.duration_since(*at) > RATE_WINDOW) {
            samples.pop_front();
        }
    }

    /// What the metrics read at scrape time.
    pub fn gauges(&self) -> NodeGauges {
        let mut models: Vec<(Frontend, u64)> = Vec::new();
        for (frontend, _) in self.frontends.models() {
            match models.iter_mut().find(|(f, _)| *f == frontend) {
                Some((_, n)) => *n += 1,
                None => models.push((frontend, 1)),
            }
        }
        NodeGauges { cache: self.cache.stats(), budget: self.cache.budget(), models }
    }

    /// The status now. Looks up every chunk of every model served in the cache (see
    /// [`Model::cache_share`]): run it off the async workers.
    pub fn status(&self) -> Status {
        let models = self
            .frontends
            .models()
            .into_iter()
            .map(|(frontend, model)| {
                let share = model.cache_share();
                ModelStatus {
                    reference: model.reference.clone(),
                    frontend,
                    manifest: model.manifest_digest.to_string(),
                    lazy_index: model.lazy_index.map(|d| d.to_string()),
                    files: model.tree.files().count(),
                    bytes: share.bytes,
                    cached_bytes: share.cached,
                }
            })
            .collect();
        let stats = self.cache.stats();
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            models,
            fetch: self.fetch_rate(),
            cache: CacheStatus {
                dir: self.cache.dir().display().to_string(),
                used_bytes: stats.used_bytes,
                budget_bytes: self.cache.budget(),
                chunks: stats.chunks,
            },
        }
    }

    fn fetch_rate(&self) -> FetchStatus {
        let (now, bytes) = (Instant::now(), metrics::recorded().fetched_bytes());
        let (since, then) = {
            let samples = self.samples.lock().expect("samples lock");
            let recent = samples.iter().find(|(at, _)| now.duration_since(*at) <= RATE_WINDOW);
            recent.copied().unwrap_or((now, bytes))
        };
        let rate = |fetched: u64, since: Instant| {
            let secs = now.duration_since(since).as_secs_f64();
            if secs > 0.0 {
                fetched as f64 / secs
            } else {
                0.0
            }
        };
        FetchStatus {
            bytes: bytes.saturating_sub(self.start_bytes),
            recent_bytes_per_sec: rate(bytes.saturating_sub(then), since),
            recent_secs: now.duration_since(since).as_secs_f64(),
            average_bytes_per_sec: rate(bytes.saturating_sub(self.start_bytes), self.started),
        }
    }
}

/// `GET /status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The daemon's version.
    pub version: String,
    /// Seconds since the daemon started.
    pub uptime_secs: f64,
    /// Every model served.
    pub models: Vec<ModelStatus>,
    /// What the daemon fetched from registries.
    pub fetch: FetchStatus,
    /// The chunk cache.
    pub cache: CacheStatus,
}

/// One model served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelStatus {
    /// Its reference (for a companion, the source artifact it describes).
    pub reference: String,
    /// The front-end serving it.
    pub frontend: Frontend,
    /// Its manifest digest.
    pub manifest: String,
    /// The lazy index every chunk is checked against, if it has one.
    pub lazy_index: Option<String>,
    /// Files served.
    pub files: usize,
    /// Bytes of the blobs its files are served from.
    pub bytes: u64,
    /// How many of them are cached.
    pub cached_bytes: u64,
}

/// Bytes fetched from registries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FetchStatus {
    /// Since the daemon started (every model, every registry).
    pub bytes: u64,
    /// Over the last `recent_secs` seconds (at most [`RATE_WINDOW`]).
    pub recent_bytes_per_sec: f64,
    /// The span of `recent_bytes_per_sec`.
    pub recent_secs: f64,
    /// Since the daemon started.
    pub average_bytes_per_sec: f64,
}

/// The chunk cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheStatus {
    /// Its directory.
    pub dir: String,
    /// Bytes of chunk data (and unpacked layers) held.
    pub used_bytes: u64,
    /// The most it keeps; none when unlimited.
    pub budget_bytes: Option<u64>,
    /// Chunks held.
    pub chunks: u64,
}

impl Status {
    /// The status as `modelpack-snapshotter status` prints it.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "models: {}", self.models.len());
        for m in &self.models {
            let _ = writeln!(
                out,
                "  {}  ({}, {} files)  {} of {} cached",
                m.reference,
                m.frontend.describe(),
                m.files,
                percent(m.cached_bytes, m.bytes),
                size(m.bytes as f64),
            );
        }
        let _ = writeln!(
            out,
            "fetch rate: {}/s over the last {:.0} s; {}/s since start ({} fetched in {})",
            size(self.fetch.recent_bytes_per_sec),
            self.fetch.recent_secs,
            size(self.fetch.average_bytes_per_sec),
            size(self.fetch.bytes as f64),
            duration(self.uptime_secs),
        );
        let budget = match self.cache.budget_bytes {
            Some(budget) => format!("{} budget ({})", size(budget as f64), percent(self.cache.used_bytes, budget)),
            None => "no budget (unlimited)".to_owned(),
        };
        let _ = writeln!(out, "cache: {} used of {budget}, in {}", size(self.cache.used_bytes as f64), self.cache.dir);
        out
    }
}

/// `part` of `whole` as a whole percentage, rounded down so that 100% means all of it.
fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "100%".to_owned();
    }
    format!("{}%", (u128::from(part.min(whole)) * 100 / u128::from(whole)))
}

/// Bytes in binary units with one decimal ("1.0 GiB"), whole bytes below 1 KiB.
fn size(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024.0 {
        return format!("{bytes:.0} B");
    }
    let mut value = bytes / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Seconds as the largest two units ("3 h 12 min", "42 s").
fn duration(secs: f64) -> String {
    let secs = secs as u64;
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min {} s", secs / 60, secs % 60),
        3600..86400 => format!("{} h {} min", secs / 3600, secs % 3600 / 60),
        _ => format!("{} d {} h", secs / 86400, secs % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(budget: Option<u64>) -> Status {
        Status {
            version: "0.1.0".into(),
            uptime_secs: 125.0,
            models: vec![ModelStatus {
                reference: "127.0.0.1:5000/models/demo:v1".into(),
                frontend: Frontend::Csi,
                manifest: "sha256:aa".into(),
                lazy_index: None,
                files: 6,
                bytes: 1 << 30,
                cached_bytes: 784 << 20,
            }],
            fetch: FetchStatus {
                bytes: 784 << 20,
                recent_bytes_per_sec: 12.5 * 1024.0 * 1024.0,
                recent_secs: 10.0,
                average_bytes_per_sec: 6.3 * 1024.0 * 1024.0,
            },
            cache: CacheStatus {
                dir: "/var/lib/m/cache".into(),
                used_bytes: 800 << 20,
                budget_bytes: budget,
                chunks: 800,
            },
        }
    }

    #[test]
    fn renders_models_rate_and_cache() {
        let text = status(Some(4 << 30)).render();
        assert!(text.contains("127.0.0.1:5000/models/demo:v1  (CSI volume, 6 files)  76% of 1.0 GiB cached"), "{text}");
        assert!(text.contains("fetch rate: 12.5 MiB/s over the last 10 s; 6.3 MiB/s since start"), "{text}");
        assert!(text.contains("(784.0 MiB fetched in 2 min 5 s)"), "{text}");
        assert!(text.contains("cache: 800.0 MiB used of 4.0 GiB budget (19%), in /var/lib/m/cache"), "{text}");
        assert!(status(None).render().contains("no budget (unlimited)"));
    }

    #[test]
    fn the_json_round_trips_with_snake_case_front_ends() {
        let s = status(None);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["models"][0]["frontend"], "csi");
        assert_eq!(json["cache"]["budget_bytes"], serde_json::Value::Null);
        assert_eq!(serde_json::from_value::<Status>(json).unwrap(), s);
    }

    #[test]
    fn units() {
        assert_eq!(size(0.0), "0 B");
        assert_eq!(size(1023.0), "1023 B");
        assert_eq!(size(1536.0), "1.5 KiB");
        assert_eq!(size((3u64 << 40) as f64), "3.0 TiB");
        assert_eq!(percent(1, 3), "33%");
        assert_eq!(percent(999, 1000), "99%");
        assert_eq!(percent(5, 5), "100%");
        assert_eq!(percent(0, 0), "100%");
        assert_eq!(duration(59.9), "59 s");
        assert_eq!(duration(7322.0), "2 h 2 min");
    }
}
