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
//! snapshotter.
//!
//! A model snapshot is never handed out as an empty directory. At `Prepare` and at
//! `Commit` the model is mounted before its record is committed, and a failed mount
//! leaves no record. Records survive a restart: [`RemoteSnapshotter::restore`] mounts
//! them again in the background (from the cache when the registry is unreachable),
//! retrying with exponential backoff, and until a model is mounted `Stat` of it and
//! `Mounts`/`Prepare`/`View` of its children answer `Unavailable` with the cause (after
//! a bounded wait while its first attempt runs). [`super::models`] holds those states.
//!
//! Every mount (at `Prepare`, at `Commit`, again after a restart) starts the model's
//! background prefetch as its companion's lazy index says (`prefetch`), else as the node's
//! `cache.prefetch` says; unmounting the model stops it.
//!
//! A model is fetched with the credentials that kubelet gave a CRI pull of its image
//! (through the CRI proxy, looked up in the [`CriKeychain`] by the
//! `containerd.io/snapshot/cri.image-ref` label, for that image's registry only) when the
//! keychain holds some, and with the node's Docker configuration otherwise. A mounted
//! model keeps the credentials it was opened with; one mounted again after a restart
//! has the node's alone (the keychain is in memory only).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use tokio::sync::Semaphore;

use super::grpc::Service;
use super::labels::{model_labels, ModelLabels};
use super::models::{Entry, ModelTable, State};
use super::{Mount, SnapshotError, Snapshotter};
use crate::cache::ChunkCache;
use crate::companion;
use crate::config::{ModelMountSettings, Settings};
use crate::fs::handover::Keeper;
use crate::fs::shared::{Attached, SharedMounts};
use crate::fs::FsError;
use crate::metadata::{Kind, SnapshotRecord, Usage};
use crate::model::Model;
use crate::modelpack::index::{LazyIndex, VerifiedIndex, INDEX_PATH, MAX_INDEX_BYTES};
use crate::modelpack::labels::{self as keys, Pinned};
use crate::modelpack::Digest;
use crate::registry::credentials::keychain::{CriKeychain, ImageKey};
use crate::registry::credentials::CredentialStore;

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

impl RemoteRecord {
    fn to_json(&self) -> String {
        serde_json::to_string(self).expect("record serializes")
    }
}

/// The snapshotter containerd talks to: overlay snapshots plus lazily mounted models.
#[derive(Debug)]
pub struct RemoteSnapshotter {
    base: Snapshotter,
    cache: Arc<ChunkCache>,
    settings: Settings,
    mounting: ModelMountSettings,
    runtime: Handle,
    /// The one FUSE session every model is served through.
    session: Arc<SharedMounts>,
    models: ModelTable,
    /// Background mounts (restores and retries) running at once.
    mount_slots: Semaphore,
    /// Model prepares run one at a time: a second `Prepare` of one chain ID must find it
    /// committed and mounted, not half made.
    prepare_lock: std::sync::Mutex<()>,
    /// The credentials CRI pulls proved, when the CRI proxy is served.
    keychain: Option<CriKeychain>,
}

impl RemoteSnapshotter {
    /// Wraps `base`; models are cached in `cache`, read on `runtime`, kept mounted as
    /// `mounting` says, and fetched with the credentials of their image's CRI pull when
    /// `keychain` holds some. A dead model session a crashed process left is detached.
    pub fn new(
        base: Snapshotter,
        cache: Arc<ChunkCache>,
        settings: Settings,
        mounting: ModelMountSettings,
        keychain: Option<CriKeychain>,
        keeper: Option<Arc<dyn Keeper>>,
        runtime: Handle,
    ) -> Result<Self, FsError> {
        let session = SharedMounts::new(
            &base.models_dir(),
            "models",
            runtime.clone(),
            settings.fetch.passthrough,
            mounting.fuse_threads,
            mounting.restore_wait,
            keeper,
        )?;
        Ok(Self {
            base,
            cache,
            settings,
            mount_slots: Semaphore::new(mounting.concurrency),
            mounting,
            runtime,
            session: Arc::new(session),
            models: ModelTable::default(),
            prepare_lock: std::sync::Mutex::new(()),
            keychain,
        })
    }

    /// The settings a model of the image `image` (its snapshot's label) is opened with:
    /// with the credentials of a CRI pull of that image, for its registry alone, when the
    /// keychain holds some; else the node's.
    fn settings_for(&self, image: Option<&ImageKey>) -> Settings {
        let found = self.keychain.as_ref().zip(image).and_then(|(keychain, image)| keychain.for_image(image));
        let Some(found) = found else { return self.settings.clone() };
        tracing::debug!(image = %found.image(), registry = found.registry(), "model credentials from the CRI pull of its image");
        let mut settings = self.settings.clone();
        let node = settings.registry.credentials.take();
        let store = node.unwrap_or_else(|| CredentialStore::from_env(settings.registry.request_timeout));
        settings.registry.credentials = Some(store.with_cri_pull(found));
        settings
    }

    /// Starts mounting every recorded model snapshot again (after a restart) and returns
    /// at once: each model is marked as being mounted, so requests about it wait for it
    /// (bounded) instead of finding it unmounted, and is mounted in the background,
    /// `mounting.concurrency` at a time, retried with backoff until it works. A dead
    /// mount a crashed process left behind is replaced.
    pub fn restore(self: &Arc<Self>) -> Result<(), SnapshotError> {
        let records = self.base.metadata().list()?;
        let mut entries = self.models.lock();
        for record in records {
            let Some(remote) = &record.remote else { continue };
            let (state, task) = match serde_json::from_str::<RemoteRecord>(remote) {
                Ok(remote) => {
                    let task = self.runtime.spawn(self.clone().keep_mounting(record.key.clone(), record.id, remote));
                    (State::Mounting, Some(task.abort_handle()))
                }
                Err(e) => {
                    tracing::error!(snapshot = %record.key, error = %e, "unreadable model record; not mounting it");
                    (State::Broken { cause: format!("its record is unreadable: {e}") }, None)
                }
            };
            entries.insert(record.key.clone(), Entry { id: record.id, state, task });
        }
        tracing::info!(models = entries.len(), "mounting recorded models in the background");
        Ok(())
    }

    /// Mounts model `name` (record `id`) until it is mounted or removed: one attempt in
    /// a mount slot, then exponential backoff between attempts.
    async fn keep_mounting(self: Arc<Self>, name: String, id: u64, remote: RemoteRecord) {
        let mut delay = self.mounting.retry_initial;
        loop {
            let attempt = {
                let _slot = self.mount_slots.acquire().await.expect("mount slots are never closed");
                self.mount_again(&name, id, &remote).await
            };
            let cause = match attempt {
                Ok(true) => {
                    tracing::info!(snapshot = %name, source = %remote.source, "model mounted again");
                    return;
                }
                Ok(false) => return,
                Err(e) => e.to_string(),
            };
            tracing::warn!(snapshot = %name, error = %cause, retry_in_secs = delay.as_secs(), "cannot mount model; will retry");
            let retrying = State::Retrying { cause, retry_at: Instant::now() + delay };
            if !self.models.set(&mut self.models.lock(), &name, id, retrying) {
                return;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.mounting.retry_max);
        }
    }

    /// One attempt to mount a recorded model: Ok(false) if it was removed meanwhile. The
    /// node's credentials are all it has: those of CRI pulls were in memory only.
    async fn mount_again(self: &Arc<Self>, name: &str, id: u64, remote: &RemoteRecord) -> Result<bool, SnapshotError> {
        let model = self.open_recorded(name, remote, &self.settings).await?;
        let this = self.clone();
        let owned = name.to_owned();
        tokio::task::spawn_blocking(move || this.mount_recorded(&owned, id, model))
            .await
            .map_err(|e| SnapshotError::Remote { name: name.to_owned(), detail: format!("mount worker failed: {e}") })?
    }

    fn mount_recorded(&self, name: &str, id: u64, model: Model) -> Result<bool, SnapshotError> {
        let mut entries = self.models.lock();
        // Checked under the table lock that `remove` also takes: a model removed while
        // it was being opened is not mounted over a directory about to be deleted.
        if !entries.get(name).is_some_and(|e| e.id == id && !matches!(e.state, State::Mounted(_))) {
            return Ok(false);
        }
        // A mount left at its directory is the session's to take over or replace.
        let mounted = self.mount_at(name, id, model)?;
        Ok(self.models.set(&mut entries, name, id, State::Mounted(mounted)))
    }

    /// The models of the model snapshots mounted now.
    pub fn mounted_models(&self) -> Vec<Arc<Model>> {
        let entries = self.models.lock();
        entries
            .values()
            .filter_map(|entry| match &entry.state {
                State::Mounted(attached) => attached.model(),
                _ => None,
            })
            .collect()
    }

    /// Whether the models' session is kept for the next process (a restart then leaves
    /// it as it is).
    pub fn session_kept(&self) -> bool {
        self.session.is_kept()
    }

    /// Unmounts every model and stops every background mount (at shutdown), then the
    /// session, with any model a previous process served that is not mounted again.
    pub fn unmount_all(&self) {
        let entries: Vec<(String, Entry)> = self.models.lock().drain().collect();
        for (name, entry) in entries {
            if let Some(task) = entry.task {
                task.abort();
            }
            if let State::Mounted(mounted) = entry.state {
                tracing::info!(snapshot = %name, "unmounting model");
                mounted.unmount();
            }
        }
        self.session.shut();
    }

    /// Ok when every model snapshot among `records` is mounted.
    fn require_served<'a>(&self, records: impl IntoIterator<Item = &'a SnapshotRecord>) -> Result<(), SnapshotError> {
        for record in records.into_iter().filter(|r| r.remote.is_some()) {
            self.models.require_mounted(&record.key, self.mounting.restore_wait)?;
        }
        Ok(())
    }

    /// Ok when `parent` (if any) and its ancestors are served: a child of an unmounted
    /// model would see an empty directory.
    fn require_parent_served(&self, parent: &str) -> Result<(), SnapshotError> {
        if parent.is_empty() {
            return Ok(());
        }
        // A missing parent is left to the overlay snapshotter to report.
        let Some(record) = self.base.metadata().get(parent)? else { return Ok(()) };
        let ancestors = self.base.metadata().ancestors(parent)?;
        self.require_served(std::iter::once(&record).chain(&ancestors))
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
                self.require_served([&existing])?;
                return Err(SnapshotError::RemoteReady { key: key.to_owned(), name });
            }
        }
        let settings = self.settings_for(super::labels::image_ref(&labels).as_ref());
        let (index, json_digest) = self.runtime.block_on(self.load_index(&name, &model.index, &settings))?;
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
        let opened = self.runtime.block_on(self.open_indexed(&name, index, &settings))?;
        // Record and mount under the table lock, so nobody sees the record without
        // learning whether its model is mounted.
        let mut entries = self.models.lock();
        let record = self.base.metadata().create_committed(&name, None, labels, Some(remote.to_json()), usage)?;
        let dir = self.base.fs_dir(record.id);
        let mounted = std::fs::create_dir_all(&dir)
            .map_err(|e| SnapshotError::Io { op: "creating", path: dir.display().to_string(), source: e })
            .and_then(|()| self.mount_at(&name, record.id, opened));
        match mounted {
            Ok(mounted) => {
                tracing::info!(snapshot = %name, source = %remote.source, path = %dir.display(), "model mounted");
                entries.insert(name.clone(), Entry { id: record.id, state: State::Mounted(mounted), task: None });
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

    /// The model a record names: its index from the cache, or fetched again from the
    /// pinned index layer when the cache lost it.
    async fn open_recorded(
        &self,
        name: &str,
        remote: &RemoteRecord,
        settings: &Settings,
    ) -> Result<Model, SnapshotError> {
        let bad = |detail: String| SnapshotError::Remote { name: name.to_owned(), detail };
        let json_digest: Digest =
            remote.index.parse().map_err(|e: crate::modelpack::digest::DigestError| bad(e.to_string()))?;
        let index = match companion::cached_index(&self.cache, &json_digest).map_err(bad)? {
            Some(index) => index,
            None => {
                let layer =
                    remote.layer.as_deref().ok_or_else(|| bad("the lazy index is no longer cached".to_owned()))?;
                let pinned = super::labels::pinned(keys::INDEX, layer)?;
                let (index, fetched) = self.load_index(name, &pinned, settings).await?;
                if fetched != json_digest {
                    return Err(bad(format!(
                        "index layer {layer} holds index {fetched}, not the recorded {json_digest}"
                    )));
                }
                index
            }
        };
        self.open_indexed(name, index, settings).await
    }

    async fn open_indexed(
        &self,
        name: &str,
        index: VerifiedIndex,
        settings: &Settings,
    ) -> Result<Model, SnapshotError> {
        Model::open_indexed(index, settings, self.cache.clone())
            .await
            .map_err(|source| SnapshotError::Model { name: name.to_owned(), source: Box::new(source) })
    }

    /// Serves an opened model at the `fs` directory of snapshot `id`, and starts its
    /// background prefetch (its companion's policy, else the node's), which detaching it
    /// stops.
    fn mount_at(&self, name: &str, id: u64, model: Model) -> Result<Attached, SnapshotError> {
        let model = Arc::new(model);
        let attached = self
            .session
            .attach(model.clone(), &self.base.fs_dir(id))
            .map_err(|e| SnapshotError::Remote { name: name.to_owned(), detail: e.to_string() })?;
        model.start_prefetch(model.prefetch, &self.runtime);
        Ok(attached)
    }

    /// The verified lazy index in the layer `at`, and the digest of its JSON.
    async fn load_index(
        &self,
        name: &str,
        at: &Pinned,
        settings: &Settings,
    ) -> Result<(VerifiedIndex, Digest), SnapshotError> {
        companion::load_index(&at.reference, &at.digest, &self.cache, &settings.registry)
            .await
            .map_err(|source| SnapshotError::Index { name: name.to_owned(), source: Box::new(source) })
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
        let usage = Usage { size: 0, inodes: index.index.files.len() as i64 };
        let settings = self.settings_for(super::labels::image_ref(&record.labels).as_ref());
        let opened = self.runtime.block_on(self.open_indexed(name, index, &settings))?;
        // No label decides what is served here: containerd unpacked these bytes from a
        // layer it checked against its diff ID and commits them under the chain ID it
        // computed, so the index (and through it the model and every chunk digest) is
        // bound to the chain ID by the content itself. Modelpack labels that came with
        // the commit are dropped so that the record never names another index.
        let mut labels = if given.is_empty() { record.labels.clone() } else { given.clone() };
        labels.retain(|k, _| !k.starts_with(keys::PREFIX));
        labels.insert(keys::SOURCE.to_owned(), remote.source.clone());
        let mut entries = self.models.lock();
        // Mount first: a model that cannot be served must fail the commit, not leave a
        // committed snapshot holding only the index file. The commit and the model
        // record are one transaction.
        let mounted = self.mount_at(name, record.id, opened)?;
        if let Err(e) = self.base.commit_remote(name, key, labels, remote.to_json(), usage) {
            mounted.unmount();
            return Err(e);
        }
        tracing::info!(snapshot = %name, source = %remote.source, "companion layer committed as a lazily mounted model");
        entries.insert(name.to_owned(), Entry { id: record.id, state: State::Mounted(mounted), task: None });
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
            None => {
                self.require_parent_served(parent)?;
                self.base.prepare(key, parent, labels)
            }
        }
    }

    fn view(&self, key: &str, parent: &str, labels: BTreeMap<String, String>) -> Result<Vec<Mount>, SnapshotError> {
        crate::metadata::check_labels(&labels)?;
        self.require_parent_served(parent)?;
        self.base.view(key, parent, labels)
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotError> {
        self.require_served(&self.base.metadata().ancestors(key)?)?;
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
            let entry = self.models.lock().remove(key);
            if let Some(entry) = entry {
                if let Some(task) = entry.task {
                    task.abort();
                }
                if let State::Mounted(mounted) = entry.state {
                    mounted.unmount();
                }
            }
        }
        self.base.remove(key).map(drop)
    }

    fn stat(&self, key: &str) -> Result<SnapshotRecord, SnapshotError> {
        let record = self.base.stat(key)?;
        self.require_served([&record])?;
        Ok(record)
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
