//! The containers/storage *additional layer store* front-end (CRI-O, podman): which
//! companion layers the store holds, and the models behind them. [`crate::fs::store`]
//! is its FUSE adapter, laid out as containers/storage expects
//! (`<store>/<base64(image reference)>/<key>/{diff,info,blob}`); this module knows
//! nothing of FUSE.
//!
//! A lookup of `<reference>/<key>` resolves the reference's manifest (cached for
//! `resolve_ttl`) and answers only for the companion's index layer, keyed by its blob
//! digest (containers/storage < 1.54) or by the TOC digest its annotation declares
//! (>= 1.54). Before a layer is served, its blob is fetched whole and checked against
//! its digest, and its index JSON against the TOC digest; the model then opens from that
//! index, every chunk checked against it, through the same engine and cache as every
//! other front-end. Anything else — an ordinary image, a key the companion does not
//! have, a registry that is down — is not found, and containers/storage downloads the
//! layer itself.
//!
//! A model is opened once however many references and keys lead to it. Use counts
//! (`use` notices and releases) are recorded durably ([`records`]), so a restarted
//! daemon serves the layers containers/storage still links to, from the cache when the
//! registry is unreachable. A layer released by everyone is dropped, and its model with
//! its last layer.
//!
//! A model starts its background prefetch when it is opened (its companion's `prefetch`,
//! else the node's `cache.prefetch`); the model holds it, so it stops when the model's
//! last layer is dropped.

pub mod records;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::OnceCell;

use crate::cache::ChunkCache;
use crate::companion::{self, IndexLayer};
use crate::config::{LayerStoreSettings, Settings};
use crate::model::Model;
use crate::modelpack::labels::Pinned;
use crate::modelpack::Digest;
use crate::registry::{self, Registry};
use records::{Record, Records};

/// Why a layer is not served.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory name is not an image reference in standard base64.
    #[error("{name:?} is not a base64-encoded image reference")]
    BadReference { name: String },
    /// The layer name is not a digest.
    #[error("{key:?} is not a layer digest")]
    BadKey { key: String },
    /// The image is not a companion (an ordinary image: containers/storage pulls it).
    #[error("{reference} is not a companion image")]
    NotCompanion { reference: String },
    /// The companion has no layer with this key.
    #[error("{reference} has no index layer with digest or TOC digest {key}")]
    NoSuchLayer { reference: String, key: Digest },
    /// The companion's layer or its index is inconsistent or cannot be fetched.
    #[error("{reference}: {detail}")]
    Companion { reference: String, detail: String },
    /// The model could not be opened.
    #[error("{reference}: opening the model: {detail}")]
    Model { reference: String, detail: String },
    /// Resolving took longer than the lookup timeout.
    #[error("{reference}: no answer within {secs} s")]
    Timeout { reference: String, secs: u64 },
    /// The durable records failed.
    #[error(transparent)]
    Records(#[from] crate::metadata::records::RecordsError),
}

/// Where containers/storage looks a layer up: an image reference and a key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LayerPath {
    /// The image reference as containers/storage names it (`registry/repo:tag`, or
    /// `...@sha256:...`).
    pub reference: String,
    /// The layer's blob digest or TOC digest.
    pub key: Digest,
}

impl LayerPath {
    /// The path of directory `name` (standard padded base64 of a reference) and key
    /// `key`, if both are well formed. No I/O.
    pub fn parse(name: &str, key: &str) -> Result<Self, StoreError> {
        let reference = decode_reference(name)?;
        let key = key.parse::<Digest>().map_err(|_| StoreError::BadKey { key: key.to_owned() })?;
        Ok(Self { reference, key })
    }
}

/// The reference a store directory names: standard padded base64 of a reference the
/// registry client accepts.
pub fn decode_reference(name: &str) -> Result<String, StoreError> {
    use base64::Engine;
    let bad = || StoreError::BadReference { name: name.to_owned() };
    let bytes = base64::engine::general_purpose::STANDARD.decode(name).map_err(|_| bad())?;
    let reference = String::from_utf8(bytes).map_err(|_| bad())?;
    registry::parse_reference(&reference).map_err(|_| bad())?;
    Ok(reference)
}

/// The store directory name of `reference`.
pub fn encode_reference(reference: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(reference)
}

/// A layer the store serves.
#[derive(Debug)]
pub struct StoreLayer {
    /// Unique among the layers this process has served; the FUSE adapter gives each its
    /// own range of inodes by it.
    pub id: u32,
    /// Where it was looked up.
    pub path: LayerPath,
    /// The `info` file: containers/storage's `Layer` JSON.
    pub info: Bytes,
    /// The `blob` file: the index layer blob, as in the registry (checked).
    pub blob: Bytes,
    /// The model, shared by every layer of the same index.
    pub model: Arc<Model>,
    /// The index layer, as checked.
    index_layer: IndexLayer,
}

/// containers/storage's `Layer` as it reads it from `info` (field names are its JSON).
#[derive(Debug, Serialize)]
struct LayerInfo {
    #[serde(rename = "compressed-diff-digest")]
    compressed_diff_digest: String,
    #[serde(rename = "compressed-size")]
    compressed_size: u64,
    #[serde(rename = "diff-digest")]
    diff_digest: String,
    #[serde(rename = "diff-size")]
    diff_size: u64,
    #[serde(rename = "toc-digest", skip_serializing_if = "Option::is_none")]
    toc_digest: Option<String>,
    /// 0: uncompressed.
    compression: u8,
    uidset: [u32; 1],
    gidset: [u32; 1],
    flags: BTreeMap<&'static str, String>,
}

/// The `info` of an index layer: an uncompressed tar, so its blob digest is its diff ID,
/// and every file of the model it serves is owned by root.
fn layer_info(layer: &IndexLayer) -> Bytes {
    let digest = layer.digest.to_string();
    let info = LayerInfo {
        compressed_diff_digest: digest.clone(),
        compressed_size: layer.size,
        diff_digest: digest.clone(),
        diff_size: layer.size,
        toc_digest: layer.toc.map(|d| d.to_string()),
        compression: 0,
        uidset: [0],
        gidset: [0],
        flags: BTreeMap::from([("expected-layer-diffid", digest)]),
    };
    Bytes::from(serde_json::to_vec(&info).expect("layer info serializes"))
}

/// What a release did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// Still used this many times.
    Used(u64),
    /// Nobody uses the layer any more: it was dropped (with this id).
    Dropped(u32),
    /// The layer was not being served.
    Unknown,
}

/// A reference's companion index layer (or none), as resolved at a time.
type Resolution = Arc<OnceCell<Option<IndexLayer>>>;

/// The additional layer store.
#[derive(Debug)]
pub struct LayerStore {
    cache: Arc<ChunkCache>,
    settings: Settings,
    store: LayerStoreSettings,
    records: Records,
    /// Per reference: its companion index layer, resolved once per `resolve_ttl`.
    resolved: Mutex<HashMap<String, (Instant, Resolution)>>,
    /// Per path: the layer, resolved once (a failure leaves it unresolved).
    layers: Mutex<HashMap<LayerPath, Arc<OnceCell<Arc<StoreLayer>>>>>,
    /// Per index JSON digest: the model, opened once while any layer holds it.
    models: tokio::sync::Mutex<HashMap<Digest, Weak<Model>>>,
    next_id: AtomicU32,
}

impl LayerStore {
    /// Opens the store's records in `state` (a private directory).
    pub fn open(
        state: &Path,
        cache: Arc<ChunkCache>,
        settings: Settings,
        store: LayerStoreSettings,
    ) -> Result<Self, StoreError> {
        let records = Records::open(&state.join("layers.redb"))?;
        Ok(Self {
            cache,
            settings,
            store,
            records,
            resolved: Mutex::new(HashMap::new()),
            layers: Mutex::new(HashMap::new()),
            models: tokio::sync::Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
        })
    }

    /// Starts serving again, in the background, every layer recorded as used (after a
    /// restart), `restore_concurrency` at a time; lookups of one wait for it.
    pub fn restore(self: &Arc<Self>) -> Result<usize, StoreError> {
        let records = self.records.list()?;
        let slots = Arc::new(tokio::sync::Semaphore::new(self.store.restore_concurrency));
        for record in &records {
            let (this, slots) = (self.clone(), slots.clone());
            let path = record.path();
            tokio::spawn(async move {
                let _slot = slots.acquire().await.expect("restore slots are never closed");
                match this.layer(&path).await {
                    Ok(_) => tracing::info!(reference = %path.reference, key = %path.key, "layer served again"),
                    Err(e) => tracing::warn!(error = %e, "cannot serve a recorded layer yet; a lookup will try again"),
                }
            });
        }
        Ok(records.len())
    }

    /// The layer at `path`, resolved now if it is not yet: the companion's index layer
    /// fetched and checked, its model opened. One resolution runs per path; a failure
    /// is not remembered, so the next lookup tries again.
    pub async fn layer(&self, path: &LayerPath) -> Result<Arc<StoreLayer>, StoreError> {
        let cell = self.layers.lock().expect("layers lock").entry(path.clone()).or_default().clone();
        let timeout = self.store.lookup_timeout;
        let resolving = cell.get_or_try_init(|| self.resolve(path));
        let found = match tokio::time::timeout(timeout, resolving).await {
            Ok(layer) => layer.cloned(),
            Err(_) => Err(StoreError::Timeout { reference: path.reference.clone(), secs: timeout.as_secs() }),
        };
        if found.is_err() {
            // Every layer of every ordinary image is looked up once: keep nothing for it.
            let mut layers = self.layers.lock().expect("layers lock");
            if layers.get(path).is_some_and(|c| Arc::ptr_eq(c, &cell) && !c.initialized()) {
                layers.remove(path);
            }
        }
        found
    }

    /// The layer at `path` if it is served now (no I/O).
    pub fn served(&self, path: &LayerPath) -> Option<Arc<StoreLayer>> {
        self.layers.lock().expect("layers lock").get(path).and_then(|cell| cell.get().cloned())
    }

    /// Every layer served now.
    pub fn served_layers(&self) -> Vec<Arc<StoreLayer>> {
        let layers = self.layers.lock().expect("layers lock");
        let mut out: Vec<_> = layers.values().filter_map(|cell| cell.get().cloned()).collect();
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }

    /// The models behind the layers served now, each once however many layers share it.
    pub fn served_models(&self) -> Vec<Arc<Model>> {
        let mut models: Vec<Arc<Model>> = Vec::new();
        for layer in self.served_layers() {
            if !models.iter().any(|m| Arc::ptr_eq(m, &layer.model)) {
                models.push(layer.model.clone());
            }
        }
        models
    }

    /// Counts one more user of the served layer at `path` (containers/storage creates
    /// `<layer>/use`); returns the new count.
    pub fn use_layer(&self, path: &LayerPath) -> Result<u64, StoreError> {
        let Some(layer) = self.served(path) else {
            return Err(StoreError::NoSuchLayer { reference: path.reference.clone(), key: path.key });
        };
        let uses = self.records.count(path, || Record::new(path, &layer.index_layer), 1)?;
        tracing::debug!(reference = %path.reference, key = %path.key, uses, "layer used");
        Ok(uses)
    }

    /// Counts one user fewer of the layer at `path` (containers/storage removes
    /// `<layer>`); at zero the layer is dropped, and its model with its last layer.
    pub fn release(&self, path: &LayerPath) -> Result<Released, StoreError> {
        if self.records.get(path)?.is_none() {
            return Ok(Released::Unknown);
        }
        let uses = self.records.count(path, || unreachable!("the record exists"), -1)?;
        if uses > 0 {
            return Ok(Released::Used(uses));
        }
        let dropped = self.layers.lock().expect("layers lock").remove(path).and_then(|cell| cell.get().cloned());
        tracing::info!(reference = %path.reference, key = %path.key, "layer released by every user; dropped");
        Ok(dropped.map_or(Released::Unknown, |layer| Released::Dropped(layer.id)))
    }

    /// Resolves `path`: which index layer it names (from its record, else from the
    /// reference's manifest), that layer and its index checked, the model opened.
    async fn resolve(&self, path: &LayerPath) -> Result<Arc<StoreLayer>, StoreError> {
        let reference = &path.reference;
        let companion_err = |detail: String| StoreError::Companion { reference: reference.clone(), detail };
        let layer = match self.records.get(path)? {
            Some(record) => record.index_layer(),
            None => {
                let Some(layer) = self.index_layer(reference).await? else {
                    return Err(StoreError::NotCompanion { reference: reference.clone() });
                };
                if layer.digest != path.key && layer.toc != Some(path.key) {
                    return Err(StoreError::NoSuchLayer { reference: reference.clone(), key: path.key });
                }
                layer
            }
        };
        if layer.toc_conflict {
            return Err(companion_err("its index layer declares both an eStargz and a zstd:chunked TOC digest".into()));
        }
        let pinned = Pinned::parse(&layer.location).map_err(|e| companion_err(format!("index location: {e}")))?;
        if pinned.digest != layer.digest {
            return Err(companion_err(format!(
                "the index layer {} names another layer ({}) as its location",
                layer.digest, pinned.digest
            )));
        }
        let (index, blob) =
            companion::load_index_layer(&layer.location, &layer.digest, &self.cache, &self.settings.registry)
                .await
                .map_err(|e| companion_err(e.to_string()))?;
        if let Some(toc) = layer.toc {
            if index.digest != toc {
                return Err(companion_err(format!(
                    "the index layer declares TOC digest {toc}, but its index JSON has digest {}",
                    index.digest
                )));
            }
        }
        let model =
            self.model(index).await.map_err(|detail| StoreError::Model { reference: reference.clone(), detail })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        tracing::info!(reference = %reference, key = %path.key, source = %model.reference, id, "serving a companion layer");
        Ok(Arc::new(StoreLayer { id, path: path.clone(), info: layer_info(&layer), blob, model, index_layer: layer }))
    }

    /// The model of `index`: the one already open for it, else opened now.
    async fn model(&self, index: crate::modelpack::index::VerifiedIndex) -> Result<Arc<Model>, String> {
        let mut models = self.models.lock().await;
        models.retain(|_, model| model.strong_count() > 0);
        if let Some(model) = models.get(&index.digest).and_then(Weak::upgrade) {
            return Ok(model);
        }
        let digest = index.digest;
        let model =
            Arc::new(Model::open_indexed(index, &self.settings, self.cache.clone()).await.map_err(|e| e.to_string())?);
        models.insert(digest, Arc::downgrade(&model));
        tracing::info!(index = %digest, source = %model.reference, "opened a model for the layer store");
        model.start_prefetch(model.prefetch, &tokio::runtime::Handle::current());
        Ok(model)
    }

    /// The companion index layer `reference` resolves to now, or none for an image that
    /// is not a companion; remembered for `resolve_ttl`.
    async fn index_layer(&self, reference: &str) -> Result<Option<IndexLayer>, StoreError> {
        let cell = {
            let mut resolved = self.resolved.lock().expect("resolved lock");
            let ttl = self.store.resolve_ttl;
            resolved.retain(|_, (at, _)| at.elapsed() < ttl);
            resolved.entry(reference.to_owned()).or_insert_with(|| (Instant::now(), Resolution::default())).1.clone()
        };
        let found = cell
            .get_or_try_init(|| async {
                let err = |e: registry::RegistryError| StoreError::Companion {
                    reference: reference.to_owned(),
                    detail: e.to_string(),
                };
                let parsed = registry::parse_reference(reference).map_err(err)?;
                let registry = Registry::new(parsed, self.settings.registry.clone());
                let (manifest, _) = registry.fetch_manifest().await.map_err(err)?;
                companion::index_layer(&registry, &manifest).await.map_err(err)
            })
            .await?;
        Ok(found.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_names_are_padded_base64_of_references() {
        let name = encode_reference("127.0.0.1:5000/models/demo:v1-lazy");
        assert_eq!(decode_reference(&name).unwrap(), "127.0.0.1:5000/models/demo:v1-lazy");
        for bad in ["", "not base64!", &encode_reference("UPPER/case:x y"), &encode_reference("a\nb")] {
            assert!(matches!(decode_reference(bad), Err(StoreError::BadReference { .. })), "{bad}");
        }
        let key = Digest::of(b"index");
        let path = LayerPath::parse(&name, &key.to_string()).unwrap();
        assert_eq!(path.key, key);
        assert!(LayerPath::parse(&name, "use").is_err());
    }

    #[test]
    fn info_describes_an_uncompressed_layer_with_its_toc() {
        let digest = Digest::of(b"tar");
        let toc = Digest::of(b"json");
        let layer = IndexLayer { digest, size: 10240, location: String::new(), toc: Some(toc), toc_conflict: false };
        let info: serde_json::Value = serde_json::from_slice(&layer_info(&layer)).unwrap();
        assert_eq!(info["compressed-diff-digest"], digest.to_string());
        assert_eq!(info["diff-digest"], digest.to_string());
        assert_eq!(info["diff-size"], 10240);
        assert_eq!(info["toc-digest"], toc.to_string());
        assert_eq!(info["compression"], 0);
        assert_eq!(info["flags"]["expected-layer-diffid"], digest.to_string());
    }
}
