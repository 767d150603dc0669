//! Remote model snapshots: the layer over [`Snapshotter`] that serves a ModelPack model
//! through containerd without downloading it.
//!
//! A `Prepare` carrying `containerd.io/snapshot.ref` and the companion layer's
//! `containerd.io/snapshot/modelpack.*` labels (bound to each other: the chain ID must be
//! the index layer's digest, see [`super::labels`]) fetches and verifies the lazy index,
//! mounts the whole model (FUSE, through the same engine as `mount`) at the `fs`
//! directory of a new committed snapshot named by the chain ID, and answers
//! `AlreadyExists`: containerd then finds the chain ID committed and skips download and
//! unpack. Children (container rootfs, image volumes) are ordinary overlay snapshots
//! whose lowerdir is the model mount. Every other request goes to the overlay
//! snapshotter. Model snapshots are recorded with their source and index, so a restart
//! mounts them again (from the cache when the registry is unreachable).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;

use super::grpc::Service;
use super::labels::{model_labels, ModelLabels};
use super::{Mount, SnapshotError, Snapshotter};
use crate::cache::ChunkCache;
use crate::companion;
use crate::config::Settings;
use crate::fs::{self, Mounted};
use crate::metadata::{Kind, SnapshotRecord, Usage};
use crate::model::Model;
use crate::modelpack::index::{LazyIndex, VerifiedIndex, INDEX_PATH, MAX_INDEX_BYTES};
use crate::modelpack::labels::{self as keys, Pinned};
use crate::modelpack::Digest;

/// What a model snapshot's record remembers, to mount it again after a restart.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RemoteRecord {
    /// The ModelPack artifact, pinned.
    source: String,
    /// The digest of the lazy index JSON, kept in the cache.
    index: String,
    /// The lazy index layer, pinned, to fetch the index again if the cache lost it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    layer: Option<String>,
}

/// The snapshotter containerd talks to: overlay snapshots plus lazily mounted models.
#[derive(Debug)]
pub struct RemoteSnapshotter {
    base: Snapshotter,
    cache: Arc<ChunkCache>,
    settings: Settings,
    runtime: Handle,
    mounted: Mutex<HashMap<String, Mounted>>,
    /// Model prepares run one at a time: a second `Prepare` of one chain ID must find it
    /// committed and mounted, not half made.
    prepare_lock: Mutex<()>,
}

impl RemoteSnapshotter {
    /// Wraps `base`; models are cached in `cache` and read on `runtime`.
    pub fn new(base: Snapshotter, cache: Arc<ChunkCache>, settings: Settings, runtime: Handle) -> Self {
        Self { base, cache, settings, runtime, mounted: Mutex::new(HashMap::new()), prepare_lock: Mutex::new(()) }
    }

    /// Mounts every recorded model snapshot again (after a restart), replacing mounts a
    /// crashed process left behind. A model that cannot be mounted is logged and left
    /// unmounted; containerd's other snapshots keep working.
    pub fn restore(&self) -> Result<(), SnapshotError> {
        for record in self.base.metadata().list()? {
            let Some(remote) = &record.remote else { continue };
            let remote: RemoteRecord = match serde_json::from_str(remote) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(snapshot = %record.key, error = %e, "unreadable model record; not mounting it");
                    continue;
                }
            };
            let dir = self.base.fs_dir(record.id);
            if fs::is_mountpoint(&dir) {
                if let Err(e) = fs::detach(&dir) {
                    tracing::warn!(path = %dir.display(), error = %e, "cannot detach a stale model mount");
                }
            }
            match self.mount_model(&record, &remote) {
                Ok(mounted) => {
                    tracing::info!(snapshot = %record.key, source = %remote.source, "model mounted again");
                    self.mounted.lock().expect("mounted lock").insert(record.key.clone(), mounted);
                }
                Err(e) => tracing::error!(snapshot = %record.key, error = %e, "cannot mount model again"),
            }
        }
        Ok(())
    }

    /// Unmounts every model (at shutdown).
    pub fn unmount_all(&self) {
        for (name, mounted) in self.mounted.lock().expect("mounted lock").drain() {
            tracing::info!(snapshot = %name, "unmounting model");
            mounted.unmount();
        }
    }

    fn prepare_model(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        model: ModelLabels,
    ) -> Result<Vec<Mount>, SnapshotError> {
        let name = model.chain_id.clone();
        if !parent.is_empty() {
            return Err(SnapshotError::InvalidArgument(format!(
                "model snapshot {name}: a companion layer has no parent, but parent {parent:?} was given"
            )));
        }
        let _serial = self.prepare_lock.lock().expect("prepare lock");
        if let Some(existing) = self.base.metadata().get(&name)? {
            if existing.kind == Kind::Committed {
                return Err(SnapshotError::RemoteReady { key: key.to_owned(), name });
            }
        }
        let (index, json_digest) = self.load_index(&model.index)?;
        if index.manifest_digest != model.source.digest {
            return Err(SnapshotError::InvalidArgument(format!(
                "model snapshot {name}: label {:?} names {}, but its lazy index describes {}",
                keys::SOURCE,
                model.source.reference,
                index.manifest_digest
            )));
        }
        let remote = RemoteRecord {
            source: model.source.reference.clone(),
            index: json_digest.to_string(),
            layer: Some(model.index.reference.clone()),
        };
        let usage = Usage { size: 0, inodes: index.index.files.len() as i64 };
        let record = self.base.metadata().create_committed(
            &name,
            None,
            labels,
            Some(serde_json::to_string(&remote).expect("record serializes")),
            usage,
        )?;
        let dir = self.base.fs_dir(record.id);
        let mounted = std::fs::create_dir_all(&dir)
            .map_err(|e| SnapshotError::Io { op: "creating", path: dir.display().to_string(), source: e })
            .and_then(|()| self.mount_indexed(&record, index));
        match mounted {
            Ok(mounted) => {
                tracing::info!(snapshot = %name, source = %remote.source, path = %dir.display(), "model mounted");
                self.mounted.lock().expect("mounted lock").insert(name.clone(), mounted);
                Err(SnapshotError::RemoteReady { key: key.to_owned(), name })
            }
            Err(e) => {
                // No record without its mount: containerd must not find a committed, empty model.
                if let Err(undo) = self.base.remove(&name) {
                    tracing::error!(snapshot = %name, error = %undo, "cannot undo a failed model snapshot");
                }
                Err(e)
            }
        }
    }

    fn mount_model(&self, record: &SnapshotRecord, remote: &RemoteRecord) -> Result<Mounted, SnapshotError> {
        let bad = |detail: String| SnapshotError::Remote { name: record.key.clone(), detail };
        let json_digest: Digest =
            remote.index.parse().map_err(|e: crate::modelpack::digest::DigestError| bad(e.to_string()))?;
        let index = match companion::cached_index(&self.cache, &json_digest).map_err(bad)? {
            Some(index) => index,
            None => {
                let layer =
                    remote.layer.as_deref().ok_or_else(|| bad("the lazy index is no longer cached".to_owned()))?;
                let pinned = super::labels::pinned(keys::INDEX, layer)?;
                self.load_index(&pinned)?.0
            }
        };
        self.mount_indexed(record, index)
    }

    fn mount_indexed(&self, record: &SnapshotRecord, index: VerifiedIndex) -> Result<Mounted, SnapshotError> {
        let name = record.key.clone();
        let model = self
            .runtime
            .block_on(Model::open_indexed(index, &self.settings, self.cache.clone()))
            .map_err(|source| SnapshotError::Model { name: name.clone(), source: Box::new(source) })?;
        let dir = self.base.fs_dir(record.id);
        fs::mount(Arc::new(model), &dir, self.runtime.clone())
            .map_err(|e| SnapshotError::Remote { name, detail: e.to_string() })
    }

    /// The verified lazy index in the layer `at`, and the digest of its JSON.
    fn load_index(&self, at: &Pinned) -> Result<(VerifiedIndex, Digest), SnapshotError> {
        self.runtime
            .block_on(companion::load_index(&at.reference, &at.digest, &self.cache, &self.settings.registry))
            .map_err(|e| SnapshotError::Remote { name: at.reference.clone(), detail: e.to_string() })
    }

    /// If the active snapshot `key` holds nothing but a lazy index (a companion layer
    /// that containerd unpacked itself, as `ctr images pull` does), mounts the model over
    /// it and commits it as a model snapshot. Returns false when it is not a companion.
    fn commit_companion(&self, name: &str, key: &str, given: &BTreeMap<String, String>) -> Result<bool, SnapshotError> {
        let record = self.base.stat(key)?;
        if record.kind != Kind::Active || record.parent.is_some() {
            return Ok(false);
        }
        let dir = self.base.fs_dir(record.id);
        let Some(json) = lone_index(&dir) else { return Ok(false) };
        let bad = |detail: String| SnapshotError::Remote { name: name.to_owned(), detail };
        let index = match LazyIndex::parse(&json) {
            Ok(index) => index,
            Err(e) => {
                tracing::warn!(key, error = %e, "a layer holding only {INDEX_PATH} is not a usable lazy index; committing it as is");
                return Ok(false);
            }
        };
        let json_digest = companion::keep_index(&self.cache, &json).map_err(|e| bad(e.to_string()))?;
        let remote =
            RemoteRecord { source: index.index.source.reference.clone(), index: json_digest.to_string(), layer: None };
        let files = index.index.files.len() as i64;
        // Mount first: a model that cannot be served must fail the commit, not leave a
        // committed snapshot holding only the index file.
        let mounted = self.mount_indexed(&record, index)?;
        // No label decides what is served here: containerd unpacked these bytes from a
        // layer it checked against its diff ID and commits them under the chain ID it
        // computed, so the index (and through it the model and every chunk digest) is
        // bound to the chain ID by the content itself. Modelpack labels that came with
        // the commit are dropped so that the record never names another index.
        let mut labels = if given.is_empty() { record.labels.clone() } else { given.clone() };
        labels.retain(|k, _| !k.starts_with(keys::PREFIX));
        labels.insert(keys::SOURCE.to_owned(), remote.source.clone());
        match self.base.commit(name, key, labels) {
            Ok(_) => {}
            Err(e) => {
                mounted.unmount();
                return Err(e);
            }
        }
        self.base.metadata().set_remote(
            name,
            serde_json::to_string(&remote).expect("record serializes"),
            Usage { size: 0, inodes: files },
        )?;
        tracing::info!(snapshot = %name, source = %remote.source, "companion layer committed as a lazily mounted model");
        self.mounted.lock().expect("mounted lock").insert(name.to_owned(), mounted);
        Ok(true)
    }
}

/// The index JSON if `dir` holds exactly the companion layer's content: the directory
/// of [`INDEX_PATH`] with the index in it, and nothing else.
fn lone_index(dir: &std::path::Path) -> Option<Vec<u8>> {
    let (sub, file) = INDEX_PATH.split_once('/')?;
    let top: Vec<_> = std::fs::read_dir(dir).ok()?.collect::<Result<_, _>>().ok()?;
    if top.len() != 1 || top[0].file_name() != sub {
        return None;
    }
    let inner: Vec<_> = std::fs::read_dir(dir.join(sub)).ok()?.collect::<Result<_, _>>().ok()?;
    if inner.len() != 1 || inner[0].file_name() != file {
        return None;
    }
    let path = dir.join(INDEX_PATH);
    let meta = std::fs::symlink_metadata(&path).ok()?;
    if !meta.is_file() || meta.len() > MAX_INDEX_BYTES {
        return None;
    }
    std::fs::read(path).ok()
}

impl Service for RemoteSnapshotter {
    fn prepare(&self, key: &str, parent: &str, labels: BTreeMap<String, String>) -> Result<Vec<Mount>, SnapshotError> {
        // Bounded before anything reads them: a model prepare fetches before it records.
        crate::metadata::check_labels(&labels)?;
        match model_labels(&labels)? {
            Some(model) => self.prepare_model(key, parent, labels, model),
            None => self.base.prepare(key, parent, labels),
        }
    }

    fn view(&self, key: &str, parent: &str, labels: BTreeMap<String, String>) -> Result<Vec<Mount>, SnapshotError> {
        self.base.view(key, parent, labels)
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotError> {
        self.base.mounts(key)
    }

    fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<(), SnapshotError> {
        crate::metadata::check_labels(&labels)?;
        if self.commit_companion(name, key, &labels)? {
            return Ok(());
        }
        self.base.commit(name, key, labels).map(drop)
    }

    fn remove(&self, key: &str) -> Result<(), SnapshotError> {
        let record = self.base.stat(key)?;
        if record.remote.is_some() {
            if self.base.metadata().has_children(key)? {
                return Err(crate::metadata::MetadataError::HasChildren { key: key.to_owned() }.into());
            }
            if let Some(mounted) = self.mounted.lock().expect("mounted lock").remove(key) {
                mounted.unmount();
            }
        }
        self.base.remove(key).map(drop)
    }

    fn stat(&self, key: &str) -> Result<SnapshotRecord, SnapshotError> {
        self.base.stat(key)
    }

    fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<SnapshotRecord, SnapshotError> {
        self.base.update(key, labels, paths)
    }

    fn list(&self, filters: &[String]) -> Result<Vec<SnapshotRecord>, SnapshotError> {
        self.base.list(filters)
    }

    fn usage(&self, key: &str) -> Result<Usage, SnapshotError> {
        self.base.usage(key)
    }

    fn cleanup(&self) -> Result<(), SnapshotError> {
        self.base.cleanup()
    }
}
